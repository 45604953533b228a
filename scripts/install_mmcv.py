#!/usr/bin/env python3
"""Install mmcv (with its compiled ops, ``mmcv._ext``) for the torch of the running interpreter.

mmdet's models import mmcv's compiled operators, so ``mmcv-lite`` is not enough, and the package index only
has mmcv's source distribution for current torch versions. This script builds mmcv from that source once,
keeps the built wheel in ``${XDG_CACHE_HOME:-~/.cache}/kdbench/wheels/<key>/`` (key = mmcv version, torch
version, Python tag, platform, cpu/cuda) and installs it; the next install on the same key takes seconds.

    python scripts/install_mmcv.py                # build (first time, ~15 min on 2 cores) or reuse, then install
    python scripts/install_mmcv.py --with-mmdet   # also install kdbench's `mmdet` extra (mmdet, mmengine)
    python scripts/install_mmcv.py --check        # say whether a cached wheel exists for this torch; exit 0/1

Run it with the interpreter of the environment that has torch (e.g. ``.venv/bin/python``).

What the source build changes: mmcv 2.1.0's setup.py pins the C++ standard (``-std=c++17``); recent torch
headers need the standard torch's own extension builder uses (C++20 for torch 2.14), so the build runs on a
temporary copy of the source whose setup.py asks for that standard. CUDA ops are built only when torch sees a
GPU (or with ``--cuda``); ``MAX_JOBS`` defaults to the number of usable cores.

On a CUDA machine whose torch matches one of OpenMMLab's prebuilt wheels, ``--find-links URL`` installs from
there instead of building (see README, "mmdet backend").
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

MMCV_VERSION = "2.1.0"  # mmdet 3.3.0 accepts mmcv >=2.0.0rc4,<2.2.0
MMDET_SPEC = ["mmdet>=3.3,<3.4", "mmengine>=0.10,<1"]


def log(msg: str) -> None:
    print(f"[install_mmcv {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kdbench" / "wheels"


def torch_facts():
    try:
        import torch
        import torch.utils.cpp_extension as cpp_ext
    except ImportError:
        sys.exit(f"install_mmcv: torch is not importable from {sys.executable}; run this script with the "
                 "Python of the environment that has torch (e.g. .venv/bin/python scripts/install_mmcv.py)")
    src = Path(cpp_ext.__file__).read_text(encoding="utf-8", errors="replace")
    # the C++ standard torch's extension builder compiles with (the highest -std=c++NN it passes)
    stds = [int(s) for s in re.findall(r"-std=c\+\+(\d\d)", src)]
    std = max(stds) if stds else 17
    return torch, std


def cache_key(torch, cuda: bool) -> str:
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    tv = torch.__version__.replace("+", "_")
    variant = f"cuda{torch.version.cuda}" if cuda else "cpu"
    return f"mmcv-{MMCV_VERSION}_torch-{tv}_{py}_{plat}_{variant}"


def pip(*args: str, env=None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)


def get_sdist(work: Path, sdist: str | None) -> Path:
    if sdist:
        p = Path(sdist)
        if not p.is_file():
            sys.exit(f"install_mmcv: --sdist {sdist}: no such file")
        return p
    # pip prepares an sdist's metadata even to download it, by running mmcv's setup.py, which imports
    # pkg_resources: an isolated build env gets the newest setuptools (81+, without pkg_resources) and fails,
    # so this uses the environment's own setuptools<81 (installed first by build_wheel)
    pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", f"mmcv=={MMCV_VERSION}",
        "-d", str(work))
    found = sorted(work.glob(f"mmcv-{MMCV_VERSION}.tar.gz"))
    if not found:
        sys.exit(f"install_mmcv: pip did not download mmcv-{MMCV_VERSION}.tar.gz into {work}")
    return found[0]


def patch_setup(src_dir: Path, std: int) -> None:
    """Ask mmcv's setup.py for torch's C++ standard instead of the one it pins (temporary copy only)."""
    setup = src_dir / "setup.py"
    text = setup.read_text(encoding="utf-8")
    new = re.sub(r"(['\"])-std=c\+\+1[47]\1", rf"\1-std=c++{std}\1", text)
    new = re.sub(r"(['\"])/std:c\+\+1[47]\1", rf"\1/std:c++{std}\1", new)
    if new == text:
        sys.exit(f"install_mmcv: found no -std=c++14/17 flag to raise in {setup}; is this mmcv {MMCV_VERSION}?")
    setup.write_text(new, encoding="utf-8")
    log(f"setup.py: C++ standard set to c++{std} (torch's)")


def build_wheel(out_dir: Path, std: int, cuda: bool, sdist: str | None, jobs: int) -> Path:
    with tempfile.TemporaryDirectory(prefix="kdbench-mmcv-") as tmp:
        work = Path(tmp)
        # the build backend mmcv's setup.py needs in this environment (--no-build-isolation: torch must be the
        # installed one, and setuptools must still have pkg_resources); ninja compiles MAX_JOBS files at a time,
        # without it setuptools compiles one by one
        pip("install", "setuptools>=70.1,<81", "wheel", "ninja")
        archive = get_sdist(work, sdist)
        with tarfile.open(archive) as tf:
            tf.extractall(work, filter="data") if hasattr(tarfile, "data_filter") else tf.extractall(work)
        src_dir = work / f"mmcv-{MMCV_VERSION}"
        if not (src_dir / "setup.py").is_file():
            sys.exit(f"install_mmcv: {archive} has no mmcv-{MMCV_VERSION}/setup.py")
        patch_setup(src_dir, std)
        env = dict(os.environ)
        env["MMCV_WITH_OPS"] = "1"
        env["MAX_JOBS"] = str(jobs)
        if cuda:
            env["FORCE_CUDA"] = "1"
        else:
            env.pop("FORCE_CUDA", None)
            env["CUDA_VISIBLE_DEVICES"] = ""  # torch.cuda.is_available() False -> CPU-only ops
        log(f"building mmcv {MMCV_VERSION} with ops ({'CPU+CUDA' if cuda else 'CPU'}), MAX_JOBS={jobs}")
        t0 = time.time()
        wheel_dir = work / "wheel"
        pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(src_dir), env=env)
        wheels = sorted(wheel_dir.glob("mmcv-*.whl"))
        if not wheels:
            sys.exit(f"install_mmcv: the build left no mmcv wheel in {wheel_dir}")
        log(f"build took {time.time() - t0:.0f} s")
        out_dir.mkdir(parents=True, exist_ok=True)
        dest = out_dir / wheels[0].name
        part = dest.with_suffix(".part")
        shutil.copy2(wheels[0], part)
        os.replace(part, dest)  # a cache entry is either complete or absent
        return dest


def verify() -> None:
    code = ("import mmcv, mmcv.ops, torch; from mmcv.ops import nms; "
            "b = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]]); s = torch.tensor([0.9, 0.8]); "
            "print('mmcv', mmcv.__version__, 'ops ok, nms keeps', len(nms(b, s, 0.5)[1]))")
    subprocess.run([sys.executable, "-c", code], check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--with-mmdet", action="store_true", help="also install mmdet and mmengine")
    ap.add_argument("--check", action="store_true", help="only report whether a cached wheel exists")
    ap.add_argument("--rebuild", action="store_true", help="build even if a cached wheel exists")
    ap.add_argument("--sdist", help=f"path to mmcv-{MMCV_VERSION}.tar.gz (default: pip download it)")
    ap.add_argument("--cuda", dest="cuda", action="store_true", default=None, help="build the CUDA ops too")
    ap.add_argument("--cpu", dest="cuda", action="store_false", help="build CPU ops only")
    ap.add_argument("--find-links", help="install a prebuilt mmcv from this index page instead of building")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: MAX_JOBS or cores)")
    args = ap.parse_args(argv)

    torch, std = torch_facts()
    cuda = bool(torch.cuda.is_available() and torch.version.cuda) if args.cuda is None else args.cuda
    key = cache_key(torch, cuda)
    entry = cache_root() / key
    cached = sorted(entry.glob("mmcv-*.whl")) if entry.is_dir() else []
    if args.check:
        print(f"{key}: {'cached ' + str(cached[0]) if cached else 'not cached'}")
        return 0 if cached else 1

    t0 = time.time()
    if args.find_links:
        pip("install", f"mmcv=={MMCV_VERSION}", "--only-binary", "mmcv", "-f", args.find_links)
    else:
        if cached and not args.rebuild:
            log(f"cached wheel for {key}: {cached[0]}")
            wheel = cached[0]
        else:
            jobs = args.jobs or int(os.environ.get("MAX_JOBS") or len(os.sched_getaffinity(0)))
            wheel = build_wheel(entry, std, cuda, args.sdist, jobs)
            log(f"cached {wheel}")
        pip("install", str(wheel))  # with mmcv's own requirements (addict, mmengine, opencv, yapf, ...)
        pip("install", "--force-reinstall", "--no-deps", str(wheel))  # this build, whatever mmcv 2.1.0 was there
    if args.with_mmdet:
        pip("install", *MMDET_SPEC)
    verify()
    log(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
