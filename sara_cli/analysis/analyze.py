"""`sara analyze`: per-layer SARA rank k for one or more tau, straight from safetensors.

No model is built: only the targeted tensors are read, one at a time, so any architecture works
and memory stays at a few matrices. One spectrum per matrix serves every tau.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sara_cli.model import hub
from sara_cli.errors import SaraError
from sara_cli.names import layer_of, natural_key
from sara_cli.model.spectrum import check_tau, ranks_for_taus

DEFAULT_TARGETS = ["q_proj", "v_proj"]
# 2-D weights that are never adapter targets under all-linear.
NON_LINEAR = re.compile(r"(embed|wte|wpe|lm_head|embed_out|output_layer|norm|ln_)", re.IGNORECASE)


@dataclass
class MatrixResult:
    name: str  # module path: tensor name without ".weight"
    layer: int | None
    module: str
    shape: tuple[int, int]  # (out, in), also for Conv1D
    k: list[int]  # aligned with the taus
    spectrum: "object" = field(repr=False, default=None)  # float64 tensor, kept for --match-lora-rank


@dataclass
class Analysis:
    model: str
    targets: list[str]
    taus: list[float]
    total_params: int
    seconds: float
    matrices: list[MatrixResult]
    left_out: list[str] = field(default_factory=list)  # weights no target reaches (inject.left_out)

    def to_json(self) -> dict:
        """The documented --json schema."""
        return {
            "model": self.model, "targets": self.targets, "taus": self.taus,
            "total_params": self.total_params, "seconds": round(self.seconds, 3),
            "matrices": [{"name": m.name, "layer": m.layer, "module": m.module,
                          "shape": list(m.shape), "k": m.k} for m in self.matrices],
        }


def check_outputs(model: str, json_path: Path | None, plot_path: Path | None) -> None:
    """Fail before any work when --json or --plot cannot be written, or would overwrite the
    model or the spectrum cache that analyze reads.

    Raises:
        SaraError: naming the flag and the path.
    """
    from sara_cli.files import check_apart, check_output_file
    from sara_cli.model.builtin import is_builtin
    from sara_cli.model.cache import cache_root

    inputs = [("the spectrum cache", cache_root())]
    if not is_builtin(model) and Path(model).expanduser().exists():
        inputs.append(("the model", Path(model)))
    check_apart([("--json", json_path), ("--plot", plot_path)], inputs, "analyze")
    for path, flag in ((json_path, "--json"), (plot_path, "--plot")):
        if path is not None:
            check_output_file(path, flag)


def target_tensors(model_dir: Path, index: dict, targets: list[str]) -> tuple[list[str], list[str]]:
    """(checkpoint tensor names of the matrices `sara train` would wrap for `targets`, layers in
    numeric order; the weights no target reaches). Both come from the one resolver train uses
    (`inject.model_targets`), run on the model built on the meta device from its config.

    Raises:
        SaraError: a target matches no linear layer (naming those that exist), or the model
            cannot be built from its config.
    """
    from sara_cli.adapters.inject import model_targets
    from sara_cli.model.loading import skeleton

    modules, left_out = model_targets(skeleton(model_dir), targets)
    mapping = hub.match_tensor_names(modules, list(index), strict=False)  # {tensor: module}
    missing = sorted(set(modules) - set(mapping.values()))
    if missing:
        raise SaraError(f"{model_dir} has no unique weight for {missing[0]} (of {len(missing)} targeted "
                        "modules); re-download or re-save the checkpoint")
    return sorted(mapping, key=natural_key), left_out


def select_matrices(index: dict, targets: list[str]) -> list[str]:
    """Tensor names of the targeted 2-D weights, layers in numeric order (not the header's string order).

    Raises:
        SaraError: a target matches nothing; the message lists the module names present.
    """
    weights = [n for n, (_, e) in index.items() if n.endswith(".weight") and len(e["shape"]) == 2]
    modules = {n: n[: -len(".weight")] for n in weights}
    if targets == ["all-linear"]:
        chosen = [n for n in weights if not NON_LINEAR.search(n)]
    else:
        chosen = []
        for t in targets:
            hits = [n for n in weights if modules[n] == t or modules[n].endswith("." + t)]
            if not hits:
                present = sorted({m.split(".")[-1] for m in modules.values()})
                raise SaraError(f"target '{t}' matches no 2-D weight; this checkpoint has: "
                                f"{', '.join(present)}; pass --targets with some of these names, or all-linear")
            chosen.extend(hits)
    chosen = sorted(set(chosen), key=natural_key)
    if not chosen:
        raise SaraError("no linear weights found for all-linear; name targets with --targets")
    return chosen


def pick_device(device: str) -> str:
    """'auto' -> 'cuda' when available else 'cpu'; 'cuda' without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SaraError("--device cuda was given but no CUDA GPU is visible; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise SaraError(f"--device must be auto, cpu or cuda, got '{device}'")
    return device


def analyze(model: str, taus: list[float], targets: list[str] | None = None, device: str = "auto",
            on_start: Callable[[int], None] | None = None,
            on_matrix: Callable[[MatrixResult], None] | None = None) -> Analysis:
    """Compute k(W, tau) for every targeted matrix of a checkpoint.

    Args:
        model: local folder, builtin: name or hub id.
        taus: one or more tau in (0, 1].
        targets: module-name suffixes or ["all-linear"]; default q_proj, v_proj.
        on_start: called with the number of matrices before work starts.
        on_matrix: called with each result (for progress bars).

    Raises:
        SaraError: bad tau, missing model, no safetensors, targets that match nothing, NaN/inf.
    """
    import torch

    from sara_cli.adapters.initialize import CheckpointWeights, MatrixSource

    started = time.perf_counter()
    for tau in taus:
        try:
            check_tau(tau)
        except ValueError:
            raise SaraError(f"--tau {tau} is out of range; tau must be in (0, 1], e.g. 0.5") from None
    targets = targets or DEFAULT_TARGETS
    device = pick_device(device)
    model_dir = hub.resolve_model_dir(model)
    config = hub.load_config(model_dir)
    index = hub.tensor_index(model_dir)
    names, left_out = target_tensors(model_dir, index, targets)
    transposed = hub.is_conv1d_checkpoint(config)
    total_params = sum(_numel(e["shape"]) for _, e in index.values())
    if on_start:
        on_start(len(names))

    results = []
    weights = CheckpointWeights(model_dir, device)
    cached = {n for n in names if weights.cache is not None and weights.cache.values(n) is not None}
    tensors = hub.iter_tensors(model_dir, [n for n in names if n not in cached], index)
    # Read the next matrix from disk while the current one is decomposed.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(next, tensors, None)
        for name in names:
            if name in cached:
                W = None
            else:
                _, W = pending.result()
                pending = pool.submit(next, tensors, None)
                W = W.T if transposed else W
            stored = index[name][1]["shape"]
            shape = tuple(reversed(stored)) if transposed else tuple(stored)
            source = MatrixSource(name, lambda: W, weights.cache, device, shape)
            s = source.values()
            W = None
            source.release()
            module = name[: -len(".weight")]
            result = MatrixResult(name=module, layer=layer_of(module),
                                  module=module.split(".")[-1], shape=shape,
                                  k=ranks_for_taus(s, taus), spectrum=s.cpu())
            results.append(result)
            if on_matrix:
                on_matrix(result)
    if device == "cuda":
        torch.cuda.synchronize()
    results.sort(key=lambda m: natural_key(m.name))  # iteration goes file by file
    return Analysis(model=str(model), targets=targets, taus=list(taus), total_params=total_params,
                    seconds=time.perf_counter() - started, matrices=results, left_out=left_out)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def lora_count(matrices: list[MatrixResult], rank: int) -> int:
    """LoRA (and PiSSA) trainable parameters at rank r: sum of r (in + out)."""
    return rank * sum(m.shape[0] + m.shape[1] for m in matrices)


def sara_count(shape, k: int) -> int:
    """SARA trainable parameters of one (out, in) matrix at rank k: k (in + out) + k."""
    return k * (shape[0] + shape[1] + 1)


def mosara_count(shape, k: int, experts: int, v_before: bool = False) -> int:
    """Mo-SARA trainable parameters of one (out, in) matrix: m k + k + m, plus v (out, or in
    when v scales the input)."""
    return experts * k + k + experts + (shape[1] if v_before else shape[0])


def sara_params(matrices: list[MatrixResult], tau_index: int) -> int:
    """SARA trainable parameters: sum of k (in + out) + k."""
    return sum(sara_count(m.shape, m.k[tau_index]) for m in matrices)


def mosara_params(matrices: list[MatrixResult], tau_index: int, experts: int) -> int:
    """Mo-SARA trainable parameters: sum of m k + k + m + out."""
    return sum(mosara_count(m.shape, m.k[tau_index], experts) for m in matrices)


def match_lora_rank(matrices: list[MatrixResult], lora_rank: int) -> tuple[float, int, int]:
    """The tau whose SARA parameter count is closest to LoRA rank R's on the same matrices.

    Returns (tau, SARA params at that tau, LoRA params).
    """
    from sara_cli.model.spectrum import rank_for_tau

    lora = lora_count(matrices, lora_rank)

    def count(tau: float) -> int:
        return sum(sara_count(m.shape, rank_for_tau(m.spectrum, tau)) for m in matrices)

    tau, target = match_count(count, lora)
    return tau, target, lora


def match_count(count: Callable[[float], int], target: int) -> tuple[float, int]:
    """The tau in (0, 1] whose `count(tau)` is closest to `target`, and that count.

    The count is monotone in tau, so a bisection over tau finds the crossing; the closer
    neighbour wins. The tau returned is the shortest decimal that gives the same count, so a
    printed tau reproduces it. Past either end, the end's count is the nearest.
    """
    lo, hi = 1e-6, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    best = min((lo, hi), key=lambda t: (abs(count(t) - target), t))
    found = count(best)
    for digits in range(2, 17):
        short = float(f"{best:.{digits}g}")
        if 0 < short <= 1 and count(short) == found:
            return short, found
    return best, found


def mean_k_per_layer(matrices: list[MatrixResult], tau_index: int) -> dict[int, float]:
    layers: dict[int, list[int]] = {}
    for m in matrices:
        if m.layer is not None:
            layers.setdefault(m.layer, []).append(m.k[tau_index])
    return {layer: sum(ks) / len(ks) for layer, ks in sorted(layers.items())}


def figure(analysis: Analysis):
    """The figure `plot` saves: mean k per layer, one line per tau (the paper's Figures 2 and 8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for i, tau in enumerate(analysis.taus):
        per_layer = mean_k_per_layer(analysis.matrices, i)
        if per_layer:
            ax.plot(list(per_layer), list(per_layer.values()), marker="o", ms=3, label=f"tau = {tau:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.set_xlabel("layer")
    ax.set_ylabel("mean k")
    modules = ", ".join(sorted({m.module for m in analysis.matrices}))
    ax.set_title(f"SARA rank per layer: {Path(analysis.model).name or analysis.model}\n"
                 f"mean over {modules}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot(analysis: Analysis, path: Path) -> None:
    """Write `figure(analysis)` as a PNG."""
    import matplotlib.pyplot as plt

    from sara_cli.files import atomic_path

    fig = figure(analysis)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
