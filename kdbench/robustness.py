"""Corruption robustness: the corruption engine, the sweep over (corruption, severity) cells, and the metrics.

**Engine.** The corruptions are those of Hendrycks & Dietterich (2019) as implemented by the
``imagecorruptions-imaug`` package (imported as ``imagecorruptions``); kdbench only chooses, seeds and checks
them. The 15 benchmark corruptions come in four families (noise, blur, weather, digital); the 4 extra ones
(speckle noise, gaussian blur, spatter, saturate) are reported apart, as Michaelis et al. (2019) do. Set names:
``benchmark`` (15), ``extra`` (4), ``all`` (19), a family name, or a list of corruption names.

**Determinism.** The library draws from numpy's global RNG, except impulse noise and glass blur, which take a
``seed`` argument (without one, glass blur draws fresh entropy). :func:`corrupt` seeds both from
``(key, corruption, severity)`` (``key`` = a stable image id) and restores numpy's global RNG state afterwards,
so one image, corruption and severity gives bit-identical pixels in any process, any DataLoader worker, any
order of evaluation, and the caller's own numpy random stream is left untouched.

**Image sizes.** The library refuses images smaller than 32 pixels on a side (it raises for 8×8 or 16×16), and
its parameters (blur radii, frost crops, snow flakes) are defined in pixels of a full-size image; images of at
least 32×32 (CIFAR's 32×32 included) work for all 19 corruptions. kdbench refuses smaller images with a clear
message rather than upsampling them (which would change what the corruption means): the 8×8 digits must be
built with ``data.image_size: 32`` (or more) to be corrupted. Grayscale images (``H×W``, or ``H×W×1``) are
corrupted as the library does (it replicates the plane into RGB) and its first channel is returned, so a
grayscale input gives a grayscale output with each pixel's noise drawn as for a colour image's red channel.

**Source of the corrupted images** (recorded as ``source`` in every cell and every metric row of an eval
record; the robustness table's caption states it). ``generated``: corrupted on the fly by the engine above,
whose severity parameters are the ImageNet-C ones (e.g. gaussian noise sigma .08-.38) at every image size. For
ImageNet-style folders (corrupted after resize and center crop) that is ImageNet-C's protocol, for COCO and
Cityscapes that of COCO-C and Cityscapes-C; for CIFAR's 32×32 images it gives a "CIFAR-100-C-style" set, *not*
Hendrycks' released CIFAR-100-C (made by make_cifar_c.py with strengths tuned for 32×32, e.g. sigma .04-.10):
its numbers are not comparable with published CIFAR-100-C numbers (methods compared against the same baseline
remain comparable). ``released``: pre-corrupted files read from a folder (an eval entry's ``root:``, the
released CIFAR-100-C layout; a folder :func:`kdbench.data.cifar.write_cifar100_c` wrote counts as generated,
which it is, pixel for pixel). A cell or metric row without ``source`` was generated (a released eval record
also names its folder: ``root`` in its ``eval``). A generated cell also records ``point``, where the images were
corrupted (:func:`corruption_point`: ``center_crop`` for ImageFolder datasets, ``decoded`` otherwise); a resumed
sweep redoes a cell of another point (ImageFolder cells written before corruptions moved after the crop).

**Metrics** (torch-free). Detection / segmentation (Michaelis et al. 2019; Kamann & Rother 2020): P = clean
value, mPC = mean over the benchmark corruptions × severities, rPC = mPC / P, per-family means. Classification
(Hendrycks & Dietterich 2019): error E = 100 − top-1; CE_c = Σ_s E(f,c,s) / Σ_s E(ref,c,s); mCE = mean_c CE_c;
relative CE_c = Σ_s (E(f,c,s) − E_clean(f)) / Σ_s (E(ref,c,s) − E_clean(ref)); relative mCE = its mean; all
CE values in % (× 100).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence


NOISE = ("gaussian_noise", "shot_noise", "impulse_noise")
BLUR = ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur")
WEATHER = ("snow", "frost", "fog", "brightness")
DIGITAL = ("contrast", "elastic_transform", "pixelate", "jpeg_compression")
BENCHMARK = NOISE + BLUR + WEATHER + DIGITAL
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL = BENCHMARK + EXTRA
FAMILIES: dict[str, tuple[str, ...]] = {"noise": NOISE, "blur": BLUR, "weather": WEATHER, "digital": DIGITAL,
                                        "extra": EXTRA}
SETS: dict[str, tuple[str, ...]] = {"benchmark": BENCHMARK, "extra": EXTRA, "all": ALL,
                                    **{k: v for k, v in FAMILIES.items() if k != "extra"}}
SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIDE = 32  # the library refuses smaller images
#: corruptions that take their own ``seed`` instead of numpy's global RNG (impulse noise: scikit-image's
#: random_noise; glass blur: a numba-compiled shuffle, fresh entropy when not given a seed)
SEEDED = ("impulse_noise", "glass_blur")
EVAL_NAME = "corruptions"
CELL_VERSION = 1
#: where the corrupted images come from (``source`` of cells and metric rows; see the module docstring)
SOURCES = {"generated": "generated by kdbench with imagecorruptions (ImageNet-C strengths)",
           "released": "released pre-corrupted files"}


# ------------------------------------------------------------------------------------------- names
def resolve_corruptions(spec: str | Sequence[str]) -> list[str]:
    """Corruption names of a set name (``benchmark``, ``extra``, ``all``, a family), a comma-separated string
    or a list of names/set names, in canonical order, without duplicates. Unknown names raise ValueError listing
    the valid ones."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not items or any(not isinstance(s, str) or not s for s in items):
        raise ValueError(f"corruptions must be a set name or a list of names, got {spec!r}")
    chosen: set[str] = set()
    for s in items:
        if s in SETS:
            chosen.update(SETS[s])
        elif s in ALL:
            chosen.add(s)
        else:
            raise ValueError(f"unknown corruption {s!r}; valid sets: {', '.join(SETS)}; valid corruptions: "
                             f"{', '.join(ALL)}")
    return [c for c in ALL if c in chosen]


def check_severities(severities: int | Iterable[int]) -> list[int]:
    """Sorted distinct severities, each an integer in 1–5 (ValueError otherwise)."""
    sev = list(severities) if isinstance(severities, (list, tuple, set, range)) else [severities]
    bad = [s for s in sev if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 1 <= int(s) <= 5]
    if not sev or bad:
        raise ValueError(f"severities must be integers in 1-5, got {list(sev) if sev else severities!r}")
    return sorted({int(s) for s in sev})


def family_of(corruption: str) -> str:
    for fam, names in FAMILIES.items():
        if corruption in names:
            return fam
    raise ValueError(f"unknown corruption {corruption!r}; valid: {', '.join(ALL)}")


# ------------------------------------------------------------------------------------------- engine
def seed_for(key: Any, corruption: str, severity: int) -> int:
    """The 32-bit numpy seed of one (image key, corruption, severity): stable across processes and platforms."""
    digest = hashlib.sha256(f"kdbench-corruption|{key}|{corruption}|{int(severity)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def corrupt(image: np.ndarray, name: str, severity: int, key: Any) -> np.ndarray:
    """``image`` (uint8, ``H×W×3``, ``H×W×1`` or ``H×W``, sides >= 32) corrupted by ``name`` at ``severity``,
    seeded by ``(key, name, severity)``; same shape and dtype as the input. numpy's global RNG state is restored."""
    import numpy as np  # here, not at import: suite validation reads the names above without numpy

    from imagecorruptions import corrupt as _lib_corrupt

    if name not in ALL:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(ALL)}")
    check_severities([severity])
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"corrupt expects a uint8 image, got {image.dtype}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        raise ValueError(f"corrupt expects an H×W, H×W×1 or H×W×3 image, got shape {tuple(image.shape)}")
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"image of {h}×{w} pixels is too small to corrupt: imagecorruptions needs at least "
                         f"{MIN_SIDE}×{MIN_SIDE} (its corruptions are defined at full-image scale); the suite's data "
                         f"must give images of at least {MIN_SIDE} px a side where they are corrupted "
                         "(`kdbench validate SUITE` names the data option to change)")
    gray = image.ndim == 2 or image.shape[2] == 1
    seed = seed_for(key, name, severity)
    kwargs = {"seed": seed} if name in SEEDED else {}
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        out = _lib_corrupt(np.ascontiguousarray(image), severity=int(severity), corruption_name=name, **kwargs)
    finally:
        np.random.set_state(state)
    out = np.asarray(out, dtype=np.uint8)
    if out.shape[:2] != (h, w):
        raise RuntimeError(f"{name} s{severity} changed the image size from {h}×{w} to "
                           f"{out.shape[0]}×{out.shape[1]}")
    if gray:
        out = out[..., 0] if out.ndim == 3 else out
        out = out.reshape(image.shape)
    return np.ascontiguousarray(out)


class Corruptor:
    """A picklable ``image_fn`` (dataset contract): ``fn(image_uint8, key) -> corrupted image``."""

    def __init__(self, name: str, severity: int):
        if name not in ALL:
            raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(ALL)}")
        self.name = name
        self.severity = check_severities([severity])[0]

    def __call__(self, image: np.ndarray, key: int) -> np.ndarray:
        return corrupt(image, self.name, self.severity, key)

    def __repr__(self) -> str:
        return f"Corruptor({self.name!r}, {self.severity})"


def with_image_fn(dataset, fn: Callable | None):
    """A shallow copy of ``dataset`` whose images go through ``fn`` (a ``torch.utils.data.Subset`` is copied with
    its inner dataset). The original is left unchanged. Where each dataset applies it: TensorImages (CIFAR,
    digits) to the stored image, before resizing and normalisation; COCO and Cityscapes to the decoded image,
    before resizing (COCO-C, Cityscapes-C); the imagefolder datasets to the resized, center-cropped image,
    before tensor conversion and normalisation (ImageNet-C)."""
    inner = getattr(dataset, "dataset", None)
    if not hasattr(dataset, "image_fn") and inner is not None and hasattr(dataset, "indices"):
        out = copy.copy(dataset)
        out.dataset = with_image_fn(inner, fn)
        return out
    if not hasattr(dataset, "image_fn"):
        raise ValueError(f"{type(dataset).__name__} does not take an image_fn, so it cannot be corrupted; datasets "
                         "that can: TensorImages, CocoDetection, CityscapesSegmentation, the imagefolder datasets")
    out = copy.copy(dataset)
    out.image_fn = fn
    return out


def throughput(images: Sequence[np.ndarray], corruptions: Sequence[str], severity: int = 3) -> dict[str, float]:
    """Images per second of the engine alone (one process), per corruption, over ``images``."""
    out = {}
    for name in resolve_corruptions(list(corruptions)):
        t0 = time.perf_counter()
        for i, img in enumerate(images):
            corrupt(img, name, severity, i)
        out[name] = len(images) / max(time.perf_counter() - t0, 1e-9)
    return out


# ------------------------------------------------------------------------------------------- sweep
def warm_up(corruption: str, severity: int) -> None:
    """Run ``corruption`` once on a blank 32×32 image (JIT compilation, file loading) in this process."""
    import numpy as np  # here, not at import: suite validation reads the names above without numpy

    corrupt(np.zeros((MIN_SIDE, MIN_SIDE, 3), dtype=np.uint8), corruption, severity, "warm-up")


def cell_path(cell_dir: str | Path, corruption: str, severity: int) -> Path:
    return Path(cell_dir) / f"{corruption}_s{int(severity)}.json"


def corruption_point(dataset) -> str:
    """Where ``dataset`` (or the dataset a ``Subset`` wraps) applies a corruption: its ``corruption_point``
    attribute, ``"center_crop"`` for the ImageFolder datasets (ImageNet-C), else ``"decoded"`` (the stored or
    decoded image before resizing: CIFAR, digits, COCO, Cityscapes)."""
    point = getattr(dataset, "corruption_point", None)
    if point is None and hasattr(dataset, "indices"):
        point = getattr(getattr(dataset, "dataset", None), "corruption_point", None)
    return str(point or "decoded")


class UnreadableCell(ValueError):
    """A cell file that is not a finished cell (not JSON, another cell's content, a metric that is not a finite
    number, the task's primary metric missing): set aside and redone."""


def read_cell(path: Path, corruption: str, severity: int, n_images: int | None = None,
              source: str | None = None, point: str | None = None, model_sha256: str | None = None,
              primary: str | None = None) -> dict | None:
    """A finished cell of the model file ``model_sha256``, or None when absent or of another evaluation (another
    dataset size, another ``source``: ``"generated"`` by the engine or ``"released"`` pre-corrupted files; for
    generated cells another :func:`corruption_point`; another model file, or none recorded). A file that is not
    a readable cell of this (corruption, severity) with every metric a finite number and ``primary`` among them
    raises :class:`UnreadableCell` saying why."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise UnreadableCell(f"cannot read it ({type(e).__name__}: {e})") from None
    try:
        cell = json.loads(text)
    except ValueError as e:
        raise UnreadableCell(f"not JSON ({e})") from None
    if not isinstance(cell, dict) or cell.get("corruption") != corruption or cell.get("severity") != severity:
        raise UnreadableCell(f"not the cell of {corruption} s{severity}")
    metrics = cell.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise UnreadableCell("no metrics")
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise UnreadableCell(f"metric {k!r} is {v!r}, not a finite number")
    if primary is not None and primary not in metrics:
        raise UnreadableCell(f"no {primary!r} among its metrics ({', '.join(metrics)})")
    if n_images is not None and cell.get("n_images") != n_images:
        return None
    if source is not None and cell.get("source", "generated") != source:
        return None
    if point is not None and cell.get("source", "generated") == "generated" and cell.get("point", "decoded") != point:
        return None
    if model_sha256 is not None and cell.get("model_sha256") != model_sha256:
        return None
    return cell


def set_aside(path: Path) -> Path:
    """Move a file out of the way under a new name in its folder (never deleted); return the new path."""
    aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, aside)
    return aside


def cell_rows(cell: Mapping, metrics: Mapping[str, bool]) -> list[dict]:
    """Metric rows of one cell (contract 4): the task's metrics that are finite, then ``images_per_s``; each
    row carries the cell's ``source`` (``generated`` or ``released``, see :data:`SOURCES`)."""
    rows = []
    src = cell.get("source", "generated")
    for m, v in cell["metrics"].items():
        if m in metrics and isinstance(v, (int, float)) and math.isfinite(float(v)):
            rows.append({"eval": EVAL_NAME, "corruption": cell["corruption"], "severity": cell["severity"],
                         "metric": m, "select": "final", "value": float(v), "higher_is_better": bool(metrics[m]),
                         "source": src})
    if cell.get("images_per_s"):
        rows.append({"eval": EVAL_NAME, "corruption": cell["corruption"], "severity": cell["severity"],
                     "metric": "images_per_s", "select": "final", "value": float(cell["images_per_s"]),
                     "higher_is_better": True, "source": src})
    return rows


def record_source(record: Mapping) -> tuple[str, str | None]:
    """``(source, root)`` of an eval record of corruptions: ``("released", its root folder)`` or
    ``("generated", None)``. Read from its metric rows' ``source``, else from its ``eval`` chunk's ``root``
    (records written before rows carried a source: a chunk without ``root`` was generated)."""
    chunk = record.get("eval") if isinstance(record.get("eval"), Mapping) else {}
    root = chunk.get("root")
    srcs = {m.get("source") for m in record.get("metrics") or [] if isinstance(m, Mapping)
            and m.get("eval") == EVAL_NAME and m.get("source")}
    src = "released" if "released" in srcs or (not srcs and root) else "generated"
    return src, (str(root) if src == "released" and root else None)


def evaluate_corruptions(net, task, val_dataset, device, *, corruptions, severities, cell_dir, batch_size: int,
                         num_workers: int = 0, log: Callable[[str], None] | None = None,
                         released: str | Path | None = None, model_sha256: str | None = None,
                         warnings: list[str] | None = None) -> list[dict]:
    """Evaluate ``net`` on ``val_dataset`` under every (corruption, severity); one JSON cell per pair in
    ``cell_dir`` (``<corruption>_s<severity>.json``, written atomically). A valid cell already there is reused
    (resume); corrupting happens in the DataLoader workers when ``num_workers > 0``. Returns the metric rows of
    every cell (contract 4), ``images_per_s`` (images through corruption + model per second) included.

    ``released``: a CIFAR-100-C folder (``<corruption>.npy`` + ``labels.npy``, see
    :func:`kdbench.data.cifar.cifar100c_dataset`): its pre-corrupted images replace on-the-fly corruption,
    normalised as ``val_dataset``. Cells and rows record the source: ``"generated"`` (ImageNet-C strengths, see
    the module docstring; a folder written by :func:`kdbench.data.cifar.write_cifar100_c` included) or
    ``"released"``; a cell of the other source is never reused.

    ``model_sha256``: the sha256 of the evaluated model file, kept in every cell; a cell of another file (or of
    none) is redone, never reused. A cell file that cannot be read as a finished cell is set aside (renamed, see
    :func:`set_aside`) and redone, with a warning logged and appended to ``warnings``."""
    from kdbench.results import write_json_atomic

    names = resolve_corruptions(corruptions)
    sevs = check_severities(severities)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    cell_dir = Path(cell_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)
    if released is None:
        with_image_fn(val_dataset, None)  # refuses datasets without the hook before any work
        n = len(val_dataset)
    else:
        from kdbench.data.cifar import cifar100c_dataset, cifar100c_generated, cifar100c_slice

        n = len(cifar100c_slice(released, names[0], sevs[0])[1])
    metrics = dict(task.metrics)
    source = "generated" if released is None or cifar100c_generated(released) else "released"
    point = corruption_point(val_dataset) if released is None else None
    rows: list[dict] = []
    todo = [(c, s) for c in names for s in sevs]
    done, checked = 0, False
    for i, (c, s) in enumerate(todo, 1):
        path = cell_path(cell_dir, c, s)
        try:
            cell = read_cell(path, c, s, n, source, point, model_sha256, task.primary_metric)
        except UnreadableCell as e:
            msg = f"warning: {path}: unreadable corruption cell ({e}); set aside as {set_aside(path).name}, redone"
            log(msg)
            if warnings is not None:
                warnings.append(msg)
            cell = None
        if cell is not None:
            done += 1
            rows += cell_rows(cell, metrics)
            continue
        ds = (with_image_fn(val_dataset, Corruptor(c, s)) if released is None
              else cifar100c_dataset(released, c, s, like=val_dataset))
        if released is None:  # compile/load what the corruption needs once here (glass blur's numba kernel takes
            warm_up(c, s)     # ~10 s to compile), so that forked workers inherit it and images/s is fair
        if num_workers > 0 and not checked:  # a bad image (too small, wrong dtype) fails here in one line,
            ds[0]                              # not inside a worker's traceback
            checked = True
        loader = task.loader(ds, batch_size, num_workers=num_workers)
        t0 = time.perf_counter()
        values = task.evaluate(net, loader, device)
        dt = time.perf_counter() - t0
        cell = {"version": CELL_VERSION, "corruption": c, "severity": s, "family": family_of(c), "n_images": n,
                "source": source, **({"point": point} if point else {}),
                **({"model_sha256": model_sha256} if model_sha256 else {}),
                "seconds": round(dt, 3), "images_per_s": round(n / max(dt, 1e-9), 2),
                "metrics": {k: float(v) for k, v in values.items()
                            if isinstance(v, (int, float)) and math.isfinite(float(v))}}
        if task.primary_metric not in cell["metrics"]:
            raise RuntimeError(f"{c} s{s}: the evaluation gave no finite {task.primary_metric} ({values!r}); "
                               "no cell written")
        write_json_atomic(path, cell)
        rows += cell_rows(cell, metrics)
        prim = task.primary_metric
        log(f"[{i}/{len(todo)}] {c} s{s}: {prim} {cell['metrics'].get(prim, float('nan')):.2f} "
            f"({n} images, {dt:.1f} s, {cell['images_per_s']:.1f} images/s)")
    if done:
        log(f"{done} of {len(todo)} cell(s) already in {cell_dir}: reused")
    return rows


# ------------------------------------------------------------------------------------------- metrics
Grid = Mapping[tuple[str, int], float]  # (corruption, severity) -> metric value


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def mpc(grid: Grid, corruptions: Sequence[str] = BENCHMARK) -> float:
    """Mean of the metric over the cells of ``corruptions`` present in ``grid`` (all severities)."""
    return _mean([v for (c, _), v in grid.items() if c in corruptions])


def performance_summary(clean: float, grid: Grid) -> dict[str, float]:
    """P, mPC, rPC (= mPC / P) over the benchmark set, per-family means, and the extra set's mean (apart)."""
    m = mpc(grid, BENCHMARK)
    out = {"P": float(clean), "mPC": m, "rPC": m / clean if clean else math.nan}
    for fam, names in FAMILIES.items():
        out[fam] = mpc(grid, names)
    return out


def corruption_errors(clean_err: float, err: Grid, ref_clean_err: float, ref_err: Grid,
                      corruptions: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
    """CE_c and relative CE_c (in %) for each corruption of ``corruptions`` present in both grids, summed over
    the severities both grids have."""
    ce, rel = {}, {}
    for c in corruptions:
        sev = sorted({s for (c2, s) in err if c2 == c} & {s for (c2, s) in ref_err if c2 == c})
        if not sev:
            continue
        num = sum(err[(c, s)] for s in sev)
        den = sum(ref_err[(c, s)] for s in sev)
        ce[c] = 100.0 * num / den if den else math.nan
        rnum = sum(err[(c, s)] - clean_err for s in sev)
        rden = sum(ref_err[(c, s)] - ref_clean_err for s in sev)
        rel[c] = 100.0 * rnum / rden if rden else math.nan
    return ce, rel


def error_summary(clean_top1: float, top1: Grid, ref_clean_top1: float, ref_top1: Grid) -> dict[str, float]:
    """Classification summary from top-1 accuracies (%): clean error E, mCE and relative mCE over the benchmark
    corruptions, mean CE per family (``extra`` apart), the reference's errors taken from ``ref_*``."""
    err = {k: 100.0 - v for k, v in top1.items()}
    ref_err = {k: 100.0 - v for k, v in ref_top1.items()}
    e, re = 100.0 - clean_top1, 100.0 - ref_clean_top1
    ce, rel = corruption_errors(e, err, re, ref_err, ALL)
    out = {"E": e, "mCE": _mean([ce[c] for c in BENCHMARK if c in ce]),
           "rel_mCE": _mean([rel[c] for c in BENCHMARK if c in rel])}
    for fam, names in FAMILIES.items():
        out[fam] = _mean([ce[c] for c in names if c in ce])
    return out


__all__ = ["BENCHMARK", "EXTRA", "ALL", "FAMILIES", "SETS", "SEVERITIES", "resolve_corruptions", "check_severities",
           "family_of", "seed_for", "corrupt", "Corruptor", "with_image_fn", "throughput", "evaluate_corruptions",
           "read_cell", "UnreadableCell", "set_aside", "cell_path", "corruption_point", "cell_rows", "record_source", "SOURCES", "mpc", "performance_summary",
           "corruption_errors", "error_summary"]
