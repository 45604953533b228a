"""Start-up cost of the CLI's listing and validation commands (issue 12, "Slow listing"; not a timed test).

Each command runs in a fresh ``python -m kdbench.cli`` subprocess (what ``kdbench ...`` runs), ``--repeats``
times, round robin over the commands so that other load on the machine biases none of them; the table gives the
minimum and the median wall time (load only ever adds time: compare minimums) and the minimum CPU time
(user + system) of the process, which other load inflates much less than wall time. One more run of each under
``python -X importtime`` tells whether it imported torch (and timm/torchvision), and which kdbench module pulled
torch in first. ``kdbench ls methods`` and ``kdbench validate suites/quickstart.yaml`` must import no torch and
take under 1 s on an idle machine; ``ls models`` asks timm and torchvision for their names (it imports them).

    python benchmarks/bench_cli.py [--repeats 5] [--only ls]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

COMMANDS: list[tuple[str, list[str]]] = [
    ("--help", ["--help"]),
    ("ls methods", ["ls", "methods"]),
    ("ls models", ["ls", "models"]),
    ("ls suites", ["ls", "suites"]),
    ("ls datasets", ["ls", "datasets"]),
    ("validate quickstart", ["validate", "suites/quickstart.yaml"]),
    ("run quickstart --dry-run", ["run", "suites/quickstart.yaml", "--dry-run"]),
]
#: must not import torch (issue 12's criterion covers the first two)
TORCH_FREE = ("--help", "ls methods", "ls suites", "ls datasets", "validate quickstart", "run quickstart --dry-run")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def time_once(args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+system) of one fresh ``kdbench`` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "kdbench.cli", *args], cwd=REPO, env=_env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"kdbench {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return dt, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def imports(args: list[str]) -> dict:
    """Run once under ``-X importtime``: which of torch/timm/torchvision were imported, and by what."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "kdbench.cli", *args], cwd=REPO, env=_env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    mods = []  # (depth, name) in the order importtime prints them (a module after the modules it imports)
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1]
            mods.append((len(name) - len(name.lstrip()), name.strip()))
    names = {n for _, n in mods}
    out = {lib: lib in names for lib in ("torch", "timm", "torchvision")}
    out["via"] = ""
    if out["torch"]:  # the kdbench module whose import (transitively) pulled torch in: an enclosing line
        i = next(i for i, (_, n) in enumerate(mods) if n == "torch")
        depth = mods[i][0]
        for d, n in mods[i + 1:]:
            if d < depth and (n.startswith("kdbench") or n.startswith("methods")):
                out["via"] = n
                break
            depth = min(depth, d)
    return out


def run(repeats: int = 5, only: str | None = None, log=print) -> dict:
    cmds = [(label, args) for label, args in COMMANDS if only is None or only in label]
    times: dict[str, list[float]] = {label: [] for label, _ in cmds}
    cpu: dict[str, list[float]] = {label: [] for label, _ in cmds}
    for _ in range(repeats):
        for label, args in cmds:
            wall, used = time_once(args)
            times[label].append(wall)
            cpu[label].append(used)
    rows = {}
    for label, args in cmds:
        imp = imports(args)
        rows[label] = {"min_s": min(times[label]), "median_s": statistics.median(times[label]),
                       "cpu_s": min(cpu[label]), **imp}
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    log(f"kdbench CLI start-up, {repeats} runs each (fresh process), load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    log(f"{'command':28s} {'min s':>7s} {'median s':>9s} {'cpu s':>7s}  torch  timm  torchvision  torch first under")
    for label, r in rows.items():
        flag = lambda b: "yes" if b else "no"  # noqa: E731
        log(f"{label:28s} {r['min_s']:7.2f} {r['median_s']:9.2f} {r['cpu_s']:7.2f}  {flag(r['torch']):5s}  {flag(r['timm']):4s}  "
            f"{flag(r['torchvision']):11s}  {r['via'] or '-'}")
    bad = [label for label in rows if label in TORCH_FREE and rows[label]["torch"]]
    if bad:
        log(f"NOT torch-free: {', '.join(bad)}")
    return {"rows": rows, "load": load, "torch_imported": bad}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", help="only the commands whose label contains this text")
    a = p.parse_args(argv)
    res = run(a.repeats, a.only)
    return 1 if res["torch_imported"] else 0


if __name__ == "__main__":
    sys.exit(main())
