"""Figures and self-contained HTML reports for the demo, the command line and notebooks.

Images are float (N, 3, H, W) in [0, 1], as `generation.generate` returns them. Small images
(ConceptWorld's are 32x32) are enlarged with nearest-neighbour upscaling, so pixels stay sharp.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image, ImageDraw, ImageFont
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from .io import atomic_write, atomic_write_text

Content = Union[go.Figure, Sequence[Mapping[str, object]], str]
"""What a report section shows: a plotly figure, a table (one dict per row), or text with blank
lines between paragraphs, "- " bullets, `code` and **bold**."""

_DISPLAY_PX = 128  # tiles are enlarged to at least this many pixels wide
_GAP_PX = 8  # space between tiles
_LINE_PX = 14  # height of one label line
_MAX_COLS = 8
_MODEBAR_PX = 30  # height of plotly's toolbar, which would otherwise cover the first row's labels


def _to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3)."""
    images = torch.as_tensor(images).detach().float().cpu()
    if images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, 3, H, W) batch, got shape {tuple(images.shape)}")
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _grid_shape(n: int, rows: int | None) -> tuple[int, int]:
    if rows is None:
        cols = min(n, _MAX_COLS)
        return math.ceil(n / cols), cols
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    rows = min(rows, n)
    return rows, math.ceil(n / rows)


def _check_labels(labels: Sequence[str] | None, n: int) -> list[str]:
    labels = [""] * n if labels is None else [str(label) for label in labels]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} images")
    return labels


def _upscale(tile: np.ndarray) -> Image.Image:
    img = Image.fromarray(tile)
    scale = max(1, math.ceil(_DISPLAY_PX / img.width))
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def _png_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_grid(
    images: torch.Tensor | np.ndarray,
    labels: Sequence[str] | None = None,
    rows: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """A plotly figure with one tile per image and its label above it. `rows` defaults to as
    many as needed for up to 8 tiles per row."""
    tiles = [_upscale(t) for t in _to_uint8(images)]
    labels = _check_labels(labels, len(tiles))
    n_rows, n_cols = _grid_shape(len(tiles), rows)
    tile_w, tile_h = tiles[0].size
    chars = max(8, tile_w // 7)  # characters per label line at the 11 px font
    wrapped = ["<br>".join(textwrap.wrap(html.escape(label, quote=False), chars)) for label in labels]
    lines = max(label.count("<br>") + 1 if label else 0 for label in wrapped)
    label_px = lines * _LINE_PX + (4 if lines else 0)
    row_gap = max(label_px, _GAP_PX)  # the labels of the next row sit in the gap
    width = n_cols * tile_w + (n_cols - 1) * _GAP_PX
    height = n_rows * tile_h + (n_rows - 1) * row_gap
    fig = make_subplots(
        rows=n_rows,
        cols=n_cols,
        subplot_titles=wrapped + [""] * (n_rows * n_cols - len(tiles)),
        horizontal_spacing=_GAP_PX / width if n_cols > 1 else 0,
        vertical_spacing=row_gap / height if n_rows > 1 else 0,
    )
    for i, tile in enumerate(tiles):
        fig.add_trace(go.Image(source=_png_uri(tile), hoverinfo="skip"), row=i // n_cols + 1, col=i % n_cols + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_annotations(font_size=11)
    top = label_px + (40 if title else _MODEBAR_PX)
    fig.update_layout(
        title=title,
        width=width + 20,
        height=height + top + 10,
        margin=dict(l=10, r=10, t=top, b=10),
        plot_bgcolor="white",
        paper_bgcolor="white",
    )
    return fig


def _wrap_to_width(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, max_px: int) -> list[str]:
    """Greedy word wrap by measured pixel width; a single over-long word gets its own line."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= max_px:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def labelled_grid_png(
    images: torch.Tensor | np.ndarray, labels: Sequence[str], path: str | Path, rows: int | None = None
) -> Path:
    """Write a PNG of the images as a grid, each tile with its label printed under it; returns
    the path. Written atomically."""
    tiles = [_upscale(t) for t in _to_uint8(images)]
    labels = _check_labels(labels, len(tiles))
    n_rows, n_cols = _grid_shape(len(tiles), rows)
    font = ImageFont.load_default(size=11)
    tile_w, tile_h = tiles[0].size
    wrapped = [_wrap_to_width(label, font, tile_w) for label in labels]
    label_px = max(len(w) for w in wrapped) * _LINE_PX + 4
    cell_w, cell_h = tile_w + _GAP_PX, tile_h + label_px + _GAP_PX
    canvas = Image.new("RGB", (n_cols * cell_w + _GAP_PX, n_rows * cell_h + _GAP_PX), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, lines) in enumerate(zip(tiles, wrapped)):
        x = _GAP_PX + (i % n_cols) * cell_w
        y = _GAP_PX + (i // n_cols) * cell_h
        canvas.paste(tile, (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + tile_h + 2 + j * _LINE_PX), line, fill="black", font=font)
    path = Path(path)
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
    return path


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def _text_html(text: str) -> str:
    blocks = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        if all(line.lstrip().startswith(("- ", "* ")) for line in lines):
            items = "".join(f"<li>{_inline(line.lstrip()[2:])}</li>" for line in lines)
            blocks.append(f"<ul>{items}</ul>")
        elif block:
            blocks.append(f"<p>{'<br>'.join(_inline(line) for line in lines)}</p>")
    return "\n".join(blocks)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value), quote=False)


def _table_html(rows: Sequence[Mapping[str, object]]) -> str:
    if not rows:
        return "<p><em>(no rows)</em></p>"
    columns = list(dict.fromkeys(k for row in rows for k in row))  # union, in order of first appearance
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(row.get(c, ''))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section_html(heading: str, content: Content) -> str:
    if isinstance(content, go.Figure):
        # a fixed default height: "100%" of a section of auto height can collapse
        body = content.to_html(
            full_html=False, include_plotlyjs=False, default_height="480px", config={"displaylogo": False}
        )
    elif isinstance(content, str):
        body = _text_html(content)
    elif isinstance(content, Sequence) and all(isinstance(row, Mapping) for row in content):
        body = _table_html(content)
    else:
        raise TypeError(
            f"section {heading!r}: content must be a plotly Figure, a list of dict rows or a string, "
            f"got {type(content).__name__}"
        )
    return f"<section><h2>{html.escape(heading)}</h2>\n{body}\n</section>"


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def html_report(path: str | Path, title: str, sections: Sequence[tuple[str, Content]]) -> Path:
    """Write one self-contained HTML file (works offline: plotly.js is inlined once, and only if a
    section holds a figure) with `title` and `(heading, content)` sections; returns the path.
    Written atomically."""
    parts = [_section_html(heading, content) for heading, content in sections]
    needs_plotly = any(isinstance(content, go.Figure) for _, content in sections)
    script = f'<script type="text/javascript">{get_plotlyjs()}</script>' if needs_plotly else ""
    document = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n{script}\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n" + "\n".join(parts) + "\n</body>\n</html>\n"
    )
    path = Path(path)
    atomic_write_text(document, path)
    return path
