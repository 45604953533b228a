"""A frozen teacher's forward on the CPU as an optimized inference graph (a teacher-forward speed-up).

PyTorch's TorchScript can trace a network's forward, freeze its weights into constants and convert the frozen
graph for inference (``torch.jit.freeze`` + ``torch.jit.optimize_for_inference``). On a CPU that conversion runs
the convolutions on oneDNN's blocked tensor layout with weights reordered once, instead of once per call, and the
additions and ReLUs in place: resnet32x4's forward at batch 64 takes ~0.94× the time of the eager
``channels_last`` forward on two cores. It computes the same function with the same weights; only the order of
float summation inside the convolutions differs (float rounding).

:func:`install` puts a :class:`FrozenForward` in place of a frozen teacher's ``forward`` (``prepare_models`` does
so on a CPU). It is used only where it cannot change what the eager forward would do, and otherwise hands the
call to the eager forward:

* gradients off (a teacher forward runs under ``no_grad``), no autocast, a single 4-D float32 CPU tensor input;
* the weights and buffers unchanged since the graph was made (their version counters: a ``load_state_dict`` or any
  in-place edit after :func:`install` falls back), the same hooks (an ``edit_tap`` of a prompt stage falls back);
* per tap set and input memory format a graph is traced once (each holds its own copy of the weights, in
  oneDNN's layout: a training run makes one or two); on the first batch of every input shape its outputs are
  checked against the eager forward's (same structure, ``allclose`` within float tolerance). A trace that fails, or a shape where the graph does not match, keeps
  the eager forward, always. Whether a call runs the graph thus depends on the call alone (its taps, layout and
  shape), never on what ran before in the process, so a resumed run computes what an uninterrupted one does.

A trace records the Python control flow of the batch it ran on. Control flow on shapes (a VGG that pools once
more on large inputs, timm's size asserts) is covered by the check per shape; a forward that branches on tensor
*values* would not be, and no classifier or segmenter kdbench builds does (``KDBENCH_TEACHER_GRAPH=eager`` is the
way out for one that would). A call with keyword arguments (a detector's ``targets=``, ``detect=``) always runs
eagerly.

``KDBENCH_TEACHER_GRAPH=eager`` turns it off (the environment variable is read when a teacher is prepared).
"""

from __future__ import annotations

import os
import warnings
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from kdbench.outputs import Outputs

ENV = "KDBENCH_TEACHER_GRAPH"
_FAILED = object()  # a tap set whose graph could not be made


def mode() -> str:
    """``KDBENCH_TEACHER_GRAPH``: ``"frozen"`` (default: :func:`install` is on) or ``"eager"``."""
    value = os.environ.get(ENV, "frozen").strip().lower()
    if value not in ("frozen", "eager"):
        raise ValueError(f"{ENV}={value!r}: valid values are 'frozen' (default) and 'eager'")
    return value


def _hook_count(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


def _global_hooks() -> int:
    from torch.nn.modules import module as mod

    return len(mod._global_forward_hooks) + len(mod._global_forward_pre_hooks)


def _flatten(out: Any) -> tuple[tuple, list[Tensor]] | None:
    """An ``Outputs`` as (structure, tensors); None when it holds anything else than tensors."""
    if not isinstance(out, Outputs) or out.extras:
        return None
    tensors: list[Tensor] = []
    spec = []
    if out.logits is not None:
        if not isinstance(out.logits, Tensor):
            return None
        tensors.append(out.logits)
    for key, value in out.feats.items():
        if not isinstance(value, list) or not all(isinstance(t, Tensor) for t in value):
            return None
        spec.append((key, len(value)))
        tensors.extend(value)
    return (out.logits is not None, tuple(spec)), tensors


def _unflatten(structure: tuple, tensors: list[Tensor]) -> Outputs:
    has_logits, spec = structure
    it = iter(tensors)
    logits = next(it) if has_logits else None
    return Outputs(logits=logits, feats={key: [next(it) for _ in range(n)] for key, n in spec})


class _Flat(nn.Module):
    """The eager forward with its outputs as a flat tuple in the eager outputs' memory formats (for tracing)."""

    def __init__(self, net: nn.Module, forward, taps: tuple, formats: list):
        super().__init__()
        self.net = net
        self._forward = forward
        self._taps = taps
        self._formats = formats

    def forward(self, x: Tensor):
        tensors = _flatten(self._forward(x, self._taps))[1]
        return tuple(t if f is None else t.contiguous(memory_format=f) for t, f in zip(tensors, self._formats))


def _as_list(out: Any) -> list[Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _memory_format(t: Tensor):
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return None


def _close(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4 * max(scale, 1e-3)))


class FrozenForward:
    """Stands in for ``net.forward`` (see the module's docstring); ``eager`` is the network's own forward."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.eager = net.forward
        self.graphs: dict[tuple, Any] = {}  # (taps, channels_last input) -> (structure, graph) or _FAILED
        self.checked: dict[tuple, bool] = {}  # (graph key, input shape) -> the graph matched the eager forward
        self._state = self._current_state()

    def _current_state(self) -> tuple:
        return (tuple((t.data_ptr(), t._version) for t in chain(self.net.parameters(), self.net.buffers())),
                _hook_count(self.net), _global_hooks())

    def _eligible(self, x: Any, args: tuple, kwargs: dict) -> bool:
        return (not kwargs and len(args) <= 1 and isinstance(x, Tensor) and x.device.type == "cpu"
                and x.dtype == torch.float32 and x.dim() == 4 and not x.requires_grad
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and not self.net.training and self._current_state() == self._state)

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._eligible(x, args, kwargs):
            return self.eager(x, *args, **kwargs)
        taps = tuple(args[0]) if args else ()
        key = (taps, x.is_contiguous(memory_format=torch.channels_last))
        flat = None
        if key not in self.graphs:
            self.graphs[key], flat = self._make(x, taps)
        graph = self.graphs[key]
        if graph is _FAILED:
            return self.eager(x, *args, **kwargs)
        structure, fn = graph
        shape = (key, tuple(x.shape))
        ok = self.checked.get(shape)
        if ok is False:
            return self.eager(x, *args, **kwargs)
        if ok is None:  # first batch of this shape: the graph's outputs against the eager forward's
            try:
                got = _as_list(fn(x))
            except Exception:  # noqa: BLE001 - e.g. a oneDNN op that does not take this shape: eager for it
                got = None
            flat = _flatten(self.eager(x, *args, **kwargs)) if flat is None else flat
            ok = self.checked[shape] = (got is not None and flat is not None and flat[0] == structure
                                        and len(got) == len(flat[1])
                                        and all(_close(g, t) for g, t in zip(got, flat[1])))
            if not ok:
                return self.eager(x, *args, **kwargs)
        else:
            got = _as_list(fn(x))
        return _unflatten(structure, got)

    def _make(self, x: Tensor, taps: tuple) -> tuple[Any, Any]:
        """The graph of the forward with ``taps`` traced on ``x`` (``(structure, graph)`` or ``_FAILED``) and the
        eager forward's flattened outputs on ``x``."""
        flat = _flatten(self.eager(x, taps))
        if flat is None:
            return _FAILED, None
        structure, tensors = flat
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wrapper = _Flat(self.net, self.eager, taps, [_memory_format(t) for t in tensors]).eval()
                traced = torch.jit.trace(wrapper, x, check_trace=False)
                fn = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        except Exception:  # noqa: BLE001 - any network the tracer cannot take keeps its eager forward
            return _FAILED, flat
        return (structure, fn), flat


def install(net: nn.Module) -> bool:
    """Put a :class:`FrozenForward` in place of ``net.forward`` (once); True when it is there. ``net`` must be
    frozen and in eval mode already."""
    if isinstance(getattr(net, "forward", None), FrozenForward):
        return True
    if mode() != "frozen" or not hasattr(torch.jit, "optimize_for_inference"):
        return False
    net.forward = FrozenForward(net)
    return True


def uninstall(net: nn.Module) -> None:
    """Give ``net`` its eager forward back."""
    fwd = net.__dict__.get("forward")
    if isinstance(fwd, FrozenForward):
        del net.forward
