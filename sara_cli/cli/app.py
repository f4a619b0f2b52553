"""The `sara` command line: one thin function per command; the work happens in the core modules.

Heavy libraries (torch, transformers) are imported inside the commands so `sara --help` is fast.
A `SaraError` becomes a one-line message and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from sara_cli import __version__
from sara_cli.errors import SaraError

app = typer.Typer(
    name="sara",
    help="Fine-tune Hugging Face causal LMs with SVD-based adapters (SARA, Mo-SARA, LoRA, PiSSA, SORSA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True)
DEBUG = {"on": False, "argv": False}


def command(func=None, *, name: str | None = None):
    """Register a command whose SaraError (and any crash) becomes one line and an exit code."""
    if func is None:
        return functools.partial(command, name=name)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except SaraError as exc:
            if DEBUG["on"]:
                raise
            label = getattr(exc, "label", "error")
            if label == "error" or os.environ.get("RANK", "0") == "0":  # a clean stop: say it once
                colour = "red" if label == "error" else "yellow"
                # The message is text, not markup: "[harness]" or a path with brackets stays as written.
                err_console.print(f"[bold {colour}]{label}:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            if DEBUG["on"]:
                raise
            from sara_cli.files import no_space

            full = no_space(exc)  # eval's results, analyze's JSON, anything else written
            if full is not None:
                err_console.print(f"[bold red]error:[/] {escape(str(full))}", highlight=False, soft_wrap=True)
                raise typer.Exit(full.exit_code) from None
            err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {escape(str(exc))} "
                              "(rerun with --debug for the traceback)", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return app.command(name=name)(wrapper)


def _quiet_libraries() -> None:
    """Our progress bars replace the libraries' tqdm bars and info logs (set before they import)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # bitsandbytes logs a missing optional CPU kernel at import and warns on every int8 matmul
    # that casts its input; neither is actionable.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # On CPUs with AVX512-BF16, importing bitsandbytes asks the `kernels` hub loader for an optional
    # kernel; offline, that loader warns that it skips the publisher check. Nothing is loaded.
    logging.getLogger("kernels").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    # Libraries imported before this point read those variables already; tell them directly.
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


def _version(value: bool) -> None:
    if value:
        console.print(f"sara {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Fine-tune Hugging Face causal LMs with SVD-based adapters."""
    DEBUG["on"] = debug or DEBUG["argv"]


def main() -> None:
    """Console-script entry point. `--debug` is accepted anywhere on the line."""
    args = sys.argv[1:]
    if "--debug" in args:
        DEBUG["argv"] = True
        args = [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name="sara")
    finally:
        DEBUG["argv"] = False
        _close_process_group()


def _close_process_group() -> None:
    """Close a torchrun process group before exit: gloo can abort (SIGABRT) a process that
    exits with its group still open, turning a finished run's exit code into a failure."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # the run's own outcome matters more than a clean teardown
            pass


# -- analyze -------------------------------------------------------------------------------------

@command
def analyze(
    model: str = typer.Argument(..., help="Checkpoint folder, builtin:NAME or hub id."),
    tau: list[float] = typer.Option([], "--tau", help="Share of the singular-value sum; repeat for several. Default 0.5."),
    targets: str = typer.Option("q_proj,v_proj", "--targets", help="Module suffixes, comma-separated, or all-linear."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    experts: int = typer.Option(5, "--experts", help="Mo-SARA experts m for the parameter estimate."),
    match_lora_rank: Optional[int] = typer.Option(None, "--match-lora-rank", help="Print the tau whose SARA size matches LoRA rank R."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the per-matrix results as JSON."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of mean k per layer."),
) -> None:
    """Per-layer SARA rank k from each weight's own singular values."""
    from sara_cli.analysis import analyze as core
    from sara_cli.cli.views import analysis_report, matrix_progress
    from sara_cli.adapters.inject import parse_targets

    if experts < 1:
        raise SaraError(f"--experts must be at least 1, got {experts}")
    if match_lora_rank is not None and match_lora_rank < 1:
        raise SaraError(f"--match-lora-rank must be at least 1, got {match_lora_rank}")
    core.check_outputs(model, json_path, plot_path)  # before the spectra, which can take minutes
    taus = tau or [0.5]
    with matrix_progress(console) as (on_start, on_matrix):
        result = core.analyze(model, taus, parse_targets(targets), device, on_start, on_matrix)
    analysis_report(console, result, experts, match_lora_rank)
    if json_path is not None:
        from sara_cli.files import write_json

        write_json(json_path, result.to_json())
        console.print(f"wrote {json_path}", markup=False)
    if plot_path is not None:
        core.plot(result, plot_path)
        console.print(f"wrote {plot_path}", markup=False)


# -- train ---------------------------------------------------------------------------------------

@command
def train(
    recipe: Path = typer.Argument(..., help="YAML recipe (see recipes/)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="section.key=value overrides, e.g. adapter.tau=0.02."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, build the model and adapters, print, and exit."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the newest checkpoint in output_dir."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over even if output_dir holds a run."),
) -> None:
    """Train adapters from a recipe."""
    from sara_cli.recipe import check_report_to, load_recipe

    # Every recipe error is reported before torch and transformers are imported (seconds).
    parsed = load_recipe(recipe, overrides or [])
    check_report_to(parsed.train.report_to)
    import yaml

    from sara_cli.cli.views import TrainReporter
    from sara_cli.training.train import train as run_training

    if dry_run:
        console.print(yaml.safe_dump(parsed.resolved(), sort_keys=False).rstrip(), highlight=False)
    summary = run_training(parsed, resume=resume, overwrite=overwrite, dry_run=dry_run,
                           reporter=TrainReporter(console))
    if dry_run:
        console.print("dry run: recipe valid, model and adapters built; nothing trained")
        return
    if summary.get("adapter_bytes"):
        console.print(f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} over "
                      f"{summary['steps']} steps" if summary["first_loss"] is not None else
                      f"{summary['steps']} steps")
        console.print(f"adapter: {summary['adapter_dir']} ({summary['adapter_bytes'] / 1e6:.2f} MB)")


# -- compare -------------------------------------------------------------------------------------

@command
def compare(
    recipe: Path = typer.Argument(..., help="YAML recipe: the base every method shares (see recipes/)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="section.key=value overrides of the base recipe."),
    methods: str = typer.Option(..., "--methods", help="Arms, comma-separated: method[:key=value...], e.g. lora,sara,sara:tau=0.01."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Seeds, comma-separated; every arm runs each."),
    budget: str = typer.Option("none", "--budget", help="lora-rank=R, params=N, or none (the recipe's sizes)."),
    lr: Optional[str] = typer.Option(None, "--lr", help="A rate per method, e.g. lora=3e-4,sara=3e-3; default the recipe's."),
    lr_grid: Optional[str] = typer.Option(None, "--lr-grid", help="Rates per method chosen on seed 0, e.g. lora=1e-4:3e-4,sara=1e-3:3e-3."),
    holdout: Optional[int] = typer.Option(None, "--holdout", help="Held-out records carved from the training data (default 200); data.eval_file replaces them."),
    task: Optional[str] = typer.Option(None, "--task", help="Also score accuracy on eval tasks, e.g. mawps,svamp."),
    limit: Optional[int] = typer.Option(None, "--limit", help="With --task: first N examples of each task."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="With --task: the generation cap; default 256 math, 32 commonsense."),
    out: Optional[Path] = typer.Option(None, "--out", help="Comparison folder; default runs/compare-<recipe name>."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="Where the run folders go; default OUT/runs."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (variants, parameter counts, taus) and exit."),
    plan: bool = typer.Option(False, "--plan", help="Write each variant's recipe and print it as a sara train command."),
    report_only: bool = typer.Option(False, "--report-only", help="Score finished runs and write the report; train nothing."),
) -> None:
    """Budget-matched, paired comparison of adapter methods: one run per method, seed and rate."""
    from sara_cli.comparison import plan as planning
    from sara_cli.recipe import load_recipe

    if sum((dry_run, plan, report_only)) > 1:
        raise SaraError("give at most one of --dry-run, --plan and --report-only")
    arms = planning.parse_arms(methods)
    seed_list = planning.parse_seeds(seeds)
    parsed_budget = planning.parse_budget(budget)
    rates, grids = planning.parse_rates(lr, lr_grid, arms)
    base = load_recipe(recipe, overrides or [])
    from sara_cli.comparison import run as core

    comparison = core.setup(base, arms, seed_list, parsed_budget, rates, grids, holdout, task, limit,
                            out or Path("runs") / f"compare-{recipe.stem}", runs_dir, max_new_tokens)
    mode = "dry-run" if dry_run else "plan" if plan else "report-only" if report_only else "run"
    from sara_cli.cli.views import CompareProgress, compare_plan, compare_table, matrix_progress

    with matrix_progress(console) as (on_start, on_matrix):
        core.size_arms(comparison, on_start, on_matrix)
    from sara_cli.comparison.compare import execute

    if mode in ("dry-run", "plan"):
        outcome = execute(comparison, mode)
        compare_plan(console, comparison, outcome)
        for line in outcome.commands:
            console.print(line, highlight=False, markup=False, soft_wrap=True)
        if mode == "plan":
            console.print(f"then: sara compare ... --report-only --out {comparison.out} collects the runs",
                          highlight=False, markup=False)
        return
    with CompareProgress(console) as progress:
        outcome = execute(comparison, mode, progress)
    compare_table(console, outcome.summary)
    console.print(f"wrote {comparison.out}/compare.md, compare.json, compare.png", highlight=False, markup=False)


# -- merge ---------------------------------------------------------------------------------------

@command
def merge(
    path: Path = typer.Argument(..., help="Training output folder or adapter folder."),
    out: Path = typer.Option(..., "--out", help="Folder to write (must not exist unless --overwrite)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model; default: the one recorded in the adapter."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the base's), bfloat16, float16 or float32."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare merged and adapter logits."),
    routing: str = typer.Option("refuse", "--routing", help="Mo-SARA: refuse, or mean (average gates)."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="Mo-SARA --routing mean: records to average the gates over."),
    fmt: str = typer.Option("hf", "--format", help="hf (merged checkpoint) or peft-lora (LoRA adapter)."),
    force: bool = typer.Option(False, "--force", help="Merge even if --base does not match the recorded base."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out (only once the new one is complete)."),
    max_rank: Optional[int] = typer.Option(None, "--max-rank", help="peft-lora: truncate modules above rank N by SVD (vLLM serves up to 512)."),
) -> None:
    """Fold a trained adapter into its base: a plain Hugging Face checkpoint (or a PEFT LoRA adapter), verified."""
    from sara_cli.cli.views import merge_report
    from sara_cli.merging.merge import merge as run_merge

    with console.status("merging"):
        report = run_merge(path, out, base=base, dtype=dtype, max_shard_size=max_shard_size, verify=verify,
                           routing=routing, calibration=calibration, fmt=fmt, force=force, overwrite=overwrite,
                           max_rank=max_rank)
    merge_report(console, report)


# -- eval ----------------------------------------------------------------------------------------

@command(name="eval")
def eval_command(
    model: Optional[str] = typer.Argument(None, help="Merged checkpoint, run/adapter folder, or base model."),
    task: Optional[str] = typer.Option(None, "--task", help="Tasks, comma-separated (e.g. svamp,boolq), a test file, or loss."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with <Dataset>/test.json; default: bundled copies."),
    protocol: str = typer.Option("fast", "--protocol", help="fast (batched greedy) or llm-adapters (4-beam, one by one)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per generate call (fast protocol), records per forward pass."),
    limit: Optional[int] = typer.Option(None, "--limit", help="First N examples of each task."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results folder; default RUN/eval/<mode> for a run, else eval-results/<model>-<mode>."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Default: 256 math, 32 commonsense."),
    template: str = typer.Option("llm-adapters", "--template", help="The prompt: llm-adapters (LLM-Adapters' evaluation prompt), run (the run's own training template), alpaca, plain or chat."),
    score: Optional[Path] = typer.Option(None, "--score", help="Score an existing predictions file (output + answer) without a model."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="With --score or --task loss: write the summary here."),
    data: Optional[str] = typer.Option(None, "--data", help="With --task loss: instruction records to score."),
    harness: Optional[str] = typer.Option(None, "--harness", help="lm-evaluation-harness tasks, comma-separated (sara_svamp, sara_boolq_mc, ...)."),
    harness_args: list[str] = typer.Option([], "--harness-args", help="KEY=VALUE for lm_eval.simple_evaluate (num_fewshot=5, apply_chat_template=true); repeat."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run a model folder's own Python code (auto_map); only for code you trust."),
) -> None:
    """Benchmark accuracy with the LLM-Adapters protocol, mean loss, or lm-evaluation-harness tasks."""
    from sara_cli.evaluation import evaluate

    mode = evaluate.choose_mode(model, task, score, harness, data, protocol, json_path)
    evaluate.check_targets(out, json_path, evaluate.eval_inputs(model, task, score, data, data_dir, mode))
    if mode == "score":
        name, result = evaluate.score_file(score, task, json_path)
        console.print(f"{name}: {result['correct']}/{result['n']} correct, accuracy "
                      f"{result['accuracy']:.4f}", highlight=False)
    elif mode == "loss":
        description, result, json_path = evaluate.loss(model, data, batch_size, limit, json_path, trust_remote_code)
        console.print(f"{description}: mean token loss {result['loss']:.4f}, perplexity "
                      f"{result['perplexity']:.3f} over {result['tokens']:,d} tokens", highlight=False)
    elif mode == "harness":
        from sara_cli.evaluation import harness as bridge

        report = bridge.run(model, harness, harness_args, data_dir, batch_size, limit, out, max_new_tokens,
                            trust_remote_code)
        console.print(report.table, highlight=False, markup=False)
        console.print(f"wrote {report.results_path} and {len(report.sample_paths)} samples file(s)",
                      highlight=False, markup=False)
    else:
        from sara_cli.cli.views import eval_progress, eval_table

        with eval_progress(console) as (on_start, on_done):
            run = evaluate.benchmarks(model, task, data_dir, protocol, batch_size, limit, max_new_tokens, out,
                                      on_start, on_done, trust_remote_code, template)
        eval_table(console, run.results, run.summary, protocol)
        console.print(f"wrote {run.out}/summary.json and one <task>.jsonl per task", highlight=False,
                      markup=False)
    if json_path is not None and mode in ("score", "loss"):
        console.print(f"wrote {json_path}", highlight=False, markup=False)


# -- chat ----------------------------------------------------------------------------------------

@command
def chat(
    model: str = typer.Argument(..., help="Run or adapter folder, merged checkpoint, or base model."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Answer this once and exit (for scripts)."),
    template: Optional[str] = typer.Option(None, "--template", help="alpaca, plain or chat; default: the run's own."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest answer, in tokens."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 greedy, above 0 samples; default: the model's generation_config."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling share; default: the model's generation_config."),
    system: Optional[str] = typer.Option(None, "--system", help="System message (chat template only)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run a model folder's own Python code (auto_map); only for code you trust."),
) -> None:
    """Talk to a model with its run's template, tokens streamed; Ctrl-C stops an answer, Ctrl-D leaves."""
    from sara_cli.evaluation.chat import generation_settings, open_session

    settings = generation_settings(max_new_tokens, temperature, top_p)
    with err_console.status("loading"):
        session, description = open_session(model, template, settings, system, trust_remote_code)
    if prompt is not None:
        _stream_answer(session, prompt)
        return
    err_console.print(f"chat with {description}; Ctrl-C stops an answer, /reset forgets the conversation, "
                      "Ctrl-D or /exit leaves", highlight=False, soft_wrap=True)
    while True:
        try:
            message = console.input("[bold]>[/] ")
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print("  (Ctrl-D leaves)")
            continue
        command = message.strip()
        if command in ("/exit", "/quit"):
            return
        if command in ("/reset", "/clear"):
            session.reset()
            err_console.print("(conversation forgotten)", highlight=False)
        elif command:
            _stream_answer(session, message)


def _stream_answer(session, message: str) -> None:
    answer = ""
    try:
        for piece in session.reply(message):
            answer += piece
            console.out(piece, end="", highlight=False)
    except KeyboardInterrupt:
        console.out(" [stopped]", end="", highlight=False)
    console.out("")
    if not answer.strip():
        err_console.print(f"(the model produced no visible text: {session.generated_tokens} token(s) generated, "
                          "all whitespace or special tokens)", highlight=False)
    if session.dropped_turns:
        err_console.print(f"(the {session.dropped_turns} oldest exchange(s) were left out to fit the model's "
                          f"{session.context_length()}-token context)", highlight=False)


# -- route-map -----------------------------------------------------------------------------------

@command(name="route-map")
def route_map(
    path: Path = typer.Argument(..., help="Mo-SARA training output folder or adapter folder."),
    task: Optional[str] = typer.Option(None, "--task", help="Tasks, comma-separated (eval task names)."),
    data: Optional[str] = typer.Option(None, "--data", help="Instruction records instead of tasks."),
    limit: Optional[int] = typer.Option(None, "--limit", help="First N examples per task."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with <Dataset>/test.json; default: bundled copies."),
    modules: Optional[str] = typer.Option(None, "--modules", help="Module types to map, e.g. q_proj,v_proj; default all."),
    tokens: str = typer.Option("prompt", "--tokens", help="prompt (first forward pass, as the paper) or all."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for route-map.png/.json/.csv; default RUN/route-map."),
) -> None:
    """Mo-SARA routing heatmaps: mean gate per layer and expert, per task."""
    from sara_cli.cli.views import route_map_view
    from sara_cli.analysis.routing import output_folder, route_map as compute, route_map_inputs, write_outputs

    out = output_folder(path, out, route_map_inputs(path, task, data, data_dir))  # before any work
    with console.status("routing"):
        result = compute(path, task, data, limit, data_dir,
                         [m.strip() for m in modules.split(",")] if modules else None, tokens)
        write_outputs(result, out)
    route_map_view(console, result)
    console.print(f"wrote {out}/route-map.png, route-map.json, route-map.csv", highlight=False, markup=False)
