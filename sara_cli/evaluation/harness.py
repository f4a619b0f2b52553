"""`sara eval --harness`: lm-evaluation-harness on the model exactly as sara loads it.

The harness's own `hf` model loads a merged checkpoint or a PEFT adapter, but not a routed
Mo-SARA run. Here the model `evaluate.load_model` returns (an unmerged run with its adapter
layers; Mo-SARA routed per token) goes to `lm_eval.models.huggingface.HFLM(pretrained=<model>)`,
so every run is scored as trained.

Task configs for sara's bundled LLM-Adapters test sets ship in `sara_cli/assets/harness/`:
- `sara_<task>`: generate and extract, the LLM-Adapters scoring that `sara eval --task` uses
  (its prompt, greedy decoding, the response cut at a second "### Response:", then
  `tasks.extract_prediction` and `tasks.is_correct`);
- `sara_<task>_mc` (answers that are labels or letters): the harness's usual multiple-choice
  scoring, the label with the highest log-likelihood after the prompt. This is NOT comparable
  with LLM-Adapters' published numbers, which come from generate-and-extract.
The functions below are the ones those YAML files name with `!function sara_cli.evaluation.harness.<name>`.
lm-eval is an optional extra (`pip install "sara-cli[harness]"`), imported only here.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sara_cli.evaluation import tasks
from sara_cli.errors import SaraError

TASKS_DIR = Path(__file__).resolve().parent.parent / "assets" / "harness"
PREFIX = "sara_"
# simple_evaluate arguments that sara sets itself (or that have a sara flag).
RESERVED = {"model": "MODEL", "model_args": "MODEL", "tasks": "--harness", "limit": "--limit",
            "batch_size": "--batch-size", "device": "MODEL (sara places it)", "task_manager": "--harness",
            "evaluation_tracker": "--out", "samples": "--limit"}


def harness_name(task: tasks.Task, multiple_choice: bool = False) -> str:
    """sara_<task>, '-' written '_' as harness names are (sara_arc_easy); `_mc` for log-likelihood."""
    return PREFIX + task.name.replace("-", "_") + ("_mc" if multiple_choice else "")


def _registry() -> dict[str, tuple[tasks.Task, bool]]:
    found = {}
    for task in tasks.TASKS.values():
        found[harness_name(task)] = (task, False)
        if task.answer_kind != "numeric":
            found[harness_name(task, True)] = (task, True)
    return found


HARNESS_TASKS: dict[str, tuple[tasks.Task, bool]] = _registry()


def tag_of(task: tasks.Task, multiple_choice: bool) -> str:
    """The harness tag grouping a family: sara_math, sara_commonsense, sara_commonsense_mc, ..."""
    return f"{PREFIX}{task.family}" + ("_mc" if multiple_choice else "")


# -- what the shipped YAML files call ---------------------------------------------------------------

def load_dataset(sara_task: str, data_dir: str | None = None, **_metadata):
    """The task's test records as a datasets.DatasetDict with one `test` split.

    Called by the harness with the task's metadata (`sara_task`) and the TaskManager's
    (`data_dir`, from `sara eval --data-dir`); None reads the copy bundled with sara.
    Columns: instruction, answer (as text) and sara_task (which rules score the record).
    """
    import datasets

    task = tasks.TASKS[sara_task]
    records = tasks.load_records(task, Path(data_dir) if data_dir else None, None)
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({
        "instruction": [str(r["instruction"]) for r in records],
        "answer": [str(r["answer"]) for r in records],
        "sara_task": [sara_task] * len(records)})})


def doc_to_text(doc: dict) -> str:
    """The LLM-Adapters evaluation prompt, byte for byte (`tasks.eval_prompt`)."""
    return tasks.eval_prompt(doc["instruction"])


def doc_to_choice(doc: dict) -> list[str]:
    """The answer labels of the task ("true", "false"; "A".."E"), from its extraction pattern."""
    return tasks.TASKS[doc["sara_task"]].pattern.split("|")


def doc_to_target(doc: dict) -> int:
    """The index of the gold answer among `doc_to_choice` (checked before the model loads)."""
    return doc_to_choice(doc).index(doc["answer"])


def score_generation(doc: dict, results: list[str]) -> dict:
    """acc 1.0 or 0.0 by sara's (LLM-Adapters') extraction and comparison of the response.

    `results[0]` is the generation, already cut by the harness at the first stop sequence
    ("### Response:" or EOS), which is the text `tasks.extract_response` keeps."""
    task = tasks.TASKS[doc["sara_task"]]
    prediction = tasks.extract_prediction(task, results[0].strip())
    return {"acc": float(tasks.is_correct(task, prediction, doc["answer"]))}


# -- the YAML files ---------------------------------------------------------------------------------

def task_yaml(task: tasks.Task, multiple_choice: bool) -> str:
    """The shipped YAML of one harness task (`python -m sara_cli.evaluation.harness` writes them all)."""
    name = harness_name(task, multiple_choice)
    source = "LLM-Adapters test set bundled with sara" if task.bundled else "LLM-Adapters test set from --data-dir"
    if multiple_choice:
        head = (f"# {name}: {task.folder} ({source}), scored by log-likelihood\n"
                "# of the answer labels. NOT comparable with LLM-Adapters' generate-and-extract numbers.\n"
                "include: _mc_template_yaml\n")
        generation = ""
    else:
        head = (f"# {name}: {task.folder} ({source}), generated greedily and\n"
                "# scored with sara's LLM-Adapters extraction: the same numbers as `sara eval --task "
                f"{task.name}`.\ninclude: _generate_template_yaml\n")
        generation = ("generation_kwargs:\n  until: [\"### Response:\"]\n  do_sample: false\n"
                      f"  max_gen_toks: {task.max_new_tokens}\n")
    return (f"{head}task: {name}\ntag: {tag_of(task, multiple_choice)}\n{generation}"
            f"metadata:\n  version: 1.0\n  sara_task: {task.name}\n")


def write_task_files(folder: Path = TASKS_DIR) -> list[Path]:
    """Write every task's YAML into `folder` (a maintainer step; the files ship with sara)."""
    written = []
    for name, (task, multiple_choice) in HARNESS_TASKS.items():
        path = folder / f"{name}.yaml"
        path.write_text(task_yaml(task, multiple_choice))
        written.append(path)
    return written


# -- the bridge -------------------------------------------------------------------------------------

@dataclass
class HarnessReport:
    """What `run` wrote: the harness's results file, one samples file per task, the table."""

    out: Path
    results_path: Path
    sample_paths: list[Path] = field(default_factory=list)
    table: str = ""
    results: dict = field(default_factory=dict)


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise SaraError('--harness needs lm-evaluation-harness; install it with pip install '
                        '"sara-cli[harness]" (or pip install "lm-eval[hf]")') from None
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its info logs; our summary says what matters
    import lm_eval

    return lm_eval


def parse_task_names(spec: str) -> list[str]:
    """The comma-separated --harness value as names, in order, without duplicates.

    Raises:
        SaraError: nothing but commas and spaces.
    """
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise SaraError(f"--harness is empty (received {spec!r}); give harness task names, e.g. sara_svamp")
    return list(dict.fromkeys(names))


def parse_args(items: list[str]) -> dict:
    """--harness-args KEY=VALUE items -> keyword arguments of lm_eval.simple_evaluate.

    Values are typed as the harness's own CLI types them (true/false, numbers, else text).

    Raises:
        SaraError: an item without '=', an unknown key, or a key sara sets itself.
    """
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_arg_string

    allowed = [p for p in inspect.signature(simple_evaluate).parameters if p not in RESERVED]
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SaraError(f"--harness-args {item!r} is not KEY=VALUE; e.g. --harness-args num_fewshot=5")
        if key in RESERVED:
            raise SaraError(f"--harness-args {key} is set by sara; use {RESERVED[key]} instead")
        if key not in allowed:
            raise SaraError(f"--harness-args {key} is not an argument of lm_eval.simple_evaluate; "
                            f"valid: {', '.join(allowed)}")
        parsed[key] = value if key in ("gen_kwargs", "system_instruction") else handle_arg_string(value)
    return parsed


def check_tasks(names: list[str], data_dir: Path | None, options: dict) -> None:
    """sara's own tasks read their data before any model loads; zero-shot only, as LLM-Adapters.

    Raises:
        SaraError: an unknown sara_ task, missing or malformed data, answers outside the labels
            of a _mc task, or num_fewshot above 0 (the test sets have no few-shot split).
    """
    tags = sorted({tag_of(t, mc) for t, mc in HARNESS_TASKS.values()})
    for name in names:
        if not name.startswith(PREFIX) or name in tags:
            continue
        if name not in HARNESS_TASKS:
            raise SaraError(f"unknown harness task {name!r}; sara's tasks are: {', '.join(HARNESS_TASKS)} "
                            f"(tags: {', '.join(tags)})")
        task, multiple_choice = HARNESS_TASKS[name]
        records = tasks.load_records(task, data_dir, None)
        if multiple_choice:
            labels = task.pattern.split("|")
            bad = next((r for r in records if str(r["answer"]) not in labels), None)
            if bad is not None:
                raise SaraError(f"{name}: answer {bad['answer']!r} is not one of {', '.join(labels)}; "
                                "fix the data or score it with the generating task")
    if (options.get("num_fewshot") or 0) > 0 and any(n.startswith(PREFIX) for n in names):
        raise SaraError("sara_ tasks are zero-shot, as LLM-Adapters scores them (their test sets have no "
                        "few-shot split); drop num_fewshot or run them separately")


def task_manager(names: list[str], data_dir: Path | None):
    """The harness's TaskManager over sara's task files; the harness's own ~15,000 task configs
    are indexed (about 20 s) only when a name outside sara's is asked for.

    Raises:
        SaraError: a name neither set knows.
    """
    from lm_eval.tasks import TaskManager

    own = all(n.startswith(PREFIX) for n in names)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not own,
                          metadata={"data_dir": str(data_dir)} if data_dir else None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise SaraError(f"unknown harness task(s): {', '.join(unknown)}; see `lm_eval ls tasks`, or sara's "
                        f"own: {', '.join(HARNESS_TASKS)}")
    return manager


def run(model: str, task_spec: str, args: list[str], data_dir: Path | None, batch_size: int,
        limit: int | None, out: Path | None = None, max_new_tokens: int | None = None,
        trust_remote_code: bool = False) -> HarnessReport:
    """Run harness tasks on the model as sara loads it; write the harness's JSON into `out`.

    Args:
        out: results folder; None: RUN/eval/harness for a run, else eval-results/<name>-harness.
        max_new_tokens: overrides every generating task's max_gen_toks.

    Returns:
        results_<date>.json and samples_<task>_<date>.jsonl, named and formatted as the harness's
        own `--output_path --log_samples` writes them, moved into `out` when complete.

    Raises:
        SaraError: lm-eval missing, a bad option, task or data (before the model loads), or a
            write error.
    """
    from sara_cli.evaluation import evaluate
    from sara_cli.files import check_writable

    lm_eval = _import_lm_eval()
    names = parse_task_names(task_spec)
    options = parse_args(args)
    evaluate.check_options("fast", batch_size, limit, max_new_tokens)
    check_tasks(names, data_dir, options)
    out = evaluate.results_folder(model, "harness", out)
    check_writable(out, "the results folder")
    manager = task_manager(names, data_dir)
    if max_new_tokens is not None:
        extra = options.get("gen_kwargs")
        options["gen_kwargs"] = f"max_gen_toks={max_new_tokens}" + (f",{extra}" if extra else "")

    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import make_table

    loaded, tokenizer, description, _ = evaluate.load_model(model, trust_remote_code=trust_remote_code)
    lm = HFLM(pretrained=loaded, tokenizer=tokenizer, batch_size=batch_size)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".harness.", suffix=".partial", dir=out))
    try:
        tracker = EvaluationTracker(output_path=str(staging / "results.json"))
        results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                          evaluation_tracker=tracker, model_args={"pretrained": description},
                                          **options)
        samples = results.pop("samples", {})
        tracker.save_results_aggregated(results=results, samples=samples)
        for name in results["configs"]:
            tracker.save_results_samples(task_name=name, samples=samples[name])
        report = _publish(staging, out, results)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.table = make_table(results) + (("\n" + make_table(results, "groups")) if "groups" in results else "")
    return report


def _publish(staging: Path, out: Path, results: dict) -> HarnessReport:
    """Move the tracker's files from `staging` into `out`, each appearing complete (rename)."""
    found = sorted(staging.glob("results_*.json"))
    if not found:  # the tracker logs write errors instead of raising them
        raise SaraError(f"lm-evaluation-harness wrote no results into {out}; check free space and permissions")
    report = HarnessReport(out=out, results_path=out / found[0].name, results=results)
    for path in sorted(staging.glob("samples_*.jsonl")):
        os.replace(path, out / path.name)
        report.sample_paths.append(out / path.name)
    os.replace(found[0], report.results_path)  # last: results_*.json means the samples are there too
    return report


if __name__ == "__main__":  # a maintainer step: rewrite the shipped task files after TASKS changes
    for written in write_task_files():
        print(written)
