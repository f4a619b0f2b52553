"""`sara route-map`: how Mo-SARA's router spreads weight over its singular-value sets.

For each task (or data file), layer, target module and expert, the gate g is averaged over the
examples and their tokens: by default the prompt tokens of the eval prompt, i.e. the first
forward pass, as in the SARA paper (section 5.8, appendix D). Per layer it also reports the
gate entropy, the dominant expert's share, and the share of tokens whose own top expert is the
layer's dominant one; when that last figure is near 1 the routing is static and the mean-routing
merge (`sara merge --routing mean`) is close to exact.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from sara_cli.adapters import checkpoint
from sara_cli.errors import SaraError
from sara_cli.files import atomic_path, write_json
from sara_cli.names import layer_of



@dataclass
class ModuleMap:
    """Routing of one module type (e.g. q_proj) for one task. Lists are per layer."""

    layers: list[int]
    mean_gate: list[list[float]]  # (layers, m)
    entropy: list[float]  # mean per-token entropy of g, in nats
    dominant: list[int]
    dominant_share: list[float]  # mean gate of the dominant expert
    top_agreement: list[float]  # share of tokens whose argmax is the dominant expert
    tokens: int


@dataclass
class RouteMap:
    model: str
    tokens: str
    experts: int
    maps: dict[str, dict[str, ModuleMap]] = field(default_factory=dict)  # task -> module -> map

    def to_json(self) -> dict:
        return {"model": self.model, "tokens": self.tokens, "experts": self.experts,
                "tasks": {task: {module: vars(m) for module, m in modules.items()}
                          for task, modules in self.maps.items()}}


def summarize(gates: dict, modules: list[str] | None) -> dict[str, ModuleMap]:
    """Group per-token gates {module path: (N, m)} by module type and layer, with statistics."""
    import torch

    grouped: dict[str, list[tuple[int, "torch.Tensor"]]] = {}
    for name, g in gates.items():
        module = name.split(".")[-1]
        if modules and module not in modules:
            continue
        grouped.setdefault(module, []).append((layer_of(name) or 0, g))
    result = {}
    for module, items in sorted(grouped.items()):
        items.sort(key=lambda item: item[0])
        rows = []
        for layer, g in items:
            mean = g.mean(dim=0)  # (m,)
            dominant = int(mean.argmax())
            entropy = float(-(g * g.clamp_min(1e-12).log()).sum(-1).mean())
            rows.append((layer, mean.tolist(), entropy, dominant, float(mean[dominant]),
                         float((g.argmax(-1) == dominant).float().mean()), g.shape[0]))
        layers, means, entropies, dominants, shares, agreements, counts = zip(*rows)
        result[module] = ModuleMap(list(layers), list(means), list(entropies), list(dominants),
                                   list(shares), list(agreements), counts[0])
    return result


def texts_for(records: list[dict], tokens: str) -> list[str]:
    """The eval prompts ('prompt': the first forward pass) or prompt + the record's output ('all')."""
    from sara_cli.evaluation.tasks import eval_prompt

    prompts = [eval_prompt(r["instruction"]) for r in records]
    if tokens == "prompt":
        return prompts
    return [p + (r.get("output") or "") for p, r in zip(prompts, records)]


def route_map(path: Path, task_spec: str | None, data: str | None, limit: int | None, data_dir: Path | None,
              modules: list[str] | None, tokens: str) -> RouteMap:
    """Run the Mo-SARA model over the examples and average its gates.

    Args:
        path: a run folder or its adapter folder.
        task_spec: eval task names, comma-separated (exclusive with `data`).
        data: a records file or builtin:NAME (exclusive with `task_spec`).
        limit: first N examples per task; None for all.
        data_dir: the LLM-Adapters `dataset/` folder for tasks; None reads the bundled copies.
        modules: module types to keep (e.g. ["q_proj"]); None keeps every adapted module.
        tokens: "prompt" (the eval prompt: the paper's first forward pass) or "all" (prompt + output).

    Raises:
        SaraError: not a Mo-SARA adapter (names the method), unknown task or module, missing
            data, bad limit or tokens. All are checked before the model loads.
    """
    from sara_cli.adapters.gates import collect_gates
    from sara_cli.adapters.checkpoint import load_adapter_model
    from sara_cli.model.loading import device_for_inference

    if limit is not None and limit < 1:
        raise SaraError(f"--limit must be at least 1, got {limit}")
    if tokens not in ("prompt", "all"):
        raise SaraError(f"--tokens must be prompt or all, got '{tokens}'")
    if (task_spec is None) == (data is None):
        raise SaraError("give either --task TASK[,TASK...] or --data FILE")
    adapter_dir = checkpoint.find_adapter_dir(path)
    config = checkpoint.read_config(adapter_dir)
    if config["method"] != "mosara":
        raise SaraError(f"{adapter_dir} is a {config['method']} adapter; route-map needs a Mo-SARA "
                        "(method: mosara) run, whose router it maps")
    adapted = sorted({name.split(".")[-1] for name in config.get("ranks") or config["targets"]})
    unknown = [m for m in modules or [] if m not in adapted]
    if unknown:
        raise SaraError(f"--modules {','.join(unknown)}: no such Mo-SARA module; the adapter targets: "
                        f"{', '.join(adapted)}")
    sources = load_sources(task_spec, data, limit, data_dir)
    model, tokenizer, _ = load_adapter_model(adapter_dir, device=device_for_inference())
    result = RouteMap(model=str(path), tokens=tokens, experts=int(config["options"]["num_experts"]))
    for name, records in sources.items():
        gates = collect_gates(model, tokenizer, texts_for(records, tokens))
        result.maps[name] = summarize(gates, modules)
    return result


def load_sources(task_spec: str | None, data: str | None, limit: int | None,
                 data_dir: Path | None) -> dict[str, list[dict]]:
    """{task or data name: records with 'instruction'} for `--task` or `--data`.

    Raises:
        SaraError: unknown task, missing or empty data, records without 'instruction'.
    """
    from sara_cli.evaluation import tasks
    from sara_cli.data.dataset import load_records
    from sara_cli.data.dataset import check_data_reference

    if task_spec is not None:
        return {task.name: tasks.load_records(task, data_dir, limit) for task in tasks.resolve_tasks(task_spec)}
    check_data_reference(data)
    records = [dict(r) for r in load_records(data, limit=limit)]
    if not records:
        raise SaraError(f"--data {data} holds no records; it needs instruction records")
    if "instruction" not in records[0]:
        raise SaraError(f"--data {data}: records need an 'instruction' field (record 0 has: "
                        f"{', '.join(records[0]) or 'nothing'})")
    return {Path(data).stem if ":" not in data else data.split(":", 1)[1]: records}


def route_map_inputs(path: Path, task_spec: str | None, data: str | None,
                     data_dir: Path | None) -> list[tuple[str, Path]]:
    """(label, path) of what route-map reads: the adapter, its base, the records or test sets."""
    from sara_cli.evaluation import tasks
    from sara_cli.evaluation.evaluate import model_inputs
    from sara_cli.model.builtin import is_builtin

    inputs = model_inputs(str(path))
    if data is not None and not is_builtin(data) and Path(data).expanduser().exists():
        inputs.append(("the data file", Path(data)))
    if task_spec is not None:
        for task in tasks.resolve_tasks(task_spec):
            inputs.append((f"the {task.name} test set", tasks.records_path(task, data_dir)))
    return inputs


def output_folder(path: Path, out: Path | None, inputs: list | None = None) -> Path:
    """Where route-map writes: `out`, or inside the run (RUN/route-map) by default, as `sara eval`
    writes RUN/eval; an adapter folder outside a run writes ./route-map/<its name>.

    Raises:
        SaraError: `out` is a file, cannot be created, or lies inside a run's adapter or
            checkpoint folder (before any work is done).
    """
    from sara_cli.files import check_apart, check_writable
    from sara_cli.training.rundir import check_outside_managed, run_of

    if out is None:
        adapter_dir = checkpoint.find_adapter_dir(path)
        run = run_of(Path(path)) or run_of(adapter_dir)
        if run is None:
            out = Path("route-map") / Path(path).absolute().name
        else:
            folder, inside = run
            out = folder / (f"route-map-{inside}" if inside else "route-map")
    if out.exists() and not out.is_dir():
        raise SaraError(f"--out {out} is a file; give a folder for route-map.png, .json and .csv")
    check_apart([("--out", out)], inputs or [], "route-map")
    check_outside_managed(out, "--out")
    check_writable(out, "--out")
    return out


def write_outputs(result: RouteMap, out: Path) -> None:
    """route-map.json, route-map.csv and route-map.png in `out`."""
    write_json(out / "route-map.json", result.to_json())
    with atomic_path(out / "route-map.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["task", "module", "layer", "expert", "mean_gate"])
            for task, modules in result.maps.items():
                for module, m in modules.items():
                    for layer, row in zip(m.layers, m.mean_gate):
                        for expert, value in enumerate(row):
                            writer.writerow([task, module, layer, expert, f"{value:.6f}"])
    plot(result, out / "route-map.png")


PANEL_COLUMNS = 4  # at most this many panels side by side, so the figure fits a laptop screen


def plot(result: RouteMap, path: Path) -> None:
    """One heatmap panel per (task, module): rows layers, columns experts, shared colour scale.

    Panels are laid out in a grid of at most PANEL_COLUMNS columns; each task starts a new row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, module, m) for task, modules in result.maps.items() for module, m in modules.items()]
    n_modules = max(len(modules) for modules in result.maps.values())
    columns = min(n_modules, PANEL_COLUMNS)
    rows_per_task = -(-n_modules // columns)
    n_rows = rows_per_task * len(result.maps)
    n_layers = max(len(m.layers) for _, _, m in panels)
    vmax = max(max(max(row) for row in m.mean_gate) for _, _, m in panels)
    panel_height = 1.0 + 0.12 * n_layers
    fig_height = 0.6 + panel_height * n_rows
    fig, axes = plt.subplots(n_rows, columns, squeeze=False, dpi=120, layout="constrained",
                             figsize=(1.2 + 1.9 * columns + 0.8, fig_height))
    for ax in axes.flat:
        ax.axis("off")
    image = None
    several = len(result.maps) > 1
    for t, (task, modules) in enumerate(result.maps.items()):
        for j, (module, m) in enumerate(modules.items()):
            row, column = t * rows_per_task + j // columns, j % columns
            ax = axes[row][column]
            ax.axis("on")
            image = ax.imshow(m.mean_gate, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                              interpolation="nearest")
            ax.set_title(f"{task} / {module}" if several else module, fontsize=9)
            ax.set_xlabel("expert", fontsize=8)
            ax.set_xticks(range(result.experts))
            ax.tick_params(labelsize=7)
            step = max(1, len(m.layers) // 16)
            ax.set_yticks(range(0, len(m.layers), step))
            ax.set_yticklabels([str(m.layers[k]) for k in range(0, len(m.layers), step)])
            if column == 0:
                ax.set_ylabel("layer", fontsize=9)
    title = "Mo-SARA mean gate per layer and expert"
    if not several:
        title += f": {next(iter(result.maps))}"
    fig.suptitle(f"{title} ({result.tokens} tokens)", fontsize=10)
    # matplotlib sizes a colour bar as length / aspect: fix its width near 0.15 in, or a tall
    # figure (many layers or tasks) gets a bar wider than a panel.
    fig.colorbar(image, ax=axes, shrink=0.9, aspect=max(10.0, 0.9 * fig_height / 0.15), label="mean gate")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)


def normalized_entropy(m: ModuleMap, experts: int) -> list[float]:
    return [e / math.log(experts) if experts > 1 else 0.0 for e in m.entropy]
