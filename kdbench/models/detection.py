"""torchvision detectors (Faster R-CNN, RetinaNet, FCOS) on ResNet/ResNeXt FPN backbones, as TapModels.

Names (``torchvision:`` source, see :data:`DETECTOR_NAMES`): ``{fasterrcnn,retinanet,fcos}_{BACKBONE}_fpn`` with
BACKBONE in resnet18, resnet34, resnet50, resnet101, resnext101_32x8d, resnext101_64x4d. They are built through
torchvision's own pieces (``torchvision.models.<backbone>(weights=None)``, ``BackboneWithFPN``, the detector
classes) exactly as torchvision's ``*_resnet50_fpn`` builders do, so ``retinanet_resnet50_fpn``,
``fcos_resnet50_fpn`` and ``fasterrcnn_resnet50_fpn`` have torchvision's state-dict keys and its COCO checkpoints
load as teachers (``weights: PATH``; with ``data.label_mode: category_id``, as those checkpoints predict COCO
category ids with 91 classes).

Decisions (not settled by DESIGN.md or docs/methods.md):

* **Input pipeline outside the model.** Resizing (``min_size``/``max_size``), normalisation and padding are done
  once by the data pipeline (``kdbench.data.coco``, data options), and the models receive the padded batch as a
  ``torchvision.models.detection.image_list.ImageList``; the detectors' own ``GeneralizedRCNNTransform`` is never
  called. So teacher and student see exactly the same tensor, and ``min_size``/``max_size`` are *data* options.
  Passing them (or ``image_mean``/``image_std``) as model kwargs is an error saying so.
* **Backbone init and BN.** Default: random init, ``BatchNorm2d``, all 5 backbone stages trainable (what small
  generated-data runs need). ``kwargs: {backbone_weights: PATH}`` loads an ImageNet classification checkpoint of
  the backbone (torchvision layout, e.g. ``resnet50-0676ba61.pth``; ``fc.*`` ignored) and then defaults to
  torchvision's/mmdet's detection setting: ``FrozenBatchNorm2d`` and 3 trainable stages. ``frozen_bn`` and
  ``trainable_backbone_layers`` override either default. ``fpn_channels`` (default 256) sets the FPN width (the
  quickstart uses 64 to stay small). Other kwargs go to the detector class (``score_thresh``, ``nms_thresh``,
  ``detections_per_img``, ``rpn_*``, ``box_*``, ...); an unknown one is an error listing the valid ones.
* **Taps.** ``"fpn"``: the FPN outputs shallow→deep (Faster R-CNN P2–P6 with P6 = max-pool, RetinaNet/FCOS
  P3–P7 with P6/P7 from P5 as torchvision v1 builds them). Each level passes through its own ``nn.Identity``
  (``tap_modules("fpn")``), *after* the whole neck: an ``edit_tap`` (FreeKD/AFP stage 1) replaces a neck
  output without changing how the other levels are computed, as mmdet's neck-output insertion does.
  ``"reg"``: the regression outputs that RegKD distils. One-stage detectors: the dense regression-head outputs
  per FPN level, ``N×(A·4)×H×W``: RetinaNet ``head.regression_head.bbox_reg`` (mmdet's ``retina_reg``), FCOS
  ``head.regression_head.bbox_reg`` (before torchvision's ReLU). Faster R-CNN (model kwarg ``reg_tap``):
  ``"roi"`` (default) the RoI head's box regression (``roi_heads.box_predictor.bbox_pred``, mmdet's ``fc_reg``),
  one ``R×(K·4)`` tensor over the RoIs of the batch, **teacher and student on the same RoIs, the student's**,
  as FreeKD's release does (mmrazor feeds the teacher's RoI extractor the student's RoIs); ``"rpn"`` the RPN's
  dense ``bbox_pred`` per level (``N×(A·4)×H×W``, kdbench's version-1 tap). How the student's RoIs reach the
  teacher: a forward *with targets* (the student's training forward) publishes the RoIs its RoI head was trained
  on (the sampled proposals) for its input object ``x`` (:data:`ROI_EXCHANGE`, weakly keyed: gone with ``x``);
  a forward *without targets* on the same ``x`` afterwards (the teacher's, in the same training step: the
  harness runs the student first) runs its RoI head on those RoIs. With none published (shape probes, a lone
  forward) a model uses its own test-time proposals. ``extras["reg_rois"]`` holds the RoIs used (per image).
* **Only what is asked is computed.** With taps ⊆ {``fpn``, ``module:backbone.*``} and no targets, only
  backbone + FPN run (no heads, no anchors, no post-processing): this is the teacher's forward for CWD/PKD.
  ``"reg"`` alone adds only the regression branch of the head (RetinaNet/FCOS), the RPN head (Faster R-CNN,
  ``reg_tap="rpn"``) or the RoI box head on the published RoIs (``"roi"``; with none, the RPN and the box head).
* **Losses.** ``forward(x, taps, targets)`` returns the detector's own loss dict in ``extras["losses"]``, whatever
  the module mode: the target-dependent parts (anchor matching, RPN proposal sampling with the *training*
  top-n, RoI sampling) always use their training semantics, while BatchNorm follows the module's mode. A plain
  ``forward(x)`` (no targets, no taps: FreeKD/AFP stage 1 calls ``teacher(x)`` in eval mode) runs the full head
  and returns ``extras["loss_fn"]``: a closure that computes the same losses from this forward's outputs for
  given targets (``DetectionTask.loss`` calls it). So a teacher computes its task loss in eval mode, BN frozen
  (running statistics, never updated), gradients flowing into the prompt edits; no train-mode switch is needed.
  torchvision's RetinaNet/FCOS heads have no BatchNorm (none / GroupNorm) and no dropout, so these losses equal
  train-mode losses up to the backbone's BN statistics.
* **Detections.** ``forward(x, detect=True)`` adds ``extras["detections"]``: per image ``{boxes, scores,
  labels}`` in the coordinates of the (resized) input; the task maps them back to the original image.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from kdbench.outputs import Outputs
from kdbench.models.tap import MODULE_PREFIX, TapModel, capture_module_taps, record_outputs

DETECTORS = ("fasterrcnn", "retinanet", "fcos")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext101_32x8d", "resnext101_64x4d")
DETECTOR_NAMES = tuple(f"{d}_{b}_fpn" for d in DETECTORS for b in BACKBONES)
REG_TAPS = ("roi", "rpn")  # Faster R-CNN's "reg" tap: RoI head box regression (default) or RPN deltas
_RESERVED = {"min_size": "data.min_size", "max_size": "data.max_size", "image_mean": "the data pipeline",
             "image_std": "the data pipeline", "backbone": "the model name", "num_classes": "the dataset"}


def parse_name(name: str) -> tuple[str, str]:
    """``"retinanet_resnet101_fpn"`` -> ``("retinanet", "resnet101")``; an error lists the valid names."""
    if name not in DETECTOR_NAMES:
        import difflib

        close = difflib.get_close_matches(name, DETECTOR_NAMES, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown detector {name!r}.{hint} Valid: {', '.join(DETECTOR_NAMES)}")
    det, rest = name.split("_", 1)
    return det, rest[: -len("_fpn")]


def _load_backbone_weights(body: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone_weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path}: backbone checkpoint does not fit: missing {missing[:5]}, unexpected "
                         f"{list(unexpected)[:5]}")


def build_backbone(detector: str, backbone: str, *, fpn_channels: int = 256, backbone_weights: str | None = None,
                   frozen_bn: bool | None = None, trainable_backbone_layers: int | None = None):
    """``BackboneWithFPN`` as torchvision's ``_resnet_fpn_extractor`` builds it for ``detector``."""
    from torchvision.models import resnet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import misc
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    pretrained = backbone_weights is not None
    frozen_bn = pretrained if frozen_bn is None else bool(frozen_bn)
    trainable = (3 if pretrained else 5) if trainable_backbone_layers is None else int(trainable_backbone_layers)
    if not 0 <= trainable <= 5:
        raise ValueError(f"trainable_backbone_layers must be in [0, 5], got {trainable}")
    if int(fpn_channels) < 1:
        raise ValueError(f"fpn_channels must be positive, got {fpn_channels}")
    body = getattr(resnet, backbone)(weights=None, norm_layer=misc.FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
    if pretrained:
        _load_backbone_weights(body, backbone_weights)
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable]
    if trainable == 5:
        layers_to_train.append("bn1")
    for pname, p in body.named_parameters():
        if not any(pname.startswith(layer) for layer in layers_to_train):
            p.requires_grad_(False)
    if detector == "fasterrcnn":
        returned, extra = [1, 2, 3, 4], LastLevelMaxPool()
    else:  # RetinaNet / FCOS v1: P3-P5 from C3-C5, P6/P7 from P5
        returned, extra = [2, 3, 4], LastLevelP6P7(int(fpn_channels), int(fpn_channels))
    return_layers = {f"layer{k}": str(v) for v, k in enumerate(returned)}
    c2 = body.inplanes // 8
    in_channels = [c2 * 2 ** (i - 1) for i in returned]
    return BackboneWithFPN(body, return_layers, in_channels, int(fpn_channels), extra_blocks=extra)


def build_detector(name: str, num_classes: int, in_chans: int = 3, *, fpn_channels: int = 256,
                   backbone_weights: str | None = None, frozen_bn: bool | None = None,
                   trainable_backbone_layers: int | None = None, reg_tap: str | None = None,
                   **kwargs: Any) -> "DetectorModel":
    """A :class:`DetectorModel` for ``name`` (see :data:`DETECTOR_NAMES`). ``num_classes`` includes the
    background index 0 (torchvision's convention). ``reg_tap`` (Faster R-CNN only): what the ``"reg"`` tap is,
    one of :data:`REG_TAPS` (default ``"roi"``)."""
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

    det, bb = parse_name(name)
    if in_chans != 3:
        raise ValueError(f"torchvision:{name}: detectors take 3-channel images, got in_chans={in_chans}")
    for k in kwargs:
        if k in _RESERVED:
            raise ValueError(f"torchvision:{name}: {k!r} is not a model kwarg here; it is set by {_RESERVED[k]}")
    cls = {"fasterrcnn": FasterRCNN, "retinanet": RetinaNet, "fcos": FCOS}[det]
    valid = [p for p in inspect.signature(cls.__init__).parameters
             if p not in ("self", "kwargs") and p not in _RESERVED]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"torchvision:{name}: unknown model kwarg(s) {unknown}; valid: fpn_channels, "
                         f"backbone_weights, frozen_bn, trainable_backbone_layers, reg_tap, {', '.join(valid)}")
    if reg_tap is not None and det != "fasterrcnn":
        raise ValueError(f"torchvision:{name}: reg_tap applies to Faster R-CNN only (a one-stage detector's 'reg' "
                         "tap is its dense regression head)")
    backbone = build_backbone(det, bb, fpn_channels=fpn_channels, backbone_weights=backbone_weights,
                              frozen_bn=frozen_bn, trainable_backbone_layers=trainable_backbone_layers)
    net = cls(backbone, num_classes=int(num_classes), **kwargs)
    return DetectorModel(net, f"torchvision:{name}", det, reg_tap=reg_tap or "roi")


class RoIExchange:
    """The RoIs a two-stage student trained on, by input object, for the teacher's forward on the same input
    (see the module docstring, ``"reg"``). Weakly keyed: an entry lives as long as the batch's ``x``."""

    def __init__(self) -> None:
        self._rois: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def publish(self, x: Any, rois: Sequence[Tensor]) -> None:
        self._rois[x] = [r.detach() for r in rois]

    def lookup(self, x: Any) -> list[Tensor] | None:
        try:
            return self._rois.get(x)
        except TypeError:  # an input that cannot be weakly referenced never has published RoIs
            return None


ROI_EXCHANGE = RoIExchange()


@contextlib.contextmanager
def _flag_training(module: nn.Module, flag: bool):
    """Set ``module.training`` alone (not its children) within the context."""
    old = module.training
    module.training = flag
    try:
        yield
    finally:
        module.training = old


def as_image_list(x):
    """An ``ImageList`` from an ``ImageList`` or a padded ``N×3×H×W`` tensor (every image its full size)."""
    from torchvision.models.detection.image_list import ImageList

    if isinstance(x, ImageList):
        return x
    if isinstance(x, Tensor) and x.dim() == 4:
        return ImageList(x, [tuple(x.shape[-2:])] * x.shape[0])
    raise TypeError(f"a detector takes an ImageList or an N×3×H×W tensor, got {type(x).__name__}")


def forward_inputs(model: TapModel, x, taps: Sequence[str]) -> tuple[Any, set[str]]:
    """What a detector's forward starts with: ``x`` as an ``ImageList`` on the model's device and the checked
    set of wanted taps (the torchvision and mmdet detectors share it)."""
    images = as_image_list(x)
    if images.tensors.device != model.device:
        images = images.to(model.device)
    wanted = set(taps)
    model.check_taps(sorted(wanted))
    return images, wanted


class DetectorModel(TapModel):
    """A torchvision detector (``self.net``, whose state dict is the checkpoint) with taps ``fpn``/``reg``/
    ``module:<path>``. ``forward(x, taps=(), targets=None, detect=False) -> Outputs`` with ``logits=None``;
    see the module docstring for what runs and what ``extras`` holds."""

    supported = ("fpn", "reg")

    def __init__(self, net: nn.Module, name: str, kind: str, reg_tap: str = "roi"):
        super().__init__(net, name)
        if kind not in DETECTORS:
            raise ValueError(f"unknown detector kind {kind!r}; valid: {', '.join(DETECTORS)}")
        if reg_tap not in REG_TAPS:
            raise ValueError(f"{name}: reg_tap must be one of {', '.join(REG_TAPS)}, got {reg_tap!r}")
        self.kind = kind
        self.roi_reg = kind == "fasterrcnn" and reg_tap == "roi"
        if self.roi_reg:  # the teacher's RoI regression runs on the RoIs of the student's forward
            self.student_dependent_taps = frozenset({"reg"})
        n_levels = len(net.backbone.body.return_layers) + (1 if kind == "fasterrcnn" else 2)
        self.fpn_levels = nn.ModuleList(nn.Identity() for _ in range(n_levels))

    # -- TapModel hooks --------------------------------------------------------------------------
    def tap_modules(self, tap: str) -> list[nn.Module]:
        if tap == "fpn":
            return list(self.fpn_levels)
        return super().tap_modules(tap)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    # -- pieces ----------------------------------------------------------------------------------
    def backbone_fpn(self, images) -> OrderedDict:
        """Backbone + FPN (each level through its tap identity): ``OrderedDict`` name -> ``N×C×h×w``."""
        feats = self.net.backbone(images.tensors)
        return OrderedDict((k, mod(v)) for mod, (k, v) in zip(self.fpn_levels, feats.items()))

    def _regression_only(self, levels: list[Tensor]) -> list[Tensor]:
        if self.kind == "fasterrcnn":
            return list(self.net.rpn.head(levels)[1])
        with record_outputs(self.net.head.regression_head.bbox_reg) as regs:
            self.net.head.regression_head(levels)
        return regs

    def _heads(self, images, feats: OrderedDict, want_reg: bool) -> tuple[dict, list[Tensor]]:
        levels = list(feats.values())
        if self.kind == "fasterrcnn":
            objectness, deltas = self.net.rpn.head(levels)
            anchors = self.net.rpn.anchor_generator(images, levels)
            return {"objectness": objectness, "deltas": deltas, "anchors": anchors}, list(deltas)
        recorder = record_outputs(self.net.head.regression_head.bbox_reg) if want_reg else contextlib.nullcontext([])
        with recorder as regs:
            head = self.net.head(levels)
        anchors = self.net.anchor_generator(images, levels)
        return {"head": head, "anchors": anchors, "hw": [x.size(2) * x.size(3) for x in levels]}, regs

    def _proposals(self, images, st: dict, train: bool):
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        rpn = self.net.rpn
        anchors = st["anchors"]
        num_per_level = [o[0].numel() for o in st["objectness"]]
        obj, deltas = concat_box_prediction_layers(st["objectness"], st["deltas"])
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        with _flag_training(rpn, train):
            boxes, _ = rpn.filter_proposals(proposals, obj, images.image_sizes, num_per_level)
        return boxes, obj, deltas

    def _losses(self, images, feats: OrderedDict, st: dict, targets: Sequence[dict],
                record: dict | None = None) -> dict[str, Tensor]:
        """The detector's losses; a two-stage detector puts the RoIs its RoI head was trained on and their box
        regression in ``record`` (``"rois"``, ``"box_regression"``) when one is given."""
        targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        if self.kind == "retinanet":
            return self.net.compute_loss(targets, st["head"], st["anchors"])
        if self.kind == "fcos":
            return self.net.compute_loss(targets, st["head"], st["anchors"], st["hw"])
        from torchvision.models.detection.roi_heads import fastrcnn_loss

        rpn, rh = self.net.rpn, self.net.roi_heads
        boxes, obj, deltas = self._proposals(images, st, train=True)
        labels, matched = rpn.assign_targets_to_anchors(st["anchors"], targets)
        reg_targets = rpn.box_coder.encode(matched, st["anchors"])
        loss_obj, loss_rpn_box = rpn.compute_loss(obj, deltas, labels, reg_targets)
        props, _, labels, reg_targets = rh.select_training_samples(boxes, targets)
        box_feats = rh.box_head(rh.box_roi_pool(feats, props, images.image_sizes))
        class_logits, box_regression = rh.box_predictor(box_feats)
        if record is not None:
            record.update(rois=props, box_regression=box_regression)
        loss_cls, loss_box = fastrcnn_loss(class_logits, box_regression, labels, reg_targets)
        return {"loss_objectness": loss_obj, "loss_rpn_box_reg": loss_rpn_box, "loss_classifier": loss_cls,
                "loss_box_reg": loss_box}

    def roi_regression(self, images, feats: OrderedDict, rois: Sequence[Tensor]) -> Tensor:
        """The RoI head's box regression (``box_predictor.bbox_pred``) on the given RoIs (one ``R_i×4`` tensor of
        ``x1y1x2y2`` boxes per image): ``R×(K·4)``, the RoIs of all images in order."""
        rh = self.net.roi_heads
        box_feats = rh.box_head(rh.box_roi_pool(feats, list(rois), images.image_sizes))
        return rh.box_predictor(box_feats)[1]

    def _detect(self, images, feats: OrderedDict, st: dict) -> list[dict[str, Tensor]]:
        if self.kind == "fasterrcnn":
            rh = self.net.roi_heads
            boxes, _, _ = self._proposals(images, st, train=False)
            box_feats = rh.box_head(rh.box_roi_pool(feats, boxes, images.image_sizes))
            class_logits, box_regression = rh.box_predictor(box_feats)
            b, s, l = rh.postprocess_detections(class_logits, box_regression, boxes, images.image_sizes)
            return [{"boxes": bi, "scores": si, "labels": li} for bi, si, li in zip(b, s, l)]
        head, anchors, hw = st["head"], st["anchors"], st["hw"]
        a = head["cls_logits"].size(1) // sum(hw)
        per_level = [v * a for v in hw]
        split_head = {k: list(v.split(per_level, dim=1)) for k, v in head.items()}
        split_anchors = [list(x.split(per_level)) for x in anchors]
        return self.net.postprocess_detections(split_head, split_anchors, images.image_sizes)

    def _roi_tap(self, x, images, feats: OrderedDict, st: dict | None, record: dict) -> tuple[list[Tensor], list]:
        """The ``"reg"`` tap of a two-stage detector (``reg_tap="roi"``) and the RoIs it is on: a training forward
        (``record`` filled by the losses) publishes its sampled RoIs; otherwise the RoIs published for ``x``, or
        this model's own test-time proposals."""
        if record:
            ROI_EXCHANGE.publish(x, record["rois"])
            return [record["box_regression"]], [r.detach() for r in record["rois"]]
        rois = ROI_EXCHANGE.lookup(x)
        if rois is None:
            if st is None:
                st, _ = self._heads(images, feats, False)
            rois, _, _ = self._proposals(images, st, train=False)
        return [self.roi_regression(images, feats, rois)], list(rois)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x, taps: Sequence[str] = (), targets: Sequence[dict] | None = None,
                detect: bool = False) -> Outputs:
        images, wanted = forward_inputs(self, x, taps)
        head_modules = [t for t in wanted if t.startswith(MODULE_PREFIX)
                        and not t[len(MODULE_PREFIX):].startswith("backbone")]
        full = targets is not None or detect or not wanted or bool(head_modules)
        roi_reg = self.roi_reg and "reg" in wanted
        feats_out: dict[str, list[Tensor]] = {}
        extras: dict[str, Any] = {}
        record: dict[str, Any] = {}
        with capture_module_taps(self.net, wanted) as captured:
            feats = self.backbone_fpn(images)
            levels = list(feats.values())
            if "fpn" in wanted:
                feats_out["fpn"] = levels
            st = None
            if full:
                st, regs = self._heads(images, feats, "reg" in wanted)
                if "reg" in wanted and not roi_reg:
                    feats_out["reg"] = regs
                if targets is not None:
                    extras["losses"] = self._losses(images, feats, st, targets, record if roi_reg else None)
                else:
                    extras["loss_fn"] = partial(self._losses, images, feats, st)
                if detect:
                    with torch.no_grad():
                        extras["detections"] = self._detect(images, feats, st)
            elif "reg" in wanted and not roi_reg:
                feats_out["reg"] = self._regression_only(levels)
            if roi_reg:
                feats_out["reg"], extras["reg_rois"] = self._roi_tap(x, images, feats, st, record)
        feats_out.update(captured)
        extras["image_sizes"] = list(images.image_sizes)
        return Outputs(logits=None, feats=feats_out, extras=extras)
