"""Models by source prefix (``kdbench:resnet8x4``, ``timm:resnet18``, ``torchvision:resnet50``), wrapped so that
one forward returns logits plus the feature taps a method asked for (see ``kdbench.method`` for tap names)."""

from __future__ import annotations


def split_model_name(spec: str) -> tuple[str, str]:
    """``"timm:resnet18"`` -> ``("timm", "resnet18")``. A name without a prefix is an error naming the sources."""
    if not isinstance(spec, str) or ":" not in spec:
        from kdbench.registry import MODELS

        raise ValueError(f"model {spec!r} must be 'SOURCE:NAME' with SOURCE one of {', '.join(MODELS.names())}")
    source, name = spec.split(":", 1)
    return source, name
