"""FreeKD: Zhang et al., "FreeKD: Knowledge Distillation via Semantic Frequency Prompt", CVPR 2024.

Spec: METHODS.md §7 (the Haar DWT of §6 comes from :mod:`kdbench.freq`). Two variants (§7.3):

* ``variant="code"`` (FreeKD-C, default): the released code: prompt-masked L1 on the high DWT bands of
  ``φ(F^s)`` vs ``F^t`` (LL not distilled) + ``μ``·MSE(``φ(F^s)``, ``F^t``) (+ RegKD for detectors).
* ``variant="paper"`` (FreeKD-P): ``μ``·masked L1 weighted by the relational channel gates of §7.5.

Both need a stage 1 (§7.4): the mask tokens are tuned on the frozen teacher (prompted reconstruction
inserted into its forward, teacher task loss + dissimilarity) and then frozen for distillation.

Public pieces (AFP, METHODS.md §9, reuses them by import):

* band helpers: :func:`clamp_levels`, :func:`band_sets`, :func:`reconstruct_from_sets`, :func:`prompt_masks`;
* losses: :func:`masked_band_l1`, :func:`freekd_loss`, :func:`reg_kd_loss`;
* stage 1: :func:`prompted_reconstruction`, :func:`dice_dissimilarity`, :func:`jaccard_dissimilarity`,
  :func:`run_prompt_stage`, :class:`PromptSet`, :class:`PromptStageMixin`;
* FreeKD-P gates (§7.5): :func:`relational_attention`, :func:`renormalise_gates`, :func:`next_level_context`,
  :class:`ChannelGate`, :class:`RelationalGates`.

A "band set" is a ``N×C×O×h×w`` tensor: set 0 is ``LL_J`` (``O=1``), set ``j`` (1..J) stacks the
``(LH_j, HL_j, HH_j)`` bands of level ``j`` (``O=3``, level 1 finest). Its *guide* is the sum over ``O``
(``R_j`` of §7.2-4; ``LL_J`` itself for set 0).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.freq import haar_wavedec2d, haar_waverec2d
from kdbench.method import Batch, Distiller, Outputs, Taps, register_method

__all__ = [
    "clamp_levels",
    "band_sets",
    "reconstruct_from_sets",
    "prompt_masks",
    "masked_band_l1",
    "freekd_loss",
    "reg_kd_loss",
    "prompted_reconstruction",
    "dice_dissimilarity",
    "jaccard_dissimilarity",
    "DISSIMILARITIES",
    "relational_attention",
    "renormalise_gates",
    "next_level_context",
    "ChannelGate",
    "RelationalGates",
    "PromptSet",
    "run_prompt_stage",
    "PromptStageMixin",
    "resolve_tap",
    "spatial_tap_shapes",
    "pair_indices",
    "has_regression_taps",
    "FreeKD",
]


def fp32_region(device: torch.device):
    """A context with autocast off for ``device``'s type (no-op where autocast does not exist)."""
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None and not available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


# ------------------------------------------------------------------------------------------------
# bands, masks, losses
# ------------------------------------------------------------------------------------------------
def clamp_levels(levels: int, size: Sequence[int]) -> int:
    """``J = min(levels, ⌊log2(min(H, W))⌋)``: the DWT depth a ``H×W`` map allows (0 for a 1-pixel side)."""
    if int(levels) != levels or levels < 1:
        raise ValueError(f"levels must be a positive integer, got {levels!r}")
    m = int(min(size))
    if m < 1:
        raise ValueError(f"feature size must be positive, got {tuple(size)}")
    return min(int(levels), m.bit_length() - 1)


def band_sets(x: Tensor, levels: int) -> list[Tensor]:
    """``J``-level Haar decomposition (§6) as band sets: ``[LL_J (N,C,1,h,w), level 1 (N,C,3,h,w), ...]``."""
    ll, highs = haar_wavedec2d(x, levels)
    return [ll.unsqueeze(2)] + [torch.stack(level, dim=2) for level in highs]


def reconstruct_from_sets(sets: Sequence[Tensor], scales: Sequence[Tensor], size: Sequence[int]) -> Tensor:
    """IDWT of the band sets, each multiplied by its spatial scale map ``N×h×w`` (shared by the orientations)
    and cropped to ``size``: ``IDWT(LL·scale_0, {band_{j,o}·scale_j})`` (§7.2-7)."""
    if len(sets) != len(scales) or len(sets) < 2:
        raise ValueError(f"reconstruct_from_sets: need ≥2 band sets and one scale each, got {len(sets)}/{len(scales)}")
    scaled = [s * m[:, None, None] for s, m in zip(sets, scales)]
    highs = [tuple(s.unbind(dim=2)) for s in scaled[1:]]
    return haar_waverec2d(scaled[0][:, :, 0], highs, size=size)


def prompt_masks(prompt: Tensor, guide: Tensor) -> Tensor:
    """``M[n,τ,y,x] = sigmoid(Σ_c P[τ,c]·R[n,c,y,x])`` for tokens ``P (T,C)`` and a band ``R (N,C,h,w)``
    (§7.2-4: no scaling, no softmax). Returns ``N×T×h×w`` in fp32."""
    if prompt.dim() != 2 or guide.dim() != 4 or prompt.shape[1] != guide.shape[1]:
        raise ValueError(f"prompt_masks: tokens {tuple(prompt.shape)} do not fit band {tuple(guide.shape)}")
    with fp32_region(guide.device):
        return torch.sigmoid(torch.einsum("tc,nchw->nthw", prompt.float(), guide.float()))


def masked_band_l1(band_s: Tensor, band_t: Tensor, mask: Tensor, channel_weights: Tensor | None = None) -> Tensor:
    """``mean_{n,τ,c,o,y,x} ω[n,c]·|M[n,τ,y,x]·(S−T)[n,c,o,y,x]|`` (§7.2-5; ω of §7.5, 1 when None).

    ``band_s``/``band_t``: band sets ``N×C×O×h×w``; ``mask``: ``N×T×h×w`` (``T=1`` for an already combined
    mask), non-negative, so the token mean can be taken first: ``mean(M̄·|S−T|)`` with ``M̄ = mean_τ M``.
    """
    if band_s.shape != band_t.shape:
        raise ValueError(f"masked_band_l1: student band {tuple(band_s.shape)} != teacher {tuple(band_t.shape)}")
    if band_s.dim() == 4:
        band_s, band_t = band_s.unsqueeze(2), band_t.unsqueeze(2)
    n, c, _, h, w = band_s.shape
    if mask.dim() != 4 or mask.shape[0] != n or tuple(mask.shape[-2:]) != (h, w):
        raise ValueError(f"masked_band_l1: mask {tuple(mask.shape)} does not fit band {tuple(band_s.shape)}")
    with fp32_region(band_s.device):
        diff = (band_s.float() - band_t.float()).abs()
        if channel_weights is not None:
            if tuple(channel_weights.shape) != (n, c):
                raise ValueError(f"masked_band_l1: channel weights {tuple(channel_weights.shape)} != {(n, c)}")
            diff = diff * channel_weights.float()[:, :, None, None, None]
        return (diff * mask.float().mean(dim=1)[:, None, None]).mean()


def freekd_loss(
    feat_s: Tensor,
    feat_t: Tensor,
    prompts: Sequence[Tensor],
    levels: int,
    *,
    channel_weights: Tensor | None = None,
    low_prompt: Tensor | None = None,
) -> Tensor:
    """FreeKD masked frequency L1 for one feature map (§7.2-5), in fp32.

    ``feat_s`` = ``φ(F^s)`` and ``feat_t`` = ``F^t`` (same ``N×C×H×W``); ``prompts``: one ``(T, C)`` token
    tensor per DWT level ``j = 1..levels``. With ``R_j = LH_j+HL_j+HH_j`` of the teacher and
    ``M_j = sigmoid(P_j·R_j)`` (shared by the three orientations)::

        L = Σ_j mean_{n,τ,c,o,y,x} |M_j·(S_{j,o} − T_{j,o})|

    ``LL_J`` is not distilled unless ``low_prompt`` (the set-0 tokens) is given, which adds the same term
    for ``LL_J`` with ``M_0 = sigmoid(P_0·LL_J)`` (FreeKD-P ``include_low``). ``channel_weights`` (``N×C``)
    are the §7.5 gates ω^(r) (FreeKD-P).
    """
    if feat_s.shape != feat_t.shape or feat_s.dim() != 4:
        raise ValueError(f"freekd_loss: student {tuple(feat_s.shape)} and teacher {tuple(feat_t.shape)} must be "
                         "equal N×C×H×W")
    if len(prompts) != levels:
        raise ValueError(f"freekd_loss: {len(prompts)} prompt sets for {levels} levels")
    sets_s, sets_t = band_sets(feat_s, levels), band_sets(feat_t, levels)
    total = feat_s.new_zeros((), dtype=torch.float32)
    for j in range(1, levels + 1):
        mask = prompt_masks(prompts[j - 1], sets_t[j].sum(dim=2))
        total = total + masked_band_l1(sets_s[j], sets_t[j], mask, channel_weights)
    if low_prompt is not None:
        mask = prompt_masks(low_prompt, sets_t[0][:, :, 0])
        total = total + masked_band_l1(sets_s[0], sets_t[0], mask, channel_weights)
    return total


def reg_kd_loss(regs_s: Sequence[Tensor], regs_t: Sequence[Tensor]) -> Tensor:
    """Detector regression KD (§7.1/§7.2-6): SmoothL1 (β=1, mean) per head output, summed over the outputs
    (one per FPN level), fp32."""
    if len(regs_s) != len(regs_t) or not regs_s:
        raise ValueError(f"reg_kd_loss: {len(regs_s)} student vs {len(regs_t)} teacher regression outputs")
    return sum(F.smooth_l1_loss(s.float(), t.float(), beta=1.0) for s, t in zip(regs_s, regs_t))


# ------------------------------------------------------------------------------------------------
# stage 1: prompted reconstruction and dissimilarities
# ------------------------------------------------------------------------------------------------
def _pairwise_offdiag_mean(values: Tensor) -> Tensor:
    """Mean of an ``N×T×T`` tensor over n and the ordered pairs i≠j (0 when T=1)."""
    t = values.shape[1]
    if t < 2:
        return values.new_zeros(())
    off = ~torch.eye(t, dtype=torch.bool, device=values.device)
    return values[:, off].mean()


def dice_dissimilarity(masks: Tensor, eps: float = 1e-12) -> Tensor:
    """Soft-Dice overlap of the token masks (§7.2-7, the code's ``dice_coeff``): for masks ``N×T×h×w``,
    ``mean_{n, i≠j} 2⟨m_i,m_j⟩ / (‖m_i‖²+‖m_j‖²)`` (``eps`` added to each squared norm). 0 when T=1."""
    m = masks.float().flatten(2)
    inner = m @ m.transpose(1, 2)  # N×T×T
    sq = (m * m).sum(-1) + eps
    return _pairwise_offdiag_mean(2.0 * inner / (sq[:, :, None] + sq[:, None, :]))


def jaccard_dissimilarity(masks: Tensor, eps: float = 1e-12) -> Tensor:
    """Soft Jaccard overlap (paper, §7.1/§7.4 [INTERP]): ``mean_{n, i≠j} Σ min(m_i,m_j) / Σ max(m_i,m_j)``.
    Same pair normalisation as the Dice version (the paper's i=j terms are the constant 1). 0 when T=1."""
    m = masks.float().flatten(2)
    a, b = m[:, :, None], m[:, None, :]
    return _pairwise_offdiag_mean(torch.minimum(a, b).sum(-1) / (torch.maximum(a, b).sum(-1) + eps))


DISSIMILARITIES: dict[str, Callable[[Tensor], Tensor]] = {"dice": dice_dissimilarity, "jaccard": jaccard_dissimilarity}


def prompted_reconstruction(feat: Tensor, prompts: Sequence[Tensor], levels: int) -> tuple[Tensor, list[Tensor]]:
    """FreeKD's prompted teacher feature (§7.2-7)::

        F̂ = IDWT( LL_J·Σ_τ σ(P_0·LL_J)_τ , {band_{j,o}·Σ_τ σ(P_j·R_j)_τ} )

    ``prompts``: ``levels + 1`` token tensors ``(T, C)``, set 0 for ``LL_J``. Returns ``(F̂ (N×C×H×W, fp32),
    [the N×T×h×w masks of sets 0..J])``; the masks feed the dissimilarity loss.
    """
    if len(prompts) != levels + 1:
        raise ValueError(f"prompted_reconstruction: need {levels + 1} prompt sets (LL + {levels} levels), "
                         f"got {len(prompts)}")
    sets = band_sets(feat, levels)
    masks = [prompt_masks(p, s.sum(dim=2)) for p, s in zip(prompts, sets)]
    return reconstruct_from_sets(sets, [m.sum(dim=1) for m in masks], feat.shape[-2:]), masks


class PromptSet(nn.Module):
    """The mask tokens of one distilled feature map (§7.2-3): ``tokens`` is ``(J+1)×T×C``, init N(0, 0.01²);
    set 0 is for ``LL_J``, set ``j`` for the high bands of level ``j``.

    Subclasses may weight the tokens per sample (AFP) by overriding :meth:`token_mix`; the base class
    mixes them uniformly (sum in the reconstruction, mean in the loss, as the code).
    """

    def __init__(self, channels: int, num_tokens: int = 2, levels: int = 3, init_std: float = 0.01):
        super().__init__()
        if num_tokens < 1 or levels < 1 or channels < 1:
            raise ValueError(f"PromptSet: need channels, num_tokens, levels ≥ 1, got "
                             f"{channels}, {num_tokens}, {levels}")
        self.channels, self.num_tokens, self.levels = int(channels), int(num_tokens), int(levels)
        self.tokens = nn.Parameter(torch.randn(self.levels + 1, self.num_tokens, self.channels) * init_std)

    @property
    def low_prompt(self) -> Tensor:
        """The ``LL_J`` tokens (set 0), ``T×C``."""
        return self.tokens[0]

    def level_prompts(self) -> list[Tensor]:
        """The high-band tokens of levels 1..J, each ``T×C``."""
        return [self.tokens[j] for j in range(1, self.levels + 1)]

    def token_mix(self, k: int, guide: Tensor) -> Tensor | None:
        """Per-sample token weights ``N×T`` for set ``k`` (summing to 1), or None for the uniform mix."""
        return None

    def _masks(self, sets: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor | None]]:
        guides = [s.sum(dim=2) for s in sets]
        masks = [prompt_masks(self.tokens[k], g) for k, g in enumerate(guides)]
        return masks, [self.token_mix(k, g) for k, g in enumerate(guides)]

    def reconstruct(self, feat: Tensor, dissimilarity: str = "dice") -> tuple[Tensor, Tensor]:
        """Stage 1 (§7.4): ``(F̂, L_dis)``. ``F̂`` scales each band set by ``Σ_τ mix_τ·σ(M_τ)`` (``mix ≡ 1``
        for FreeKD, giving :func:`prompted_reconstruction`); ``L_dis`` sums the dissimilarity over the J+1 sets."""
        with fp32_region(feat.device):
            sets = band_sets(feat.float(), self.levels)
            masks, mixes = self._masks(sets)
            scales = [m.sum(dim=1) if p is None else (m * p[:, :, None, None]).sum(dim=1) for m, p in zip(masks, mixes)]
            f_hat = reconstruct_from_sets(sets, scales, feat.shape[-2:])
            dis = sum(DISSIMILARITIES[dissimilarity](m) for m in masks)
        return f_hat, dis

    def band_loss(
        self, feat_s: Tensor, feat_t: Tensor, channel_weights: Tensor | None = None, include_low: bool = False
    ) -> Tensor:
        """Stage 2: ``Σ_k masked_band_l1`` over the high sets (and ``LL_J`` with ``include_low``), masks from
        the teacher bands mixed by :meth:`token_mix` (uniform: identical to :func:`freekd_loss`)."""
        if feat_s.shape != feat_t.shape:
            raise ValueError(f"band_loss: student {tuple(feat_s.shape)} != teacher {tuple(feat_t.shape)}")
        with fp32_region(feat_t.device):
            sets_s, sets_t = band_sets(feat_s.float(), self.levels), band_sets(feat_t.float(), self.levels)
            masks, mixes = self._masks(sets_t)
            total = feat_s.new_zeros((), dtype=torch.float32)
            for k in range(0 if include_low else 1, self.levels + 1):
                m = masks[k] if mixes[k] is None else (masks[k] * mixes[k][:, :, None, None]).sum(1, keepdim=True)
                total = total + masked_band_l1(sets_s[k], sets_t[k], m, channel_weights)
        return total


# ------------------------------------------------------------------------------------------------
# FreeKD-P relational gates (§7.5)
# ------------------------------------------------------------------------------------------------
def relational_attention(feat: Tensor, context: Tensor) -> Tensor:
    """``A_n = softmax_rowwise(ψ(F)_n F_nᵀ)`` (contraction over HW, no 1/√d): ``N×C×C`` in fp32.
    ``feat`` = F and ``context`` = ψ(F), both ``N×C×H×W``."""
    if feat.shape != context.shape:
        raise ValueError(f"relational_attention: F {tuple(feat.shape)} and ψ(F) {tuple(context.shape)} differ")
    with fp32_region(feat.device):
        f, p = feat.float().flatten(2), context.float().flatten(2)
        return torch.softmax(p @ f.transpose(1, 2), dim=-1)


def renormalise_gates(weights: Tensor, eps: float = 1e-12) -> Tensor:
    """Rescale ``N×C`` gates to mean 1 over channels per sample (§7.5, against collapse to 0)."""
    return weights / (weights.mean(dim=1, keepdim=True) + eps)


def next_level_context(feats: Sequence[Tensor]) -> list[Tensor]:
    """ψ(F_l) for each map of a shallow→deep list (§7.5): the next (coarser) map bilinearly resized to F_l's
    size when it has the same channels (FPN); otherwise, and for the last map, F_l itself."""
    out = []
    for i, f in enumerate(feats):
        nxt = feats[i + 1] if i + 1 < len(feats) else None
        if nxt is not None and nxt.shape[1] == f.shape[1]:
            out.append(F.interpolate(nxt.float(), size=f.shape[-2:], mode="bilinear", align_corners=False))
        else:
            out.append(f)
    return out


class ChannelGate(nn.Module):
    """The MLP gate G of §7.5 on every row of A: ``ω_i = σ(w2·ReLU(W1·A_i + b1) + b2)``, hidden
    ``D = max(C/16, 8)``. ``N×C×C -> N×C``."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(int(channels) // 16, 8)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, attn: Tensor) -> Tensor:
        return torch.sigmoid(self.mlp(attn)).squeeze(-1)


class RelationalGates(nn.Module):
    """``ω^(r) = renorm(G_t(A(F^t)) ⊙ G_s(A(φ(F^s))))`` (§7.5): separate teacher and student gates,
    trained with the student; the product is renormalised to mean 1 over channels per sample."""

    def __init__(self, channels: int):
        super().__init__()
        self.teacher_gate = ChannelGate(channels)
        self.student_gate = ChannelGate(channels)

    def forward(self, feat_s: Tensor, feat_t: Tensor, context_s: Tensor, context_t: Tensor) -> Tensor:
        with fp32_region(feat_s.device):
            w_t = self.teacher_gate(relational_attention(feat_t, context_t))
            w_s = self.student_gate(relational_attention(feat_s, context_s))
            return renormalise_gates(w_t * w_s)


# ------------------------------------------------------------------------------------------------
# stage 1 driver
# ------------------------------------------------------------------------------------------------
def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def run_prompt_stage(
    teacher: nn.Module,
    loader,
    device: torch.device,
    tap: str,
    targets: Sequence[tuple[int, PromptSet]],
    *,
    task_loss: Callable[[Any, Any], Tensor],
    iters: int,
    lr: float,
    optimizer: str = "adam",
    dissimilarity: str = "dice",
    dis_weight: float = 1.0,
) -> list[float]:
    """Stage 1 (§7.4): train the prompt sets in place on a frozen teacher; returns the objective per step.

    For every ``(i, prompt_set)`` the i-th map ``F`` of the teacher's ``tap`` is replaced in its forward by
    ``prompt_set.reconstruct(F)[0]`` (through :func:`kdbench.models.tap.edit_tap`, so token and channels-last
    networks work too). Each step: ``L = task_loss(teacher(x), y) + dis_weight·Σ L_dis``, on the
    loader cycled for ``iters`` steps; only the prompt sets' parameters are optimised (Adam, or SGD with
    momentum 0.9). The teacher runs in eval mode with its parameters frozen; its mode, ``requires_grad`` flags
    and weights are restored/untouched, and the hooks are removed, whatever happens.
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"stage optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if dissimilarity not in DISSIMILARITIES:
        raise ValueError(f"dissimilarity must be one of {sorted(DISSIMILARITIES)}, got {dissimilarity!r}")
    if task_loss is None:
        raise RuntimeError("stage 1 needs the teacher's task loss (Context.task_loss) and none was given")
    params = [p for _, ps in targets for p in ps.parameters() if p.requires_grad]
    history: list[float] = []
    if iters <= 0 or not params:
        return history
    opt = (torch.optim.Adam(params, lr=lr) if optimizer == "adam"
           else torch.optim.SGD(params, lr=lr, momentum=0.9))

    dis_terms: list[Tensor] = []

    by_index = dict(targets)

    def insert(i: int, out: Tensor) -> Tensor:
        ps = by_index.get(i)
        if ps is None:
            return out
        if not isinstance(out, Tensor) or out.dim() != 4:
            raise TypeError(f"prompt insertion needs an N×C×H×W tensor, got {type(out).__name__}")
        f_hat, dis = ps.reconstruct(out, dissimilarity)
        dis_terms.append(dis)
        return f_hat.to(out.dtype)

    was_training = teacher.training
    stack = contextlib.ExitStack()
    flags = [(p, p.requires_grad) for p in teacher.parameters()]
    from kdbench.models.tap import edit_tap

    try:
        teacher.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        stack.enter_context(edit_tap(teacher, tap, insert))
        batches = iter(loader)
        for _ in range(int(iters)):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                try:
                    x, y = next(batches)
                except StopIteration:
                    raise ValueError("stage 1: the loader yields no batches") from None
            x, y = _to_device(x, device), _to_device(y, device)
            dis_terms.clear()
            out = teacher(x)
            if len(dis_terms) != len(targets):
                raise RuntimeError(f"stage 1: {len(dis_terms)} of {len(targets)} prompt insertion hooks fired; the "
                                   "tap modules are not on the teacher's forward path")
            loss = task_loss(out, y).float() + dis_weight * sum(dis_terms)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"stage 1: non-finite objective {loss.item()} at step {len(history)}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
    finally:
        stack.close()
        for p, flag in flags:
            p.requires_grad_(flag)
        teacher.train(was_training)
    return history


class PromptStageMixin:
    """The stage hooks of the Distiller contract for prompt-based methods (FreeKD, AFP).

    The class sets, in ``__init__``: ``self.prompts`` (an ``nn.ModuleDict`` of frozen :class:`PromptSet`,
    built by ``self._build_prompts()``), ``self._prompt_tap`` (teacher tap), ``self._prompt_index`` (key ->
    index into the teacher's tap list) and ``self._stage`` (plain hyperparameters of the stage).
    ``_build_prompts`` seeds its own RNG with ``stage_seed``, so the initial tokens depend only on the stage
    config.
    """

    def _build_prompts(self) -> nn.ModuleDict:  # pragma: no cover - implemented by the methods
        raise NotImplementedError

    def _seeded_prompts(self) -> nn.ModuleDict:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self._stage["seed"]))
            prompts = self._build_prompts()
        return prompts

    def stage_config(self) -> dict:
        return {
            "kind": "frequency_prompts",
            "prompt_set": type(next(iter(self.prompts.values()))).__name__,
            "tap": self._prompt_tap,
            "teacher_indices": {k: self._prompt_index[k] for k in self.prompts},
            "channels": {k: ps.channels for k, ps in self.prompts.items()},
            "levels": {k: ps.levels for k, ps in self.prompts.items()},
            "num_tokens": next(iter(self.prompts.values())).num_tokens,
            **self._stage,
        }

    def run_stage(self, teacher: nn.Module, loader, device) -> dict[str, Tensor]:
        """Train fresh (seeded) prompt sets on the frozen teacher; returns their state dict (CPU)."""
        device = torch.device(device)
        prompts = self._seeded_prompts().to(device)
        prompts.requires_grad_(True)
        n_maps = len(teacher.tap_modules(self._prompt_tap))
        if any(i >= n_maps for i in self._prompt_index.values()):
            raise ValueError(f"teacher.tap_modules({self._prompt_tap!r}) gave {n_maps} modules; the prompts need "
                             f"indices {sorted(self._prompt_index.values())} of the tap's maps")
        targets = [(self._prompt_index[k], ps) for k, ps in prompts.items()]
        self.stage_log = run_prompt_stage(
            teacher, loader, device, self._prompt_tap, targets, task_loss=self.ctx.task_loss, iters=self._stage["iters"],
            lr=self._stage["lr"], optimizer=self._stage["optimizer"], dissimilarity=self._stage["dissimilarity"],
            dis_weight=self._stage["dis_weight"],
        )
        return {k: v.detach().cpu() for k, v in prompts.state_dict().items()}

    def load_stage(self, state: dict[str, Tensor]) -> None:
        """Load the stage-1 prompts (strict) and freeze them."""
        self.prompts.load_state_dict(state, strict=True)
        self.prompts.requires_grad_(False)
        self._stage_loaded = True

    def _check_stage(self) -> None:
        if not getattr(self, "_stage_loaded", False):
            name = getattr(type(self), "registry_name", type(self).__name__)
            raise RuntimeError(f"{name}: the stage-1 prompts were never loaded; call run_stage and load_stage "
                               "(the runner does) before distilling")


def resolve_tap(task: str, tap: str, default: dict[str, tuple[str, bool]]) -> tuple[str, bool]:
    """``tap="auto"`` -> the per-task default ``(tap, last_only)``; an explicit tap distils all its maps."""
    if tap == "auto":
        if task not in default:
            raise ValueError(f"tap='auto' has no default for task {task!r}; name a tap")
        return default[task]
    return tap, False


def spatial_tap_shapes(ctx, side: str, tap: str, name: str) -> list[tuple[int, int, int]]:
    """The ``(C, H, W)`` shapes of a tap from ``ctx``; an error naming ``name`` if any map is not spatial."""
    shapes = ctx.shapes(side, tap)
    if not shapes or any(len(s) != 3 for s in shapes):
        raise ValueError(f"{name}: tap {tap!r} of the {side} must give N×C×H×W maps, got shapes {shapes}")
    return [tuple(int(v) for v in s) for s in shapes]


def pair_indices(n_s: int, n_t: int, last_only: bool) -> tuple[list[int], list[int]]:
    """Deepest-aligned pairing of two tap lists (the last ``min(n_s, n_t)`` of each, or only the last)."""
    k = 1 if last_only else min(n_s, n_t)
    return list(range(n_s - k, n_s)), list(range(n_t - k, n_t))


def has_regression_taps(ctx, use: bool) -> bool:
    """True when both networks expose a ``"reg"`` tap (detection head regression outputs)."""
    if not use or ctx.task != "detection":
        return False
    try:
        return bool(ctx.shapes("student", "reg")) and bool(ctx.shapes("teacher", "reg"))
    except (KeyError, ValueError, RuntimeError, NotImplementedError, TypeError):
        return False


def _resize_to(x: Tensor, ref: Tensor) -> Tensor:
    return x if x.shape[-2:] == ref.shape[-2:] else F.interpolate(x, size=ref.shape[-2:], mode="bilinear",
                                                                  align_corners=False)


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------
_FREEKD_TAPS = {"detection": ("fpn", False), "segmentation": ("stages", True), "classification": ("final", False)}
_FREEKD_MU = {"detection": 5.0, "segmentation": 5.0, "classification": 1.0}


@register_method("freekd")
class FreeKD(PromptStageMixin, Distiller):
    """Zhang et al., "FreeKD: Knowledge Distillation via Semantic Frequency Prompt", CVPR 2024. METHODS.md §7.

    Per distilled map ``l``: ``S_l = φ_l(F^s_l)`` (1×1 conv with bias, bilinearly resized to the teacher's
    size if needed), masks from frozen stage-1 prompts on the teacher's bands (one :class:`PromptSet` per map,
    ``J_l = min(levels, ⌊log2(min(H,W))⌋)``; maps with ``J_l = 0`` only get the MSE term).

    * ``variant="code"`` (§7.3 FreeKD-C): ``loss_freekd = mask_weight·Σ_l freekd_loss`` and
      ``loss_mse = mse_weight·Σ_l MSE(S_l, F^t_l)``.
    * ``variant="paper"`` (§7.3 FreeKD-P): ``loss_freekd = mse_weight·Σ_l freekd_loss(..., ω^(r)_l)`` with the
      §7.5 gates (μ is the paper's weight of the masked loss; ``mask_weight`` is not used), ``LL_J`` added with
      ``include_low``.
    * Detection with a ``"reg"`` tap on both networks: ``loss_reg = reg_weight·reg_kd_loss`` (else skipped).

    Taps (``tap="auto"``): detection ``"fpn"`` (all levels); classification ``"final"``; segmentation the last
    entry of ``"stages"`` (``backbone.layer4``, §7.3 [INTERP]). An explicit tap distils all its maps, paired
    deepest-aligned. ``mse_weight=None`` means μ per task: detection 5 (RetinaNet), segmentation 5,
    classification 1 (suites set the detector's value: Faster R-CNN 1, FCOS/RepPoints 10). ``num_tokens=2``
    is the paper's T (the release uses 6).

    Stage 1 (§7.4): ``stage_iters`` steps of Adam (``stage_optimizer="sgd"``: momentum 0.9) at ``stage_lr`` on
    the tokens only, objective ``L_task(teacher with F̂) + dis_weight·L_dis`` (``dissimilarity`` "dice" as the
    code or "jaccard" as the paper), tokens initialised from ``stage_seed``.
    """

    tasks = frozenset({"classification", "detection", "segmentation"})
    heterogeneous = False
    #: the constructor params that determine the stage-1 prompts (the harness runs the stage once per value)
    stage_params = ("num_tokens", "levels", "tap", "stage_iters", "stage_lr", "stage_optimizer", "stage_seed",
                    "dissimilarity", "dis_weight")
    citation = "Zhang et al., FreeKD: Knowledge Distillation via Semantic Frequency Prompt, CVPR 2024 (METHODS.md §7)"
    version = 1

    def __init__(
        self,
        ctx,
        *,
        variant: str = "code",
        mask_weight: float = 1.0,
        mse_weight: float | None = None,
        reg_weight: float = 1.0,
        num_tokens: int = 2,
        levels: int = 3,
        tap: str = "auto",
        include_low: bool = False,
        stage_iters: int = 2000,
        stage_lr: float = 1e-3,
        stage_optimizer: str = "adam",
        stage_seed: int = 0,
        dissimilarity: str = "dice",
        dis_weight: float = 1.0,
    ):
        super().__init__(ctx)
        if variant not in ("code", "paper"):
            raise ValueError(f"freekd: variant must be 'code' or 'paper', got {variant!r}")
        if dissimilarity not in DISSIMILARITIES:
            raise ValueError(f"freekd: dissimilarity must be one of {sorted(DISSIMILARITIES)}, got {dissimilarity!r}")
        if stage_optimizer not in ("adam", "sgd"):
            raise ValueError(f"freekd: stage_optimizer must be 'adam' or 'sgd', got {stage_optimizer!r}")
        if int(num_tokens) != num_tokens or num_tokens < 1:
            raise ValueError(f"freekd: num_tokens must be a positive integer, got {num_tokens!r}")
        if include_low and variant != "paper":
            raise ValueError("freekd: include_low is an option of variant='paper' (the code never distils LL)")
        self.variant = variant
        self.mask_weight = float(mask_weight)
        self.mu = float(_FREEKD_MU.get(ctx.task, 1.0) if mse_weight is None else mse_weight)
        self.mse_weight = self.mu  # the resolved value, under the parameter's own name (recorded)
        self.reg_weight = float(reg_weight)
        self.include_low = bool(include_low)
        self.tap, self.last_only = resolve_tap(ctx.task, tap, _FREEKD_TAPS)

        s_shapes = spatial_tap_shapes(ctx, "student", self.tap, "freekd")
        t_shapes = spatial_tap_shapes(ctx, "teacher", self.tap, "freekd")
        self.s_index, self.t_index = pair_indices(len(s_shapes), len(t_shapes), self.last_only)
        s_sel, t_sel = [s_shapes[i] for i in self.s_index], [t_shapes[i] for i in self.t_index]
        self.t_channels = [sh[0] for sh in t_sel]
        self.map_levels = [clamp_levels(levels, sh[1:]) for sh in t_sel]
        if not any(self.map_levels):
            raise ValueError(f"freekd: no teacher map of tap {self.tap!r} is large enough for a DWT level "
                             f"(shapes {t_sel})")
        self.phi = nn.ModuleList(nn.Conv2d(s[0], t[0], kernel_size=1, bias=True) for s, t in zip(s_sel, t_sel))
        self.use_reg = has_regression_taps(ctx, self.reg_weight != 0.0)

        self.num_tokens = int(num_tokens)
        self._prompt_tap = self.tap
        self._prompt_index = {str(i): self.t_index[i] for i, j in enumerate(self.map_levels) if j > 0}
        self.gates = (nn.ModuleDict({k: RelationalGates(self.t_channels[int(k)]) for k in self._prompt_index})
                      if variant == "paper" else None)
        self._stage = {"iters": int(stage_iters), "lr": float(stage_lr), "optimizer": stage_optimizer,
                       "dissimilarity": dissimilarity, "dis_weight": float(dis_weight), "seed": int(stage_seed)}
        self.prompts = self._seeded_prompts()
        self.prompts.requires_grad_(False)

    def _build_prompts(self) -> nn.ModuleDict:
        return nn.ModuleDict({k: PromptSet(self.t_channels[int(k)], self.num_tokens, self.map_levels[int(k)])
                              for k in self._prompt_index})

    def taps(self) -> Taps:
        extra = ("reg",) if self.use_reg else ()
        return Taps(student=(self.tap,) + extra, teacher=(self.tap,) + extra)

    def forward(self, s: Outputs, t: Outputs, batch: Batch) -> dict[str, Tensor]:
        self._check_stage()
        feats_s, feats_t = s[self.tap], t[self.tap]
        ft = [feats_t[i].detach().float() for i in self.t_index]
        proj = [_resize_to(phi(feats_s[i]).float(), f) for phi, i, f in zip(self.phi, self.s_index, ft)]
        out: dict[str, Tensor] = {}
        if self.variant == "code":
            mask = sum(freekd_loss(proj[int(k)], ft[int(k)], ps.level_prompts(), ps.levels)
                       for k, ps in self.prompts.items())
            out["loss_freekd"] = self.mask_weight * mask
            out["loss_mse"] = self.mu * sum(F.mse_loss(p, f) for p, f in zip(proj, ft))
        else:
            ctx_s, ctx_t = next_level_context(proj), next_level_context(ft)
            total = proj[0].new_zeros((), dtype=torch.float32)
            for k, ps in self.prompts.items():
                i = int(k)
                w = self.gates[k](proj[i], ft[i], ctx_s[i], ctx_t[i])
                total = total + freekd_loss(proj[i], ft[i], ps.level_prompts(), ps.levels, channel_weights=w,
                                            low_prompt=ps.low_prompt if self.include_low else None)
            out["loss_freekd"] = self.mu * total
        if self.use_reg:
            out["loss_reg"] = self.reg_weight * reg_kd_loss(s["reg"], [r.detach() for r in t["reg"]])
        return out
