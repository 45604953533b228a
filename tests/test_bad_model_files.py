"""Bad model files: a checkpoint teacher's ``weights:`` file (read by ``load_weights``, for training and for its eval
runs) and a stage run's ``stage.pt`` (read by ``runner._load_stage``), in every family of damage. Each ends in one
line naming the file and what was expected, at ``kdbench validate`` time where the file can be seen then (a
checkpoint's path, checked without torch), and no run records a number read from such a file."""

import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import kdbench.models.sources as sources
from kdbench.models.sources import build_model, check_tensor_dict, load_weights, torch_file_problem
from kdbench.results import file_sha256
from kdbench.runner import _load_stage
from kdbench.scheduler import launch
from kdbench.suite import SuiteError, check_data_available, load_suite

from kdb_util import tiny_suite

REPO = Path(__file__).resolve().parent.parent
MODEL = ("kdbench:resnet8", 10, 1)  # the digits suite's teacher


class Evil:
    """Creates the marker folder when unpickled without restriction."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _good(target: str) -> dict:
    torch.manual_seed(0)
    if target == "weights" or target == "validate":
        return build_model(*MODEL).net.state_dict()
    return {"prompts.0": torch.randn(4, 8), "prompts.1": torch.randn(8)}  # a stage file's tensors


def _first(state: dict) -> str:
    return next(iter(state))


def _damaged(path: Path, state: dict) -> None:
    """A torch archive with one byte of a tensor flipped (torch.load reads it without complaint)."""
    torch.save(state, path)
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)  # the largest tensor
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(path.read_bytes())
    data[start + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _npy(path, state):
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 3), np.float32))
    path.write_bytes(buf.getvalue())


def _zip(path, state):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("weights.bin", b"\0" * 64)


def _truncated(path, state):
    torch.save(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _legacy(path, state):
    torch.save(state, path, _use_new_zipfile_serialization=False)


def _no_crc(path, state):
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, path)
    finally:
        torch.serialization.set_crc32_options(True)


def _edit(fn):
    def write(path, state):
        state = dict(state)
        fn(state)
        torch.save(state, path)
    return write


def _shape(s):
    s[_first(s)] = torch.zeros(1, 2, 3)


def _ints(s):
    s.update({k: v.to(torch.int64) for k, v in s.items() if v.is_floating_point()})


def _not_tensor(s):
    s[_first(s)] = 3.0


def _missing(s):
    del s[_first(s)]


def _unexpected(s):
    s["extra.weight"] = torch.zeros(2)


def _half(s):
    s.update({k: v.half() for k, v in s.items() if v.is_floating_point()})


NOT_TORCH = "expected a file written by torch.save"
CHANGED = "changed after its run recorded it"
#: family -> (writer(path, good state), {target: phrase its one line has, None: it loads / validate passes})
#: targets: "weights" (a checkpoint teacher's file, load_weights, as _load_teacher and _eval read it); "stage" (a
#: stage.pt as a distill run reads it: its record has the file's sha256); "stage-nosha" (a record without one);
#: "validate" (check_data_available on a suite whose teacher has `weights:` this file, torch-free)
FAMILIES = {
    "truncated": (_truncated, {"weights": "truncated or damaged zip archive", "stage": CHANGED,
                               "stage-nosha": "truncated or damaged zip archive",
                               "validate": "truncated or damaged zip archive"}),
    "damaged-bytes": (_damaged, {"weights": "fails its CRC-32 check", "stage": CHANGED,
                                 "stage-nosha": "fails its CRC-32 check", "validate": None}),  # CRC: at run time
    "empty": (lambda p, s: p.write_bytes(b""), {"weights": "it is empty (0 bytes)", "stage": CHANGED,
                                                "stage-nosha": "it is empty (0 bytes)",
                                                "validate": "it is empty (0 bytes)"}),
    "text": (lambda p, s: p.write_text("not a checkpoint\n"),
             {t: "it is a text file" for t in ("weights", "stage-nosha", "validate")} | {"stage": CHANGED}),
    "json": (lambda p, s: p.write_text(json.dumps({"conv1.weight": [[1.0]]})),
             {t: "it is a JSON/text file" for t in ("weights", "stage-nosha", "validate")} | {"stage": CHANGED}),
    "npy": (_npy, {t: "it is a NumPy .npy file" for t in ("weights", "stage-nosha", "validate")} | {"stage": CHANGED}),
    "zip-not-torch": (_zip, {t: "zip archive but not a torch file (no <name>/data.pkl; it holds weights.bin)"
                             for t in ("weights", "stage-nosha", "validate")} | {"stage": CHANGED}),
    "folder": (lambda p, s: p.mkdir(), {"weights": "it is a folder, not a file", "validate": "it is a folder",
                                        "stage": "it is a folder, not a file", "stage-nosha": "it is a folder, not a file"}),
    "unreadable": (lambda p, s: (torch.save(s, p), p.chmod(0)),
                   {t: "it cannot be read (Permission denied)"
                    for t in ("weights", "stage", "stage-nosha", "validate")}),
    "plain-pickle": (lambda p, s: p.write_bytes(pickle.dumps({"a": [1.0, 2.0]}, protocol=4)),
                     {t: "a pickle that torch.save did not write (no torch magic number"
                      for t in ("weights", "stage-nosha", "validate")} | {"stage": CHANGED}),
    "pickle-running-code": (lambda p, s: p.write_bytes(pickle.dumps({"w": Evil(p.parent / "PWNED")})),
                            {t: "objects other than tensors and plain containers ("
                             for t in ("weights", "stage-nosha", "validate")} | {"stage": CHANGED}),
    "torch-file-running-code": (lambda p, s: torch.save({"w": Evil(p.parent / "PWNED")}, p),
                                {"weights": "objects other than tensors", "stage": CHANGED,
                                 "stage-nosha": "objects other than tensors", "validate": None}),
    "not-a-dict": (lambda p, s: torch.save(list(s.values()), p),
                   {"weights": "it holds a list, not a state dict", "stage": CHANGED,
                    "stage-nosha": "holds a dict of tensors, not a list", "validate": None}),
    "wrong-shape": (_edit(_shape), {"weights": "1 tensor(s) of another shape", "stage": CHANGED,
                                    "stage-nosha": "1 of another shape",
                                    "validate": None}),
    "int-dtype": (_edit(_ints), {"weights": "tensor(s) of another kind of dtype, e.g. conv1.weight int64 (model: "
                                            "float32)", "stage": CHANGED, "validate": None}),
    "not-tensors": (_edit(_not_tensor), {"weights": "1 value(s) that are not tensors, e.g. conv1.weight (float)",
                                         "stage": CHANGED,
                                         "stage-nosha": "1 value(s) that are not tensors",
                                         "validate": None}),
    "missing-key": (_edit(_missing), {"weights": "missing ['conv1.weight']", "stage": CHANGED,
                                      "stage-nosha": "missing ['prompts.0']",
                                      "validate": None}),
    "unexpected-key": (_edit(_unexpected), {"weights": "unexpected ['extra.weight']", "stage": CHANGED,
                                            "stage-nosha": "unexpected ['extra.weight']",
                                            "validate": None}),
    # files that are fine: none of the checks may refuse them
    "legacy-format (ok)": (_legacy, {"weights": None, "stage-nosha": None, "validate": None}),
    "saved-without-crc (ok)": (_no_crc, {"weights": None, "stage-nosha": None, "validate": None}),
    "float16 (ok)": (_edit(_half), {"weights": None, "validate": None}),
}

#: the families that are not a torch file at all: the line says what a torch file is
FILE_KINDS = {"truncated", "damaged-bytes", "empty", "text", "json", "npy", "zip-not-torch", "unreadable",
              "plain-pickle", "pickle-running-code"}

CASES = [pytest.param(fam, target, *(exp.values if hasattr(exp, "values") else (exp,)),
                      marks=getattr(exp, "marks", ()), id=f"{fam}-{target}")
         for fam, (_, exps) in FAMILIES.items() for target, exp in exps.items()]


@pytest.fixture
def unreadable_as_root(monkeypatch):
    """Root reads a file of mode 000: make the loaders' own ``open`` fail for such a file as it would for a user."""
    if os.geteuid() != 0:
        return
    real = open

    def fake(path, *a, **k):
        if Path(path).exists() and Path(path).is_file() and Path(path).stat().st_mode & 0o777 == 0:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(sources, "open", fake, raising=False)


def _validate(tmp_path: Path, weights: Path) -> str | None:
    pair = {"name": "p", "teacher": {"model": MODEL[0], "weights": str(weights)}, "student": {"model": MODEL[0]}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_suite(pairs=[pair], methods=["kd"]), sort_keys=False))
    try:
        check_data_available(load_suite(path))
    except SuiteError as e:
        lines = str(e).splitlines()
        assert len(lines) == 1, lines  # one line; no KDBENCH_CKPT hint: the file is there
        assert lines[0].startswith(f"{path}: pairs[0] (p): teacher weights {weights}: "), lines[0]
        assert lines[0].endswith(f"; {NOT_TORCH} (a zip archive holding <name>/data.pkl and the tensors)")
        raise ValueError(lines[0]) from None
    return None


@pytest.mark.parametrize("family,target,says", CASES)
def test_bad_model_file_ends_in_one_line_naming_it(family, target, says, tmp_path, unreadable_as_root):
    writer = FAMILIES[family][0]
    good = _good(target)
    path = tmp_path / ("stage.pt" if target.startswith("stage") else "teacher.pt")
    writer(path, good)
    recorded = tmp_path / "recorded.pt"  # the file the stage run wrote: its record's sha256 and shapes
    torch.save(good, recorded)
    s_rec = {"artifact": {"sha256": file_sha256(recorded)} if target == "stage" else None,
             "stage": {"tensors": {k: list(v.shape) for k, v in good.items()}}}
    load = {"weights": lambda: load_weights(build_model(*MODEL), path),
            "stage": lambda: _load_stage(path, s_rec), "stage-nosha": lambda: _load_stage(path, s_rec),
            "validate": lambda: _validate(tmp_path, path)}[target]
    try:
        if says is None:
            load()
            return
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            load()
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and says in msg, msg
        if family in FILE_KINDS and target in ("weights", "stage-nosha", "validate"):
            assert NOT_TORCH in msg, msg
    finally:
        assert not (tmp_path / "PWNED").exists()  # nothing in the file ran
        if path.exists() and not path.is_dir():
            path.chmod(0o644)


def test_a_changed_stage_file_says_what_it_is_now(tmp_path):
    good = _good("stage")
    torch.save(good, tmp_path / "stage.pt")
    rec = {"artifact": {"sha256": file_sha256(tmp_path / "stage.pt")}}
    (tmp_path / "stage.pt").write_bytes(b"")
    with pytest.raises(ValueError) as e:
        _load_stage(tmp_path / "stage.pt", rec)
    assert f"{CHANGED} (sha256 " in str(e.value) and "now; it is empty (0 bytes)): put the original back" in str(e.value)


def test_stage_content_is_checked_against_its_record(tmp_path):
    """``check_tensor_dict``: what ``runner._load_stage`` is to pass a stage file's content through."""
    good = _good("stage")
    shapes = {k: list(v.shape) for k, v in good.items()}
    p = tmp_path / "stage.pt"
    assert check_tensor_dict(good, p, "stage file", shapes) is good
    cases = {_shape: f"{p}: stage file does not hold the tensors its run recorded: 1 of another shape, e.g. "
                     f"prompts.0 (1, 2, 3) (recorded: (4, 8))",
             _missing: f"{p}: stage file does not hold the tensors its run recorded: 1 missing ['prompts.0'], "
                       f"0 unexpected []",
             _unexpected: f"{p}: stage file does not hold the tensors its run recorded: 0 missing [], 1 unexpected "
                          f"['extra.weight']",
             _not_tensor: f"{p}: stage file: 1 value(s) that are not tensors, e.g. prompts.0 (float); expected a dict "
                          f"of tensors"}
    for edit, line in cases.items():
        s = dict(good)
        edit(s)
        with pytest.raises(ValueError) as e:
            check_tensor_dict(s, p, "stage file", shapes)
        assert str(e.value) == line
    with pytest.raises(ValueError, match="a stage file holds a dict of tensors, not a list"):
        check_tensor_dict([1], p, "stage file")


def test_a_model_that_refuses_a_state_dict_its_own_way_ends_in_one_line(tmp_path, monkeypatch):
    net = build_model(*MODEL)
    torch.save(net.net.state_dict(), tmp_path / "t.pt")

    def refuse(*a, **k):
        raise RuntimeError("Error(s) in loading state_dict for CifarResNet:\n\tsomething of its own")

    monkeypatch.setattr(net.net, "load_state_dict", refuse)
    with pytest.raises(ValueError) as e:
        load_weights(net, tmp_path / "t.pt")
    assert str(e.value) == (f"{tmp_path / 't.pt'}: checkpoint does not fit kdbench:resnet8: Error(s) in loading "
                            "state_dict for CifarResNet: something of its own")


def test_validate_reads_the_weights_without_torch(tmp_path):
    """`kdbench validate` refuses a truncated checkpoint naming the suite, the key and the file, torch-free."""
    good = tmp_path / "t.pt"
    torch.save(_good("weights"), good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:1000])
    pairs = [{"name": n, "teacher": {"model": MODEL[0], "weights": str(w)}, "student": {"model": MODEL[0]}}
             for n, w in (("good", good), ("bad", bad))]
    suite = tmp_path / "tiny.yaml"
    suite.write_text(yaml.safe_dump(tiny_suite(pairs=pairs, methods=["kd"]), sort_keys=False))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from kdbench.cli import main
        rc = main(["validate", {str(suite)!r}])
        heavy = sorted(m for m in ("torch", "numpy") if m in sys.modules)
        assert not heavy, heavy
        print(rc)
    """)], cwd=REPO, capture_output=True, text=True)
    assert r.stdout.strip() == "1", r.stderr[-2000:]
    assert r.stderr.strip() == (f"FAIL {suite}: pairs[1] (bad): teacher weights {bad}: it is a truncated or damaged "
                                f"zip archive (its zip directory, at the end, is missing or unreadable); "
                                f"{NOT_TORCH} (a zip archive holding <name>/data.pkl and the tensors)")


def test_no_record_has_numbers_from_a_checkpoint_that_does_not_fit(tmp_path):
    """A checkpoint that passes validate (a torch file) but holds integers: the run fails naming the file, with no
    metrics; the eval of the teacher too."""
    bad = tmp_path / "t.pt"
    _edit(_ints)(bad, _good("weights"))
    assert torch_file_problem(bad) is None
    pair = {"teacher": {"model": MODEL[0], "weights": str(bad)}, "student": {"model": MODEL[0]}}
    d = tiny_suite(pairs=[pair], methods=["kd"], recipe={**tiny_suite()["recipe"], "epochs": 1})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    suite = load_suite(path)
    check_data_available(suite)
    recs = launch(suite, tmp_path / "res", executor="debug", log=lambda s: None)
    assert recs and all(r["status"] == "failed" and not r.get("metrics") for r in recs)
    for r in recs:
        line = r["error"].strip().splitlines()[-1]
        assert str(bad) in line and "another kind of dtype" in line, line
