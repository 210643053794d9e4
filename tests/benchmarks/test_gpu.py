"""`python -m benchmarks.gpu`, the GPU benchmark at SD 1.5's real size, runs here on a CPU at a tiny
size (ConceptWorld, 2 steps, still in float16: torch runs these half-precision ops on a CPU) and
writes gpu.json and gpu.md; its defaults are CUDA, float16, 512 px and 30 steps."""

import json

import pytest
import torch

from benchmarks import gpu
from benchmarks.run import scales


def test_the_gpu_command_runs_on_a_cpu_at_tiny_size_and_writes_its_table(tmp_path):
    argv = ["--device", "cpu", "--size", "tiny", "--scales", "conceptworld", "--reps", "1", "--warmup", "0"]
    assert gpu.main([*argv, "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.json", "gpu.md"]
    result = json.loads((tmp_path / "gpu.json").read_text())
    options = result["provenance"]["options"]
    assert (options["dtype"], options["size"], options["name"], result["device"]) == ("float16", "tiny", "gpu", "cpu")
    assert result["provenance"]["command"].startswith("python -m benchmarks.gpu --device cuda --dtype float16")
    body = result["scales"]["conceptworld"]
    assert [f["figure"] for f in body["figures"]] == [
        "patched generation", "fit time vs its floor", "fit peak memory", "nnsight-traced patching"]  # fmt: skip
    assert body["info"]["traced_minus_hooked_max_abs"] == 0.0 and body["info"]["patch_changes_output"]
    table = (tmp_path / "gpu.md").read_text()
    assert "float16 weights" in table and "| conceptworld | patched generation" in table


def test_its_defaults_are_sd15_at_real_size_in_half_precision_on_cuda():
    assert gpu.DEFAULTS == ["--device", "cuda", "--dtype", "float16", "--size", "sd15-real", "--name", "gpu"]
    (real,) = scales("cuda", "sd15-real", torch.float16)
    assert (real.name, real.steps) == ("sd15", 30)  # 512 px: the latent side 64 is checked by the GPU run's info


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_it_says_so_when_cuda_is_missing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu.main(["--out", str(tmp_path)])
    assert exit_.value.code == 2 and "torch sees no CUDA device" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_bad_name_or_an_empty_selection_is_refused(tmp_path, capsys):
    for argv in (["--name", "../escape"], ["--size", "sd15-real", "--scales", "conceptworld"]):
        with pytest.raises(SystemExit) as exit_:
            gpu.main(["--device", "cpu", *argv, "--out", str(tmp_path)])
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "plain file name" in err and "has none of the scales" in err
