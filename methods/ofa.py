"""OFA: Hao, Guo, Han, Tang, Hu, Wang, Xu, "One-for-All: Bridge the Gap Between Heterogeneous Architectures in
Knowledge Distillation", NeurIPS 2023. Spec: docs/methods.md §15 (official code: Hao840/OFAKD, distillers/ofa.py).

Every distilled student stage gets a projector branch that ends in K class logits; each branch, and the
student's own logits, learn from the teacher's logits through the OFA loss (a cross-entropy against the
teacher's probabilities with the target class enhanced by the exponent ε). The teacher gives logits only.

* CNN students: ``n − i`` separable-conv blocks (stride 2, channels doubling, the last to ``max(d_s, d_t)``),
  or a 1×1 conv at the last stage, then global average pooling and a linear layer to K.
* Token students (ViT/DeiT, Swin, MLP-Mixer/ResMLP, ...): patch merging towards a 7×7 grid, ``max(n − i, 1)``
  transformer blocks (4 heads), mean over tokens, a linear layer to K.

``n`` is the student's number of stages (4 in every official configuration, so ``n − i`` is the official
``4 − i``); ``d_s``/``d_t`` are the widths of the networks' pooled features. Stage features come from kdbench's
``stages`` tap (token maps folded to ``N×C×h×w`` on their patch grid, prefix tokens dropped); the token
projector unfolds them again.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.method import Batch, Distiller, Outputs, Taps, fp32, no_autocast, register_method

#: timm model modules whose networks are token models (their stages are token sequences, not conv maps).
TOKEN_MODULES = ("vision_transformer", "vision_transformer_relpos", "deit", "cait", "beit", "eva",
                 "swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr", "mlp_mixer")
#: The official token projector merges patches until the grid is about this size (OFAKD: 49 patches).
FINAL_GRID = 7
#: Attention heads of the projector's transformer blocks (official).
NUM_HEADS = 4


def ofa_loss(logits_s: Tensor, logits_t: Tensor, target: Tensor, eps: float, temperature: float = 1.0) -> Tensor:
    """The OFA loss (docs/methods.md §15), a 0-dim fp32 tensor:

        p_s = softmax(z_s / T),  p_t = softmax(z_t / T),  m = onehot(y)
        w   = (p_t + m)^ε − m          (target class: (1 + p_t,y)^ε − 1; other classes: p_t,k^ε)
        L   = (1/N) Σ_n Σ_k −w[n,k] · log p_s[n,k]

    The temperature divides both networks' logits and nothing else (no ``T²`` factor). ``target`` holds class
    indices ``(N,)``; a ``(N, K)`` target (soft or one-hot labels) is reduced to its argmax, as the official code
    does under label smoothing. ``log p_s`` is computed with ``log_softmax`` (the official code takes the log of
    the softmax: the same number where it is finite).
    """
    if logits_s.dim() != 2 or logits_s.shape != logits_t.shape:
        raise ValueError(f"ofa_loss: need N×K logits of equal shape, got student {tuple(logits_s.shape)}, "
                         f"teacher {tuple(logits_t.shape)}")
    with no_autocast():
        s, t = fp32(logits_s, logits_t)
        if target.dim() > 1:
            target = target.argmax(dim=-1)
        mask = F.one_hot(target.long(), s.shape[1]).to(s.dtype)
        T = float(temperature)
        p_t = F.softmax(t / T, dim=1)
        w = (p_t + mask).pow(float(eps)) - mask
        return -(w * F.log_softmax(s / T, dim=1)).sum(dim=1).mean()


# -- projectors -------------------------------------------------------------------------------------------------
class SepConv(nn.Module):
    """OFAKD's downsampling block (DARTS-style separable conv): depthwise 3×3 stride 2, pointwise, BN, ReLU,
    depthwise 3×3, pointwise to ``c_out``, BN, ReLU. Convs without bias, affine BN."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


def cnn_projector(c_in: int, n_blocks: int, width: int, num_classes: int) -> nn.Sequential:
    """``n_blocks`` SepConvs (input ``c_in·2^j`` → ``c_in·2^(j+1)``, the last to ``width``), or a 1×1 conv
    ``c_in → width`` (with bias) when ``n_blocks == 0``; then global average pooling, flatten, linear to K."""
    if n_blocks > 0:
        down = [SepConv(c_in * 2 ** j, width if j == n_blocks - 1 else c_in * 2 ** (j + 1)) for j in range(n_blocks)]
    else:
        down = [nn.Conv2d(c_in, width, 1)]
    return nn.Sequential(*down, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class PatchMerge(nn.Module):
    """Swin's patch merging on an ``N×h×w×C`` grid: the four 2×2 neighbours concatenated (order (0,0), (1,0),
    (0,1), (1,1), as OFAKD's copy of timm 0.6's PatchMerging), LayerNorm over ``4C``, linear ``4C → out``
    without bias, then ``act``. An odd side is zero-padded at the bottom/right first (the official code asserts
    even sides; timm ≥ 0.9 pads the same way)."""

    def __init__(self, dim: int, out_dim: int, act: bool):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[1:3]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.act(self.reduction(self.norm(x)))


class TokenProject(nn.Module):
    """kdbench's stand-in for the first merge when a grid needs no merging but its width differs from ``d_s``
    (only small inputs or shallow Swin stages get there; the official configurations never do): LayerNorm,
    linear ``C → d_s`` without bias, GELU, per token."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.reduction = nn.Linear(dim, out_dim, bias=False)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.reduction(self.norm(x)))


def merge_count(h: int, w: int, final_grid: int = FINAL_GRID) -> int:
    """How many 2×2 merges the official code applies to a grid of side ``g``: ``max(⌊log2(g / 7)⌋, 0)``
    (224 px: 56 → 3, 28 → 2, 14 → 1, 7 → 0); kdbench takes ``g = min(h, w)``."""
    g = min(int(h), int(w))
    return max(int(math.log2(g / final_grid)), 0) if g > 0 else 0


class TokenProjector(nn.Module):
    """The projector of a token student's stage: ``N×C×h×w`` (a folded token map) → tokens on the grid → patch
    merging (the first merge to ``d_s`` with GELU, the others ``d_s → d_s``, the last of several without
    activation, as official) → ``n_blocks`` timm ViT blocks (width ``d_s``, 4 heads, official defaults otherwise)
    → mean over tokens → linear to K."""

    def __init__(self, c_in: int, h: int, w: int, d_s: int, n_blocks: int, num_classes: int):
        super().__init__()
        from timm.models.vision_transformer import Block

        m = merge_count(h, w)
        merges: list[nn.Module] = [PatchMerge(c_in if i == 0 else d_s, d_s, act=(i == 0 or i != m - 1))
                                   for i in range(m)]
        if m == 0 and c_in != d_s:
            merges.append(TokenProject(c_in, d_s))
        self.merge = nn.Sequential(*merges)
        self.blocks = nn.Sequential(*[Block(dim=d_s, num_heads=NUM_HEADS) for _ in range(n_blocks)])
        self.head = nn.Linear(d_s, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.merge(x.permute(0, 2, 3, 1))  # N×h×w×C
        x = self.blocks(x.flatten(1, 2))  # N×L×d_s
        return self.head(x.mean(dim=1))


def init_weights(module: nn.Module) -> None:
    """OFAKD's ``init_weights`` over a projector: conv Kaiming normal (fan_out, ReLU gain); BatchNorm weight 1,
    bias 0; linear truncated normal (std 0.02, cut at ±2) with zero bias. LayerNorms keep PyTorch's init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def student_kind_of(model: str) -> str:
    """``"token"`` for a ``timm:`` model of one of :data:`TOKEN_MODULES`, else ``"cnn"`` (from the name only)."""
    source, _, name = (model or "").partition(":")
    if source != "timm" or not name:
        return "cnn"
    try:
        from timm.models import is_model_in_modules
    except ImportError:  # pragma: no cover - timm is a dependency
        return "cnn"
    return "token" if is_model_in_modules(name, list(TOKEN_MODULES)) else "cnn"


@register_method("ofa")
class OFA(Distiller):
    """Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation",
    NeurIPS 2023. docs/methods.md §15.

    ``L = ce_weight·CE + kd_weight·ofa_loss(z_s, z_t, y; ε_last, T) + ofa_weight·Σ_i ofa_loss(proj_i(f_s,i), z_t,
    y; ε_i, T)`` over the distilled student ``stages`` (1-based; None = all of the student's stages, i.e. 1–4
    as official). ``eps``: one value for every branch and the logits, or one per distilled stage followed by
    the logits' value (OFAKD's ``--ofa-eps``). Defaults are OFAKD's (train.py): ε 1 (the paper's ImageNet
    CNN-student runs use 1.5), T 1, all weights 1. ``student_kind``: which projector family ("auto": token
    projector for timm ViT/DeiT/Swin/MLP-Mixer/ResMLP-style students, see :data:`TOKEN_MODULES`, else CNN).
    """

    tasks = frozenset({"classification"})
    heterogeneous = True
    citation = ("Hao et al., One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge "
                "Distillation, NeurIPS 2023 (docs/methods.md §15)")
    version = 1
    # every branch reads the student's stages; d_s and d_t come from both networks' pooled features
    requires_taps = {"student stages": ("student", "stages"), "student pooled": ("student", "pooled"),
                     "teacher pooled": ("teacher", "pooled")}

    def __init__(
        self,
        ctx,
        *,
        stages: tuple[int, ...] | None = None,
        eps: float | tuple[float, ...] = 1.0,
        temperature: float = 1.0,
        ofa_weight: float = 1.0,
        kd_weight: float = 1.0,
        ce_weight: float = 1.0,
        student_kind: Literal["auto", "cnn", "token"] = "auto",
    ):
        super().__init__(ctx)
        if student_kind not in ("auto", "cnn", "token"):
            raise ValueError(f"ofa: student_kind must be 'auto', 'cnn' or 'token', got {student_kind!r}")
        shapes = ctx.shapes("student", "stages")
        bad = [s for s in shapes if len(s) != 3]
        if not shapes or bad:
            raise ValueError(f"ofa: the student's stages must be C×H×W maps, got {bad or shapes}")
        n = len(shapes)
        chosen = tuple(range(1, n + 1)) if stages is None else tuple(int(i) for i in stages)
        if not chosen or len(set(chosen)) != len(chosen) or any(not 1 <= i <= n for i in chosen):
            raise ValueError(f"ofa: stages must be distinct stage numbers in 1..{n} (the student has {n} stages), "
                             f"got {stages!r}")
        eps_list = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
        if len(eps_list) == 1:
            eps_list = eps_list * (len(chosen) + 1)
        if len(eps_list) != len(chosen) + 1:
            raise ValueError(f"ofa: eps must be one value or {len(chosen) + 1} (one per distilled stage "
                             f"{list(chosen)}, then the logits'), got {len(eps_list)}")
        self.stages = chosen
        self.eps = tuple(eps_list)
        self.temperature = float(temperature)
        self.ofa_weight = float(ofa_weight)
        self.kd_weight = float(kd_weight)
        self.task_loss_weight = float(ce_weight)
        self.student_kind = student_kind_of(ctx.student_model) if student_kind == "auto" else student_kind

        d_s = int(ctx.shapes("student", "pooled")[0][0])
        d_t = int(ctx.shapes("teacher", "pooled")[0][0])
        k = int(ctx.num_classes)
        if self.student_kind == "token" and d_s % NUM_HEADS:
            raise ValueError(f"ofa: a token student's feature width ({d_s}) must be divisible by the projector's "
                             f"{NUM_HEADS} attention heads")
        branches = []
        for i in chosen:
            c, h, w = (int(v) for v in shapes[i - 1])
            if self.student_kind == "cnn":
                branches.append(cnn_projector(c, n - i, max(d_s, d_t), k))
            else:
                branches.append(TokenProjector(c, h, w, d_s, max(n - i, 1), k))
        self.projectors = nn.ModuleList(branches)
        self.projectors.apply(init_weights)

    def taps(self) -> Taps:
        return Taps(student=("stages",), teacher=())

    def forward(self, s: Outputs, t: Outputs, batch: Batch) -> dict[str, Tensor]:
        feats, y, z_t = s["stages"], batch.targets, t.logits.detach()
        branch = [ofa_loss(proj(feats[i - 1]), z_t, y, e, self.temperature)
                  for proj, i, e in zip(self.projectors, self.stages, self.eps)]
        return {
            "loss_kd": self.kd_weight * ofa_loss(s.logits, z_t, y, self.eps[-1], self.temperature),
            "loss_ofa": self.ofa_weight * torch.stack(branch).sum(),
        }
