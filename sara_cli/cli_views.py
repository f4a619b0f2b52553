"""Rich tables and progress bars for the CLI. Only cli.py calls these; the core never prints."""

from __future__ import annotations

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
        console.print(f"tau {tau:g} gives SARA {sara:,d} trainable parameters, closest to "
                      f"LoRA rank {match_lora_rank}'s {lora:,d} on these targets")
    console.print(f"{len(result.matrices)} matrices, model {result.total_params:,d} parameters, "
                  f"{result.seconds:.2f} s")
