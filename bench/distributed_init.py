"""Identical adapters on every rank, two ways, timed (docs/benchmarks.md, "Init on several ranks").

    torchrun --standalone --nproc_per_node 2 bench/distributed_init.py --out dist-init.json

- all:   every rank reads the files and decomposes (sara's default), then a checksum of every adapter
         tensor is compared across ranks (`distributed.check_identical`);
- rank0: rank 0 decomposes; the ranks (k per module) are broadcast, the other ranks allocate
         adapters of those shapes, and every tensor is broadcast from rank 0 (what FSDP's
         RAM-efficient loading does, there through accelerate).
Method Mo-SARA tau 0.05 (vectors to move) and SARA tau 0.5 (values only) on all-linear of a
Llama-shaped float32 model (saved once with bench/cpu_init.py's builder); no spectrum cache.
Each way is timed from a barrier to a barrier; the slowest rank counts. On the CPU both ranks
share the machine's cores, so "all" decomposes twice on the same hardware; on GPUs each rank has
its own device.
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
os.environ["SARA_SPECTRUM_CACHE"] = "0"


def timed(fn, model) -> float:
    import torch.distributed as dist

    dist.barrier()
    started = time.perf_counter()
    fn(model)
    dist.barrier()
    return time.perf_counter() - started


def main(argv: list[str]) -> int:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from bench.cpu_init import checkpoint
    from bench.harness import LlamaShape
    from sara_cli.training import distributed
    from sara_cli.adapters.initialize import CheckpointWeights
    from sara_cli.adapters.inject import inject_adapters

    parser = argparse.ArgumentParser(prog="torchrun ... bench/distributed_init.py")
    parser.add_argument("--out", type=Path, default=Path("dist-init.json"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2752)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sara-cpu-init")
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // dist.get_world_size()))
    shape = LlamaShape(args.hidden, args.layers, args.intermediate, 1024, 16, 16)
    if rank == 0:
        args.workdir.mkdir(parents=True, exist_ok=True)
        checkpoint(shape, args.workdir)
    dist.barrier()
    folder = checkpoint(shape, args.workdir)
    results = {}
    for method, options in (("sara", {"tau": 0.5}), ("mosara", {"tau": 0.05, "num_experts": 5})):
        def all_ranks(model):
            layers = inject_adapters(model, method, options, "all-linear", weights=CheckpointWeights(folder, "cpu"))
            results[f"{method} all: agreed"] = distributed.check_identical(layers)

        def rank0(model):
            if rank == 0:
                layers = inject_adapters(model, method, options, "all-linear", weights=CheckpointWeights(folder, "cpu"))
                distributed.share_ranks({n: layer.rank() for n, layer in layers.items()})
            else:
                layers = inject_adapters(model, method, options, "all-linear", ranks=distributed.share_ranks(None),
                                         initialize=False)
            distributed.broadcast_from_rank0(distributed.synchronized_tensors(layers))

        for name, fn in (("all", all_ranks), ("rank0", rank0)):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # not timed
            torch.manual_seed(0)  # as `sara train` seeds every rank alike before the adapters
            seconds = torch.tensor([timed(fn, model)])
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            results[f"{method} {name} s"] = float(seconds)
    if rank == 0:
        results.update({"ranks": dist.get_world_size(), "shape": vars(shape), "load average": os.getloadavg(),
                        "threads per rank": torch.get_num_threads(),
                        "note": "init only: the model is loaded on every rank before the clock starts"})
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        for key, value in results.items():
            print(f"{key}: {value}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
