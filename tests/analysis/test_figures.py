"""Figures are plotly Figures with the expected traces, drawn from records."""

import plotly.graph_objects as go
import pytest
import torch

from acterase_interp.analysis import figures as F
from acterase_interp.analysis.records import summarize
from acterase_interp.analysis.sweeps import pareto_front


def test_heatmap_places_values_in_their_cells():
    rows = [{"site": s, "step": t, "value": 10 * i + t} for i, s in enumerate(("a", "b")) for t in range(3)]
    fig = F.heatmap(rows[:-1], "step", "site", "value")  # one cell missing
    assert isinstance(fig, go.Figure) and len(fig.data) == 1 and fig.data[0].type == "heatmap"
    z = fig.data[0].z
    assert z[1][1] == 11 and z[1][2] is None and list(fig.data[0].y) == ["a", "b"]


def test_curves_and_bars_have_one_trace_per_group_with_error_bars():
    rows = [{"tau": t, "seed": s, "rate": t * (1 + s), "kind": k} for t in (0.01, 0.1) for s in range(3) for k in "xy"]
    summary = summarize(rows, ("kind", "tau"), ["rate"])
    fig = F.curves(summary, "tau", "rate", group="kind", low="rate_low", high="rate_high", log_x=True)
    assert [t.name for t in fig.data] == ["x", "y"] and fig.layout.xaxis.type == "log"
    assert fig.data[0].error_y.array is not None and len(fig.data[0].x) == 2
    bars = F.bars(summary, "tau", "rate", group="kind", low="rate_low", high="rate_high")
    assert [t.type for t in bars.data] == ["bar", "bar"]
    with pytest.raises(ValueError, match="no records"):
        F.curves([], "tau", "rate")


def test_pareto_plot_marks_the_papers_taus():
    rows = [{"tau": t, "concept_rate": r, "preservation": p}
            for t, r, p in ((0.005, 0.8, 0.99), (0.01, 0.4, 0.95), (0.02, 0.2, 0.9), (0.05, 0.3, 0.7), (0.1, 0.0, 0.5))]  # fmt: skip
    fig = F.pareto_plot(rows, pareto_front(rows))
    assert [t.name for t in fig.data] == ["tau sweep", "Pareto front", "paper's tau"]
    assert list(fig.data[2].x) == [0.4, 0.2]  # tau 0.01 and 0.02
    assert list(fig.data[1].x) == [0.0, 0.2, 0.4, 0.8]  # tau 0.05 is dominated by 0.02
    marked = F.pareto_plot(rows, auto_tau=0.05)
    assert [t.name for t in marked.data] == ["tau sweep", "paper's tau", "automatic tau"]
    assert list(marked.data[2].x) == [0.3] and list(marked.data[2].text) == ["tau=0.05"]


def test_spatial_overlay_upsamples_the_map_onto_the_image():
    fig = F.spatial_overlay(torch.rand(3, 32, 32), torch.rand(4, 4))
    assert [t.type for t in fig.data] == ["image", "heatmap"]
    assert len(fig.data[1].z) == 32 and len(fig.data[1].z[0]) == 32
    with pytest.raises(ValueError, match="image"):
        F.spatial_overlay(torch.rand(32, 32), torch.rand(4, 4))
