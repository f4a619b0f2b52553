"""init: time to build the adapters on the 7B-shaped model in device memory.

sara's `inject_adapters` (SARA tau 0.01, Mo-SARA tau 0.5 m 5, PiSSA r 16) against PEFT's
`get_peft_model` with PiSSA r 16, full SVD (`init_lora_weights="pissa"`) and `pissa_niter_4`.
The reference for the 1.2x target is the spectrum work of `sara analyze` on the same matrices
(Gram eigenvalues and the rank rule), here on the weights already in device memory.

Each run starts from the untouched model: the original layers (and, for PiSSA, the original
weights) are put back after it, untimed. During sara's runs the top-level calls to the
decompositions (eigh, eigvalsh, svd, svdvals, svd_lowrank) are counted, to show that no matrix
is decomposed twice.
"""

from __future__ import annotations

from contextlib import contextmanager

from bench.harness import (Measurement, Settings, SuiteResult, Target, from_runs, measure, ratio_target,
                           warm_kernels)
from bench.models import Snapshot

TAUS = [0.01, 0.5]
SCOPES = {"q/v": ["q_proj", "v_proj"], "all-linear": ["all-linear"]}
SARA_CASES = [  # key, name, method, options, rewrites the base weight
    ("sara", "sara SARA tau 0.01", "sara", {"tau": 0.01}, False),
    ("mosara", "sara Mo-SARA tau 0.5 m 5", "mosara", {"tau": 0.5, "num_experts": 5}, False),
    ("pissa", "sara PiSSA r 16", "pissa", {"rank": 16}, True),
]
PEFT_CASES = [("peft-pissa", "PEFT PiSSA full SVD r 16", "pissa"),
              ("peft-pissa-niter-4", "PEFT PiSSA pissa_niter_4 r 16", "pissa_niter_4")]
DECOMPOSITIONS = (("linalg", "eigh"), ("linalg", "eigvalsh"), ("linalg", "svd"), ("linalg", "svdvals"),
                  ("torch", "svd_lowrank"))


@contextmanager
def count_decompositions():
    """Count top-level calls of the torch decompositions (nested calls, such as the small SVD
    inside svd_lowrank, are not counted). Yields {"calls": n}."""
    import torch

    counts, depth, saved = {"calls": 0}, [0], []

    def wrap(fn):
        def counted(*args, **kwargs):
            counts["calls"] += depth[0] == 0
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return counted

    for owner_name, name in DECOMPOSITIONS:
        owner = torch.linalg if owner_name == "linalg" else torch
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, wrap(getattr(owner, name)))
    try:
        yield counts
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def spectrum_pass(model, names: list[str]) -> None:
    """What `sara analyze` does per matrix, on weights already on the device."""
    from sara_cli.model.spectrum import ranks_for_taus, singular_values

    for name in names:
        s = singular_values(model.get_submodule(name).weight.detach(), name)  # (n,) float64
        ranks_for_taus(s, TAUS)  # also brings s to the host, as analyze does


def sara_case(result: SuiteResult, settings: Settings, model, scope: str, case) -> None:
    from sara_cli.adapters.inject import inject_adapters

    key, name, method, options, rewrites = case
    targets, tag = SCOPES[scope], scope.replace("/", "")
    snapshot = Snapshot(model, _names(model, targets), weights=rewrites)

    def build():  # -> (decompositions per matrix, mean rank); the layers themselves are not kept
        with count_decompositions() as counts:
            layers = inject_adapters(model, method, options, targets)
        ranks = [layer.rank() for layer in layers.values()]
        return counts["calls"] / len(ranks), sum(ranks) / len(ranks)

    runs = measure(build, settings, teardown=snapshot.restore)
    snapshot.release()
    per_matrix, mean_rank = runs.values[-1]
    baseline = f"peft-pissa-niter-4-{tag}" if method == "pissa" else f"spectrum-{tag}"
    result.add(from_runs(f"{key}-{tag}", name, scope, runs, baseline=baseline,
                         extra={"decompositions per matrix": per_matrix, "mean rank": mean_rank}))


def peft_case(result: SuiteResult, settings: Settings, model, scope: str, case, peft, reason) -> None:
    key, name, init = case
    targets, tag = SCOPES[scope], scope.replace("/", "")
    full_svd = init == "pissa"
    if peft is None or (full_svd and scope == "all-linear" and not settings.slow):
        why = reason or "full-SVD PiSSA on all-linear takes minutes; run with --slow"
        result.add(Measurement(f"{key}-{tag}", name, scope, "s", skipped=why))
        return
    snapshot = Snapshot(model, _names(model, targets), weights=True)
    config = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, init_lora_weights=init,
                             target_modules="all-linear" if targets == ["all-linear"] else targets)

    def build() -> None:  # returns nothing, so no run keeps its PeftModel alive
        peft.get_peft_model(model, config)

    runs = measure(build, settings, warmup=False if full_svd else None, teardown=snapshot.restore)
    snapshot.release()
    result.add(from_runs(f"{key}-{tag}", name, scope, runs))


def _names(model, targets: list[str]) -> list[str]:
    from sara_cli.adapters.inject import find_targets

    return find_targets(model, targets)


def run(settings: Settings, pool, peft=None, peft_reason=None) -> SuiteResult:
    result = SuiteResult("init", info={"taus": TAUS})
    model = pool.model()
    warm_kernels(settings.device)
    for scope, targets in SCOPES.items():
        names = _names(model, targets)
        runs = measure(lambda: spectrum_pass(model, names), settings)
        result.add(from_runs(f"spectrum-{scope.replace('/', '')}", "sara analyze spectrum (in memory)",
                             scope, runs, extra={"matrices": len(names)}))
        for case in SARA_CASES:
            sara_case(result, settings, model, scope, case)
        for case in PEFT_CASES:
            peft_case(result, settings, model, scope, case, peft, peft_reason)
    add_targets(result)
    return result


def add_targets(result: SuiteResult) -> None:
    get = result.get
    for key, label in (("sara", "SARA"), ("mosara", "Mo-SARA")):
        result.targets.append(ratio_target(f"{label} init q/v vs PEFT full-SVD PiSSA", get("peft-pissa-qv"),
                                           get(f"{key}-qv"), ">=", 8, "x faster"))
    for key, label in (("sara", "SARA"), ("mosara", "Mo-SARA")):
        for tag, scope in (("qv", "q/v"), ("all-linear", "all-linear")):
            result.targets.append(ratio_target(f"{label} init {scope} / analyze spectrum time",
                                               get(f"{key}-{tag}"), get(f"spectrum-{tag}"), "<=", 1.2))
    for tag, scope in (("qv", "q/v"), ("all-linear", "all-linear")):
        result.targets.append(ratio_target(f"sara PiSSA init {scope} / PEFT pissa_niter_4",
                                           get(f"pissa-{tag}"), get(f"peft-pissa-niter-4-{tag}"), "<=", 1.5))
    counts = [m.extra["decompositions per matrix"] for m in result.measurements
              if "decompositions per matrix" in m.extra]
    result.targets.append(Target("sara init decomposes each matrix once (most calls per matrix)", "==",
                                 1.0, "calls", max(counts) if counts else None, timing=False))
