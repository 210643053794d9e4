"""The benchmark command runs end to end at its tiniest size and writes its table (no timing is
asserted: benchmarks are not tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_benchmark_command_runs_at_tiny_size(tmp_path):
    command = [sys.executable, "-m", "benchmarks.run", "--tiny", "--reps", "1", "--warmup", "0", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "cpu.json").read_text())
    assert set(result["scales"]) == {"conceptworld", "sd15"}
    names = {s: [f["figure"] for f in b["figures"]] for s, b in result["scales"].items()}
    assert names["sd15"][-1] == "re-threshold" and len(names["conceptworld"]) == 4
    for body in result["scales"].values():
        assert body["info"]["traced_minus_hooked_max_abs"] == 0.0  # the two patch paths agree
        assert body["info"]["patch_changes_output"]
        for f in body["figures"]:
            assert len(f["b_stats"]["samples"]) == 1 and f["b_stats"]["median"] > 0
    assert result["provenance"]["versions"]["torch"] and result["provenance"]["options"]["tiny"]
    assert "| sd15 | re-threshold" in (tmp_path / "cpu.md").read_text()


def test_the_benchmark_refuses_a_missing_gpu_and_bad_counts():
    import torch

    from benchmarks.run import main

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit_:
            main(["--device", "cuda", "--out", "unused"])
        assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        main(["--reps", "0", "--out", "unused"])
    assert exit_.value.code == 2
