"""The benchmark models: Llama shapes with random weights built on the device, and one saved copy.

Weights come from the config's own initialiser (normal, std 0.02) under a fixed seed, created
directly on the device in the benchmark dtype: no download, no host round trip. Random
Gaussian weights have a flat (Marchenko-Pastur) spectrum, so k(W, tau) is larger than in a
trained model: about 20 at tau 0.01 and about 1,100 at tau 0.5 for a 4096 x 4096 matrix.
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

from bench.harness import REPO, LlamaShape, Settings

TOKENIZER_DIR = REPO / "sara_cli" / "assets" / "tiny-llama"  # byte-level BPE, ids 0..1023
MARKER = "bench_model.json"


def llama_config(shape: LlamaShape):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=shape.hidden_size, num_hidden_layers=shape.num_hidden_layers,
                       intermediate_size=shape.intermediate_size, vocab_size=shape.vocab_size,
                       num_attention_heads=shape.num_attention_heads,
                       num_key_value_heads=shape.num_key_value_heads, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                       tie_word_embeddings=False)


def build_model(shape: LlamaShape, settings: Settings):
    """A LlamaForCausalLM of `shape` with seeded random weights, on settings.device, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(settings.seed)
    with torch.device(settings.device):
        model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=settings.dtype)
    return model.eval()


def load_tokenizer():
    """The bundled tokenizer; its ids are a subset of every benchmark model's vocabulary."""
    from sara_cli.model.loading import load_tokenizer as load

    return load(TOKENIZER_DIR)


def save_checkpoint(model, folder: Path, marker: dict) -> Path:
    """Save `model` + tokenizer as safetensors into `folder` (atomically) unless already there."""
    if _cached(folder, marker):
        return folder
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    load_tokenizer().save_pretrained(staging)
    (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def _cached(folder: Path, marker: dict) -> bool:
    path = folder / MARKER
    return path.is_file() and json.loads(path.read_text()) == marker


class ModelPool:
    """The 7B-shaped model in device memory and its saved checkpoint, each made once per run.

    The checkpoint is kept in the work folder between runs (saving 13.5 GB takes a while), keyed
    by shape, dtype and seed.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._model = None
        shape = settings.model
        self.marker = {"shape": vars(shape), "dtype": settings.dtype_name, "seed": settings.seed}
        self.folder = settings.workdir / (f"llama-h{shape.hidden_size}-l{shape.num_hidden_layers}-"
                                          f"{settings.dtype_name}-seed{settings.seed}")

    def model(self):
        if self._model is None:
            self._model = build_model(self.settings.model, self.settings)
        return self._model

    def checkpoint(self) -> Path:
        if not _cached(self.folder, self.marker):
            save_checkpoint(self.model(), self.folder, self.marker)
        return self.folder

    def release(self) -> None:
        self._model = None
        free_memory()


def free_memory() -> None:
    """Return freed adapters and optimizer states to the GPU before the next peak-memory reading.

    Without a GPU nothing is measured that a full collection (about 0.4 s here) would change.
    """
    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


class Snapshot:
    """The targeted modules of a model, to swap back after each adapter run.

    Both sara and PEFT wrap a target in place and keep the original layer inside, so putting the
    original objects back undoes either. PiSSA also rewrites the base weight (W - B A); with
    `weights=True` those are copied back from a clone on the same device.
    """

    def __init__(self, model, names: list[str], weights: bool = False):
        self.model = model
        self.originals = {name: model.get_submodule(name) for name in names}
        self.weights = {name: m.weight.detach().clone() for name, m in self.originals.items()} if weights else {}

    def restore(self) -> None:
        import torch

        for name, module in self.originals.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, module)
        with torch.no_grad():
            for name, weight in self.weights.items():
                self.originals[name].weight.data.copy_(weight)
        for attribute in ("peft_config", "_hf_peft_config_loaded"):  # left by get_peft_model
            if attribute in vars(self.model):  # an instance attribute, not the class default
                delattr(self.model, attribute)
        self.model.zero_grad(set_to_none=True)
        free_memory()

    def release(self) -> None:
        self.weights = {}
        free_memory()
