"""UHKD: Yu, Pan, Zhang, Guan, Jiang, "Unified framework for heterogeneous knowledge distillation via
frequency-domain representations", arXiv 2510.24116, 2025. Spec: docs/methods.md §10 (every detail [INTERP]).

Only the abstract and figure captions are available; this is the benchmark's convention, not the paper's code:

* FTM (teacher, parameter-free): ``FFT2(ortho)`` per channel → spectrum (amplitude ``|X|`` or stacked
  real/imaginary parts) → ``fftshift`` → log compression → ``adaptive_avg_pool2d`` to ``grid×grid`` →
  tokens ``N×grid²×C`` → LayerNorm over channels without affine parameters.
* FAM (student, learnable): the same spectral pipeline, then SCA = ``Linear(C_s→C_t)`` per token and
  SRA = learnable positional embedding + a 2-layer GELU MLP ``C_t→C_t→C_t`` (``h ← MLP(h)``, the definition;
  ``sra_residual=True``: ``h ← h + MLP(h)``, version 1's convention), then the same LayerNorm.
* ``L = ce_weight·CE + alpha·KD_T + beta·Σ_levels MSE(FAM(F^s), FTM(F^t))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.method import Batch, Distiller, Outputs, Taps, no_autocast, register_method
from kdbench.methods.kd import kd_loss

SPECTRA = ("amplitude", "complex")


def _pool_matrix(length: int, grid: int) -> Tensor:
    """``grid×length``: row ``i`` averages the cells of ``adaptive_avg_pool``'s bin ``i``,
    ``[⌊i·L/g⌋, ⌈(i+1)·L/g⌉)`` (1-2 cells per bin when ``L < g``)."""
    p = torch.zeros(grid, length, dtype=torch.float64)
    for i in range(grid):
        lo, hi = (i * length) // grid, -((-(i + 1) * length) // grid)
        p[i, lo:hi] = 1.0 / (hi - lo)
    return p


_SPECTRAL_POOL: dict[tuple[int, int, int, torch.device], tuple[Tensor, Tensor, Tensor]] = {}


def _spectral_pool(h: int, w: int, grid: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The fftshift + adaptive average pool of a full ``h×w`` spectrum, as two linear maps of the one-sided
    spectrum of ``rfft2`` (``h×(w//2+1)``, columns ``k₂ = 0..w//2``), built in float64 and cached per size and
    device in float32.

    Pooling the shifted spectrum is ``Pₕ·S·P_wᵀ`` with the pool matrices' columns rolled by the shift. A real
    map's spectrum is conjugate-symmetric, ``X[k₁, k₂] = conj X[−k₁, −k₂]``, so the columns ``k₂ > w//2`` are the
    one-sided columns ``w − k₂`` read at the negated row ``−k₁``. Returns
    ``(rows 2×g×h, cols (w//2+1)×2g, cols_adjoint)``:
    the ``k₂ ≤ w//2`` part (``rows[0]``, ``cols[:, :g]``) and the mirrored part (``rows[1]``, ``cols[:, g:]``);
    amplitude and real part add the two, the imaginary part (odd) subtracts the mirrored one. Third: ``cols``
    with each row weighted as the backward of :class:`_AmplitudeTokens` needs it."""
    key = (h, w, grid, torch.device(device))
    if key not in _SPECTRAL_POOL:
        ph = torch.roll(_pool_matrix(h, grid), -(h // 2), dims=1)  # column k: the shifted position of row k
        pw = torch.roll(_pool_matrix(w, grid), -(w // 2), dims=1)
        half = w // 2 + 1
        cols = torch.zeros(half, 2 * grid, dtype=torch.float64)
        cols[:, :grid] = pw[:, :half].T
        for m in range(1, w - half + 1):  # one-sided column m stands for full column w − m
            cols[m, grid:] = pw[:, w - m]
        rows = torch.stack([ph, ph[:, (-torch.arange(h)) % h]])
        # for the backward (the adjoint of rfft2 as irfft2): a column standing for two full columns counts half
        counts = torch.full((half, 1), 0.5, dtype=torch.float64)
        counts[0] = 1.0
        if w % 2 == 0:
            counts[-1] = 1.0
        _SPECTRAL_POOL[key] = tuple(m.to(device=device, dtype=torch.float32) for m in (rows, cols, cols * counts))
    return _SPECTRAL_POOL[key]


class _AmplitudeTokens(torch.autograd.Function):
    """``log1p(|rfft2(F)|)`` pooled to tokens (the ``amplitude`` pipeline) with a hand-written backward: the
    gradient through the log, the modulus and the one-sided FFT in three elementwise passes and one ``irfft2``
    (the adjoint of the one-sided transform: ``Re(IFFT2(pad(G)))`` is ``irfft2`` of ``G`` with every column
    that stands for two halved), instead of autograd's chain of complex ops and a full complex inverse FFT.
    The modulus' gradient at 0 is 0 (as ``abs``'s).

    Everything runs on the ``N×h×w×C`` view of the map (the memory order of a ``channels_last`` feature, no copy):
    the transforms over the two middle axes, the pooling as one matrix product over the rows and one small
    contraction over the columns. The gradient is handed back in the feature's memory format: the FFT library
    writes it in ``N×C×h×w`` order, and a gradient in another layout than the network's makes the student's
    later backward ops (ReLU, gradient sums) several times slower than the one copy that converts it."""

    @staticmethod
    def forward(ctx, feat: Tensor, rows: Tensor, cols: Tensor, cols_adjoint: Tensor, grid: int) -> Tensor:
        n, c, h, w = feat.shape
        x = feat.permute(0, 2, 3, 1).contiguous()  # N×h×w×C (a view of a channels_last feature)
        X = torch.fft.rfft2(x, dim=(1, 2), norm="ortho").contiguous()  # N×h×(w//2+1)×C
        ri = torch.view_as_real(X)
        A = ri[..., 0].square().add_(ri[..., 1].square()).sqrt_()  # |X|
        spec = A.add(1.0).log_()  # log1p(|X|)
        half = spec.shape[2]
        t = torch.matmul(rows.flatten(0, 1), spec.view(n, h, half * c))  # N×2g×(w//2+1)·C: rows pooled
        tok = torch.einsum("nzawc,wzb->nabc", t.view(n, 2, grid, half, c), cols.view(half, 2, grid))
        ctx.save_for_backward(X, A, rows, cols_adjoint)
        ctx.hw, ctx.grid = (h, w), grid
        ctx.channels_last = feat.is_contiguous(memory_format=torch.channels_last)
        return tok.flatten(1, 2)  # N×g²×C

    @staticmethod
    def backward(ctx, g: Tensor):
        X, A, rows, cols_adjoint = ctx.saved_tensors
        (h, w), grid = ctx.hw, ctx.grid
        n, _, half, c = X.shape
        u = torch.einsum("wzb,nabc->nzawc", cols_adjoint.view(half, 2, grid), g.unflatten(1, (grid, grid)))
        weight = torch.matmul(rows.flatten(0, 1).T, u.reshape(n, 2 * grid, half * c)).view(n, h, half, c)
        # ∂L/∂log1p(A) with the irfft2 column weights folded in, then /(A·(1+A)); 0 where A = 0
        weight = weight.div_(torch.addcmul(A, A, A)).nan_to_num_(0.0, 0.0, 0.0)
        grad = torch.fft.irfft2(X * weight, s=(h, w), dim=(1, 2), norm="ortho").permute(0, 3, 1, 2)
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        return grad.contiguous(memory_format=fmt), None, None, None, None


def spectral_tokens(feat: Tensor, grid: int, spectrum: str = "amplitude") -> Tensor:
    """The shared spectral pipeline (SRR + flattening of docs/methods.md §10), in fp32: ``N×C×h×w -> N×grid²×C'``.

    * ``amplitude``: ``log1p(fftshift(|FFT2(F, ortho)|))``, ``C' = C``; invariant to circular shifts of ``F``.
    * ``complex``: real and imaginary parts of the shifted spectrum stacked on channels (real first),
      each compressed with the signed ``sign(x)·log1p(|x|)``, ``C' = 2C``.

    The map is then ``adaptive_avg_pool2d``-ed to ``grid×grid``; a map smaller than ``grid`` is brought *up*
    to ``grid×grid`` by the same operator (each output cell averages the 1–2 input cells its bin overlaps),
    so every level and both networks give the same token grid whatever their resolution.
    Tokens are ordered row-major over the grid.

    Computed as that definition up to float rounding, cheaper: the one-sided ``rfft2`` of the real map (half the
    spectrum, the other half being its mirror, see :func:`_spectral_pool`) and the shift and pool as two small
    matrix products straight to the token layout.
    """
    if spectrum not in SPECTRA:
        raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
    if feat.dim() != 4:
        raise ValueError(f"spectral_tokens: expected N×C×h×w, got {tuple(feat.shape)}")
    h, w = feat.shape[-2:]
    with no_autocast():
        rows, cols, cols_adjoint = _spectral_pool(h, w, grid, feat.device)
        if spectrum == "amplitude":
            return _AmplitudeTokens.apply(feat.float(), rows, cols, cols_adjoint, grid)
        X = torch.fft.rfft2(feat.float(), norm="ortho")  # N×C×h×(w//2+1)
        out = []
        for v, sign in ((X.real, 1.0), (X.imag, -1.0)):  # the imaginary part of the mirrored half changes sign
            spec = torch.sign(v) * torch.log1p(v.abs())
            b = (spec @ cols).unflatten(-1, (2, grid))
            r = rows if sign > 0 else torch.stack([rows[0], -rows[1]])
            out.append(torch.einsum("zah,nchzb->nabc", r, b))
        return torch.cat(out, dim=-1).flatten(1, 2)  # N×grid²×2C


class FTM(nn.Module):
    """Feature Transformation Module (teacher side, parameter-free): SRR (spectrum, log, pool) + SRT
    (token sequence, LayerNorm over channels without affine). ``N×C×h×w -> N×grid²×C'``."""

    def __init__(self, grid: int = 7, spectrum: str = "amplitude"):
        super().__init__()
        if spectrum not in SPECTRA:
            raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
        self.grid = int(grid)
        self.spectrum = spectrum

    def forward(self, feat: Tensor) -> Tensor:
        tok = spectral_tokens(feat, self.grid, self.spectrum)
        with no_autocast():
            return F.layer_norm(tok, tok.shape[-1:])


class FAM(nn.Module):
    """Feature Alignment Module (student side, learnable) for one level.

    Spectral tokens ``N×grid²×C_s'`` → SCA ``Linear(C_s'→C_t')`` → ``h = h + pos`` (learnable ``grid²×C_t'``,
    truncated-normal std 0.02) → SRA ``h = MLP(h)`` (``Linear→GELU→Linear``, width ``C_t'``; the plain 2-layer
    MLP of docs/methods.md §10; with ``residual`` ``h = h + MLP(h)``) → LayerNorm without affine.
    ``C' = C`` for amplitude spectra, ``2C`` for complex ones. Runs in fp32.
    """

    def __init__(self, c_s: int, c_t: int, grid: int = 7, spectrum: str = "amplitude", residual: bool = False):
        super().__init__()
        if spectrum not in SPECTRA:
            raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
        mult = 2 if spectrum == "complex" else 1
        self.grid = int(grid)
        self.spectrum = spectrum
        c_in, c_out = mult * int(c_s), mult * int(c_t)
        self.sca = nn.Linear(c_in, c_out)
        self.pos = nn.Parameter(torch.zeros(1, self.grid * self.grid, c_out))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.sra = nn.Sequential(nn.Linear(c_out, c_out), nn.GELU(), nn.Linear(c_out, c_out))
        self.residual = bool(residual)

    def forward(self, feat: Tensor) -> Tensor:
        tok = spectral_tokens(feat, self.grid, self.spectrum)
        with no_autocast():
            h = self.sca(tok) + self.pos
            h = h + self.sra(h) if self.residual else self.sra(h)
            return F.layer_norm(h, h.shape[-1:])


@register_method("uhkd")
class UHKD(Distiller):
    """Yu et al., "Unified framework for heterogeneous KD via frequency-domain representations", 2025.
    docs/methods.md §10 ([INTERP] throughout; see the module docstring).

    ``L = ce_weight·CE + alpha·T²·KL(p_t‖p_s) + beta·Σ_levels MSE(FAM_l(F^s_l), FTM(F^t_l))`` over the
    ``"stages"`` taps. When the networks have different stage counts the deepest ``min(n_s, n_t)`` stages of
    each are paired (deepest with deepest). MSE is the mean over batch, tokens and channels.
    Defaults: ``temperature=4, alpha=1`` (CIFAR; ImageNet T=1), ``beta=1``, ``grid=7``, amplitude spectra,
    ``sra_residual=False`` (the SRA is the plain 2-layer MLP of §10; ``True`` adds the skip ``h + MLP(h)`` of
    version 1).
    """

    tasks = frozenset({"classification"})
    heterogeneous = True
    citation = "Yu et al., Unified framework for heterogeneous KD via frequency-domain representations, arXiv 2510.24116, 2025 (docs/methods.md §10)"
    version = 2

    def __init__(
        self,
        ctx,
        *,
        temperature: float = 4.0,
        alpha: float = 1.0,
        beta: float = 1.0,
        grid: int = 7,
        spectrum: str = "amplitude",
        ce_weight: float = 1.0,
        sra_residual: bool = False,
    ):
        super().__init__(ctx)
        if spectrum not in SPECTRA:
            raise ValueError(f"uhkd: spectrum must be one of {SPECTRA}, got {spectrum!r}")
        if int(grid) < 1:
            raise ValueError(f"uhkd: grid must be >= 1, got {grid}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.grid = int(grid)
        self.spectrum = spectrum
        self.task_loss_weight = ce_weight

        s_shapes = ctx.shapes("student", "stages")
        t_shapes = ctx.shapes("teacher", "stages")
        self.n_levels = min(len(s_shapes), len(t_shapes))
        if self.n_levels == 0:
            raise ValueError("uhkd: the student or the teacher exposes no stage features")
        for side, shapes in (("student", s_shapes), ("teacher", t_shapes)):
            for sh in shapes:
                if len(sh) != 3:
                    raise ValueError(f"uhkd: {side} stage shapes must be (C, H, W), got {tuple(sh)}")
        s_shapes, t_shapes = s_shapes[-self.n_levels:], t_shapes[-self.n_levels:]
        self.ftm = FTM(self.grid, spectrum)
        self.sra_residual = bool(sra_residual)
        self.fams = nn.ModuleList(FAM(ss[0], ts[0], self.grid, spectrum, residual=self.sra_residual)
                                  for ss, ts in zip(s_shapes, t_shapes))

    def taps(self) -> Taps:
        return Taps(student=("stages",), teacher=("stages",))

    def forward(self, s: Outputs, t: Outputs, batch: Batch) -> dict[str, Tensor]:
        k = self.n_levels
        feats_s, feats_t = s["stages"][-k:], t["stages"][-k:]
        loss_freq = None
        for fam, fs, ft in zip(self.fams, feats_s, feats_t):
            with torch.no_grad():
                target = self.ftm(ft.detach())
            term = F.mse_loss(fam(fs), target, reduction="mean")
            loss_freq = term if loss_freq is None else loss_freq + term
        return {
            "loss_kd": self.alpha * kd_loss(s.logits, t.logits, self.temperature),
            "loss_freq": self.beta * loss_freq,
        }
