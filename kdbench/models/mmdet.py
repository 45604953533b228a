"""OpenMMLab detectors (mmdet 3.x: RepPoints, RetinaNet, FCOS, GFL, ATSS, Faster R-CNN, ...) as TapModels.

Source ``mmdet:``: ``mmdet:<config name>`` names a config shipped with the installed mmdet (the file's stem, e.g.
``mmdet:reppoints-moment_r50_fpn-gn_head-gn_2x_coco``), ``mmdet:<path>.py`` any config file. The backend is an
optional extra: ``pip install -e ".[mmdet]" && python scripts/install_mmcv.py`` (mmdet's models need mmcv's
compiled ops, which the script builds once for the installed torch and caches; README, "mmdet backend").
Without it, building an ``mmdet:`` model fails with one line saying so; validating a suite (``--dry-run``) does
not need it (the name is checked against the shipped configs only when mmdet is there).

Decisions (not settled by docs/architecture.md or docs/methods.md):

* **The config's model, kdbench's data.** The config's ``model`` is built by mmdet's registry with every
  ``num_classes`` set to the dataset's classes (``data.model_num_classes - 1``: mmdet has no background class;
  kdbench label ``k`` is mmdet label ``k-1``), ``SyncBN`` replaced by ``BN`` (one process, CPU) and the
  backbone's ``Pretrained`` init dropped (no downloads: ``kwargs: {backbone_weights: PATH}`` loads an ImageNet
  ResNet checkpoint, torchvision layout as ``torchvision://resnet50``, ``fc.*`` ignored). ``init_weights()`` runs,
  so the heads get mmdet's initialisation (e.g. the focal-loss prior bias). ``kwargs: {cfg_options: {dotted.key:
  value}}`` edits the config first (mmdet's ``--cfg-options``, e.g. ``model.backbone.depth: 18``,
  ``model.test_cfg.score_thr: 0.0``). The data pipeline, schedule and evaluator of the config are not used: data
  and recipe are the suite's.
* **Input.** kdbench's batches are normalised with the ImageNet mean/std on [0, 1] RGB and zero-padded to a
  multiple of 32 (``kdbench.data.coco``). mmdet's ``data_preprocessor`` is bypassed; when the config's
  preprocessor differs (caffe-style BGR, mean only, another ``pad_size_divisor``), the batch is mapped to exactly
  what that preprocessor produces from the same pixels (per-channel affine, channel order, padding kept at 0).
* **Taps.** ``"fpn"``: the neck outputs (every level, shallow→deep), each through its own ``nn.Identity`` applied
  by a forward hook on the neck, so ``edit_tap``/``tap_modules("fpn")`` (FreeKD/AFP stage 1) replace a neck output
  before the heads see it, and the state dict stays mmdet's. ``"stages"``: the backbone's outputs (its
  ``out_indices``). ``"reg"``: the dense regression conv of the head per level: RetinaNet ``retina_reg``, FCOS
  ``conv_reg`` (before scale/ReLU, like the torchvision FCOS tap), RepPoints ``reppoints_pts_refine_out`` (the
  refinement offsets), GFL ``gfl_reg``, ATSS ``atss_reg``, two-stage detectors the RPN's ``rpn_reg``.
  ``"module:<path>"``: any submodule of the mmdet detector (``module:backbone.layer2``, ``module:neck``).
* **Only what is asked is computed.** Taps ⊆ {``fpn``, ``stages``, ``module:backbone.*``/``module:neck.*``} and no
  targets: backbone + neck only (the teacher of CWD/PKD). ``"reg"`` or a head module adds the head's forward.
* **Losses.** With targets, the detector's own ``loss`` (``extras["losses"]``, mmdet's weighting; the task sums
  them). A plain ``forward(x)`` returns ``extras["loss_fn"]`` computing them from this forward's neck outputs. In
  eval mode the head modules compute the loss with their training behaviour (mmdet heads branch on
  ``self.training``: RepPoints returns boxes, FCOS scales by the stride), BatchNorm/dropout staying in eval mode,
  so a teacher's stage-1 loss leaves its statistics alone.
* **Detections.** ``forward(x, detect=True)`` adds ``extras["detections"]``: mmdet's ``predict`` (its
  ``test_cfg``: score threshold, NMS, max per image) in the coordinates of the (resized) input, labels mapped to
  kdbench's (+1); ``DetectionTask.evaluate`` maps them to the original image and runs COCOeval.
* **Checkpoints.** ``weights:`` takes mmdet's checkpoint layout (``state_dict`` + ``meta``, and the runner's
  ``message_hub``/``optimizer`` entries, which are skipped); kdbench's own ``model.pt`` of an ``mmdet:`` model is
  the mmdet state dict, so mmdet loads it back.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from kdbench.outputs import Outputs
from kdbench.models.detection import forward_inputs
from kdbench.models.catalog import Source
from kdbench.models.tap import TapModel, capture_module_taps, tensor_list
from kdbench.registry import MODELS

INSTALL = 'pip install -e ".[mmdet]" && python scripts/install_mmcv.py'
_RESERVED = {"min_size": "data.min_size", "max_size": "data.max_size", "num_classes": "the dataset",
             "image_mean": "the data pipeline", "image_std": "the data pipeline"}
VALID_KWARGS = ("cfg_options", "backbone_weights")
# the dense regression conv of each head family (first attribute found on the head is the "reg" tap)
REG_MODULES = ("retina_reg", "gfl_reg", "atss_reg", "reppoints_pts_refine_out", "conv_reg", "rpn_reg")
# what an mmengine runner checkpoint may hold besides tensors: its message_hub keeps HistoryBuffers (numpy arrays,
# numpy scalars, and the buffer's statistics methods pickled as getattr(HistoryBuffer, name)). Names or name
# prefixes; under weights_only unpickling only allowlisted callables can be called, so getattr can only fetch
# attributes of these objects.
SAFE_CHECKPOINT_GLOBALS = ("numpy.dtype", "numpy.ndarray", "numpy.dtypes.", "numpy._core.multiarray._reconstruct",
                           "numpy.core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
                           "numpy.core.multiarray.scalar", "mmengine.logging.history_buffer.HistoryBuffer",
                           "builtins.getattr", "collections.OrderedDict", "builtins.set", "builtins.frozenset",
                           "builtins.slice")
# parts of the detector that are not heads
_NOT_HEAD = ("backbone", "neck", "data_preprocessor")


def missing_backend() -> str | None:
    """What of the mmdet backend is missing here (``None``: all of it is installed and loads)."""
    for mod in ("mmengine", "mmcv", "mmdet"):
        if not _installed(mod):
            return f"no module {mod!r}"
    try:
        import mmcv._ext  # noqa: F401
    except ImportError as e:
        return f"mmcv has no compiled ops (mmcv._ext: {str(e).splitlines()[0] if str(e) else 'missing'}; " \
               "mmcv-lite is not enough)"
    return None


def require_backend(spec: str) -> None:
    miss = missing_backend()
    if miss:
        raise ValueError(f"{spec}: the mmdet backend is not installed ({miss}); install it with: {INSTALL} "
                         "(README, 'mmdet backend')")


def _installed(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
        return False


def config_root() -> Path:
    """mmdet's shipped configs, found without importing mmdet (which needs mmcv)."""
    spec = importlib.util.find_spec("mmdet")
    return Path(list(spec.submodule_search_locations)[0]) / ".mim" / "configs"


def config_names() -> list[str]:
    """The config stems shipped with the installed mmdet (``_base_`` fragments excluded)."""
    root = config_root()
    return sorted({p.stem for p in root.rglob("*.py") if "_base_" not in p.parts and "__pycache__" not in p.parts
                   and not p.name.startswith("_")})


def resolve_config(name: str) -> Path:
    """The config file of ``name``: a path (``*.py``) or the stem of a config shipped with mmdet."""
    if name.endswith(".py"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ValueError(f"mmdet:{name}: config file not found")
        return path
    root = config_root()
    found = [p for p in root.rglob(f"{name}.py") if "_base_" not in p.parts]
    if not found:
        names = config_names()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join('mmdet:' + c for c in close)}?" if close else ""
        raise ValueError(f"unknown model 'mmdet:{name}'.{hint} Valid: a config file path ending in .py or one of the "
                         f"{len(names)} configs shipped with mmdet (e.g. {', '.join(names[:5])}; `kdbench ls models`)")
    return found[0]


def _walk(node: Any, fn) -> None:
    """Apply ``fn(dict)`` to every dict nested in ``node`` (configs are dicts and lists)."""
    if isinstance(node, dict):
        fn(node)
        for v in node.values():
            _walk(v, fn)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _walk(v, fn)


def model_config(name: str, num_classes: int, cfg_options: dict | None = None):
    """The mmengine ``Config`` of ``mmdet:name`` with kdbench's edits (see the module docstring)."""
    from mmengine.config import Config

    path = resolve_config(name)
    cfg = Config.fromfile(str(path))
    if cfg_options:
        if not isinstance(cfg_options, dict):
            raise ValueError(f"mmdet:{name}: cfg_options must be a mapping of dotted config keys to values, got "
                             f"{type(cfg_options).__name__}")
        cfg.merge_from_dict(dict(cfg_options))
    if "model" not in cfg:
        raise ValueError(f"mmdet:{name}: the config {path} has no 'model'")

    def edit(d: dict) -> None:
        if "num_classes" in d:
            d["num_classes"] = int(num_classes)
        if d.get("type") in ("SyncBN", "MMSyncBN"):
            d["type"] = "BN"

    _walk(cfg.model, edit)
    bb = cfg.model.get("backbone")
    if isinstance(bb, dict) and bb.get("init_cfg") is not None:
        bb["init_cfg"] = None
    return cfg


def read_checkpoint(path: str | Path) -> dict:
    """An mmdet/mmengine checkpoint (``state_dict`` + ``meta``, maybe ``message_hub``/``optimizer``...) read with
    ``torch.load(weights_only=True)``; the non-tensor objects an mmengine runner stores (numpy arrays, its
    ``HistoryBuffer``) are allowed by name, anything else is refused naming it (no arbitrary unpickling)."""
    import importlib
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    bad = [n for n in names if not any(n == g or (g.endswith(".") and n.startswith(g)) for g in SAFE_CHECKPOINT_GLOBALS)]
    if bad:
        raise ValueError(f"{path}: the checkpoint holds objects kdbench does not unpickle: {', '.join(bad[:5])}")
    allowed = []
    for n in names:
        mod, _, attr = n.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(mod), attr))
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{path}: cannot resolve {n} in the checkpoint: {e}") from None
    if any(n.startswith("numpy.") for n in names):  # a pickled dtype is rebuilt as its numpy.dtypes class
        import numpy.dtypes

        allowed += [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def _quiet_mmengine():
    import logging

    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    old = logger.level
    logger.setLevel(logging.WARNING)
    return logger, old


def build_mmdet_detector(name: str, num_classes: int, in_chans: int = 3, *, cfg_options: dict | None = None,
                         backbone_weights: str | None = None, **kwargs: Any) -> "MmdetDetector":
    """An :class:`MmdetDetector` for ``mmdet:name``; ``num_classes`` includes kdbench's background 0."""
    spec = f"mmdet:{name}"
    require_backend(spec)
    if in_chans != 3:
        raise ValueError(f"{spec}: detectors take 3-channel images, got in_chans={in_chans}")
    for k in kwargs:
        if k in _RESERVED:
            raise ValueError(f"{spec}: {k!r} is not a model kwarg here; it is set by {_RESERVED[k]}")
    if kwargs:
        raise ValueError(f"{spec}: unknown model kwarg(s) {sorted(kwargs)}; valid: {', '.join(VALID_KWARGS)} "
                         "(config edits go in cfg_options: {dotted.key: value})")
    if int(num_classes) < 2:
        raise ValueError(f"{spec}: need at least one foreground class, got num_classes={num_classes}")
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    cfg = model_config(name, int(num_classes) - 1, cfg_options)
    from mmengine.registry import DefaultScope

    logger, old = _quiet_mmengine()
    try:
        with DefaultScope.overwrite_default_scope("mmdet"):
            net = MMDET_MODELS.build(cfg.model)
        net.init_weights()
    finally:
        logger.setLevel(old)
    if backbone_weights is not None:
        from kdbench.models.detection import _load_backbone_weights

        _load_backbone_weights(net.backbone, backbone_weights)
    pre = cfg.model.get("data_preprocessor") or {}
    return MmdetDetector(net, spec, pre)


@contextlib.contextmanager
def _head_training(net, flag: bool):
    """Within the context, the head modules (all but backbone/neck) have ``training=flag``; for ``True``,
    BatchNorm (running statistics) and dropout are left as they are."""
    from torch import nn

    changed = []
    for name, mod in net.named_modules():
        if not name or name.split(".")[0] in _NOT_HEAD:
            continue
        if flag and isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
            continue
        if mod.training != flag:
            changed.append((mod, mod.training))
            mod.training = flag
    try:
        yield
    finally:
        for mod, old in changed:
            mod.training = old


@contextlib.contextmanager
def _given_feats(net, feats):
    """Within the context, ``net.extract_feat`` returns ``feats`` (mmdet's loss/predict/_forward then run only
    the heads on this forward's neck outputs)."""
    net.extract_feat = lambda _inputs: feats
    try:
        yield
    finally:
        del net.extract_feat


def _input_affine(pre: dict):
    """``(perm, scale, shift, divisor)`` mapping kdbench's normalised RGB batch to what the config's
    ``data_preprocessor`` makes of the same pixels, or ``None`` when it is the same map."""
    from kdbench.data.coco import IMAGENET_MEAN, IMAGENET_STD, SIZE_DIVISIBLE

    mean = [float(v) for v in (pre.get("mean") or (0.0, 0.0, 0.0))]
    std = [float(v) for v in (pre.get("std") or (1.0, 1.0, 1.0))]
    if len(mean) == 1:
        mean *= 3
    if len(std) == 1:
        std *= 3
    rgb = bool(pre.get("bgr_to_rgb") or pre.get("rgb_to_bgr"))  # images are read BGR: a swap means RGB
    perm = [0, 1, 2] if rgb else [2, 1, 0]
    # kdbench: x = (p/255 - m)/s on RGB; the config: y_c = (p_src(c) - mean_c)/std_c with src(c) = perm[c]
    scale = [IMAGENET_STD[perm[c]] * 255.0 / std[c] for c in range(3)]
    shift = [(IMAGENET_MEAN[perm[c]] * 255.0 - mean[c]) / std[c] for c in range(3)]
    divisor = int(pre.get("pad_size_divisor") or 1)
    same = (perm == [0, 1, 2] and all(abs(s - 1.0) < 1e-6 for s in scale) and all(abs(b) < 1e-6 for b in shift))
    if same and SIZE_DIVISIBLE % max(divisor, 1) == 0:
        return None
    return perm, scale, shift, divisor


class MmdetDetector(TapModel):
    """An mmdet detector (``self.net``, whose state dict is the mmdet checkpoint's) with taps ``fpn``,
    ``stages``, ``reg`` and ``module:<path>``. ``forward(x, taps=(), targets=None, detect=False) -> Outputs``
    with ``logits=None``, the same contract as :class:`kdbench.models.detection.DetectorModel`."""

    supported = ("fpn", "stages", "reg")
    is_detector = True
    supports_channels_last = False  # mmcv's compiled ops (RepPoints' deformable convs) need contiguous NCHW

    def __init__(self, net: nn.Module, name: str, preprocessor: dict | None = None):
        super().__init__(net, name)
        self.kind = type(net).__name__
        if not hasattr(net, "extract_feat") or not getattr(net, "with_neck", False):
            raise ValueError(f"{name}: kdbench needs a detector with a neck (FPN) and extract_feat; "
                             f"{self.kind} has none")
        self._affine = _input_affine(dict(preprocessor or {}))
        self.reg_module_name = self._find_reg()
        self.fpn_levels = nn.ModuleList()
        self._levels_hook = net.neck.register_forward_hook(self._neck_hook)

    # -- structure ---------------------------------------------------------------------------
    def _find_reg(self) -> str | None:
        for head in ("bbox_head", "rpn_head"):
            mod = getattr(self.net, head, None)
            if mod is None:
                continue
            for attr in REG_MODULES:
                if isinstance(getattr(mod, attr, None), nn.Module):
                    return f"{head}.{attr}"
        return None

    def _neck_hook(self, _m, _inp, out):
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        while len(self.fpn_levels) < len(outs):  # one identity per neck output, made on first use
            self.fpn_levels.append(nn.Identity())
        return tuple(mod(o) for mod, o in zip(self.fpn_levels, outs))

    def _n_levels(self) -> int:
        if not len(self.fpn_levels):
            dev = self.device
            was = self.training
            self.eval()
            with torch.no_grad():
                self.net.extract_feat(torch.zeros(1, 3, 256, 256, device=dev))  # P7 2x2: GN needs >1 value
            self.train(was)
        return len(self.fpn_levels)

    def tap_modules(self, tap: str) -> list[nn.Module]:
        if tap == "fpn":
            self._n_levels()
            return list(self.fpn_levels)
        return super().tap_modules(tap)

    def check_taps(self, taps: Sequence[str]) -> None:
        super().check_taps(taps)
        if "reg" in taps and self.reg_module_name is None:
            raise ValueError(f"model {self.name!r} ({self.kind}) has no dense regression conv for tap 'reg' "
                             f"(looked for {', '.join(REG_MODULES)} on its bbox_head/rpn_head)")

    def read_checkpoint(self, path) -> dict:
        """What ``kdbench.models.sources.load_weights`` reads for ``weights:`` (see :func:`read_checkpoint`)."""
        return read_checkpoint(path)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    # -- input and targets -------------------------------------------------------------------
    def _inputs(self, images) -> Tensor:
        x = images.tensors
        if self._affine is None:
            return x
        perm, scale, shift, divisor = self._affine
        y = x[:, perm] * x.new_tensor(scale).view(1, 3, 1, 1) + x.new_tensor(shift).view(1, 3, 1, 1)
        mask = torch.zeros_like(x[:, :1])
        for i, (h, w) in enumerate(images.image_sizes):
            mask[i, :, :h, :w] = 1
        y = y * mask
        h, w = y.shape[-2:]
        hp, wp = -(-h // divisor) * divisor, -(-w // divisor) * divisor
        if (hp, wp) != (h, w):
            y = nn.functional.pad(y, (0, wp - w, 0, hp - h))
        return y

    @staticmethod
    def _samples(inputs: Tensor, images, targets: Sequence[dict] | None):
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        pad = tuple(int(v) for v in inputs.shape[-2:])
        out = []
        for i, (h, w) in enumerate(images.image_sizes):
            s = DetDataSample(metainfo={"img_shape": (int(h), int(w)), "ori_shape": (int(h), int(w)),
                                        "pad_shape": pad, "batch_input_shape": pad, "scale_factor": (1.0, 1.0),
                                        "img_id": i})
            if targets is not None:
                t = targets[i]
                gt = InstanceData()
                gt.bboxes = t["boxes"].to(inputs.device).float().reshape(-1, 4)
                gt.labels = t["labels"].to(inputs.device).long().reshape(-1) - 1
                s.gt_instances = gt
            out.append(s)
        return out

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x, taps: Sequence[str] = (), targets: Sequence[dict] | None = None,
                detect: bool = False) -> Outputs:
        images, wanted = forward_inputs(self, x, taps)
        module_taps = sorted(t for t in wanted if t.startswith("module:"))
        stages: list = []  # the backbone's outputs (its stages)
        handles = []
        if "stages" in wanted:
            handles.append(self.net.backbone.register_forward_hook(lambda _m, _i, out: stages.append(out)))
        head_taps = [t for t in module_taps if t[len("module:"):].split(".")[0] not in ("backbone", "neck")]
        feats_out: dict[str, list[Tensor]] = {}
        extras: dict[str, Any] = {}
        regs: list[Tensor] = []
        reg_hook = []

        def reg_on():
            if "reg" in wanted and not reg_hook:
                mod = self.net.get_submodule(self.reg_module_name)
                reg_hook.append(mod.register_forward_hook(lambda _m, _i, out: regs.append(out)))

        def reg_off():
            while reg_hook:
                reg_hook.pop().remove()

        with capture_module_taps(self.net, module_taps) as captured_modules:
            try:
                inputs = self._inputs(images)
                feats = tuple(self.net.extract_feat(inputs))
                if "fpn" in wanted:
                    feats_out["fpn"] = list(feats)
                samples = self._samples(inputs, images, targets)
                if targets is not None:
                    reg_on()
                    extras["losses"] = self._losses(inputs, feats, samples)
                    reg_off()
                elif "reg" in wanted or head_taps:
                    reg_on()
                    with _given_feats(self.net, feats), _head_training(self.net, self.training):
                        self.net._forward(inputs, samples)
                    reg_off()
                elif not wanted:
                    extras["loss_fn"] = lambda tg: self._losses(inputs, feats, self._samples(inputs, images, tg))
                if detect:
                    with torch.no_grad():
                        extras["detections"] = self._detect(inputs, feats, samples)
            finally:
                reg_off()
                for h in handles:
                    h.remove()
        if "reg" in wanted:
            feats_out["reg"] = regs
        feats_out.update(captured_modules)
        if stages:
            feats_out["stages"] = tensor_list(stages[-1])
        extras["image_sizes"] = list(images.image_sizes)
        return Outputs(logits=None, feats=feats_out, extras=extras)

    def _losses(self, inputs: Tensor, feats, samples) -> dict[str, Tensor]:
        """mmdet's ``loss`` on these neck outputs: its terms, each a scalar (lists summed: per-level terms)."""
        with _given_feats(self.net, feats), _head_training(self.net, True):
            raw = self.net.loss(inputs, samples)
        out = {}
        for k, v in raw.items():
            if "loss" not in k:  # e.g. accuracies some heads log
                continue
            out[k] = sum(v) if isinstance(v, (list, tuple)) else v
        return out

    def _detect(self, inputs: Tensor, feats, samples) -> list[dict[str, Tensor]]:
        with _given_feats(self.net, feats), _head_training(self.net, False):
            res = self.net.predict(inputs, samples, rescale=False)
        return [{"boxes": r.pred_instances.bboxes.float(), "scores": r.pred_instances.scores.float(),
                 "labels": r.pred_instances.labels.long() + 1} for r in res]



@MODELS.register("mmdet")
class MmdetSource(Source):
    prefix = "mmdet"

    def names(self):
        return config_names() if _installed("mmdet") else []

    def check(self, name):
        if not isinstance(name, str) or not name:
            raise ValueError("mmdet: needs a config name or a config file path, e.g. "
                             "'mmdet:retinanet_r50_fpn_1x_coco'")
        if not _installed("mmdet"):
            return  # checked when built, which then says how to install the backend
        resolve_config(name)

    def build(self, name, num_classes, in_chans, **kwargs):
        require_backend(f"mmdet:{name}")
        self.check(name)
        return build_mmdet_detector(name, num_classes, in_chans, **kwargs)
