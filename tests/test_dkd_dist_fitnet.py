"""DKD (docs/methods.md §12), DIST (§13) and FitNet (§14): losses against explicit formulas, the FitNet regressor's
choice of convolution, a heterogeneous ViT→CNN pair, and a few optimiser steps of each method through the harness's
training step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.method import Batch, Context, Outputs
from kdbench.methods.dist import DIST, dist_loss, pearson_rows
from kdbench.methods.dkd import DKD, dkd_loss
from kdbench.methods.fitnet import ConvReg, FitNet, fitnet_loss
from kdbench.models.sources import build_model
from kdbench.registry import METHODS
from kdbench.runner import build_context
from kdbench.step import train_step
from kdbench.tasks.classification import ClassificationTask

from kdb_util import random_classification_data

K = 10


def _ctx(shapes: dict | None = None, k: int = K) -> Context:
    shapes = shapes or {}
    return Context(task="classification", num_classes=k, epochs=30, steps_per_epoch=5, dataset_size=100,
                   probe=lambda side, tap: shapes[(side, tap)])


def _batch(targets, epoch: int = 1) -> Batch:
    return Batch(inputs=None, targets=targets, epoch=epoch, step=0, epochs=30, steps_per_epoch=5)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


# -- DKD -------------------------------------------------------------------------------------------

ZS = [[1.0, 2.0, 0.0, -1.0], [0.5, -1.0, 2.0, 0.0], [3.0, 0.0, 1.0, 1.0]]
ZT = [[2.0, 1.0, 0.0, 0.5], [0.0, 0.0, 3.0, -2.0], [0.0, 2.5, 1.0, 0.0]]
Y = [0, 2, 1]


def _dkd_by_hand(zs, zt, y, T):
    """(TCKD, NCKD) from the definitions: b = (p_y, 1 − p_y); q_k = p_k / (1 − p_y) over k ≠ y (no −1000 trick);
    KL summed over entries, averaged over the N samples, times T²."""
    tckd = nckd = 0.0
    for s_row, t_row, c in zip(zs, zt, y):
        ps, pt = _softmax(np.array(s_row, dtype=np.float64) / T), _softmax(np.array(t_row, dtype=np.float64) / T)
        bs, bt = [ps[c], 1 - ps[c]], [pt[c], 1 - pt[c]]
        tckd += sum(b * math.log(b / a) for a, b in zip(bs, bt))
        others = [k for k in range(len(s_row)) if k != c]
        qs = [ps[k] / (1 - ps[c]) for k in others]
        qt = [pt[k] / (1 - pt[c]) for k in others]
        nckd += sum(b * math.log(b / a) for a, b in zip(qs, qt))
    n = len(zs)
    return tckd / n * T * T, nckd / n * T * T


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_dkd_loss_hand_computed(T):
    zs, zt, y = torch.tensor(ZS), torch.tensor(ZT), torch.tensor(Y)
    tckd, nckd = _dkd_by_hand(ZS, ZT, Y, T)
    assert tckd > 0.01 and nckd > 0.01
    assert dkd_loss(zs, zt, y, 1.0, 0.0, T).item() == pytest.approx(tckd, rel=1e-5)
    assert dkd_loss(zs, zt, y, 0.0, 1.0, T).item() == pytest.approx(nckd, rel=1e-5)
    got = dkd_loss(zs, zt, y, 0.5, 3.0, T)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(0.5 * tckd + 3.0 * nckd, rel=1e-5)


def test_dkd_loss_batch_mean_direction_and_target_mask():
    zs, zt, y = torch.tensor(ZS), torch.tensor(ZT), torch.tensor(Y)
    base = dkd_loss(zs, zt, y, 1.0, 8.0, 4.0).item()
    # a mean over samples: the batch repeated twice gives the same loss (a sum would double it)
    doubled = dkd_loss(zs.repeat(2, 1), zt.repeat(2, 1), y.repeat(2), 1.0, 8.0, 4.0)
    assert doubled.item() == pytest.approx(base, rel=1e-6)
    # KL(teacher ‖ student), not the reverse
    assert dkd_loss(zt, zs, y, 1.0, 8.0, 4.0).item() != pytest.approx(base, rel=1e-3)
    # the target decides the split: another target, another loss (matches the hand value for that target)
    y2 = [3, 0, 2]
    tckd, nckd = _dkd_by_hand(ZS, ZT, y2, 4.0)
    got = dkd_loss(zs, zt, torch.tensor(y2), 1.0, 8.0, 4.0).item()
    assert got == pytest.approx(tckd + 8.0 * nckd, rel=1e-5) and got != pytest.approx(base, rel=1e-3)
    # a teacher equal to the student gives 0; a soft label is reduced to its argmax
    assert dkd_loss(zs, zs, y, 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-5)  # fp32 rounding · T²·β
    soft = torch.nn.functional.one_hot(y, 4).float() * 0.7 + 0.1
    assert dkd_loss(zs, zt, soft, 1.0, 8.0, 4.0).item() == pytest.approx(base, rel=1e-6)


def test_dkd_loss_finite_for_a_saturated_student():
    # non-target probabilities exp(−200) underflow to 0 in float32: log of their sum would be −inf
    zs = torch.tensor([[200.0, 0.0, 0.0]])
    zt = torch.tensor([[0.0, 0.0, 0.0]])
    y = torch.tensor([0])
    got = dkd_loss(zs, zt, y, 1.0, 0.0, 1.0)
    log_bs = [0.0, -200.0 + math.log(2.0)]  # log p_y ≈ 0, log(1 − p_y) = log(2·e^−200)
    bt = [1 / 3, 2 / 3]
    expected = sum(b * (math.log(b) - a) for a, b in zip(log_bs, bt))
    assert torch.isfinite(got) and got.item() == pytest.approx(expected, rel=1e-5)


def test_dkd_loss_shape_checks():
    with pytest.raises(ValueError, match="equal shape"):
        dkd_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 1, 8, 4)
    with pytest.raises(ValueError, match="class indices"):
        dkd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), 1, 8, 4)


def test_dkd_method_warmup_and_defaults():
    d = DKD.check_params({})
    assert d == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20, "ce_weight": 1.0}
    m = DKD(_ctx())
    assert m.task_loss_weight == 1.0 and m.taps().student == () and m.taps().teacher == ()
    assert [m.warmup_factor(e) for e in (1, 10, 20, 35)] == [0.05, 0.5, 1.0, 1.0]
    zs, zt, y = torch.tensor(ZS), torch.tensor(ZT), torch.tensor(Y)
    s, t = Outputs(logits=zs), Outputs(logits=zt)
    tckd, nckd = _dkd_by_hand(ZS, ZT, Y, 4.0)
    full = tckd + 8.0 * nckd
    assert m(s, t, _batch(y, epoch=20))["loss_dkd"].item() == pytest.approx(full, rel=1e-5)
    assert m(s, t, _batch(y, epoch=1))["loss_dkd"].item() == pytest.approx(full / 20, rel=1e-5)
    assert m(s, t, _batch(y, epoch=5))["loss_dkd"].item() == pytest.approx(full / 4, rel=1e-5)
    assert m(s, t, _batch(y, epoch=100))["loss_dkd"].item() == pytest.approx(full, rel=1e-5)
    assert DKD(_ctx(), warmup=0)(s, t, _batch(y, epoch=1))["loss_dkd"].item() == pytest.approx(full, rel=1e-5)
    assert DKD(_ctx(), ce_weight=0.5).task_loss_weight == 0.5
    with pytest.raises(ValueError, match="warmup"):
        DKD(_ctx(), warmup=-1)


# -- DIST ------------------------------------------------------------------------------------------

DS = [[1.0, 2.0, 0.0, -1.0], [0.5, -1.0, 2.0, 0.0], [3.0, 0.0, 1.0, 1.0]]
DT = [[2.0, 1.0, 0.0, 0.5], [0.0, 0.0, 3.0, -2.0], [0.0, 2.5, 1.0, 0.0]]


def _pearson(a, b, eps=1e-8):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    na = math.sqrt(sum((x - ma) ** 2 for x in a))
    nb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return num / (na * nb + eps)


def _dist_by_hand(zs, zt, T):
    """(inter, intra) with explicit loops: rows = samples (over classes), columns = classes (over samples)."""
    ps = [list(_softmax(np.array(r, dtype=np.float64) / T)) for r in zs]
    pt = [list(_softmax(np.array(r, dtype=np.float64) / T)) for r in zt]
    n, k = len(ps), len(ps[0])
    inter = 1 - sum(_pearson(ps[i], pt[i]) for i in range(n)) / n
    intra = 1 - sum(_pearson([ps[i][j] for i in range(n)], [pt[i][j] for i in range(n)]) for j in range(k)) / k
    return inter, intra


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_dist_loss_hand_computed(T):
    zs, zt = torch.tensor(DS), torch.tensor(DT)
    inter, intra = _dist_by_hand(DS, DT, T)
    assert abs(inter - intra) > 0.05  # the two axes give different values here: a swap would show
    assert dist_loss(zs, zt, 1.0, 0.0, T).item() == pytest.approx(T * T * inter, rel=1e-5)
    assert dist_loss(zs, zt, 0.0, 1.0, T).item() == pytest.approx(T * T * intra, rel=1e-5)
    got = dist_loss(zs, zt, 2.0, 0.5, T)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(T * T * (2.0 * inter + 0.5 * intra), rel=1e-5)


def test_dist_loss_temperature_squared_and_zero_for_identical():
    zs, zt = torch.tensor(DS), torch.tensor(DT)
    # T² outside: the loss at T equals T² times the loss of the logits divided by T at T = 1
    assert dist_loss(zs, zt, 1.0, 1.0, 3.0).item() == pytest.approx(9 * dist_loss(zs / 3, zt / 3, 1.0, 1.0, 1.0).item(),
                                                                     rel=1e-5)
    assert dist_loss(zs, zs, 1.0, 1.0, 2.0).item() == pytest.approx(0.0, abs=1e-5)
    # ρ is symmetric: exchanging the two networks leaves the loss as it is
    inter, intra = _dist_by_hand(DS, DT, 1.0)
    assert dist_loss(zt, zs, 1.0, 1.0, 1.0).item() == pytest.approx(inter + intra, rel=1e-5)


def test_pearson_eps_in_the_denominator_only():
    # centred vectors (1e-4, −1e-4) and the same: Σ âb̂ = 2e-8, ‖â‖·‖b̂‖ = 2e-8 -> 2e-8 / (2e-8 + 1e-8) = 2/3
    a = torch.tensor([[3e-4, 1e-4]], dtype=torch.float64)
    b = torch.tensor([[5.0 + 1e-4, 5.0 - 1e-4]], dtype=torch.float64)
    assert pearson_rows(a, b).item() == pytest.approx(2 / 3, rel=1e-6)
    # large vectors: eps is negligible, plain Pearson (perfect negative correlation here)
    assert pearson_rows(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[6.0, 4.0, 2.0]])).item() == pytest.approx(-1.0)
    # a constant column (one sample): correlation 0, not NaN
    assert pearson_rows(torch.tensor([[0.3]]), torch.tensor([[0.7]])).item() == 0.0


def test_dist_method_defaults_and_weight():
    d = DIST.check_params({})
    assert d == {"beta": 1.0, "gamma": 1.0, "temperature": 4.0, "weight": 2.0, "ce_weight": 1.0}
    zs, zt = torch.tensor(DS), torch.tensor(DT)
    inter, intra = _dist_by_hand(DS, DT, 4.0)
    out = DIST(_ctx())(Outputs(logits=zs), Outputs(logits=zt), _batch(torch.tensor([0, 1, 2])))
    assert set(out) == {"loss_dist"}
    assert out["loss_dist"].item() == pytest.approx(2.0 * 16 * (inter + intra), rel=1e-5)
    m = DIST(_ctx(), temperature=1.0, weight=1.0, gamma=0.0, ce_weight=0.3)
    assert m.task_loss_weight == 0.3
    inter1, _ = _dist_by_hand(DS, DT, 1.0)
    assert m(Outputs(logits=zs), Outputs(logits=zt), None)["loss_dist"].item() == pytest.approx(inter1, rel=1e-5)


# -- FitNet ----------------------------------------------------------------------------------------

def test_fitnet_loss_is_the_element_mean():
    fs = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]], [[[3.0, 0.0]], [[1.0, 1.0]]]])  # 2×2×1×2
    ft = torch.tensor([[[[0.0, 0.0]], [[0.0, 1.0]]], [[[1.0, 0.0]], [[1.0, -2.0]]]])
    # squared differences: 1, 4, 0, 4, 4, 0, 0, 9 -> sum 22 over 8 elements
    got = fitnet_loss(fs, ft)
    assert got.dim() == 0 and got.dtype == torch.float32 and got.item() == pytest.approx(22 / 8)
    with pytest.raises(ValueError, match="regressed student"):
        fitnet_loss(fs, ft[:, :1])


@pytest.mark.parametrize("s_shape, t_shape, kind, kernel, stride", [
    ((8, 16, 16), (12, 8, 8), "conv3x3_s2", (3, 3), (2, 2)),      # student twice the teacher's size
    ((8, 4, 4), (12, 8, 8), "deconv4x4_s2", (4, 4), (2, 2)),      # student half the teacher's size
    ((8, 8, 8), (12, 8, 8), "conv", (1, 1), (1, 1)),              # equal sizes: 1×1
    ((8, 10, 10), (12, 8, 8), "conv", (3, 3), (1, 1)),            # slightly larger: (1+H_s−H_t) kernel
    ((8, 4, 4), (12, 14, 14), "conv1x1", (1, 1), (1, 1)),         # smaller, not half: 1×1 + resize [interp]
])
def test_convreg_choice_and_output_shape(s_shape, t_shape, kind, kernel, stride):
    torch.manual_seed(0)
    reg = ConvReg(s_shape, t_shape)
    assert reg.kind == kind
    assert tuple(reg.conv.kernel_size) == kernel and tuple(reg.conv.stride) == stride
    assert reg.conv.bias is not None and isinstance(reg.bn, torch.nn.BatchNorm2d)
    out = reg(torch.randn(3, *s_shape))
    assert out.shape == (3, *t_shape)
    assert (out >= 0).all() and (out == 0).any()  # ends in a ReLU
    plain = ConvReg(s_shape, t_shape, use_relu=False)
    assert (plain(torch.randn(3, *s_shape)) < 0).any()


S_STAGES = [(8, 16, 16), (16, 8, 8), (32, 4, 4)]
T_STAGES = [(12, 16, 16), (24, 8, 8), (48, 4, 4)]


def _fit_ctx(s=S_STAGES, t=T_STAGES):
    return _ctx({("student", "stages_raw"): s, ("teacher", "stages_raw"): t})


def test_fitnet_method_wiring_hint_layer_and_grads():
    torch.manual_seed(0)
    d = FitNet.check_params({})
    assert d == {"hint_layer": 2, "weight": 100.0, "ce_weight": 1.0, "use_relu": True}
    m = FitNet(_fit_ctx())
    assert m.taps().student == ("stages_raw",) and m.taps().teacher == ("stages_raw",)
    assert m.regressor.kind == "conv" and m.regressor.conv.in_channels == 16 and m.regressor.conv.out_channels == 24
    fs = [torch.randn(2, *sh).requires_grad_(True) for sh in S_STAGES]
    ft = [torch.randn(2, *sh) for sh in T_STAGES]
    out = m(Outputs(logits=None, feats={"stages_raw": fs}), Outputs(logits=None, feats={"stages_raw": ft}), None)
    assert set(out) == {"loss_fitnet"}
    expected = 100.0 * ((m.regressor(fs[1]) - ft[1]) ** 2).mean()  # stage 2 = index 1 on both sides
    assert out["loss_fitnet"].item() == pytest.approx(expected.item(), rel=1e-5)
    out["loss_fitnet"].backward()
    assert fs[1].grad is not None and fs[1].grad.abs().sum() > 0 and fs[0].grad is None and fs[2].grad is None
    assert all(p.grad is not None for p in m.parameters())
    # hint layer 3 (stride-1 conv on 4×4 maps); 1-based and bounded by the shorter network
    m3 = FitNet(_fit_ctx(), hint_layer=3)
    assert m3.regressor.conv.in_channels == 32 and m3.regressor.conv.out_channels == 48
    m1 = FitNet(_fit_ctx(s=[(8, 32, 32)] + S_STAGES[1:]), hint_layer=1)
    assert m1.regressor.kind == "conv3x3_s2"
    for bad in (0, 4):
        with pytest.raises(ValueError, match="hint_layer"):
            FitNet(_fit_ctx(), hint_layer=bad)
    assert FitNet(_fit_ctx(), ce_weight=0.2).task_loss_weight == 0.2


# -- through the harness ----------------------------------------------------------------------------

VIT = ("timm:vit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2))


def _data(n=8, size=32):
    return random_classification_data(n, size, K)


def _train(name: str, params: dict, teacher_kind: str = "cnn", steps: int = 3, epoch: int = 1):
    """``steps`` SGD steps of ``kdbench.step.train_step`` on a tiny pair; returns the method, the student's and
    the method's parameters before and after, and each step's terms."""
    torch.manual_seed(0)
    task, data = ClassificationTask(), _data()
    student = build_model("kdbench:resnet8", K, 3)
    if teacher_kind == "cnn":
        teacher = build_model("kdbench:resnet14", K, 3)
    else:
        teacher = build_model(VIT[0], K, 3, **VIT[1])
    teacher.eval().requires_grad_(False)
    ctx = build_context(task, data, {"epochs": 2, "batch_size": 4}, student, teacher, torch.device("cpu"))
    cls = METHODS.get(name)
    method = cls(ctx, **cls.check_params(params))
    student.train()
    method.train()
    params_all = list(student.parameters()) + list(method.parameters())
    before = [p.detach().clone() for p in params_all]
    opt = torch.optim.SGD(params_all, lr=0.05, momentum=0.9)
    terms = []
    for step in range(steps):
        idx = [(4 * step + i) % len(data.train) for i in range(4)]
        x = torch.stack([data.train[i][0] for i in idx])
        y = torch.stack([data.train[i][1] for i in idx])
        out = train_step(student, teacher, method, task,
                         Batch(inputs=x, targets=y, epoch=epoch, step=step, epochs=2, steps_per_epoch=steps),
                         optimizer=opt)
        terms.append({k: float(v.detach()) for k, v in out.terms.items()})
    assert all(p.grad is None for p in teacher.parameters())
    return method, student, before, params_all, terms


@pytest.mark.parametrize("name, params, key", [
    ("dkd", {"warmup": 2}, "loss_dkd"),
    ("dist", {}, "loss_dist"),
    ("fitnet", {}, "loss_fitnet"),
])
def test_training_steps_through_the_harness(name, params, key):
    method, student, before, after, terms = _train(name, params)
    assert all(set(t) == {key} and math.isfinite(t[key]) and t[key] > 0 for t in terms)
    n_student = len(list(student.parameters()))
    assert any(not torch.equal(b, a.detach()) for b, a in zip(before[:n_student], after[:n_student]))
    if name == "fitnet":  # the regressor is trained with the student
        assert all(not torch.equal(b, a.detach()) for b, a in zip(before[n_student:], after[n_student:]))
    if name == "dkd":  # epoch 1 of a 2-epoch warm-up: half the loss
        assert method.warmup_factor(1) == 0.5


def test_fitnet_vit_teacher_cnn_student_through_the_harness():
    method, student, before, after, terms = _train("fitnet", {"use_relu": False}, teacher_kind="vit")
    # resnet8 stage 2: 32×16×16; ViT blocks grouped into stages, tokens folded onto the 8×8 patch grid: 32×8×8
    assert method.regressor.kind == "conv3x3_s2"
    assert (method.regressor.conv.in_channels, method.regressor.conv.out_channels) == (32, 32)
    assert all(math.isfinite(t["loss_fitnet"]) for t in terms)
    n_student = len(list(student.parameters()))
    assert all(not torch.equal(b, a.detach()) for b, a in zip(before[n_student:], after[n_student:]))
