"""Rendering shared by the table layouts: number formatting, LaTeX escaping, footnotes, markdown pipe tables,
booktabs blocks and the CSV writer. Torch-free and pandas-free (pandas only for values it alone can type)."""

from __future__ import annotations

from typing import Any

FORMATS = ("md", "latex", "csv")

_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "→": r"$\rightarrow$",
        "±": r"$\pm$", "×": r"$\times$", "Δ": r"$\Delta$", "—": "---", "–": "--", "−": r"$-$",
        "·": r"$\cdot$", "…": r"\ldots{}", "<": r"\textless{}", ">": r"\textgreater{}"}


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")


def latex_escape(text: str) -> str:
    """Escape LaTeX specials (``_ % & $ # { } ~ ^ \\``) and map the few unicode symbols tables use."""
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def dash(fmt: str) -> str:
    """The mark of a cell without a value."""
    return "—" if fmt == "md" else "---"


def pm(fmt: str) -> str:
    """The ± between a mean and its std."""
    return " ± " if fmt == "md" else r" $\pm$ "


def bold(text: str, fmt: str) -> str:
    return f"**{text}**" if fmt == "md" else rf"\textbf{{{text}}}"


def fmt_num(x: float, decimals: int, fmt: str, signed: bool = False) -> str:
    """``x`` at ``decimals`` places (``signed``: with its sign); never "-0.00"; LaTeX minus as ``$-$``."""
    s = f"{x:+.{decimals}f}" if signed else f"{x:.{decimals}f}"
    if s.lstrip("+-").strip("0.") == "":  # "-0.00" -> "+0.00" / "0.00"
        s = ("+" if signed else "") + s.lstrip("+-")
    return "$-$" + s[1:] if fmt == "latex" and s.startswith("-") else s


def excludes_zero(ci: tuple[float, float]) -> bool:
    """A confidence interval that does not hold 0: the difference is significant at its level."""
    return ci[0] > 0 or ci[1] < 0


def delta_text(delta: float | None, ci: tuple[float, float] | None, decimals: int, fmt: str) -> str:
    """Δ with its interval and the mark of an interval that excludes 0: ``+1.23 [+0.41, +2.05]*``."""
    if delta is None:
        return ""
    text = fmt_num(delta, decimals, fmt, True)
    if ci:
        text += f" [{fmt_num(ci[0], decimals, fmt, True)}, {fmt_num(ci[1], decimals, fmt, True)}]"
        if excludes_zero(ci):
            text += "*" if fmt == "md" else r"$^{*}$"
    return text


def fmt_ref(x: float, fmt: str) -> str:
    """A published reference value as given (``%g``)."""
    s = f"{x:g}"
    return "$-$" + s[1:] if fmt == "latex" and s.startswith("-") else s


class Footnotes:
    """Numbered footnotes in reading order; identical texts share a number."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        i = self.texts.index(text) + 1
        return f"[^{i}]" if self.fmt == "md" else f"$^{{{i}}}$"


def pipe_table(body: list[list[str]], headers: list[str]) -> str:
    """A markdown pipe table of text cells: first column left-aligned, the others right-aligned."""
    from tabulate import tabulate

    return tabulate(body, headers=headers, tablefmt="pipe", disable_numparse=True,
                    colalign=("left",) + ("right",) * (len(headers) - 1))


def latex_block(caption: str, headers: list[str], body: list[list[str]], notes: list[str] = ()) -> str:
    """A booktabs tabular of LaTeX cells: the caption as a comment above, one ``l`` then ``r`` columns, the
    headers escaped, ``notes`` as small full-width rows under the bottom rule."""
    lines = [f"% {latex_escape(caption)}", r"\begin{tabular}{l" + "r" * (len(headers) - 1) + "}", r"\toprule",
             " & ".join(latex_escape(h) for h in headers) + r" \\", r"\midrule"]
    lines += [" & ".join(line) + r" \\" for line in body]
    lines.append(r"\bottomrule")
    for n in notes:
        lines.append(rf"\multicolumn{{{len(headers)}}}{{l}}{{\footnotesize {latex_escape(n)}}} \\")
    lines.append(r"\end{tabular}")
    return "\n".join(lines)


def csv_round(x: float) -> float:
    """CSV precision: 6 decimals, enough for any metric and free of float noise (74.19999999999999)."""
    return round(x, 6)


def csv_text(rows: list[dict], columns: list[str] | tuple[str, ...]) -> str:
    """``pd.DataFrame(rows, columns=columns).to_csv(index=False, lineterminator="\\n").rstrip("\\n")``, the same
    text without importing pandas (a third of a `kdbench table --format csv`); values of other types than
    str, float, bool and 64-bit int are left to pandas itself.

    A column is written as pandas types it: all numbers (bool aside) with a float or a missing value among them
    -> float64 (``repr`` of the float, missing as ""), all ints -> int64, anything else -> object (``str``,
    missing as ""); the csv module quotes as pandas' writer does (it is the same module, same dialect).
    """
    import csv
    import io

    def missing(v: Any) -> bool:
        return v is None or (type(v) is float and v != v)

    cols = []
    for c in columns:
        vals = [r.get(c) for r in rows]
        present = [v for v in vals if not missing(v)]
        if any(type(v) not in (str, float, bool, int) or (type(v) is int and not -2**63 <= v < 2**63)
               for v in present):  # numpy scalars, huge ints, containers: pandas' own inference decides
            import pandas as pd

            return pd.DataFrame(rows, columns=list(columns)).to_csv(index=False, lineterminator="\n").rstrip("\n")
        if present and all(type(v) in (int, float) for v in present) and \
                (len(present) < len(vals) or any(type(v) is float for v in present)):
            cols.append(["" if missing(v) else repr(float(v)) for v in vals])
        else:
            cols.append(["" if missing(v) else str(v) for v in vals])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(zip(*cols))
    return buf.getvalue().rstrip("\n")
