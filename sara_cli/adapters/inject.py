"""Find target layers, wrap them with adapters, freeze the base, count parameters."""

from __future__ import annotations

from typing import Callable

from torch import nn

from sara_cli.adapters.registry import PREFIXES, AdapterLayer, build_layer
from sara_cli.adapters.base import QUANTIZED_LAYERS, is_conv1d
from sara_cli.errors import SaraError

ALL_LINEAR = "all-linear"
# Attention projections that hold query, key and value in one matrix (GPT-2, Phi-3, GPT-NeoX, MPT).
FUSED_ATTENTION = ("c_attn", "qkv_proj", "query_key_value", "Wqkv")


def parse_targets(targets: str | list[str]) -> list[str]:
    """'q_proj,v_proj' or ['q_proj', 'v_proj'] or 'all-linear' -> list of names."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")]
    targets = [t for t in targets if t]
    if not targets:
        raise SaraError("no targets given: name module suffixes such as q_proj,v_proj, or all-linear")
    return targets


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_names(model: nn.Module) -> list[str]:
    """Names of every linear (nn.Linear or Conv1D) module except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules()
            if _is_linear(module) and module is not head and name.split(".")[-1] != "lm_head"]


def find_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Module names matching `targets`: suffixes such as 'q_proj' or 'all-linear'.

    Raises:
        SaraError: a target matches nothing (the message lists the names that exist).
    """
    targets = parse_targets(targets)
    candidates = linear_names(model)
    if targets == [ALL_LINEAR]:
        if not candidates:
            raise SaraError("all-linear found no linear layers in this model")
        return candidates
    matched = [n for n in candidates if any(n == t or n.endswith("." + t) for t in targets)]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in candidates):
            existing = sorted({n.split(".")[-1] for n in candidates})
            unreachable = left_out(model)
            why = (f"; {', '.join(unreachable)} are not linear layers, which sara leaves out"
                   if unreachable else "")
            fused = [name for name in FUSED_ATTENTION if name in existing]
            if fused and t in ("q_proj", "k_proj", "v_proj"):
                why += (f"; this model fuses the query, key and value projections into {fused[0]}: "
                        f"target {fused[0]} (k is then taken over the whole fused matrix, see docs/methods.md)")
            raise SaraError(f"target '{t}' matches no linear layer; this model has: "
                            f"{', '.join(existing)} (or use all-linear){why}")
    return matched


def left_out(model: nn.Module) -> list[str]:
    """The weights no target reaches, one entry per kind: parameters of two or more dimensions
    outside every nn.Linear/Conv1D layer, the embeddings and output head aside. In transformers 5
    a mixture-of-experts block keeps all its experts in one 3-D tensor per projection, and its
    router is no nn.Linear: sara adapts neither (see docs/methods.md, targets).

    Returns:
        e.g. ["mlp.experts.gate_up_proj (3-D, in Qwen3MoeExperts, 2 layers)"].
    """
    import re

    reachable = {id(m.weight) for m in model.modules() if _is_linear(m) and getattr(m, "weight", None) is not None}
    for get in ("get_input_embeddings", "get_output_embeddings"):
        embedding = getattr(model, get, lambda: None)()
        if embedding is not None and getattr(embedding, "weight", None) is not None:
            reachable.add(id(embedding.weight))
    kinds: dict[str, list] = {}
    for name, param in model.named_parameters():
        if param.dim() < 2 or id(param) in reachable or is_adapter_parameter(name):
            continue
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        kind = re.split(r"\.\d+\.", name)[-1]
        if kind in kinds:
            kinds[kind][2] += 1
        else:
            kinds[kind] = [param.dim(), type(owner).__name__, 1]
    return [f"{kind} ({dim}-D, in {owner}, {count} layer{'s' * (count != 1)})"
            for kind, (dim, owner, count) in kinds.items()]


def model_targets(model: nn.Module, targets: str | list[str]) -> tuple[list[str], list[str]]:
    """The one target resolver that train and analyze share: (module names `targets` selects,
    `left_out(model)`)."""
    return find_targets(model, targets), left_out(model)


def inject_adapters(model: nn.Module, method: str, options: dict, targets: str | list[str],
                    ranks: dict[str, int] | None = None, initialize: bool = True,
                    on_module: Callable[[str], None] | None = None, weights=None) -> dict[str, AdapterLayer]:
    """Wrap every target of `model` in place and freeze everything but the adapters.

    Args:
        ranks: known rank per module name (from a saved adapter); skips the SVD rank rule.
        initialize: False allocates adapters for loading a state, with no decomposition.
        on_module: called with each module name after it is wrapped (progress reporting).
        weights: an initialize.CheckpointWeights: init reads each W from the checkpoint files
            (one at a time, cached spectra). None: from the loaded model's weights.

    Returns:
        {module name: adapter layer}, in model order.
    """
    names = list(ranks) if ranks is not None else find_targets(model, targets)
    layers: dict[str, AdapterLayer] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if isinstance(base, AdapterLayer):
            raise SaraError(f"{name} already carries an adapter")
        source = module_source(weights, name, base) if initialize else None
        layer = build_layer(method, base, options, rank=None if ranks is None else ranks[name],
                            initialize=initialize, source=source)
        if source is not None:
            source.release()
        setattr(parent, child, layer)
        layers[name] = layer
        if on_module is not None:
            on_module(name)
    freeze_base(model)
    return layers


def module_source(weights, name: str, base: nn.Module):
    """The checkpoint-file source for module `name` (None without `weights`).

    Raises:
        SaraError: the files hold no weight of this module's shape and the loaded one cannot
            stand in for it (a quantized base).
    """
    if weights is None:
        return None
    shape = (base.weight.shape[1], base.weight.shape[0]) if is_conv1d(base) else (base.out_features, base.in_features)
    source = weights.source(name, shape)
    if source is None and type(base).__name__ in QUANTIZED_LAYERS:
        raise SaraError(f"{name}: no weight of shape {shape} in the checkpoint files, and a quantized "
                        "layer cannot be decomposed; train this base unquantized")
    return source


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """{module name: adapter layer} for every wrapped module."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def is_adapter_parameter(name: str) -> bool:
    """True for names whose last component carries an adapter prefix."""
    return name.rsplit(".", 1)[-1].startswith(PREFIXES)


def freeze_base(model: nn.Module) -> None:
    """requires_grad only on adapter parameters."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, as PEFT's print_trainable_parameters reports them."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def parameter_line(model: nn.Module) -> str:
    """'trainable params: X || all params: Y || trainable%: Z', the PEFT format."""
    trainable, total = count_parameters(model)
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")


def base_memory_bytes(model) -> int:
    """Bytes the frozen base takes as loaded (4-bit weights packed), adapters left out."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return sum(t.numel() * t.element_size() for name, t in tensors if not is_adapter_parameter(name))
