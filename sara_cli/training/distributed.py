"""Sharded training (FSDP2 through accelerate) and identical adapters on every rank.

The Trainer and accelerate do the sharding; sara adds what adapters need:
- **FSDP on the CPU.** accelerate turns FSDP on only for accelerators: on a CPU-only machine an
  FSDP config silently runs plain DDP. `enable_fsdp_on_cpu` turns the FSDP plugin the launcher
  asked for back on (gloo), so a config can be checked on a CPU before a GPU run, and CI tests the
  real sharded path.
- **Saving.** Under FSDP2 every parameter is a DTensor shard: the adapter is gathered tensor by
  tensor (`gather_adapter_tensors`, a collective, on every rank), never the whole base.
- **Init.** With `fsdp_cpu_ram_efficient_loading`, only rank 0 holds the base; the others load it
  on the meta device and accelerate broadcasts rank 0's full state dict, adapters included, when
  it shards the model. So rank 0 decomposes, the ranks (k per module) are broadcast, and the
  other ranks allocate adapters of those shapes without decomposing anything (`share_ranks`).
  Otherwise every rank decomposes for itself (same files, same code, so the same factors) and
  `check_identical` compares a checksum of every adapter tensor across ranks; a mismatch
  (different GPU models, say) is repaired by broadcasting rank 0's tensors.
"""

from __future__ import annotations

import os


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def fsdp_requested() -> bool:
    """The launcher (accelerate launch with an FSDP config) asked for FSDP."""
    return _flag("ACCELERATE_USE_FSDP")


def ram_efficient_loading() -> bool:
    """FSDP with `fsdp_cpu_ram_efficient_loading`: ranks other than 0 load the base on meta."""
    return fsdp_requested() and _flag("FSDP_CPU_RAM_EFFICIENT_LOADING")


def check_supported(quantized: str | None) -> None:
    """Refuse the FSDP settings sara does not handle, before any work.

    Raises:
        SaraError: FSDP1 (it flattens each wrapped layer into one tensor, so the adapter cannot be
            gathered alone and the frozen base must share the adapters' dtype), or a quantized base.
    """
    from sara_cli.errors import SaraError

    if not fsdp_requested():
        return
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise SaraError("FSDP version 1 is not supported; set fsdp_version: 2 in the accelerate config "
                        "(see docs/recipes.md, Multi-GPU)")
    if quantized:
        raise SaraError(f"model.load_in_{quantized} with FSDP is not supported (not verified here); train "
                        "a quantized base with one process per GPU (torchrun, DDP)")


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def enable_fsdp_on_cpu(accelerator) -> bool:
    """Turn on the FSDP plugin that accelerate built from the launcher's config but dropped
    because the processes run on the CPU. Returns True when it did."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not fsdp_requested() or getattr(state, "fsdp_plugin", None) is not None:
        return False
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # read from the FSDP_* variables the launcher set
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def gather_adapter_tensors(model) -> dict:
    """{`module.tensor`: full fp32 CPU tensor} for every adapter layer: under FSDP2 each DTensor
    shard is gathered in turn, under DeepSpeed ZeRO-3 each layer's partitioned parameters. Every
    rank must call it (it is a collective under both)."""
    from contextlib import nullcontext

    from torch.distributed.tensor import DTensor

    from sara_cli.adapters.inject import adapter_layers

    tensors = {}
    for module_name, layer in adapter_layers(model).items():
        partitioned = [p for p in layer.parameters() if hasattr(p, "ds_id")]  # ZeRO-3
        if partitioned:
            import deepspeed

            gathering = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
        else:
            gathering = nullcontext()
        with gathering:
            for name, t in layer.adapter_state().items():
                t = t.full_tensor() if isinstance(t, DTensor) else t
                tensors[f"{module_name}.{name}"] = t.detach().to("cpu", copy=True).contiguous()
    return tensors


def zero3(trainer) -> bool:
    """The Trainer runs DeepSpeed ZeRO stage 3 (parameters partitioned across ranks)."""
    if not trainer.is_deepspeed_enabled:
        return False
    return trainer.accelerator.state.deepspeed_plugin.zero_stage == 3


def gathers_adapter(trainer) -> bool:
    """The model's parameters are sharded, so saving the adapter needs a gather on every rank."""
    return trainer.is_fsdp_enabled or zero3(trainer)


def share_ranks(ranks: dict | None) -> dict:
    """Rank 0's {module: rank} on every rank (rank 0 passes its dict, the others None)."""
    import torch.distributed as dist

    box = [ranks]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _checksum(tensors: list) -> "object":
    import torch

    total = torch.zeros(2, dtype=torch.float64)
    for i, t in enumerate(tensors):  # on each tensor's own device; a position-weighted sum
        t = t.detach().to(torch.float64).flatten()
        weights = torch.arange(1, t.numel() + 1, dtype=torch.float64, device=t.device) / t.numel()
        total[0] += float((t * weights).sum()) * (i + 1)
        total[1] += float(t.abs().sum())
    return total


def synchronized_tensors(layers: dict) -> list:
    """Every tensor init wrote, per layer: the adapter state and, for PiSSA/SORSA, the residual
    that replaced the base weight."""
    tensors = []
    for layer in layers.values():
        tensors.extend(layer.adapter_state().values())
        if layer.reads_weight and not layer.quantized and layer.prefix in ("pissa_", "sorsa_"):
            tensors.append(layer.base_layer.weight.data)
    return tensors


def check_identical(layers: dict, device=None) -> bool:
    """Compare a checksum of every init-written tensor across ranks; on a mismatch broadcast rank
    0's tensors. Returns True when the ranks agreed already."""
    import torch
    import torch.distributed as dist

    tensors = synchronized_tensors(layers)
    local = _checksum(tensors).to(device or "cpu")
    lowest, highest = local.clone(), local.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    if torch.equal(lowest, highest):
        return True
    broadcast_from_rank0(tensors)
    return False


def broadcast_from_rank0(tensors: list) -> None:
    import torch.distributed as dist

    for t in tensors:
        dist.broadcast(t.data, src=0)
