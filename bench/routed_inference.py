"""Generation time per token: the base against the same base with a routed (unmerged) Mo-SARA
adapter, side by side in one process (docs/benchmarks.md, "Routed Mo-SARA inference").

    python bench/routed_inference.py --out routed.json                      # CPU, the quickstart base
    python bench/routed_inference.py --device cuda --dtype float32 --out routed-gpu.json

Callable from a suite: `measure(base=..., device=..., ...)` returns the same dict the JSON holds.

One model is loaded; Mo-SARA (q/v, tau 0.5, m 5 by default) is wrapped around it from the files,
with v and lambda drawn at random so the branch is not zero. Each round times greedy generation
of the same prompts (one batch) for every variant, in turn:
- base:       the adapter layers swapped out for their base layers (the very same weights);
- reference:  the routed adapter through its training code path (`fast_inference` off);
- fast:       the routed adapter through its inference path (`MoSaraLayer.forward` in eval mode
              without autograd: no dropout or gate bookkeeping, the router multiplied out once).
Per variant and round, the time per generated token is (t(N new tokens) - t(1 new token)) / (N - 1),
so the prompt's forward pass drops out. Medians over the rounds; ratios against the base. On the
CPU the process's CPU time is recorded beside the wall clock: on a shared machine it is the figure
that other jobs do not move (with one torch thread).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPTS = ["Tom has 7 apples and eats 2. How many apples are left?",
           "A baker made 24 muffins and sold 15. How many muffins remain?",
           "Sara reads 12 pages a day. How many pages does she read in 5 days?",
           "A train travels 60 miles in 1.5 hours. What is its average speed?"]


@contextmanager
def without_adapters(layers: dict, model):
    """The model with every adapter layer replaced by its base layer, restored afterwards."""
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    try:
        yield
    finally:
        for name, layer in layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def generate_seconds(model, batch, new_tokens: int, device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one greedy generation of `new_tokens`."""
    import torch

    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=model.config.pad_token_id)
    _sync(device)
    assert out.shape[1] == batch["input_ids"].shape[1] + new_tokens
    return time.perf_counter() - wall, time.process_time() - cpu


def build(base: str, device: str, dtype: str, tau: float, experts: int, targets: str):
    import torch

    from sara_cli.adapters.initialize import CheckpointWeights
    from sara_cli.adapters.inject import inject_adapters
    from sara_cli.model import hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = hub.resolve_model_dir(base)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = None  # every run generates exactly N tokens
    torch.manual_seed(0)
    options = {"tau": tau, "num_experts": experts, "v_position": "after", "dropout": 0.0}
    layers = inject_adapters(model, "mosara", options, targets, weights=CheckpointWeights(model_dir, device=device))
    with torch.no_grad():
        for layer in layers.values():
            layer.mosara_v.normal_(0.0, 0.05)
    model.eval()
    return model, tokenizer, layers


def measure(base: str = "builtin:smollm2-135m-instruct", device: str = "cpu", dtype: str = "float32",
            tau: float = 0.5, experts: int = 5, targets: str = "q_proj,v_proj", batch_size: int = 1,
            new_tokens: int = 32, rounds: int = 5, threads: int | None = None) -> dict:
    """Time per generated token of the base and the routed adapter (see the module docstring)."""
    import torch

    from sara_cli.adapters.mosara import MoSaraLayer

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer, layers = build(base, device, dtype, tau, experts, targets)
    prompts = (PROMPTS * batch_size)[:batch_size]
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    variants = {"base": (False, True), "reference": (True, False), "fast": (True, True)}
    times: dict[str, list[float]] = {name: [] for name in variants}  # wall
    cpu_times: dict[str, list[float]] = {name: [] for name in variants}
    agree = {}
    for round_index in range(rounds + 1):  # round 0 warms up and is dropped
        for name, (adapted, fast) in variants.items():
            MoSaraLayer.fast_inference = fast
            context = without_adapters(layers, model) if not adapted else _nothing()
            with context:
                one = generate_seconds(model, batch, 1, device)
                full = generate_seconds(model, batch, new_tokens, device)
            if round_index:
                times[name].append((full[0] - one[0]) / (new_tokens - 1))
                cpu_times[name].append((full[1] - one[1]) / (new_tokens - 1))
    MoSaraLayer.fast_inference = True
    with torch.inference_mode():  # the two routed paths compute the same model
        logits = {}
        for fast in (False, True):
            MoSaraLayer.fast_inference = fast
            logits[fast] = model(**batch).logits.float()
        MoSaraLayer.fast_inference = True
        agree["max_abs_logit_diff_fast_vs_reference"] = float((logits[True] - logits[False]).abs().max())
    per_token = {name: statistics.median(values) for name, values in times.items()}
    cpu_per_token = {name: statistics.median(values) for name, values in cpu_times.items()}
    ks = [layer.k for layer in layers.values()]
    return {
        "base": base, "device": device, "dtype": dtype, "tau": tau, "experts": experts, "targets": targets,
        "modules": len(layers), "k_min": min(ks), "k_median": sorted(ks)[len(ks) // 2], "k_max": max(ks),
        "batch_size": batch_size, "new_tokens": new_tokens, "rounds": rounds,
        "threads": torch.get_num_threads(),
        "machine": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine(),
        "seconds_per_token": per_token,
        "all_seconds_per_token": times,
        "ratio": {name: per_token[name] / per_token["base"] for name in per_token},
        # On a shared CPU the wall clock counts other jobs' time too; the process's CPU time
        # (one thread: all of torch's work runs on it) counts only this one's.
        "cpu_seconds_per_token": cpu_per_token,
        "cpu_ratio": {name: cpu_per_token[name] / cpu_per_token["base"] for name in cpu_per_token},
        "all_cpu_seconds_per_token": cpu_times,
        **agree,
    }


@contextmanager
def _nothing():
    yield


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    result = measure(args.base, args.device, args.dtype, args.tau, args.experts, args.targets,
                     args.batch_size, args.new_tokens, args.rounds, args.threads)
    result["command"] = "python bench/routed_inference.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("all_")}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
