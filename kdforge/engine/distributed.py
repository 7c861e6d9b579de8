"""Data-parallel training through torch.distributed, launched by torchrun (issue 19, first slice: the engine).

    torchrun --nproc_per_node=2 my_script.py      # a script calling kdforge.distill(...) with sharded loaders

Every process runs the same Trainer on its own shard of each global batch (BatchLoader(rank=, world_size=) with the
per-rank batch size, `batch_size // world_size`); `init_from_env` joins the process group torchrun describes in the
environment (gloo on CPU, nccl on CUDA). What the Trainer does differently when `current().world_size > 1`:
- at the start, every parameter and buffer of the method (student, teacher, the method's own modules) is broadcast
  from rank 0, so all ranks start from one state whatever their local initialisation did;
- after each backward and before clipping and the step, `average_gradients` replaces the gradients of that
  optimiser's parameters by their mean over ranks: with equal per-rank batches, exactly the gradient of the global
  batch's mean loss. It runs inside the Trainer's one optimiser step, which every method's optimisers go through
  (`Distiller.optimizer_step` too), so a game's generator, discriminator and student each average their own
  gradients in the order the method steps them;
- a non-finite loss on any rank stops every rank (the check is all-reduced), rather than leaving the others
  waiting in the next collective;
- `train.sync_batchnorm` (CUDA) turns every BatchNorm into a SyncBatchNorm; without it each rank normalises its own
  shard, so BatchNorm-coupled models (FitNet's regressor has one) drift from a single process's numbers;
- logged losses are averaged over ranks; only rank 0 writes metrics, checkpoints and samples; buffers (BatchNorm
  statistics) are broadcast from rank 0 at the end of each epoch, before evaluation and the checkpoint, so the
  saved model is the one every rank evaluates. Each rank evaluates the whole val loader (not sharded).

Why gradient averaging at the optimiser step instead of wrapping each module in DistributedDataParallel: kdforge's
methods call their networks directly and tap features by module name (a DDP wrapper renames every module to
"module.*"), and the min-max games run several backward passes per step through modules that another optimiser
owns (the generator's loss through the discriminator), which DDP's reducer, built around one forward and one
backward per iteration, does not support without find_unused_parameters and static-graph caveats. The cost is
that communication does not overlap the backward pass as DDP's bucketed hooks do: on GPUs, DDP wrapping of
single-network methods is the follow-up (results/ and README say what is measured).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> DistContext:
    """The process group this process belongs to (a world of one when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init_from_env(device: str | torch.device = "cpu") -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): gloo for CPU, nccl for
    CUDA (each process on cuda:LOCAL_RANK). Without WORLD_SIZE > 1 in the environment, a world of one."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return current()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of `module` set to rank `src`'s, in place."""
    with torch.no_grad():
        for tensor in module.state_dict(keep_vars=True).values():
            if isinstance(tensor, torch.Tensor):
                dist.broadcast(tensor.data, src)


def sync_batchnorm(module: nn.Module, device: torch.device) -> None:
    """Every BatchNorm inside `module` (not `module` itself) becomes a SyncBatchNorm, in place, keeping its
    parameters, buffers and state-dict keys: batch statistics over the global batch, as one process would see it.
    torch's SyncBatchNorm runs on CUDA only."""
    if torch.device(device).type != "cuda":
        raise ValueError("train.sync_batchnorm: torch's SyncBatchNorm runs on CUDA only; on CPU each rank normalises "
                         "its own shard of the batch (BatchNorm statistics then differ from one process's)")
    for name, child in module.named_children():
        setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    with torch.no_grad():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src)


def average_gradients(params: Iterable[nn.Parameter], world_size: int) -> None:
    """Replace each gradient by its mean over ranks, in one flat all-reduce per dtype. A parameter whose gradient is
    None on this rank but set on another counts as zero here (the mask of who has one is all-reduced first, so
    every rank reduces the same list); None on every rank stays None."""
    params = list(params)
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has)
    live = [p for p, n in zip(params, has.tolist()) if n > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in live:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        grads = [p.grad for p in group]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= world_size
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)


def all_finite(flag: bool, device: torch.device) -> bool:
    """True when `flag` is True on every rank."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def mean_over_ranks(values: dict[str, torch.Tensor], world_size: int) -> dict[str, torch.Tensor]:
    """Each scalar averaged over ranks (same keys on every rank), in one all-reduce."""
    if not values:
        return values
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32).reshape(()) for k in keys])
    dist.all_reduce(stacked)
    return dict(zip(keys, stacked / world_size))
