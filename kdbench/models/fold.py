"""Folding a frozen network's batch norms into the convolutions that feed them (a teacher-forward speed-up).

In eval mode a batch norm is the affine map ``y = γ·(x − μ)/√(σ² + ε) + β`` per channel. When ``x`` is the output
of a convolution ``W∗z + b`` and nothing else reads that output, the pair is one convolution with
``W' = W·s`` and ``b' = (b − μ)·s + β`` (``s = γ/√(σ² + ε)`` per output channel): the same function up to float
rounding, without one read and one write of the whole activation. The frozen teacher runs that way in every
training step (:func:`kdbench.perf.prepare_models`).

"Nothing else reads it" is checked, not assumed: one forward with the caller's taps is run with the convolution
weights requiring gradients, and a pair is folded only when the convolution and the norm each ran exactly once,
the norm's input *is* the convolution's output, that output is not itself among the forward's outputs (a tap)
and the autograd graph of the outputs has exactly one edge into it (the norm's). The norm module is then replaced
by ``nn.Identity`` at its place (by its dropout and activation for timm's norm-act layers, which apply them inside
the norm module; another subclass of a batch norm is not folded), so hooks and ``module:<path>`` taps on it still
see the same tensor. A
``module:<path>`` tap on a folded convolution (asked for later than the fold) gets its pre-norm output back as
``(y − t)/s`` (:func:`prefold_output`); a norm with a zero scale is never folded.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

FOLDED_ATTR = "_kdbench_folded_bn"  # set on a convolution that a norm was folded into


def _frozen_norm_types() -> tuple[type, ...]:
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return ()
    return (FrozenBatchNorm2d,)


_PLAIN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


def _after_fold(m: nn.Module) -> nn.Module | None:
    """What stands at a folded norm's place: ``nn.Identity`` for a plain batch norm; for timm's norm-act layers
    (``BatchNormAct2d``, ``SyncBatchNormAct``: batch norm, then ``drop``, then ``act`` in one module) the
    ``drop`` and ``act`` they still apply; None for any other subclass, whose forward may do more than the
    affine map (it is not folded)."""
    if isinstance(m, _frozen_norm_types()) or type(m).forward in _PLAIN_FORWARDS:
        return nn.Identity()
    if (type(m).__module__.startswith("timm.") and isinstance(getattr(m, "act", None), nn.Module)
            and isinstance(getattr(m, "drop", None), nn.Module)):
        return nn.Sequential(m.drop, m.act)
    return None


def _is_foldable_norm(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return (not m.training and m.track_running_stats and m.running_mean is not None
                and m.running_var is not None and _after_fold(m) is not None)
    return isinstance(m, _frozen_norm_types())


def _tensors(obj: Any, out: list[Tensor]) -> list[Tensor]:
    """Every tensor in a (nested) forward output: tensors, lists/tuples/dicts, dataclass-like objects."""
    if isinstance(obj, Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)
    elif hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
        for v in vars(obj).values():
            _tensors(v, out)
    return out


def _consumer_counts(roots: list[Tensor]) -> dict[Any, int]:
    """For every autograd node reachable from ``roots``: how many edges of the graph point into it."""
    counts: dict[Any, int] = {}
    seen: set = set()
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                counts[nxt] = counts.get(nxt, 0) + 1
                stack.append(nxt)
    return counts


def _norm_scale_shift(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """``(s, t)`` with ``norm(x) = s·x + t`` per channel, in float64 for the fold."""
    mean, var = norm.running_mean.double(), norm.running_var.double()
    eps = float(getattr(norm, "eps", 0.0))
    weight = norm.weight.double() if getattr(norm, "weight", None) is not None else torch.ones_like(mean)
    bias = norm.bias.double() if getattr(norm, "bias", None) is not None else torch.zeros_like(mean)
    s = weight / torch.sqrt(var + eps)
    return s, bias - mean * s


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, s: Tensor, t: Tensor) -> None:
    """``conv`` followed by the per-channel map ``y = s·x + t`` becomes one conv (weights scaled in place)."""
    w = conv.weight
    w.copy_((w.double() * s.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))  # in place: keeps the memory format
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(s)
    new_bias = (b * s + t).to(w.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=False)
    else:
        conv.bias.copy_(new_bias)
    setattr(conv, FOLDED_ATTR, (s.to(w.dtype), t.to(w.dtype)))


def fold_frozen_bn(net: nn.Module, forward: Callable[[], Any]) -> int:
    """Fold every eval-mode batch norm of ``net`` into the convolution that alone feeds it (module docstring);
    ``forward()`` runs ``net`` once on an example input with the taps it will be asked for and returns the
    outputs. ``net`` must be in eval mode. Returns the number of folded pairs (0 for a net without such pairs,
    or when called again)."""
    if net.training:
        raise ValueError("fold_frozen_bn: the network must be in eval mode (its norms use their running stats)")
    convs = {m: n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    norms = {m: n for n, m in net.named_modules() if _is_foldable_norm(m)}
    if not convs or not norms:
        return 0
    calls: dict[nn.Module, list] = {}

    def hook(mod, inp, out):
        calls.setdefault(mod, []).append((inp[0] if inp else None, out))

    handles = [m.register_forward_hook(hook) for m in list(convs) + list(norms)]
    flags = [(p, p.requires_grad) for p in net.parameters()]
    try:
        for m in convs:
            m.weight.requires_grad_(True)
        with torch.enable_grad():
            outputs = _tensors(forward(), [])
        counts = _consumer_counts(outputs)
        out_ids = {id(t) for t in outputs}
        pairs = []
        conv_by_out = {id(c[0][1]): m for m, c in calls.items() if m in convs and len(c) == 1}
        for norm, c in calls.items():
            if norm not in norms or len(c) != 1:
                continue
            x = c[0][0]
            conv = conv_by_out.get(id(x))
            if conv is None or id(x) in out_ids or x.grad_fn is None or counts.get(x.grad_fn, 0) != 1:
                continue
            if conv.out_channels != norm.running_mean.numel():
                continue
            scale, shift = _norm_scale_shift(norm)
            if not bool((scale == 0).any()):
                pairs.append((conv, norm, scale, shift))
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        calls.clear()
    for conv, norm, scale, shift in pairs:
        _fold_pair(conv, scale, shift)
        parent_path, _, attr = norms[norm].rpartition(".")
        net.get_submodule(parent_path)._modules[attr] = _after_fold(norm)
    return len(pairs)


def prefold_output(module: nn.Module, out: Any) -> Any:
    """A module's output as it was before a norm was folded into it: ``(out − t)/s`` per channel for a folded
    convolution (float rounding only), ``out`` itself for any other module."""
    folded = getattr(module, FOLDED_ATTR, None)
    if folded is None or not isinstance(out, Tensor):
        return out
    s, t = (v.to(device=out.device, dtype=out.dtype).view(1, -1, *([1] * (out.dim() - 2))) for v in folded)
    return (out - t) / s
