"""Atomic writes: a file or folder appears complete at its final path, or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sara_cli.errors import SaraError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; rename it onto `path` when the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise SaraError(f"cannot write {path}: {exc.strerror}; check the folder and its permissions") from exc
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable(path: Path, label: str) -> None:
    """Fail before any work if folder `path` (named `label` in the message) cannot be created:
    the nearest existing folder on the way must be a folder we may write into.

    Raises:
        SaraError: that ancestor is a file or not writable.
    """
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SaraError(f"cannot write {label} {path}: {existing} is a file, not a folder; "
                        "choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SaraError(f"cannot write {label} {path}: {existing} is not writable; check permissions "
                        "or choose another folder")


def check_output_file(path: Path, flag: str) -> None:
    """Fail before any work when output file `path` (given as `flag`) cannot be written.

    Raises:
        SaraError: `path` is a folder, or its folder cannot be created or written.
    """
    path = Path(path)
    if path.is_dir():
        raise SaraError(f"{flag} {path} is a folder; give a file path")
    check_writable(path.parent, flag)


def read_json(path: Path | str, fix: str = "re-download it or fix the file"):
    """Parse a JSON file; a damaged one is a SaraError naming the file, the line and `fix`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SaraError(f"{path} is not a JSON text file (it holds non-UTF-8 bytes); {fix}") from None
    except json.JSONDecodeError as exc:
        raise SaraError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); {fix}") from None


def write_json(path: Path | str, data) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_dir(path: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside `path`; move it into place when the block succeeds.

    An existing `path` is an error unless `overwrite`; it is then replaced only after the new
    folder is complete, so a failure leaves the old one untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise SaraError(f"{path} already exists; choose another folder or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise SaraError(f"{path} is a file; give a folder path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    except OSError as exc:
        raise SaraError(f"cannot write into {path.parent}: {exc.strerror}; check permissions "
                        "and free space") from exc
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
