"""The protocol card of a table: how its numbers were produced, read from the records the table shows (never from
the suite file as it is now): epochs, the epoch selected, seeds, global batch size and world size, AMP, devices,
the teacher's measured value beside its published one, the reference sources, the kdbench version and the git
commit of the code that wrote the records (a table of several commits, or of uncommitted code, says so), and the
method versions. ``kdbench table`` puts it under a markdown table, in a LaTeX table's caption comment, and
beside a CSV written with ``--out`` as ``<name>.protocol.json``."""

from __future__ import annotations

from typing import Any

from kdbench.tables.records import TEACHER


def _distinct(values) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return sorted(out, key=lambda v: (str(type(v)), v)) if all(v is not None for v in out) else out


def protocol(records: list[dict], *, metric: str, eval: str, select: str,
             teachers: dict[str, dict] | None = None) -> dict[str, Any]:
    """The card of the ok teacher/distill ``records`` a table shows. ``teachers``: pair -> {"measured": value,
    "claimed": published value or None, "source": its source} (the table's teacher row)."""
    recs = [r for r in records if r.get("kind") in (TEACHER, "distill") and r.get("status") == "ok"]
    distill = [r for r in recs if r["kind"] == "distill"]
    env = [r.get("env") or {} for r in recs]
    commits = _distinct(str(e.get("git_sha") or "unknown") for e in env)
    dirty = any(bool(e.get("git_dirty")) for e in env)
    versions: dict[str, list] = {}
    for r in distill:
        versions.setdefault(r["method"], [])
        if r.get("method_version") not in versions[r["method"]]:
            versions[r["method"]].append(r.get("method_version"))
    amp = _distinct(("off (CPU)" if (r.get("env") or {}).get("device", "cpu") == "cpu"
                     else str((r.get("recipe") or {}).get("amp"))) for r in distill)
    refs = _distinct(str(x.get("source")) for r in recs for x in r.get("reference") or [] if x.get("source"))
    card = {
        "suite": recs[0]["suite"] if recs else None, "suite_version": recs[0]["suite_version"] if recs else None,
        "metric": metric, "eval": eval, "select": select,
        "epochs": _distinct((r.get("recipe") or {}).get("epochs") for r in distill),
        "teacher_epochs": _distinct((r.get("recipe") or {}).get("epochs") for r in recs if r["kind"] == TEACHER),
        "seeds": _distinct(r.get("seed") for r in distill),
        "batch_size": _distinct((r.get("recipe") or {}).get("batch_size") for r in distill),
        "world_size": _distinct(int((r.get("scheduler") or {}).get("world_size") or 1) for r in distill),
        "amp": amp,
        "devices": _distinct(str(e.get("device") or "unknown") for e in env),
        "teachers": teachers or {},
        "references": refs,
        "kdbench": _distinct(str(e.get("kdbench") or "unknown") for e in env),
        "commits": commits, "uncommitted_changes": dirty, "mixed_commits": len(commits) > 1,
        "method_versions": {m: sorted(v, key=str) for m, v in sorted(versions.items())},
    }
    return card


def _list(values: list) -> str:
    return ", ".join(str(v) for v in values) if values else "—"


def protocol_text(card: dict[str, Any]) -> str:
    """The card as one paragraph (markdown footer, LaTeX caption)."""
    parts = [f"{card['metric']} at the {card['select']} epoch (eval {card['eval']})",
             f"epochs {_list(card['epochs'])}" + (f" (teacher {_list(card['teacher_epochs'])})"
                                                 if card["teacher_epochs"] else ""),
             f"seeds {_list(card['seeds'])}",
             f"global batch {_list(card['batch_size'])} on {_list(card['world_size'])} process(es)",
             f"AMP {_list(card['amp'])}", f"device {_list(card['devices'])}"]
    for pair, t in card["teachers"].items():
        claimed = (f", published {t['claimed']:g} ({t['source']})" if t.get("claimed") is not None else "")
        parts.append(f"teacher {pair}: measured {t['measured']:.2f}{claimed}")
    if card["references"]:
        parts.append(f"references: {'; '.join(card['references'])}")
    code = f"kdbench {_list(card['kdbench'])}, commit {_list([c[:10] for c in card['commits']])}"
    if card["mixed_commits"]:
        code += " (MIXED: records of several commits)"
    if card["uncommitted_changes"]:
        code += " (with uncommitted changes)"
    parts.append(code)
    parts.append("method versions " + ", ".join(f"{m} v{'/'.join(map(str, v))}"
                                                for m, v in card["method_versions"].items()))
    return "Protocol: " + "; ".join(parts) + "."


__all__ = ["protocol", "protocol_text"]
