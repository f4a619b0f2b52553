"""Bundled assets addressed as `builtin:NAME`: a tiny random Llama and a small instruction set.

They exist so the whole pipeline runs offline, anywhere, in a couple of minutes. The tiny
Llama has random weights (seeded, so every machine builds the same model); it is built on
first use into a cache folder and is an ordinary Hugging Face checkpoint from then on.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from sara_cli.errors import SaraError

PREFIX = "builtin:"
ASSETS = Path(__file__).parent / "assets"
MODELS = {"tiny-llama": ASSETS / "tiny-llama"}
DATASETS = {"mawps-quickstart": ASSETS / "data" / "mawps_quickstart.json"}
MODEL_SEED = 0


def is_builtin(reference: str) -> bool:
    return str(reference).startswith(PREFIX)


def _name(reference: str, table: dict, kind: str) -> str:
    name = str(reference)[len(PREFIX):]
    if name not in table:
        raise SaraError(f"unknown built-in {kind} '{reference}'; available: "
                        + ", ".join(PREFIX + n for n in table))
    return name


def cache_dir() -> Path:
    """Where built-in models are materialised: $SARA_HOME, else ~/.cache/sara."""
    root = os.environ.get("SARA_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "sara")
    return Path(root)


def data_path(reference: str) -> Path:
    """Path of a bundled dataset, e.g. builtin:mawps-quickstart."""
    return DATASETS[_name(reference, DATASETS, "dataset")]


def model_path(reference: str) -> Path:
    """Folder of a built-in model, building it (atomically) on first use."""
    name = _name(reference, MODELS, "model")
    from sara_cli import __version__

    # The folder name carries a hash of the shipped config and tokenizer, so a changed asset
    # never reuses a stale build.
    digest = hashlib.sha256()
    for path in sorted(MODELS[name].iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    target = cache_dir() / "models" / f"{name}-v{__version__}-seed{MODEL_SEED}-{digest.hexdigest()[:10]}"
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _build(MODELS[name], staging)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _build(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
