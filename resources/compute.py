"""The compute resource: where and how training runs (device, precision, workers, processes)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import dagster as dg
from pydantic import Field


def default_work_dir() -> str:
    """Return ``$KAD_WORK_DIR``, or ``kad-work`` in the system temporary folder."""
    return os.environ.get("KAD_WORK_DIR") or str(Path(tempfile.gettempdir()) / "kad-work")


class ComputeResource(dg.ConfigurableResource):
    """Device, precision and process layout of training. The defaults suit a laptop CPU."""

    device: str = Field(default="auto", description="'auto' (CUDA when present, else CPU), 'cpu' or 'cuda'.")
    precision: str = Field(
        default="auto", description="'auto' (bf16 autocast on CUDA, fp32 on CPU), 'fp32' or 'bf16'."
    )
    num_workers: int = Field(default=0, description="DataLoader worker processes per training process; also image-decoding processes.")
    num_threads: int | None = Field(default=None, description="torch intra-op threads per training process; unset keeps the torch default.")
    nproc_per_node: int = Field(default=1, description="Training processes per machine; more than 1 starts torchrun (DDP).")
    nnodes: int = Field(default=1, description="Machines in a multi-node torchrun job.")
    rdzv_endpoint: str | None = Field(default=None, description="host:port of the torchrun rendezvous for multi-node jobs.")
    work_dir: str = Field(
        default_factory=default_work_dir,
        description="Local scratch folder for image caches, training bundles and in-progress checkpoints.",
    )

    def launch_command(self, module: str, module_args: list[str]) -> list[str]:
        """Return the command that runs ``python -m module``, under torchrun when more than one process is set."""
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ValueError(f"nproc_per_node and nnodes must be at least 1, got {self.nproc_per_node} and {self.nnodes}")
        if self.nproc_per_node == 1 and self.nnodes == 1:
            return [sys.executable, "-m", module, *module_args]
        from kad_pipeline.training.distributed import torchrun_command

        return torchrun_command(module, module_args, self.nproc_per_node, self.nnodes, self.rdzv_endpoint)
