"""Figures of the comparison table (`run_table`'s result): one panel per column with a bar per
method and concept, and the erasure-preservation trade-off. Error bars are seed standard errors."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .table import TITLES

RATE_COLUMNS: tuple[str, ...] = ("target_rate", "paraphrase_rate", "zero_shot_rate", "search_asr", "inversion_asr",
                                 "preservation")  # fmt: skip


def _concepts(summary: Sequence[dict]) -> list[str]:
    if not summary:
        raise ValueError("the table has no rows to plot")
    return list(dict.fromkeys(r["concept"] for r in summary))


def table_bars(result: dict, columns: Sequence[str] = RATE_COLUMNS, *, title: str = "") -> go.Figure:
    """One panel per column: a bar per method, one bar series per concept; undefined values
    (None) are left out. Lower is better in every panel but non-target kept."""
    summary = result["summary"]
    if bad := [c for c in columns if c not in TITLES]:
        raise ValueError(f"unknown column(s) {bad}; choose from {list(TITLES)}")
    concepts = _concepts(summary)
    fig = make_subplots(rows=1, cols=len(columns), subplot_titles=[TITLES[c] for c in columns], shared_yaxes=True)
    for i, column in enumerate(columns, start=1):
        for j, concept in enumerate(concepts):
            rows = [r for r in summary if r["concept"] == concept and r[column] is not None]
            fig.add_trace(go.Bar(x=[r["method"] for r in rows], y=[r[column] for r in rows], name=concept,
                                 legendgroup=concept, showlegend=i == 1, marker_color=_COLORS[j % len(_COLORS)],
                                 error_y={"type": "data", "array": [r[f"{column}_sem"] or 0.0 for r in rows]}),
                          row=1, col=i)  # fmt: skip
    fig.update_yaxes(range=[0, 1.05])
    fig.update_layout(title=title, barmode="group", height=420, width=max(900, 260 * len(columns)))
    return fig


def tradeoff(result: dict, *, x: str = "target_rate", y: str = "preservation", title: str = "") -> go.Figure:
    """Each (concept, method) as a point: the concept rate it leaves (x, lower is better) against
    the non-target accuracy it keeps (y, higher is better); the best corner is top left."""
    summary = result["summary"]
    fig = go.Figure()
    for j, concept in enumerate(_concepts(summary)):
        rows = [r for r in summary if r["concept"] == concept and r[x] is not None and r[y] is not None]
        fig.add_trace(go.Scatter(
            x=[r[x] for r in rows], y=[r[y] for r in rows], mode="markers+text", name=concept,
            text=[r["method"] for r in rows], textposition="top center", marker={"size": 10, "color": _COLORS[j % len(_COLORS)]},
            error_x={"type": "data", "array": [r[f"{x}_sem"] or 0.0 for r in rows]},
            error_y={"type": "data", "array": [r[f"{y}_sem"] or 0.0 for r in rows]}))  # fmt: skip
    fig.update_layout(title=title, xaxis_title=TITLES[x], yaxis_title=TITLES[y], height=480, width=720)
    return fig


_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")

__all__ = ["RATE_COLUMNS", "table_bars", "tradeoff"]
