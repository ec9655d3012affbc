"""torch.distributed helpers for stage-2 training: process-group setup under torchrun, and gathers.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Without them the
process runs alone and no process group is created. CUDA devices use NCCL, CPUs use gloo.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass
class DistributedContext:
    """Rank, world size and the device this process trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """Map "auto", "cpu" or "cuda" to a device; "cuda" without a GPU raises."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"invalid device {preference!r}; expected 'auto', 'cpu' or 'cuda'")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device("cuda", local_rank)


def init_distributed(device_preference: str = "auto") -> DistributedContext:
    """Join the torchrun process group when WORLD_SIZE > 1, else return a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        logger.info("joined process group: rank %d of %d, backend %s, device %s", rank, world_size, backend, device)
    return DistributedContext(rank, world_size, local_rank, device)


def cleanup_distributed(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def all_gather_with_grad(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0; gradients flow back to each rank's part."""
    if not context.enabled:
        return tensor
    import torch.distributed.nn.functional as dist_functional

    return torch.cat(dist_functional.all_gather(tensor), dim=0)


def all_gather_no_grad(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, without gradients."""
    if not context.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(context.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def mean_across_ranks(values: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Average a detached tensor over ranks (for logging the global loss)."""
    if not context.enabled:
        return values
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / context.world_size


def torchrun_command(
    module: str, module_args: list[str], nproc_per_node: int, nnodes: int = 1, rdzv_endpoint: str | None = None
) -> list[str]:
    """Build the command that starts ``python -m module`` under torchrun.

    One node uses ``--standalone`` (a rendezvous on this machine only). Several nodes need
    ``rdzv_endpoint`` (host:port of the rendezvous), which the cluster setup provides.
    """
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes == 1:
        command.append("--standalone")
    else:
        if not rdzv_endpoint:
            raise ValueError("a multi-node run needs rdzv_endpoint (host:port of the rendezvous)")
        command += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    return command + ["-m", module, *module_args]
