"""Aligned plain-text tables for per-session results and summaries (no third-party table library)."""

from __future__ import annotations

import math


def _cell(value: object, float_format: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else float_format.format(value)
    return str(value)


def _numeric(text: str) -> bool:
    try:
        float(text.rstrip("%"))
    except ValueError:
        return text == "-"
    return True


def format_table(rows: list[dict], columns: list[str], *, float_format: str = "{:.3f}") -> str:
    """A header, a rule and one line per row; numeric columns right-aligned, text columns left-aligned.

    Missing keys, None and NaN print as "-" so gaps stay visible instead of shifting columns.
    """
    cells = [[_cell(row.get(col), float_format) for col in columns] for row in rows]
    widths = [max([len(col), *(len(r[k]) for r in cells)]) for k, col in enumerate(columns)]
    right = [bool(cells) and all(_numeric(r[k]) for r in cells) for k in range(len(columns))]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)]
        return "  ".join(parts).rstrip()

    out = [line(list(columns)), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)
