import os
from pathlib import Path

import pytest

os.environ.setdefault("KDBENCH_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def write_suite(tmp_path):
    """Write a suite YAML into tmp_path under its own name; returns the path."""
    import yaml

    def _write(data: dict, name: str | None = None, text: str | None = None) -> Path:
        name = name or data.get("suite", "s")
        p = tmp_path / f"{name}.yaml"
        p.write_text(text if text is not None else yaml.safe_dump(data, sort_keys=False))
        return p

    return _write


# --------------------------------------------------------------------------------------------- SLURM
# Tests that need a SLURM cluster carry @pytest.mark.slurm (or use the `slurm` fixture, which marks them).
# By default they run on a cluster that is already up and are skipped, with the reason, when none is: plain
# `pytest` never installs packages or starts daemons. KDBENCH_TEST_START_SLURM=1 (set by .ci/run) lets the
# fixture start a one-node cluster with scripts/slurm/start-local-slurm.sh (root or passwordless sudo; Debian
# packages + daemons) and stop it at the end of the session.
SLURM_SCRIPTS = REPO / "scripts" / "slurm"
START_SLURM_ENV = "KDBENCH_TEST_START_SLURM"


def _slurm_usable() -> bool:
    import shutil
    import subprocess

    if not (shutil.which("sinfo") and shutil.which("srun") and shutil.which("sbatch")):
        return False
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and any(s.strip().rstrip("*~#") in ("idle", "mixed", "allocated", "completing")
                                     for s in r.stdout.split())


def _start_allowed() -> bool:
    return os.environ.get(START_SLURM_ENV, "").strip().lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config, items):
    """A test that uses the `slurm` fixture is a SLURM test: mark it, so that `-m "not slurm"` deselects it."""
    for item in items:
        if "slurm" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slurm") is None:
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(autouse=True)
def _slurm_marked_tests_need_the_cluster(request):
    """A test marked @pytest.mark.slurm gets the cluster (or is skipped) even without asking for `slurm`."""
    if request.node.get_closest_marker("slurm") is not None:
        request.getfixturevalue("slurm")


@pytest.fixture(scope="session")
def slurm():
    """A running SLURM cluster (with accounting) for @pytest.mark.slurm tests.

    Uses the cluster that is already up. Otherwise skips, saying why, unless KDBENCH_TEST_START_SLURM=1:
    then it starts one with scripts/slurm/start-local-slurm.sh and stops it at the end of the session, skipping
    only where that cannot work (not Linux, neither root nor passwordless sudo, no apt/dpkg); a start that
    fails where it should work is an error, not a skip.
    """
    import shutil
    import subprocess
    import sys

    if _slurm_usable():
        yield "running"
        return
    if not _start_allowed():
        pytest.skip(f"no SLURM cluster is running (sinfo/srun/sbatch not found or no node up); start one with "
                    f"`sudo scripts/slurm/start-local-slurm.sh`, or set {START_SLURM_ENV}=1 to let the tests "
                    f"start and stop one (installs Debian packages and starts daemons)")
    if not sys.platform.startswith("linux"):
        pytest.skip("SLURM tests need Linux (the test cluster is started with Debian packages)")
    if os.geteuid() == 0:
        sudo = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        sudo = ["sudo", "-n"]
    else:
        pytest.skip("no SLURM cluster is running and starting one needs root or passwordless sudo "
                    "(run `sudo scripts/slurm/start-local-slurm.sh` first)")
    if not (shutil.which("apt-get") and shutil.which("dpkg-query")):
        pytest.skip("no SLURM cluster is running and this is not a Debian/Ubuntu system (no apt-get) to start one")
    r = subprocess.run([*sudo, str(SLURM_SCRIPTS / "start-local-slurm.sh")], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or not _slurm_usable():
        pytest.fail(f"scripts/slurm/start-local-slurm.sh could not start SLURM (exit {r.returncode}):\n"
                    f"{r.stderr[-3000:]}")
    yield "started"
    subprocess.run([*sudo, str(SLURM_SCRIPTS / "stop-local-slurm.sh")], stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=300)
