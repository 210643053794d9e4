import base64
import io

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from PIL import Image
from plotly.offline import get_plotlyjs

from acterase_interp.report import html_report, image_grid, labelled_grid_png


def images(n: int, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n))


def decode(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def as_uint8(img: torch.Tensor) -> np.ndarray:
    return (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_image_grid_has_one_upscaled_tile_per_image():
    imgs = images(5)
    labels = ["a red circle", "a blue star", "x < y", "d", "a picture of a violet four-sided shape on a dotted backdrop"]
    fig = image_grid(imgs, labels, title="five")
    assert isinstance(fig, go.Figure) and len(fig.data) == 5
    assert all(isinstance(t, go.Image) for t in fig.data)
    assert fig.layout.title.text == "five"
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:2] == labels[:2] and titles[2] == "x &lt; y"
    assert "<br>" in titles[4]  # long labels wrap
    tile = decode(fig.data[1].source)
    assert tile.shape == (128, 128, 3)  # 32 px enlarged 4x
    np.testing.assert_array_equal(tile[::4, ::4], as_uint8(imgs[1]))  # nearest neighbour: pixels repeated
    np.testing.assert_array_equal(tile[3::4, 3::4], as_uint8(imgs[1]))


def test_image_grid_layout():
    fig = image_grid(images(6), rows=2)
    assert len(fig.data) == 6
    assert {t.xaxis for t in fig.data[:3]} == {"x", "x2", "x3"} and fig.data[3].xaxis == "x4"
    assert fig.layout.xaxis3.domain[1] == pytest.approx(1) and fig.layout.yaxis4.domain[0] == pytest.approx(0)
    assert len(image_grid(images(20)).data) == 20  # 8 per row by default, last row partly empty


def test_image_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="labels for"):
        image_grid(images(3), ["a", "b"])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        image_grid(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="rows"):
        image_grid(images(3), rows=0)


def test_labelled_grid_png(tmp_path):
    imgs = images(5)
    path = labelled_grid_png(imgs, [f"image {i}" for i in range(5)], tmp_path / "sub" / "grid.png", rows=2)
    png = np.asarray(Image.open(path).convert("RGB"))
    assert png.shape[1] == 3 * (128 + 8) + 8  # 3 columns of 128 px tiles with 8 px gaps
    np.testing.assert_array_equal(png[8 : 8 + 128 : 4, 8 : 8 + 128 : 4], as_uint8(imgs[0]))
    assert not list(path.parent.glob("*.tmp"))


def test_html_report_is_self_contained(tmp_path):
    rows = [{"concept": "red", "erased": 0.0123456, "kept": "97.5%"}, {"concept": "star", "erased": 0.5, "note": "x"}]
    sections = [
        ("Images", image_grid(images(2), ["one", "two"])),
        ("Numbers", rows),
        ("Notes", "First paragraph with `code` and **bold**.\n\n- item <one>\n- item two"),
        ("Second figure", go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))),
    ]
    path = html_report(tmp_path / "report.html", "My <report>", sections)
    text = path.read_text()
    for heading in ("<h1>My &lt;report&gt;</h1>", "<h2>Images</h2>", "<h2>Numbers</h2>", "<h2>Notes</h2>"):
        assert heading in text
    for cell in ("<th>concept</th>", "<th>note</th>", "<td>red</td>", "<td>0.01235</td>", "<td>97.5%</td>", "<td>x</td>"):
        assert cell in text
    assert "<code>code</code>" in text and "<strong>bold</strong>" in text and "<li>item &lt;one&gt;</li>" in text
    assert text.count(get_plotlyjs()[:500]) == 1  # plotly.js inlined once for two figures
    assert "<script src=" not in text  # nothing loaded from the network
    assert not list(tmp_path.glob("*.tmp"))


def test_html_report_without_figures_has_no_plotlyjs(tmp_path):
    text = html_report(tmp_path / "r.html", "t", [("Empty table", []), ("Text", "hello")]).read_text()
    assert "(no rows)" in text and "<p>hello</p>" in text
    assert get_plotlyjs()[:500] not in text


def test_html_report_rejects_unknown_content(tmp_path):
    with pytest.raises(TypeError, match="section 'bad'"):
        html_report(tmp_path / "r.html", "t", [("bad", 42)])
    assert not (tmp_path / "r.html").exists()
