"""`sara compare`'s modes: the plan (--dry-run, --plan), or the runs and the report (a normal
run, --report-only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sara_cli.comparison.plan import Arm
from sara_cli.comparison.run import (STATE_NAME, Comparison, Variant, load_result, missing, rate_of,
                                     recipe_path, run, size_arms, unscored, variants, write_state)
from sara_cli.errors import SaraError
from sara_cli.files import read_json


@dataclass
class Outcome:
    """What `sara compare` shows: the plan (dry run, --plan) or the report."""

    variants: list[Variant]
    finished: set = field(default_factory=set)  # names of variants with a result
    commands: list[str] = field(default_factory=list)  # --plan: one `sara train` per missing variant
    waiting: list[str] = field(default_factory=list)  # arms whose later seeds wait for the grid
    summary: dict | None = None
    comparison: Comparison | None = None

    def rate_of(self, arm: Arm) -> float | None:
        return rate_of(self.comparison, arm)


def execute(comparison: Comparison, mode: str, progress=None, on_start=None, on_matrix=None) -> Outcome:
    """`sara compare` in one of its modes: dry-run, plan, report-only or run.

    Raises:
        SaraError: a budget no arm can meet, results or runs made with other settings;
            train.Interrupted after Ctrl-C (the report of what finished is written first).
    """
    if not comparison.sizes:
        size_arms(comparison, on_start, on_matrix)
    planned = variants(comparison)
    waiting = waiting_arms(comparison)
    if mode == "dry-run":
        return Outcome(planned, _finished_names(comparison, planned), waiting=waiting, comparison=comparison)
    if mode == "plan":
        write_state(comparison)
        finished = _finished_names(comparison, planned)
        commands = [f"sara train {recipe_path(comparison, v)}" for v in planned if v.name not in finished]
        return Outcome(planned, finished, commands, waiting, comparison=comparison)
    try:
        results = run(comparison, progress, train_missing=mode == "run")
    except BaseException:  # also after Ctrl-C: the report of what finished, then the error itself
        if (comparison.out / STATE_NAME).is_file():
            try:
                write_report(comparison)
            except (SaraError, OSError):
                pass
        raise
    return Outcome(variants(comparison), {r["name"] for r in results}, summary=write_report(comparison),
                   comparison=comparison)


def write_report(comparison: Comparison) -> dict:
    """compare.json/md/png from every finished variant; what is missing is listed."""
    from sara_cli.comparison import report

    done = [r for v in variants(comparison) if (r := _quiet_result(comparison, v)) is not None]
    absent = [v.name for v in missing(comparison)] + unscored(comparison)
    absent += [f"{label} at the later seeds (its rate is not chosen yet)" for label in waiting_arms(comparison)]
    summary = report.summarize(read_json(comparison.out / STATE_NAME), done, absent, report.environment())
    report.write(summary, comparison.out)
    return summary


def waiting_arms(comparison: Comparison) -> list[str]:
    """Arms whose later seeds wait for the first seed's grid to finish."""
    if len(comparison.seeds) < 2:
        return []
    return [a.label for a in comparison.arms if rate_of(comparison, a) is None]


def _finished_names(comparison: Comparison, planned: list[Variant]) -> set:
    return {v.name for v in planned if load_result(comparison, v) is not None}


def _quiet_result(comparison: Comparison, variant: Variant) -> dict | None:
    try:
        return load_result(comparison, variant)
    except SaraError:
        return None
