"""TapModel: a classifier plus the means to return any requested feature tap in the same forward."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from kdbench.outputs import Outputs

SEMANTIC_TAPS = ("stages", "stages_preact", "stages_raw", "final", "pooled", "cam", "logits")


@contextlib.contextmanager
def edit_tap(model: nn.Module, tap: str, fn: Callable[[int, Tensor], Tensor]) -> Iterator[None]:
    """Within the context, every forward of ``model`` replaces the i-th tensor of ``tap`` by ``fn(i, tensor)``
    before the network goes on with it (stage-1 prompt tuning edits a teacher feature this way).

    ``model`` exposes ``tap_modules(tap)`` (the modules whose outputs are the tap's tensors). ``fn`` sees and
    returns the ``N×C×H×W`` form; a TapModel converts from and to its network's own layout (tokens,
    channels-last) through ``_to_nchw``/``_from_nchw``.
    """
    to_nchw = getattr(model, "_to_nchw", lambda out: out)
    from_nchw = getattr(model, "_from_nchw", lambda x, like: x)
    handles = []
    for i, mod in enumerate(model.tap_modules(tap)):
        def hook(_m, _inp, out, _i=i):
            return from_nchw(fn(_i, to_nchw(out)), out)

        handles.append(mod.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _get_module(net: nn.Module, path: str) -> nn.Module:
    try:
        return net.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in net.named_modules() if n][:40]
        raise ValueError(f"no submodule {path!r}; some valid paths: {', '.join(names)}") from None


MODULE_PREFIX = "module:"


@contextlib.contextmanager
def record_outputs(module: nn.Module, transform: Callable[[nn.Module, Any], Any] | None = None) -> Iterator[list]:
    """Within the context, the output of every forward of ``module`` (``transform(module, output)`` when given,
    applied at once, before later in-place ops can touch the output) is appended to the yielded list."""
    outs: list = []
    handle = module.register_forward_hook(
        lambda m, _inp, out: outs.append(out if transform is None else transform(m, out)))
    try:
        yield outs
    finally:
        handle.remove()


def tensor_list(out: Any) -> list[Tensor]:
    """A module output as a tap's list of tensors: a tensor ``[t]``, a list/tuple as a list, a dict (e.g. an FPN's
    ``OrderedDict``) its values in order."""
    if isinstance(out, dict):
        out = list(out.values())
    return list(out) if isinstance(out, (list, tuple)) else [out]


@contextlib.contextmanager
def capture_module_taps(net: nn.Module, taps: Iterable[str]) -> Iterator[dict[str, list[Tensor]]]:
    """The ``module:<path>`` taps among ``taps``, captured with forward hooks on ``net``'s submodules (an unknown
    path is an error naming valid ones). The yielded dict is filled when the context exits without error:
    tap -> :func:`tensor_list` of the submodule's (last) output in the context; a submodule that did not run
    is left out. Every TapModel's ``forward`` captures its ``module:`` taps this way."""
    from kdbench.models.fold import prefold_output

    captured: dict[str, list[Tensor]] = {}
    modules = {tap: _get_module(net, tap[len(MODULE_PREFIX):]) for tap in sorted(set(taps))
               if tap.startswith(MODULE_PREFIX)}
    with contextlib.ExitStack() as stack:
        recorded = {tap: stack.enter_context(record_outputs(mod, prefold_output)) for tap, mod in modules.items()}
        yield captured
    captured.update({tap: tensor_list(outs[-1]) for tap, outs in recorded.items() if outs})


@contextlib.contextmanager
def capture_preact(acts: Sequence[nn.Module]) -> Iterator[list[Tensor | None]]:
    """Within the context, slot ``i`` of the yielded list holds a copy of the input of the latest call of
    ``acts[i]`` (an activation module: its pre-activation), taken by a forward pre-hook (None until it runs).

    The copy (``clone``) is taken before the module runs, so an in-place activation (torchvision's and timm's
    ``ReLU(inplace=True)``) cannot overwrite it; it is part of the autograd graph (gradients reach the network
    through it) and the forward computes what it computes without the hooks. The hooks exist only within the
    context: a forward that does not ask for ``stages_preact`` runs none."""
    slots: list[Tensor | None] = [None] * len(acts)

    def make_hook(i: int):
        def pre_hook(_m, inp):
            slots[i] = inp[0].clone()

        return pre_hook

    handles = [act.register_forward_pre_hook(make_hook(i)) for i, act in enumerate(acts)]
    try:
        yield slots
    finally:
        for h in handles:
            h.remove()


def _preact_list(model: "TapModel", slots: list[Tensor | None]) -> list[Tensor]:
    missing = [i for i, t in enumerate(slots) if t is None]
    if missing:
        raise RuntimeError(f"model {model.name!r}: the last activation of stage(s) {missing} did not run")
    return list(slots)  # type: ignore[arg-type]


class TapModel(nn.Module):
    """Wraps a network. ``forward(x, taps)`` -> ``Outputs`` with ``logits`` and ``feats[tap]`` (lists of tensors).

    Subclasses implement ``_semantic(x, wanted) -> (logits, {tap: [tensors]})`` for the semantic taps they
    support; ``module:<path>`` taps are captured with forward hooks on any network. ``tap_notes`` (tap -> reason)
    says why a model lacks a semantic tap its kind of model can have (a timm model without pre-ReLU stage taps).
    """

    supported: tuple[str, ...] = ("logits",)
    #: taps whose teacher-side value depends on the student's forward in the same step (a two-stage detector's
    #: ``reg`` on the student's RoIs): a cohort (``kdbench.train.fit_cohort``) takes them in each member's step,
    #: after its student's forward, instead of once for all
    student_dependent_taps: frozenset[str] = frozenset()

    def __init__(self, net: nn.Module, name: str):
        super().__init__()
        self.net = net
        self.name = name
        self.tap_notes: dict[str, str] = {}

    @property
    def classifier(self) -> nn.Linear | None:
        return None

    def _semantic(self, x: Tensor, wanted: set[str]) -> tuple[Tensor, dict[str, list[Tensor]]]:
        return self.net(x), {}

    def check_taps(self, taps: Sequence[str]) -> None:
        for tap in taps:
            if tap.startswith("module:"):
                _get_module(self.net, tap[len("module:"):])
            elif tap not in self.supported:
                raise self._missing_tap(tap)

    def _missing_tap(self, tap: str) -> ValueError:
        note = getattr(self, "tap_notes", {}).get(tap)
        return ValueError(f"model {self.name!r} does not provide tap {tap!r}{f' ({note})' if note else ''}; it "
                          f"provides {', '.join(self.supported)} and module:<path>")

    def forward(self, x: Tensor, taps: Sequence[str] = ()) -> Outputs:
        wanted = set(taps)
        with capture_module_taps(self.net, wanted) as captured:
            logits, feats = self._semantic(x, {t for t in wanted if not t.startswith(MODULE_PREFIX)})
        feats.update(captured)
        if "logits" in wanted:
            feats["logits"] = [logits]
        if "cam" in wanted and "cam" not in feats:
            feats["cam"] = [self.cam(feats["final"][0])]
        return Outputs(logits=logits, feats=feats)

    def cam(self, final: Tensor) -> Tensor:
        """Class activation maps: the classifier weights (bias dropped) as a 1×1 conv over the final map."""
        fc = self.classifier
        if fc is None:
            raise ValueError(f"model {self.name!r} has no linear classifier to build class activation maps from")
        return torch.einsum("nchw,kc->nkhw", final, fc.weight)

    def tap_modules(self, tap: str) -> list[nn.Module]:
        """Modules whose outputs are exactly the tensors of ``tap`` (for stages that edit a feature in place)."""
        if tap.startswith("module:"):
            return [_get_module(self.net, tap[len("module:"):])]
        raise ValueError(f"model {self.name!r} cannot edit tap {tap!r} in its forward")

    def edit_tap(self, tap: str, fn: Callable[[int, Tensor], Tensor]):
        """See :func:`edit_tap`."""
        return edit_tap(self, tap, fn)

    def _to_nchw(self, out: Tensor) -> Tensor:
        return out

    def _from_nchw(self, x: Tensor, like: Tensor) -> Tensor:
        return x

    def wanted_semantic(self, wanted: set[str]) -> set[str]:
        """Semantic taps needed to serve ``wanted`` (a CAM needs the final map)."""
        return wanted | ({"final"} if "cam" in wanted else set())


class KdbenchCifar(TapModel):
    """kdbench's CIFAR-style nets: ``net.forward_taps(x)`` returns every semantic tap in one pass."""

    supported = ("logits", "stages", "stages_preact", "stages_raw", "final", "pooled", "cam")

    @property
    def classifier(self):
        return self.net.fc

    def _semantic(self, x, wanted):
        if not (wanted - {"logits"}):
            return self.net(x), {}
        out = self.net.forward_taps(x)
        feats = {}
        for k in self.wanted_semantic(wanted) - {"logits", "cam"}:
            v = out[k]
            feats[k] = list(v) if isinstance(v, (list, tuple)) else [v]
        return out["logits"], feats

    def tap_modules(self, tap):
        stage_mods = getattr(self.net, "stage_modules", None)
        if tap in ("stages", "final") and callable(stage_mods):
            mods = list(stage_mods())
            return mods if tap == "stages" else mods[-1:]
        return super().tap_modules(tap)


def stage_indices(n_feats: int, n_stages: int = 4) -> list[int]:
    """Indices of ``n_stages`` evenly spaced intermediates ending at the last (ResNet: drop the stem;
    12-block ViT/MLP: blocks 3, 6, 9, 12; 4-stage Swin/ConvNeXt: all four)."""
    if n_feats <= n_stages:
        return list(range(n_feats))
    step = n_feats // n_stages
    return [n_feats - 1 - (n_stages - 1 - k) * step for k in range(n_stages)]


def _with_preact(taps: tuple[str, ...]) -> tuple[str, ...]:
    """``taps`` with ``stages_preact`` after ``stages``."""
    i = taps.index("stages") + 1
    return taps[:i] + ("stages_preact",) + taps[i:]


TIMM_PREACT_NOTE = ("only timm's MobileNet-V1 (mobilenetv1_*) built with kwargs {act_layer: relu} has pre-ReLU "
                    "stage taps among timm models")


def _timm_preact_acts(model: "TimmModel") -> tuple[list[nn.Module] | None, str]:
    """The activation modules whose inputs are ``model``'s pre-ReLU stage outputs, or ``(None, reason)``.

    Exact only for timm ``EfficientNet``-class nets whose every tapped stage is a ``Sequential`` ending in a
    ``DepthwiseSeparableConv`` without skip whose ``bn2`` is a ``BatchNormAct2d`` with a ``nn.ReLU``: the block's
    output is then ``bn2.act(bn2's normalised map)``, and the input of ``bn2.act`` is the stage output before its
    last ReLU (MobileNet-V1: the BN output of the stage's last pointwise conv, mdistiller's/ReviewKD's
    ``preact_feats``). A folded ``bn2`` (``kdbench.models.fold``: the norm is in the conv, its drop and act
    remain in its place) gives the same pre-activation."""
    try:
        from timm.layers import BatchNormAct2d
        from timm.models._efficientnet_blocks import DepthwiseSeparableConv
        from timm.models.efficientnet import EfficientNet
    except ImportError:  # pragma: no cover - another timm layout
        return None, TIMM_PREACT_NOTE
    if type(model.net) is not EfficientNet:
        return None, TIMM_PREACT_NOTE
    acts = []
    for stage in model.tap_modules("stages"):
        blk = stage[-1] if isinstance(stage, nn.Sequential) and len(stage) else None
        bn = getattr(blk, "bn2", None)
        if isinstance(bn, BatchNormAct2d):
            act = bn.act
        elif isinstance(bn, nn.Sequential) and len(bn) == 2:  # folded into conv_pw: its (drop, act) remain
            act = bn[1]
        else:
            return None, TIMM_PREACT_NOTE
        if type(blk) is not DepthwiseSeparableConv or blk.has_skip:
            return None, TIMM_PREACT_NOTE
        if type(act) is not nn.ReLU:
            return None, (f"its stages end in {type(act).__name__}, not ReLU: build it with kwargs "
                          f"{{act_layer: relu}} for pre-ReLU stage taps")
        acts.append(act)
    return acts, ""


class TimmModel(TapModel):
    """Any timm model. Stages come from ``forward_intermediates`` (NCHW for CNN, ViT, Swin and MLP models:
    token models are reshaped on their patch grid, prefix tokens dropped); ``stages_raw`` is the same list (the
    stage outputs as the network computes them). ``final`` is the last stage map,
    ``pooled`` the pre-logits feature, ``cam`` the classifier weights over ``final`` (for token models that pool a
    class token this is an approximation of a CAM). ``stages_preact`` (the stage outputs before their last ReLU)
    only where it is exact (:func:`_timm_preact_acts`: timm's MobileNet-V1 with ReLU); the instance's
    ``supported`` then lists it, and ``tap_notes`` says why otherwise."""

    supported = ("logits", "stages", "stages_raw", "final", "pooled", "cam")

    def __init__(self, net, name):
        super().__init__(net, name)
        acts, why = _timm_preact_acts(self)
        if acts is not None:
            self.supported = _with_preact(type(self).supported)
        else:
            self.tap_notes["stages_preact"] = why

    @property
    def classifier(self):
        fc = self.net.get_classifier()
        return fc if isinstance(fc, nn.Linear) else None

    def _n_intermediates(self) -> int:
        if not hasattr(self, "_n_int"):
            self._n_int = len(self.net.feature_info)
        return self._n_int

    def _stage_idx(self) -> list[int]:
        return stage_indices(self._n_intermediates())

    def tap_modules(self, tap):
        if tap in ("stages", "final"):
            mods = [self.net.get_submodule(self.net.feature_info[i]["module"]) for i in self._stage_idx()]
            return mods if tap == "stages" else mods[-1:]
        return super().tap_modules(tap)

    def _to_nchw(self, out):
        if out.dim() == 3:  # tokens N×L×C: drop the prefix (class/register) tokens, fold the patch grid
            n_prefix = int(getattr(self.net, "num_prefix_tokens", 0) or 0)
            tok = out[:, n_prefix:]
            grid = getattr(getattr(self.net, "patch_embed", None), "grid_size", None)
            h, w = (int(grid[0]), int(grid[1])) if grid is not None else (int(tok.shape[1] ** 0.5),) * 2
            return tok.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)
        if out.dim() == 4 and getattr(self.net, "output_fmt", "NCHW") == "NHWC":
            return out.permute(0, 3, 1, 2)
        return out

    def _from_nchw(self, x, like):
        if like.dim() == 3:
            n_prefix = int(getattr(self.net, "num_prefix_tokens", 0) or 0)
            tok = x.flatten(2).transpose(1, 2)
            return torch.cat([like[:, :n_prefix], tok], dim=1) if n_prefix else tok
        if like.dim() == 4 and getattr(self.net, "output_fmt", "NCHW") == "NHWC":
            return x.permute(0, 2, 3, 1)
        return x

    def _semantic(self, x, wanted):
        if not (wanted - {"logits"}):
            return self.net(x), {}
        idx = self._stage_idx()
        acts = None
        if "stages_preact" in wanted:
            acts, _ = _timm_preact_acts(self)
            if acts is None:
                raise self._missing_tap("stages_preact")
        with capture_preact(acts or []) as preact:
            final, inter = self.net.forward_intermediates(x, indices=idx)
        feats = {"stages": list(inter), "stages_raw": list(inter), "final": [inter[-1]]}
        if acts is not None:
            feats["stages_preact"] = _preact_list(self, preact)
        feats["pooled"] = [self.net.forward_head(final, pre_logits=True)]
        logits = self.net.forward_head(final)
        return logits, {k: v for k, v in feats.items() if k in self.wanted_semantic(wanted)}


RESNET_TAPS = ("logits", "stages", "stages_raw", "final", "pooled", "cam")


def _torchvision_preact_acts(net: nn.Module) -> list[nn.Module] | None:
    """The ``relu`` modules of the last block of ``layer1..4`` when each of those blocks is torchvision's
    ``BasicBlock``/``Bottleneck`` with an ``nn.ReLU`` (ResNet, ResNeXt, Wide ResNet), else None. Such a block
    calls its one ``relu`` several times and last on ``bn2(conv2)+identity`` (``bn3(conv3)+identity`` in a
    Bottleneck): the input of that last call is the stage output before its last ReLU (mdistiller's ImageNet
    ResNets' ``preact_feats``)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    acts = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(net, name, None)
        blk = layer[-1] if isinstance(layer, nn.Sequential) and len(layer) else None
        if type(blk) not in (BasicBlock, Bottleneck) or type(getattr(blk, "relu", None)) is not nn.ReLU:
            return None
        acts.append(blk.relu)
    return acts


class TorchvisionModel(TapModel):
    """torchvision classifiers. ResNet-family models provide stages (``layer1..4``; ``stages_raw`` is the same
    list), ``stages_preact`` (the stages before the last ReLU of their last block: :func:`_torchvision_preact_acts`),
    final, pooled and cam; others provide logits and ``module:<path>`` taps."""

    def __init__(self, net, name):
        super().__init__(net, name)
        self._resnet = all(hasattr(net, a) for a in ("layer1", "layer2", "layer3", "layer4", "fc"))
        self.supported = RESNET_TAPS if self._resnet else ("logits",)
        if self._resnet:
            if _torchvision_preact_acts(net) is not None:
                self.supported = _with_preact(RESNET_TAPS)
            else:
                self.tap_notes["stages_preact"] = ("its stages do not all end in a torchvision BasicBlock or "
                                                   "Bottleneck with a ReLU")

    @property
    def classifier(self):
        return self.net.fc if self._resnet else None

    def _semantic(self, x, wanted):
        if not (wanted - {"logits"}) or not self._resnet:
            return self.net(x), {}
        n = self.net
        acts = None
        if "stages_preact" in wanted:
            acts = _torchvision_preact_acts(n)
            if acts is None:
                raise self._missing_tap("stages_preact")
        h = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        stages = []
        with capture_preact(acts or []) as preact:
            for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
                h = layer(h)
                stages.append(h)
        pooled = torch.flatten(n.avgpool(h), 1)
        logits = n.fc(pooled)
        feats = {"stages": stages, "stages_raw": stages, "final": [h], "pooled": [pooled]}
        if acts is not None:
            feats["stages_preact"] = _preact_list(self, preact)
        return logits, {k: v for k, v in feats.items() if k in self.wanted_semantic(wanted)}

    def tap_modules(self, tap):
        if self._resnet and tap in ("stages", "final"):
            mods = [self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4]
            return mods if tap == "stages" else mods[-1:]
        return super().tap_modules(tap)
