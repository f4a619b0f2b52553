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
    from sara_cli.analyze import match_lora_rank as match, mosara_params, sara_params

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
        self.console.print(f"[yellow]notice:[/] {message}", highlight=False)

    def built(self, recipe, model, layers) -> None:
        from sara_cli.inject import parameter_line

        if int(os.environ.get("RANK", "0")) != 0:
            return
        rank_name = "k" if recipe.adapter.method in ("sara", "mosara") else "r"
        modules = sorted({name.split(".")[-1] for name in layers})
        per_layer: dict[str, dict[str, int]] = {}
        for name, layer in layers.items():
            prefix, _, module = name.rpartition(".")
            per_layer.setdefault(prefix, {})[module] = layer.rank()
        table = Table(title=f"{recipe.adapter.method} adapters: {rank_name} per module", title_justify="left")
        table.add_column("layer")
        for module in modules:
            table.add_column(module, justify="right")
        for prefix, ranks in per_layer.items():
            table.add_row(prefix, *[str(ranks.get(m, "-")) for m in modules])
        self.console.print(table)
        self.console.print(parameter_line(model))

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
    if not v:
        return
    line = (f"verification ({v['dtype']}): max |logit diff| {v['max_abs_logit_diff']:.3g}, "
            f"greedy agreement {v['greedy_agreement']:.2%} over {v['tokens']} tokens")
    if "calibration_loss_change" in v:
        line += (f"; calibration loss routed {v['calibration_loss_routed']:.4f} -> merged "
                 f"{v['calibration_loss_merged']:.4f} ({v['calibration_loss_change']:+.4f})"
                 " [mean routing: an approximation]")
    elif v.get("passed"):
        from sara_cli.verify import FLOOR_MULTIPLE, HALF_PRECISION_TOLERANCE

        if v.get("noise_floor") is not None:
            line += f", limit {v['tolerance']:.3g} ({FLOOR_MULTIPLE:g} x noise floor {v['noise_floor']:.3g})"
        elif v.get("tolerance") is not None:
            line += f", limit {v['tolerance']:.3g} ({HALF_PRECISION_TOLERANCE:.0%} of the logit spread)"
        line += " [passed]"
    console.print(line, highlight=False, markup=False)


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
    from sara_cli.routing import normalized_entropy

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
