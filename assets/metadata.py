"""Helpers that turn tables and figures into Dagster metadata a person can read in the UI."""

from __future__ import annotations

import base64

import polars as pl


def markdown_table(df: pl.DataFrame, float_digits: int = 3) -> str:
    """Render a small frame as a Markdown table, floats rounded to ``float_digits``."""
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.{float_digits}f}"
        return "" if value is None else str(value)

    header = "| " + " | ".join(df.columns) + " |\n| " + " | ".join("---" for _ in df.columns) + " |\n"
    rows = "".join("| " + " | ".join(cell(value) for value in row) + " |\n" for row in df.iter_rows())
    return header + rows


def markdown_image(png: bytes, alt: str) -> str:
    """Embed PNG bytes in Markdown as a data URI, which the Dagster UI renders inline."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"
