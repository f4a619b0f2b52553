"""Adapter init from the checkpoint files on the CPU: time with and without the spectrum cache, and
peak host memory against the number of layers (docs/benchmarks.md, "Init from the files").

    python bench/cpu_init.py --out cpu-init.json
    python bench/cpu_init.py --layers 2 4 --hidden 256 --intermediate 688 --out /tmp/c.json   # quick

For each layer count a Llama-shaped float32 checkpoint with seeded random weights is saved once
into --workdir. Each measurement runs in its own process, which builds the model and then resets
its resident-memory high-water mark (/proc/self/clear_refs) before init, so "init peak" is what
init itself added:
- files:  the model on the meta device (no weights in memory) and init reading each W from disk,
          which is how `sara train` initialises a 4-bit base or a rank without the weights;
- loaded: the model loaded in float32, init from its own weights (the old route).
SARA all-linear, tau 0.5. Timing (model loaded, not timed; init reads the files as `sara train`
does): SARA (values), Mo-SARA tau 0.05 and PiSSA r 16 (vectors) on all-linear, each with an empty
cache and then with the cache filled by that first run. One thread per process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bench.harness import REPO, LlamaShape, child_env  # noqa: E402

MIB = 2**20


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Set VmHWM to the current resident size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def checkpoint(shape: LlamaShape, workdir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from bench.models import llama_config, load_tokenizer

    folder = workdir / f"llama-h{shape.hidden_size}-i{shape.intermediate_size}-l{shape.num_hidden_layers}"
    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=torch.float32)
        model.save_pretrained(folder)
        load_tokenizer().save_pretrained(folder)
    return folder


def child_memory(folder: str, route: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sara_cli.adapters.initialize import CheckpointWeights
    from sara_cli.adapters.inject import inject_adapters

    torch.set_num_threads(1)
    if route == "files":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
        weights = CheckpointWeights(Path(folder), "cpu", use_cache=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        weights = None
    before = rss_mib("VmRSS")
    reset_peak()
    started = time.perf_counter()
    layers = inject_adapters(model, "sara", {"tau": 0.5}, "all-linear", weights=weights)
    seconds = time.perf_counter() - started
    return {"route": route, "modules": len(layers), "rss_before_mib": before,
            "peak_mib": rss_mib("VmHWM"), "init_peak_mib": rss_mib("VmHWM") - before, "seconds": seconds}


def child_timing(folder: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from sara_cli.adapters.initialize import CheckpointWeights
    from sara_cli.adapters.inject import inject_adapters

    torch.set_num_threads(1)
    os.environ["SARA_HOME"] = tempfile.mkdtemp(prefix="sara-cache-")  # an empty cache
    out = {}
    for method, options in (("sara", {"tau": 0.5}), ("mosara", {"tau": 0.05, "num_experts": 5}),
                            ("pissa", {"rank": 16, "svd": "lowrank"})):
        for label in ("cold", "warm"):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # PiSSA writes W_res
            weights = CheckpointWeights(Path(folder), "cpu")
            weights.fingerprint  # not part of init's decompositions; paid once per run either way
            started = time.perf_counter()
            inject_adapters(model, method, options, "all-linear", weights=weights)
            out[f"{method} {label}"] = time.perf_counter() - started
    from sara_cli.model.cache import SpectrumCache

    out["cache MiB"] = SpectrumCache(CheckpointWeights(Path(folder)).fingerprint).size_bytes() / MIB
    return out


def run_child(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                            env={**child_env(), "OMP_NUM_THREADS": "1"}, cwd=REPO, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python bench/cpu_init.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("cpu-init.json"))
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2752)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sara-cpu-init")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        print(json.dumps(child_memory(*rest) if kind == "memory" else child_timing(*rest)))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    rows = []
    for layers in args.layers:
        shape = LlamaShape(args.hidden, layers, args.intermediate, 1024, 16, 16)
        folder = checkpoint(shape, args.workdir)
        for route in ("files", "loaded"):
            row = {"layers": layers, **run_child("memory", str(folder), route)}
            rows.append(row)
            print(f"{layers:>3} layers  {route:<6}  {row['modules']:>4} modules  init {row['seconds']:7.2f} s  "
                  f"process peak {row['peak_mib']:8.1f} MiB  init added {row['init_peak_mib']:7.1f} MiB", flush=True)
    largest = LlamaShape(args.hidden, args.layers[-1], args.intermediate, 1024, 16, 16)
    timing = run_child("timing", str(checkpoint(largest, args.workdir)))
    for key, value in timing.items():
        print(f"{args.layers[-1]} layers, all-linear: {key}: {value:.2f}" + ("" if "MiB" in key else " s"))
    tensor_mib = args.hidden * args.intermediate * 4 / MIB
    result = {"shape": {"hidden": args.hidden, "intermediate": args.intermediate}, "largest tensor MiB": tensor_mib,
              "memory": rows, "timing": {"layers": args.layers[-1], **timing},
              "load average at start": load, "load average at end": os.getloadavg(), "cpus": os.cpu_count(),
              "command": "python bench/cpu_init.py " + " ".join(argv)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"largest tensor {tensor_mib:.1f} MiB (float32); load average {load} -> {os.getloadavg()}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
