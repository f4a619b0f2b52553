"""Adapter save/load: `adapter_model.safetensors` + `sara_config.json`.

The adapter folder holds everything needed to rebuild the trained model from the original base:
the trainable tensors, the frozen Mo-SARA singular vectors and the initial PiSSA/SORSA factors,
keyed `<module path>.<tensor name>` (e.g. `model.layers.0.self_attn.q_proj.sara_U`).

Mo-SARA with `storage: compact` (its recipe default; `storage` in sara_config.json) leaves out
U_k and V_k, which the base determines, and keeps a fingerprint and a probe of them instead
(`frozen.py`); loading decomposes W again and checks both. A module whose vectors are
ill-defined keeps them (`stored_factors` in the config names those modules).
"""

from __future__ import annotations

from pathlib import Path

from sara_cli import __version__
from sara_cli.model import hub
from sara_cli.errors import SaraError
from sara_cli.files import atomic_path, read_json, write_json

CONFIG_NAME = "sara_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
RECIPE_NAME = "recipe.yaml"
FROZEN = ("mosara_U", "mosara_Vh")  # what a compact file leaves out


def storage(options: dict) -> str:
    """'compact' or 'full' for an adapter's options (files written before compact existed: full)."""
    return (options or {}).get("storage") or "full"


def adapter_tensors(model) -> dict:
    """{`module.tensor`: fp32 CPU tensor} for every adapter layer of `model`."""
    from sara_cli.adapters.inject import adapter_layers

    tensors = {}
    for module_name, layer in adapter_layers(model).items():
        for name, t in layer.adapter_state().items():
            tensors[f"{module_name}.{name}"] = t.detach().to("cpu").contiguous()
    return tensors


def save_adapter(model, folder: Path, meta: dict, tensors: dict | None = None) -> int:
    """Write the adapter weights and config into `folder` (each file atomically).

    Args:
        tensors: the adapter tensors when the caller gathered them (FSDP/DeepSpeed); default:
            read from the model's adapter layers.

    Returns the size on disk in bytes.
    """
    from safetensors.torch import save_file

    from sara_cli.adapters.inject import adapter_layers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = adapter_layers(model)
    config = {**meta, "sara_version": __version__,
              "ranks": {name: layer.rank() for name, layer in layers.items()}}
    tensors = tensors if tensors is not None else adapter_tensors(model)
    if storage(meta.get("options")) == "compact":
        rebuilt = {name for name, layer in layers.items() if getattr(layer, "rebuildable", False)}
        tensors = {key: t for key, t in tensors.items()
                   if not (key.rpartition(".")[2] in FROZEN and key.rpartition(".")[0] in rebuilt)}
        config["storage"] = "compact"
        config["stored_factors"] = sorted(set(layers) - rebuilt)
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt", "sara_version": __version__})
    write_json(folder / CONFIG_NAME, config)
    return sum(p.stat().st_size for p in (folder / WEIGHTS_NAME, folder / CONFIG_NAME))


class UnfinishedRun(SaraError):
    """A run folder with checkpoints but no adapter/: stopped, or still training."""


def find_adapter_dir(path: Path | str) -> Path:
    """The adapter folder for a run folder, an adapter folder, or a checkpoint folder.

    Raises:
        UnfinishedRun: a run folder with checkpoints but no adapter/ yet.
        SaraError: no sara_config.json there.
    """
    path = Path(path)
    if not path.exists():
        raise SaraError(f"{path} does not exist; give a training output folder or an adapter folder")
    for candidate in (path, path / "adapter"):
        if (candidate / CONFIG_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
            return candidate
    saved = sorted((p for p in path.glob("checkpoint-*") if (p / CONFIG_NAME).is_file()),
                   key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1)
    if saved and not (path / "adapter").exists():
        raise UnfinishedRun(f"{path} is an unfinished run: it has checkpoints but no adapter/ yet (training "
                        "was stopped, or is still going); finish it with `sara train "
                        f"{path / RECIPE_NAME}`, or use a checkpoint, e.g. {saved[-1]}")
    raise SaraError(f"{path} holds no sara adapter ({CONFIG_NAME} + {WEIGHTS_NAME}); give a finished "
                    "run's output folder or its adapter/ folder")


def read_config(adapter_dir: Path) -> dict:
    """sara_config.json of an adapter folder.

    Raises:
        SaraError: the file is damaged, or lacks the fields every adapter has.
    """
    path = Path(adapter_dir) / CONFIG_NAME
    config = read_json(path, "it was written by sara train; restore it from the run or train again")
    missing = [k for k in ("method", "options", "targets", "ranks", "base_model")
               if not isinstance(config, dict) or k not in config]
    if missing:
        raise SaraError(f"{path} is not a sara adapter config (no '{missing[0]}'); restore it from the "
                        "run or train again")
    return config


def load_safetensors(path: Path) -> dict:
    """All tensors of a safetensors file, on the CPU.

    Raises:
        SaraError: the file is not safetensors or was cut short (named, with what to do).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    hub.read_header(Path(path))  # a damaged file is named here, before the library reads it
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise SaraError(f"{path} cannot be read ({str(exc).splitlines()[0]}); re-download or "
                        "re-save it") from None


def load_adapter_tensors(model, adapter_dir: Path, trainable_only: bool = False) -> set[str]:
    """Copy saved adapter tensors into the adapter layers of `model` (shapes must match).

    Returns the names of the tensors in the file.
    """
    import torch

    state = load_safetensors(Path(adapter_dir) / WEIGHTS_NAME)
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for key, value in state.items():
            target = named.get(key)
            if target is None:
                raise SaraError(f"adapter tensor {key} has no place in this model; the adapter was "
                                "trained on another base or another version")
            if trainable_only and not getattr(target, "requires_grad", False):
                continue
            if target.shape != value.shape:
                raise SaraError(f"adapter tensor {key} has shape {tuple(value.shape)} but the model "
                                f"expects {tuple(target.shape)}; the adapter belongs to another base")
            target.copy_(value.to(device=target.device, dtype=target.dtype))
    return set(state)


def attach_adapter(model, adapter_dir: Path, weights=None):
    """Wrap `model` (the original base) with the saved adapter, exactly as trained.

    Ranks come from the config and the frozen factors from the file; a compact Mo-SARA file's
    U_k, V_k are decomposed again from W (checkpoint files through the spectrum cache, else the
    loaded weight) and checked against the file's probe.
    PiSSA/SORSA rebuild their residual W - B0 A0 from W as read from the checkpoint files when
    `weights` (an initialize.CheckpointWeights) is given, as training did, else from the loaded W.
    Returns {module name: layer}.
    """
    from sara_cli.adapters.inject import inject_adapters, module_source

    config = read_config(adapter_dir)
    layers = inject_adapters(model, config["method"], config["options"], config["targets"],
                             ranks=config["ranks"], initialize=False)
    saved = load_adapter_tensors(model, adapter_dir)
    for name, layer in layers.items():
        source = module_source(weights, name, layer.base_layer) if layer.reads_weight else None
        layer.restore_frozen(name, source, {key.rpartition(".")[2] for key in saved
                                            if key.rpartition(".")[0] == name})
        layer.after_load(None if source is None else source.weight())
    return layers


def load_adapter_model(adapter_dir: Path, base: str | None = None, dtype: str | None = None,
                       device: str | None = None, full_precision: bool = False):
    """Base model + saved adapter, ready for inference, as trained: a run on a 4-bit base loads
    it in 4 bits again (`full_precision=True`: on the unquantized base, as `sara merge` writes it).

    Returns (model, tokenizer, config).
    """
    from sara_cli.adapters.initialize import CheckpointWeights
    from sara_cli.model.loading import load_base_model, recorded_model_section

    config = read_config(adapter_dir)
    recorded = config["base_model"]
    model_cfg = recorded_model_section(recorded, base, dtype, full_precision)
    model, tokenizer, model_dir = load_base_model(model_cfg, device,
                                                  compute_dtype=recorded.get("compute_dtype", "float32"))
    # The cache makes a compact file's rebuild a lookup; the probe checks whatever it returns.
    compact = storage(config["options"]) == "compact"
    attach_adapter(model, adapter_dir, CheckpointWeights(model_dir, use_cache=compact))
    model.eval()
    return model, tokenizer, config


def rebuild_frozen(config: dict, grouped: dict, model_dir: Path) -> None:
    """Fill in U_k, V_k (float32) for the modules of a compact Mo-SARA file, in place.

    Args:
        grouped: {module: {tensor name: tensor}} as read from the file.
        model_dir: the base checkpoint the factors are decomposed from (through the cache).

    Raises:
        SaraError: the base has no weight for a module, or a rebuild fails its checks.
    """
    import torch

    from sara_cli.adapters import frozen
    from sara_cli.adapters.initialize import CheckpointWeights

    missing = [module for module, t in grouped.items() if config["method"] == "mosara" and FROZEN[0] not in t]
    if not missing:
        return
    weights = CheckpointWeights(model_dir)
    for module in missing:
        t = grouped[module]
        source = weights.source(module)
        if source is None:
            raise SaraError(f"{module}: the base {model_dir} holds no weight for this module, so a "
                            "compact Mo-SARA adapter cannot rebuild its vectors; give the base it was trained on")
        U, Vh = frozen.rebuild(module, source, config["ranks"][module], t["mosara_fingerprint"],
                               t["mosara_probe_U"], t["mosara_probe_Vh"])
        t["mosara_U"], t["mosara_Vh"] = U.to("cpu", torch.float32), Vh.to("cpu", torch.float32)
        source.release()
