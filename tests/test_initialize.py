"""Adapter init from the checkpoint files: the same factors as init from the loaded model, W read
from disk (never from the loaded weights), and every decomposition made once thanks to the cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import run_cli, tiny_gpt2, tiny_llama
from sara_cli.model import cache as spectrum_cache
from sara_cli.adapters import initialize
from sara_cli.adapters.registry import METHODS
from sara_cli.adapters.checkpoint import adapter_tensors
from sara_cli.adapters.initialize import CheckpointWeights
from sara_cli.adapters.inject import inject_adapters

OPTIONS = {
    "sara": {"tau": 0.5},
    "mosara": {"tau": 0.5, "num_experts": 3},
    "lora": {"rank": 4, "alpha": 8},
    "pissa": {"rank": 4, "svd": "lowrank"},
    "sorsa": {"rank": 4, "svd": "full"},
}
TARGETS = "q_proj,v_proj"


@pytest.fixture
def cold_cache(tmp_path, monkeypatch):
    """A private, empty spectrum cache."""
    monkeypatch.setenv("SARA_HOME", str(tmp_path / "sara_home"))
    return tmp_path / "sara_home"


@pytest.fixture
def decompositions(monkeypatch) -> list[str]:
    """Every decomposition the init and analyze code makes, by function name."""
    calls = []
    for name in ("singular_values", "top_singular", "top_singular_lowrank"):
        real = getattr(initialize, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(initialize, name, counting)
    return calls


def build(model, method, weights=None, targets=TARGETS, **options):
    torch.manual_seed(11)  # the random factors (LoRA A, SARA U/Vh, Mo-SARA lambda) match too
    return inject_adapters(model, method, {**OPTIONS[method], **options}, targets, weights=weights)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# -- the same factors as from the loaded model -----------------------------------------------------

@pytest.mark.parametrize("method", sorted(METHODS))
def test_init_from_files_is_bit_identical_to_init_from_the_loaded_float32_model(method, llama_dir, cold_cache):
    from_model = tiny_llama()
    build(from_model, method)
    cold, warm = tiny_llama(), tiny_llama()
    build(cold, method, CheckpointWeights(llama_dir))  # decomposes and fills the cache
    build(warm, method, CheckpointWeights(llama_dir))  # reads the cache
    assert_bit_identical(state(from_model), state(cold))
    assert_bit_identical(state(from_model), state(warm))


@pytest.mark.parametrize("method", ["sara", "pissa"])
def test_conv1d_files_are_read_as_out_in(method, gpt2_dir, cold_cache):
    from_model, from_files = tiny_gpt2(), tiny_gpt2()
    build(from_model, method, targets="c_attn,c_fc")
    build(from_files, method, CheckpointWeights(gpt2_dir), targets="c_attn,c_fc")
    assert_bit_identical(state(from_model), state(from_files))


@pytest.mark.parametrize("method", ["mosara", "sorsa"])
def test_init_reads_the_files_not_the_loaded_weights(method, llama_dir, cold_cache):
    """Loaded weights that differ from the files (as a 4-bit base's do) leave the factors as the
    files give them, and the residual is the file's W minus the principal part."""
    reference = tiny_llama()
    build(reference, method)
    drifted = tiny_llama()
    with torch.no_grad():
        for name, p in drifted.named_parameters():
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                p.add_(torch.randn_like(p))
    build(drifted, method, CheckpointWeights(llama_dir))
    if method == "sorsa":  # the residual replaces the drifted weight
        assert_bit_identical(state(reference), state(drifted))
    else:  # Mo-SARA leaves W alone
        assert_bit_identical(adapter_tensors(reference), adapter_tensors(drifted))


def test_ranks_from_files_match_numpy(llama_dir, cold_cache):
    """k(W, tau) per module against numpy's float64 SVD of the tensors in the file."""
    arrays = load_file(str(llama_dir / "model.safetensors"))
    layers = build(tiny_llama(), "sara", CheckpointWeights(llama_dir), tau=0.3)
    for name, layer in layers.items():
        s = np.linalg.svd(arrays[name + ".weight"].astype(np.float64), compute_uv=False)
        expected = int(np.searchsorted(np.cumsum(s), 0.3 * s.sum() * (1 - 1e-7))) + 1
        assert layer.rank() == expected, name


# -- each matrix decomposed once ---------------------------------------------------------------------

def test_analyze_then_train_and_another_tau_decompose_nothing(llama_dir, cold_cache, decompositions):
    result = run_cli("analyze", llama_dir, "--tau", "0.5")
    assert result.exit_code == 0, result.output
    assert decompositions == ["singular_values"] * 4  # q, v of 2 layers
    decompositions.clear()
    for tau in (0.5, 0.2, 0.9):
        build(tiny_llama(), "sara", CheckpointWeights(llama_dir), tau=tau)
    assert decompositions == []
    result = run_cli("analyze", llama_dir, "--tau", "0.7")
    assert result.exit_code == 0 and decompositions == []


def test_principal_factors_are_cached(llama_dir, cold_cache, decompositions):
    for _ in range(2):
        build(tiny_llama(), "pissa", CheckpointWeights(llama_dir))
        build(tiny_llama(), "mosara", CheckpointWeights(llama_dir), tau=0.05)  # small k: kept
    assert decompositions == ["top_singular_lowrank"] * 4 + ["top_singular"] * 4
    size = spectrum_cache.SpectrumCache(CheckpointWeights(llama_dir).fingerprint).size_bytes()
    assert 0 < size < 200_000


def test_a_large_mosara_k_keeps_only_the_values(llama_dir, cold_cache, decompositions):
    """tau 0.5 on 64 x 64 matrices gives k of about 15: its vectors would be a large share of the
    matrix, so only the values are kept and the second run decomposes again (for the vectors)."""
    build(tiny_llama(), "mosara", CheckpointWeights(llama_dir))
    build(tiny_llama(), "mosara", CheckpointWeights(llama_dir))
    assert decompositions == ["top_singular"] * 8


def test_cache_off(llama_dir, cold_cache, decompositions, monkeypatch):
    monkeypatch.setenv("SARA_SPECTRUM_CACHE", "0")
    for _ in range(2):
        build(tiny_llama(), "sara", CheckpointWeights(llama_dir))
    assert decompositions == ["singular_values"] * 8
    assert not (cold_cache / "spectra").exists()


def test_a_weight_changed_in_place_is_decomposed_again(tmp_path, cold_cache, decompositions):
    """The fingerprint samples three rows; a change elsewhere, written into the file in place
    with its size and modification time restored, still invalidates that matrix's entries
    (and only those: each entry is keyed by its own tensor's content hash)."""
    import os

    model = tiny_llama()
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    weights = folder / "model.safetensors"
    first = build(tiny_llama(), "sara", CheckpointWeights(folder), tau=0.9)
    before = weights.stat()
    name = "model.layers.0.self_attn.q_proj"
    _, entry = CheckpointWeights(folder).index[name + ".weight"]
    length = int.from_bytes(weights.read_bytes()[:8], "little")
    row = 5 * 64 * 4  # row 5 of a (64, 64) float32 matrix: not a sampled row
    with open(weights, "r+b") as f:
        f.seek(8 + length + entry["data_offsets"][0] + row)
        f.write(np.full(64, 3.0, dtype=np.float32).tobytes())
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_size == before.st_size and weights.stat().st_mtime_ns == before.st_mtime_ns
    decompositions.clear()
    second = build(tiny_llama(), "sara", CheckpointWeights(folder), tau=0.9)
    assert decompositions == ["singular_values"]
    changed = load_file(str(weights))[name + ".weight"].astype(np.float64)
    s = np.linalg.svd(changed, compute_uv=False)
    assert second[name].rank() == int(np.searchsorted(np.cumsum(s), 0.9 * s.sum() * (1 - 1e-7))) + 1
    assert second[name].rank() != first[name].rank()


def test_a_damaged_cache_entry_is_decomposed_again_and_replaced(llama_dir, cold_cache, decompositions, caplog):
    """Flipped bytes inside a cached values.safetensors fail its checksum: a miss, logged."""
    run_cli("analyze", llama_dir, "--tau", "0.5")
    entry = next(cold_cache.rglob("model.layers.0.self_attn.q_proj.weight/values.safetensors"))
    raw = bytearray(entry.read_bytes())
    raw[-9] ^= 0xFF  # inside the last singular value's float64
    entry.write_bytes(bytes(raw))
    decompositions.clear()
    with caplog.at_level("WARNING"):
        layers = build(tiny_llama(), "sara", CheckpointWeights(llama_dir), tau=0.5)
    assert decompositions == ["singular_values"]
    assert any("fails its checksum" in r.getMessage() and str(entry) in r.getMessage() for r in caplog.records)
    arrays = load_file(str(llama_dir / "model.safetensors"))
    s = np.linalg.svd(arrays["model.layers.0.self_attn.q_proj.weight"].astype(np.float64), compute_uv=False)
    assert layers["model.layers.0.self_attn.q_proj"].rank() == int(np.searchsorted(np.cumsum(s), 0.5 * s.sum() * (1 - 1e-7))) + 1
    decompositions.clear()
    build(tiny_llama(), "sara", CheckpointWeights(llama_dir), tau=0.5)
    assert decompositions == []  # the entry was replaced by a sound one
