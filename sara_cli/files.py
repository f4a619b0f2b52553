"""Atomic writes: a file or folder appears complete at its final path, or not at all."""

from __future__ import annotations

import errno
import glob
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
    except Exception as exc:
        full = no_space(exc, path.parent)
        if full is None:
            raise
        raise NoSpace(path) from None  # the path the user knows, not the temporary file's
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable(path: Path, label: str, given: Path | None = None) -> None:
    """Fail before any work if folder `path` cannot be created: the nearest existing folder on
    the way must be a folder we may write into.

    Args:
        label, given: the flag and the path the user gave (default `path`), for the message.

    Raises:
        SaraError: that ancestor is a file or not writable.
    """
    shown = path if given is None else given
    existing = _existing(Path(path).absolute())
    if not existing.is_dir():
        raise SaraError(f"cannot write {label} {shown}: {existing} is a file, not a folder; "
                        "choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SaraError(f"cannot write {label} {shown}: its folder {existing} is not writable (permission "
                        "denied); check permissions or choose another path")


def check_output_file(path: Path, flag: str) -> None:
    """Fail before any work when output file `path` (given as `flag`) cannot be written.

    Raises:
        SaraError: `path` is a folder, or its folder cannot be created or written.
    """
    path = Path(path)
    if path.is_dir():
        raise SaraError(f"{flag} {path} is a folder; give a file path")
    check_writable(path.parent, flag, given=path)


def _real(path: Path | str) -> Path:
    """`path` absolute, with `~` and every symbolic link on the way resolved (it need not exist)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def check_apart(outputs, inputs, command: str) -> None:
    """Refuse, before any work, an output that is, contains or lies inside one of the inputs.

    Writing there would replace what the command reads (a base's weights, a run, a data file).
    Paths are compared after resolving symbolic links; two names of one file (a hard link) count
    as the same. `--overwrite` never lifts this check.

    Args:
        outputs: (label, path) pairs the command will write, e.g. ("--out", Path("merged"));
            a None path is skipped.
        inputs: (label, path) pairs it reads, e.g. ("the base model", base_dir).
        command: the command's name, for the message.

    Raises:
        SaraError: naming the output, the input and how they overlap.
    """
    for out_label, out in outputs:
        if out is None:
            continue
        real_out = _real(out)
        for in_label, source in inputs:
            if source is None:
                continue
            real_in = _real(source)
            if real_out == real_in or _same_file(real_out, real_in):
                relation = "is"
            elif real_out in real_in.parents:
                relation = "contains"
            elif real_in in real_out.parents:
                relation = "lies inside"
            else:
                continue
            raise SaraError(f"{out_label} {out} {relation} {in_label} {source}, which {command} reads; "
                            "writing there would destroy it: choose another path")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Libraries that report a full disk without an errno: safetensors names it in its message;
# torch.save only says that its stream failed.
FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
STREAM_FAILURES = ("iostream error", "file write failed", "PytorchStreamWriter", "unexpected pos")
LOW_SPACE = 16 * 2**20  # bytes free below which such a failure is taken to be a full disk


class NoSpace(SaraError):
    """A write failed because the disk (or the user's quota) is full."""

    def __init__(self, where):
        super().__init__(f"no space left on the device while writing {where}: free space or choose "
                         "another output folder")


def no_space(exc: BaseException, folder: Path | None = None) -> NoSpace | None:
    """The one-line error for a write that failed on a full disk or quota, or None.

    An OSError with ENOSPC or EDQUOT anywhere in the chain counts, as does a library message
    that says so. torch.save's RuntimeError says neither: it counts when `folder` (where it
    wrote) has less than LOW_SPACE free.
    """
    if isinstance(exc, NoSpace):
        return exc
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            return NoSpace(seen.filename or folder or "the output")
        if any(word in str(seen) for word in FULL_WORDS):
            return NoSpace(folder or "the output")
        seen = seen.__cause__ or seen.__context__
    if folder is not None and isinstance(exc, RuntimeError) and any(w in str(exc) for w in STREAM_FAILURES):
        try:
            free = shutil.disk_usage(_existing(Path(folder))).free
        except OSError:
            return None
        if free < LOW_SPACE:
            return NoSpace(f"{folder} ({free // 1024} KiB free)")
    return None


def _existing(path: Path) -> Path:
    """The nearest existing folder or file on the way up from `path` (itself if it exists)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


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
        remove_stale_staging(path)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".partial",
                                        dir=path.parent))
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


def remove_stale_staging(path: Path) -> list[Path]:
    """Delete the staging folders of `path` (`.<name>.<pid>.<random>.partial`) and old copies
    being replaced (`.<name>.old-<pid>`) whose process is gone: what a killed write leaves.
    A process still alive keeps its own. Returns what was removed."""
    removed = []
    for entry in path.parent.glob(f".{glob.escape(path.name)}.*"):
        rest = entry.name[len(path.name) + 2:]
        if rest.endswith(".partial"):
            pid = rest.split(".", 1)[0]
        elif rest.startswith("old-"):
            pid = rest[4:]
        else:
            continue
        if entry.is_dir() and not _alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid: str) -> bool:
    """Whether process `pid` exists; text that is no PID (an older sara's staging name) is not."""
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
