"""Rich tables and progress bars for the CLI. Only cli.py calls these; the core never prints."""

from __future__ import annotations

import os
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


@contextmanager
def matrix_progress(console: Console):
    """A progress bar over matrices; yields (on_start(total), on_matrix(result)) callbacks."""
    progress = Progress(TextColumn("[bold]spectra"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.description}"), TimeElapsedColumn(),
                        console=console, transient=True)
    task = {}

    def on_start(total: int) -> None:
        task["id"] = progress.add_task("", total=total)

    def on_matrix(result) -> None:
        progress.update(task["id"], advance=1, description=result.name)

    with progress:
        yield on_start, on_matrix


def _count(n: int, total: int) -> str:
    return f"{n:,d} ({100 * n / max(total, 1):.4f}%)"


def analysis_report(console: Console, result, experts: int, match_lora_rank: int | None) -> None:
    from sara_cli.analysis.analyze import match_lora_rank as match, mosara_params, sara_params

    taus = result.taus
    table = Table(title=f"SARA rank k per matrix: {result.model}", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("module")
    table.add_column("shape (out, in)")
    for tau in taus:
        table.add_column(f"k @ tau={tau:g}", justify="right")
    for m in result.matrices:
        table.add_row("-" if m.layer is None else str(m.layer), m.module,
                      f"{m.shape[0]} x {m.shape[1]}", *[str(k) for k in m.k])
    console.print(table)

    summary = Table(title="Summary", title_justify="left")
    summary.add_column("tau", justify="right")
    for module in sorted({m.module for m in result.matrices}):
        summary.add_column(f"mean k {module}", justify="right")
    summary.add_column("SARA params", justify="right")
    summary.add_column(f"Mo-SARA params (m={experts})", justify="right")
    modules = sorted({m.module for m in result.matrices})
    for i, tau in enumerate(taus):
        means = []
        for module in modules:
            ks = [m.k[i] for m in result.matrices if m.module == module]
            means.append(f"{sum(ks) / len(ks):.1f}")
        summary.add_row(f"{tau:g}", *means, _count(sara_params(result.matrices, i), result.total_params),
                        _count(mosara_params(result.matrices, i, experts), result.total_params))
    console.print(summary)
    if result.left_out and result.targets == ["all-linear"]:
        console.print(f"left out (not linear layers; sara adapts nn.Linear layers only, as train does): "
                      f"{'; '.join(result.left_out)}", highlight=False, markup=False)
    if match_lora_rank is not None:
        tau, sara, lora = match(result.matrices, match_lora_rank)
        console.print(f"tau {tau} gives SARA {sara:,d} trainable parameters, closest to "
                      f"LoRA rank {match_lora_rank}'s {lora:,d} on these targets")
    console.print(f"{len(result.matrices)} matrices, model {result.total_params:,d} parameters, "
                  f"{result.seconds:.2f} s")


class TrainReporter:
    """What `sara train` shows: notices, the adapter table, the parameter line, live progress."""

    def __init__(self, console: Console):
        self.console = console

    def notice(self, message: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]notice:[/] {escape(message)}", highlight=False)

    def built(self, recipe, model, layers, meta: dict | None = None) -> None:
        from sara_cli.model import quantize
        from sara_cli.adapters.inject import parameter_line
        from sara_cli.names import by_layer
        from sara_cli.adapters.inject import base_memory_bytes

        if int(os.environ.get("RANK", "0")) != 0:
            return
        rank_name = "k" if recipe.adapter.method in ("sara", "mosara") else "r"
        columns, rows = by_layer(list(layers))
        table = Table(title=f"{recipe.adapter.method} adapters: {rank_name} per module", title_justify="left")
        table.add_column("layer", justify="right")
        for column in columns:
            table.add_column(column, justify="right")
        for layer, modules in rows.items():
            table.add_row(layer, *[str(layers[modules[c]].rank()) if c in modules else "-" for c in columns])
        self.console.print(table)
        self.console.print(parameter_line(model))
        compute = ((meta or {}).get("base_model") or {}).get("compute_dtype", "float32")
        self.console.print(f"base memory as loaded: {base_memory_bytes(model) / 2**20:,.1f} MiB "
                           f"({quantize.describe(recipe.model, compute)})", highlight=False)
        errors = (meta or {}).get("quantization_error")
        if errors:
            weight = sum(e["weight"] for e in errors.values()) / len(errors)
            residual = sum(e["residual"] for e in errors.values()) / len(errors)
            self.console.print(f"quantization error (relative, mean over {len(errors)} modules): "
                               f"{residual:.4f} with the residual quantized, {weight:.4f} for W itself",
                               highlight=False)

    def data(self, stats: dict, data_cfg) -> None:
        """One line per split: records, tokens, truncation, target share; the mix; packing."""
        for split, s in stats.items():
            line = (f"data ({split}): {s.records:,d} records, {s.tokens:,d} tokens, "
                    f"{s.truncated / max(s.records, 1):.1%} of records truncated at cutoff_len {data_cfg.cutoff_len}, "
                    f"{s.targets / max(s.tokens, 1):.1%} of tokens are targets")
            if s.packs is not None:
                line += (f"; packed into {s.packs:,d} sequences, "
                         f"{s.tokens / max(s.packs * data_cfg.cutoff_len, 1):.1%} full")
            self.console.print(line, highlight=False, markup=False)
            if len(s.files) > 1:
                mix = ", ".join(f"{name} {count:,d}" for name, count in s.files.items())
                self.console.print(f"  mix ({split}): {mix}", highlight=False, markup=False)

    def progress_callback(self):
        return rich_progress_callback(self.console)


def rich_progress_callback(console: Console):
    """A TrainerCallback drawing a rich progress bar: loss, learning rate, tokens/s, ETA.

    The class is made here, not at import, so importing this module stays free of transformers.
    """
    import time

    from rich.progress import TimeRemainingColumn
    from transformers import TrainerCallback

    class RichProgressCallback(TrainerCallback):
        def __init__(self):
            self.progress = None
            self.stats = {}

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                     console=console)
            self.task = self.progress.add_task("", total=state.max_steps, completed=state.global_step,
                                               stats="")
            self.started = time.perf_counter()
            self.tokens_at_start = state.num_input_tokens_seen or 0
            self.progress.start()

        def _stats(self, state) -> str:
            parts = []
            if "loss" in self.stats:
                parts.append(f"loss {self.stats['loss']:.4f}")
            if "learning_rate" in self.stats:
                parts.append(f"lr {self.stats['learning_rate']:.2e}")
            elapsed = time.perf_counter() - self.started
            tokens = (state.num_input_tokens_seen or 0) - self.tokens_at_start
            if elapsed > 0 and tokens:
                parts.append(f"{tokens / elapsed:,.0f} tok/s")
            return "  ".join(parts)

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step, stats=self._stats(state))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.progress is None or not logs:
                return
            self.stats.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in logs.items() if k in SHOWN_LOGS)
            if shown:
                self.progress.console.print(f"step {state.global_step}/{state.max_steps}  {shown}",
                                            highlight=False)
            self.progress.update(self.task, stats=self._stats(state))

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)
                self.progress.stop()
                self.progress = None

    return RichProgressCallback()


SHOWN_LOGS = ("loss", "eval_loss", "learning_rate", "grad_norm", "train_loss", "train_runtime")


def merge_report(console: Console, report) -> None:
    v = report.verification
    what = (f"exported {report.tensors_merged} modules ({report.method}) as a PEFT LoRA adapter to {report.out}"
            if report.format == "peft-lora" else
            f"merged {report.tensors_merged} tensors ({report.method}) into {report.out} "
            f"[{report.shards} shard{'s' if report.shards != 1 else ''}]")
    console.print(f"{what} in {report.seconds:.1f} s, peak host memory {report.peak_memory_mb:,.0f} MB",
                  highlight=False, markup=False)
    if report.export:
        export_report(console, report.export)
    if not v:
        return
    label = f"{v['dtype']}, exported LoRA vs adapter" if report.format == "peft-lora" else v["dtype"]
    line = (f"verification ({label}): max |logit diff| {v['max_abs_logit_diff']:.3g}, "
            f"greedy agreement {v['greedy_agreement']:.2%} over {v['tokens']} tokens")
    if "calibration_loss_change" in v:
        line += (f"; calibration loss routed {v['calibration_loss_routed']:.4f} -> merged "
                 f"{v['calibration_loss_merged']:.4f} ({v['calibration_loss_change']:+.4f})"
                 " [mean routing: an approximation]")
    elif v.get("passed"):
        from sara_cli.merging.verify import FLOOR_MULTIPLE, HALF_PRECISION_TOLERANCE

        if v.get("noise_floor") is not None:
            line += f", limit {v['tolerance']:.3g} ({FLOOR_MULTIPLE:g} x noise floor {v['noise_floor']:.3g})"
        elif v.get("tolerance") is not None:
            line += f", limit {v['tolerance']:.3g} ({HALF_PRECISION_TOLERANCE:.0%} of the logit spread)"
        line += " [passed]"
    elif v.get("exact") is False:
        line += " [an approximation: reported, not judged]"
    console.print(line, highlight=False, markup=False)
    trained = v.get("as_trained")
    if trained:  # a run on a 4-bit/8-bit base: the merge is checked on the full-precision base
        console.print(f"as trained on the {trained['quantization']} base: max |logit diff| "
                      f"{trained['max_abs_logit_diff']:.3g} from the merged model, greedy agreement "
                      f"{trained['greedy_agreement']:.2%}, loss {trained['loss_adapter']:.4f} -> "
                      f"{trained['loss_merged']:.4f} (the quantization's share, not a merge error)",
                      highlight=False, markup=False)


def export_report(console: Console, summary: dict, shown: int = 8) -> None:
    """Ranks, the vLLM --max-lora-rank that serves the export, and the truncated modules."""
    rank, vllm = summary["rank"], summary["vllm_max_lora_rank"]
    console.print(f"ranks {summary['min_rank']}..{rank}, top-level r = lora_alpha = {rank}; " +
                  (f"serve with vLLM --max-lora-rank {vllm}" if vllm else "no vLLM --max-lora-rank serves it"),
                  highlight=False, markup=False)
    if vllm is None:
        console.print(f"[yellow]warning:[/] the largest rank, {rank}, exceeds vLLM's largest --max-lora-rank "
                      "(512); pass --max-rank 512 to truncate, or serve the merged checkpoint (--format hf)",
                      highlight=False)
    truncated = summary["truncated"]
    if not truncated:
        return
    table = Table(title=f"truncated to --max-rank {summary['max_rank']}: {len(truncated)} modules "
                        "(lowest kept energy first)", title_justify="left")
    for column in ("module", "rank", "exported", "kept energy"):
        table.add_column(column, justify="left" if column == "module" else "right")
    worst = sorted(truncated.items(), key=lambda item: item[1]["kept_energy"])
    for name, m in worst[:shown]:
        table.add_row(name, str(m["rank"]), str(m["exported_rank"]), f"{m['kept_energy']:.4%}")
    if len(worst) > shown:
        table.add_row(f"... {len(worst) - shown} more in README.md", "", "", "")
    console.print(table)


@contextmanager
def eval_progress(console: Console):
    """A progress bar per task; yields (on_start(task, total), on_done(n)) callbacks."""
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True)
    current = {}

    def on_start(name: str, total: int) -> None:
        current["id"] = progress.add_task(name, total=total)

    def on_done(n: int) -> None:
        progress.update(current["id"], advance=n)

    with progress:
        yield on_start, on_done


def eval_table(console: Console, results, summary: dict, protocol: str) -> None:
    table = Table(title=f"{summary['model']} ({protocol})", title_justify="left")
    for column, justify in (("task", "left"), ("n", "right"), ("correct", "right"), ("accuracy", "right"),
                            ("examples/s", "right"), ("gen tokens/s", "right")):
        table.add_column(column, justify=justify)
    for r in results:
        table.add_row(r.task, str(r.n), str(r.correct), f"{r.accuracy:.4f}", f"{r.examples_per_second:.2f}",
                      f"{r.tokens_per_second:,.1f}")
    if len(results) > 1:
        table.add_row("mean", "", "", f"{summary['mean_accuracy']:.4f}", "", "", style="bold")
    console.print(table)


def _cell(value: float, vmax: float) -> str:
    """A value on a dark-to-bright background, viridis-like, so the table reads as a heatmap."""
    ramp = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"]
    level = min(len(ramp) - 1, int(value / max(vmax, 1e-9) * (len(ramp) - 1) + 0.5))
    fg = "black" if level >= 3 else "white"
    return f"[{fg} on {ramp[level]}]{value:.2f}[/]"


def route_map_view(console: Console, result) -> None:
    """A compact coloured heatmap per task and module, with per-layer statistics."""
    from sara_cli.analysis.routing import normalized_entropy

    vmax = max(max(max(r) for r in m.mean_gate) for mods in result.maps.values() for m in mods.values())
    for task, modules in result.maps.items():
        for module, m in modules.items():
            table = Table(title=f"{task} / {module}: mean gate ({m.tokens} tokens)", title_justify="left",
                          padding=(0, 1), show_edge=False)
            table.add_column("layer", justify="right")
            for e in range(result.experts):
                table.add_column(f"e{e}", justify="center")
            table.add_column("dominant", justify="right")
            table.add_column("top-1 agree", justify="right")
            table.add_column("entropy", justify="right")
            entropies = normalized_entropy(m, result.experts)
            for i, layer in enumerate(m.layers):
                table.add_row(str(layer), *[_cell(v, vmax) for v in m.mean_gate[i]],
                              f"e{m.dominant[i]} {m.dominant_share[i]:.2f}", f"{m.top_agreement[i]:.0%}",
                              f"{entropies[i]:.2f}")
            console.print(table)
    maps = [m for mods in result.maps.values() for m in mods.values()]
    agreement = sum(a for m in maps for a in m.top_agreement) / sum(len(m.top_agreement) for m in maps)
    share = sum(d for m in maps for d in m.dominant_share) / sum(len(m.dominant_share) for m in maps)
    # A mean-routing merge is exact only when every token's gate equals the mean: the dominant
    # share near 1 says that; agreement alone can be high with near-uniform gates.
    verdict = ("static" if share >= 0.9 else "mostly static" if share >= 0.6 and agreement >= 0.8
               else "token-dependent")
    console.print(f"routing is {verdict}: the dominant expert holds {share:.0%} of the gate on average and is "
                  f"the top choice of {agreement:.0%} of tokens (a --routing mean merge is exact when "
                  "every token gets the same gate)", highlight=False)


# -- compare -------------------------------------------------------------------------------------

class CompareProgress:
    """Two rich bars for `sara compare`: variants overall (with the ETA) and the current run's steps."""

    def __init__(self, console: Console):
        from rich.progress import TimeRemainingColumn

        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self.overall = None
        self.current = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def start(self, total: int) -> None:
        if self.overall is None:
            self.overall = self.progress.add_task("[bold]variants", total=total)
        else:
            self.progress.update(self.overall, total=total)

    def variant(self, variant, status: str) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
        self.current = self.progress.add_task(f"{status} {variant.name}", total=None)

    def steps(self, done: int, total: int) -> None:
        if self.current is not None:
            self.progress.update(self.current, completed=done, total=total)

    def done(self, variant, result: dict) -> None:
        self.progress.console.print(f"{variant.name}: held-out loss {result['holdout']['loss']:.4f}",
                                    highlight=False, markup=False)
        self.progress.advance(self.overall)

    def notice(self, message: str) -> None:
        if not message.startswith("no CUDA GPU"):  # said once by the command, not per variant
            self.progress.console.print(f"notice: {message}", highlight=False, markup=False)


def compare_plan(console: Console, comparison, outcome) -> None:
    """The arms (setting, parameters, budget, rates) and the variants of a comparison."""
    from sara_cli.comparison.report import setting_cell

    budget = comparison.budget
    table = Table(title=f"sara compare plan: budget {budget}", title_justify="left")
    for column, justify in (("arm", "left"), ("setting", "left"), ("trainable params", "right"),
                            ("budget", "right"), ("rates", "right")):
        table.add_column(column, justify=justify)
    for arm in comparison.arms:
        size = comparison.sizes[arm.label]
        rates = (":".join(f"{r:g}" for r in comparison.grids[arm.method]) + " (grid)"
                 if arm.method in comparison.grids else f"{outcome.rate_of(arm):g}")
        met = "-" if size["target"] is None else (f"{size['target']:,d}" + ("" if size["reached"] else " not reachable"))
        table.add_row(arm.label, setting_cell({"adapter": size["adapter"]}), f"{size['params']:,d}", met, rates)
    console.print(table)
    done = len(outcome.finished)
    console.print(f"{len(outcome.variants)} variants ({done} finished), seeds "
                  f"{', '.join(map(str, comparison.seeds))}; held-out data {comparison.holdout_data}",
                  highlight=False, markup=False)
    for variant in outcome.variants:
        mark = "done" if variant.name in outcome.finished else "to run"
        console.print(f"  {variant.name}  ({mark})", highlight=False, markup=False)
    for label in outcome.waiting:
        console.print(f"  {label} at the later seeds: after the first seed's grid chooses its rate",
                      highlight=False, markup=False)


def compare_table(console: Console, summary: dict) -> None:
    """The report as a rich table: parameters, rate, held-out loss, paired difference, accuracy, step time."""
    from sara_cli.comparison.report import difference_cell, loss_cell, params_cell, setting_cell

    tasks = sorted({t for a in summary["arms"] for t in a["accuracy"]})
    table = Table(title=f"held-out loss per target token (budget {summary['budget']})", title_justify="left")
    table.add_column("arm")
    table.add_column("setting")
    table.add_column("params", justify="right")
    table.add_column("rate", justify="right")
    table.add_column("loss (mean ± std)", justify="right")
    table.add_column(f"vs {summary['reference']} [95% CI]", justify="right")
    for task in tasks:
        table.add_column(task, justify="right")
    table.add_column("step s", justify="right")
    for arm in summary["arms"]:
        accuracy = [f"{arm['accuracy'][t]['mean']:.3f}" if t in arm["accuracy"] else "-" for t in tasks]
        step = arm["cost"]["step_seconds"]
        table.add_row(arm["arm"], setting_cell(arm), params_cell(arm),
                      "-" if arm["learning_rate"] is None else f"{arm['learning_rate']:g}",
                      loss_cell(arm), difference_cell(arm), *accuracy, "-" if step is None else f"{step:.2f}")
    console.print(table)
    if summary["missing"]:
        console.print(f"not finished: {', '.join(summary['missing'])}", highlight=False, markup=False)
