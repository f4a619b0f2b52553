"""Run a comparison: size the arms, then train and score one normal run per variant.

The comparison folder (--out) holds comparison.json (what was asked: the base recipe, arms,
budget, held-out data), recipes/<variant>.yaml (each a complete `sara train` recipe), results/
<variant>.json (one per finished variant, written as it finishes) and the report. The run folders
go to --runs-dir (default OUT/runs). A finished variant is never trained again: its result is
reused if its recipe is unchanged, and refused otherwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from sara_cli.adapters.checkpoint import CONFIG_NAME
from sara_cli.analysis import analyze
from sara_cli.comparison.plan import (DEFAULT_HOLDOUT, SIZE_KEY, Arm, Budget, budget_count, parameter_count,
                                      size_for_budget, within_budget)
from sara_cli.errors import SaraError
from sara_cli.files import read_json, write_json, write_text
from sara_cli.training.rundir import as_recorded, changed_settings, saved_recipe

STATE_NAME = "comparison.json"
HOLDOUT_SEED = 0  # the held-out records are the same for every seed and method


@dataclass
class Variant:
    """One run: an arm at a seed and a learning rate."""

    arm: Arm
    seed: int
    learning_rate: float
    grid_point: bool = False  # one of seed 0's rates on a grid, before the choice

    @property
    def name(self) -> str:
        return f"{self.arm.slug}-lr{self.learning_rate:g}-seed{self.seed}"


@dataclass
class Comparison:
    recipe: object  # the base recipe.Recipe
    arms: list[Arm]
    seeds: list[int]
    budget: Budget
    rates: dict  # {method: rate}
    grids: dict  # {method: [rates]}
    out: Path
    runs_dir: Path
    holdout: int | None = None  # records carved from the training data; None: data.eval_file
    tasks: str | None = None
    limit: int | None = None
    max_new_tokens: int | None = None  # with tasks: the generation cap (default: the task's)
    task_specs: dict = field(default_factory=dict)  # {task name: its --task item}, resolved once
    sizes: dict = field(default_factory=dict)  # {arm label: {"adapter", "params", "target", "reached"}}

    @property
    def holdout_data(self) -> str:
        """The held-out records: data.eval_file, or the carved OUT/data/holdout.json."""
        if self.holdout is not None:
            return str(self.out / "data" / "holdout.json")
        return self.recipe.data.files("eval")[0].path

    @property
    def holdout_limit(self) -> int | None:
        """data.eval_file's own limit (`[{path: ..., limit: N}]`): its first N records."""
        return None if self.holdout is not None else self.recipe.data.files("eval")[0].limit

    def identity(self) -> dict:
        """What makes two comparisons the same: the recipe without what each variant sets (its
        adapter size, rate, seed, folder), the budget and the held-out data. Arms and seeds may
        be added to a comparison; these may not change."""
        resolved = self.recipe.resolved()
        adapter = {k: resolved["adapter"][k] for k in ("targets", "dropout")}
        train = {k: v for k, v in resolved["train"].items() if k not in ("learning_rate", "seed", "output_dir")}
        return {"model": resolved["model"], "adapter": adapter, "data": resolved["data"], "train": train,
                "budget": str(self.budget), "holdout": self.holdout}


def setup(recipe, arms: list[Arm], seeds: list[int], budget: Budget, rates: dict, grids: dict,
          holdout: int | None, tasks: str | None, limit: int | None, out: Path,
          runs_dir: Path | None, max_new_tokens: int | None = None) -> Comparison:
    """Check what needs no model: the held-out data and the comparison folder.

    Raises:
        SaraError: --holdout with data.eval_file, or too large; a list of files to carve from;
            an output folder that holds another comparison or other files.
    """
    data = recipe.data
    if data.eval_file is not None:
        if holdout is not None:
            raise SaraError("the recipe sets data.eval_file, which is the held-out data; drop --holdout, "
                            "or drop data.eval_file to carve --holdout N records from the training data")
        if len(data.files("eval")) != 1:
            raise SaraError("compare scores one held-out file: give data.eval_file as one path (or a list of "
                            "one, to set its limit)")
    else:
        holdout = DEFAULT_HOLDOUT if holdout is None else holdout
        if holdout < 1:
            raise SaraError(f"--holdout must be at least 1, got {holdout}")
        if not isinstance(data.train_file, str):
            raise SaraError("compare carves --holdout from one training file; give data.train_file as one "
                            "path, or set data.eval_file to the held-out data")
    if limit is not None and limit < 1:
        raise SaraError(f"--limit must be at least 1, got {limit}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise SaraError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not tasks and (limit is not None or max_new_tokens is not None):
        raise SaraError("--limit and --max-new-tokens set how --task is scored; add --task (e.g. --task mawps,svamp)")
    specs = {}
    if tasks:
        from sara_cli.evaluation import tasks as eval_tasks

        # an ad-hoc task is named after its file's stem but found again by its path
        specs = {t.name: str(t.source) if t.source else t.name for t in eval_tasks.resolve_tasks(tasks)}
    comparison = Comparison(recipe, arms, seeds, budget, rates, grids, out, runs_dir or out / "runs",
                            holdout, tasks, limit, max_new_tokens, specs)
    check_folder(comparison)
    return comparison


def check_folder(comparison: Comparison) -> None:
    """The output folder is new, empty, or holds this same comparison."""
    out = comparison.out
    if out.exists() and not out.is_dir():
        raise SaraError(f"--out {out} is a file; give a folder")
    state = out / STATE_NAME
    if state.is_file():
        before = read_json(state).get("identity") or {}
        now = comparison.identity()
        changed = [key for key in now if as_recorded(key, before.get(key)) != now[key]]
        if changed:
            raise SaraError(f"--out {out} holds another comparison (its {', '.join(changed)} differ); "
                            "choose another --out, or the same recipe, budget and held-out data")
    elif out.is_dir() and any(out.iterdir()):
        raise SaraError(f"--out {out} is not empty and holds no comparison; choose a new or empty folder")


# -- sizes ---------------------------------------------------------------------------------------

def size_arms(comparison: Comparison, on_start=None, on_matrix=None) -> None:
    """Each arm's adapter section and parameter count, from the spectra (cached after the first time).

    Raises:
        SaraError: a budget that no arm it applies to can meet within 2%.
    """
    from sara_cli.adapters.inject import parse_targets

    recipe = comparison.recipe
    matrices = analyze.analyze(recipe.model.name_or_path, [0.5], parse_targets(recipe.adapter.targets),
                               "auto", on_start, on_matrix).matrices
    budget = comparison.budget
    target = None if budget.kind == "none" else budget_count(budget, matrices)
    for arm in comparison.arms:
        adapter = adapter_section(recipe.adapter, arm)
        entry = {"target": None, "reached": None}
        if target is not None and arm.budgeted:
            size, count = size_for_budget(arm.method, adapter, matrices, target)
            adapter.update(size)
            entry.update(target=target, reached=within_budget(count, target))
        if arm.method == "lora" and SIZE_KEY["lora"] in adapter and "alpha" not in arm.settings and (
                "rank" in arm.settings or (target is not None and arm.budgeted)):
            adapter["alpha"] = 2.0 * adapter["rank"]  # the scale alpha / r stays 2 at every size
        entry["adapter"] = adapter
        entry["params"] = parameter_count(arm.method, adapter, matrices)
        comparison.sizes[arm.label] = entry
    if target is not None:
        sized = [comparison.sizes[a.label] for a in comparison.arms if a.budgeted]
        if sized and not any(e["reached"] for e in sized):
            nearest = ", ".join(f"{a.label} {comparison.sizes[a.label]['params']:,d}"
                                for a in comparison.arms if a.budgeted)
            raise SaraError(f"no method can meet --budget {budget} ({target:,d} parameters) within 2%: "
                            f"nearest counts {nearest}; choose another budget")


def adapter_section(base, arm: Arm) -> dict:
    """The arm's adapter settings: the recipe's targets and dropout, the recipe's own settings
    where it uses the same method (else the method's defaults), then the arm's."""
    from sara_cli.recipe.schema import METHOD_DEFAULTS

    section = {"method": arm.method, "targets": base.targets, "dropout": base.dropout}
    for key, default in METHOD_DEFAULTS[arm.method].items():
        value = getattr(base, key) if base.method == arm.method else None
        section[key] = default if value is None else value
    section.update(arm.settings)
    return section


# -- variants ------------------------------------------------------------------------------------

def rate_of(comparison: Comparison, arm: Arm) -> float | None:
    """The arm's rate: --lr, the recipe's, or (with a grid) the one chosen on seed 0, or None
    while seed 0's grid has not finished."""
    if arm.method in comparison.rates:
        return comparison.rates[arm.method]
    if arm.method not in comparison.grids:
        return comparison.recipe.train.learning_rate
    return chosen_rate(comparison, arm)


def chosen_rate(comparison: Comparison, arm: Arm) -> float | None:
    """The grid rate with the lowest held-out loss at the first seed; None until all are scored."""
    losses = {}
    for rate in comparison.grids[arm.method]:
        result = load_result(comparison, Variant(arm, comparison.seeds[0], rate))
        if result is None:
            return None
        loss = result["holdout"]["loss"]
        losses[rate] = loss if math.isfinite(loss) else math.inf  # a rate that diverged is never chosen
    return min(losses, key=lambda r: (losses[r], r))


def variants(comparison: Comparison, chosen_only: bool = False) -> list[Variant]:
    """Every variant, seed by seed and arm by arm (so that what finishes first is paired): at the
    first seed each grid rate, at later seeds the chosen rate (left out while unknown)."""
    found = []
    for index, seed in enumerate(comparison.seeds):
        for arm in comparison.arms:
            grid = comparison.grids.get(arm.method)
            if grid and index == 0 and not chosen_only:
                found += [Variant(arm, seed, rate, grid_point=True) for rate in grid]
                continue
            rate = rate_of(comparison, arm)
            if rate is not None:
                found.append(Variant(arm, seed, rate))
    return found


def variant_recipe(comparison: Comparison, variant: Variant) -> dict:
    """The complete recipe of a variant, as `sara train` writes it to the run."""
    from sara_cli.recipe import validate

    raw = comparison.recipe.resolved()
    raw["adapter"] = comparison.sizes[variant.arm.label]["adapter"]
    raw["train"].update(learning_rate=variant.learning_rate, seed=variant.seed,
                        output_dir=str(comparison.runs_dir / variant.name))
    data = raw["data"]
    data.update(eval_file=None, val_set_size=0)
    if comparison.holdout is not None:
        data.update(train_file=str(comparison.out / "data" / "train.json"), columns={}, limit=None)
    return saved_recipe(validate(raw, source=f"the recipe of {variant.name}"))


def recipe_path(comparison: Comparison, variant: Variant) -> Path:
    return comparison.out / "recipes" / f"{variant.name}.yaml"


def result_path(comparison: Comparison, variant: Variant) -> Path:
    return comparison.out / "results" / f"{variant.name}.json"


def load_result(comparison: Comparison, variant: Variant) -> dict | None:
    """A finished variant's result, or None.

    Raises:
        SaraError: the result was made with other settings than planned now.
    """
    path = result_path(comparison, variant)
    if not path.is_file():
        return None
    result = read_json(path, "delete it to score the run again")
    changed = changed_settings(result.get("recipe") or {}, variant_recipe(comparison, variant))
    if changed:
        raise SaraError(f"{path} was made with other settings ({'; '.join(changed)}); delete it and its run "
                        "to train anew, or choose another --out")
    return result


# -- files ---------------------------------------------------------------------------------------

def write_state(comparison: Comparison) -> None:
    """comparison.json, the held-out split (when carved) and every variant's recipe."""
    import yaml

    out = comparison.out
    if comparison.holdout is not None and not (out / "data" / "holdout.json").is_file():
        carve(comparison)
    write_json(out / STATE_NAME, {
        "identity": comparison.identity(),
        "arms": [a.label for a in comparison.arms], "seeds": comparison.seeds,
        "rates": comparison.rates, "grids": comparison.grids, "sizes": comparison.sizes,
        "holdout_data": comparison.holdout_data, "holdout_limit": comparison.holdout_limit, "tasks": comparison.tasks, "limit": comparison.limit,
        "max_new_tokens": comparison.max_new_tokens,
    })
    for variant in variants(comparison):
        write_text(recipe_path(comparison, variant),
                   yaml.safe_dump(variant_recipe(comparison, variant), sort_keys=False))


def carve(comparison: Comparison) -> None:
    """Split the training file into OUT/data/train.json and holdout.json: `holdout` records drawn
    with a fixed seed, the rest in their original order.

    Raises:
        SaraError: the file has too few records.
    """
    import numpy as np

    from sara_cli.data.records import load_records

    data = comparison.recipe.data
    records = load_records(data.train_file, data.train_split, data.limit, data.columns).to_list()
    if comparison.holdout >= len(records):
        raise SaraError(f"--holdout {comparison.holdout} leaves no training records ({len(records)} in "
                        f"{data.train_file}); lower it")
    order = np.random.default_rng(HOLDOUT_SEED).permutation(len(records))
    held = set(order[:comparison.holdout].tolist())
    write_json(comparison.out / "data" / "holdout.json", [records[i] for i in sorted(held)])
    write_json(comparison.out / "data" / "train.json", [r for i, r in enumerate(records) if i not in held])


# -- training and scoring ------------------------------------------------------------------------

def run(comparison: Comparison, progress=None, train_missing: bool = True) -> list[dict]:
    """Train (unless `train_missing` is False: --report-only) and score every variant not yet
    finished; return all finished results, in plan order. Each result is written as its variant
    finishes, so an interrupted comparison keeps them. When seed 0's grid completes, the chosen
    rates add the later seeds' variants, which run in the same call.

    `progress` receives start(total), variant(variant, status), steps(done, total),
    done(variant, result), notice(message).
    """
    write_state(comparison)
    finished = 0
    while True:
        todo = [v for v in variants(comparison) if load_result(comparison, v) is None]
        if progress:
            progress.start(finished + len(todo))
        done = [v for v in todo if _finish(comparison, v, progress, train_missing) is not None]
        finished += len(done)
        if not done or not [v for v in variants(comparison) if load_result(comparison, v) is None]:
            break
        write_state(comparison)  # the recipes of the variants the grid's choice added
    if comparison.tasks:
        for line in add_accuracy(comparison, progress):
            if progress:
                progress.notice(line)
    return [r for v in variants(comparison) if (r := load_result(comparison, v)) is not None]


def missing(comparison: Comparison) -> list[Variant]:
    """Planned variants without a result (at later seeds of a grid, only once it has chosen)."""
    return [v for v in variants(comparison) if load_result(comparison, v) is None]


def _finish(comparison: Comparison, variant: Variant, progress, train_missing: bool) -> dict | None:
    run_dir = comparison.runs_dir / variant.name
    recipe = variant_recipe(comparison, variant)
    finished = is_finished(run_dir)
    if finished:
        saved = read_json(run_dir / "adapter" / CONFIG_NAME).get("recipe") or {}
        changed = changed_settings(saved, recipe)
        if changed:
            raise SaraError(f"{run_dir} holds a run with other settings ({'; '.join(changed)}); move it "
                            "away to train anew, or choose another --runs-dir")
    if not finished and not train_missing:
        return None
    if progress:
        progress.variant(variant, "scoring" if finished else "training")
    costs = {} if finished else train_variant(recipe, progress)
    result = score(comparison, variant, run_dir, recipe, costs)
    write_json(result_path(comparison, variant), result)
    if progress:
        progress.done(variant, result)
    return result


def is_finished(run_dir: Path) -> bool:
    """A run folder whose training finished: its adapter is saved."""
    return (run_dir / "adapter" / CONFIG_NAME).is_file()


def train_variant(recipe: dict, progress) -> dict:
    """Train one variant; return its costs (setup time, peak GPU memory)."""
    import torch

    from sara_cli.recipe import validate
    from sara_cli.training.train import train

    reporter = VariantReporter(progress)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(validate(recipe), reporter=reporter)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"setup_seconds": reporter.setup_seconds, "peak_memory_bytes": peak}


class VariantReporter:
    """What `sara train` reports, kept for the comparison: the setup time and the steps."""

    def __init__(self, progress):
        self.progress = progress
        self.started = time.perf_counter()
        self.setup_seconds = None

    def notice(self, message: str) -> None:
        if self.progress:
            self.progress.notice(message)

    def built(self, recipe, model, layers, meta=None) -> None:
        self.setup_seconds = round(time.perf_counter() - self.started, 2)  # load, spectra, adapter init

    def data(self, stats, data_cfg) -> None:
        pass

    def progress_callback(self):
        from transformers import TrainerCallback

        progress = self.progress

        class Steps(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if progress:
                    progress.steps(state.global_step, state.max_steps)

        return Steps()


def score(comparison: Comparison, variant: Variant, run_dir: Path, recipe: dict, costs: dict) -> dict:
    """Held-out loss per target token (as trained), optional task accuracy, and costs."""
    import json

    from sara_cli.adapters.inject import is_adapter_parameter
    from sara_cli.evaluation.evaluate import load_model, mean_loss

    model, tokenizer, _, config = load_model(str(run_dir))
    batch = comparison.recipe.train.per_device_eval_batch_size
    holdout = mean_loss(model, tokenizer, comparison.holdout_data, config, batch, comparison.holdout_limit)
    params = sum(p.numel() for n, p in model.named_parameters() if is_adapter_parameter(n))
    del model
    accuracy = task_accuracy(comparison, run_dir, requested_tasks(comparison))
    log = [json.loads(line) for line in (run_dir / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    final = next((r for r in reversed(log) if "train_runtime" in r), {})
    steps = final.get("step") or 0
    return {
        "name": variant.name, "arm": variant.arm.label, "method": variant.arm.method, "seed": variant.seed,
        "learning_rate": variant.learning_rate, "grid_point": variant.grid_point,
        "run": str(run_dir), "adapter": comparison.sizes[variant.arm.label]["adapter"],
        "holdout": {k: holdout[k] for k in ("data", "records", "tokens", "loss")},
        "accuracy": accuracy,
        "cost": {"trainable_params": params,
                 "adapter_bytes": (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size,
                 "steps": steps, "train_loss": final.get("train_loss"),
                 "step_seconds": round(final["train_runtime"] / steps, 3) if steps else None,
                 **{"setup_seconds": None, "peak_memory_bytes": None, **costs}},
        "recipe": recipe,
    }


# -- task accuracy -------------------------------------------------------------------------------

def requested_tasks(comparison: Comparison) -> list[str]:
    return list(comparison.task_specs)


def task_accuracy(comparison: Comparison, run_dir: Path, tasks: list[str]) -> dict:
    """Accuracy on `tasks` through sara's eval (fast protocol), prompted with the run's own training
    template (the variants learned the answer format with it), each with the settings that made it."""
    if not tasks:
        return {}
    from sara_cli.evaluation.evaluate import benchmarks

    batch = comparison.recipe.train.per_device_eval_batch_size
    spec = ",".join(comparison.task_specs[t] for t in tasks)
    bench = benchmarks(str(run_dir), spec, None, "fast", batch, comparison.limit, comparison.max_new_tokens,
                       template="run")
    return {r.task: {"accuracy": r.accuracy, "n": r.n, "correct": r.correct, "limit": comparison.limit,
                     "max_new_tokens": comparison.max_new_tokens, "template": "run"} for r in bench.results}


def unscored_tasks(comparison: Comparison, result: dict) -> list[str]:
    """The requested tasks a finished result has no accuracy for, or has with another --limit,
    --max-new-tokens or prompt (a result kept from a run without --task, say)."""
    found = result.get("accuracy") or {}
    wanted = (comparison.limit, comparison.max_new_tokens, "run")
    return [t for t in requested_tasks(comparison)
            if t not in found or tuple(found[t].get(k) for k in ("limit", "max_new_tokens", "template")) != wanted]


def add_accuracy(comparison: Comparison, progress=None) -> list[str]:
    """Score the requested tasks on finished variants that lack them, from their run folders.

    Returns a notice for each variant that needs it but whose run folder is gone."""
    gone = []
    for variant in variants(comparison):
        result = load_result(comparison, variant)
        tasks = unscored_tasks(comparison, result) if result is not None else []
        if not tasks:
            continue
        run_dir = comparison.runs_dir / variant.name
        if not is_finished(run_dir):
            gone.append(f"no {', '.join(tasks)} accuracy for {variant.name}: its run folder {run_dir} is gone; "
                        f"delete {result_path(comparison, variant)} to train it again")
            continue
        if progress:
            progress.variant(variant, f"scoring {', '.join(tasks)} on")
        result["accuracy"] = {**result.get("accuracy", {}), **task_accuracy(comparison, run_dir, tasks)}
        write_json(result_path(comparison, variant), result)
    return gone


def unscored(comparison: Comparison) -> list[str]:
    """Finished variants still without the requested accuracy, for the report."""
    return [f"{v.name} ({', '.join(tasks)} accuracy)" for v in variants(comparison)
            if (r := load_result(comparison, v)) is not None and (tasks := unscored_tasks(comparison, r))]
