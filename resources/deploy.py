"""Production compute: the Kubernetes executor and GPU training pods launched through Dagster Pipes.

``KAD_DEPLOYMENT=production`` makes the code location use both (see
``kad_pipeline.definitions``). Settings come from environment variables, read when the
definitions load:

- ``KAD_IMAGE``: container image of the code location, the step pods and the training pods.
- ``KAD_K8S_NAMESPACE``: namespace of step and training pods (default ``kad``).
- ``KAD_K8S_MAX_CONCURRENT``: step pods one run may have at once (default 8).
- ``KAD_STAGE1_GPUS``, ``KAD_STAGE2_GPUS``: GPUs of one training pod (default 1 each);
  several GPUs run under ``torchrun --nproc_per_node=<GPUs>``.
- ``KAD_DATASET_CLAIM``, ``KAD_SCRATCH_CLAIM``: PersistentVolumeClaims of the data set
  (read-only) and of the scratch folder shared by steps and training pods.
- ``KAD_S3_SECRET``: Secret with ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` keys, given
  to step and training pods as environment variables (default ``kad-s3-credentials``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
from pydantic import Field

from kad_pipeline.deploy.pods import (
    SecretEnv,
    TrainingPodSettings,
    build_training_pod_spec,
    training_command,
    training_pod_metadata,
)

DEFAULT_NAMESPACE = "kad"
DEFAULT_MAX_CONCURRENT = 8
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# Settings the step passes on to the training pod, so both see the same artifacts.
FORWARDED_ENV = ("KAD_ARTIFACTS_URI", "KAD_S3_ENDPOINT_URL", "KAD_REPORT_BUCKETS")


class TrainingPodResource(dg.ConfigurableResource):
    """A GPU training pod that a Dagster step launches and waits for through Dagster Pipes.

    The step writes the training config to the shared scratch volume, calls ``launch`` with
    the training module and its arguments, and reads the summary the pod reports through
    Pipes. Logs of the pod stream into the step's Dagster logs.
    """

    stage: str = Field(description="Label of the training stage, e.g. 'stage1' or 'stage2'.")
    image: str = Field(description="Container image with kad-pipeline and CUDA-enabled torch.")
    namespace: str = Field(default=DEFAULT_NAMESPACE, description="Kubernetes namespace of the pod.")
    gpus: int = Field(default=1, ge=0, description="GPUs of the pod; several run under torchrun, one process each.")
    processes_per_node: int | None = Field(
        default=None, ge=1, description="torchrun --nproc_per_node; unset means one process per GPU."
    )
    cpu: str = Field(default="8", description="CPU request, e.g. '8' or '7500m'.")
    memory: str = Field(default="64Gi", description="Memory request and limit, e.g. '64Gi'.")
    env: dict[str, str] = Field(default_factory=dict, description="Plain environment variables of the pod.")
    secret_env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables read from Secrets: variable name to 'secret-name/key'.",
    )
    dataset_claim: str | None = Field(default=None, description="PersistentVolumeClaim of the data set, mounted read-only.")
    dataset_mount: str = Field(default="/data", description="Mount path of the data set.")
    scratch_claim: str | None = Field(
        default=None, description="Shared ReadWriteMany PersistentVolumeClaim; unset mounts a private emptyDir."
    )
    scratch_mount: str = Field(default="/scratch", description="Mount path of the shared scratch folder.")
    shm_size: str = Field(default="16Gi", description="Size of /dev/shm for DataLoader workers.")
    service_account: str | None = Field(default=None, description="Service account of the pod.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pod must match.")
    pod_wait_timeout: float = Field(
        default=7 * 24 * 3600.0, ge=0, description="Seconds to wait for the pod to finish; 0 waits forever."
    )

    def settings(self) -> TrainingPodSettings:
        """Return the library settings of this pod."""
        return TrainingPodSettings(
            image=self.image,
            gpus=self.gpus,
            processes_per_node=self.processes_per_node,
            cpu=self.cpu,
            memory=self.memory,
            env=dict(self.env),
            secret_env=tuple(SecretEnv.parse(name, reference) for name, reference in sorted(self.secret_env.items())),
            dataset_claim=self.dataset_claim,
            dataset_mount=self.dataset_mount,
            scratch_claim=self.scratch_claim,
            scratch_mount=self.scratch_mount,
            shm_size=self.shm_size,
            service_account=self.service_account,
            node_selector=dict(self.node_selector),
        )

    def command(self, module: str, args: Sequence[str] = ()) -> list[str]:
        """Return the container command: ``python -m module`` or ``torchrun ... -m module``."""
        return training_command(self.settings(), module, args)

    def pod_spec(self, module: str, args: Sequence[str] = ()) -> dict[str, Any]:
        """Return the PodSpec that ``launch`` submits (before Pipes adds its own variables)."""
        settings = self.settings()
        return build_training_pod_spec(settings, training_command(settings, module, args))

    def launch(
        self,
        context: dg.AssetExecutionContext,
        module: str,
        args: Sequence[str] = (),
        extras: Mapping[str, Any] | None = None,
        client: Any = None,
    ) -> dg.PipesClientCompletedInvocation:
        """Run the module in a training pod and wait for it; raise when the pod fails.

        ``client`` defaults to ``PipesK8sClient()``, which reads the in-cluster configuration.
        """
        from dagster_k8s import PipesK8sClient

        client = client or PipesK8sClient()
        context.log.info(
            "Launching %s training pod: %s, %d GPU(s), %d process(es)",
            self.stage, self.image, self.gpus, self.settings().nproc_per_node,
        )
        return client.run(
            context=context,
            extras=dict(extras or {}),
            namespace=self.namespace,
            base_pod_meta=training_pod_metadata(self.stage),
            base_pod_spec=self.pod_spec(module, args),
            pod_wait_timeout=self.pod_wait_timeout,
        )


def deployment_image(environ: Mapping[str, str] | None = None) -> str:
    """Return ``$KAD_IMAGE``; raise with the fix when it is unset."""
    environ = os.environ if environ is None else environ
    image = environ.get("KAD_IMAGE")
    if not image:
        raise ValueError(
            "KAD_DEPLOYMENT=production needs KAD_IMAGE: the container image with kad-pipeline installed, "
            "e.g. registry.example.org/kad-pipeline:1.0"
        )
    return image


def training_pod_resources(environ: Mapping[str, str] | None = None) -> dict[str, TrainingPodResource]:
    """Return the ``stage1_pod`` and ``stage2_pod`` resources configured from the environment."""
    environ = os.environ if environ is None else environ
    image = deployment_image(environ)
    s3_secret = environ.get("KAD_S3_SECRET", "kad-s3-credentials")
    shared = {
        "image": image,
        "namespace": environ.get("KAD_K8S_NAMESPACE", DEFAULT_NAMESPACE),
        "env": {name: environ[name] for name in FORWARDED_ENV if environ.get(name)},
        "secret_env": {key: f"{s3_secret}/{key}" for key in S3_SECRET_KEYS},
        "dataset_claim": environ.get("KAD_DATASET_CLAIM", "kad-datasets"),
        "scratch_claim": environ.get("KAD_SCRATCH_CLAIM", "kad-scratch"),
    }
    return {
        "stage1_pod": TrainingPodResource(stage="stage1", gpus=_int_env(environ, "KAD_STAGE1_GPUS", 1), **shared),
        "stage2_pod": TrainingPodResource(stage="stage2", gpus=_int_env(environ, "KAD_STAGE2_GPUS", 1), **shared),
    }


def production_executor(environ: Mapping[str, str] | None = None) -> dg.ExecutorDefinition:
    """Return the Kubernetes executor: every step of a run in its own Kubernetes Job."""
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured(production_executor_config(environ), name="k8s")


def production_executor_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Return the config of the Kubernetes executor, read from the environment.

    Steps get modest resources because training runs in its own GPU pods; the per-report
    steps of a run over many buckets parallelize up to ``KAD_K8S_MAX_CONCURRENT``.
    """
    environ = os.environ if environ is None else environ
    s3_secret = environ.get("KAD_S3_SECRET", "kad-s3-credentials")
    return {
        "job_namespace": environ.get("KAD_K8S_NAMESPACE", DEFAULT_NAMESPACE),
        "max_concurrent": _int_env(environ, "KAD_K8S_MAX_CONCURRENT", DEFAULT_MAX_CONCURRENT),
        "job_image": deployment_image(environ),
        "env_secrets": [s3_secret],
        "env_vars": [name for name in FORWARDED_ENV if environ.get(name)],
        "step_k8s_config": {
            "container_config": {
                "resources": {
                    "requests": {"cpu": "1", "memory": "4Gi"},
                    "limits": {"memory": "8Gi"},
                }
            }
        },
    }

def _int_env(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
