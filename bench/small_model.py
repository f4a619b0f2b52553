"""Save a small Llama with seeded random weights, built from a config on the device, for gpu_run.

    python bench/small_model.py FOLDER --device cuda --dtype bfloat16 --hidden-size 1024 --layers 4

The weights come from the config's own initialiser (normal, std 0.02) under seed 0, created
directly on the device: no download. The folder also gets the bundled tokenizer (ids 0..1023,
valid in any vocabulary of at least 1024). A folder that already holds the same model is kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# As in bench/run.py: `bench` and `sara_cli` import from this checkout.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.harness import LlamaShape  # noqa: E402
from bench.models import llama_config, save_checkpoint  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/small_model.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where to save the checkpoint")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--intermediate-size", type=int, default=None, help="default: about 2.75 x hidden")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2, help="fewer than --heads: grouped KV, so v_proj "
                        "is not square")
    parser.add_argument("--vocab-size", type=int, default=1024)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch
    from transformers import AutoModelForCausalLM

    intermediate = args.intermediate_size or 16 * round(2.75 * args.hidden_size / 16)
    shape = LlamaShape(args.hidden_size, args.layers, intermediate, args.vocab_size, args.heads, args.kv_heads)
    marker = {"shape": vars(shape), "dtype": args.dtype, "seed": 0}
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=getattr(torch, args.dtype))
    save_checkpoint(model, args.folder, marker)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{shape.label()}, {args.dtype}, {parameters:,} parameters, built on {args.device}: {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
