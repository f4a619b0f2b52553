"""The output folder of a run: a fresh start, a resume, or an error, and nothing lost.

A run folder holds recipe.yaml, adapter/ (once finished), checkpoint-N/ folders that appear by
rename when complete, trainer_log.jsonl and loss.png. `--overwrite` moves an earlier run aside
and deletes it only when the new run finishes.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sara_cli import checkpoint
from sara_cli.errors import SaraError
from sara_cli.files import check_writable, write_text

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"
LOG_NAME = "trainer_log.jsonl"


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
    checkpoints = complete_checkpoints(output_dir)
    if overwrite and (finished or checkpoints):
        plan.previous = _aside_name(output_dir)
        plan.notices.append(f"--overwrite: the earlier run is kept at {plan.previous} until this one finishes")
        return plan
    if finished:
        raise SaraError(f"{output_dir} holds a finished run; pass --overwrite to train again, or "
                        "choose another train.output_dir")
    if checkpoints and not resume:
        raise SaraError(f"{output_dir} holds checkpoints and --no-resume was given; pass --overwrite "
                        "to start over, or drop --no-resume to continue")
    if checkpoints:
        saved = output_dir / checkpoint.RECIPE_NAME
        if saved.is_file():
            before = yaml.safe_load(saved.read_text()) or {}
            changed = [s for s in ("model", "adapter", "data")
                       if _without_none(before.get(s)) != _without_none(resolved.get(s))]
            if changed:
                raise SaraError(f"{output_dir} was started with a different recipe ({', '.join(changed)} "
                                "changed); pass --overwrite to start over, or choose another output_dir")
        plan.resume_from = checkpoints[-1]
        plan.notices.append(f"resuming from {plan.resume_from.name} "
                            f"(use --no-resume --overwrite to start over)")
    return plan


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


def prepare_output(plan: RunPlan) -> None:
    """Create the folder (moving an overwritten run aside) and check that it is writable."""
    if not is_main_process():
        return
    try:
        if plan.previous is not None:
            os.replace(plan.output_dir, plan.previous)
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        probe = plan.output_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SaraError(f"cannot write to train.output_dir {plan.output_dir}: {exc.strerror}; "
                        "check permissions or choose another folder") from None
    shutil.rmtree(plan.output_dir / STAGING, ignore_errors=True)  # left by a killed save


def run_of(path: Path) -> tuple[Path, str] | None:
    """(run folder, what inside it) when `path` is a training output folder ("" : its adapter),
    its adapter/ folder (""), or one of its checkpoint-N folders ("checkpoint-N"); else None.
    Results computed from a run are written inside it, as its other outputs are."""
    path = Path(path)
    if (path / "adapter" / checkpoint.CONFIG_NAME).is_file():
        return path, ""
    if (path / checkpoint.CONFIG_NAME).is_file() and (path.parent / checkpoint.RECIPE_NAME).is_file():
        if path.name == "adapter":
            return path.parent, ""
        if CHECKPOINT.match(path.name):
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
