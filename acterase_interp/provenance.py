"""What every result carries so it can be reproduced: library versions (seeds and options are the caller's)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

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
