"""The output folder of a run: a fresh start, a resume, or an error, and nothing lost.

A run folder holds recipe.yaml, adapter/ (once finished), checkpoint-N/ folders that appear by
rename when complete, trainer_log.jsonl and loss.png, and a lock file held for the whole run.
`--overwrite` moves an earlier run aside and, when the new run finishes, deletes only what
`sara train` made there: a merged model, eval results or a user's own files are kept.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sara_cli.adapters import checkpoint
from sara_cli.errors import SaraError
from sara_cli.files import check_writable, write_text

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"
LOG_NAME = "trainer_log.jsonl"
LOCK_NAME = ".sara-train.lock"
WRITE_PROBE = ".write-test"
# What `sara train` writes into a run folder (besides checkpoint-N/), and so may delete again.
TRAIN_MADE = ("recipe.yaml", "adapter", LOG_NAME, "loss.png", STAGING, WRITE_PROBE, LOCK_NAME)
# Train settings that cannot change the trained adapter: a resume may change them.
RESULT_NEUTRAL = {"output_dir", "logging_steps", "save_steps", "save_total_limit", "eval_steps",
                  "report_to", "dataloader_num_workers", "per_device_eval_batch_size",
                  "gradient_checkpointing", "ddp_backend"}
# Adapter settings that change only how the adapter file is written: a resume may change them (a run
# from before `storage` existed then continues, its checkpoints being full files).
FILE_ONLY = {"storage"}


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders that finished saving (a rename makes them appear), oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := CHECKPOINT.match(p.name)) and (p / checkpoint.WEIGHTS_NAME).is_file()
             and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """Every checkpoint-N folder, complete or not, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resume_problem(folder: Path) -> str | None:
    """Why a run cannot continue from checkpoint `folder` exactly as it would have gone on,
    naming the file; None when every state it needs is there and readable: the adapter and its
    config, the trainer state, the optimizer, the scheduler and the RNG states. Without the
    optimizer or scheduler the Trainer would silently restart them (a different adapter)."""
    from sara_cli.files import read_json

    needed = (checkpoint.WEIGHTS_NAME, checkpoint.CONFIG_NAME, "trainer_state.json", "scheduler.pt")
    for name in needed:
        if not (folder / name).is_file():
            return f"{folder / name} is missing"
    # The Trainer writes optimizer.pt; under FSDP accelerate writes optimizer.bin (a full state
    # dict) or optimizer_0/ (sharded), and DeepSpeed keeps it in global_stepN/.
    optimizer = next((p for p in (folder / "optimizer.pt", folder / "optimizer.bin") if p.is_file()),
                     folder / "optimizer.pt")
    sharded = any(p.is_dir() and p.name.startswith(("optimizer", "global_step")) for p in folder.iterdir())
    if not optimizer.is_file() and not sharded:
        return f"{optimizer} is missing"
    rng = sorted(folder.glob("rng_state*.pth"))
    if not rng:
        return f"{folder / 'rng_state.pth'} is missing"
    try:
        checkpoint.load_safetensors(folder / checkpoint.WEIGHTS_NAME)
        checkpoint.read_config(folder)
        state = read_json(folder / "trainer_state.json")
    except SaraError as exc:
        return str(exc).split(";")[0]
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"{folder / 'trainer_state.json'} has no global_step"
    for path in [p for p in (optimizer, folder / "scheduler.pt", folder / "scaler.pt") if p.is_file()] + rng:
        reason = _unreadable(path)
        if reason:
            return f"{path} cannot be read ({reason})"
    return None


def _unreadable(path: Path) -> str | None:
    """The first line of the error `torch.load(weights_only=True)` (how the Trainer reads a
    checkpoint's states) gives for `path`, or None when it loads."""
    import pickle

    import torch
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():  # mmap: an optimizer state of gigabytes is checked without copying it
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):  # a legacy (non-zip) file cannot be mapped: read it
                    raise
                torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return "it holds Python objects that torch.load(weights_only=True) refuses to unpickle"
    except Exception as exc:  # truncated zip, I/O error: any of them means "not this one"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return "cut short or damaged: " + re.sub(r"\x1b\[[0-9;]*m", "", first)[:200]
    return None


def choose_resume(output_dir: Path, folders: list[Path]) -> tuple[Path, list[str]]:
    """The newest checkpoint a run can continue from exactly, and a notice for each newer one
    passed over (naming the file at fault).

    Raises:
        SaraError: none can be continued from; names the newest one's damaged file.
    """
    notices = []
    for folder in reversed(folders):
        problem = resume_problem(folder)
        if problem is None:
            return folder, notices
        notices.append(f"{folder.name} cannot be resumed exactly ({problem}); passing over it")
    raise SaraError(f"cannot resume the run in {output_dir}: {resume_problem(folders[-1])}, and no earlier "
                    "checkpoint is complete; pass --overwrite to start again")


@dataclass
class RunPlan:
    output_dir: Path
    resume_from: Path | None = None
    previous: Path | None = None  # an old run moved aside by --overwrite, deleted on success
    notices: list[str] = field(default_factory=list)


def plan_output(output_dir: Path, resume: bool, overwrite: bool, resolved: dict) -> RunPlan:
    """Decide between a fresh run, a resume, or an error, without losing anything.

    Raises:
        SaraError: output_dir is a file, not writable, a finished run, or holds checkpoints with
            --no-resume; each unless --overwrite where that makes sense.
    """
    import yaml

    plan = RunPlan(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise SaraError(f"train.output_dir {output_dir} is a file; give a folder path")
    check_writable(output_dir, "train.output_dir")
    finished = (output_dir / "adapter" / checkpoint.CONFIG_NAME).is_file()
    checkpoints = checkpoint_folders(output_dir)
    if overwrite and (finished or checkpoints):
        plan.previous = _aside_name(output_dir)
        notice = f"--overwrite: the earlier run is kept at {plan.previous} until this one finishes"
        others = foreign_entries(output_dir)
        if others:
            notice += (f"; {', '.join(p.name for p in others)} (not made by sara train) will stay "
                       "there afterwards")
        plan.notices.append(notice)
        return plan
    if finished:
        raise SaraError(f"{output_dir} holds a finished run; pass --overwrite to train again, or "
                        "choose another train.output_dir")
    others = foreign_entries(output_dir)
    if others and not checkpoints and not overwrite:
        shown = ", ".join(p.name for p in others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise SaraError(f"train.output_dir {output_dir} already holds files that are not a sara run "
                        f"({shown}); choose a new or empty folder, or pass --overwrite to train there "
                        "(those files are kept)")
    if checkpoints and not resume:
        raise SaraError(f"{output_dir} holds checkpoints and --no-resume was given; pass --overwrite "
                        "to start over, or drop --no-resume to continue")
    if checkpoints:
        saved = output_dir / checkpoint.RECIPE_NAME
        if saved.is_file():
            changed = changed_settings(yaml.safe_load(saved.read_text()) or {}, resolved)
            if changed:
                raise SaraError(f"{output_dir} was started with a different recipe ({'; '.join(changed)}); "
                                "a resume continues the saved run as it was, so pass --overwrite to start "
                                "over with the new settings, or choose another train.output_dir")
        plan.resume_from, passed_over = choose_resume(output_dir, checkpoints)
        plan.notices += passed_over
        plan.notices.append(f"resuming from {plan.resume_from.name} "
                            f"(use --no-resume --overwrite to start over)")
    return plan


def changed_settings(before: dict, after: dict) -> list[str]:
    """'section.key: old -> new' for every setting that differs and could change the result.

    The model, adapter and data sections must match exactly, but for adapter.storage; in train,
    RESULT_NEUTRAL keys (logging and save cadence, loggers, eval batch size, checkpointing) may differ.
    """
    changes = []
    for section in ("model", "adapter", "data", "train"):
        old = _without_none(as_recorded(section, before.get(section))) or {}
        new = _without_none(after.get(section)) or {}
        for key in [*new, *(k for k in old if k not in new)]:
            if (section == "train" and key in RESULT_NEUTRAL) or (section == "adapter" and key in FILE_ONLY):
                continue
            if old.get(key) != new.get(key):
                changes.append(f"{section}.{key}: {_show(old.get(key))} -> {_show(new.get(key))}")
    return changes


def as_recorded(section: str, settings):
    """A recorded recipe section with the defaults it was made under where it predates a setting:
    runs recorded before data.tokenize were tokenized joint."""
    if section == "data" and settings and "tokenize" not in settings:
        return {**settings, "tokenize": "joint"}
    return settings


def _show(value) -> str:
    import json

    if value is None:
        return "(unset)"
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)


def saved_recipe(recipe) -> dict:
    """The resolved recipe as written to a run, so that `sara train RUN/recipe.yaml` works again.

    The schema rejects another method's adapter keys even when they are null, so the unset
    (None) adapter settings are left out; every setting of the chosen method has a value.
    """
    resolved = recipe.resolved()
    resolved["adapter"] = _without_none(resolved["adapter"])
    return resolved


def _without_none(section):
    return {k: v for k, v in section.items() if v is not None} if isinstance(section, dict) else section


def _aside_name(output_dir: Path) -> Path:
    """A free `<name>.previous-<time>[-n]` beside output_dir (two overwrites can share a second)."""
    stem = f"{output_dir.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = output_dir.with_name(stem), 1
    while candidate.exists():
        candidate, n = output_dir.with_name(f"{stem}-{n}"), n + 1
    return candidate


def trim_log(path: Path, step: int) -> None:
    """Drop log records after `step`: a killed run logged steps that the resume repeats, and
    may have left half a line."""
    import json

    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        write_text(path, "".join(line + "\n" for line in kept))


def is_train_made(name: str) -> bool:
    """True for the entries of a run folder that `sara train` writes, and their temporary files."""
    return (name in TRAIN_MADE or bool(CHECKPOINT.match(name))
            or any(name.startswith(f".{made}.") for made in TRAIN_MADE))


def foreign_entries(output_dir: Path) -> list[Path]:
    """Entries of a run folder that `sara train` did not make (a merge, eval results, own files)."""
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if not is_train_made(p.name))


def prepare_output(plan: RunPlan) -> None:
    """Create the folder (moving an overwritten run aside) and check that it is writable.

    The lock file stays where it is: the run holding it keeps the folder.
    """
    if not is_main_process():
        return
    try:
        if plan.previous is not None:
            plan.previous.mkdir()
            for entry in plan.output_dir.iterdir():
                if entry.name != LOCK_NAME:
                    os.replace(entry, plan.previous / entry.name)
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        probe = plan.output_dir / WRITE_PROBE
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SaraError(f"cannot write to train.output_dir {plan.output_dir}: {exc.strerror}; "
                        "check permissions or choose another folder") from None
    shutil.rmtree(plan.output_dir / STAGING, ignore_errors=True)  # left by a killed save


def remove_previous(previous: Path) -> list[Path]:
    """Delete what `sara train` made in an overwritten run moved aside; return what was kept.

    The folder itself goes only when nothing else is left in it.
    """
    for entry in list(previous.iterdir()):
        if is_train_made(entry.name):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    kept = sorted(previous.iterdir())
    if not kept:
        previous.rmdir()
    return kept


@contextmanager
def locked(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `output_dir` for a whole run.

    The main process takes it (the other ranks of a torchrun belong to the same run); a second
    run fails at once. The kernel drops a flock when its process dies, so a killed run never
    blocks the next one. A folder this made for a run that failed before writing is removed.

    Raises:
        SaraError: another process holds the lock (the message names its PID).
    """
    if not is_main_process():
        yield
        return
    created = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = open(output_dir / LOCK_NAME, "a+")
    except OSError as exc:
        raise SaraError(f"cannot write to train.output_dir {output_dir}: {exc.strerror}; "
                        "check permissions or choose another folder") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise SaraError(f"train.output_dir {output_dir} is in use by another sara train (PID {holder}); "
                            "wait for it to finish, or choose another train.output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        except BaseException:
            if created and [p.name for p in output_dir.iterdir()] == [LOCK_NAME]:
                (output_dir / LOCK_NAME).unlink()
                output_dir.rmdir()
            raise
    finally:
        handle.close()  # closing releases the lock


def run_of(path: Path) -> tuple[Path, str] | None:
    """(run folder, what inside it) when `path` is a training output folder ("" : its adapter),
    its adapter/ folder (""), or one of its checkpoint-N folders ("checkpoint-N"); else None.
    Results computed from a run are written inside it, as its other outputs are."""
    path = Path(path)
    if (path / "adapter" / checkpoint.CONFIG_NAME).is_file():
        return path, ""
    if (path / checkpoint.CONFIG_NAME).is_file():
        if path.name == "adapter":  # the name train gives it: its parent is the run
            return path.parent, ""
        if CHECKPOINT.match(path.name) and (path.parent / checkpoint.RECIPE_NAME).is_file():
            return path.parent, path.name
    return None


def _adapter_like(folder: Path) -> bool:
    """An adapter or checkpoint folder: train writes it, merge and eval read it."""
    return (folder / checkpoint.CONFIG_NAME).is_file() or (folder / "trainer_state.json").is_file()


def check_outside_managed(out: Path, label: str) -> None:
    """Refuse an output folder that is a run folder itself or lies inside a run's adapter or
    checkpoint folders, whose files train and merge own. RUN/eval/... and other new folders
    inside a run are fine.

    Raises:
        SaraError: naming the flag, the path and the managed folder.
    """
    target = Path(out).absolute()
    if (target / "adapter" / checkpoint.CONFIG_NAME).is_file() or complete_checkpoints(target):
        raise SaraError(f"{label} {out} is a run folder; give a folder of its own (for a run, the default "
                        "is RUN/eval/...)")
    for folder in (target, *target.parents):
        if _adapter_like(folder):
            raise SaraError(f"{label} {out} lies inside {folder}, an adapter or checkpoint folder whose "
                            "files train and merge manage; choose another folder")
