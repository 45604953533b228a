"""FreeKD (docs/methods.md §7) and AFP (§9): pure losses, prompts, gates, stage 1 and the Distillers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.channel_gates import (
    ChannelGate,
    RelationalGates,
    next_level_context,
    relational_attention,
    renormalise_gates,
)
from kdbench.featuremap import reg_kd_loss
from kdbench.freq import band_sets, clamp_levels, haar_wavedec2d, haar_waverec2d, reconstruct_from_sets
from kdbench.method import Batch, Context, Outputs
from kdbench.methods.afp import AFP, AdaptivePromptSet, afp_loss
from kdbench.methods.freekd import FreeKD, freekd_loss
from kdbench.prompt_losses import dice_dissimilarity, jaccard_dissimilarity, masked_band_l1
from kdbench.prompts import PromptSet, prompt_masks, prompted_reconstruction

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------------------
# reference implementations with explicit loops
# ------------------------------------------------------------------------------------------------
def _haar_loop(x):
    """One Haar level on an even-sized N×C×H×W tensor with explicit loops over 2×2 blocks (§6)."""
    n, c, h, w = x.shape
    out = [torch.zeros(n, c, h // 2, w // 2, dtype=torch.float64) for _ in range(4)]
    for i in range(n):
        for k in range(c):
            for y in range(h // 2):
                for z in range(w // 2):
                    a, b = x[i, k, 2 * y, 2 * z], x[i, k, 2 * y, 2 * z + 1]
                    cc, d = x[i, k, 2 * y + 1, 2 * z], x[i, k, 2 * y + 1, 2 * z + 1]
                    out[0][i, k, y, z] = (a + b + cc + d) / 2
                    out[1][i, k, y, z] = (a + b - cc - d) / 2
                    out[2][i, k, y, z] = (a - b + cc - d) / 2
                    out[3][i, k, y, z] = (a - b - cc + d) / 2
    return out


def _freekd_loss_loops(s, t, prompts, levels):
    s, t = s.double(), t.double()
    total = 0.0
    ll_s, ll_t = s, t
    for j in range(levels):
        bs, bt = _haar_loop(ll_s), _haar_loop(ll_t)
        ll_s, ll_t = bs[0], bt[0]
        p = prompts[j].double()
        n, c, h, w = bs[1].shape
        tt = p.shape[0]
        acc, count = 0.0, 0
        for i in range(n):
            for tau in range(tt):
                for y in range(h):
                    for z in range(w):
                        r = sum(p[tau, k] * (bt[1][i, k, y, z] + bt[2][i, k, y, z] + bt[3][i, k, y, z])
                                for k in range(c))
                        m = 1.0 / (1.0 + torch.exp(-r))
                        for k in range(c):
                            for o in (1, 2, 3):
                                acc += abs(m * (bs[o][i, k, y, z] - bt[o][i, k, y, z]))
                                count += 1
        total += acc / count
    return float(total)


def test_freekd_loss_hand_value_explicit_loops():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g)
    prompts = [torch.randn(2, 2, generator=g) for _ in range(2)]
    got = freekd_loss(s, t, prompts, 2)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(_freekd_loss_loops(s, t, prompts, 2), rel=1e-5)


def test_freekd_loss_matches_released_code_with_pytorch_wavelets():
    """The release: DWTForward(J=3, haar, zero); masks from the orientation-summed teacher band;
    l1_loss over the N×T×C×3×h×w masked bands of each level (odd intermediate sizes included)."""
    pw = pytest.importorskip("pytorch_wavelets")
    g = torch.Generator().manual_seed(1)
    n, c, t_tok = 2, 3, 2
    s, t = torch.randn(n, c, 12, 10, generator=g), torch.randn(n, c, 12, 10, generator=g)
    tokens = torch.randn(4, t_tok, c, generator=g)
    xfm = pw.DWTForward(J=3, mode="zero", wave="haar")
    _, yh_t = xfm(t)
    _, yh_s = xfm(s)
    ref = 0.0
    for j in range(3):
        h, w = yh_t[j].shape[-2:]
        mask = torch.sigmoid(tokens[j + 1].expand(n, -1, -1) @ yh_t[j].sum(2).reshape(n, c, -1)).reshape(n, t_tok, h, w)
        m = mask[:, :, None, None]
        ref = ref + F.l1_loss(yh_s[j].unsqueeze(1) * m, yh_t[j].unsqueeze(1) * m)
    got = freekd_loss(s, t, list(tokens[1:]), 3)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_freekd_loss_zero_for_identical_and_ignores_low_band():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2, 3, 8, 8, generator=g)
    prompts = [torch.randn(2, 3, generator=g) for _ in range(3)]
    assert freekd_loss(t.clone(), t, prompts, 3).item() == 0.0
    # a student differing only in LL_3 (and a per-(n,c) constant, which lives in LL only)
    ll, highs = haar_wavedec2d(t, 3)
    s = haar_waverec2d(ll + torch.randn(ll.shape, generator=g), highs)
    assert freekd_loss(s, t, prompts, 3).item() == pytest.approx(0.0, abs=1e-6)
    assert freekd_loss(t + torch.randn(2, 3, 1, 1, generator=g), t, prompts, 3).item() == pytest.approx(0.0, abs=1e-6)
    # ...but FreeKD-P's include_low sees it, and any high-band change is seen
    low = torch.randn(2, 3, generator=g)
    assert freekd_loss(s, t, prompts, 3, low_prompt=low).item() > 1e-3
    assert freekd_loss(t + 0.1 * torch.randn(t.shape, generator=g), t, prompts, 3).item() > 1e-3


def test_freekd_mask_shared_across_orientations():
    """The same difference placed in LH_1 or in HH_1 at one position costs the same: one mask per level
    (from the teacher's orientation sum) weights all three orientations."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(1, 2, 8, 8, generator=g)
    prompts = [torch.randn(2, 2, generator=g) for _ in range(2)]
    sets = band_sets(t, 2)
    ones = [torch.ones(1, *s.shape[-2:]) for s in sets]
    losses = []
    for o in range(3):
        moved = [x.clone() for x in sets]
        moved[1][0, 1, o, 2, 3] += 0.7
        s = reconstruct_from_sets(moved, ones, (8, 8))
        losses.append(freekd_loss(s, t, prompts, 2).item())
    assert losses[0] > 0
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0] == pytest.approx(losses[2], rel=1e-5)
    # and the value is the mask at that position × 0.7 / #elements of the level-1 sets
    m = prompt_masks(prompts[0], sets[1].sum(2))[0, :, 2, 3].mean().item()
    assert losses[0] == pytest.approx(m * 0.7 / (2 * 3 * 4 * 4), rel=1e-4)


def test_freekd_loss_means_over_tokens():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    p1, p2 = [torch.randn(1, 3, generator=g) for _ in range(2)], [torch.randn(1, 3, generator=g) for _ in range(2)]
    both = [torch.cat([a, b]) for a, b in zip(p1, p2)]
    l1, l2, l12 = (freekd_loss(s, t, p, 2).item() for p in (p1, p2, both))
    assert l12 == pytest.approx((l1 + l2) / 2, rel=1e-5)
    dup = [torch.cat([a, a, a]) for a in p1]  # a mean, not a sum, over tokens
    assert freekd_loss(s, t, dup, 2).item() == pytest.approx(l1, rel=1e-5)


def test_masked_band_l1_weights_and_shapes():
    g = torch.Generator().manual_seed(5)
    bs, bt = torch.randn(2, 3, 3, 2, 2, generator=g), torch.randn(2, 3, 3, 2, 2, generator=g)
    mask = torch.rand(2, 4, 2, 2, generator=g)
    base = masked_band_l1(bs, bt, mask)
    ref = ((bs - bt).abs() * mask.mean(1)[:, None, None]).mean()
    assert base.item() == pytest.approx(ref.item(), rel=1e-6)
    assert masked_band_l1(bs, bt, mask, torch.ones(2, 3)).item() == pytest.approx(base.item(), rel=1e-6)
    w = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # only sample 0, channel 0 counts, ×3
    ref_w = 3 * ((bs - bt).abs()[0, 0] * mask.mean(1)[0]).sum() / bs.numel()
    assert masked_band_l1(bs, bt, mask, w).item() == pytest.approx(ref_w.item(), rel=1e-6)
    with pytest.raises(ValueError):
        masked_band_l1(bs, bt[:, :2], mask)
    with pytest.raises(ValueError):
        masked_band_l1(bs, bt, mask[..., :1])


def test_clamp_levels():
    assert clamp_levels(3, (8, 8)) == 3 and clamp_levels(3, (7, 7)) == 2 and clamp_levels(3, (4, 9)) == 2
    assert clamp_levels(3, (1, 5)) == 0 and clamp_levels(2, (64, 64)) == 2
    with pytest.raises(ValueError):
        clamp_levels(0, (8, 8))


# ------------------------------------------------------------------------------------------------
# prompts, reconstruction, dissimilarities
# ------------------------------------------------------------------------------------------------
def test_prompt_set_init_scale_and_layout():
    torch.manual_seed(0)
    ps = PromptSet(channels=512, num_tokens=4, levels=3)
    assert tuple(ps.tokens.shape) == (4, 4, 512)
    assert abs(ps.tokens.mean().item()) < 1e-3 and 0.0095 < ps.tokens.std().item() < 0.0105
    assert ps.low_prompt.data_ptr() == ps.tokens[0].data_ptr()
    assert [p.data_ptr() for p in ps.level_prompts()] == [ps.tokens[j].data_ptr() for j in (1, 2, 3)]


def test_prompted_reconstruction_identities():
    g = torch.Generator().manual_seed(6)
    for size in ((8, 8), (7, 5)):
        f = torch.randn(2, 3, *size, generator=g)
        zero2 = [torch.zeros(2, 3) for _ in range(4)]  # σ(0)=½, two tokens: Σ_τ = 1 -> perfect reconstruction
        levels = clamp_levels(3, size)
        f_hat, masks = prompted_reconstruction(f, zero2[: levels + 1], levels)
        assert f_hat.shape == f.shape and torch.allclose(f_hat, f, atol=1e-5)
        assert len(masks) == levels + 1 and masks[0].shape[1] == 2
        zero4 = [torch.zeros(4, 3) for _ in range(levels + 1)]  # Σ_τ of four ½ masks = 2
        assert torch.allclose(prompted_reconstruction(f, zero4, levels)[0], 2 * f, atol=1e-5)
    # huge positive LL tokens on a positive map keep LL×T, huge negative high tokens cannot zero mixed-sign bands
    f = torch.rand(1, 2, 8, 8, generator=g) + 0.5
    p_ll = torch.full((2, 2), 50.0)
    pr = [p_ll, torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2)]
    f_hat, _ = prompted_reconstruction(f, pr, 3)
    ll_hat, _ = haar_wavedec2d(f_hat, 3)
    ll, _ = haar_wavedec2d(f, 3)
    assert torch.allclose(ll_hat, 2 * ll, atol=1e-4)
    # the module reproduces the pure function and returns the summed Dice over the 4 sets
    ps = PromptSet(2, 2, 3)
    ps.tokens.data.normal_(generator=g)
    f_mod, dis = ps.reconstruct(f)
    f_fun, masks = prompted_reconstruction(f, list(ps.tokens), 3)
    assert torch.allclose(f_mod, f_fun)
    assert dis.item() == pytest.approx(sum(dice_dissimilarity(m) for m in masks).item())


def test_prompted_reconstruction_matches_released_stage1_code():
    pw = pytest.importorskip("pytorch_wavelets")
    g = torch.Generator().manual_seed(7)
    n, c, t_tok = 2, 3, 2
    x = torch.randn(n, c, 16, 16, generator=g)
    tokens = torch.randn(4, t_tok, c, generator=g)
    ca, yh = pw.DWTForward(J=3, mode="zero", wave="haar")(x)

    def mask(band, tok):
        h, w = band.shape[-2:]
        return torch.sigmoid(tok.expand(n, -1, -1) @ band.reshape(n, c, -1)).reshape(n, t_tok, h, w)

    out_a = (ca.unsqueeze(1) * mask(ca, tokens[0]).unsqueeze(2)).sum(1)
    outs = [(b.unsqueeze(1) * mask(b.sum(2), tokens[j + 1])[:, :, None, None]).sum(1) for j, b in enumerate(yh)]
    ref = pw.DWTInverse(mode="zero", wave="haar")((out_a, outs))
    got, _ = prompted_reconstruction(x, list(tokens), 3)
    assert torch.allclose(got, ref, atol=1e-5)


def test_dice_hand_values():
    """Dice as the released code (§7.2-7): mean over n and the ordered pairs i≠j."""
    m = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]]).reshape(2, 2, 1, 2)
    # sample 0: 2·1/(1+2) = 2/3 ; sample 1: identical masks -> 1 ; mean over n and both ordered pairs
    assert dice_dissimilarity(m).item() == pytest.approx((2 / 3 + 1) / 2, rel=1e-6)
    disjoint = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    assert dice_dissimilarity(disjoint).item() == 0.0
    assert dice_dissimilarity(torch.rand(2, 1, 3, 3)).item() == 0.0  # a single token has no pair
    # 3 tokens: off-diagonal mean (6 ordered pairs), not including the diagonal
    three = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).reshape(1, 3, 1, 2)
    assert dice_dissimilarity(three).item() == pytest.approx(2 / 6)


def test_jaccard_hand_values_include_the_diagonal():
    """Jaccard as defined (§7.1): L_dis = (1/T²)·Σ_i Σ_j J(M_i, M_j) with J = Σmin/Σmax, i = j included,
    averaged over the samples."""
    # one sample, T = 2, soft masks over 2 positions: m_1 = [0.2, 0.8], m_2 = [0.6, 0.4]
    #   J(m_1, m_2) = (min(.2,.6) + min(.8,.4)) / (max(.2,.6) + max(.8,.4)) = (0.2 + 0.4) / (0.6 + 0.8) = 3/7
    #   J(m_1, m_1) = J(m_2, m_2) = 1
    #   L = (1/4)·(1 + 3/7 + 3/7 + 1) = (1/4)·(20/7) = 5/7   (the off-diagonal mean would be 3/7)
    soft = torch.tensor([[0.2, 0.8], [0.6, 0.4]]).reshape(1, 2, 1, 2)
    assert jaccard_dissimilarity(soft).item() == pytest.approx(5 / 7, rel=1e-6)
    # two samples: sample 0 binary m_1 = [1, 0], m_2 = [1, 1]: J = 1/2 -> (1/4)(1 + 1/2 + 1/2 + 1) = 3/4;
    # sample 1 two identical masks: every J = 1 -> 1; the mean over samples = (3/4 + 1)/2 = 7/8
    m = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]]).reshape(2, 2, 1, 2)
    assert jaccard_dissimilarity(m).item() == pytest.approx(7 / 8, rel=1e-6)
    # T = 3: [1,0], [1,0], [0,1]: J matrix [[1,1,0],[1,1,0],[0,0,1]] sums to 5 -> 5/9
    three = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).reshape(1, 3, 1, 2)
    assert jaccard_dissimilarity(three).item() == pytest.approx(5 / 9, rel=1e-6)
    # disjoint masks: only the diagonal counts, (1/4)(1 + 0 + 0 + 1) = 1/2; a single token: J(m, m) = 1
    disjoint = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    assert jaccard_dissimilarity(disjoint).item() == pytest.approx(0.5, rel=1e-6)
    assert jaccard_dissimilarity(torch.rand(2, 1, 3, 3) + 0.1).item() == pytest.approx(1.0, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# FreeKD-P gates
# ------------------------------------------------------------------------------------------------
def test_relational_attention_and_gates():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).reshape(1, 2, 1, 2)  # C=2, HW=2
    psi = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    a = relational_attention(f, psi)
    # ψFᵀ = [[1, 2], [0, 2]] -> row-wise softmax
    ref = torch.softmax(torch.tensor([[1.0, 2.0], [0.0, 2.0]]), dim=-1)
    assert torch.allclose(a[0], ref, atol=1e-6)
    w = torch.rand(3, 5) + 0.01
    r = renormalise_gates(w)
    assert torch.allclose(r.mean(1), torch.ones(3), atol=1e-6) and torch.allclose(r / w, (r / w)[:, :1].expand(3, 5))
    gate = ChannelGate(24)
    assert gate.mlp[0].out_features == 8 and ChannelGate(256).mlp[0].out_features == 16
    out = gate(torch.softmax(torch.randn(2, 24, 24), -1))
    assert out.shape == (2, 24) and bool(((out > 0) & (out < 1)).all())
    g = RelationalGates(6)
    fs, ft = torch.randn(2, 6, 4, 4, requires_grad=True), torch.randn(2, 6, 4, 4)
    om = g(fs, ft, fs, ft)
    assert om.shape == (2, 6) and torch.allclose(om.mean(1), torch.ones(2), atol=1e-5)
    om.pow(2).sum().backward()
    assert fs.grad is not None and all(p.grad is not None for p in g.parameters())


def test_next_level_context():
    a, b, c = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4), torch.randn(1, 6, 2, 2)
    ctx = next_level_context([a, b, c])
    assert torch.allclose(ctx[0], F.interpolate(b, size=(8, 8), mode="bilinear", align_corners=False))
    assert ctx[1] is b and ctx[2] is c  # different channels / coarsest level: ψ(F) = F


# ------------------------------------------------------------------------------------------------
# Distillers
# ------------------------------------------------------------------------------------------------
def _ctx(shapes: dict, task="classification", task_loss=None):
    def probe(side, tap):
        if (side, tap) not in shapes:
            raise KeyError(f"tap {tap!r} was not requested")
        return shapes[(side, tap)]

    return Context(task=task, num_classes=3, epochs=10, steps_per_epoch=5, dataset_size=100, probe=probe,
                   task_loss=task_loss)


def _batch():
    return Batch(inputs=None, targets=torch.tensor([0, 1]), epoch=1, step=0, epochs=10, steps_per_epoch=5)


def _outs(tap, shapes, grad=False, seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(n, *sh, generator=g).requires_grad_(grad) for sh in shapes]
    return Outputs(logits=torch.randn(n, 3, generator=g), feats={tap: feats})


def _loaded(m):
    m.load_stage({k: v.clone() for k, v in m._seeded_prompts().state_dict().items()})
    return m


FINAL = {("student", "final"): [(5, 8, 8)], ("teacher", "final"): [(6, 8, 8)]}


def test_freekd_code_variant_value_and_gradients():
    m = FreeKD(_ctx(FINAL))
    assert m.taps().student == ("final",) and m.taps().teacher == ("final",) and m.mu == 1.0
    s, t = _outs("final", [(5, 8, 8)], grad=True, seed=1), _outs("final", [(6, 8, 8)], seed=2)
    with pytest.raises(RuntimeError, match="stage-1"):
        m(s, t, _batch())
    _loaded(m)
    assert all(not p.requires_grad for p in m.prompts.parameters())
    out = m(s, t, _batch())
    assert set(out) == {"loss_freekd", "loss_mse"} and all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    proj = m.phi[0](s["final"][0])
    ps = m.prompts["0"]
    assert out["loss_freekd"].item() == pytest.approx(freekd_loss(proj, t["final"][0], ps.level_prompts(), 3).item(),
                                                      rel=1e-5)
    assert out["loss_mse"].item() == pytest.approx(F.mse_loss(proj, t["final"][0]).item(), rel=1e-5)
    sum(out.values()).backward()
    assert s["final"][0].grad.abs().sum() > 0 and m.phi[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.prompts.parameters())
    m2 = _loaded(FreeKD(_ctx(FINAL), mask_weight=3.0, mse_weight=0.5))
    m2.load_state_dict(m.state_dict())
    out2 = m2(s, t, _batch())
    assert out2["loss_freekd"].item() == pytest.approx(3 * out["loss_freekd"].item(), rel=1e-5)
    assert out2["loss_mse"].item() == pytest.approx(0.5 * out["loss_mse"].item(), rel=1e-5)


def test_freekd_params_and_defaults():
    with pytest.raises(ValueError, match="unknown parameter"):
        FreeKD.check_params({"mu": 1.0})
    assert FreeKD.check_params({"variant": "paper"})["variant"] == "paper"
    for bad in ({"variant": "both"}, {"dissimilarity": "cos"}, {"include_low": True}, {"stage_optimizer": "lbfgs"}):
        with pytest.raises(ValueError):
            FreeKD(_ctx(FINAL), **bad)
    fpn = {("student", "fpn"): [(4, 16, 16), (4, 8, 8), (4, 4, 4), (4, 2, 2), (4, 1, 1)],
           ("teacher", "fpn"): [(4, 16, 16), (4, 8, 8), (4, 4, 4), (4, 2, 2), (4, 1, 1)]}
    det = FreeKD(_ctx(fpn, task="detection"))
    # J = levels on every FPN level, 1×1 included, as the release's DWTForward(J=3, mode='zero')
    assert det.tap == "fpn" and det.mu == 5.0 and det.map_levels == [3] * 5 and not det.use_reg
    assert sorted(det.prompts) == ["0", "1", "2", "3", "4"] and len(det.phi) == 5
    assert FreeKD(_ctx(fpn, task="detection"), levels=2).map_levels == [2] * 5
    seg = {("student", "stages"): [(3, 8, 8), (5, 4, 4)], ("teacher", "stages"): [(4, 8, 8), (6, 4, 4), (7, 4, 4)],
           ("student", "final"): [(5, 4, 4)], ("teacher", "final"): [(7, 4, 4)]}
    m = FreeKD(_ctx(seg, task="segmentation"))  # the backbone's last stage
    assert m.tap == "final" and m.s_index == [0] and m.t_index == [0] and m.mu == 5.0 and m.map_levels == [3]
    m = FreeKD(_ctx(seg, task="segmentation"), tap="stages")  # every stage, paired deepest-aligned
    assert m.s_index == [0, 1] and m.t_index == [1, 2] and m.map_levels == [3, 3] and len(m.phi) == 2
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="positive integer"):
            FreeKD(_ctx(FINAL), levels=bad)


def test_freekd_small_maps_get_all_levels_as_the_release():
    """A 4×4 and a 3×5 map (under 2³ a side) still get the release's three Haar levels: the method's loss is
    the released-code computation with pytorch_wavelets' DWTForward(J=3, haar, zero) of φ(F^s) and F^t."""
    pw = pytest.importorskip("pytorch_wavelets")
    xfm = pw.DWTForward(J=3, mode="zero", wave="haar")
    for size in ((4, 4), (3, 5)):
        shapes = {("student", "final"): [(5, *size)], ("teacher", "final"): [(6, *size)]}
        m = _loaded(FreeKD(_ctx(shapes)))
        assert m.map_levels == [3] and len(m.prompts["0"].level_prompts()) == 3
        s, t = _outs("final", [(5, *size)], seed=7), _outs("final", [(6, *size)], seed=8)
        out = m(s, t, _batch())
        with torch.no_grad():
            proj = m.phi[0](s["final"][0])
            _, yh_s = xfm(proj)
            _, yh_t = xfm(t["final"][0])
            ref = 0.0
            for j, tok in enumerate(m.prompts["0"].level_prompts()):
                n, c, _, h, w = yh_t[j].shape
                mask = torch.sigmoid(tok.expand(n, -1, -1) @ yh_t[j].sum(2).reshape(n, c, -1)).reshape(n, -1, h, w)
                mk = mask[:, :, None, None]
                ref = ref + F.l1_loss(yh_s[j].unsqueeze(1) * mk, yh_t[j].unsqueeze(1) * mk)
        assert out["loss_freekd"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_afp_caps_levels_on_small_maps():
    """AFP (§9) keeps J = min(levels, ⌊log2 min(H, W)⌋) per map: a map with a 1-pixel side gets no DWT level."""
    shapes = {("student", "stages"): [(4, 8, 8), (4, 4, 4)], ("teacher", "stages"): [(4, 8, 8), (4, 4, 4)]}
    assert AFP(_ctx(shapes)).map_levels == [3, 2]
    with pytest.raises(ValueError, match="large enough"):
        AFP(_ctx({("student", "stages"): [(4, 1, 1)], ("teacher", "stages"): [(4, 1, 1)]}))


def test_freekd_detection_fpn_reg_and_resizing():
    shp_s = [(4, 8, 8), (4, 4, 4)]
    shp_t = [(4, 8, 8), (4, 4, 4)]
    shapes = {("student", "fpn"): shp_s, ("teacher", "fpn"): shp_t,
              ("student", "reg"): [(8, 8, 8), (8, 4, 4)], ("teacher", "reg"): [(8, 8, 8), (8, 4, 4)]}
    m = _loaded(FreeKD(_ctx(shapes, task="detection")))
    assert m.use_reg and m.taps().student == ("fpn", "reg")
    s, t = _outs("fpn", shp_s, grad=True, seed=3), _outs("fpn", shp_t, seed=4)
    s.feats["reg"] = [torch.randn(2, 8, 8, 8, requires_grad=True), torch.randn(2, 8, 4, 4, requires_grad=True)]
    t.feats["reg"] = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    out = m(s, t, _batch())
    assert set(out) == {"loss_freekd", "loss_mse", "loss_reg"}
    ref = sum(F.smooth_l1_loss(a, b) for a, b in zip(s["reg"], t["reg"]))
    assert out["loss_reg"].item() == pytest.approx(ref.item(), rel=1e-6) == reg_kd_loss(s["reg"], t["reg"]).item()
    assert out["loss_mse"].item() == pytest.approx(
        5 * sum(F.mse_loss(p(x), y) for p, x, y in zip(m.phi, s["fpn"], t["fpn"])).item(), rel=1e-5)
    sum(out.values()).backward()
    assert all(f.grad is not None for f in s["fpn"] + s["reg"])
    # without a reg tap the term is skipped cleanly; a student map of another size is resized to the teacher
    m2 = _loaded(FreeKD(_ctx({("student", "fpn"): [(3, 4, 4)], ("teacher", "fpn"): [(4, 8, 8)]}, task="detection")))
    assert not m2.use_reg and m2.taps().student == ("fpn",)
    out2 = m2(_outs("fpn", [(3, 4, 4)], seed=5), _outs("fpn", [(4, 8, 8)], seed=6), _batch())
    assert set(out2) == {"loss_freekd", "loss_mse"} and all(torch.isfinite(v) for v in out2.values())


def test_freekd_paper_variant_gates_and_low_band():
    shp = [(4, 8, 8), (4, 4, 4)]
    shapes = {("student", "fpn"): shp, ("teacher", "fpn"): shp}
    m = _loaded(FreeKD(_ctx(shapes, task="detection"), variant="paper", mse_weight=2.0))
    s, t = _outs("fpn", shp, grad=True, seed=7), _outs("fpn", shp, seed=8)
    out = m(s, t, _batch())
    assert set(out) == {"loss_freekd"} and torch.isfinite(out["loss_freekd"])
    proj = [phi(x) for phi, x in zip(m.phi, s["fpn"])]
    cs, ct = next_level_context(proj), next_level_context(t["fpn"])
    ref = 0.0
    for k, ps in m.prompts.items():
        i = int(k)
        w = m.gates[k](proj[i], t["fpn"][i], cs[i], ct[i])
        assert torch.allclose(w.mean(1), torch.ones(2), atol=1e-5)  # renormalised to mean 1 per sample
        ref = ref + freekd_loss(proj[i], t["fpn"][i], ps.level_prompts(), ps.levels, channel_weights=w)
    assert out["loss_freekd"].item() == pytest.approx(2.0 * ref.item(), rel=1e-5)
    out["loss_freekd"].backward()
    for gates in m.gates.values():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.parameters())
    assert all(f.grad.abs().sum() > 0 for f in s["fpn"])
    low = _loaded(FreeKD(_ctx(shapes, task="detection"), variant="paper", include_low=True))
    low.load_state_dict(m.state_dict())
    assert low(s, t, _batch())["loss_freekd"].item() > out["loss_freekd"].item() / 2.0


# ------------------------------------------------------------------------------------------------
# stage 1 on a tiny teacher
# ------------------------------------------------------------------------------------------------
class TinyTeacher(nn.Module):
    """Two conv stages + linear head; ``tap_modules`` exposes the stage modules."""

    def __init__(self, k=3):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, k)

    def forward(self, x, taps=()):
        f1 = self.stage1(x)
        f2 = self.stage2(f1)
        feats = {}
        if "stages" in taps:
            feats["stages"] = [f1, f2]
        if "final" in taps:
            feats["final"] = [f2]
        return Outputs(logits=self.fc(f2.mean((2, 3))), feats=feats)

    def tap_modules(self, tap):
        return {"stages": [self.stage1, self.stage2], "final": [self.stage2]}[tap]


def _loader(n_batches=3, bs=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, size, size, generator=g), torch.randint(0, 3, (bs,), generator=g))
            for _ in range(n_batches)]


def _ce(out, y):
    return F.cross_entropy(out.logits, y)


def _teacher():
    torch.manual_seed(0)
    t = TinyTeacher()
    t.stage2[0].weight.requires_grad_(True)  # flags must come back as they were
    t.fc.weight.requires_grad_(False)
    t.train()
    return t


def test_freekd_stage1_trains_prompts_only_and_is_deterministic():
    teacher = _teacher()
    before = copy.deepcopy(teacher.state_dict())
    flags = [p.requires_grad for p in teacher.parameters()]
    shapes = {("student", "final"): [(5, 8, 8)], ("teacher", "final"): [(6, 8, 8)]}
    m = FreeKD(_ctx(shapes, task_loss=_ce), stage_iters=20, stage_lr=0.05)
    cfg = m.stage_config()
    json.dumps(cfg)
    assert cfg["iters"] == 20 and cfg["tap"] == "final" and cfg["levels"] == {"0": 3} and cfg["num_tokens"] == 2
    init = m.prompts["0"].tokens.detach().clone()
    state = m.run_stage(teacher, _loader(), torch.device("cpu"))
    log = m.stage_log
    assert len(log) == 20 and all(map(lambda v: v == v, log))
    assert sum(log[-5:]) / 5 < sum(log[:5]) / 5  # the stage objective goes down
    assert not torch.allclose(state["0.tokens"], init)
    # teacher untouched: weights, requires_grad flags, training mode, no hooks left
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert [p.requires_grad for p in teacher.parameters()] == flags and teacher.training
    assert not teacher.stage2._forward_hooks
    # deterministic given the stage config and the data
    state2 = FreeKD(_ctx(shapes, task_loss=_ce), stage_iters=20, stage_lr=0.05).run_stage(
        teacher, _loader(), torch.device("cpu"))
    assert torch.equal(state["0.tokens"], state2["0.tokens"])
    m.load_stage(state)
    assert torch.equal(m.prompts["0"].tokens, state["0.tokens"]) and not m.prompts["0"].tokens.requires_grad
    s, t = _outs("final", [(5, 8, 8)], grad=True), _outs("final", [(6, 8, 8)], seed=1)
    sum(m(s, t, _batch()).values()).backward()
    assert m.prompts["0"].tokens.grad is None
    with pytest.raises(RuntimeError, match="task loss"):
        FreeKD(_ctx(shapes), stage_iters=2).run_stage(teacher, _loader(), torch.device("cpu"))


# ------------------------------------------------------------------------------------------------
# AFP
# ------------------------------------------------------------------------------------------------
S_ST, T_ST = [(4, 16, 16), (5, 8, 8)], [(4, 16, 16), (6, 8, 8)]
AFP_SHAPES = {("student", "stages"): S_ST, ("teacher", "stages"): T_ST}


def test_adaptive_prompt_set_mix_and_identity():
    torch.manual_seed(0)
    aps = AdaptivePromptSet(channels=3, num_tokens=2, levels=2)
    g = torch.randn(2, 3, 4, 4)
    pi = aps.token_mix(1, g)
    assert pi.shape == (2, 2) and torch.allclose(pi.sum(1), torch.ones(2), atol=1e-6)
    # π one-hot on token 0 -> the loss of a single-token PromptSet with that token
    nn.init.zeros_(aps.prob[2].weight)
    with torch.no_grad():
        aps.prob[2].bias.copy_(torch.tensor([60.0, -60.0]))
    one = PromptSet(3, 1, 2)
    with torch.no_grad():
        one.tokens.copy_(aps.tokens[:, :1])
    fs, ft = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    w = renormalise_gates(torch.rand(2, 3) + 0.1)
    assert afp_loss(fs, ft, list(aps.tokens), 2, aps.token_mix, channel_weights=w).item() == pytest.approx(
        freekd_loss(fs, ft, one.level_prompts(), 2, channel_weights=w, low_prompt=one.low_prompt).item(), rel=1e-5)
    # π uniform -> the token mean: FreeKD's loss with the LL term
    nn.init.zeros_(aps.prob[2].bias)
    assert afp_loss(fs, ft, list(aps.tokens), 2, aps.token_mix, channel_weights=w).item() == pytest.approx(
        freekd_loss(fs, ft, aps.level_prompts(), 2, channel_weights=w, low_prompt=aps.low_prompt).item(), rel=1e-6)
    # reconstruction uses the π-weighted mask Σ_τ π_τ σ(M_τ): zero tokens -> ½·F
    with torch.no_grad():
        aps.tokens.zero_()
    f = torch.randn(1, 3, 8, 8)
    assert torch.allclose(aps.reconstruct(f)[0], 0.5 * f, atol=1e-5)


def test_afp_loss_value_gradients_and_params():
    m = AFP(_ctx(AFP_SHAPES))
    assert m.taps().student == ("stages",) and m.taps().teacher == ("stages",) and m.mu == 1.0
    assert m.map_levels == [3, 3] and sorted(m.prompts) == ["0", "1"]
    assert m.task_loss_weight == 1.0 and AFP(_ctx(AFP_SHAPES), ce_weight=0.5).task_loss_weight == 0.5
    with pytest.raises(ValueError, match="unknown parameter"):
        AFP.check_params({"mse_weight": 1.0})
    s, t = _outs("stages", S_ST, grad=True, seed=9), _outs("stages", T_ST, seed=10)
    with pytest.raises(RuntimeError):
        m(s, t, _batch())
    _loaded(m)
    assert all(not p.requires_grad for p in m.prompts.parameters())  # tokens and π frozen
    out = m(s, t, _batch())
    assert set(out) == {"loss_afp"} and out["loss_afp"].dim() == 0 and torch.isfinite(out["loss_afp"])
    # HFF: run-time cascade == ReviewFusion's own forward at the probed sizes, teacher-shaped outputs
    fused = m.hff(s["stages"], [f.shape[-2:] for f in t["stages"]])
    assert [tuple(o.shape[1:]) for o in fused] == T_ST
    assert all(torch.allclose(a, b) for a, b in zip(fused, m.hff(s["stages"])))
    with pytest.raises(ValueError, match="output sizes"):
        m.hff(s["stages"], [(16, 16)])
    # value: mu · Σ_l afp_loss(HFF_l, T_l, ω_l), LL included
    cs, ct = next_level_context(fused), next_level_context(t["stages"])
    ref = sum(afp_loss(fused[int(k)], t["stages"][int(k)], list(ps.tokens), ps.levels, ps.token_mix,
                       channel_weights=m.gates[k](fused[int(k)], t["stages"][int(k)], cs[int(k)], ct[int(k)]))
              for k, ps in m.prompts.items())
    assert out["loss_afp"].item() == pytest.approx(ref.item(), rel=1e-5)
    out["loss_afp"].backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in s["stages"])
    assert all(p.grad is not None for p in m.hff.parameters())
    assert all(p.grad is not None for p in m.gates.parameters())
    assert all(p.grad is None for p in m.prompts.parameters())
    m2 = _loaded(AFP(_ctx(AFP_SHAPES), mu=4.0))
    m2.load_state_dict(m.state_dict())
    assert m2(s, t, _batch())["loss_afp"].item() == pytest.approx(4 * out["loss_afp"].item(), rel=1e-5)
    # an LL-only difference is seen by AFP (LL_J distilled), unlike FreeKD-C
    ft = t["stages"][1]
    ll, highs = haar_wavedec2d(ft, 3)
    shifted = haar_waverec2d(ll + 1.0, highs)
    ps = m.prompts["1"]
    assert afp_loss(shifted, ft, list(ps.tokens), ps.levels, ps.token_mix).item() > 1e-3
    assert freekd_loss(shifted, ft, ps.level_prompts(), ps.levels).item() == pytest.approx(0.0, abs=1e-6)
    det = AFP(_ctx({("student", "fpn"): S_ST, ("teacher", "fpn"): [(4, 16, 16), (4, 8, 8)]}, task="detection"))
    assert det.mu == 10.0 and det.tap == "fpn"


def test_afp_stage1_trains_tokens_and_token_weights():
    teacher = _teacher()
    before = copy.deepcopy(teacher.state_dict())
    m = AFP(_ctx({("student", "stages"): [(3, 16, 16), (5, 8, 8)], ("teacher", "stages"): [(4, 16, 16), (6, 8, 8)]},
                 task_loss=_ce), stage_iters=10, stage_lr=0.01)
    assert m.stage_config()["prompt_set"] == "AdaptivePromptSet"
    init = {k: v.clone() for k, v in m.prompts.state_dict().items()}
    state = m.run_stage(teacher, _loader(), torch.device("cpu"))
    assert set(state) == set(init) and len(m.stage_log) == 10
    for key in ("0.tokens", "1.tokens", "0.prob.0.weight", "1.prob.2.bias"):
        assert not torch.allclose(state[key], init[key]), key
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.stage1._forward_hooks and not teacher.stage2._forward_hooks
    m.load_stage(state)
    assert all(not p.requires_grad for p in m.prompts.parameters())


# ------------------------------------------------------------------------------------------------
# the stage contract: stage_params are exactly the parameters that change the stage artifact
# ------------------------------------------------------------------------------------------------
STAGE_SHAPES = {("student", "final"): [(5, 8, 8)], ("teacher", "final"): [(6, 8, 8)],
                ("student", "stages"): [(3, 16, 16), (5, 8, 8)], ("teacher", "stages"): [(4, 16, 16), (6, 8, 8)]}
# a changed value for every parameter: stage parameters, then the others
STAGE_CHANGES = {
    "freekd": ({"num_tokens": 3, "levels": 2, "tap": "stages", "stage_iters": 4, "stage_lr": 0.01,
                "stage_optimizer": "sgd", "stage_seed": 1, "dissimilarity": "jaccard", "dis_weight": 2.0},
               {"variant": "paper", "mask_weight": 2.0, "mse_weight": 3.0, "reg_weight": 0.0, "include_low": True}),
    "afp": ({"num_tokens": 3, "levels": 2, "tap": "final", "stage_iters": 4, "stage_lr": 0.01,
             "stage_optimizer": "sgd", "stage_seed": 1, "dissimilarity": "jaccard", "dis_weight": 2.0},
            {"mu": 2.0, "ce_weight": 0.5, "reg_weight": 0.0}),
}


@pytest.mark.parametrize("cls", [FreeKD, AFP], ids=["freekd", "afp"])
def test_stage_params_are_exactly_what_changes_the_stage(cls):
    stage, others = STAGE_CHANGES[cls.registry_name]
    assert set(cls.stage_params) == set(stage) and set(stage) | set(others) == set(cls.param_defaults())
    base = {"stage_iters": 3, "stage_lr": 0.05}

    def artifact(**params):
        m = cls(_ctx(STAGE_SHAPES, task_loss=_ce), **{**base, **params})
        return m.run_stage(_teacher(), _loader(), torch.device("cpu"))

    def same(a, b):
        return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)

    ref = artifact()
    for name, value in others.items():
        extra = {"variant": "paper"} if name == "include_low" else {}
        assert same(artifact(**extra, **{name: value}), ref), f"{name} is not a stage parameter but changed the stage"
    for name, value in stage.items():
        assert not same(artifact(**{name: value}), ref), f"stage parameter {name} did not change the stage"
