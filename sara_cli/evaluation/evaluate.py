"""`sara eval`: one core function per mode; the command only dispatches.

- `benchmarks`: generate answers for benchmark tasks and score them the LLM-Adapters way;
- `mean_loss_of`: mean token loss and perplexity over instruction records;
- `score_file`: rescore a saved predictions file, no model;
- the lm-evaluation-harness bridge lives in `harness.py`.

Two protocols share the prompt (`tasks.eval_prompt`) and the scoring (`tasks.score_outputs`):
- `llm-adapters`: one example at a time, beam search with 4 beams, no sampling, exactly as the
  reference scripts; slow, for comparability checks;
- `fast` (default): batched greedy decoding, prompts sorted by length, left padding with an
  explicit attention mask, stopping once every sequence has produced EOS.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sara_cli.adapters import checkpoint
from sara_cli.model import hub, loading
from sara_cli.training import rundir
from sara_cli.evaluation import tasks
from sara_cli.errors import SaraError
from sara_cli.files import atomic_path, check_apart, check_output_file, check_writable, write_json

PROTOCOLS = ("fast", "llm-adapters")
TEMPLATES = ("llm-adapters", "run", "alpaca", "plain", "chat")  # --template: the prompt's template


@dataclass
class TaskResult:
    task: str
    n: int
    correct: int
    accuracy: float
    seconds: float
    generated_tokens: int
    records: list = field(repr=False, default_factory=list)

    @property
    def examples_per_second(self) -> float:
        return self.n / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


def load_model(reference: str, device: str | None = None, trust_remote_code: bool = False):
    """A merged checkpoint, a run/adapter folder (adapter applied on its base), or a base model.

    `trust_remote_code` (--trust-remote-code) lets a plain checkpoint run its own model code; a
    run's base loads as it was trained (its recorded model.trust_remote_code).

    Returns (model, tokenizer, description, run config or None).
    Raises:
        SaraError: a folder that is neither a checkpoint nor a run.
    """
    import torch

    device = device or loading.device_for_inference()
    path = Path(reference)
    if path.is_dir() and not (path / "config.json").is_file():
        try:
            adapter_dir = checkpoint.find_adapter_dir(path)
        except checkpoint.UnfinishedRun:
            raise
        except SaraError:
            raise SaraError(f"{path} is neither a model checkpoint (no config.json) nor a sara run "
                            "(no adapter/sara_config.json); give a merged model, a run folder or a "
                            "base model") from None
        model, tokenizer, config = checkpoint.load_adapter_model(adapter_dir, device=device)
        if config["method"] != "mosara" and not config["base_model"].get("quantization"):
            # Fold the update into the weights: generation then costs what the base costs.
            # (Mo-SARA routes per token and keeps its branch; a 4-bit/8-bit base keeps it too,
            # as trained: folding it in would round the update into the quantized weight.)
            from sara_cli.adapters.inject import adapter_layers

            for layer in adapter_layers(model).values():
                layer.merge()
        return model, tokenizer, f"{config['method']} adapter {adapter_dir}", config
    model_dir = hub.resolve_model_dir(reference)
    hub.load_config(model_dir)
    hub.tensor_index(model_dir)  # names a missing or damaged weight file before transformers reads it
    dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "auto"
    model, tokenizer, _ = loading.load_checkpoint(reference, dtype, device, trust_remote_code)
    return model, tokenizer, str(reference), None


def _count_generated(sequences, eos_id: int | None) -> list[int]:
    """Generated tokens per row, up to and including the first EOS.

    A row without EOS ran to max_new_tokens (rows are only padded after their EOS).
    """
    rows = sequences.tolist()
    return [row.index(eos_id) + 1 if eos_id in row else len(row) for row in rows]


def generate(model, tokenizer, prompts: list[str], protocol: str, batch_size: int, max_new_tokens: int,
             on_done: Callable[[int], None] | None = None, template: str = "llm-adapters") -> tuple[list[str], int]:
    """Responses for `prompts`, in order: the text after "### Response:", stripped (the
    LLM-Adapters and alpaca prompts), or the generated text up to EOS, stripped (plain, chat).

    Returns (responses, generated token count).
    """
    import torch

    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    special = template != "chat"  # a chat template writes its own special tokens, as in training
    marked = template in ("llm-adapters", "alpaca")
    decoded: list[str | None] = [None] * len(prompts)
    generated = 0
    if protocol == "llm-adapters":
        settings = dict(num_beams=4, do_sample=False)
        groups = [[i] for i in range(len(prompts))]
    else:
        settings = dict(num_beams=1, do_sample=False)
        lengths = [len(tokenizer(p, add_special_tokens=special)["input_ids"]) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # longest first: OOM shows early
        groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    tokenizer.padding_side = "left"
    for group in groups:
        batch = tokenizer([prompts[i] for i in group], return_tensors="pt", padding=True,
                          add_special_tokens=special).to(device)
        with torch.no_grad():
            # Only ids and mask: some tokenizers add token_type_ids, which generate() rejects.
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **settings)
        new = out[:, batch["input_ids"].shape[1]:]  # (B, new tokens)
        generated += sum(_count_generated(new, eos))
        for row, i in enumerate(group):
            text = tokenizer.decode(new[row], skip_special_tokens=True)
            decoded[i] = tasks.extract_response(prompts[i] + text) if marked else text.strip()
        if on_done:
            on_done(len(group))
    return decoded, generated


def evaluate_task(model, tokenizer, task, data_dir: Path | None, protocol: str, batch_size: int,
                  limit: int | None, max_new_tokens: int | None, on_start=None, on_done=None,
                  template: str = "llm-adapters") -> TaskResult:
    """Generate and score one task, prompting with `template` (not "run": resolve it first)."""
    records = tasks.load_records(task, data_dir, limit)
    prompts = [task_prompt(r["instruction"], template, tokenizer) for r in records]
    if on_start:
        on_start(task.name, len(prompts))
    started = time.perf_counter()
    responses, generated = generate(model, tokenizer, prompts, protocol, batch_size,
                                    max_new_tokens or task.max_new_tokens, on_done, template)
    seconds = time.perf_counter() - started
    scored = tasks.score_outputs(task, responses, [r["answer"] for r in records])
    rows = [{"instruction": r["instruction"], "response": resp, "prediction": s["prediction"],
             "answer": r["answer"], "correct": s["correct"]}
            for r, resp, s in zip(records, responses, scored["records"])]
    return TaskResult(task.name, scored["n"], scored["correct"], scored["accuracy"], seconds, generated, rows)


def task_prompt(instruction: str, template: str, tokenizer) -> str:
    """The prompt for one question: LLM-Adapters' evaluation prompt, or a training template's
    generation prompt (alpaca and plain as `sara train` writes them; chat through the tokenizer)."""
    from sara_cli.data.prompts import alpaca_prompt, plain_prompt

    if template == "llm-adapters":
        return tasks.eval_prompt(instruction)
    if template == "alpaca":
        return alpaca_prompt(instruction)
    if template == "plain":
        return plain_prompt(instruction)
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                         add_generation_prompt=True)


def resolve_template(template: str, reference: str) -> str:
    """--template, with `run` read from the run's recipe (or a merged checkpoint's model card),
    before the model loads.

    Raises:
        SaraError: an unknown template, or `run` for a model that records none.
    """
    from sara_cli.evaluation.chat import recorded_template

    if template not in TEMPLATES:
        raise SaraError(f"--template must be one of {', '.join(TEMPLATES)}, got '{template}'")
    if template != "run":
        return template
    config = None
    path = Path(reference)
    if path.is_dir() and not (path / "config.json").is_file():
        config = checkpoint.read_config(checkpoint.find_adapter_dir(path))
    found = recorded_template(reference, config)
    if found is None:
        raise SaraError(f"--template run: {reference} records no training template (it is not a sara run or "
                        "a model sara merged); give --template llm-adapters, alpaca, plain or chat")
    return found


def write_results(out: Path, results: list[TaskResult], protocol: str, model: str, seconds: float,
                  template: str = "llm-adapters") -> dict:
    """<out>/<task>.jsonl per task and <out>/summary.json; returns the summary."""
    for result in results:
        with atomic_path(out / f"{result.task}.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in result.records))
    summary = {
        "model": model, "protocol": protocol, "template": template, "seconds": round(seconds, 3),
        "tasks": {r.task: {"n": r.n, "correct": r.correct, "accuracy": r.accuracy,
                           "seconds": round(r.seconds, 3),
                           "examples_per_second": round(r.examples_per_second, 3),
                           "generated_tokens_per_second": round(r.tokens_per_second, 2)} for r in results},
        "mean_accuracy": sum(r.accuracy for r in results) / len(results) if results else 0.0,
    }
    write_json(out / "summary.json", summary)
    return summary


def mean_loss(model, tokenizer, data: str, config: dict | None, batch_size: int, limit: int | None) -> dict:
    """Mean token loss and perplexity over an instruction dataset, with the training template."""
    import math

    import torch
    from transformers import DataCollatorForSeq2Seq

    from sara_cli.data.dataset import Tokenize, check_records, load_records
    from sara_cli.merging.verify import next_token_loss

    settings = ((config or {}).get("recipe") or {}).get("data") or {}
    template = settings.get("template", "alpaca")
    fmt, tags = settings.get("format", "auto"), settings.get("tags") or {}
    records = load_records(data, limit=limit, columns=settings.get("columns"))
    check_records(records, template, data, fmt, tags)
    # The run's own targets: the same template, truncation and masking as in training.
    train_on_inputs = settings.get("train_on_inputs")
    tokenize = Tokenize(tokenizer, template, settings.get("cutoff_len", 512),
                        template != "chat" if train_on_inputs is None else train_on_inputs,
                        settings.get("loss_on"), fmt, tags,
                        # a run recorded before data.tokenize existed was tokenized jointly
                        joint=settings.get("tokenize", "joint" if config else "split") == "joint")
    features = [tokenize(dict(r)) for r in records]
    tokenizer.padding_side = "right"
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = {k: v.to(device) for k, v in collator(features[start:start + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            loss_sum, count = next_token_loss(logits, batch["labels"])
            total += loss_sum
            tokens += count
    if tokens == 0:
        raise SaraError(f"{data}: no tokens to score after truncation; check the data")
    loss = total / tokens
    return {"data": data, "records": len(records), "tokens": tokens, "loss": loss, "perplexity": math.exp(loss)}


def check_options(protocol: str, batch_size: int, limit: int | None, max_new_tokens: int | None) -> None:
    """Reject a bad `sara eval` option before anything loads.

    Raises:
        SaraError: an unknown protocol, or a batch size, limit or token budget below 1.
    """
    if protocol not in PROTOCOLS:
        raise SaraError(f"--protocol must be fast or llm-adapters, got '{protocol}'")
    if batch_size < 1:
        raise SaraError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise SaraError(f"--limit must be at least 1, got {limit}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise SaraError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")


# -- the modes of `sara eval` ----------------------------------------------------------------------

MODES = ("benchmarks", "loss", "score", "harness")


def choose_mode(model: str | None, task: str | None, score: Path | None, harness: str | None,
                data: str | None, protocol: str = "fast", json_path: Path | None = None) -> str:
    """Which mode the options ask for, checked before anything loads.

    Raises:
        SaraError: options from two modes, or a mode without what it needs.
    """
    mode = _mode(model, task, score, harness, data)
    if protocol != "fast" and mode != "benchmarks":
        raise SaraError(f"--protocol chooses how --task benchmarks generate; it does not apply to {mode} mode")
    if json_path is not None and mode not in ("score", "loss"):
        raise SaraError("--json goes with --score or --task loss; benchmark and harness results are "
                        "written to their results folder (--out)")
    return mode


def _mode(model: str | None, task: str | None, score: Path | None, harness: str | None, data: str | None) -> str:
    if score is not None:
        if harness is not None or model is not None:
            raise SaraError("--score rescores a predictions file without a model; drop MODEL and --harness")
        if task is None:
            raise SaraError("--score needs --task NAME (the rules to score the file with)")
        return "score"
    if model is None:
        raise SaraError("give a MODEL (merged checkpoint, run folder or base model), or --score FILE")
    if harness is not None:
        if task is not None or data is not None:
            raise SaraError("--harness runs lm-evaluation-harness tasks; drop --task and --data "
                            "(sara's bundled tests are the harness tasks sara_<task>)")
        return "harness"
    if task is None:
        raise SaraError("give --task TASKS (e.g. svamp,boolq), --task loss --data FILE, or --harness TASKS")
    if task == "loss":
        if data is None:
            raise SaraError("--task loss needs --data FILE (instruction records)")
        return "loss"
    if data is not None:
        raise SaraError("--data goes with --task loss; for benchmarks name tasks or test files in --task")
    return "benchmarks"


def results_folder(model: str, mode: str, out: Path | None = None) -> Path:
    """Where a mode writes: --out when given; else inside the run for a run folder or its adapter/
    (RUN/eval/<mode>; RUN/eval/checkpoint-N-<mode> for a checkpoint); else
    eval-results/<name>-<mode> in the current folder, `<name>` being MODEL's last part."""
    if out is not None:
        return Path(out)
    found = rundir.run_of(Path(model))
    if found is not None:
        run, inside = found
        return run / "eval" / (f"{inside}-{mode}" if inside else mode)
    return Path("eval-results") / f"{file_name(Path(model).name or 'model')}-{mode}"


def file_name(text: str) -> str:
    """`text` with characters other than letters, digits, `.`, `_` and `-` replaced by `-`."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)


def check_targets(out: Path | None, json_path: Path | None, inputs: list | None = None) -> None:
    """Fail before any work when --out or --json cannot be written, lies inside a run's adapter
    or checkpoint folder, or would overwrite one of `inputs` (`eval_inputs`).

    Raises:
        SaraError: naming the flag and the path.
    """
    check_apart([("--out", out), ("--json", json_path)], inputs or [], "eval")
    if out is not None:
        check_writable(out, "--out")
        rundir.check_outside_managed(out, "--out")
    if json_path is not None:
        check_output_file(json_path, "--json")


def eval_inputs(model: str | None, task: str | None, score: Path | None, data: str | None,
                data_dir: Path | None, mode: str) -> list[tuple[str, Path]]:
    """(label, path) of every local file or folder eval reads in `mode`: the model (a run's
    adapter and base), the predictions file, the records, the test sets."""
    from sara_cli.model.builtin import is_builtin

    inputs: list[tuple[str, Path]] = []
    if score is not None:
        inputs.append(("the predictions file", Path(score)))
    if data is not None and not is_builtin(data) and Path(data).expanduser().exists():
        inputs.append(("the data file", Path(data)))
    if mode == "benchmarks":
        for task_ in tasks.resolve_tasks(task):
            inputs.append((f"the {task_.name} test set", tasks.records_path(task_, data_dir)))
    if model is not None:
        inputs += model_inputs(model)
    return inputs


def model_inputs(reference: str) -> list[tuple[str, Path]]:
    """(label, path) of a local model reference: a run's adapter and its recorded base, or the
    checkpoint folder itself. A built-in or hub id lives in a cache no flag writes to."""
    path = Path(reference).expanduser()
    if not path.is_dir():
        return []
    try:
        adapter_dir = checkpoint.find_adapter_dir(path)
    except SaraError:
        return [("the model", path)]
    inputs = [("the adapter", adapter_dir)]
    try:
        base = checkpoint.read_config(adapter_dir)["base_model"].get("path")
    except SaraError:  # named when the model loads
        base = None
    if base:
        inputs.append(("the run's base model", Path(base)))
    return inputs


@dataclass
class Benchmarks:
    """What `benchmarks` wrote to `out`: the per-task results and summary.json's content."""

    out: Path
    results: list[TaskResult]
    summary: dict


def benchmarks(model: str, task_spec: str, data_dir: Path | None, protocol: str, batch_size: int,
               limit: int | None, max_new_tokens: int | None, out: Path | None = None,
               on_start=None, on_done=None, trust_remote_code: bool = False,
               template: str = "llm-adapters") -> Benchmarks:
    """Generate and score every task in `task_spec`; write <out>/<task>.jsonl and summary.json.

    Args:
        out: results folder; None: `results_folder(model, protocol)`.
        template: the prompt (TEMPLATES): LLM-Adapters' evaluation prompt, the run's own
            training template (`run`), or a named training template.

    Raises:
        SaraError: a bad option, task, data file or output folder, each before the model loads.
    """
    check_options(protocol, batch_size, limit, max_new_tokens)
    template = resolve_template(template, model)
    chosen = tasks.resolve_tasks(task_spec)
    for task in chosen:  # fail on missing data before loading a model
        tasks.load_records(task, data_dir, 1)
    out = results_folder(model, protocol, out)
    check_writable(out, "the results folder")
    started = time.perf_counter()
    loaded, tokenizer, description, _ = load_model(model, trust_remote_code=trust_remote_code)
    if template == "chat" and not tokenizer.chat_template:
        raise SaraError("--template chat needs a tokenizer with a chat template; this one has none. "
                        "Use --template llm-adapters, alpaca or plain")
    results = [evaluate_task(loaded, tokenizer, task, data_dir, protocol, batch_size, limit, max_new_tokens,
                             on_start, on_done, template) for task in chosen]
    summary = write_results(out, results, protocol, description, time.perf_counter() - started, template)
    return Benchmarks(out, results, summary)


def data_name(data: str) -> str:
    """A records reference as a file name: a file's stem, a builtin's or hub id's last part."""
    return file_name(Path(data.split(":", 1)[-1]).stem) or "data"


def loss(model: str, data: str, batch_size: int, limit: int | None,
         json_path: Path | None = None, trust_remote_code: bool = False) -> tuple[str, dict, Path | None]:
    """`--task loss`: (what was loaded, `mean_loss`'s figures, the JSON written or None).

    The JSON goes to `json_path`; without it, a run's result is kept in the run
    (RUN/eval/loss/<data name>.json, as `results_folder` places every mode), and any other
    model's is only printed.

    Raises:
        SaraError: a bad option, a missing data file or an unwritable target (before the model
            loads), or bad records.
    """
    from sara_cli.data.dataset import check_data_reference

    check_options("fast", batch_size, limit, None)
    check_data_reference(data)
    if json_path is None and rundir.run_of(Path(model)) is not None:
        json_path = results_folder(model, "loss") / f"{data_name(data)}.json"
        check_output_file(json_path, "the loss result")
    loaded, tokenizer, description, config = load_model(model, trust_remote_code=trust_remote_code)
    result = mean_loss(loaded, tokenizer, data, config, batch_size, limit)
    if json_path is not None:
        write_json(json_path, result)
    return description, result, json_path


def score_file(predictions: Path, task_spec: str, json_path: Path | None = None) -> tuple[str, dict]:
    """`--score`: (task name, `tasks.score_predictions`'s result); also written to `json_path`.

    Raises:
        SaraError: not exactly one task, or a bad predictions file.
    """
    chosen = tasks.resolve_tasks(task_spec)
    if len(chosen) != 1:
        raise SaraError("--score takes exactly one --task (the rules to score the file with)")
    result = tasks.score_predictions(predictions, chosen[0])
    if json_path is not None:
        write_json(json_path, result)
    return chosen[0].name, result
