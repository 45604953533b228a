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
SLURM_SCRIPTS = REPO / "scripts" / "slurm"


def _slurm_usable() -> bool:
    import shutil
    import subprocess

    if not shutil.which("sinfo"):
        return False
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and any(s.strip().rstrip("*~#") in ("idle", "mixed", "allocated", "completing")
                                     for s in r.stdout.split())


@pytest.fixture(scope="session")
def slurm():
    """A running SLURM cluster (with accounting) for @pytest.mark.slurm tests.

    Uses the cluster that is already up (`.ci/run` starts one with scripts/slurm/start-local-slurm.sh);
    otherwise starts it with that script and stops it at the end of the session. Skips, saying why, only
    where it cannot be started: not Linux, not root, no apt/dpkg (the script installs Debian packages).
    A start that fails on a machine that should support it is an error, not a skip.
    """
    import shutil
    import subprocess
    import sys

    if _slurm_usable():
        yield "running"
        return
    if not sys.platform.startswith("linux"):
        pytest.skip("SLURM tests need Linux (the test cluster is started with Debian packages)")
    if os.geteuid() != 0:
        pytest.skip("no SLURM cluster is running and starting one needs root "
                    "(run `sudo scripts/slurm/start-local-slurm.sh` first)")
    if not (shutil.which("apt-get") and shutil.which("dpkg-query")):
        pytest.skip("no SLURM cluster is running and this is not a Debian/Ubuntu system (no apt-get) to start one")
    r = subprocess.run([str(SLURM_SCRIPTS / "start-local-slurm.sh")], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or not _slurm_usable():
        pytest.fail(f"scripts/slurm/start-local-slurm.sh could not start SLURM (exit {r.returncode}):\n"
                    f"{r.stderr[-3000:]}")
    yield "started"
    subprocess.run([str(SLURM_SCRIPTS / "stop-local-slurm.sh")], stdin=subprocess.DEVNULL, capture_output=True,
                   timeout=300)
