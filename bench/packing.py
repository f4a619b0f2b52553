"""Training tokens per second with and without `data.packing`, on the quickstart recipe, on the CPU.

    python bench/packing.py                              # 1 epoch each way, prints a table
    python bench/packing.py --epochs 2 --out packing.json
    python bench/packing.py --model builtin:smollm2-135m-instruct --out packing-smollm2.json

Each layout trains recipes/quickstart.yaml (Mo-SARA on q_proj, v_proj, 400 MAWPS records) from
the same start, with the bench's own settings pinned over the recipe's: the model (default
builtin:tiny-llama), batch 16, cutoff_len 256, whole epochs (no max_steps). Tokens per second is
the records' real tokens (padding not counted; the same count both ways) times the epochs, over the Trainer's
`train_runtime` (the training loop only: no model build, no tokenization). The third layout is
what flash-attention kernels get (each batch flattened into one row); sara uses it only with
them, and it is timed here to show why not with sdpa. Results are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # sara_cli from this checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
LAYOUTS = {"padded": False, "packed": True, "packed, one row per batch (flash layout)": True}


# Pinned so that a change to the quickstart recipe cannot change what this bench measures:
# cutoff 256 leaves room for two or three of these records (64-216 tokens) in one sequence.
PINNED = ["data.cutoff_len=256", "train.per_device_train_batch_size=16", "train.max_steps=-1"]


def run(layout: str, epochs: float, workdir: Path, model: str) -> dict:
    from unittest import mock

    from sara_cli.data import packing
    from sara_cli.data.dataset import load_split, tokenize_split
    from sara_cli.recipe import load_recipe
    from sara_cli.training.train import train

    out = workdir / layout.split(",")[0].replace(" ", "-")
    recipe = load_recipe(RECIPE, [*PINNED, f"model.name_or_path={model}",
                                  f"train.output_dir={out}", f"train.num_train_epochs={epochs}",
                                  "train.save_steps=100000", "train.logging_steps=100000",
                                  f"data.packing={str(LAYOUTS[layout]).lower()}"])
    real = packing.collator_for
    flatten = layout.endswith("(flash layout)")

    def collator(model, tokenizer):
        chosen = real(model, tokenizer)
        chosen.flatten = flatten
        return chosen

    load = os.getloadavg()[0]
    with mock.patch.object(packing, "collator_for", collator):
        summary = train(recipe, resume=False, overwrite=True)
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    runtime = next(r["train_runtime"] for r in log if "train_runtime" in r)
    from transformers import AutoTokenizer

    from sara_cli.model import builtin

    tokenizer = AutoTokenizer.from_pretrained(builtin.model_path(recipe.model.name_or_path))
    stats = tokenize_split(load_split(recipe.data, recipe.train.seed), recipe.data, tokenizer,
                           recipe.train.seed).stats["train"]
    tokens = stats.tokens * epochs
    return {"layout": layout, "steps": summary["steps"], "train_runtime_s": runtime,
            "tokens": tokens, "tokens_per_s": tokens / runtime, "s_per_step": runtime / summary["steps"],
            "sequences_per_epoch": stats.packs or stats.records, "load_1min_before": load,
            "load_1min_after": os.getloadavg()[0]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python bench/packing.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs per layout (default 1)")
    parser.add_argument("--model", default="builtin:tiny-llama", help="base model (default builtin:tiny-llama)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    import torch

    results = []
    with tempfile.TemporaryDirectory(prefix="sara-packing-") as tmp:
        for layout in LAYOUTS:
            results.append(run(layout, args.epochs, Path(tmp), args.model))
    base = results[0]["tokens_per_s"]
    print(f"{'layout':<42} {'steps':>5} {'seqs/epoch':>10} {'s/step':>7} {'tokens/s':>9} {'vs padded':>9} "
          f"{'load before/after':>17}")
    for r in results:
        print(f"{r['layout']:<42} {r['steps']:>5} {r['sequences_per_epoch']:>10} {r['s_per_step']:>7.3f} "
              f"{r['tokens_per_s']:>9,.0f} {r['tokens_per_s'] / base:>8.2f}x "
              f"{r['load_1min_before']:>8.2f}/{r['load_1min_after']:.2f}")
    machine = {"model": args.model, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(["python", "bench/packing.py", *argv])}
    print(json.dumps(machine))
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
