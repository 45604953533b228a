"""Listing and validating without torch (issue 12, "Slow listing"): method/dataset metadata read from the plugin
files (``Registry.info``, ``kdbench.methodinfo``), model names and taps from ``kdbench.models.catalog``, and the
declarative pair check (``requires_taps``). Times are printed by ``benchmarks/bench_cli.py``, not tested here."""

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

import kdbench.methods
from kdb_util import tiny_suite

REPO = Path(__file__).resolve().parent.parent


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True)


def test_ls_validate_and_dry_run_of_the_quickstart_do_not_import_torch():
    r = _python("""
        import contextlib, io, sys
        from kdbench.cli import main
        for argv in (["ls", "methods"], ["ls", "methods", "-v"], ["ls", "suites"], ["ls", "datasets"],
                     ["validate", "suites/quickstart.yaml"], ["run", "suites/quickstart.yaml", "--dry-run"]):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert main(argv) == 0, argv
            assert out.getvalue().strip(), argv
            heavy = sorted(m for m in ("torch", "timm", "torchvision", "numpy") if m in sys.modules)
            assert not heavy, f"{argv} imported {heavy}"
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_get_imports_only_the_module_that_registers_the_name():
    r = _python("""
        import sys
        from kdbench.registry import METHODS
        assert METHODS.get("kd").__module__ == "kdbench.methods.kd"
        others = [m for m in ("kdbench.methods.cwd", "kdbench.methods.reviewkd", "kdbench.methods.afp") if m in sys.modules]
        assert not others, others
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# ------------------------------------------------------------------ the file reading agrees with the classes
def test_method_metadata_read_from_the_files_equals_the_classes():
    from kdbench.method import describe_type
    from kdbench.methodinfo import MethodInfo
    from kdbench.registry import METHODS

    wrong_values = ("x", 2.5, 7, True, None, [1], {"a": 1})
    compared = 0
    for name, cls in METHODS.items():
        plugin = METHODS.info(name)
        assert plugin is not None, f"{name}: its metadata should be literal (see kdbench.method.Distiller)"
        info = MethodInfo.from_plugin(plugin)
        assert info is not None, name
        for attr in MethodInfo.ATTRS:
            got, want = getattr(info, attr), getattr(cls, attr)
            assert got == (frozenset(want) if attr == "tasks" else want), (name, attr, got, want)
        assert info.param_defaults() == cls.param_defaults(), name
        ann_i, ann_c = info.param_annotations(), cls.param_annotations()
        assert set(ann_i) == set(ann_c), name
        assert {k: describe_type(v) for k, v in ann_i.items()} == {k: describe_type(v) for k, v in ann_c.items()}
        assert info.check_params({}) == cls.check_params({}), name
        for p in cls.param_defaults():  # the same accepted values and the same messages
            for value in wrong_values:
                outcome = []
                for checker in (info.check_params, cls.check_params):
                    try:
                        outcome.append(("ok", checker({p: value})))
                    except ValueError as e:
                        outcome.append(("error", str(e)))
                assert outcome[0] == outcome[1], (name, p, value, outcome)
                compared += 1
    assert compared >= 7 * 40


def test_dataset_metadata_read_from_the_files_equals_the_classes():
    from kdbench.registry import DATASETS

    for name, plugin in DATASETS.items():
        info = DATASETS.info(name)
        assert info is not None, name
        assert info.attrs.get("task", "classification") == plugin.task, name
        assert info.attrs.get("layout", "") == plugin.layout, name
        assert list(info.params) == plugin.option_names(), name
        assert {k: d for k, (_, d) in info.params.items()} == plugin.option_defaults(), name


def test_model_catalog_matches_the_model_modules():
    from kdbench.models import catalog
    from kdbench.models.cifar import CIFAR_MODELS
    from kdbench.models.detection import DETECTOR_NAMES, DetectorModel
    from kdbench.models.segmentation import SEGMENTATION_TAPS, smp_names, torchvision_segmentation_names
    from kdbench.models.tap import RESNET_TAPS, KdbenchCifar, TimmModel, _with_preact

    assert list(catalog.KDBENCH_NAMES) == sorted(CIFAR_MODELS)
    assert catalog.KDBENCH_TAPS == tuple(KdbenchCifar.supported)
    assert catalog.CLASSIFIER_TAPS == tuple(TimmModel.supported) == tuple(RESNET_TAPS)
    assert catalog.PREACT_CLASSIFIER_TAPS == _with_preact(RESNET_TAPS)
    assert catalog.DETECTOR_NAMES == tuple(DETECTOR_NAMES) and catalog.DETECTOR_TAPS == tuple(DetectorModel.supported)
    assert list(catalog.SMP_NAMES) == smp_names() and catalog.SEGMENTATION_TAPS == tuple(SEGMENTATION_TAPS)
    assert set(catalog.TORCHVISION_SEGMENTERS) <= set(torchvision_segmentation_names())


def test_model_checks_and_taps_without_torch():
    r = _python("""
        import sys
        from kdbench.models.sources import check_model, model_taps
        for ok in ("kdbench:resnet8x4", "smp:pspnet_resnet18", "torchvision:fcos_resnet50_fpn",
                   "torchvision:deeplabv3_resnet50"):
            check_model(ok)
        for bad, text in (("kdbench:resnet9", "Did you mean kdbench:resnet8"), ("smp:unet_resnet18", "Valid smp models"),
                          ("nosuch:x", "unknown model source 'nosuch'")):
            try:
                check_model(bad)
                raise SystemExit(f"{bad} accepted")
            except (ValueError, KeyError) as e:
                assert text in str(e), str(e)
        assert "stages_preact" in model_taps("kdbench:wrn_40_2") and "stages_preact" not in model_taps("timm:resnet18")
        assert model_taps("torchvision:retinanet_resnet18_fpn") == ("fpn", "reg")
        assert "torch" not in sys.modules
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# ------------------------------------------------------------------------------ the declarative pair check
def test_requires_taps_refuses_a_pair_without_the_tap(write_suite):
    from kdbench.suite import SuiteError, load_suite

    def suite(params, teacher="timm:resnet18"):
        pair = {"teacher": {"model": teacher, "weights": "t.pt"}, "student": {"model": "kdbench:resnet8"}}
        return write_suite(tiny_suite(pairs=[pair], methods=[{"name": "reviewkd", "params": params}]), name="tiny")

    with pytest.raises(SuiteError) as e:
        load_suite(suite({}))  # teacher_preact defaults to true
    msg = str(e.value)
    assert "methods[0] (reviewkd) on pairs[0]" in msg, msg
    assert ("reviewkd: teacher_preact=true needs the 'stages_preact' tap, which only kdbench: CIFAR models, "
            "torchvision: ResNet-family classifiers, timm: mobilenetv1_100, mobilenetv1_100h, mobilenetv1_125 (with "
            "act_layer: relu) provide, not the teacher 'timm:resnet18'; set teacher_preact: false") in msg, msg
    load_suite(suite({"teacher_preact": False}))  # post-ReLU stages: fine
    load_suite(suite({}, teacher="kdbench:resnet20"))  # a kdbench teacher has them
    with pytest.raises(SuiteError, match="student_preact=true needs the 'stages_preact' tap, .* not the student 'timm:resnet18'"):
        pair = {"teacher": {"model": "kdbench:resnet20", "weights": "t.pt"}, "student": {"model": "timm:resnet18"}}
        load_suite(write_suite(tiny_suite(pairs=[pair], methods=[{"name": "reviewkd",
                                                                  "params": {"student_preact": True}}]), name="tiny"))


# ---------------------------------------------------------------------- plugins: literal, and not literal
def _drop(body: str) -> tuple[str, Path]:
    name = f"zz_meta_{uuid.uuid4().hex[:8]}"
    f = Path(kdbench.methods.__path__[0]) / f"{name}.py"
    f.write_text(textwrap.dedent(body.replace("NAME", name)))
    return name, f


def test_a_plugin_with_non_literal_metadata_is_imported_and_still_checked():
    name, f = _drop('''
        """A method whose version is computed: the registry must import it to know it."""
        from kdbench.method import Distiller, register_method

        BASE = 3

        @register_method("NAME")
        class Computed(Distiller):
            version = BASE + 1
            citation = "computed plugin"
            def __init__(self, ctx, *, weight: float = 1.0):
                super().__init__(ctx)

            @classmethod
            def check_pair(cls, params, teacher_model, student_model):
                if params["weight"] > 2:
                    raise ValueError("weight too large for this pair")
    ''')
    try:
        r = _python(f"""
            import sys
            from kdbench.methodinfo import method_info
            from kdbench.registry import METHODS
            assert METHODS.info("{name}") is None and "kdbench.methods.{name}" not in sys.modules
            info = method_info("{name}")
            assert info.version == 4 and info.check_params({{"weight": 2}}) == {{"weight": 2.0}}
            try:
                info.check_pair({{"weight": 3.0}}, "kdbench:resnet20", "kdbench:resnet8")
                raise SystemExit("check_pair not called")
            except ValueError as e:
                assert "too large" in str(e)
            print("ok")
        """)
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
        r = subprocess.run([sys.executable, "-m", "kdbench.cli", "ls", "methods"], cwd=REPO, capture_output=True,
                           text=True)
        assert r.returncode == 0 and name in r.stdout and "computed plugin" in r.stdout, r.stderr
    finally:
        f.unlink()


def test_a_literal_plugin_is_read_without_importing_it(write_suite):
    name, f = _drop('''
        """A literal plugin."""
        from typing import Literal
        from kdbench.method import Distiller, register_method

        @register_method("NAME")
        class Plain(Distiller):
            tasks = frozenset({"classification", "segmentation"})
            citation = "plain plugin"
            version = 3
            def __init__(self, ctx, *, mode: Literal["a", "b"] = "a", scale: float | None = None, n: int = 2):
                super().__init__(ctx)
    ''')
    try:
        path = write_suite(tiny_suite(methods=[{"name": name, "params": {"mode": "c"}}]), name="tiny")
        r = _python(f"""
            import sys
            from kdbench.methodinfo import method_info
            from kdbench.suite import SuiteError, load_suite
            info = method_info("{name}")
            assert info.version == 3 and info.tasks == {{"classification", "segmentation"}}
            assert info.check_params({{"scale": "1e1"}}) == {{"mode": "a", "scale": 10.0, "n": 2}}
            try:
                load_suite({str(path)!r})
                raise SystemExit("accepted")
            except SuiteError as e:
                assert "parameter 'mode' of method '{name}' must be one of 'a', 'b', got 'c'" in str(e), str(e)
            assert "kdbench.methods.{name}" not in sys.modules and "torch" not in sys.modules
            print("ok")
        """)
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    finally:
        f.unlink()


def test_bench_cli_runs_and_reports_torch_freedom():
    from benchmarks.bench_cli import run

    lines = []
    res = run(repeats=1, only="ls methods", log=lines.append)
    row = res["rows"]["ls methods"]
    assert row["min_s"] > 0 and row["min_s"] <= row["median_s"] and row["torch"] is False
    assert res["torch_imported"] == [] and any("ls methods" in line for line in lines)
