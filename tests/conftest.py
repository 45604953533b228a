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
