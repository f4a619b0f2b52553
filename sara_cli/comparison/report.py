"""The comparison's report: per arm the parameters, the chosen rate and the held-out loss over
seeds; the paired difference against the first arm with a 95% interval over seeds; accuracy and
costs. Written as compare.json, compare.md and compare.png."""

from __future__ import annotations

import math
from pathlib import Path

from sara_cli.files import atomic_path, write_json, write_text

# Student's t, two-sided 95% (the 0.975 quantile), for 1..30 degrees of freedom.
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]


def t_quantile(df: int) -> float:
    return T_975[df - 1] if df <= len(T_975) else 1.96


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for fewer than two values."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired_difference(reference: dict[int, float], other: dict[int, float]) -> dict:
    """other - reference over the seeds both have: mean, std, a 95% t interval and the seeds.

    The interval is mean +- t(0.975, n-1) std / sqrt(n); None for fewer than two seeds.
    """
    seeds = sorted(set(reference) & set(other))
    diffs = [other[s] - reference[s] for s in seeds]
    mean, std = mean_std(diffs)
    interval = None
    if std is not None:
        half = t_quantile(len(diffs) - 1) * std / math.sqrt(len(diffs))
        interval = [mean - half, mean + half]
    return {"seeds": seeds, "differences": diffs, "mean": mean, "std": std, "ci95": interval}


def summarize(state: dict, results: list[dict], missing: list[str], environment: dict) -> dict:
    """compare.json: the plan, every variant's result, and per arm the statistics."""
    arms = []
    reference = None
    for label in state["arms"]:
        mine = [r for r in results if r["arm"] == label]
        grid = {f"{r['learning_rate']:g}": r["holdout"]["loss"] for r in mine if r["grid_point"]}
        rate = _chosen(mine)
        chosen = [r for r in mine if r["learning_rate"] == rate]
        losses = {r["seed"]: r["holdout"]["loss"] for r in chosen}
        mean, std = mean_std(list(losses.values()))
        size = state["sizes"][label]
        arm = {"arm": label, "method": size["adapter"]["method"], "adapter": size["adapter"],
               "params": size["params"], "budget": size["target"], "budget_met": size["reached"],
               "learning_rate": rate, "grid": grid, "losses": {str(s): v for s, v in sorted(losses.items())},
               "loss_mean": mean, "loss_std": std,
               "accuracy": _accuracy(chosen), "cost": _cost(chosen)}
        if reference is None:
            reference = losses
            reference_accuracy = arm["accuracy"]
        else:
            arm["difference"] = _keyed(paired_difference(reference, losses))
            for task, found in arm["accuracy"].items():
                if task in reference_accuracy:
                    found["difference"] = _keyed(paired_difference(_by_seed(reference_accuracy[task]["seeds"]),
                                                                   _by_seed(found["seeds"])))
        arms.append(arm)
    pairs = []
    for i, first in enumerate(arms):
        for second in arms[i + 1:]:
            difference = paired_difference(_by_seed(first["losses"]), _by_seed(second["losses"]))
            pairs.append({"arm": second["arm"], "against": first["arm"], **_keyed(difference)})
    return {"reference": state["arms"][0], "budget": state["identity"]["budget"],
            "holdout_data": state["holdout_data"], "holdout_limit": state.get("holdout_limit"),
            "seeds": state["seeds"], "arms": arms, "pairs": pairs,
            "missing": missing, "environment": environment, "variants": results}


def _chosen(results: list[dict]) -> float | None:
    """The arm's rate: the one its non-grid variants use, else seed 0's best grid point."""
    fixed = {r["learning_rate"] for r in results if not r["grid_point"]}
    if fixed:
        return min(fixed)
    grid = [r for r in results if r["grid_point"]]
    if not grid:
        return None
    finite = [r for r in grid if math.isfinite(r["holdout"]["loss"])] or grid  # as run.chosen_rate
    return min(finite, key=lambda r: (r["holdout"]["loss"], r["learning_rate"]))["learning_rate"]


def _by_seed(values: dict) -> dict[int, float]:
    return {int(seed): value for seed, value in values.items()}


def _keyed(difference: dict) -> dict:
    """A paired difference with its seeds as JSON keys are: strings."""
    return {**difference, "seeds": [str(s) for s in difference["seeds"]]}


def _accuracy(results: list[dict]) -> dict:
    """Per task: each seed's accuracy, their mean and standard deviation, and the examples scored."""
    tasks = sorted({t for r in results for t in r["accuracy"]})
    found = {}
    for task in tasks:
        scored = sorted((r["seed"], r["accuracy"][task]) for r in results if task in r["accuracy"])
        mean, std = mean_std([a["accuracy"] for _, a in scored])
        found[task] = {"mean": mean, "std": std, "seeds": {str(s): a["accuracy"] for s, a in scored},
                       "n": scored[0][1]["n"]}
    return found


def _cost(results: list[dict]) -> dict:
    cost = {}
    for key in ("trainable_params", "adapter_bytes", "setup_seconds", "step_seconds", "peak_memory_bytes"):
        values = [r["cost"][key] for r in results if r["cost"].get(key) is not None]
        cost[key] = sum(values) / len(values) if values else None
    return cost


# -- files ---------------------------------------------------------------------------------------

def _number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def loss_cell(arm: dict) -> str:
    if arm["loss_mean"] is None:
        return "-"
    spread = f" ± {arm['loss_std']:.4f}" if arm["loss_std"] is not None else ""
    return f"{arm['loss_mean']:.4f}{spread} (n={len(arm['losses'])})"


def difference_cell(arm: dict) -> str:
    d = arm.get("difference")
    if not d or d["mean"] is None:
        return "reference" if d is None else "-"
    if d["ci95"] is None:
        return f"{d['mean']:+.4f} (one seed)"
    return f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"


def params_cell(arm: dict) -> str:
    text = f"{arm['params']:,d}"
    if arm["budget"] is not None:
        text += "" if arm["budget_met"] else f" (budget {arm['budget']:,d} not reachable)"
    return text


def setting_cell(arm: dict) -> str:
    adapter = arm["adapter"]
    return f"tau {adapter['tau']:g}" if "tau" in adapter and adapter["method"] in ("sara", "mosara") \
        else f"r {adapter['rank']}"


def markdown(summary: dict) -> str:
    """compare.md: the table, the grid, accuracy, costs and what is missing."""
    held = f"`{summary['holdout_data']}`" + (f" (first {summary['holdout_limit']} records)"
                                               if summary.get("holdout_limit") else "")
    lines = [f"# sara compare: held-out loss against {summary['reference']}", "",
             f"Held-out data: {held}; budget: {summary['budget']}; seeds: "
             f"{', '.join(map(str, summary['seeds']))}. Loss is the mean per target token; ± is the "
             "standard deviation over seeds; the difference is paired by seed (arm minus reference), "
             "with a 95% t interval over seeds.", "",
             "| arm | setting | trainable params | rate | held-out loss | difference vs " + summary["reference"] + " |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for arm in summary["arms"]:
        lines.append(f"| {arm['arm']} | {setting_cell(arm)} | {params_cell(arm)} | "
                     f"{'-' if arm['learning_rate'] is None else format(arm['learning_rate'], 'g')} | "
                     f"{loss_cell(arm)} | {difference_cell(arm)} |")
    if len(summary["arms"]) > 2:
        lines += ["", "Every pair (the second arm minus the first, paired by seed, 95% interval):", ""]
        for pair in summary["pairs"]:
            lines.append(f"- {pair['arm']} - {pair['against']}: {difference_cell({'difference': pair})}"
                         f" over {len(pair['seeds'])} seed(s)")
    grids = [a for a in summary["arms"] if a["grid"]]
    if grids:
        lines += ["", "Rate grid (held-out loss at the first seed; the lowest is chosen):", ""]
        for arm in grids:
            points = ", ".join(f"{rate}: {loss:.4f}" for rate, loss in arm["grid"].items())
            lines.append(f"- {arm['arm']}: {points} -> {arm['learning_rate']:g}")
    tasks = sorted({t for a in summary["arms"] for t in a["accuracy"]})
    if tasks:
        lines += ["", "Task accuracy (fast protocol; ± is the standard deviation over seeds; the difference is "
                  f"paired by seed against {summary['reference']}, with a 95% t interval):", "",
                  "| arm | " + " | ".join(f"{t} | difference" for t in tasks) + " |",
                  "| --- |" + " ---: | ---: |" * len(tasks)]
        for arm in summary["arms"]:
            cells = []
            for task in tasks:
                found = arm["accuracy"].get(task)
                if found is None:
                    cells += ["-", "-"]
                    continue
                spread = f" ± {found['std']:.3f}" if found["std"] is not None else ""
                cells += [f"{found['mean']:.3f}{spread} (n={found['n']}, {len(found['seeds'])} seeds)",
                          difference_cell(found) if "difference" in found else
                          ("reference" if arm["arm"] == summary["reference"] else "-")]
            lines.append(f"| {arm['arm']} | " + " | ".join(cells) + " |")
    lines += ["", "| arm | adapter file | setup s | step s | peak GPU memory |", "| --- | ---: | ---: | ---: | ---: |"]
    for arm in summary["arms"]:
        c = arm["cost"]
        size = "-" if c["adapter_bytes"] is None else f"{c['adapter_bytes'] / 1024:,.1f} KiB"
        peak = "-" if c["peak_memory_bytes"] is None else f"{c['peak_memory_bytes'] / 2**20:,.0f} MiB"
        lines.append(f"| {arm['arm']} | {size} | {_number(c['setup_seconds'], 1)} | "
                     f"{_number(c['step_seconds'], 2)} | {peak} |")
    if summary["missing"]:
        lines += ["", f"Not finished ({len(summary['missing'])}): {', '.join(summary['missing'])}."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """compare.png: every seed's held-out loss per arm, with the mean and its standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(arms) + 2), 4), dpi=120)
    for x, arm in enumerate(arms):
        losses = list(arm["losses"].values())
        offsets = [0.0] if len(losses) == 1 else [-0.12 + 0.24 * i / (len(losses) - 1) for i in range(len(losses))]
        ax.scatter([x + o for o in offsets], losses, s=18, color="tab:blue", alpha=0.7,
                   label="one seed" if x == 0 else None, zorder=3)
        if arm["loss_mean"] is not None:
            ax.errorbar([x + 0.3], [arm["loss_mean"]], yerr=[arm["loss_std"] or 0.0], fmt="o", color="black",
                        capsize=4, label="mean ± std" if x == 0 else None, zorder=4)
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels([f"{a['arm']}\n{a['params']:,d} params" for a in arms], fontsize=8)
    ax.set_ylabel("held-out loss per target token")
    ax.set_title(f"sara compare ({summary['budget']} budget)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write(summary: dict, out: Path) -> None:
    write_json(out / "compare.json", summary)
    write_text(out / "compare.md", markdown(summary))
    plot(summary, out / "compare.png")


def environment() -> dict:
    """Versions and machine, for the report."""
    import os
    import platform

    import torch
    import transformers

    from sara_cli import __version__

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {"sara": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": device,
            "threads": torch.get_num_threads()}
