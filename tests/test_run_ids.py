"""Every run_id of every bundled suite is the one recorded in tests/golden/run_ids.json: a refactoring of the
suite, the recipe or the graph must not rename a run (its records would no longer be found and it would run
again). A suite that gains methods or pairs gains runs: the golden file then grows, and no existing id may go.

Regenerate on purpose only (new suites or runs): KDBENCH_REGEN_GOLDEN=1 pytest tests/test_run_ids.py"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kdbench.suite import load_suite

ROOT = Path(__file__).parent.parent
GOLDEN = Path(__file__).parent / "golden" / "run_ids.json"
SUITES = sorted(p.name for p in (ROOT / "suites").glob("*.yaml"))


@pytest.mark.parametrize("name", SUITES)
def test_run_ids_are_unchanged(name):
    ids = sorted(s.run_id for s in load_suite(ROOT / "suites" / name).specs)
    golden = json.loads(GOLDEN.read_text())
    if os.environ.get("KDBENCH_REGEN_GOLDEN"):
        golden[name] = ids
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True))
    assert name in golden, f"{name} is not in {GOLDEN}: KDBENCH_REGEN_GOLDEN=1 adds it"
    lost = sorted(set(golden[name]) - set(ids))
    assert not lost, f"{name}: {len(lost)} run_id(s) of the golden file are gone, e.g. {lost[:3]}"
    assert ids == golden[name], f"{name}: new runs not in {GOLDEN}: KDBENCH_REGEN_GOLDEN=1 adds them"


def test_the_suites_readme_gives_each_suite_its_number_of_runs():
    import re

    text = (ROOT / "suites" / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z0-9_]+\.yaml)` \|.*\| (\d+) \|$", text, flags=re.M)
    assert sorted(name for name, _ in rows) == SUITES
    for name, runs in rows:
        assert int(runs) == len(load_suite(ROOT / "suites" / name).specs), f"suites/README.md: {name}"
