"""Module paths as people read them: layers in numeric order, and tables keyed by layer.

Checkpoint headers list tensors as strings (layers 0, 1, 10, 11, ..., 2), and a full module path
(`model.layers.12.self_attn.q_proj`) is too wide for an 80-column table.
"""

from __future__ import annotations

import re

LAYER = re.compile(r"\.(\d+)\.")
_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders the numbers inside a name numerically: layers.2 before layers.10."""
    return tuple(int(part) if part.isdigit() else part for part in _DIGITS.split(name))


def layer_of(name: str) -> int | None:
    """The first `.N.` index in a module path (its layer), or None."""
    match = LAYER.search("." + name + ".")
    return int(match.group(1)) if match else None


def by_layer(names: list[str]) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Group module paths into rows keyed by layer, with short column names.

    Returns (columns, rows): rows maps a layer label ("0", "1", ..., or "-" for paths without a
    layer index), in numeric order, to {column: module path}. A column is the module's last name
    (`q_proj`) when that is unique within every layer, else its path after the layer index
    (`self_attn.q_proj`); columns keep the order in which `names` first shows them (model order).
    """
    def split(name: str) -> tuple[str, str]:
        match = LAYER.search("." + name + ".")
        if not match:
            return "-", name
        return match.group(1), ("." + name + ".")[match.end():].strip(".")

    parts = [(name, *split(name)) for name in names]
    leaves = {(layer, rest.split(".")[-1]) for _, layer, rest in parts}
    short = len(leaves) == len(parts)
    rows: dict[str, dict[str, str]] = {}
    columns: list[str] = []
    for name, layer, rest in parts:
        column = rest.split(".")[-1] if short else rest
        rows.setdefault(layer, {})[column] = name
        if column not in columns:
            columns.append(column)
    order = sorted(rows, key=lambda layer: (layer == "-", int(layer) if layer != "-" else 0))
    return columns, {layer: rows[layer] for layer in order}
