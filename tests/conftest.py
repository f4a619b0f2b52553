"""Shared fixtures: offline, seeded, tiny models built from configs (never downloaded)."""

from __future__ import annotations

import os
import random

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "sara_cli" / "assets"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed(tmp_path_factory, monkeypatch):
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    # Built-in models are materialised once per test session, not into the user's cache.
    monkeypatch.setenv("SARA_HOME", str(tmp_path_factory.getbasetemp() / "sara_home"))


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    config.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def tiny_gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = dict(vocab_size=1024, n_embd=48, n_layer=2, n_head=4, n_positions=128,
                  bos_token_id=1, eos_token_id=2)
    config.update(overrides)
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**config)).eval()


def _save(model, folder: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(ASSETS / "tiny-llama").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint (safetensors + the bundled tokenizer) in a temporary folder."""
    return _save(tiny_llama(), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 checkpoint (Conv1D layers) in a temporary folder."""
    return _save(tiny_gpt2(), tmp_path_factory.mktemp("tiny-gpt2"))


def one_line_error(result, *fragments: str, stdout_empty: bool = True) -> str:
    """A CLI result is a user error: non-zero exit, no traceback, and exactly one line on stderr,
    an `error:` line holding every fragment, and (unless stdout_empty=False, for commands that
    print progress before they fail) nothing on stdout. Returns that line."""
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert not result.stdout.strip() or not stdout_empty, result.stdout
    assert lines[0].startswith("error:"), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from more threads, and on a busy 2-core machine OpenMP workers
    spinning against each other make generation ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*args):
    """Run `sara ARGS` in-process through Typer's runner."""
    from typer.testing import CliRunner

    from sara_cli.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def trained_mosara_run(llama_dir, tmp_path_factory) -> Path:
    """A finished Mo-SARA run on the tiny Llama (alpaca template), trained through the API for three
    steps at a rate high enough that the routed adapter clearly changes the model's output."""
    from sara_cli.recipe import validate
    from sara_cli.training.train import train

    out = tmp_path_factory.mktemp("mosara-run") / "run"
    recipe = validate({
        "model": {"name_or_path": str(llama_dir), "dtype": "float32"},
        "adapter": {"method": "mosara", "targets": "q_proj,v_proj", "tau": 0.5, "num_experts": 3},
        "data": {"train_file": "builtin:mawps-quickstart", "limit": 12, "cutoff_len": 96,
                 "train_on_inputs": False},
        "train": {"output_dir": str(out), "max_steps": 3, "per_device_train_batch_size": 4,
                  "learning_rate": 0.05, "logging_steps": 1, "save_steps": 100, "seed": 0},
    })
    train(recipe)
    return out
