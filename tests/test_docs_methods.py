"""docs/methods.md, the project's method documentation: every citation of it in the project points at a section
(or a register row) that exists, and every built-in method has a section that names each of its parameters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "methods.md"

# The section of each built-in method (``baseline`` is described in §0).
SECTIONS = {"kd": "1", "cwd": "2", "pkd": "3", "reviewkd": "4", "catkd": "5", "freekd": "7", "afp": "9", "uhkd": "10",
            "dkd": "12", "dist": "13", "fitnet": "14", "ofa": "15"}

_REF = r"§\d+(?:\.\d+)?(?:\s*#\d+)?"
_CITATION = re.compile(rf"docs/methods\.md\s+({_REF}(?:\s*,\s*{_REF})*)")
_ONE = re.compile(r"§(\d+)(?:\.(\d+))?(?:\s*#(\d+))?")


def _doc_index(text: str) -> tuple[set[str], set[str], set[int]]:
    """Section numbers (``"7"``), subsection numbers (``"7.3"``) and the row numbers of the §11 register."""
    sections = set(re.findall(r"^## (\d+)\. ", text, flags=re.M))
    subsections = {f"{a}.{b}" for a, b in re.findall(r"^### (\d+)\.(\d+) ", text, flags=re.M)}
    register = text.split("\n## 11. ", 1)[1] if "\n## 11. " in text else ""
    rows = {int(r) for r in re.findall(r"^\| (\d+) \|", register, flags=re.M)}
    return sections, subsections, rows


def _section(text: str, number: str) -> str:
    """The text of ``## <number>.`` up to the next ``## `` heading."""
    m = re.search(rf"^## {re.escape(number)}\. .*?(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, f"docs/methods.md has no section {number}"
    return m.group(0)


def _project_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for folder, pattern in (("suites", "*"), ("tests", "*.py"), ("kdbench", "**/*.py"), ("methods", "*.py")):
        files += [p for p in sorted((ROOT / folder).glob(pattern)) if p.is_file()]
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def citations_in(text: str) -> list[tuple[str, str | None, int | None]]:
    """Every ``(section, subsection, register row)`` cited as ``docs/methods.md §N[.M][ #R][, §...]``."""
    out = []
    for m in _CITATION.finditer(text):
        for sec, sub, row in _ONE.findall(m.group(1)):
            out.append((sec, f"{sec}.{sub}" if sub else None, int(row) if row else None))
    return out


def test_citation_parser_reads_lists_subsections_and_register_rows():
    text = "see docs/methods.md §7.3, §7.4 and (docs/methods.md §2, §11 #11); docs/methods.md §N is a template"
    assert citations_in(text) == [("7", "7.3", None), ("7", "7.4", None), ("2", None, None), ("11", None, 11)]


def test_doc_has_every_section_of_the_numbering():
    sections, _, rows = _doc_index(DOC.read_text(encoding="utf-8"))
    assert sections == {str(n) for n in range(16)}, sorted(sections, key=int)
    assert set(range(1, 19)) <= rows  # the register keeps the reference numbering of rows 1-18


def test_every_citation_of_docs_methods_resolves():
    sections, subsections, rows = _doc_index(DOC.read_text(encoding="utf-8"))
    bad, found = [], 0
    for path in _project_files():
        for sec, sub, row in citations_in(path.read_text(encoding="utf-8", errors="replace")):
            found += 1
            where = path.relative_to(ROOT)
            if sec not in sections:
                bad.append(f"{where}: §{sec}")
            elif sub is not None and sub not in subsections:
                bad.append(f"{where}: §{sub}")
            elif row is not None and (sec != "11" or row not in rows):
                bad.append(f"{where}: §{sec} #{row}")
    assert found >= 10, f"only {found} citations found: the scanner is broken or the citations are gone"
    assert not bad, "citations of sections docs/methods.md does not have: " + "; ".join(bad)


def _builtin_methods() -> dict[str, type]:
    from kdbench.registry import METHODS

    out = {}
    for name in METHODS.names():
        cls = METHODS.get(name)
        if cls.__module__.startswith("kdbench.methods."):
            out[name] = cls
    return out


def test_every_builtin_method_has_a_section():
    names = set(_builtin_methods()) - {"baseline"}
    assert names == set(SECTIONS), (
        f"built-in methods without a docs/methods.md section: {sorted(names - set(SECTIONS))}; "
        f"sections for methods that no longer exist: {sorted(set(SECTIONS) - names)}"
    )


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_method_section_names_the_method_and_every_parameter(name):
    text = _section(DOC.read_text(encoding="utf-8"), SECTIONS[name])
    heading = text.splitlines()[0]
    assert f"`{name}`" in heading, f"§{SECTIONS[name]} heading does not name `{name}`: {heading!r}"
    cls = _builtin_methods()[name]
    missing = [p for p in cls.param_defaults() if f"`{p}`" not in text]
    assert not missing, f"docs/methods.md §{SECTIONS[name]} does not document {name}'s parameter(s) {missing}"
