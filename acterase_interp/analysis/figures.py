"""Plotly figures drawn straight from analysis records: heatmaps (difference, causal and IoU
maps, a causal sweep's panels), curves and bars with error bars, the tau Pareto plot, and a spatial map over an image."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots
import torch
import torch.nn.functional as F

from .records import Record, column
from .sweeps import PAPER_TAUS


def _rows(records: Iterable[Record]) -> list[Record]:
    rows = list(records)
    if not rows:
        raise ValueError("no records to plot")
    return rows


def heatmap(
    records: Iterable[Record], x: str, y: str, value: str, *, title: str = "", colorscale: str = "Viridis"
) -> go.Figure:
    """A heatmap of `value` over `x` (columns) and `y` (rows), in first-seen order of each axis;
    cells without a record are left blank."""
    rows = _rows(records)
    xs, ys = list(dict.fromkeys(column(rows, x))), list(dict.fromkeys(column(rows, y)))
    grid: list[list[float | None]] = [[None] * len(xs) for _ in ys]
    for r in rows:
        grid[ys.index(r[y])][xs.index(r[x])] = r[value]
    fig = go.Figure(go.Heatmap(z=grid, x=[str(v) for v in xs], y=[str(v) for v in ys], colorscale=colorscale,
                               colorbar={"title": value}))  # fmt: skip
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, yaxis={"autorange": "reversed"})
    return fig


def sweep_heatmap(records: Iterable[Record], value: str = "concept_drop", *, title: str = "") -> go.Figure:
    """A causal sweep (`causal_sweep`) as one heatmap panel per family (columns) and direction
    (rows): layer windows down, step windows across, in first-seen order, on one color scale;
    hovering a cell shows `value` ± its `_sem`. Cells without a value are left blank."""
    rows = _rows(records)
    families, directions = list(dict.fromkeys(column(rows, "family"))), list(dict.fromkeys(column(rows, "direction")))
    fig = make_subplots(rows=len(directions), cols=len(families),
                        subplot_titles=[f"{f}: {d}" for d in directions for f in families])  # fmt: skip
    for i, direction in enumerate(directions, 1):
        for j, family in enumerate(families, 1):
            part = [r for r in rows if r["family"] == family and r["direction"] == direction]
            ys = list(dict.fromkeys(column(part, "layer_label")))
            xs = list(dict.fromkeys(f"{r['start']}-{r['stop']}" for r in part))
            z: list[list[float | None]] = [[None] * len(xs) for _ in ys]
            text = [[""] * len(xs) for _ in ys]
            for r in part:
                y, x = ys.index(r["layer_label"]), xs.index(f"{r['start']}-{r['stop']}")
                z[y][x], sem = r[value], r.get(f"{value}_sem")
                shown = "n/a" if r[value] is None else f"{r[value]:.3g}" + ("" if sem is None else f" ± {sem:.2g}")
                text[y][x] = f"layers {r['layer_label']}, steps {r['start']}-{r['stop']}: {value} {shown}"
            fig.add_trace(go.Heatmap(z=z, x=xs, y=ys, text=text, hoverinfo="text", coloraxis="coloraxis",
                                     name=f"{family}: {direction}"), row=i, col=j)  # fmt: skip
    fig.update_layout(title=title, coloraxis={"colorscale": "Viridis", "colorbar": {"title": value}})
    fig.update_xaxes(title_text="steps")
    fig.update_yaxes(autorange="reversed")
    fig.update_yaxes(title_text="layers", col=1)
    return fig


def _error(rows: list[Record], y: str, low: str | None, high: str | None) -> dict | None:
    if low is None or high is None:
        return None
    ys = column(rows, y)
    return {"type": "data", "symmetric": False,
            "array": [h - v for h, v in zip(column(rows, high), ys)],
            "arrayminus": [v - lo for lo, v in zip(column(rows, low), ys)]}  # fmt: skip


def curves(
    records: Iterable[Record],
    x: str,
    y: str,
    *,
    group: str | None = None,
    low: str | None = None,
    high: str | None = None,
    log_x: bool = False,
    title: str = "",
) -> go.Figure:
    """One line per `group` value of `y` against `x`, with error bars from the `low`/`high`
    fields when given (e.g. `group_mean`'s `<value>_low` / `<value>_high`)."""
    rows = _rows(records)
    fig = go.Figure()
    groups = list(dict.fromkeys(column(rows, group))) if group else [None]
    for g in groups:
        part = sorted((r for r in rows if group is None or r[group] == g), key=lambda r: r[x])
        fig.add_trace(go.Scatter(x=column(part, x), y=column(part, y), mode="lines+markers",
                                 name=str(g) if group else y, error_y=_error(part, y, low, high)))  # fmt: skip
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, xaxis_type="log" if log_x else None)
    return fig


def bars(
    records: Iterable[Record],
    x: str,
    y: str,
    *,
    group: str | None = None,
    low: str | None = None,
    high: str | None = None,
    title: str = "",
) -> go.Figure:
    """Grouped bars of `y` per `x` (one bar series per `group` value), with error bars."""
    rows = _rows(records)
    fig = go.Figure()
    for g in list(dict.fromkeys(column(rows, group))) if group else [None]:
        part = [r for r in rows if group is None or r[group] == g]
        fig.add_trace(go.Bar(x=[str(v) for v in column(part, x)], y=column(part, y), name=str(g) if group else y,
                             error_y=_error(part, y, low, high)))  # fmt: skip
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, barmode="group")
    return fig


def pareto_plot(
    records: Iterable[Record],
    front: Sequence[Record] = (),
    *,
    x: str = "concept_rate",
    y: str = "preservation",
    tau: str = "tau",
    highlight: Sequence[float] = PAPER_TAUS,
    auto_tau: float | None = None,
    title: str = "Erasure vs preservation",
) -> go.Figure:
    """Every tau as a point (error bars from `<x>_low/_high` and `<y>_low/_high` when present),
    the Pareto front as a line, the paper's taus (`highlight`) marked in a separate trace, and
    `auto_tau` (`choose_tau`'s choice, when it is one of the records' taus) in another."""
    rows = _rows(records)

    def errors(part: list[Record], key: str) -> dict | None:
        has = all(f"{key}_low" in r and f"{key}_high" in r for r in part)
        return _error(part, key, f"{key}_low", f"{key}_high") if has and part else None

    def labels(part: list[Record]) -> list[str]:
        return [f"tau={r[tau]:g}" for r in part]

    fig = go.Figure()
    fig.add_trace(go.Scatter(x=column(rows, x), y=column(rows, y), mode="markers", name="tau sweep",
                             text=labels(rows), error_x=errors(rows, x), error_y=errors(rows, y)))  # fmt: skip
    if front:
        part = sorted(front, key=lambda r: r[x])
        fig.add_trace(go.Scatter(x=column(part, x), y=column(part, y), mode="lines", name="Pareto front"))
    def at(taus: Sequence[float]) -> list[Record]:
        return [r for r in rows if any(abs(r[tau] - t) <= 1e-9 * max(1.0, t) for t in taus)]

    for name, marked, symbol, where in (("paper's tau", at(highlight), "star", "top center"),
                                        ("automatic tau", at([auto_tau] if auto_tau is not None else []), "diamond", "bottom center")):  # fmt: skip
        if marked:
            fig.add_trace(go.Scatter(x=column(marked, x), y=column(marked, y), mode="markers+text", name=name,
                                     text=labels(marked), textposition=where, marker={"symbol": symbol, "size": 14}))  # fmt: skip
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y)
    return fig


def spatial_overlay(image: torch.Tensor, values: torch.Tensor, *, opacity: float = 0.5, title: str = "") -> go.Figure:
    """An (h, w) map (e.g. `spatial_difference`) upsampled bilinearly onto an image (3, H, W) in
    [0, 1] and drawn over it, half transparent."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
    if values.ndim != 2:
        raise ValueError(f"values must be an (h, w) map, got shape {tuple(values.shape)}")
    height, width = image.shape[1:]
    up = F.interpolate(values[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    fig = go.Figure(go.Image(z=pixels, name="image"))
    fig.add_trace(go.Heatmap(z=up.cpu().tolist(), opacity=opacity, colorscale="Inferno", name="difference"))
    fig.update_layout(title=title, yaxis={"autorange": "reversed", "scaleanchor": "x"})
    return fig
