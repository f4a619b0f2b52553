"""merge: `sara merge` of a SARA adapter into the saved 7B-shaped checkpoint, against a plain
`from_pretrained` + `save_pretrained` of the same checkpoint.

Every run is a fresh process, timed from start to exit, so both sides pay the same interpreter
start and imports. The peak host memory of each process is its own VmHWM (bench/peak_memory.py).
Timed: `sara merge` as a user runs it (its default verification loads the adapter model and
the merged model and compares their logits), `sara merge --no-verify` (the streaming merge
alone), and the plain round trip (`bench/plain_roundtrip.py`). The target is judged on the
default command. The output folder is deleted after each run, untimed; the base checkpoint sits
in the page cache (it was just written or read), the same for every run.
"""

from __future__ import annotations

import shutil

from bench.harness import (REPO, Measurement, Settings, SuiteResult, datasets_imports, from_runs, measure,
                           ratio_target, run_process)
from bench.models import Snapshot

TARGETS = ["q_proj", "v_proj"]
OPTIONS = {"tau": 0.01, "dropout": 0.0}
LAMBDA_STD = 0.1  # trained-looking lambda, so the merge changes the weights and verification has work


def make_adapter(model, model_dir, folder, settings: Settings):
    """A SARA adapter (tau 0.01, q/v) for `model_dir`, saved the way `sara train` saves one."""
    import torch

    from sara_cli.adapters import checkpoint
    from sara_cli.model import hub
    from sara_cli.adapters.inject import find_targets, inject_adapters

    snapshot = Snapshot(model, find_targets(model, TARGETS))
    try:
        layers = inject_adapters(model, "sara", OPTIONS, TARGETS)
        generator = torch.Generator().manual_seed(settings.seed)
        with torch.no_grad():
            for layer in layers.values():
                layer.sara_lambda.copy_(torch.randn(layer.k, generator=generator) * LAMBDA_STD)
        meta = {"method": "sara", "options": OPTIONS, "targets": list(layers),
                "base_model": {"name_or_path": str(model_dir), "revision": None, "path": str(model_dir),
                               "dtype": settings.dtype_name, "trust_remote_code": False,
                               "fingerprint": hub.fingerprint(model_dir)}}
        checkpoint.save_adapter(model, folder, meta)
    finally:
        snapshot.restore()
    return folder


def timed_process(result: SuiteResult, settings: Settings, key: str, name: str, args: list[str], out,
                  baseline: str | None = None) -> None:
    log = settings.workdir / f"merge-{key}.log"

    def clean():
        shutil.rmtree(out, ignore_errors=True)

    clean()
    runs = measure(lambda: run_process(args, log, check_imports=settings.smoke), settings, teardown=clean)
    peak = max(v["peak_mib"] for v in runs.values)
    result.add(from_runs(key, name, "q/v", runs, baseline=baseline,
                         extra={"peak host memory MiB": peak, "imports_datasets": datasets_imports(runs.values)}))


def run(settings: Settings, pool, peft=None, peft_reason=None) -> SuiteResult:
    result = SuiteResult("merge", info={"adapter": "SARA tau 0.01 on q/v", "dtype": settings.dtype_name})
    model_dir = pool.checkpoint()
    adapter = make_adapter(pool.model(), model_dir, settings.workdir / "sara-adapter", settings)
    pool.release()  # merge is the last suite on the 7B model; its processes get the memory
    out = settings.workdir / "merge-out"
    timed_process(result, settings, "plain", "plain from_pretrained + save_pretrained (CPU)",
                  [str(REPO / "bench" / "plain_roundtrip.py"), str(model_dir), str(out)], out)
    merge = ["-m", "sara_cli", "merge", str(adapter), "--out", str(out)]
    timed_process(result, settings, "sara-merge", "sara merge (default, verified)", merge, out, "plain")
    if settings.smoke:  # each process start costs seconds on a CI runner
        result.add(Measurement("sara-merge-no-verify", "sara merge --no-verify", "q/v", "s",
                               skipped="--smoke runs the default command only"))
    else:
        timed_process(result, settings, "sara-merge-no-verify", "sara merge --no-verify",
                      merge + ["--no-verify"], out, "plain")
    result.targets.append(ratio_target("sara merge (default) vs plain round trip", result.get("sara-merge"),
                                       result.get("plain"), "<=", 1.3))
    return result
