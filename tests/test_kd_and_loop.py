"""KD's loss by hand, the LR schedule, feature taps by module path, and a method file dropped into methods/."""

import math
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

import kdbench.methods
from kdbench.methods.kd import kd_loss
from kdbench.models.sources import build_model
from kdbench.recipe import lr_factor


def test_kd_loss_hand_computed():
    zs = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]])
    zt = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    T = 2.0
    total = 0.0
    for n in range(2):
        ps = [math.exp(v / T) for v in zs[n].tolist()]
        pt = [math.exp(v / T) for v in zt[n].tolist()]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        total += sum(t * (math.log(t) - math.log(s)) for s, t in zip(ps, pt))
    expected = total / 2 * T * T  # batchmean, times T²
    assert kd_loss(zs, zt, T).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(zt, zt, T).item() == pytest.approx(0.0, abs=1e-7)
    # KL(p_t‖p_s), not the reverse: the two differ here
    assert kd_loss(zs, zt, T).item() != pytest.approx(kd_loss(zt, zs, T).item(), rel=1e-3)


def test_kd_loss_dense_logits_are_per_pixel_samples():
    zs, zt = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    flat = kd_loss(zs.permute(0, 2, 3, 1).reshape(-1, 5), zt.permute(0, 2, 3, 1).reshape(-1, 5), 1.0)
    assert kd_loss(zs, zt, 1.0).item() == pytest.approx(flat.item(), rel=1e-6)


def test_lr_schedules():
    ms = {"name": "multistep", "milestones": [2, 4], "gamma": 0.1}
    spe = 10
    assert [lr_factor(ms, e * spe, spe, 6) for e in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    warm = {"name": "constant", "warmup_epochs": 1}
    assert lr_factor(warm, 0, spe, 3) == pytest.approx(0.1) and lr_factor(warm, 9, spe, 3) == 1.0
    cos = {"name": "cosine"}
    assert lr_factor(cos, 0, spe, 2) == 1.0 and lr_factor(cos, 10, spe, 2) == pytest.approx(0.5)
    assert lr_factor(cos, 19, spe, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20)))


def test_module_path_and_stage_taps():
    m = build_model("kdbench:resnet8", 10, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    out = m(x, ("module:layer2", "stages", "pooled", "cam", "logits"))
    assert out["module:layer2"][0].shape == (2, 32, 16, 16)
    assert [t.shape[1] for t in out["stages"]] == [16, 32, 64]
    assert torch.allclose(out["cam"][0].mean((2, 3)) + m.net.fc.bias, out.logits, atol=1e-5)  # CAM·GAP = logits−b
    with pytest.raises(ValueError, match="no submodule 'layer9'"):
        m.check_taps(("module:layer9",))
    tv = build_model("torchvision:resnet18", 10, 3).eval()
    o = tv(torch.randn(1, 3, 64, 64), ("stages", "pooled", "module:layer3.1.conv2"))
    assert [t.shape[1] for t in o["stages"]] == [64, 128, 256, 512] and o["pooled"][0].shape == (1, 512)
    assert o["module:layer3.1.conv2"][0].shape == (1, 256, 4, 4)


def test_a_method_file_dropped_into_methods_is_picked_up():
    folder = Path(kdbench.methods.__path__[0])
    name = f"zz_drop_{uuid.uuid4().hex[:8]}"
    f = folder / f"{name}.py"
    f.write_text(textwrap.dedent(f'''
        """A throw-away method written by a test. docs/methods.md §1."""
        from kdbench.method import Distiller, register_method

        @register_method("{name}")
        class Dropped(Distiller):
            citation = "test plugin"
            def __init__(self, ctx, *, weight: float = 1.0):
                super().__init__(ctx)
            def forward(self, s, t, batch):
                return {{}}
    '''))
    try:
        r = subprocess.run([sys.executable, "-m", "kdbench.cli", "ls", "methods"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert name in r.stdout and "test plugin" in r.stdout
    finally:
        f.unlink()
