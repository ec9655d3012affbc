"""Production configuration: the instance file, the Kubernetes executor and the training pods.

There is no cluster here, so the tests check what would be submitted. The instance file is
validated against Dagster's and dagster-postgres' config schemas, and the executor config
against dagster-k8s' schema. The training pod goes through
``dagster_k8s.pipes.build_pod_body``, the function ``PipesK8sClient.run`` uses to build the
pod it creates.
"""

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import kubernetes
import pytest
import yaml
from dagster._config import process_config, validate_config
from dagster._core.instance.config import dagster_instance_config

from kad_pipeline.deploy.pods import SecretEnv, TrainingPodSettings, build_training_pod_spec, training_command
from resources.deploy import (
    TrainingPodResource,
    production_executor,
    production_executor_config,
    training_pod_resources,
)

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "kad_pipeline" / "deploy"
STAGE2_MODULE = "kad_pipeline.training.stage2_main"

PRODUCTION_ENV = {
    "KAD_DEPLOYMENT": "production",
    "KAD_IMAGE": "registry.example.org/kad-pipeline:1.0",
    "KAD_K8S_NAMESPACE": "kad-test",
    "KAD_K8S_MAX_CONCURRENT": "12",
    "KAD_STAGE1_GPUS": "1",
    "KAD_STAGE2_GPUS": "4",
    "KAD_ARTIFACTS_URI": "s3://kad-artifacts/prod",
    "KAD_S3_ENDPOINT_URL": "http://minio.kad.svc:9000",
}


def submitted_pod(spec: dict, env_vars: dict[str, str] | None = None) -> dict:
    """Return the pod as PipesK8sClient would send it to the API server (camelCase JSON)."""
    from dagster_k8s.pipes import build_pod_body

    pod = build_pod_body(
        pod_name="kad-stage2-test",
        image=None,
        command=None,
        env_vars=env_vars or {"DAGSTER_PIPES_CONTEXT": "context-blob", "DAGSTER_PIPES_MESSAGES": "messages-blob"},
        base_pod_meta={"labels": {"app.kubernetes.io/component": "stage2"}},
        base_pod_spec=spec,
    )
    return kubernetes.client.ApiClient().sanitize_for_serialization(pod)


def test_instance_yaml_matches_dagster_schema(tmp_path, monkeypatch):
    for name, value in {
        "DAGSTER_PG_HOST": "postgres.kad.svc", "DAGSTER_PG_DB": "dagster",
        "DAGSTER_PG_USERNAME": "dagster", "DAGSTER_PG_PASSWORD": "not-a-real-password",
    }.items():
        monkeypatch.setenv(name, value)
    shutil.copy(DEPLOY / "dagster.yaml", tmp_path / "dagster.yaml")

    config, instance_class = dagster_instance_config(str(tmp_path))
    assert instance_class is None
    assert config["concurrency"]["runs"]["max_concurrent_runs"] == 20

    postgres = process_config(
        importlib.import_module("dagster_postgres").DagsterPostgresStorage.config_type(), config["storage"]["postgres"]
    )
    assert postgres.success, postgres.errors
    assert postgres.value["postgres_db"]["hostname"] == "postgres.kad.svc"
    assert postgres.value["postgres_db"]["password"] == "not-a-real-password"

    for section in ("run_launcher", "run_coordinator"):
        entry = config[section]
        cls = getattr(importlib.import_module(entry["module"]), entry["class"])
        checked = process_config(cls.config_type(), entry.get("config") or {})
        assert checked.success, (section, checked.errors)


def test_executor_example_matches_k8s_schema():
    from dagster_k8s import k8s_job_executor

    example = yaml.safe_load((DEPLOY / "k8s_executor.yaml").read_text())
    checked = validate_config(k8s_job_executor.config_schema.config_type, example["execution"]["config"])
    assert checked.success, checked.errors
    assert checked.value["max_concurrent"] == 8


def test_production_executor_config_is_valid():
    from dagster_k8s import k8s_job_executor

    assert production_executor(PRODUCTION_ENV).name == "k8s"
    checked = validate_config(k8s_job_executor.config_schema.config_type, production_executor_config(PRODUCTION_ENV))
    assert checked.success, checked.errors
    assert checked.value["max_concurrent"] == 12
    assert checked.value["job_namespace"] == "kad-test"
    assert checked.value["job_image"] == PRODUCTION_ENV["KAD_IMAGE"]


def test_production_needs_an_image():
    environ = {key: value for key, value in PRODUCTION_ENV.items() if key != "KAD_IMAGE"}
    with pytest.raises(ValueError, match="KAD_IMAGE"):
        training_pod_resources(environ)
    with pytest.raises(ValueError, match="KAD_IMAGE"):
        production_executor(environ)


def test_multi_gpu_pod_spec():
    pods = training_pod_resources(PRODUCTION_ENV)
    stage2 = pods["stage2_pod"]
    args = ["--config", "/scratch/run-1/stage2.json"]
    pod = submitted_pod(stage2.pod_spec(STAGE2_MODULE, args))
    spec = pod["spec"]
    (container,) = spec["containers"]

    assert container["image"] == "registry.example.org/kad-pipeline:1.0"
    assert container["command"] == [
        "torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=4", "-m", STAGE2_MODULE, *args,
    ]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "4"
    assert container["resources"]["requests"]["cpu"] == "8"
    assert container["resources"]["requests"]["memory"] == "64Gi"
    assert container["resources"]["limits"]["memory"] == "64Gi"
    assert "cpu" not in container["resources"]["limits"]
    assert spec["restartPolicy"] == "Never"
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

    env = {item["name"]: item for item in container["env"]}
    assert env["KAD_ARTIFACTS_URI"]["value"] == "s3://kad-artifacts/prod"
    assert env["KAD_S3_ENDPOINT_URL"]["value"] == "http://minio.kad.svc:9000"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key], f"{key} must come from a Secret, not a literal"
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "kad-s3-credentials", "key": key}
    # The Pipes bootstrap variables are added to the same container.
    assert env["DAGSTER_PIPES_CONTEXT"]["value"] == "context-blob"

    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert volumes["dataset"]["persistentVolumeClaim"] == {"claimName": "kad-datasets", "readOnly": True}
    assert volumes["scratch"]["persistentVolumeClaim"] == {"claimName": "kad-scratch"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    assert mounts["dataset"] == {"name": "dataset", "mountPath": "/data", "readOnly": True}
    assert mounts["scratch"]["mountPath"] == "/scratch"
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "stage2"


def test_single_gpu_and_cpu_pods():
    one = TrainingPodSettings(image="kad:1", gpus=1)
    assert training_command(one, "kad_pipeline.training.stage1_main", ["--config", "c.json"]) == [
        "python", "-m", "kad_pipeline.training.stage1_main", "--config", "c.json",
    ]
    two_per_gpu = TrainingPodSettings(image="kad:1", gpus=2, processes_per_node=4)
    assert "--nproc_per_node=4" in training_command(two_per_gpu, "m")

    cpu_only = TrainingPodSettings(image="kad:1", gpus=0)
    spec = submitted_pod(build_training_pod_spec(cpu_only, training_command(cpu_only, "m")))["spec"]
    resources = spec["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in resources["limits"]
    assert "tolerations" not in spec
    # Without a claim the scratch folder is a private emptyDir.
    assert {"name": "scratch", "emptyDir": {}} in spec["volumes"]


def test_torchrun_command_starts_every_rank(tmp_path):
    """Run the generated multi-process command on CPU: torchrun must start one rank per GPU."""
    probe = tmp_path / "rank_probe.py"
    probe.write_text(
        "import os, sys\n"
        "from pathlib import Path\n"
        "out = Path(sys.argv[sys.argv.index('--out') + 1])\n"
        "(out / os.environ['RANK']).write_text(os.environ['WORLD_SIZE'] + ' ' + os.environ['LOCAL_RANK'])\n"
    )
    settings = TrainingPodSettings(image="kad:1", gpus=3)
    command = training_command(settings, "rank_probe", ["--out", str(tmp_path)])
    assert command[0] == "torchrun"
    command[0] = str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    written = {path.name: path.read_text() for path in tmp_path.iterdir() if path.name.isdigit()}
    assert written == {"0": "3 0", "1": "3 1", "2": "3 2"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image": ""}, "image is required"),
        ({"gpus": -1}, "gpus must be 0 or more"),
        ({"memory": "64 GB"}, "not a Kubernetes quantity"),
        ({"dataset_mount": "data"}, "must be absolute"),
        ({"scratch_mount": "/data"}, "share the mount path"),
        ({"env": {"BAD-NAME": "x"}}, "invalid environment variable name"),
    ],
)
def test_invalid_pod_settings_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainingPodSettings(**{"image": "kad:1", **changes})


def test_secret_reference_format():
    assert SecretEnv.parse("OPENAI_API_KEY", "kad-llm/api-key") == SecretEnv("OPENAI_API_KEY", "kad-llm", "api-key")
    with pytest.raises(ValueError, match="secret-name/key"):
        SecretEnv.parse("OPENAI_API_KEY", "kad-llm")


def test_launch_passes_pod_to_pipes_client():
    class RecordingClient:
        """Stands in for PipesK8sClient, which needs a cluster; records what run() receives."""

        def __init__(self):
            self.calls = []

        def run(self, **kwargs):
            self.calls.append(kwargs)

    client = RecordingClient()

    @dg.asset
    def kad_model(context: dg.AssetExecutionContext, stage2_pod: TrainingPodResource) -> None:
        stage2_pod.launch(context, STAGE2_MODULE, ["--config", "/scratch/c.json"], extras={"epochs": 1}, client=client)

    pod = TrainingPodResource(stage="stage2", image="kad:1", gpus=2, namespace="kad-test", scratch_claim="kad-scratch")
    assert dg.materialize([kad_model], resources={"stage2_pod": pod}).success
    (call,) = client.calls
    assert call["namespace"] == "kad-test"
    assert call["extras"] == {"epochs": 1}
    assert call["base_pod_spec"] == pod.pod_spec(STAGE2_MODULE, ["--config", "/scratch/c.json"])
    assert call["base_pod_meta"]["labels"]["app.kubernetes.io/component"] == "stage2"
    assert call["context"].asset_key == dg.AssetKey("kad_model")


def test_production_definitions_load(monkeypatch):
    for name, value in PRODUCTION_ENV.items():
        monkeypatch.setenv(name, value)
    definitions = importlib.import_module("kad_pipeline.definitions")
    defs = definitions.build_definitions()
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == "k8s"
    assert isinstance(defs.resources["stage2_pod"], TrainingPodResource)
    assert defs.resources["stage2_pod"].gpus == 4
    assert defs.resolve_sensor_def("kad_automation_sensor").default_status == dg.DefaultSensorStatus.STOPPED


def test_production_definitions_validate_cli(tmp_path):
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = dict(os.environ, **PRODUCTION_ENV, DAGSTER_HOME=str(tmp_path))
    dagster = Path(sys.executable).parent / "dagster"
    completed = subprocess.run(
        [str(dagster), "definitions", "validate", "-m", "kad_pipeline.definitions"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
