"""Model sources, registered in MODELS by prefix: ``kdbench:``, ``timm:``, ``torchvision:``.

A source validates a name without building it (``check``, with close-match suggestions) and builds a TapModel
for a number of classes and input channels. Checkpoints are loaded by ``load_weights``; ``torch_file_problem``
says, without torch, why a file is not one ``torch.load`` can read (``kdbench validate`` uses it).

Importing this module is torch-free: names and taps come from ``kdbench.models.catalog``; torch, timm and
torchvision are imported when a model is built, or to check a name only their library knows.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdbench.models import catalog
from kdbench.models.catalog import Source
from kdbench.models.catalog import unknown_model as _unknown
from kdbench.registry import MODELS

if TYPE_CHECKING:
    from kdbench.models.tap import TapModel


@MODELS.register("kdbench")
class KdbenchSource(Source):
    prefix = "kdbench"

    def semantic_taps(self, name):
        return catalog.KDBENCH_TAPS

    def names(self):
        return sorted(catalog.KDBENCH_NAMES)

    def build(self, name, num_classes, in_chans, **kwargs):
        from kdbench.models.cifar import CIFAR_MODELS
        from kdbench.models.tap import KdbenchCifar

        self.check(name)
        return KdbenchCifar(CIFAR_MODELS[name](num_classes=num_classes, in_chans=in_chans, **kwargs), f"kdbench:{name}")


@MODELS.register("timm")
class TimmSource(Source):
    prefix = "timm"

    def names(self):
        import timm

        return timm.list_models()

    def check(self, name):
        import timm

        if not timm.is_model(name):
            raise _unknown(self.prefix, name, timm.list_models())

    def semantic_taps(self, name):
        return catalog.CLASSIFIER_TAPS

    def build(self, name, num_classes, in_chans, **kwargs):
        import timm

        from kdbench.models.tap import TimmModel

        self.check(name)
        net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
        return TimmModel(net, f"timm:{name}")


@MODELS.register("torchvision")
class TorchvisionSource(Source):
    prefix = "torchvision"

    def names(self):
        from torchvision import models

        from kdbench.models.detection import DETECTOR_NAMES  # "detection": Faster R-CNN/RetinaNet/FCOS on FPN
        from kdbench.models.segmentation import torchvision_segmentation_names  # "segmentation": DeepLabV3/FCN/LR-ASPP

        return sorted(models.list_models(module=models)) + list(DETECTOR_NAMES) + torchvision_segmentation_names()

    def check(self, name):
        if not catalog.check_listed(self.prefix, name):  # detectors, segmenters: listed; classifiers: ask torchvision
            super().check(name)

    def semantic_taps(self, name):
        return catalog.source_taps(self.prefix, name)

    def build(self, name, num_classes, in_chans, **kwargs):
        import torch
        from torchvision import models

        from kdbench.models.tap import TorchvisionModel

        from kdbench.models.detection import DETECTOR_NAMES, build_detector

        self.check(name)
        if name in DETECTOR_NAMES:  # "detection": num_classes includes the background
            return build_detector(name, num_classes, in_chans, **kwargs)
        from kdbench.models.segmentation import build_torchvision_segmenter, torchvision_segmentation_names

        if name in torchvision_segmentation_names():  # "segmentation": kdbench/models/segmentation.py
            return build_torchvision_segmenter(name, num_classes, in_chans, **kwargs)
        net = models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        if in_chans != 3:
            conv = getattr(net, "conv1", None)
            if not isinstance(conv, torch.nn.Conv2d):
                raise ValueError(f"torchvision:{name}: in_chans={in_chans} is only supported for ResNet-style models")
            net.conv1 = torch.nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                        bias=conv.bias is not None)
        return TorchvisionModel(net, f"torchvision:{name}")


def check_model(spec: str) -> None:
    """Raise ValueError for an unknown model; torch-free for the names ``kdbench.models.catalog`` lists."""
    from kdbench.models import split_model_name

    source, name = split_model_name(spec)
    if source not in MODELS:
        MODELS.get(source)  # the unknown-source error
    if not catalog.check_listed(source, name):
        MODELS.get(source)().check(name)


model_taps = catalog.model_taps  # the semantic taps of ``SOURCE:NAME``, without building it


def build_model(spec: str, num_classes: int, in_chans: int, **kwargs: Any) -> TapModel:
    from kdbench.models import split_model_name

    source, name = split_model_name(spec)
    return MODELS.get(source)().build(name, num_classes, in_chans, **kwargs)


def load_tensor_file(path: Path, sha256: str | None, what: str, remedy: str, reader=None) -> tuple[object, str]:
    """``(content, sha256)`` of a torch file a user could have placed on disk: read with ``weights_only=True``
    (tensors and plain containers only: a pickled object, which could run code, is refused naming the file);
    with ``sha256`` (the hash a finished run recorded for it) a file whose hash differs is refused before it is
    read at all (``remedy`` says what to do then). Without it, the file is first checked as
    :func:`torch_file_problem` does (a folder, an empty, unreadable, truncated or damaged file, or a file of
    another kind under the name is refused in one line naming it: ``torch.load`` reads a zip archive with
    damaged tensor bytes without complaint). ``reader(path)`` replaces ``torch.load`` for a model that reads its
    own checkpoint layout (it must load with ``weights_only=True`` too: mmdet's runner checkpoints)."""
    from kdbench.results import file_sha256

    problem = torch_file_problem(path, crc=sha256 is None)
    if problem is not None and (sha256 is None or _unreadable(path)):
        raise ValueError(f"cannot read {what} {path}: {problem}; expected {TORCH_FILE}")
    got = file_sha256(path)
    if sha256 is not None and got != sha256:
        now = f"; {problem}" if problem is not None else ""
        raise ValueError(f"{path}: the file changed after its run recorded it (sha256 {sha256[:12]}... recorded, "
                         f"{got[:12]}... now{now}): {remedy}")
    import torch

    try:
        if reader is not None:
            return reader(path), got
        with _safe_checkpoint_globals():
            return torch.load(path, map_location="cpu", weights_only=True), got
    except Exception as e:
        raise ValueError(f"cannot read {what} {path}: {_load_error(e)}") from None


#: what a torch file is, for the errors: what ``torch.save`` writes
TORCH_FILE = "a file written by torch.save (a zip archive holding <name>/data.pkl and the tensors)"
#: how a legacy torch file (not a zip archive: torch < 1.6, or ``_use_new_zipfile_serialization=False``)
#: starts: torch's magic number, pickled with protocol 2
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def torch_file_problem(path: str | Path, crc: bool = True) -> str | None:
    """Why ``torch.load`` cannot read ``path`` as a file ``torch.save`` wrote, without torch, else None: the path
    is missing, a folder or unreadable; the file is empty; a zip archive that is truncated or damaged, or that
    is not a torch archive (one folder holding ``data.pkl``); a plain pickle (no torch magic number); a file of
    another kind (text, JSON, NumPy, HDF5, safetensors). With ``crc`` every member of a zip archive is checked
    against its CRC-32 (reads the whole file; an archive saved without CRCs, all zero, is not checked). A legacy
    (non-zip) torch file is only recognised by its start: ``torch.load`` finds a truncated one. The answer is a
    phrase (``it is empty (0 bytes)``) to follow the file's name."""
    path = Path(path)
    if not path.exists():
        return "it does not exist"
    if path.is_dir():
        return "it is a folder, not a file"
    if not path.is_file():
        return "it is not a regular file"
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return f"it cannot be read ({e.strerror or type(e).__name__})"
    if not head:
        return "it is empty (0 bytes)"
    if head.startswith(b"PK"):
        return _zip_problem(path, crc)
    if head.startswith(LEGACY_TORCH_MAGIC):
        return None
    if head[:1] == b"\x80":  # pickle protocol >= 2
        return _pickle_problem(path)
    return f"it is {_file_kind(head)}"


def _unreadable(path: Path) -> bool:
    """The path is not a file that can be opened (nothing of it can be read, not even to hash it)."""
    try:
        with open(path, "rb"):
            return not Path(path).is_file()
    except OSError:
        return True


def _zip_problem(path: Path, crc: bool) -> str | None:
    import zipfile

    errors = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError)
    try:
        z = zipfile.ZipFile(path)
    except errors:  # the zip directory is the archive's end: what a cut-off copy or download loses
        return "it is a truncated or damaged zip archive (its zip directory, at the end, is missing or unreadable)"
    with z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        if not any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names) or any("/" not in n for n in names):
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") if names else "nothing"
            return f"it is a zip archive but not a torch file (no <name>/data.pkl; it holds {shown})"
        if not crc or not any(i.CRC for i in infos if i.file_size):  # saved without CRCs: nothing to check
            return None
        try:
            bad = z.testzip()
        except errors as e:
            return f"it is a damaged zip archive ({type(e).__name__}: {_first_line(e)})"
    return f"it is damaged: {bad} in the archive fails its CRC-32 check" if bad else None


def _pickle_problem(path: Path) -> str:
    """A pickle without torch's magic number: what ``torch.load`` would refuse it for, from its opcodes (read,
    never executed): the classes it would import, if any."""
    import pickletools

    found: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for n, (op, arg, _) in enumerate(pickletools.genops(f)):
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    found.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
                if len(found) >= 3 or n > 100_000:
                    break
    except Exception:  # a truncated or damaged pickle: what was read so far
        pass
    if found:
        return (f"it is a pickle that torch.save did not write, and it holds objects other than tensors and plain "
                f"containers ({', '.join(dict.fromkeys(found))}), which kdbench does not unpickle (they could run "
                "code)")
    return "it is a pickle that torch.save did not write (no torch magic number at its start)"


def _file_kind(head: bytes) -> str:
    """What a file that is neither a zip archive nor a pickle is, from its first bytes."""
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy file"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file"
    if len(head) > 9 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < 100_000_000:
        return "a safetensors file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # cut inside a character at the end of the head: still text
        text = head[:e.start].decode("utf-8") if e.start >= len(head) - 3 else None
    if text is not None and "\x00" not in text and all(c.isprintable() or c in "\t\n\r" for c in text):
        kind = "a JSON/text file" if text.lstrip()[:1] in ("{", "[") else "a text file"
        return f"{kind} (it starts with {text[:40]!r})"
    return f"not a torch file (it starts with the bytes {head[:8].hex(' ')})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def _safe_checkpoint_globals():
    """The plain objects that training scripts store beside the weights and ``weights_only`` may rebuild:
    ``argparse.Namespace`` (timm's ``CheckpointSaver`` saves its ``args``; timm's own loader allows it too)."""
    import argparse
    import contextlib

    import torch

    safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    if safe is not None:
        return safe([argparse.Namespace])
    add = getattr(torch.serialization, "add_safe_globals", None)  # torch 2.4: process-wide
    if add is not None:
        add([argparse.Namespace])
    return contextlib.nullcontext()  # torch < 2.4: such files are refused, naming the file


#: wrappers around a state dict, tried in this order: timm's EMA weights first, as timm's own loader does
STATE_DICT_KEYS = ("state_dict_ema", "model", "state_dict")
#: key prefixes that wrappers add to every key: DistributedDataParallel / DataParallel, ``torch.compile``
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(state, own_keys=()):
    """The state dict inside a checkpoint: the first of :data:`STATE_DICT_KEYS` that holds a non-empty dict
    (repeatedly: ``{"model": {"state_dict": ...}}``), then without the :data:`WRAPPER_PREFIXES` prefixes that
    *every* key has (repeatedly: ``_orig_mod.module.``), unless the model's own keys (``own_keys``) have it too.
    The state dict's ``_metadata`` (module versions) is kept, re-keyed."""
    while isinstance(state, dict):
        inner = next((state[k] for k in STATE_DICT_KEYS if isinstance(state.get(k), dict) and state[k]), None)
        if inner is None:
            break
        state = inner
    own_keys = list(own_keys)
    stripped = True
    while stripped and isinstance(state, dict) and state:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in state) and not (
                    own_keys and all(k.startswith(prefix) for k in own_keys)):
                meta = getattr(state, "_metadata", None)
                state = OrderedDict((k[len(prefix):], v) for k, v in state.items())
                if meta is not None:
                    state._metadata = OrderedDict((k[len(prefix):] if k.startswith(prefix) else k, v)
                                                  for k, v in meta.items())
                stripped = True
    return state


def load_weights(model: "TapModel", path: str | Path, sha256: str | None = None) -> str:
    """Load a checkpoint into ``model.net`` (a plain state dict, or one wrapped as :func:`unwrap_state_dict`
    reads: ``model``/``state_dict`` (mdistiller, torchvision), ``state_dict_ema`` preferred when present (timm's
    trainer, as timm loads it), DDP's ``module.`` or ``torch.compile``'s ``_orig_mod.`` prefixes removed);
    returns its sha256. Missing or unexpected keys, a value that is not a tensor, a tensor of another shape, or
    of another kind of dtype (integers or bools where the model has floating-point numbers, or the reverse; a
    float16 checkpoint of a float32 model loads) are an error naming the file.

    Only tensors and plain containers are read (``weights_only=True``): a file holding anything else (a
    pickled object, which could run code) is refused, naming the file. With ``sha256`` (the hash a finished run
    recorded for it), a file whose hash differs is refused before it is read at all.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher weights not found: {path}; the suites in suites/ read checkpoints under "
                                "${KDBENCH_CKPT:-download_ckpts}: point KDBENCH_CKPT at the folder that holds them "
                                "(export KDBENCH_CKPT=/path/to/checkpoints)")
    state, got = load_tensor_file(path, sha256, "checkpoint",
                                  f"put the original back, or delete {path.parent} to retrain it",
                                  reader=getattr(model, "read_checkpoint", None))  # a model's own layout (mmdet:)
    own = model.net.state_dict()
    state = unwrap_state_dict(state, own)
    if not isinstance(state, dict):
        raise ValueError(f"cannot read checkpoint {path}: it holds a {type(state).__name__}, not a state dict")
    check_tensors(state, own, path, f"checkpoint does not fit {model.name}")
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and hasattr(v, "shape") and hasattr(own[k], "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError(f"{path}: checkpoint does not fit {model.name}: {len(wrong)} tensor(s) of another shape, "
                         f"e.g. {', '.join(wrong[:3])} (another architecture or number of classes?)")
    try:
        missing, unexpected = model.net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a model's own rule (its _load_from_state_dict): one line naming the file
        raise ValueError(f"{path}: checkpoint does not fit {model.name}: {' '.join(str(e).split())[:300]}") from None
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit {model.name}: {len(missing)} of the model's key(s) "
                         f"missing {list(missing)[:5]}, {len(unexpected)} unexpected {list(unexpected)[:5]}")
    return got


def _dtype_kind(t) -> str:
    if t.is_complex():
        return "complex"
    return "floating-point" if t.is_floating_point() else "integer/bool"


def check_tensors(state: dict, own: dict, path, what: str) -> None:
    """Raise a ValueError naming ``path`` (``{path}: {what}: ...``) when an entry of ``state`` that ``own``
    (the model's state dict) has too is not a tensor, or a tensor of another kind of dtype (see
    :func:`load_weights`): ``load_state_dict`` would fail on the first with a multi-line error, and silently
    cast the second (integers read as weights)."""
    import torch

    not_tensor = [f"{k} ({type(v).__name__})" for k, v in state.items()
                  if k in own and isinstance(own[k], torch.Tensor) and not isinstance(v, torch.Tensor)]
    if not_tensor:
        raise ValueError(f"{path}: {what}: {len(not_tensor)} value(s) that are not tensors, e.g. "
                         f"{', '.join(not_tensor[:3])}; expected a state dict of tensors")
    wrong = [f"{k} {str(v.dtype).replace('torch.', '')} (model: {str(own[k].dtype).replace('torch.', '')})"
             for k, v in state.items()
             if k in own and isinstance(own[k], torch.Tensor) and _dtype_kind(v) != _dtype_kind(own[k])]
    if wrong:
        raise ValueError(f"{path}: {what}: {len(wrong)} tensor(s) of another kind of dtype, e.g. "
                         f"{', '.join(wrong[:3])}")


def check_tensor_dict(state, path, what: str, shapes: dict | None = None) -> dict:
    """``state`` (what ``path`` held) as a dict of named tensors (a stage file), else a ValueError naming the file:
    a dict whose values are all tensors; with ``shapes`` (``{name: shape}``, what the run that wrote the file
    recorded) exactly those names, each of that shape."""
    import torch

    if not isinstance(state, dict):
        raise ValueError(f"{path}: a {what} holds a dict of tensors, not a {type(state).__name__}")
    not_tensor = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensor:
        raise ValueError(f"{path}: {what}: {len(not_tensor)} value(s) that are not tensors, e.g. "
                         f"{', '.join(not_tensor[:3])}; expected a dict of tensors")
    if shapes is None:
        return state
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    if missing or unexpected:
        raise ValueError(f"{path}: {what} does not hold the tensors its run recorded: {len(missing)} missing "
                         f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    wrong = [f"{k} {tuple(v.shape)} (recorded: {tuple(shapes[k])})" for k, v in state.items()
             if tuple(v.shape) != tuple(shapes[k])]
    if wrong:
        raise ValueError(f"{path}: {what} does not hold the tensors its run recorded: {len(wrong)} of another "
                         f"shape, e.g. {', '.join(wrong[:3])}")
    return state


def _load_error(e: BaseException) -> str:
    """One line for a failed ``torch.load(weights_only=True)``: refused content, or a damaged file."""
    import pickle

    text = str(e)
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
        return ("it holds objects other than tensors and plain containers, which kdbench does not unpickle "
                "(they could run code); save a state dict")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"not a readable torch file ({type(e).__name__}: {first[:200]})"
