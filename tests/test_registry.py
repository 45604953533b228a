import subprocess
import sys

import pytest

from kdbench.registry import METHODS, Registry, RegistryError


def test_register_get_names():
    r = Registry("widget")

    @r.register("alpha")
    class A:
        pass

    @r.register("alpine")
    class B:
        pass

    assert r.get("alpha") is A
    assert r.names() == ["alpha", "alpine"]
    assert r.names("alp*") == ["alpha", "alpine"]
    assert "alpha" in r and "beta" not in r


def test_duplicate_name_is_an_error():
    r = Registry("widget")
    r.register("x")(type("A", (), {}))
    with pytest.raises(RegistryError, match="duplicate widget name 'x'"):
        r.register("x")(type("B", (), {}))


def test_unknown_name_suggests_close_matches_and_lists_valid():
    r = Registry("widget")
    for n in ("reviewkd", "kd", "cwd"):
        r.register(n)(type(n, (), {}))
    with pytest.raises(RegistryError) as e:
        r.get("reviewdk")
    msg = str(e.value)
    assert "unknown widget 'reviewdk'" in msg and "Did you mean 'reviewkd'" in msg
    assert "Valid widgets: cwd, kd, reviewkd" in msg


def test_methods_are_discovered_from_the_methods_folder():
    assert {"baseline", "kd"} <= set(METHODS.names())
    assert METHODS.get("kd").__module__ == "kdbench.methods.kd"


def test_import_kdbench_and_help_do_not_import_torch():
    code = ("import sys, kdbench, kdbench.cli, kdbench.suite, kdbench.registry\n"
            "kdbench.cli.build_parser()\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_method_param_lists_valid_ones():
    kd = METHODS.get("kd")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) 'temp' for method 'kd'; valid: temperature=4.0"):
        kd.check_params({"temp": 2})
    assert kd.check_params({"temperature": 2})["temperature"] == 2
