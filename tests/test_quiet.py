"""A first run prints nothing but progress bars on stderr: no import notices, no install hints."""

from __future__ import annotations

import os
import re
import subprocess
import sys

# tqdm lines ("desc:  40%|####      | 2/5 [00:01<00:02, ...]"), split at carriage returns
PROGRESS = re.compile(r"^[^\n]*\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*\]\s*$")


def _stderr_lines(stderr: str) -> list[str]:
    return [part for line in stderr.splitlines() for part in line.split("\r") if part.strip()]


def test_the_demo_prints_only_progress_bars_on_stderr(tmp_path):
    argv = [sys.executable, "-m", "acterase_interp.cli", "demo", "--n-pairs", "2", "--n-images", "2", "--steps", "2",
            "--beside", "none", "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    noise = [line for line in _stderr_lines(run.stderr) if not PROGRESS.match(line)]
    assert noise == [], noise
    assert (tmp_path / "results.json").exists()


def test_the_filter_drops_only_the_torchvision_fallback_notice():
    import logging

    import acterase_interp  # noqa: F401  (installs the filter)

    logger = logging.getLogger("transformers.utils.import_utils")
    make = lambda msg: logger.makeRecord(logger.name, logging.WARNING, __file__, 0, msg, (), None)  # noqa: E731
    notice = make("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
    assert not logger.filter(notice)
    assert logger.filter(make("some other warning"))
