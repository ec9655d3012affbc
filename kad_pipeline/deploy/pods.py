"""Kubernetes pod specifications of the training pods (stage 1 and stage 2).

The Dagster step launches each training run as its own pod through Dagster Pipes
(``dagster_k8s.PipesK8sClient``), so the step pod stays small and the GPUs are held only
while training runs. The dictionaries built here are Kubernetes ``PodSpec`` documents with
the API's camelCase field names: they can be passed as ``base_pod_spec`` to
``PipesK8sClient.run`` or written out as YAML for ``kubectl``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CONTAINER_NAME = "kad-training"

# Kubernetes resource quantities, e.g. "500m", "8", "64Gi", "1.5".
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class SecretEnv:
    """An environment variable whose value the kubelet reads from a key of a Kubernetes Secret.

    The value never appears in the pod specification, in Dagster's run storage or in logs.
    """

    name: str
    secret: str
    key: str

    @classmethod
    def parse(cls, name: str, reference: str) -> SecretEnv:
        """Build one from ``"secret-name/key"``."""
        secret, _, key = reference.partition("/")
        if not secret or not key:
            raise ValueError(f"invalid secret reference {reference!r} for {name}: expected 'secret-name/key'")
        return cls(name=name, secret=secret, key=key)


@dataclass(frozen=True)
class TrainingPodSettings:
    """Resource requests, environment and volumes of one training pod."""

    image: str  # container image with kad-pipeline and CUDA-enabled torch installed
    gpus: int = 1  # GPUs on the one node, requested as the gpu_resource extended resource
    processes_per_node: int | None = None  # torchrun --nproc_per_node; None means one process per GPU
    cpu: str = "8"  # CPU request (no CPU limit, so data loading is never throttled)
    memory: str = "64Gi"  # memory request and limit
    env: Mapping[str, str] = field(default_factory=dict)  # plain environment variables
    secret_env: Sequence[SecretEnv] = ()  # environment variables read from Secrets
    dataset_claim: str | None = None  # PersistentVolumeClaim with the images and reports, mounted read-only
    dataset_mount: str = "/data"
    scratch_claim: str | None = None  # shared PersistentVolumeClaim (ReadWriteMany); None mounts an emptyDir
    scratch_mount: str = "/scratch"  # configs, resumable checkpoints and outputs shared with the Dagster step
    shm_size: str = "16Gi"  # /dev/shm size; DataLoader workers pass batches through shared memory
    service_account: str | None = None  # service account of the pod, e.g. one bound to an S3 IAM role
    node_selector: Mapping[str, str] = field(default_factory=dict)
    gpu_resource: str = "nvidia.com/gpu"  # the extended resource name of the NVIDIA device plugin
    image_pull_policy: str = "IfNotPresent"
    python: str = "python"  # interpreter of the image, for single-process runs

    def __post_init__(self) -> None:
        if not self.image:
            raise ValueError("image is required: the container image with kad-pipeline installed")
        if self.gpus < 0:
            raise ValueError(f"gpus must be 0 or more, got {self.gpus}")
        if self.processes_per_node is not None and self.processes_per_node < 1:
            raise ValueError(f"processes_per_node must be at least 1, got {self.processes_per_node}")
        for name, quantity in (("cpu", self.cpu), ("memory", self.memory), ("shm_size", self.shm_size)):
            if not _QUANTITY.match(quantity):
                raise ValueError(f"{name} {quantity!r} is not a Kubernetes quantity such as '8', '500m' or '64Gi'")
        for mount in (self.dataset_mount, self.scratch_mount):
            if not mount.startswith("/"):
                raise ValueError(f"mount path {mount!r} must be absolute")
        if self.dataset_mount == self.scratch_mount:
            raise ValueError(f"dataset and scratch share the mount path {self.dataset_mount!r}")
        for name in list(self.env) + [secret.name for secret in self.secret_env]:
            if not _ENV_NAME.match(name):
                raise ValueError(f"invalid environment variable name {name!r}")

    @property
    def nproc_per_node(self) -> int:
        """Processes torchrun starts: the configured count, else one per GPU, else one."""
        return self.processes_per_node or max(self.gpus, 1)


def training_command(settings: TrainingPodSettings, module: str, args: Sequence[str] = ()) -> list[str]:
    """Return the container command that runs ``python -m module args`` on every GPU of the pod.

    One process runs the module directly. Several run under ``torchrun --standalone``, which
    starts a local rendezvous and sets RANK, LOCAL_RANK and WORLD_SIZE for
    ``torch.distributed``; the module reads them.
    """
    if not module:
        raise ValueError("module is required, e.g. kad_pipeline.training.stage2_main")
    if settings.nproc_per_node == 1:
        return [settings.python, "-m", module, *args]
    return [
        "torchrun",
        "--standalone",
        "--nnodes=1",
        f"--nproc_per_node={settings.nproc_per_node}",
        "-m",
        module,
        *args,
    ]


def build_training_pod_spec(settings: TrainingPodSettings, command: Sequence[str]) -> dict[str, Any]:
    """Return the PodSpec of one training pod running ``command``."""
    requests: dict[str, Any] = {"cpu": settings.cpu, "memory": settings.memory}
    limits: dict[str, Any] = {"memory": settings.memory}
    if settings.gpus:
        # Extended resources such as GPUs are set as limits; Kubernetes copies them to requests.
        limits[settings.gpu_resource] = str(settings.gpus)
        requests[settings.gpu_resource] = str(settings.gpus)

    env: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    env += [{"name": name, "value": value} for name, value in sorted(settings.env.items())]
    env += [
        {"name": secret.name, "valueFrom": {"secretKeyRef": {"name": secret.secret, "key": secret.key}}}
        for secret in settings.secret_env
    ]

    volumes, mounts = _volumes(settings)
    container = {
        "name": CONTAINER_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(command),
        "env": env,
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": mounts,
    }
    spec: dict[str, Any] = {
        # A failed training run fails its Dagster step; Dagster's retry policy decides what's next.
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": volumes,
    }
    if settings.gpus:
        # GPU nodes are commonly tainted so that only pods which request GPUs land on them.
        spec["tolerations"] = [{"key": settings.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    if settings.node_selector:
        spec["nodeSelector"] = dict(settings.node_selector)
    if settings.service_account:
        spec["serviceAccountName"] = settings.service_account
    return spec


def training_pod_metadata(stage: str) -> dict[str, Any]:
    """Return the pod's ObjectMeta fields (labels), which PipesK8sClient merges with its own."""
    return {"labels": {"app.kubernetes.io/name": "kad-pipeline", "app.kubernetes.io/component": stage}}


def _volumes(settings: TrainingPodSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if settings.dataset_claim:
        volumes.append({"name": "dataset", "persistentVolumeClaim": {"claimName": settings.dataset_claim, "readOnly": True}})
        mounts.append({"name": "dataset", "mountPath": settings.dataset_mount, "readOnly": True})
    if settings.scratch_claim:
        volumes.append({"name": "scratch", "persistentVolumeClaim": {"claimName": settings.scratch_claim}})
    else:
        # NOTE: an emptyDir is private to the pod, so the Dagster step cannot read its outputs.
        # Set scratch_claim in production and keep this for single-pod trials.
        volumes.append({"name": "scratch", "emptyDir": {}})
    mounts.append({"name": "scratch", "mountPath": settings.scratch_mount})
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts
