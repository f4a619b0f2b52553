"""analyze: `sara analyze` on the saved checkpoint against the naive route, svdvals in fp32.

Timed, per scope (q/v, all-linear):
- the `sara analyze` command as a user runs it: a fresh `python -m sara_cli analyze` process,
  so interpreter start, imports, CUDA start-up and reading are all inside the time;
- the `analyze()` call in this process (reading and Gram eigenvalues, no start-up), for scale;
- the naive route in this process: the same tensors read one at a time, moved to the device and
  put through `torch.linalg.svdvals` in float32, k from the same rank rule. Being in-process it
  pays no start-up, which favours the baseline.
"""

from __future__ import annotations

import json

from bench.harness import (Measurement, Settings, SuiteResult, Target, datasets_imports, from_runs, measure,
                     ratio_target, run_process, warm_kernels)

TAUS = [0.01, 0.5]
SCOPES = {"q/v": ["q_proj", "v_proj"], "all-linear": ["all-linear"]}


def naive_ranks(model_dir, targets: list[str], device: str) -> dict[str, list[int]]:
    """{module: k per tau} from a full fp32 SVD of every targeted matrix."""
    import torch

    from sara_cli.model import hub
    from sara_cli.analysis.analyze import select_matrices
    from sara_cli.model.spectrum import ranks_for_taus

    names = select_matrices(hub.tensor_index(model_dir), targets)
    ranks = {}
    for name, W in hub.iter_tensors(model_dir, names):
        s = torch.linalg.svdvals(W.to(device=device, dtype=torch.float32))  # (min(out, in),)
        ranks[name[: -len(".weight")]] = ranks_for_taus(s.double().cpu(), TAUS)
    return ranks


def command_args(model_dir, targets: list[str], device: str, json_path) -> list[str]:
    taus = [arg for tau in TAUS for arg in ("--tau", str(tau))]
    return ["-m", "sara_cli", "analyze", str(model_dir), *taus, "--targets", ",".join(targets),
            "--device", device, "--json", str(json_path)]


def run_scope(result: SuiteResult, settings: Settings, model_dir, scope: str) -> None:
    targets, tag = SCOPES[scope], scope.replace("/", "")
    ranks = [run_command(result, settings, model_dir, scope), run_call(result, settings, model_dir, scope)]
    key = f"naive-{tag}"
    if scope != "q/v" and not settings.slow:
        result.add(Measurement(key, "naive svdvals fp32", scope, "s",
                               skipped="all-linear naive SVD takes minutes; run with --slow"))
        return
    runs = measure(lambda: naive_ranks(model_dir, targets, settings.device), settings, warmup=False)
    naive_k = runs.values[-1]
    ranks = [r for r in ranks if r is not None]
    mismatched = sorted(n for n in naive_k if any(r.get(n) != naive_k[n] for r in ranks))
    result.add(from_runs(key, "naive svdvals fp32", scope, runs,
                         extra={"k mismatches": len(mismatched), "first mismatch": (mismatched or [None])[0]}))
    same = len(mismatched) == 0 and all(len(r) == len(naive_k) for r in ranks)
    result.targets.append(Target(f"identical k ({scope}, tau {TAUS})", "==", True, "", same, timing=False))


def run_command(result: SuiteResult, settings: Settings, model_dir, scope: str) -> dict | None:
    """Time the `sara analyze` command; returns its {module: k per tau}."""
    targets, tag = SCOPES[scope], scope.replace("/", "")
    key, name = f"command-{tag}", "sara analyze (command)"
    if settings.smoke and scope != "q/v":  # each process start costs seconds on a CI runner
        result.add(Measurement(key, name, scope, "s", skipped="--smoke runs the command on q/v only"))
        return None
    json_path, log = settings.workdir / f"analyze-{tag}.json", settings.workdir / f"analyze-{tag}.log"
    args = command_args(model_dir, targets, settings.device, json_path)
    runs = measure(lambda: run_process(args, log, check_imports=settings.smoke), settings)
    ranks = {m["name"]: m["k"] for m in json.loads(json_path.read_text())["matrices"]}
    result.add(from_runs(key, name, scope, runs, baseline=f"naive-{tag}",
                         extra={"matrices": len(ranks), "imports_datasets": datasets_imports(runs.values)}))
    return ranks


def run_call(result: SuiteResult, settings: Settings, model_dir, scope: str) -> dict:
    """Time `analyze()` in this process; returns its {module: k per tau}."""
    from sara_cli.analysis.analyze import analyze

    targets, tag = SCOPES[scope], scope.replace("/", "")
    runs = measure(lambda: analyze(str(model_dir), TAUS, targets, settings.device), settings)
    ranks = {m.name: m.k for m in runs.values[-1].matrices}
    result.add(from_runs(f"call-{tag}", "analyze() call", scope, runs, baseline=f"naive-{tag}",
                         extra={"mean k tau 0.01": _mean_k(ranks, 0), "mean k tau 0.5": _mean_k(ranks, 1)}))
    return ranks


def _mean_k(ranks: dict[str, list[int]], index: int) -> float:
    return sum(k[index] for k in ranks.values()) / max(len(ranks), 1)


def run(settings: Settings, pool, peft=None, peft_reason=None) -> SuiteResult:
    result = SuiteResult("analyze", info={"taus": TAUS})
    model_dir = pool.checkpoint()
    warm_kernels(settings.device)
    for scope in SCOPES:
        run_scope(result, settings, model_dir, scope)
    command, naive = result.get("command-qv"), result.get("naive-qv")
    result.targets.append(ratio_target("sara analyze command q/v vs naive", naive, command, ">=", 8,
                                       "x faster"))
    result.targets.append(Target("sara analyze command q/v end to end", "<", 10, "s", command.value))
    return result
