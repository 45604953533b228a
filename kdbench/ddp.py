"""torch.distributed helpers: one run trained by several tasks (DDP), one task per GPU (or CPU process).

A run is distributed when its job has more than one task: ``resources: {gpus_per_node: N}`` on SLURM makes
submitit start N tasks (``tasks_per_node`` defaults to the GPU count, see ``kdbench.slurm.slurm_parameters``);
``tasks_per_node: 2`` without GPUs runs 2 CPU processes. Rank, local rank and world size come from submitit's
job environment (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS); the rendezvous is submitit's
``TorchDistributedEnvironment`` (first host of the job, a port derived from the job id). Backend: NCCL on
CUDA, gloo on CPU. Outside a submitit job (the ``debug`` executor) everything here is a no-op with world 1.

Decisions (DESIGN.md §6 leaves them open):

* **The recipe's ``batch_size`` is the global batch.** The global batches are those one process would
  draw (the loop reseeds the generator from ``(seed, epoch)``); each task trains on its slice of each
  (``shard_indices``). A task whose ``loader`` uses another sampler would need its own sharding.
* **Batch norm is synchronised** across tasks (``sync_batchnorm``): ``torch.nn.SyncBatchNorm`` on CUDA;
  on CPU, where torch's SyncBatchNorm refuses to run, :class:`CpuSyncBatchNorm` (two differentiable
  all-reduces per layer: mean, then variance). With this and the next point a distributed run computes the
  same function as one process up to floating-point summation order, so its numbers do not depend on the
  number of GPUs beyond that noise (which training amplifies like any other 1e-7 perturbation). Methods
  whose loss couples the samples of a batch other than through BN see their task's slice; random data
  augmentation draws from each task's own generator (seeded identically), not the single process's.
* **Gradients are averaged by one flat all-reduce after backward** (``average_gradients``) rather than by
  wrapping the student in ``DistributedDataParallel``: methods legitimately use student parameters outside
  the student's forward (the classifier weights for CAMs), which DDP's reducer cannot track, and learnable
  method modules are averaged the same way. Each task scales its loss by ``n_task * world / n_global``
  before backward (``loss_scale``) so slices of unequal size (a global batch not divisible by ``world``)
  are weighted exactly. The cost: communication does not overlap with backward.
* **Only rank 0 writes** (record, checkpoint, log, model); every rank reads the checkpoint to resume.
  Evaluation runs on rank 0 and its metrics are broadcast, so all ranks take the same "best" decisions.
* A non-finite loss on any rank stops every rank (``all_finite``), so a diverged run ends on all ranks
  together instead of leaving the others blocked in a collective.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

#: Timeout of collectives. Rank 0 evaluates while the others wait in a broadcast, so this bounds an eval.
COLLECTIVE_TIMEOUT = _dt.timedelta(hours=3)


@dataclass(frozen=True)
class Dist:
    """Where this process sits in its run: rank, world size, local rank (GPU index on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
        return torch.device("cpu")


SINGLE = Dist()


def job_topology() -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` from submitit's job environment; ``(0, 1, 0)`` outside a submitit job."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return 0, 1, 0
    try:
        import submitit

        env = submitit.JobEnvironment()
        return int(env.global_rank), int(env.num_tasks), int(env.local_rank)
    except Exception:  # not in a job after all
        return 0, 1, 0


@contextlib.contextmanager
def initialized() -> Iterator[Dist]:
    """Initialise the default process group when the job has several tasks; yield this process's ``Dist``."""
    rank, world, local_rank = job_topology()
    if world <= 1:
        yield SINGLE
        return
    import torch.distributed as dist
    from submitit.helpers import TorchDistributedEnvironment

    if dist.is_initialized():  # someone else owns the group (e.g. a caller that set it up itself)
        yield Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                   backend=dist.get_backend())
        return
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        yield Dist(rank=rank, world=world, local_rank=local_rank, backend=backend)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- data
def shard_indices(n_train: int, batch_size: int, steps: int, generator: torch.Generator, d: Dist
                  ) -> tuple[list[int], int, int]:
    """This rank's sample indices for one epoch and its per-step batch size.

    The global batches are those a shuffling ``DataLoader`` over the training set would draw with the
    same generator (read off a DataLoader over ``range(n_train)``, so the draw is DataLoader's own, not a
    copy of it); rank ``r`` gets part ``r`` of ``torch.tensor_split(batch, world)`` of each of the first
    ``steps`` batches. Returns ``(indices, local_batch, global_batch)``.
    """
    from torch.utils.data import DataLoader

    b = min(int(batch_size), n_train)
    if b < d.world:
        raise ValueError(f"a global batch of {b} sample(s) cannot be split over {d.world} tasks: "
                         f"recipe.batch_size and the training set must hold at least one sample per task")
    order = DataLoader(range(n_train), batch_size=int(batch_size), shuffle=True, drop_last=n_train >= batch_size,
                       generator=generator)
    parts = []
    for k, batch in enumerate(order):
        if k >= steps:
            break
        parts.append(torch.tensor_split(batch, d.world)[d.rank])
    local = len(parts[0]) if parts else 0
    return torch.cat(parts).tolist() if parts else [], local, b


def loss_scale(local: int, global_: int, d: Dist) -> float:
    """Factor on this rank's (mean-reduced) loss so that averaging gradients over ranks gives the gradient
    of the mean loss over the global batch, whatever the shard sizes."""
    return local * d.world / global_ if d.enabled else 1.0


# ------------------------------------------------------------------------------------------- modules
class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: forward and backward are both an all-reduce (sum)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        import torch.distributed as dist

        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are computed over every rank's batch, for any backend (gloo
    on CPU included). Same parameters, buffers and state-dict keys as the BatchNorm it replaces.

    Mean and (biased) variance are computed in two passes, each one differentiable all-reduce of per-rank
    sums, so gradients flow to every rank's inputs as in a single process holding the whole batch. The
    running statistics are updated like ``nn.BatchNorm*d`` (unbiased variance, ``momentum=None`` =
    cumulative average). Evaluation uses the running statistics and needs no communication.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        import torch.distributed as dist

        self._check_input_dim(x)
        batch_stats = self.training or not self.track_running_stats
        if not batch_stats or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(x)  # nn.BatchNorm*d's own computation
        all_reduce = _AllReduceSum.apply
        dims = [0] + list(range(2, x.dim()))
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        n_local = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        packed = all_reduce(torch.cat([x.sum(dims), n_local]))
        n = packed[-1]
        mean = packed[:-1] / n
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                count = float(n)
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(var.detach() * (count / max(1.0, count - 1)), alpha=f)
        return out


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        out = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias  # the same Parameter objects
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        new = _convert_cpu(child)
        if new is not child:
            setattr(out, name, new)
    return out


def sync_batchnorm(module: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """Replace every BatchNorm of ``module`` (in place; the module itself is returned) by its synchronised
    version when the run is distributed: torch's SyncBatchNorm on CUDA, :class:`CpuSyncBatchNorm` else."""
    if not d.enabled:
        return module
    if device.type == "cuda":
        for name, child in list(module.named_children()):
            setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        return module
    for name, child in list(module.named_children()):
        new = _convert_cpu(child)
        if new is not child:
            setattr(module, name, new)
    return module


# ------------------------------------------------------------------------------------------- collectives
def broadcast_module(module: nn.Module, d: Dist) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical starting points whatever the RNG)."""
    if not d.enabled:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(params: Iterable[nn.Parameter], d: Dist) -> None:
    """Average ``.grad`` over ranks: one flat all-reduce per (device, dtype). A parameter without a gradient
    on every rank is left without one (the same code runs on every rank, so the set is the same)."""
    if not d.enabled:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    groups: dict[tuple, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in groups.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(d.world)
        for g, new in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(new)


def all_finite(value: Tensor, d: Dist) -> bool:
    """Whether ``value`` is finite on every rank."""
    ok = bool(torch.isfinite(value).all())
    if not d.enabled:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([1.0 if ok else 0.0], device=value.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def sum_over_ranks(values: dict[str, float], d: Dist, device: torch.device) -> dict[str, float]:
    """Element-wise sum of a ``{name: float}`` mapping over ranks (the same keys on every rank)."""
    if not d.enabled or not values:
        return dict(values)
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=device if d.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not d.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if d.is_main else None]
    dist.broadcast_object_list(box, src=0, device=torch.device("cuda", torch.cuda.current_device())
                               if d.backend == "nccl" else None)
    return box[0]
