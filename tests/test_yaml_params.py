"""Strict suite YAML (kdbench/yamlio.py) and method parameters type-checked against their annotations
(``Distiller.check_params``), and ``--parallel`` >= 1: issue 11's "accepted when it should be refused" cases."""

import os
import subprocess
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from kdbench import yamlio
from kdbench.method import _type_word
from kdbench.suite import SuiteError, load_suite
from kdbench.yamlio import YamlError, load_file, loads
from kdb_util import tiny_suite

REPO = Path(__file__).resolve().parent.parent


def _suite_text(**over) -> str:
    return yaml.safe_dump(tiny_suite(**over), sort_keys=False)


def _bomb(levels: int = 9, width: int = 9) -> str:
    text = "suite: tiny\nlol: &l0 [" + ", ".join(['"lol"'] * width) + "]\n"
    for i in range(1, levels):
        text += f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]\n"
    return text


# ---------------------------------------------------------------------------------------- the YAML loader
def test_duplicate_key_is_refused_with_file_line_and_key(write_suite):
    text = _suite_text() + "seeds: [0, 1, 2, 3, 4, 5, 6]\n"  # before: last one won silently, 21 runs
    line = text.splitlines().index("seeds: [0, 1, 2, 3, 4, 5, 6]") + 1
    first = text.splitlines().index("seeds:") + 1
    with pytest.raises(SuiteError) as e:
        load_suite(write_suite({}, name="tiny", text=text))
    msg = str(e.value)
    assert msg.endswith(f"tiny.yaml:{line}: duplicate key 'seeds' (first at line {first}); "
                        f"a key may appear once per mapping"), msg
    assert "\n" not in msg


def test_nested_duplicate_key_and_merge_keys():
    with pytest.raises(YamlError, match=r"^f\.yaml:4: duplicate key 'lr' \(first at line 2\)"):
        loads("recipe:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", "f.yaml")
    # a `<<:` merge may be overridden: that is what it is for
    assert loads("base: &b {lr: 0.1, epochs: 2}\nrecipe:\n  <<: *b\n  lr: 0.2\n")["recipe"] == {"lr": 0.2,
                                                                                                "epochs": 2}


def test_alias_bomb_is_refused_fast_by_validate(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(_bomb())  # 9**9 = 387 million strings once expanded
    t0 = time.perf_counter()
    with pytest.raises(YamlError, match=r"tiny\.yaml:\d+: the document expands to more than 100000 values"):
        load_file(p)
    assert time.perf_counter() - t0 < 2.0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "kdbench.cli", "validate", str(p)], capture_output=True, text=True,
                       timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 1, r
    assert r.stderr.startswith(f"FAIL {p}:") and "alias bomb" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_alias_count_recursion_and_depth_are_bounded():
    many = "a: &a 1\nb: [" + ", ".join(["*a"] * (yamlio.MAX_ALIASES + 1)) + "]\n"
    with pytest.raises(YamlError, match=rf"^m\.yaml:2: more than {yamlio.MAX_ALIASES} aliases"):
        loads(many, "m.yaml")
    assert loads("a: &a 1\nb: [" + ", ".join(["*a"] * 10) + "]\n")["b"] == [1] * 10  # a few are fine
    with pytest.raises(YamlError, match=r"^r\.yaml:1: recursive alias"):
        loads("a: &a [1, *a]\n", "r.yaml")
    with pytest.raises(YamlError, match=r"^d\.yaml: not valid YAML for a suite: nested too deeply"):
        loads("[" * 50_000 + "]" * 50_000, "d.yaml")


def test_aliases_become_independent_copies():
    d = loads("p: &p {temperature: [4]}\nq: *p\n")
    d["q"]["temperature"].append(2)
    assert d["p"] == {"temperature": [4]}  # a --set on one place must not change another


def test_size_limit(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_text("a: 1\n" + "#" * (yamlio.MAX_BYTES + 10) + "\n")
    with pytest.raises(YamlError, match=r"big\.yaml: larger than 1 MiB"):
        load_file(p)
    with pytest.raises(YamlError, match=r"^s: larger than 1 MiB"):
        loads("#" * (yamlio.MAX_BYTES + 1), "s")


def test_non_utf8_file_names_file_line_and_byte(write_suite):
    text = _suite_text().replace("version: 1", "version: 1  # caf\u00e9")
    assert text.splitlines()[1].startswith("version: 1  # caf")
    p = write_suite({}, name="tiny", text="x")
    p.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(SuiteError, match=rf"tiny\.yaml:2: not UTF-8 text \(byte 0xe9 at offset {offset}\); save "
                                         r"the file as UTF-8$"):
        load_suite(p)
    p.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # a BOM is fine
    assert load_suite(p).name == "tiny"


def test_yaml_errors_are_one_line_with_file_and_line(tmp_path):
    cases = {"suite: [unclosed\n": ":2: not valid YAML:", "a: b: c\n": ":1: not valid YAML: mapping values",
             "a: 1\n---\nb: 2\n": ":2: not valid YAML: expected a single document",
             "a: !!python/object/apply:os.system [echo]\n": ":1: not valid YAML: could not determine a constructor",
             "a: \x07\n": ":1: not valid YAML: character 0x7 is not allowed"}
    for i, (text, expect) in enumerate(cases.items()):
        p = tmp_path / f"e{i}.yaml"
        p.write_text(text)
        with pytest.raises(YamlError) as e:
            load_file(p)
        assert str(e.value).startswith(str(p) + expect) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(YamlError, match="^suite file not found: "):
        load_file(tmp_path / "nope.yaml", what="suite file")
    with pytest.raises(YamlError, match="is a directory"):
        load_file(tmp_path)


def test_yaml_12_exponent_floats():
    d = loads("a: 1e1\nb: 5e-4\nc: 1.0e4\nd: -.5E+2\ne: '1e1'\nf: 1e1x\ng: 10\nh: 0.5\ni: 5.0e-4\nj: true\n")
    assert d == {"a": 10.0, "b": 0.0005, "c": 10000.0, "d": -50.0, "e": "1e1", "f": "1e1x", "g": 10, "h": 0.5,
                 "i": 0.0005, "j": True}
    assert type(d["a"]) is float and type(d["g"]) is int
    assert yaml.safe_load("a: 1e1")["a"] == "1e1"  # what PyYAML alone does (YAML 1.1): why the resolver exists


def test_committed_suites_read_as_before():
    for p in sorted((REPO / "suites").glob("*.yaml")):
        assert load_file(p) == yaml.safe_load(p.read_text()), p


# ------------------------------------------------------------------------------------- method parameters
def _err(write_suite, **over) -> str:
    with pytest.raises(SuiteError) as e:
        load_suite(write_suite(tiny_suite(**over), name="tiny"))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_wrong_parameter_type_is_refused_naming_parameter_type_and_value(write_suite):
    msg = _err(write_suite, methods=["baseline", {"name": "kd", "params": {"temperature": "four"}}])
    assert msg.endswith("tiny.yaml: methods[1].params: parameter 'temperature' of method 'kd' must be a number "
                        "(float), got 'four' (a string)"), msg
    msg = _err(write_suite, methods=[{"name": "cwd", "params": {"domain": "frequency"}}])
    assert "parameter 'domain' of method 'cwd' must be one of 'spatial', 'dwt', got 'frequency'" in msg, msg
    msg = _err(write_suite, methods=[{"name": "cwd", "params": {"dwt_levels": 2.5}}])
    assert "parameter 'dwt_levels' of method 'cwd' must be an integer, got 2.5 (a float)" in msg, msg
    msg = _err(write_suite, methods=[{"name": "catkd", "params": {"normalize": "yes"}}])
    assert "parameter 'normalize' of method 'catkd' must be true or false, got 'yes' (a string)" in msg, msg
    msg = _err(write_suite, methods=[{"name": "cwd", "params": {"max_levels": "all"}}])
    assert "parameter 'max_levels' of method 'cwd' must be an integer or null, got 'all'" in msg, msg
    pair = {**tiny_suite()["pairs"][0], "params": {"kd": {"weight": [1]}}}  # per-pair params too
    msg = _err(write_suite, pairs=[pair])
    assert "pairs[0].params.kd: parameter 'weight' of method 'kd' must be a number (float), got [1] (a list)" \
        in msg, msg
    msg = _err(write_suite, methods=[{"name": "kd", "params": {"temp": 2}}])  # unknown keys as before
    assert "unknown parameter(s) 'temp' for method 'kd'; valid: temperature=4.0" in msg, msg


def test_numeric_strings_and_ints_become_floats_and_spellings_share_a_run(write_suite):
    def kd_run(temperature):
        s = load_suite(write_suite(tiny_suite(methods=[{"name": "kd", "params": {"temperature": temperature}}]),
                                   name="tiny"))
        (spec,) = [x for x in s.specs if x.kind == "distill"]
        return spec

    a, b, c, d = kd_run("1e1"), kd_run(10), kd_run(10.0), kd_run("1.0e1")
    assert a.params["temperature"] == 10.0 and type(a.params["temperature"]) is float
    assert a.run_id == b.run_id == c.run_id == d.run_id
    # written in the YAML file itself, 1e1 is already a float (kdbench.yamlio)
    text = _suite_text(methods=[{"name": "kd", "params": {"temperature": 0}}]).replace("temperature: 0",
                                                                                        "temperature: 1e1")
    s = load_suite(write_suite({}, name="tiny", text=text))
    assert [x.run_id for x in s.specs if x.kind == "distill"] == [a.run_id]


class _Sig:
    """Annotations a method may use, checked without registering a method."""

    def __init__(self, ctx, *, f: float = 1.0, i: int = 2, b: bool = False, s: str = "x",
                 lit: typing.Literal["a", "b", 3] = "a", of: float | None = None, oi: typing.Optional[int] = 1,
                 tup: tuple[int, ...] = (1, 2), pair: tuple[int, str] = (1, "a"), lst: list[float] = (),
                 seq: Sequence[str] = ("u",), m: dict[str, float] = None, anything: typing.Any = None):
        pass


@pytest.fixture
def sig_method():
    from kdbench.method import Distiller

    return type("SigMethod", (Distiller,), {"__init__": _Sig.__init__, "registry_name": "sig"})


@pytest.mark.parametrize("name,value,expect", [
    ("f", 3, 3.0), ("f", "2.5e-1", 0.25), ("f", " 1e1 ", 10.0), ("i", 7, 7), ("b", True, True), ("s", "y", "y"),
    ("lit", "b", "b"), ("lit", 3, 3), ("of", None, None), ("of", "1e-3", 0.001), ("oi", None, None),
    ("tup", [1, 2, 3], (1, 2, 3)), ("pair", [4, "z"], (4, "z")), ("lst", [1, "1e1"], [1.0, 10.0]),
    ("seq", ["p", "q"], ["p", "q"]), ("m", {"w": 1}, {"w": 1.0}), ("anything", {"x": [1]}, {"x": [1]}),
])
def test_annotation_kinds_accept_and_convert(sig_method, name, value, expect):
    got = sig_method.check_params({name: value})[name]
    assert got == expect and type(got) is type(expect), got


@pytest.mark.parametrize("name,value,expect", [
    ("f", True, "a number (float), got True (a boolean)"), ("f", "nan?", "a number (float), got 'nan?'"),
    ("i", 2.0, "an integer, got 2.0 (a float)"), ("i", "3", "an integer, got '3' (a string)"),
    ("i", False, "an integer, got False (a boolean)"), ("b", 1, "true or false, got 1 (an integer)"),
    ("s", 5, "a string, got 5 (an integer)"), ("lit", "c", "one of 'a', 'b', 3, got 'c'"),
    ("lit", 3.0, "one of 'a', 'b', 3, got 3.0"), ("of", "x", "a number (float) or null, got 'x'"),
    ("oi", 1.5, "an integer or null, got 1.5"), ("tup", 1, "a list of an integer, got 1 (an integer)"),
    ("tup", [1, "a"], "a list of an integer, got [1, 'a']"),
    ("pair", [1, 2], "a list of 2 items (an integer, a string), got [1, 2]"),
    ("pair", [1], "a list of 2 items (an integer, a string), got [1]"),
    ("seq", "pq", "a list of a string, got 'pq' (a string)"),
    ("m", {"w": "x"}, "a mapping of a string to a number (float), got {'w': 'x'}"),
])
def test_annotation_kinds_refuse_naming_parameter_expected_type_and_value(sig_method, name, value, expect):
    with pytest.raises(ValueError) as e:
        sig_method.check_params({name: value})
    msg = str(e.value)
    assert msg.startswith(f"parameter {name!r} of method 'sig' must be {expect}"), msg
    assert msg.endswith(f"got {value!r} ({_type_word(value)})"), msg


def test_every_registered_method_default_passes_its_own_check():
    from kdbench.method import check_param_value, describe_type
    from kdbench.registry import METHODS

    checked = 0
    for name, cls in METHODS.items():
        defaults, hints = cls.param_defaults(), cls.param_annotations()
        assert set(hints) == set(defaults), f"{name}: every hyperparameter needs an annotation"
        resolved = cls.check_params({})
        for p, default in defaults.items():
            assert resolved[p] == default, (name, p)
            assert check_param_value(default, hints[p]) == default, (name, p, default, hints[p])
            assert describe_type(hints[p]) and "typing." not in describe_type(hints[p]), (name, p)
            checked += 1
        assert cls.check_params(dict(defaults)) == resolved, name  # the defaults written out: same run
    assert checked >= 40


# ----------------------------------------------------------------------------------- command-line bounds
@pytest.mark.parametrize("value,expect", [("-1", "must be at least 1, got -1"), ("0", "must be at least 1, got 0"),
                                          ("two", "expected an integer >= 1, got 'two'")])
def test_parallel_must_be_a_positive_integer(capsys, value, expect):
    from kdbench.cli import build_parser

    with pytest.raises(SystemExit) as e:  # before: --parallel -1 looped forever
        build_parser().parse_args(["run", "s.yaml", "--parallel", value])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"kdbench run: error: argument --parallel: {expect}")
    assert build_parser().parse_args(["run", "s.yaml", "--parallel", "3"]).parallel == 3
