"""`sara analyze` through the real CLI (Typer's runner) on tiny checkpoints.

Every k and parameter count is checked against an independent reference: the tensors are read
back with `safetensors.numpy`, decomposed with LAPACK (`np.linalg.svd`, float64) and put
through the rank rule written out here, not through `sara_cli.spectrum`.
"""

from __future__ import annotations

import json
import re
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from typer.testing import CliRunner

from sara_cli.cli import app as cli
from sara_cli.cli.app import app
from sara_cli.errors import SaraError

from conftest import tiny_llama

SCHEMA_KEYS = {"model", "targets", "taus", "total_params", "seconds", "matrices"}
MATRIX_KEYS = {"name", "layer", "module", "shape", "k"}
LLAMA_LINEAR = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


# -- independent reference -----------------------------------------------------------------------

def checkpoint_arrays(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of every safetensors file in `folder`, as numpy arrays."""
    arrays = {}
    for path in sorted(folder.glob("*.safetensors")):
        arrays.update(load_file(path))
    return arrays


def numpy_spectrum(W: np.ndarray) -> np.ndarray:
    return np.linalg.svd(W.astype(np.float64), compute_uv=False)


def numpy_rank(s: np.ndarray, tau: float) -> int:
    """min{k : sum_{i<=k} s_i >= tau * sum s}, with the documented relative tie tolerance 1e-7."""
    cumulative = np.cumsum(s)
    total = s.sum()
    return int(np.argmax(cumulative >= tau * total - 1e-7 * total)) + 1


def expected_matrix(arrays: dict, module: str, taus: list[float], conv1d: bool = False) -> dict:
    """The JSON entry `sara analyze` should write for one module, computed with numpy."""
    W = arrays[module + ".weight"]
    if conv1d:
        W = W.T  # Conv1D stores (in, out); the schema is (out, in)
    s = numpy_spectrum(W)
    layer = re.search(r"\.(\d+)\.", module)
    return {"name": module, "layer": int(layer.group(1)) if layer else None,
            "module": module.split(".")[-1], "shape": list(W.shape),
            "k": [numpy_rank(s, tau) for tau in taus]}


def sara_count(spectra_and_shapes, tau: float) -> int:
    """SARA trainable parameters over the matrices: sum k (out + in) + k."""
    return sum(numpy_rank(s, tau) * (out + in_ + 1) for s, (out, in_) in spectra_and_shapes)


# -- CLI helpers ---------------------------------------------------------------------------------

def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    """Collapse whitespace: rich wraps long lines at the console width."""
    return " ".join(text.split())


def assert_user_error(result, *fragments: str) -> str:
    """Non-zero exit, exactly one line on stderr, no traceback, and the given text in it."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a clean exit, not a crash
    message = result.stderr.strip()
    assert message.startswith("error:"), result.output
    assert "\n" not in message, message
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture
def no_debug(monkeypatch):
    """`--debug` is stored in a module-level flag; keep each test's setting to itself."""
    monkeypatch.setitem(cli.DEBUG, "on", False)


# -- JSON against numpy --------------------------------------------------------------------------

def test_llama_json_matches_numpy(llama_dir, tmp_path, no_debug):
    out = tmp_path / "out.json"
    result = run("analyze", llama_dir, "--tau", "0.1", "--tau", "0.5", "--json", out)
    assert result.exit_code == 0, result.output

    data = json.loads(out.read_text())
    assert set(data) == SCHEMA_KEYS
    assert data["model"] == str(llama_dir)
    assert data["targets"] == ["q_proj", "v_proj"]
    assert data["taus"] == [0.1, 0.5]
    assert isinstance(data["seconds"], float) and data["seconds"] >= 0

    arrays = checkpoint_arrays(llama_dir)
    assert data["total_params"] == sum(a.size for a in arrays.values())

    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert [m["name"] for m in data["matrices"]] == modules
    for entry in data["matrices"]:
        assert set(entry) == MATRIX_KEYS
        assert isinstance(entry["layer"], int)
        assert entry == expected_matrix(arrays, entry["name"], [0.1, 0.5])
    # v_proj is (num_key_value_heads * head_dim, hidden) = (32, 64): the (out, in) order matters.
    assert data["matrices"][1]["shape"] == [32, 64]


def test_gpt2_conv1d_shape_is_out_in(gpt2_dir, tmp_path, no_debug):
    out = tmp_path / "out.json"
    result = run("analyze", gpt2_dir, "--targets", "c_attn", "--tau", "0.1", "--tau", "0.5",
                 "--json", out)
    assert result.exit_code == 0, result.output

    data = json.loads(out.read_text())
    arrays = checkpoint_arrays(gpt2_dir)
    n_embd = 48
    assert arrays["transformer.h.0.attn.c_attn.weight"].shape == (n_embd, 3 * n_embd)  # stored (in, out)
    assert data["targets"] == ["c_attn"]
    assert [m["name"] for m in data["matrices"]] == [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    for entry in data["matrices"]:
        assert entry["shape"] == [3 * n_embd, n_embd]
        assert entry == expected_matrix(arrays, entry["name"], [0.1, 0.5], conv1d=True)


def test_all_linear_covers_projections_not_embeddings_or_head(llama_dir, tmp_path, no_debug):
    out = tmp_path / "out.json"
    result = run("analyze", llama_dir, "--targets", "all-linear", "--json", out)
    assert result.exit_code == 0, result.output

    data = json.loads(out.read_text())
    names = [m["name"] for m in data["matrices"]]
    assert sorted(names) == sorted(f"model.layers.{i}.{p}" for i in range(2) for p in LLAMA_LINEAR)
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    arrays = checkpoint_arrays(llama_dir)
    assert data["taus"] == [0.5]  # the default
    for entry in data["matrices"]:
        assert entry == expected_matrix(arrays, entry["name"], [0.5])


def test_sharded_checkpoint_matches_single_file(llama_dir, tmp_path, no_debug):
    sharded = tmp_path / "sharded"
    tiny_llama().save_pretrained(sharded, max_shard_size="200KB")  # same seed, same weights
    assert len(list(sharded.glob("*.safetensors"))) > 1
    single_json, sharded_json = tmp_path / "single.json", tmp_path / "sharded.json"
    assert run("analyze", llama_dir, "--targets", "all-linear", "--json", single_json).exit_code == 0
    assert run("analyze", sharded, "--targets", "all-linear", "--json", sharded_json).exit_code == 0

    single, split = json.loads(single_json.read_text()), json.loads(sharded_json.read_text())
    assert split["total_params"] == single["total_params"]
    assert sorted(split["matrices"], key=lambda m: m["name"]) == sorted(single["matrices"],
                                                                         key=lambda m: m["name"])


# -- plot, table, --match-lora-rank ------------------------------------------------------------

def test_plot_writes_png(llama_dir, tmp_path, no_debug):
    from PIL import Image

    out = tmp_path / "plots" / "k.png"  # the parent folder does not exist yet
    result = run("analyze", llama_dir, "--tau", "0.1", "--tau", "0.5", "--plot", out)
    assert result.exit_code == 0, result.output

    raw = out.read_bytes()
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(raw) > 5_000
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        width, height = image.size
    assert width > 100 and height > 100


@pytest.fixture(scope="module")
def deep_llama_dir(tmp_path_factory) -> Path:
    """12 layers: as strings, layers 10 and 11 sort between 1 and 2."""
    from conftest import _save

    return _save(tiny_llama(num_hidden_layers=12, hidden_size=32, intermediate_size=48,
                            num_attention_heads=2, num_key_value_heads=1),
                 tmp_path_factory.mktemp("deep-llama"))


def test_layers_are_listed_in_numeric_order(deep_llama_dir, tmp_path, no_debug):
    out = tmp_path / "k.json"
    result = run("analyze", deep_llama_dir, "--json", out)
    assert result.exit_code == 0, result.output
    expected = [f"model.layers.{i}.self_attn.{m}" for i in range(12) for m in ("q_proj", "v_proj")]
    assert [m["name"] for m in json.loads(out.read_text())["matrices"]] == expected
    rows = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("│") and "_proj" in line]
    assert rows == [str(i) for i in range(12) for _ in range(2)]


def test_plot_has_whole_layer_ticks_and_a_label_inside_the_figure(llama_dir, no_debug):
    from sara_cli.analysis.analyze import analyze, figure

    # Two layers: matplotlib's own ticks would be 0, 0.2, ..., 1; seven modules: a long label.
    fig = figure(analyze(str(llama_dir), [0.1, 0.5], ["all-linear"], "cpu"))
    fig.canvas.draw()
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox
    for text in (ax.yaxis.label, ax.xaxis.label, ax.title):
        box = text.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, text


def test_table_lists_modules_and_summary(llama_dir, no_debug):
    taus, experts = [0.1, 0.5], 3
    result = run("analyze", llama_dir, "--tau", "0.1", "--tau", "0.5", "--experts", str(experts))
    assert result.exit_code == 0, result.output
    text = flat(result.stdout)

    assert "q_proj" in text and "v_proj" in text
    assert "SARA params" in text and f"Mo-SARA params (m={experts})" in text

    arrays = checkpoint_arrays(llama_dir)
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    shapes = [arrays[m + ".weight"].shape for m in modules]
    spectra = [numpy_spectrum(arrays[m + ".weight"]) for m in modules]
    total = sum(a.size for a in arrays.values())
    for tau in taus:
        ks = [numpy_rank(s, tau) for s in spectra]
        sara = sum(k * (out + in_ + 1) for k, (out, in_) in zip(ks, shapes))
        mosara = sum(experts * k + k + experts + out for k, (out, _) in zip(ks, shapes))
        # One summary row per tau: tau, mean k per module, SARA and Mo-SARA counts with %.
        row = re.search(rf"│ {tau:g} │[^\n]*", result.stdout)
        assert row, result.stdout
        assert f"{sara:,d} ({100 * sara / total:.4f}%)" in row.group(0)
        assert f"{mosara:,d} ({100 * mosara / total:.4f}%)" in row.group(0)
    assert re.search(rf"4 matrices, model {total:,d} parameters, \d+\.\d\d s", text), text


def _match_line(output: str):
    match = re.search(r"tau ([0-9.e-]+) gives SARA ([\d,]+) trainable parameters, closest to "
                      r"LoRA rank (\d+)'s ([\d,]+)", flat(output))
    assert match, output
    tau, sara, rank, lora = match.groups()
    return float(tau), int(sara.replace(",", "")), int(rank), int(lora.replace(",", ""))


def _llama_qv_spectra(llama_dir):
    arrays = checkpoint_arrays(llama_dir)
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    return [(numpy_spectrum(arrays[m + ".weight"]), arrays[m + ".weight"].shape) for m in modules]


def test_match_lora_rank_is_closest_on_a_fine_grid(llama_dir, no_debug):
    result = run("analyze", llama_dir, "--match-lora-rank", "4")
    assert result.exit_code == 0, result.output
    tau, sara, rank, lora = _match_line(result.output)

    matrices = _llama_qv_spectra(llama_dir)
    assert rank == 4
    assert lora == 4 * sum(out + in_ for _, (out, in_) in matrices)
    assert 0 < tau <= 1
    # The printed tau, fed back as --tau, gives the printed count.
    assert sara_count(matrices, tau) == sara
    # A fine grid plus every breakpoint of every matrix: all counts SARA can reach.
    grid = list(np.linspace(1e-4, 1.0, 5001))
    grid += [c / s.sum() for s, _ in matrices for c in np.cumsum(s)]
    best = min(abs(sara_count(matrices, t) - lora) for t in grid)
    assert abs(sara - lora) <= best  # ties allowed


def test_match_lora_rank_count_is_closest_for_many_ranks(llama_dir, no_debug):
    matrices = _llama_qv_spectra(llama_dir)
    grid = [c / s.sum() for s, _ in matrices for c in np.cumsum(s)]  # every reachable count
    for rank in range(1, 13):
        result = run("analyze", llama_dir, "--match-lora-rank", str(rank))
        assert result.exit_code == 0, result.output
        _, sara, _, lora = _match_line(result.output)
        assert sara in {sara_count(matrices, t) for t in grid}
        assert abs(sara - lora) <= min(abs(sara_count(matrices, t) - lora) for t in grid), rank


def test_match_lora_rank_printed_tau_reproduces_printed_count(llama_dir, no_debug):
    matrices = _llama_qv_spectra(llama_dir)
    mismatches = []
    for rank in range(1, 13):
        result = run("analyze", llama_dir, "--match-lora-rank", str(rank))
        assert result.exit_code == 0, result.output
        tau, sara, _, _ = _match_line(result.output)
        if sara_count(matrices, tau) != sara:
            mismatches.append((rank, tau, sara, sara_count(matrices, tau)))
    assert not mismatches


# -- one spectrum per matrix -------------------------------------------------------------------

def test_several_taus_share_one_spectrum_per_matrix(llama_dir, monkeypatch, no_debug, tmp_path):
    import sara_cli.adapters.initialize as core

    monkeypatch.setenv("SARA_HOME", str(tmp_path))  # a cold spectrum cache
    calls = []
    real = core.singular_values

    def counting(W, *args, **kwargs):
        calls.append(tuple(W.shape))
        return real(W, *args, **kwargs)

    monkeypatch.setattr(core, "singular_values", counting)
    result = run("analyze", llama_dir, "--targets", "all-linear",
                 "--tau", "0.1", "--tau", "0.5", "--tau", "0.9")
    assert result.exit_code == 0, result.output
    assert len(calls) == 2 * len(LLAMA_LINEAR)


# -- bad input -----------------------------------------------------------------------------------

def test_missing_folder(tmp_path, no_debug):
    missing = tmp_path / "no-such-checkpoint"
    assert_user_error(run("analyze", missing), str(missing), "does not exist")


def test_bin_only_checkpoint(tmp_path, no_debug):
    folder = tmp_path / "bin-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8)},
               folder / "pytorch_model.bin")
    assert_user_error(run("analyze", folder), ".bin", "safetensors")


@pytest.mark.parametrize("tau", ["0", "1.5", "-0.2"])
def test_tau_out_of_range(llama_dir, tau, no_debug):
    assert_user_error(run("analyze", llama_dir, "--tau", "0.5", "--tau", tau), f"--tau {float(tau)}",
                      "(0, 1]")


def test_tau_one_is_allowed(llama_dir, tmp_path, no_debug):
    out = tmp_path / "out.json"
    assert run("analyze", llama_dir, "--tau", "1", "--json", out).exit_code == 0
    arrays = checkpoint_arrays(llama_dir)
    for entry in json.loads(out.read_text())["matrices"]:
        assert entry == expected_matrix(arrays, entry["name"], [1.0])


def test_targets_that_match_nothing_list_existing_names(llama_dir, no_debug):
    message = assert_user_error(run("analyze", llama_dir, "--targets", "nope"), "'nope'")
    for name in ("q_proj", "v_proj", "o_proj", "down_proj"):
        assert name in message


def test_nan_weight_is_reported(tmp_path, no_debug):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[3, 5] = float("nan")
    folder = tmp_path / "nan-llama"
    model.save_pretrained(folder)
    assert_user_error(run("analyze", folder), "model.layers.1.self_attn.q_proj", "NaN")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_gpu(llama_dir, no_debug):
    assert_user_error(run("analyze", llama_dir, "--device", "cuda"), "--device cuda", "no CUDA")


def test_unknown_hub_id_offline(monkeypatch, no_debug):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_user_error(run("analyze", "nobody/no-such-model"), "nobody/no-such-model",
                      "could not be fetched from the hub")


# -- --debug ---------------------------------------------------------------------------------------

def test_debug_lets_the_traceback_through(tmp_path, no_debug):
    missing = tmp_path / "missing"
    result = run("--debug", "analyze", missing)
    assert result.exit_code != 0
    assert isinstance(result.exception, SaraError)
    frames = "".join(traceback.format_exception(*result.exc_info))
    assert "resolve_model_dir" in frames  # the frame that raised, not just the CLI wrapper


def test_console_script_debug_anywhere_on_the_line(tmp_path, monkeypatch, capsys, no_debug):
    missing = tmp_path / "missing"
    monkeypatch.setattr(sys, "argv", ["sara", "analyze", str(missing)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "does not exist" in err

    monkeypatch.setattr(sys, "argv", ["sara", "analyze", str(missing), "--debug"])
    with pytest.raises(SaraError, match="does not exist"):
        cli.main()
