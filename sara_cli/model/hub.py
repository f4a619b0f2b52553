"""Resolve a model reference to a local folder and read its safetensors weights lazily.

A reference is a local folder, a `builtin:` name, or a hub id (downloaded with huggingface_hub;
with HF_HUB_OFFLINE=1 only the local cache is used).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Iterator

from sara_cli.model import builtin
from sara_cli.errors import SaraError
from sara_cli.files import read_json

# A safetensors header is JSON of a few hundred bytes per tensor; anything near this is damage.
MAX_HEADER_BYTES = 100_000_000

# Model types whose linear layers are transformers' Conv1D: weights stored as (in, out).
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
QUANTIZED_DTYPES = {"I8", "U8", "F8_E4M3", "F8_E5M2", "I4", "U4"}


def resolve_model_dir(reference: str, revision: str | None = None) -> Path:
    """Local folder holding config.json and weights for `reference`.

    `revision` (a branch, tag, commit or PR ref such as refs/pr/3) applies to hub ids.

    Raises:
        SaraError: not a folder, not a known hub id, or no network to fetch it.
    """
    reference = str(reference)
    if builtin.is_builtin(reference):
        return builtin.model_path(reference)
    path = Path(reference).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SaraError(f"model '{reference}' is a file; give the checkpoint folder")
        return path
    if reference.count("/") > 1 or reference.startswith((".", "/", "~")):
        raise SaraError(f"model folder '{reference}' does not exist; check the path")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(reference, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"])
    except Exception as exc:  # hub errors have many types; the user needs one line
        raise SaraError(
            f"model '{reference}' is not a local folder and could not be fetched from the hub "
            f"({type(exc).__name__}); check the name, your network, or HF_HUB_OFFLINE") from exc
    return Path(folder)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in index order.

    Raises:
        SaraError: no safetensors weights (a .bin-only checkpoint is named as such).
    """
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        content = read_json(index, "re-download the checkpoint or re-save it")
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise SaraError(f"{index} has no weight_map; re-download the checkpoint or re-save it")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise SaraError(f"{model_dir} lacks {missing[0]}, which {index.name} lists; the download is "
                            "incomplete: re-download the checkpoint")
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise SaraError(f"{model_dir} holds only PyTorch .bin weights; sara reads safetensors. "
                        "Convert it with `model.save_pretrained(dir, safe_serialization=True)`")
    raise SaraError(f"{model_dir} holds no model weights (*.safetensors); give a checkpoint folder")


def read_header(path: Path) -> dict:
    """The safetensors JSON header of one file: {name: {dtype, shape, data_offsets}}.

    Raises:
        SaraError: not a safetensors file, or cut short (the header's tensors end past the file).
    """
    damaged = SaraError(f"{path} is not a safetensors file, or it was cut short; re-download or "
                        "re-save it")
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = f.read(8)
        if len(start) < 8:
            raise damaged
        (length,) = struct.unpack("<Q", start)
        if not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
            raise damaged
        try:
            header = json.loads(f.read(length))
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            raise damaged from None
    if not isinstance(header, dict):
        raise damaged
    header.pop("__metadata__", None)
    try:
        end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise damaged from None
    if 8 + length + end > size:
        raise damaged
    return header


def tensor_index(model_dir: Path) -> dict[str, tuple[Path, dict]]:
    """{tensor name: (file, header entry)} over all weight files, without reading data."""
    index = {}
    for path in weight_files(model_dir):
        for name, entry in read_header(path).items():
            index[name] = (path, entry)
    return index


def load_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise SaraError(f"{model_dir} has no config.json; give a Hugging Face checkpoint folder")
    config = read_json(path, "re-download the checkpoint or fix the file")
    if not isinstance(config, dict):
        raise SaraError(f"{path} is not a model config (a JSON object); re-download the checkpoint")
    return config


def is_conv1d_checkpoint(config: dict) -> bool:
    return config.get("model_type") in CONV1D_MODEL_TYPES


def check_not_quantized(model_dir: Path, config: dict | None = None) -> None:
    """Raise SaraError for a quantized checkpoint (int8/int4/fp8 weights or a quantization_config)."""
    config = config if config is not None else load_config(model_dir)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "unknown")
        raise SaraError(f"{model_dir} is quantized ({method}); sara needs the unquantized base "
                        "weights (bf16/fp16/fp32) to decompose and merge them. Give the original "
                        "checkpoint; to train it in 4 bits, set model.load_in_4bit: true")
    for name, (_, entry) in tensor_index(model_dir).items():
        if entry["dtype"] in QUANTIZED_DTYPES:
            raise SaraError(f"{model_dir} holds quantized tensors ({name}: {entry['dtype']}); "
                            "use the unquantized base model (model.load_in_4bit: true quantizes it "
                            "while loading)")


def tensor_digest(path: Path, entry: dict) -> str:
    """sha256 of one tensor's bytes exactly as stored in safetensors file `path`.

    Args:
        entry: the tensor's header entry (`read_header`), with its data_offsets.
    """
    start, end = (int(x) for x in entry["data_offsets"])
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + length + start)
        left = end - start
        while left > 0:
            chunk = f.read(min(left, 1 << 23))
            if not chunk:
                raise SaraError(f"{path} was cut short; re-download or re-save it")
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def iter_tensors(model_dir: Path, names: list[str], index: dict | None = None) -> Iterator[tuple[str, "object"]]:
    """Yield (name, tensor) for `names`, in that order, one tensor in memory at a time.

    Each read opens its file and closes it again: a file kept open keeps every page read so far
    mapped, and the process's resident memory would grow with each tensor.

    Args:
        index: `tensor_index(model_dir)` when the caller has it (saves reading the headers).
    """
    from safetensors import safe_open

    index = index if index is not None else tensor_index(model_dir)
    for name in names:
        with safe_open(index[name][0], framework="pt") as f:
            tensor = f.get_tensor(name)
        yield name, tensor


def match_tensor_names(modules: list[str], tensor_names: list[str], strict: bool = True) -> dict[str, str]:
    """{checkpoint tensor name: module} for the targeted modules' weights.

    Checkpoint keys can differ from module paths by a prefix (GPT-2 hub files store `h.0...`
    for `transformer.h.0...`), so a unique suffix match is accepted.

    Args:
        strict: raise for a module without a unique weight; False leaves it out.
    Raises:
        SaraError: (strict) a module has no weight, or more than one, in the checkpoint.
    """
    weights = {n[: -len(".weight")]: n for n in tensor_names if n.endswith(".weight")}
    mapping = {}
    for module in modules:
        if module in weights:
            mapping[weights[module]] = module
            continue
        hits = [w for w in weights if module.endswith("." + w) or w.endswith("." + module)]
        if len(hits) != 1 and not strict:
            continue
        if len(hits) != 1:
            raise SaraError(f"adapter module {module} has no unique weight in the base checkpoint; "
                            "is --base the model the adapter was trained on?")
        mapping[weights[hits[0]]] = module
    return mapping


def fingerprint(model_dir: Path, names: list[str] | None = None) -> str:
    """A content fingerprint of a checkpoint: sha256 over every tensor's name, dtype and shape,
    plus the bytes of three rows (first, middle, last) of each tensor in `names` (default: all
    2-D tensors).

    Cheap (reads a few MB, not the model) and different for any other model and for any
    fine-tune of the same architecture, which changes essentially every row.
    """
    import torch
    from safetensors import safe_open

    index = tensor_index(model_dir)
    digest = hashlib.sha256()
    for name in sorted(index):
        entry = index[name][1]
        digest.update(f"{name}|{entry['dtype']}|{entry['shape']}\n".encode())
    sampled = sorted(names if names is not None else
                     [n for n, (_, e) in index.items() if len(e["shape"]) == 2])
    by_file: dict[Path, list[str]] = {}
    for name in sampled:
        by_file.setdefault(index[name][0], []).append(name)
    for path in sorted(by_file):
        with safe_open(path, framework="pt") as f:
            for name in by_file[path]:
                rows = index[name][1]["shape"][0]
                view = f.get_slice(name)
                for i in sorted({0, rows // 2, rows - 1}):
                    row = view[i:i + 1].contiguous()
                    digest.update(row.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:32]
