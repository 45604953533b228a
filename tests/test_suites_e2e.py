"""The shipped suites: they dry-run without data, and run end to end, shrunk with --set, on generated
CIFAR-100-format data and teacher checkpoints written where the suites look for them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdbench.data.cifar import write_cifar100
from kdbench.scheduler import launch
from kdbench.models.sources import build_model
from kdbench.suite import load_suite

SUITES = Path(__file__).resolve().parent.parent / "suites"


@pytest.mark.parametrize("suite", sorted(p.name for p in SUITES.glob("*.yaml")))
def test_every_suite_dry_runs_without_data(suite, tmp_path):
    r = subprocess.run([sys.executable, "-m", "kdbench.cli", "run", str(SUITES / suite), "--dry-run"],
                       capture_output=True, text=True, env={"KDBENCH_DATA": str(tmp_path / "none"),
                                                            "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "runs" in r.stdout.splitlines()[0]


def _shrink(suite: Path) -> list[str]:
    """--set overrides that make a suite run in seconds: 1 epoch of 2 steps, 1 seed, short prompt stages."""
    raw = load_suite(suite).raw  # with its include merged
    sets = ["recipe.epochs=1", "recipe.max_steps_per_epoch=2", "recipe.batch_size=8", "recipe.num_workers=0",
            "recipe.amp=false", "seeds=[0]", "data.image_size=32", "recipe.eval_batch_size=200"]
    for i, m in enumerate(raw["methods"]):
        name = m if isinstance(m, str) else m["name"]
        if name in ("freekd", "afp"):
            if isinstance(m, str):
                sets.append(f"methods.{i}={{name: {name}, params: {{stage_iters: 2}}}}")
            else:
                sets.append(f"methods.{i}.params.stage_iters=2")
    if raw["data"].get("image_size") in (None, 16):
        sets.remove("data.image_size=32")
    return sets


# the timm models of the heterogeneous suite, built for 32 px inputs in the test
SMALL_INPUT_KWARGS = {
    "timm:swin_tiny_patch4_window7_224": {"img_size": 32, "window_size": 4},
    "timm:vit_small_patch16_224": {"img_size": 32},
    "timm:deit_tiny_patch16_224": {"img_size": 32},
    "timm:resmlp_12_224": {"img_size": 32},
}


def _write_teachers(suite: Path, ckpt: Path, kwargs_sets: list[str], monkeypatch) -> None:
    monkeypatch.setenv("KDBENCH_CKPT", str(ckpt))
    s = load_suite(suite, ["seeds=[0]"])
    raw = s.raw
    for i, pair in enumerate(raw["pairs"]):
        for side in ("teacher", "student"):
            kw = SMALL_INPUT_KWARGS.get(pair[side]["model"])
            if kw:
                kwargs_sets.append(f"pairs.{i}.{side}.kwargs={json.dumps(kw)}")
        t = pair["teacher"]
        path = Path(t["weights"])
        if not path.exists():
            torch.manual_seed(i)
            net = build_model(t["model"], 100, 3, **SMALL_INPUT_KWARGS.get(t["model"], {})).net
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": net.state_dict(), "epoch": 240}, path)  # mdistiller's checkpoint layout


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["quickstart.yaml", "cifar100_homogeneous.yaml", "cifar100_heterogeneous.yaml",
                                   "cifar100_heterogeneous_ofa.yaml"])
def test_cifar_suites_run_end_to_end_shrunk(suite, tmp_path, monkeypatch):
    monkeypatch.setenv("KDBENCH_DATA", str(tmp_path / "data"))
    write_cifar100(tmp_path / "data" / "cifar100", n_train_per_class=2, n_test_per_class=1)
    sets = _shrink(SUITES / suite)
    if suite == "quickstart.yaml":
        sets += ["pairs.0.teacher.train.recipe.epochs=1"]
    else:
        _write_teachers(SUITES / suite, tmp_path / "ckpt", sets, monkeypatch)
    s = load_suite(SUITES / suite, sets)
    recs = launch(s, tmp_path / "res", executor="debug", log=lambda m: None)
    bad = [(r["label"], r["pair"], (r["error"] or "").strip().splitlines()[-1:]) for r in recs if r["status"] != "ok"]
    assert not bad, bad
    assert len(recs) == len(s.specs)
    labels = {r["label"] for r in recs if r["kind"] == "distill"}
    assert labels == {m if isinstance(m, str) else m.get("label", m["name"]) for m in s.raw["methods"]}
    from kdbench.tables import make_table

    table = make_table(tmp_path / "res" / s.name)
    assert all(r["pair"] in table for r in recs)
