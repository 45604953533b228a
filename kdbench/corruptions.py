"""The corruption engine: the corruption names and sets, the severities, and :func:`corrupt`, seeded per image.

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
"""

from __future__ import annotations

import copy
import hashlib
import numbers
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

if TYPE_CHECKING:
    import numpy as np


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


def warm_up(corruption: str, severity: int) -> None:
    """Run ``corruption`` once on a blank 32×32 image (JIT compilation, file loading) in this process."""
    import numpy as np  # here, not at import: suite validation reads the names above without numpy

    corrupt(np.zeros((MIN_SIDE, MIN_SIDE, 3), dtype=np.uint8), corruption, severity, "warm-up")


__all__ = ["NOISE", "BLUR", "WEATHER", "DIGITAL", "BENCHMARK", "EXTRA", "ALL", "FAMILIES", "SETS", "SEVERITIES",
           "MIN_SIDE", "SEEDED", "resolve_corruptions", "check_severities", "family_of", "seed_for", "corrupt",
           "Corruptor", "with_image_fn", "throughput", "warm_up"]
