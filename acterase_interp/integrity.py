"""Tamper evidence for artifacts: the sha256 of every tensor file (or JSON row) an artifact holds is
recorded in its manifest when it is written and checked when it is read, so one changed byte is a
clear error instead of a silently different eraser. Every file the package reads that turns out
damaged or malformed raises `ArtifactError`, never a parser's traceback."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

SHA256 = "sha256"
"""The manifest key of the recorded hashes: file name (relative to the artifact) -> hex digest."""
NO_VERIFY = "load with verify=False (command line: --no-verify)"


class ArtifactError(ValueError):
    """A file the package reads is damaged, changed since it was written, or not what it should be.
    A ValueError, so callers that catch bad input as ValueError keep working."""


class UnverifiedArtifactWarning(UserWarning):
    """An artifact written before hashes were recorded: it loads, unchecked."""


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """The hex sha256 of `obj` as canonical JSON (sorted keys, no spaces): equal for equal values
    however the file was indented."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_hashes(folder: str | Path, names: Iterable[str]) -> dict[str, str]:
    """{name: sha256} of the files `names` (paths relative to `folder`), for a manifest."""
    return {name: sha256_file(Path(folder) / name) for name in names}


def mismatch(
    what: str | Path, recorded: str, found: str, manifest: str | Path, fix: str = "write it again"
) -> ArtifactError:
    """The error for content whose hash differs from the one its manifest recorded."""
    return ArtifactError(
        f"{what} has sha256 {found}, but {manifest} recorded {recorded}: it changed after it was written "
        f"(damaged, or edited); {fix}, or {NO_VERIFY} if you changed it on purpose"
    )


def warn_unverified(manifest: str | Path) -> None:
    """The one-line notice for an artifact without recorded hashes."""
    warnings.warn(
        f"{manifest} records no sha256 (written by an older version): loaded without checking its files; "
        "save it again to record them",
        UnverifiedArtifactWarning,
        stacklevel=3,
    )


def verify_files(
    folder: str | Path, recorded: Any, names: Iterable[str], *, manifest: Path, verify: bool = True
) -> None:
    """Check that every file of `names` (relative to `folder`) has the sha256 that `recorded` (the
    manifest's map, None in artifacts from before hashes) gives it. With `verify=False`, nothing."""
    if not verify:
        return
    if recorded is None:
        warn_unverified(manifest)
        return
    if not isinstance(recorded, dict):
        raise ArtifactError(f"{manifest}: {SHA256!r} must map file names to sha256 digests")
    for name in names:
        path = Path(folder) / name
        if not isinstance(want := recorded.get(name), str):
            raise ArtifactError(f"{manifest} records no sha256 for {name}: the manifest is damaged or {path} was added")
        if not path.is_file():
            raise ArtifactError(f"{path} is missing (its manifest {manifest} lists it)")
        if (found := sha256_file(path)) != want:
            raise mismatch(path, want, found, manifest)


def read_json(path: str | Path, what: str = "JSON") -> Any:
    """The JSON value in `path`, or an ArtifactError saying why it is not readable JSON."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({what}): {err}") from err


def read_object(path: str | Path, what: str) -> dict[str, Any]:
    """`read_json` of a file that must hold a JSON object."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} must hold a JSON object ({what}), not {type(data).__name__}")
    return data


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or an ArtifactError naming it."""
    if not Path(path).is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        return load_file(path)
    except SafetensorError as err:
        raise ArtifactError(f"{path} is not a readable safetensors file ({err})") from err


def malformed(path: str | Path, what: str, err: Exception) -> ArtifactError:
    """The error for a manifest whose fields do not make an artifact (a missing key, a wrong type)."""
    reason = f"missing field {err.args[0]!r}" if isinstance(err, KeyError) and err.args else str(err)
    return ArtifactError(f"{path} is not a valid {what}: {reason}")
