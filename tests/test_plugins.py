"""Methods from outside the kdbench clone: an installed package's ``kdbench.methods`` entry point and a plugins
folder (``--plugins``, ``KDBENCH_PLUGINS``, a suite's ``plugins:``), each listed, validated without importing it,
run (local and debug executors: the worker processes must find them) and tabled; bad plugins give one line."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from kdb_util import REPO, tiny_suite

def _method_source(name: str, cls: str, where: str, mark: str, citation: str, *, header: str = "",
                   params: str = "", version: str = "", scale: str = "") -> str:
    """A logit-MSE method plugin file; importing it appends ``mark`` to the file $KDPLUG_MARK names."""
    return f'''\
"""A method of {where}."""
from __future__ import annotations

import os

import torch.nn.functional as F

from kdbench.method import Distiller, Taps, register_method
{header}
if os.environ.get("KDPLUG_MARK"):
    open(os.environ["KDPLUG_MARK"], "a").write("{mark} imported\\n")


@register_method("{name}")
class {cls}(Distiller):
    """Logit MSE, from {where}."""
    tasks = {{"classification"}}
    citation = "{citation}"
{version}
    def __init__(self, ctx, *, weight: float = 1.0{params}):
        super().__init__(ctx)
        self.weight = weight{scale}

    def taps(self):
        return Taps(student=("logits",), teacher=("logits",))

    def forward(self, s, t, batch):
        return {{"loss_{name}": self.weight * F.mse_loss(s["logits"][0], t["logits"][0])}}
'''


PLUGKD = _method_source("plugkd", "PlugKD", "an installed package", "kdplug.plugkd", "Outside et al., 2026",
                        version="    version = 2\n")
FOLDERKD = _method_source("folderkd", "FolderKD", "a plugins folder", "folderkd", "Folder et al., 2026",
                          header="from _scale import SCALE\n", params=', mode: str = "mse"', scale=" * SCALE")

MARK_ON_IMPORT = '''\
import os
if os.environ.get("KDPLUG_MARK"):
    open(os.environ["KDPLUG_MARK"], "a").write("{what} imported\\n")
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The package ``kdplug`` 0.3.1 (method ``plugkd`` in ``kdplug/plugkd.py``, declared by its entry point)
    installed by pip into a site folder outside the repository; its ``__init__`` leaves a mark when run."""
    root = tmp_path_factory.mktemp("kdplug")
    pkg = root / "pkg"
    (pkg / "src" / "kdplug").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=69"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "kdplug"
        version = "0.3.1"

        [project.entry-points."kdbench.methods"]
        plugkd = "kdplug.plugkd"

        [tool.setuptools]
        package-dir = {"" = "src"}
        packages = ["kdplug"]
        """))
    (pkg / "src" / "kdplug" / "__init__.py").write_text(MARK_ON_IMPORT.format(what="kdplug"))
    (pkg / "src" / "kdplug" / "plugkd.py").write_text(PLUGKD)
    site = root / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(site), str(pkg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (site / "kdplug-0.3.1.dist-info" / "entry_points.txt").is_file()
    return site


def _folder(root: Path) -> Path:
    """A plugins folder: ``folderkd.py`` (imports its sibling helper ``_scale.py``) and ``notes.py``, a file
    that registers nothing (and must not be run)."""
    folder = root / "my_methods"
    folder.mkdir()
    (folder / "folderkd.py").write_text(FOLDERKD)
    (folder / "_scale.py").write_text(MARK_ON_IMPORT.format(what="_scale") + "SCALE = 1.0\n")
    (folder / "notes.py").write_text(MARK_ON_IMPORT.format(what="notes"))
    return folder


def _env(site: Path, mark: Path, **more) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "KDBENCH_PLUGINS"}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), KDPLUG_MARK=str(mark), **more)
    return env


def _cli(*args, env: dict, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdbench.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or REPO, timeout=600)


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def _marks(mark: Path) -> list[str]:
    return mark.read_text().splitlines() if mark.exists() else []


def test_listed_and_validated_without_importing_them(plugin_site, tmp_path):
    folder, mark = _folder(tmp_path), tmp_path / "mark"
    env = _env(plugin_site, mark)
    r = _cli("ls", "methods", "--plugins", str(folder), env=env)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[2:]}
    assert "Outside et al., 2026" in rows["plugkd"] and rows["plugkd"].endswith("kdplug 0.3.1")
    assert "Folder et al., 2026" in rows["folderkd"] and rows["folderkd"].endswith(str(folder / "folderkd.py"))
    assert rows["kd"].endswith("kdbench") and "notes" not in rows
    assert _marks(mark) == []

    suite = tmp_path / "tiny.yaml"
    suite.write_text(yaml.safe_dump(tiny_suite(methods=[{"name": "plugkd", "params": {"weight": 0.5}},
                                                        {"name": "folderkd", "params": {"weight": 2}}])))
    r = _python(f"""
        import sys
        from kdbench.registry import METHODS, add_plugin_dirs
        from kdbench.suite import SuiteError, load_suite
        add_plugin_dirs([{str(folder)!r}])
        suite = load_suite({str(suite)!r})
        distill = [s for s in suite.specs if s.kind == "distill"]
        assert [s.params for s in distill] == [{{"weight": 0.5}}, {{"weight": 2.0, "mode": "mse"}}]
        assert [s.method_version for s in distill] == [2, 1]
        for bad, msg in ((["methods.0.params.weight=heavy"], "parameter 'weight' of method 'plugkd' must be a number"),
                         (["methods.1.params.speed=2"], "unknown parameter(s) 'speed' for method 'folderkd'; "
                                                        "valid: weight=1.0, mode='mse'")):
            try:
                load_suite({str(suite)!r}, bad)
                raise SystemExit(f"accepted {{bad}}")
            except SuiteError as e:
                assert msg in str(e), str(e)
        assert METHODS.info("plugkd").module == "kdplug.plugkd" and METHODS.info("folderkd").module == "folderkd"
        o = METHODS.origin("plugkd")
        assert (o["source"], o["distribution"], o["version"], o["entry_point"]) == \\
            ("entry point", "kdplug", "0.3.1", "plugkd"), o
        assert o["file"].endswith("kdplug/plugkd.py") and len(o["sha256"]) == 64
        o = METHODS.origin("folderkd")
        assert (o["source"], o["file"], o["distribution"]) == ("plugins folder", {str(folder / "folderkd.py")!r}, None)
        assert METHODS.origin("kd")["source"] == "kdbench"
        for m in ("kdplug", "kdplug.plugkd", "folderkd", "_scale", "notes", "torch"):
            assert m not in sys.modules, m
        print("ok")
    """, env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
    r = _cli("validate", str(suite), "--no-data", env={**env, "KDBENCH_PLUGINS": str(folder)})
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr
    assert _marks(mark) == []


def test_run_local_and_table_with_a_suite_plugins_key(plugin_site, tmp_path):
    """``plugins:`` (relative to the suite file) and the entry point: local jobs (other processes) find both."""
    folder, mark = _folder(tmp_path), tmp_path / "mark"
    env = _env(plugin_site, mark)
    d = tiny_suite(methods=[{"name": "plugkd", "params": {"weight": 0.5}}, "folderkd"], plugins=[folder.name])
    d["recipe"]["epochs"] = 1
    suite = tmp_path / "suites" / "tiny.yaml"
    suite.parent.mkdir()
    suite.write_text(yaml.safe_dump(d).replace(folder.name, f"../{folder.name}"))
    results = tmp_path / "results"
    r = _cli("run", str(suite), "--executor", "local", "--parallel", "2", "--results", str(results), "--no-table",
             env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = {rec["method"]: rec for rec in (json.loads(p.read_text()) for p in
                                           (results / "tiny" / "runs").glob("*/record.json"))}
    assert recs["plugkd"]["status"] == recs["folderkd"]["status"] == "ok"
    assert recs["plugkd"]["params_resolved"] == {"weight": 0.5} and recs["plugkd"]["method_version"] == 2
    assert sorted(set(_marks(mark))) == ["_scale imported", "folderkd imported", "kdplug imported",
                                         "kdplug.plugkd imported"]
    r = _cli("table", str(results / "tiny"), "--format", "csv", env=_env(plugin_site, tmp_path / "mark2"))
    assert r.returncode == 0, r.stderr
    assert "plugkd" in r.stdout and "folderkd" in r.stdout


def test_run_debug_with_the_plugins_flag(plugin_site, tmp_path):
    folder, mark = _folder(tmp_path), tmp_path / "mark"
    d = tiny_suite(methods=["folderkd"])
    d["recipe"]["epochs"] = 1
    d["pairs"][0]["teacher"]["train"]["recipe"]["epochs"] = 1
    suite = tmp_path / "tiny.yaml"
    suite.write_text(yaml.safe_dump(d))
    results = tmp_path / "results"
    env = _env(plugin_site, mark)
    r = _cli("run", str(suite), "--executor", "debug", "--results", str(results), env=env)
    assert r.returncode == 2 and "unknown method 'folderkd'" in r.stderr, r.stderr  # not without the folder
    r = _cli("run", str(suite), "--executor", "debug", "--results", str(results), "--plugins", str(folder), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| folderkd" in r.stdout  # the table printed at the end
    assert "folderkd imported" in _marks(mark) and "notes imported" not in _marks(mark)


def test_a_suite_plugins_key_changes_no_run_id(write_suite, tmp_path, monkeypatch):
    from kdbench.registry import PLUGINS_ENV
    from kdbench.suite import SuiteError, load_suite

    monkeypatch.setenv(PLUGINS_ENV, "")  # restored after the test: load_suite adds the suite's folders to it
    monkeypatch.setattr(sys, "path", list(sys.path))
    _folder(tmp_path)
    plain = load_suite(write_suite(tiny_suite()))
    keyed = load_suite(write_suite(tiny_suite(plugins=["my_methods"])))
    assert [s.run_id for s in keyed.specs] == [s.run_id for s in plain.specs]
    assert os.environ[PLUGINS_ENV] == str((tmp_path / "my_methods").resolve())
    # in an included file: relative to that file
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "common.yaml").write_text(yaml.safe_dump(tiny_suite(plugins=["../my_methods"])))
    monkeypatch.setenv(PLUGINS_ENV, "")
    included = load_suite(write_suite({}, name="tiny", text="suite: tiny\ninclude: base/common.yaml\n"))
    assert [s.run_id for s in included.specs] == [s.run_id for s in plain.specs]
    assert os.environ[PLUGINS_ENV] == str((tmp_path / "my_methods").resolve())
    with pytest.raises(SuiteError, match=r"plugins\[0\]: .*nowhere is not a folder"):
        load_suite(write_suite(tiny_suite(plugins=["nowhere"])))
    with pytest.raises(SuiteError, match=r"plugins: expected a list of folders"):
        load_suite(write_suite(tiny_suite(plugins="my_methods")))


@pytest.mark.parametrize("case", ["syntax", "builtin", "entry_point"])
def test_a_bad_plugin_is_one_line_naming_the_file(plugin_site, tmp_path, case):
    folder = tmp_path / "bad"
    folder.mkdir()
    head = "from kdbench.method import Distiller, register_method\n"
    if case == "syntax":
        (folder / "broken.py").write_text(head + '@register_method("x")\nclass X(Distiller:\n    pass\n')
        want = [f"method plugin {folder / 'broken.py'}:3: syntax error"]
    elif case == "builtin":
        (folder / "mine.py").write_text(head + '@register_method("kd")\nclass MyKD(Distiller):\n    pass\n')
        want = ["duplicate method name 'kd'", str(REPO / "methods" / "kd.py"), str(folder / "mine.py")]
    else:
        (folder / "again.py").write_text(head + '@register_method("plugkd")\nclass P(Distiller):\n    pass\n')
        want = ["duplicate method name 'plugkd'", "entry point 'plugkd' of kdplug 0.3.1", str(folder / "again.py")]
    env = _env(plugin_site, tmp_path / "mark")
    suite = tmp_path / "tiny.yaml"
    suite.write_text(yaml.safe_dump(tiny_suite()))
    for args, extra, prefix in ((["ls", "methods", "--plugins", str(folder)], {}, "kdbench: error: "),
                                (["validate", str(suite), "--no-data"], {"KDBENCH_PLUGINS": str(folder)}, "FAIL ")):
        r = _cli(*args, env={**env, **extra})
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith(prefix), r.stderr
        assert all(w in lines[0] for w in want), lines[0]


def test_entry_point_reading_agrees_with_importlib_metadata():
    import importlib.metadata

    from kdbench.registry import entry_points_of

    for group in ("console_scripts", "pytest11"):
        ours = sorted((name, value) for name, value, _, _ in entry_points_of(group))
        theirs = sorted((e.name, e.value) for e in importlib.metadata.entry_points(group=group))
        assert ours == theirs, group


def test_an_entry_point_package_is_read_without_running_its_init(tmp_path):
    """An entry point naming a package: its modules are read (a base class through a relative import) and
    located without running the package's ``__init__``."""
    site = tmp_path / "site"
    (site / "relpkg").mkdir(parents=True)
    (site / "relpkg-1.0.dist-info").mkdir()
    (site / "relpkg-1.0.dist-info" / "entry_points.txt").write_text("[kdbench.methods]\nrel = relpkg\n")
    (site / "relpkg-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: relpkg\nVersion: 1.0\n")
    (site / "relpkg" / "__init__.py").write_text('raise SystemExit("relpkg/__init__.py ran")\n')
    (site / "relpkg" / "_base.py").write_text(textwrap.dedent("""\
        from kdbench.method import Distiller
        class Base(Distiller):
            tasks = frozenset({"classification", "segmentation"})
            citation = "relative base"
        """))
    (site / "relpkg" / "relkd.py").write_text(textwrap.dedent("""\
        from kdbench.method import register_method
        from ._base import Base
        @register_method("relkd")
        class RelKD(Base):
            def __init__(self, ctx, *, w: float = 2.0):
                super().__init__(ctx)
        """))
    r = _python("""
        import sys
        from kdbench.methodinfo import method_info
        from kdbench.registry import METHODS
        assert METHODS.info("relkd") is not None
        info = method_info("relkd")
        assert (info.tasks, info.citation, info.param_defaults()) == \\
            ({"classification", "segmentation"}, "relative base", {"w": 2.0}), info
        o = METHODS.origin("relkd")
        assert (o["source"], o["module"], o["distribution"], o["version"]) == \\
            ("entry point", "relpkg.relkd", "relpkg", "1.0"), o
        assert not [m for m in sys.modules if m.startswith("relpkg")] and "torch" not in sys.modules
        print("ok")
    """, {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_a_slurm_job_carries_the_plugin_folders(tmp_path, monkeypatch):
    """Where the cluster does not export the environment, the job object brings KDBENCH_PLUGINS with it."""
    import pickle

    from kdbench.registry import PLUGINS_ENV
    from kdbench.slurm import RunJob

    monkeypatch.setenv(PLUGINS_ENV, str(tmp_path))
    job = pickle.loads(pickle.dumps(RunJob()))
    monkeypatch.delenv(PLUGINS_ENV)
    job._use_plugins()
    assert os.environ[PLUGINS_ENV] == str(tmp_path)
