"""Compact against full Mo-SARA adapter files: size, load time (cold and warm spectrum cache) and the
largest logit difference (docs/methods.md, "Compact adapter files").

    python bench/compact_files.py --out compact.json
    python bench/compact_files.py --base /path/to/checkpoint --tau 0.5 --experts 5
    python bench/compact_files.py --run runs/quickstart      # a trained compact run, saved again full

One Mo-SARA adapter (the quickstart's settings: q/v, tau 0.5, m 5) is built on the base from its
files, its v and lambda are drawn at random (seeded) so the branch matters, and it is saved once
full and once compact. Each file is then loaded as `sara eval`/`chat` load a run
(`load_adapter_model`): the full file once, the compact one with an empty spectrum cache (cold)
and again (warm). The logits of both loads on a few prompts are compared. The sizes of a
LLaMA-7B-shaped q/v adapter are computed from the layout for several k (no weights needed).
With --run, the adapter is a trained run's compact file instead, and its full twin is that run
loaded (its vectors rebuilt) and saved again with `storage: full`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPTS = ["Tom has 7 apples and eats 2. How many apples are left?",
           "A baker made 24 muffins and sold 15. How many muffins remain?",
           "Below is an instruction that describes a task. Write a response."]
LLAMA_7B_QV = {"layers": 32, "modules": [(4096, 4096), (4096, 4096)]}  # q_proj, v_proj: (out, in)


def file_bytes(k: int, out_features: int, in_features: int, experts: int, compact: bool) -> int:
    """Bytes of one module's tensors in an adapter file (float32; the fingerprint float64)."""
    from sara_cli.adapters.frozen import PROBE_SIZE

    trained = experts * k + out_features + k + experts  # lambda, v (after), W_g1, W_g2
    kept = 2 * k * PROBE_SIZE + 2 * PROBE_SIZE * PROBE_SIZE  # probes (float32), fingerprint (float64)
    vectors = 0 if compact else k * (out_features + in_features)
    return 4 * (trained + kept + vectors)


def llama7b_sizes(experts: int, ks=(128, 256, 512, 1024)) -> list[dict]:
    """Full and compact q/v adapter sizes of a LLaMA-7B shape, for the same k in every module."""
    rows = []
    for k in ks:
        sizes = {kind: LLAMA_7B_QV["layers"] * sum(file_bytes(k, o, i, experts, kind == "compact")
                                                   for o, i in LLAMA_7B_QV["modules"])
                 for kind in ("full", "compact")}
        rows.append({"k": k, **sizes})
    return rows


def build(model_dir: Path, folder: Path, tau: float, experts: int) -> dict:
    """Save the adapter full and compact into folder/{full,compact}; returns sizes and ks."""
    import torch
    from transformers import AutoModelForCausalLM

    from sara_cli.adapters import checkpoint
    from sara_cli.adapters.initialize import CheckpointWeights
    from sara_cli.adapters.inject import inject_adapters
    from sara_cli.model import hub

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    options = {"tau": tau, "num_experts": experts, "v_position": "after", "dropout": 0.0}
    torch.manual_seed(0)
    started = time.perf_counter()
    layers = inject_adapters(model, "mosara", options, "q_proj,v_proj", weights=CheckpointWeights(model_dir))
    init_s = time.perf_counter() - started
    with torch.no_grad():
        for layer in layers.values():
            layer.mosara_v.normal_(0.0, 0.05)
    meta = {"method": "mosara", "targets": list(layers),
            "base_model": {"name_or_path": str(model_dir), "revision": None, "dtype": "float32",
                           "trust_remote_code": False, "fingerprint": hub.fingerprint(model_dir)}}
    sizes = {}
    for storage in ("full", "compact"):
        adapter = folder / storage
        checkpoint.save_adapter(model, adapter, {**meta, "options": {**options, "storage": storage}})
        sizes[storage] = (adapter / checkpoint.WEIGHTS_NAME).stat().st_size
    ks = [layer.k for layer in layers.values()]
    stored = json.loads((folder / "compact" / checkpoint.CONFIG_NAME).read_text())["stored_factors"]
    return {"bytes": sizes, "k_min": min(ks), "k_median": sorted(ks)[len(ks) // 2], "k_max": max(ks),
            "modules": len(ks), "modules_stored_full": len(stored), "init_cold_s": init_s}


def from_run(run: Path, folder: Path) -> dict:
    """A trained compact run's adapter copied to folder/compact, and saved again full in folder/full."""
    import shutil

    from sara_cli.adapters import checkpoint
    from sara_cli.model import hub

    adapter = checkpoint.find_adapter_dir(run)
    config = checkpoint.read_config(adapter)
    if checkpoint.storage(config["options"]) != "compact":
        raise SystemExit(f"{run} is not a compact Mo-SARA run")
    # Name the base by its folder, so that loads under another SARA_HOME (a cold cache) find it.
    config["base_model"]["name_or_path"] = str(hub.resolve_model_dir(config["base_model"]["name_or_path"]))
    shutil.copytree(adapter, folder / "compact")
    (folder / "compact" / checkpoint.CONFIG_NAME).write_text(json.dumps(config))
    model, _, _ = checkpoint.load_adapter_model(folder / "compact", device="cpu")
    meta = {k: v for k, v in config.items() if k not in ("ranks", "sara_version", "storage", "stored_factors")}
    checkpoint.save_adapter(model, folder / "full", {**meta, "options": {**config["options"], "storage": "full"}})
    ks = list(config["ranks"].values())
    return {"run": str(run), "bytes": {s: (folder / s / checkpoint.WEIGHTS_NAME).stat().st_size
                                       for s in ("full", "compact")},
            "k_min": min(ks), "k_median": sorted(ks)[len(ks) // 2], "k_max": max(ks), "modules": len(ks),
            "modules_stored_full": len(config["stored_factors"])}


def load(adapter: Path):
    """(seconds, logits of PROMPTS) for one `load_adapter_model` call."""
    import torch

    from sara_cli.adapters.checkpoint import load_adapter_model

    started = time.perf_counter()
    model, tokenizer, _ = load_adapter_model(adapter, device="cpu")
    seconds = time.perf_counter() - started
    with torch.no_grad():
        logits = [model(**tokenizer(p, return_tensors="pt")).logits[0] for p in PROMPTS]
    return seconds, logits


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--run", type=Path, default=None, help="A trained compact Mo-SARA run instead of --base.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = parser.parse_args(argv)

    import torch

    from sara_cli.model import hub

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            result = from_run(args.run, Path(tmp))  # in the usual cache (the run's base is there)
            os.environ["SARA_HOME"] = str(Path(tmp) / "home")  # an empty spectrum cache: cold
        else:
            model_dir = hub.resolve_model_dir(args.base)  # a built-in is materialised in the usual cache
            os.environ["SARA_HOME"] = str(Path(tmp) / "home")
            result = {"base": args.base, "tau": args.tau, "experts": args.experts,
                      **build(model_dir, Path(tmp), args.tau, args.experts)}
        import shutil

        shutil.rmtree(Path(tmp) / "home", ignore_errors=True)  # init filled it: cold again
        result["load_full_s"], full = load(Path(tmp) / "full")
        result["load_compact_cold_s"], cold = load(Path(tmp) / "compact")
        result["load_compact_warm_s"], warm = load(Path(tmp) / "compact")
    result["max_abs_logit_diff"] = max(float((a - b).abs().max()) for a, b in zip(full, cold + warm))
    result["llama7b_qv"] = llama7b_sizes(args.experts)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
