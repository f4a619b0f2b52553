"""Collect Mo-SARA routing weights g per token, through the layers' own gate recording.

Used by `sara merge --routing mean` (mean gate per layer) and `sara route-map` (heatmaps).
There is no second code path: the gates are exactly what `MoSaraLayer.branch` computed.
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def recording(layers: dict):
    """Turn gate recording on for `layers` ({name: MoSaraLayer}) inside the block."""
    for layer in layers.values():
        layer.recorded_gates = []
        layer.record_gates = True
    try:
        yield
    finally:
        for layer in layers.values():
            layer.record_gates = False
            layer.recorded_gates = []


def batches(tokenizer, texts: list[str], batch_size: int, max_length: int = 512):
    """Tokenized batches of `texts`, right-padded, with attention masks."""
    for start in range(0, len(texts), batch_size):
        yield tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length)


def collect_gates(model, tokenizer, texts: list[str], batch_size: int = 8) -> dict:
    """Per-token gates of every Mo-SARA layer over the real (non-padding) tokens of `texts`.

    Returns:
        {module name: (N, m) float32 tensor}, N = the number of kept tokens.
    """
    import torch

    from sara_cli.adapters.registry import MoSaraLayer
    from sara_cli.adapters.inject import adapter_layers

    layers = {n: l for n, l in adapter_layers(model).items() if isinstance(l, MoSaraLayer)}
    device = next(model.parameters()).device
    kept: dict[str, list] = {name: [] for name in layers}
    with recording(layers), torch.no_grad():
        for batch in batches(tokenizer, texts, batch_size):
            mask = batch["attention_mask"].bool()  # (B, T)
            model(**{k: v.to(device) for k, v in batch.items()})
            for name, layer in layers.items():
                g = layer.recorded_gates[0]  # (B, T, m): one forward call per layer and batch
                kept[name].append(g[mask])
                layer.recorded_gates = []
    return {name: torch.cat(chunks, dim=0) for name, chunks in kept.items()}
