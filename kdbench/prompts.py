"""Frequency prompts: the machinery that FreeKD (docs/methods.md §7) and AFP (§9) share.

* bands and masks: :func:`clamp_levels`, :func:`band_sets`, :func:`reconstruct_from_sets`, :func:`prompt_masks`;
* the masked frequency loss: :func:`masked_band_l1`, :func:`freekd_loss` (§7.2-5);
* stage 1 (§7.4): :func:`prompted_reconstruction`, the dissimilarities :func:`dice_dissimilarity` and
  :func:`jaccard_dissimilarity`, :class:`PromptSet`, the stage loop :func:`run_prompt_stage`;
* the relational channel gates of §7.5: :func:`relational_attention`, :func:`renormalise_gates`,
  :func:`next_level_context`, :class:`ChannelGate`, :class:`RelationalGates`;
* :class:`PromptDistiller`, the base of the two methods: tap, pairing, one frozen :class:`PromptSet` per
  distilled teacher map, regression KD for detectors and the stage hooks of the method contract.

A "band set" is a ``N×C×O×h×w`` tensor: set 0 is ``LL_J`` (``O=1``), set ``j`` (1..J) stacks the
``(LH_j, HL_j, HH_j)`` bands of level ``j`` (``O=3``, level 1 finest). Its *guide* is the sum over ``O``
(``R_j`` of §7.2-4; ``LL_J`` itself for set 0). Everything here computes in fp32 with autocast off.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.featuremap import has_regression_taps, map_shapes, pair_levels, reg_kd_loss, resolve_tap
from kdbench.freq import autocast_disabled, haar_wavedec2d, haar_waverec2d
from kdbench.method import Batch, Context, Distiller, Outputs, Taps

TokenMix = Callable[[int, Tensor], "Tensor | None"]


# ------------------------------------------------------------------------------------------------
# bands, masks, losses
# ------------------------------------------------------------------------------------------------
def check_levels(levels: int) -> int:
    """``levels`` as an int; a ValueError unless it is a positive integer."""
    if int(levels) != levels or levels < 1:
        raise ValueError(f"levels must be a positive integer, got {levels!r}")
    return int(levels)


def clamp_levels(levels: int, size: Sequence[int]) -> int:
    """``J = min(levels, ⌊log2(min(H, W))⌋)``: the DWT depth a ``H×W`` map allows (0 for a 1-pixel side)."""
    levels = check_levels(levels)
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
    with autocast_disabled(guide.device):
        return torch.sigmoid(torch.einsum("tc,nchw->nthw", prompt.float(), guide.float()))


def _mixed(masks: Tensor, mix: Tensor | None, reduce: str) -> Tensor:
    """The token masks ``N×T×h×w`` of a set as one map: ``Σ_τ π_τ·M_τ`` (``N×1×h×w``) with per-sample weights
    ``mix`` (``N×T``); without, unchanged for ``reduce="none"`` or summed over τ (``N×h×w``) for ``"sum"``."""
    if mix is not None:
        mixed = masks * mix[:, :, None, None]
        return mixed.sum(dim=1, keepdim=True) if reduce == "none" else mixed.sum(dim=1)
    return masks if reduce == "none" else masks.sum(dim=1)


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
    with autocast_disabled(band_s.device):
        diff = (band_s.float() - band_t.float()).abs()
        if channel_weights is not None:
            if tuple(channel_weights.shape) != (n, c):
                raise ValueError(f"masked_band_l1: channel weights {tuple(channel_weights.shape)} != {(n, c)}")
            diff = diff * channel_weights.float()[:, :, None, None, None]
        return (diff * mask.float().mean(dim=1)[:, None, None]).mean()


def freekd_loss(feat_s: Tensor, feat_t: Tensor, prompts: Sequence[Tensor], levels: int, *,
                channel_weights: Tensor | None = None, low_prompt: Tensor | None = None,
                token_mix: TokenMix | None = None) -> Tensor:
    """FreeKD's masked frequency L1 for one feature map (§7.2-5), in fp32.

    ``feat_s`` = ``φ(F^s)`` and ``feat_t`` = ``F^t`` (same ``N×C×H×W``); ``prompts``: one ``(T, C)`` token
    tensor per DWT level ``j = 1..levels``. With ``R_j = LH_j+HL_j+HH_j`` of the teacher and
    ``M_j = sigmoid(P_j·R_j)`` (shared by the three orientations)::

        L = Σ_j mean_{n,τ,c,o,y,x} |M_j·(S_{j,o} − T_{j,o})|

    ``LL_J`` is not distilled unless ``low_prompt`` (the set-0 tokens) is given, which adds the same term
    for ``LL_J`` with ``M_0 = sigmoid(P_0·LL_J)`` (FreeKD-P ``include_low``, AFP). ``channel_weights``
    (``N×C``) are the §7.5 gates ω^(r). ``token_mix(k, R_k)`` may give per-sample token weights ``N×T`` for set
    ``k`` (AFP): the mask is then ``Σ_τ π_τ M_τ`` instead of the token mean.
    """
    if feat_s.shape != feat_t.shape or feat_s.dim() != 4:
        raise ValueError(f"freekd_loss: student {tuple(feat_s.shape)} and teacher {tuple(feat_t.shape)} must be "
                         "equal N×C×H×W")
    if len(prompts) != levels:
        raise ValueError(f"freekd_loss: {len(prompts)} prompt sets for {levels} levels")
    with autocast_disabled(feat_t.device):
        sets_s, sets_t = band_sets(feat_s, levels), band_sets(feat_t, levels)
        tokens = [(0, low_prompt)] if low_prompt is not None else []
        total = feat_s.new_zeros((), dtype=torch.float32)
        for k, prompt in tokens + list(enumerate(prompts, start=1)):
            guide = sets_t[k].sum(dim=2)
            mix = token_mix(k, guide) if token_mix is not None else None
            mask = _mixed(prompt_masks(prompt, guide), mix, "none")
            total = total + masked_band_l1(sets_s[k], sets_t[k], mask, channel_weights)
    return total


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
    """Soft-Jaccard overlap of the token masks (paper, §7.1/§7.4; soft form ``Σmin/Σmax`` [INTERP]): for masks
    ``N×T×h×w``, ``mean_n (1/T²) Σ_i Σ_j Σ min(m_i,m_j) / Σ max(m_i,m_j)`` over **all** ordered pairs, the
    diagonal included as the definition writes it (``eps`` added to the denominator). 1 for a single token."""
    m = masks.float().flatten(2)
    a, b = m[:, :, None], m[:, None, :]
    return (torch.minimum(a, b).sum(-1) / (torch.maximum(a, b).sum(-1) + eps)).mean()


DISSIMILARITIES: dict[str, Callable[[Tensor], Tensor]] = {"dice": dice_dissimilarity, "jaccard": jaccard_dissimilarity}


def prompted_reconstruction(feat: Tensor, prompts: Sequence[Tensor], levels: int, token_mix: TokenMix | None = None
                            ) -> tuple[Tensor, list[Tensor]]:
    """FreeKD's prompted teacher feature (§7.2-7)::

        F̂ = IDWT( LL_J·Σ_τ σ(P_0·LL_J)_τ , {band_{j,o}·Σ_τ σ(P_j·R_j)_τ} )

    ``prompts``: ``levels + 1`` token tensors ``(T, C)``, set 0 for ``LL_J``; with ``token_mix`` (AFP) each
    ``Σ_τ`` is weighted by ``π_τ`` per sample. Returns ``(F̂ (N×C×H×W, fp32), [the N×T×h×w masks of sets
    0..J])``; the masks feed the dissimilarity loss.
    """
    if len(prompts) != levels + 1:
        raise ValueError(f"prompted_reconstruction: need {levels + 1} prompt sets (LL + {levels} levels), "
                         f"got {len(prompts)}")
    with autocast_disabled(feat.device):
        sets = band_sets(feat, levels)
        guides = [s.sum(dim=2) for s in sets]
        masks = [prompt_masks(p, g) for p, g in zip(prompts, guides)]
        scales = [_mixed(m, token_mix(k, g) if token_mix is not None else None, "sum")
                  for k, (m, g) in enumerate(zip(masks, guides))]
        return reconstruct_from_sets(sets, scales, feat.shape[-2:]), masks


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

    def reconstruct(self, feat: Tensor, dissimilarity: str = "dice") -> tuple[Tensor, Tensor]:
        """Stage 1 (§7.4): ``(F̂, L_dis)``: :func:`prompted_reconstruction` with these tokens (and mix), and the
        dissimilarity of each set's token masks summed over the J+1 sets."""
        f_hat, masks = prompted_reconstruction(feat.float(), list(self.tokens), self.levels, self.token_mix)
        return f_hat, sum(DISSIMILARITIES[dissimilarity](m) for m in masks)

    def band_loss(self, feat_s: Tensor, feat_t: Tensor, channel_weights: Tensor | None = None,
                  include_low: bool = False) -> Tensor:
        """Stage 2: :func:`freekd_loss` with these tokens (and mix) over the high sets, and ``LL_J`` with
        ``include_low``."""
        return freekd_loss(feat_s.float(), feat_t.float(), self.level_prompts(), self.levels,
                           channel_weights=channel_weights, low_prompt=self.low_prompt if include_low else None,
                           token_mix=self.token_mix)


# ------------------------------------------------------------------------------------------------
# relational channel gates (§7.5: FreeKD-P, AFP)
# ------------------------------------------------------------------------------------------------
def relational_attention(feat: Tensor, context: Tensor) -> Tensor:
    """``A_n = softmax_rowwise(ψ(F)_n F_nᵀ)`` (contraction over HW, no 1/√d): ``N×C×C`` in fp32.
    ``feat`` = F and ``context`` = ψ(F), both ``N×C×H×W``."""
    if feat.shape != context.shape:
        raise ValueError(f"relational_attention: F {tuple(feat.shape)} and ψ(F) {tuple(context.shape)} differ")
    with autocast_disabled(feat.device):
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
        with autocast_disabled(feat_s.device):
            w_t = self.teacher_gate(relational_attention(feat_t, context_t))
            w_s = self.student_gate(relational_attention(feat_s, context_s))
            return renormalise_gates(w_t * w_s)


# ------------------------------------------------------------------------------------------------
# stage 1 loop
# ------------------------------------------------------------------------------------------------
def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


class _StageTask:
    """The task as stage 1 gives it to :func:`kdbench.train.train_step`: the (prompted) teacher's own forward,
    and the task loss of the Context."""

    def __init__(self, loss: Callable[[Any, Any], Tensor]):
        self.loss = loss

    @staticmethod
    def forward(model: nn.Module, x: Any, y: Any, taps: Sequence[str]) -> Any:
        return model(x)


class _StageTerms:
    """Stage 1's "method" for :func:`kdbench.train.train_step`: its one term is ``dis_weight·Σ L_dis`` of the
    prompt insertions that the teacher's forward has just made (collected in ``terms``)."""

    task_loss_weight = 1.0

    def __init__(self, n_sets: int, dis_weight: float, terms: list[Tensor]):
        self.n_sets, self.dis_weight, self.terms = n_sets, dis_weight, terms

    def taps(self) -> Taps:
        return Taps()

    def __call__(self, s: Any, t: Any, batch: Batch) -> dict[str, Tensor]:
        if len(self.terms) != self.n_sets:
            raise RuntimeError(f"stage 1: {len(self.terms)} of {self.n_sets} prompt insertion hooks fired; the "
                               "tap modules are not on the teacher's forward path")
        return {"loss_dis": self.dis_weight * sum(self.terms)}


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
    networks work too). Each step is a :func:`kdbench.train.train_step` of
    ``L = task_loss(teacher(x), y) + dis_weight·Σ L_dis`` on the loader cycled for ``iters`` steps; only the
    prompt sets' parameters are optimised (Adam, or SGD with momentum 0.9). The teacher runs in eval mode with
    its parameters frozen; its mode, ``requires_grad`` flags and weights are restored/untouched, and the hooks
    are removed, whatever happens.
    """
    from kdbench.models.tap import edit_tap
    from kdbench.train import train_step

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

    task, terms = _StageTask(task_loss), _StageTerms(len(targets), dis_weight, dis_terms)
    was_training = teacher.training
    flags = [(p, p.requires_grad) for p in teacher.parameters()]
    try:
        teacher.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        with edit_tap(teacher, tap, insert):
            batches = iter(loader)
            for step in range(int(iters)):
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
                out = train_step(teacher, None, terms, task, Batch(inputs=x, targets=y, epoch=1, step=step, epochs=1,
                                                                   steps_per_epoch=int(iters)),
                                 optimizer=opt, params=params, device=device)
                history.append(float(out.loss.detach()))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        teacher.train(was_training)
    return history


# ------------------------------------------------------------------------------------------------
# the base of the prompt methods
# ------------------------------------------------------------------------------------------------
class PromptDistiller(Distiller):
    """Base of the frequency-prompt methods (FreeKD, AFP).

    Builds what both need from the Context: the tap (``default_taps[task]`` for ``tap="auto"``), its maps
    paired deepest-aligned (``s_index``/``t_index``, the paired ``s_shapes``/``t_shapes``), the DWT depth
    ``map_levels[l]`` of each teacher map (``levels`` on every map, the zero-padded Haar DWT taking any size,
    as FreeKD's release; with ``cap_levels = True``, AFP's ``min(levels, ⌊log2(min(H,W))⌋)``), one frozen
    ``prompt_set`` per map with ``J_l ≥ 1`` (``self.prompts``, keyed by the pair's position; ``self.prompted``
    lists ``(position, key)``), and the regression-KD switch ``use_reg`` (detection with a ``"reg"`` tap on
    both networks).

    Stage 1 (§7.4): :meth:`run_stage` tunes fresh prompts, seeded by ``stage_seed``, on the frozen teacher with
    :func:`run_prompt_stage`; :meth:`load_stage` loads and freezes them. The stage depends on exactly the
    ``stage_params`` (and the teacher, the student's tap count for the pairing, the data and the batch size).
    """

    stage_params = ("num_tokens", "levels", "tap", "stage_iters", "stage_lr", "stage_optimizer", "stage_seed",
                    "dissimilarity", "dis_weight")
    default_taps: dict[str, str] = {}
    prompt_set: type[PromptSet] = PromptSet
    #: ``J_l = min(levels, ⌊log2(min(H, W))⌋)`` per map (AFP, §9) instead of ``levels`` on every map (FreeKD, §7)
    cap_levels: bool = False

    def __init__(self, ctx: Context, *, num_tokens: int, levels: int, tap: str, reg_weight: float, stage_iters: int,
                 stage_lr: float, stage_optimizer: str, stage_seed: int, dissimilarity: str, dis_weight: float):
        super().__init__(ctx)
        who = self.who = getattr(type(self), "registry_name", type(self).__name__)
        if dissimilarity not in DISSIMILARITIES:
            raise ValueError(f"{who}: dissimilarity must be one of {sorted(DISSIMILARITIES)}, got {dissimilarity!r}")
        if stage_optimizer not in ("adam", "sgd"):
            raise ValueError(f"{who}: stage_optimizer must be 'adam' or 'sgd', got {stage_optimizer!r}")
        if int(num_tokens) != num_tokens or num_tokens < 1:
            raise ValueError(f"{who}: num_tokens must be a positive integer, got {num_tokens!r}")
        self.tap = resolve_tap(ctx, tap, self.default_taps, who)
        self.s_index, self.t_index = pair_levels(ctx, self.tap, who, deepest=True)
        s_shapes, t_shapes = map_shapes(ctx, "student", self.tap, who), map_shapes(ctx, "teacher", self.tap, who)
        self.s_shapes, self.t_shapes = [s_shapes[i] for i in self.s_index], [t_shapes[i] for i in self.t_index]
        self.t_channels = [sh[0] for sh in self.t_shapes]
        levels = check_levels(levels)
        self.map_levels = [clamp_levels(levels, sh[1:]) if self.cap_levels else levels for sh in self.t_shapes]
        if not any(self.map_levels):
            raise ValueError(f"{who}: no teacher map of tap {self.tap!r} is large enough for a DWT level "
                             f"(shapes {self.t_shapes})")
        self.reg_weight = float(reg_weight)
        self.use_reg = has_regression_taps(ctx, self.reg_weight != 0.0)
        self.num_tokens = int(num_tokens)
        self.prompted = [(i, str(i)) for i, j in enumerate(self.map_levels) if j > 0]
        self._stage = {"iters": int(stage_iters), "lr": float(stage_lr), "optimizer": stage_optimizer,
                       "dissimilarity": dissimilarity, "dis_weight": float(dis_weight), "seed": int(stage_seed)}
        self.prompts = self._seeded_prompts()
        self.prompts.requires_grad_(False)

    def _seeded_prompts(self) -> nn.ModuleDict:
        """Fresh prompt sets whose tokens depend only on ``stage_seed`` (the global RNG is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._stage["seed"])
            return nn.ModuleDict({k: self.prompt_set(self.t_channels[i], self.num_tokens, self.map_levels[i])
                                  for i, k in self.prompted})

    def relational_gates(self) -> nn.ModuleDict:
        """One :class:`RelationalGates` per prompted map (§7.5), trained with the student."""
        return nn.ModuleDict({k: RelationalGates(self.t_channels[i]) for i, k in self.prompted})

    def taps(self) -> Taps:
        extra = ("reg",) if self.use_reg else ()
        return Taps(student=(self.tap,) + extra, teacher=(self.tap,) + extra)

    def teacher_maps(self, t: Outputs) -> list[Tensor]:
        """The paired teacher maps, detached, fp32."""
        feats = t[self.tap]
        return [feats[i].detach().float() for i in self.t_index]

    def reg_terms(self, s: Outputs, t: Outputs) -> dict[str, Tensor]:
        """``{"loss_reg": reg_weight·reg_kd_loss}`` when ``use_reg``, else nothing."""
        if not self.use_reg:
            return {}
        return {"loss_reg": self.reg_weight * reg_kd_loss(s["reg"], [r.detach() for r in t["reg"]])}

    # -- the stage (method contract) ------------------------------------------------------------
    def stage_config(self) -> dict:
        first = self.prompts[self.prompted[0][1]]
        return {
            "kind": "frequency_prompts",
            "prompt_set": type(first).__name__,
            "tap": self.tap,
            "teacher_indices": {k: self.t_index[i] for i, k in self.prompted},
            "channels": {k: ps.channels for k, ps in self.prompts.items()},
            "levels": {k: ps.levels for k, ps in self.prompts.items()},
            "num_tokens": first.num_tokens,
            **self._stage,
        }

    def run_stage(self, teacher: nn.Module, loader, device) -> dict[str, Tensor]:
        """Train fresh (seeded) prompt sets on the frozen teacher; returns their state dict (CPU)."""
        device = torch.device(device)
        prompts = self._seeded_prompts().to(device)
        prompts.requires_grad_(True)
        n_maps = len(teacher.tap_modules(self.tap))
        if any(self.t_index[i] >= n_maps for i, _ in self.prompted):
            raise ValueError(f"teacher.tap_modules({self.tap!r}) gave {n_maps} modules; the prompts need "
                             f"indices {sorted(self.t_index[i] for i, _ in self.prompted)} of the tap's maps")
        targets = [(self.t_index[i], prompts[k]) for i, k in self.prompted]
        st = self._stage
        self.stage_log = run_prompt_stage(teacher, loader, device, self.tap, targets, task_loss=self.ctx.task_loss,
                                          iters=st["iters"], lr=st["lr"], optimizer=st["optimizer"],
                                          dissimilarity=st["dissimilarity"], dis_weight=st["dis_weight"])
        return {k: v.detach().cpu() for k, v in prompts.state_dict().items()}

    def load_stage(self, state: dict[str, Tensor]) -> None:
        """Load the stage-1 prompts (strict) and freeze them."""
        self.prompts.load_state_dict(state, strict=True)
        self.prompts.requires_grad_(False)
        self._stage_loaded = True

    def check_stage(self) -> None:
        """Raise unless :meth:`load_stage` ran (distilling with untuned prompts would be silently wrong)."""
        if not getattr(self, "_stage_loaded", False):
            raise RuntimeError(f"{self.who}: the stage-1 prompts were never loaded; call run_stage and load_stage "
                               "(the runner does) before distilling")
