"""What every result carries so it can be reproduced: library versions (seeds and options are the caller's)."""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

_LIBRARIES = ("acterase-interp", "torch", "diffusers", "transformers", "nnsight", "safetensors", "numpy")


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries results depend on."""
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit(root: str | Path = Path(__file__).resolve().parents[1]) -> str | None:
    """The checkout's HEAD commit, "+uncommitted changes" appended when the package's files differ
    from it; None outside a git checkout (an installed wheel)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "acterase_interp"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+uncommitted changes" if dirty else "")
