"""Data-parallel training through torch.distributed, launched by torchrun (or `kdforge distill --nproc N`).

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
  saved model is the one every rank evaluates;
- the random number generators start from rank 0's state, and noise a method draws per sample (generator codes,
  CRD's negatives, Langevin starts, a flow's prior samples) comes from `randn`/`randint` here: every rank draws the
  global batch's noise and keeps its own block, as it keeps its own block of the data, so the ranks' samples are
  distinct and together are the ones one process would draw (with one shared RNG and plain torch.randn, every rank
  would draw the same codes and a data-free method would train on each synthetic image world_size times);
- methods pass what a loss relates across samples (RKD's distances, PKT's and MFD's kernels, a batch-mean class
  balance) through `gather_batch`, a differentiable all-gather, so such terms see the global batch (how the
  gradients then come out right: `_GatherRows`);
- evaluation is sharded: every rank walks the same val loader, runs the model on its block of each batch
  (`gathered`), and the outputs are gathered so the evaluator scores the whole set exactly as one process would
  (the model's forward is split; the metric's own arithmetic is not).

Why gradient averaging at the optimiser step instead of wrapping each module in DistributedDataParallel: kdforge's
methods call their networks directly and tap features by module name (a DDP wrapper renames every module to
"module.*"), and the min-max games run several backward passes per step through modules that another optimiser
owns (the generator's loss through the discriminator), which DDP's reducer, built around one forward and one
backward per iteration, does not support without find_unused_parameters and static-graph caveats. The cost is
that communication does not overlap the backward pass as DDP's bucketed hooks do (unmeasured on GPUs so far;
results/scaleout_cpu.md has the CPU numbers).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

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


def block(n: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s rows of n (torch.tensor_split's blocks: sizes differ by at most one, rank 0 first)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _own_block(full: torch.Tensor, n: int) -> torch.Tensor:
    ctx = current()
    return full[block(n * ctx.world_size, ctx.rank, ctx.world_size)] if ctx.enabled else full


def randn(n: int, *shape: int, device=None, dtype=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, *shape) standard normal noise for this rank's n samples: every rank draws the global batch's
    (n * world_size rows, from RNG states kept equal across ranks) and keeps its own block."""
    ctx = current()
    return _own_block(torch.randn(n * ctx.world_size, *shape, device=device, dtype=dtype, generator=generator), n)


def rand(n: int, *shape: int, device=None, dtype=None) -> torch.Tensor:
    """(n, *shape) noise uniform in [0, 1) for this rank's n samples, drawn as `randn` draws."""
    ctx = current()
    return _own_block(torch.rand(n * ctx.world_size, *shape, device=device, dtype=dtype), n)


def randint(high: int, n: int, *shape: int, device=None) -> torch.Tensor:
    """(n, *shape) integers uniform in [0, high) for this rank's n samples, drawn as `randn` draws."""
    ctx = current()
    return _own_block(torch.randint(0, high, (n * ctx.world_size, *shape), device=device), n)


def broadcast_rng(device: torch.device, src: int = 0) -> None:
    """torch's CPU (and this process's CUDA) random state set to rank `src`'s, so ranks draw in step."""
    states = [(torch.get_rng_state, torch.set_rng_state)]
    if torch.device(device).type == "cuda":
        states.append((torch.cuda.get_rng_state, torch.cuda.set_rng_state))
    comm = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    for get, put in states:
        state = get().to(comm)
        dist.broadcast(state, src)
        put(state.cpu())


def all_gather_rows(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The ranks' tensors concatenated along dim 0, in rank order; rank r's has sizes[r] rows (padded to the
    largest for the collective, then trimmed)."""
    ctx = current()
    pad = max(sizes)
    mine = t if t.shape[0] == pad else torch.cat([t, t.new_zeros(pad - t.shape[0], *t.shape[1:])])
    parts = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(parts, mine.contiguous())
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """all_gather_rows with a backward: each rank's rows get the sum over ranks of the gradients flowing into them
    (every rank's loss may use every rank's rows), so `average_gradients` then yields the gradient of the mean of
    the ranks' losses, which is one process's loss on the global batch when each rank computes the same global term
    (e.g. a relation over the whole batch) beside its own per-sample means."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes = sizes
        return all_gather_rows(t, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        mine = block_of_sizes(ctx.sizes, dist.get_rank())
        return grad[mine], None


def block_of_sizes(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def gather_batch(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor (one row per sample of this rank's batch) concatenated over ranks in rank order: the global
    batch's rows, on every rank, differentiable (see _GatherRows). For losses that relate the samples of a batch
    to each other (RKD's distances, PKT's and MFD's kernels, a batch-mean class balance), so they see the global
    batch as one process would. Ranks may hold different numbers of rows. A world of one returns them as given."""
    ctx = current()
    if not ctx.enabled:
        return tensors
    n = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    counts = [torch.zeros_like(n) for _ in range(ctx.world_size)]
    dist.all_gather(counts, n)
    sizes = [int(c) for c in counts]
    return tuple(_GatherRows.apply(t, sizes) if t.requires_grad else all_gather_rows(t, sizes) for t in tensors)


def rows_of(batch: dict) -> int:
    """How many samples a batch holds: its images', else its first tensor's leading size."""
    if isinstance(batch.get("image"), torch.Tensor):
        return int(batch["image"].shape[0])
    return next(int(v.shape[0]) for v in batch.values() if isinstance(v, torch.Tensor) and v.dim())


def gathered(fn: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """`fn(batch)` computed on this rank's block of the batch and gathered: every rank returns what `fn` returns
    for the whole batch. Outputs must be tensors or dicts of tensors with one row per sample. Batches with fewer
    rows than ranks run whole on every rank. Every rank must call it on the same batches in the same order."""
    def run(batch: dict):
        ctx = current()
        n = rows_of(batch)
        if not ctx.enabled or n < ctx.world_size:
            return fn(batch)
        sizes = [block(n, r, ctx.world_size).stop - block(n, r, ctx.world_size).start for r in range(ctx.world_size)]
        mine = block(n, ctx.rank, ctx.world_size)
        out = fn({k: v[mine] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
                  for k, v in batch.items()})
        if isinstance(out, torch.Tensor):
            return all_gather_rows(out, sizes)
        if isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values()):
            return {k: all_gather_rows(out[k], sizes) for k in out}  # same keys, same order on every rank
        raise TypeError(f"sharded evaluation gathers tensors or dicts of tensors, one row per sample; predict "
                        f"returned {type(out).__name__}")
    return run


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
