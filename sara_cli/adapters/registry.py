"""Adapter methods, one module each, behind one registry.

Every layer wraps a frozen base layer and fills the contract in `base.AdapterLayer`.
"""

from __future__ import annotations

from torch import nn

from sara_cli.adapters.base import AdapterLayer
from sara_cli.adapters.lora import LoraLayer
from sara_cli.adapters.mosara import MoSaraLayer
from sara_cli.adapters.pissa import PissaLayer
from sara_cli.adapters.sara import SaraLayer
from sara_cli.adapters.sorsa import SorsaLayer

METHODS: dict[str, type[AdapterLayer]] = {
    "sara": SaraLayer,
    "mosara": MoSaraLayer,
    "lora": LoraLayer,
    "pissa": PissaLayer,
    "sorsa": SorsaLayer,
}

# Which layer arguments each method takes; the recipe schema mirrors these.
LAYER_OPTIONS: dict[str, tuple[str, ...]] = {
    "sara": ("tau", "dropout", "use_lambda", "init_lambda", "zero_init"),
    "mosara": ("tau", "num_experts", "dropout", "v_position"),
    "lora": ("rank", "alpha", "dropout"),
    "pissa": ("rank", "dropout", "svd"),
    "sorsa": ("rank", "dropout", "svd"),
}

PREFIXES = tuple(cls.prefix for cls in METHODS.values())


def build_layer(method: str, base_layer: nn.Module, options: dict, rank: int | None = None,
                initialize: bool = True, source=None) -> AdapterLayer:
    """Wrap `base_layer` with `method`'s adapter.

    Args:
        method: a key of METHODS.
        options: the method's settings (keys from LAYER_OPTIONS; others are ignored).
        rank: a known rank (k or r) for this module, e.g. from a saved adapter; it replaces
            the tau rule and `options["rank"]`.
        initialize: False allocates the adapter without decomposing W, for loading a state.
        source: where W and its decompositions come from (an initialize.MatrixSource over the
            checkpoint files); default: the base layer's own loaded weight.
    """
    cls = METHODS[method]
    kwargs = {key: options[key] for key in LAYER_OPTIONS[method] if key in options}
    if rank is not None:
        kwargs["rank"] = rank
        kwargs.pop("tau", None)
    if cls.reads_weight:
        kwargs["source"] = source
    return cls(base_layer, initialize=initialize, **kwargs)


__all__ = ["AdapterLayer", "METHODS", "LAYER_OPTIONS", "PREFIXES", "build_layer",
           "LoraLayer", "PissaLayer", "SorsaLayer", "SaraLayer", "MoSaraLayer"]
