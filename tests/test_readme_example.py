"""The README's plugin example ("Adding a method") works as pasted (issue 12).

The ```python block of that section is written, unchanged, as one file into a temporary folder that is added to
the ``kdbench.methods`` plugin package, exactly as if a user had dropped it into ``methods/``; plugin discovery
registers it (into a copy of the method registry, so the other tests never see it). The suite validation then
checks its parameters, and the harness runs it for one real training step on the digits (a distillation run
with a checkpoint teacher, in process) and records it ``ok``. Any break of the example (a missing import, an
API it uses that changed, a wrong shape) fails this test.
"""

import json
import math
import re
import sys
from pathlib import Path

import pytest

import kdbench.methods
from kdbench.registry import METHODS
from kdbench.suite import SuiteError, load_suite
from kdb_util import tiny_suite

README = Path(__file__).resolve().parent.parent / "README.md"
PLUGIN = "readme_example_mykd"  # the module name the example file gets in kdbench.methods


def readme_example() -> str:
    """The ```python block under '## Adding a method' (there must be exactly one)."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r"^## Adding a method\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md has no '## Adding a method' section"
    blocks = re.findall(r"^```python\n(.*?)^```", m.group(1), re.S | re.M)
    assert len(blocks) == 1, f"expected one ```python block under 'Adding a method', found {len(blocks)}"
    return blocks[0]


def _registered_name(code: str) -> str:
    m = re.search(r'@register_method\("([^"]+)"\)', code)
    assert m, "the README example registers no method"
    return m.group(1)


@pytest.fixture
def readme_method(tmp_path, monkeypatch):
    """The README example dropped into the methods plugin package; returns (name, class)."""
    code = readme_example()
    name = _registered_name(code)
    METHODS.names()  # discover the shipped methods first
    assert name not in METHODS, f"the README example's name {name!r} clashes with a shipped method"
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{PLUGIN}.py").write_text(code, encoding="utf-8")
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))  # registrations go to a copy
    monkeypatch.setattr(METHODS, "_discovered", False)  # discover again: picks the new file up
    monkeypatch.setattr(METHODS, "_scanned", None)  # and read the plugin files again (Registry.info)
    monkeypatch.setattr(kdbench.methods, "__path__", [*kdbench.methods.__path__, str(folder)])
    try:
        yield name, METHODS.get(name)
    finally:
        sys.modules.pop(f"kdbench.methods.{PLUGIN}", None)


def test_extraction_finds_the_example():
    code = readme_example()
    assert "class MyKD(Distiller)" in code and "def forward" in code
    compile(code, "README.md", "exec")


def test_readme_example_runs_one_training_step(readme_method, tmp_path, write_suite):
    import torch

    from kdbench.models.sources import build_model
    from kdbench.runner import run_one

    name, cls = readme_method
    assert cls.__module__ == f"kdbench.methods.{PLUGIN}" and cls.param_defaults() == {"weight": 1.0}

    torch.manual_seed(0)
    weights = tmp_path / "teacher.pt"
    torch.save(build_model("kdbench:resnet8", 10, 1).net.state_dict(), weights)
    recipe = {**tiny_suite()["recipe"], "epochs": 1, "max_steps_per_epoch": 1}
    pair = {"teacher": {"model": "kdbench:resnet8", "weights": str(weights)}, "student": {"model": "kdbench:resnet8"}}
    d = tiny_suite(recipe=recipe, pairs=[pair], methods=[{"name": name, "params": {"weight": 0.5}}])

    with pytest.raises(SuiteError, match=rf"parameter 'weight' of method '{name}' must be a number"):
        load_suite(write_suite({**d, "methods": [{"name": name, "params": {"weight": "heavy"}}]}, name="tiny"))

    suite = load_suite(write_suite(d, name="tiny"))
    (spec,) = [s for s in suite.specs if s.kind == "distill"]
    assert spec.method == name and spec.params == {"weight": 0.5}
    rec = run_one(spec, tmp_path / "results")
    assert rec["status"] == "ok", rec["error"]
    # the adapter is the method's learnable part: a 1x1 conv from the student's 64 final channels to the
    # teacher's 64 (ResNet-8's last stage), with bias: 64*64 + 64 parameters
    assert rec["cost"]["extra_params"] == 64 * 64 + 64, rec["cost"]
    log = [json.loads(ln) for ln in (Path(tmp_path / "results" / "tiny" / "runs" / spec.run_id / "log.jsonl")
                                     .read_text().splitlines())]
    assert len(log) == 1 and log[0]["steps"] == 1, log  # one epoch of one training step
    terms = {k: v for k, v in log[0].items() if k.endswith("loss_mykd")}  # the example's term, as trained
    assert terms and all(math.isfinite(v) and v > 0 for v in terms.values()), log
