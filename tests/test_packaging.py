"""The wheel holds what the package needs at run time. (`.ci/wheel_smoke` installs it into a fresh
environment and runs a demo from it; this checks its contents.)"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(listed) == sorted(find_packages(ROOT, include=["acterase_interp*"]) + ["acterase_interp.data"])


@pytest.mark.slow
def test_wheel_holds_the_package_and_every_data_file(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path)], check=True)  # fmt: skip
    (wheel,) = tmp_path.glob("acterase_interp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(["git", "ls-files", "data", "acterase_interp"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()  # fmt: skip
    if not tracked:
        pytest.skip("not a git checkout")
    expected = {f"acterase_interp/{p}" if p.startswith("data/") else p for p in tracked}
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)[:10]}"
    assert "acterase_interp/data/conceptworld/pipeline/unet/diffusion_pytorch_model.safetensors" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
