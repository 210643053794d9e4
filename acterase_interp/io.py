"""Atomic writes: a file or an artifact folder appears whole or not at all, so an interrupted save
loses nothing."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import save_file

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write `text` as UTF-8."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(obj: Any, path: str | Path) -> None:
    """Write `obj` as indented JSON."""

    atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (contiguous, CPU copies are made) as safetensors."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write_dir(path: str | Path, marker: str, write: Callable[[Path], None]) -> None:
    """Write a folder atomically: `write` fills a temporary sibling folder that then replaces
    `path`. An existing folder is replaced only if it is an artifact of this kind (holds `marker`).
    Processes saving to one path at once each commit whole; the last commit wins."""
    path = Path(path).expanduser()
    if path.exists() and not (path / marker).exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an artifact folder (no {marker}); refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_SWAP_TRIES = 50


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`, moving an old folder there aside first and deleting it after. Another
    process may commit into `path` between our two renames: then we move its folder aside too and
    try again."""
    for _ in range(_SWAP_TRIES):
        old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
        try:
            path.rename(old)
        except FileNotFoundError:
            old = None  # nothing there (any more)
        try:
            tmp.rename(path)
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                if old is not None:
                    old.rename(path)  # put the previous artifact back
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)  # another writer committed meanwhile: it replaced this one
            continue
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return
    raise FileExistsError(f"{path}: other processes kept saving into it; nothing was written, try again")


def interrupted_save(path: str | Path, marker: str) -> Path | None:
    """The previous artifact of `path` that a save killed between its two renames left aside
    (`.<name>.<id>.old`, holding `marker`), or None."""
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        return None
    left = sorted(path.parent.glob(f".{path.name}.*.old"), key=lambda p: p.stat().st_mtime)
    return next((p for p in reversed(left) if (p / marker).is_file()), None)


def interrupted_hint(path: str | Path, marker: str) -> str:
    """For a load error: where `interrupted_save` found the previous artifact of `path`, or ""."""
    left = interrupted_save(path, marker)
    return f"; a save into it was interrupted: the previous one is in {left}, rename it back" if left else ""
