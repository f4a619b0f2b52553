"""`sara merge`: a plain, verified Hugging Face checkpoint (or PEFT LoRA adapter) from a trained run.

Each method is trained once per module for a few steps on the tiny Llama, with a learning rate
large enough that the adapters clearly move. Merged folders are loaded by plain transformers in a
child process that cannot import sara, and every comparison is against an independent
computation: the adapter model, numpy float64, or PEFT.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import one_line_error
from sara_cli import __version__
from sara_cli.adapters import checkpoint
from sara_cli.merging import merge as merge_module
from sara_cli.merging import verify as verify_module
from sara_cli.cli.app import app
from sara_cli.errors import SaraError

EXACT = ("sara", "lora", "pissa", "sorsa")
ADAPTER = {
    "sara": {"tau": 0.3},
    "mosara": {"tau": 0.3, "num_experts": 3},
    "lora": {"rank": 4, "alpha": 8.0},  # scale 2, so a missing scale would show
    "pissa": {"rank": 4},
    "sorsa": {"rank": 4},
}
RECORDS = [{"instruction": f"Add {i} and {i + 3}.", "input": "", "output": f"The sum is {2 * i + 3}."}
           for i in range(8)]
TEXT = "Question: what is 12 plus 30? Answer: 42. The quick brown fox jumps over the lazy dog."
FP32_TOLERANCE = 1e-4  # a fixed bound, independent of the noise-floor rule, that tiny models meet easily

# Loads merged folders with nothing but transformers: `sara_cli` is poisoned in sys.modules, the
# interpreter runs isolated (-I: no PYTHONPATH, no cwd or script folder on sys.path), in a
# scratch folder.
CHILD = textwrap.dedent("""
    import sys
    sys.modules["sara_cli"] = None  # any `import sara_cli` now raises ImportError
    import json
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    try:
        import sara_cli  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("sara_cli is importable in the child")
    jobs = json.loads(sys.argv[1])
    for folder, ids_path, target in jobs:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
        assert not any("sara" in type(m).__module__ for m in model.modules())
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(np.load(ids_path))).logits
        np.save(target, logits.float().numpy())
        print(folder, str(next(model.parameters()).dtype))
""")


# -- helpers ---------------------------------------------------------------------------------------

def run_cli(*args: str):
    return CliRunner().invoke(app, ["merge", *map(str, args)])


def figures(output: str) -> tuple[float, float]:
    """(max |logit diff|, greedy agreement in %) from the CLI summary."""
    match = re.search(r"max \|logit diff\| (\S+), greedy agreement ([\d.]+)%", output)
    assert match, output
    return float(match.group(1)), float(match.group(2))


def train_run(root: Path, base: Path, data: Path, method: str, targets: str = "q_proj,v_proj") -> Path:
    from sara_cli.recipe import validate
    from sara_cli.training.train import train

    out = root / f"run-{method}-{base.name}"
    recipe = validate({
        "model": {"name_or_path": str(base), "dtype": "float32"},
        "adapter": {"method": method, "targets": targets, **ADAPTER[method]},
        "data": {"train_file": str(data), "cutoff_len": 64},
        "train": {"output_dir": str(out), "max_steps": 3, "learning_rate": 0.05,
                  "lr_scheduler_type": "constant", "per_device_train_batch_size": 4,
                  "logging_steps": 1, "save_steps": 1000, "seed": 0},
    })
    train(recipe)
    return out


def token_ids(base: Path, root: Path) -> Path:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(base)(TEXT, return_tensors="np")["input_ids"]  # (1, T)
    path = root / f"ids-{base.name}.npy"
    np.save(path, ids)
    return path


def adapter_logits(run: Path, ids_path: Path) -> np.ndarray:
    """Logits of base + adapter, the model the merge must reproduce. (1, T, V) float32."""
    model, _, _ = checkpoint.load_adapter_model(checkpoint.find_adapter_dir(run))
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.load(ids_path))).logits.float().numpy()


def base_logits(base: Path, work: Path) -> np.ndarray:
    """Logits of the untouched base, to show that the adapter moved the model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.load(token_ids(base, work)))).logits.numpy()


def tensors(folder: Path) -> dict:
    """Every tensor of a checkpoint folder (one file or shards)."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def adapter_state(run: Path) -> tuple[dict, dict]:
    """(sara_config.json, {module: {name: float64 numpy}}) of a run."""
    adapter_dir = checkpoint.find_adapter_dir(run)
    config = checkpoint.read_config(adapter_dir)
    grouped: dict = {}
    for key, value in load_file(str(adapter_dir / checkpoint.WEIGHTS_NAME)).items():
        module, _, name = key.rpartition(".")
        grouped.setdefault(module, {})[name] = value.double().numpy()
    return config, grouped


def nothing_left(parent: Path, before: set[str], out: Path) -> None:
    """No --out and no staging or backup folder beside it."""
    assert not out.exists()
    assert set(os.listdir(parent)) == before, set(os.listdir(parent)) - before


# -- fixtures: one training run per method, one merge each, one plain-transformers child -------------

@pytest.fixture(scope="module", autouse=True)
def _no_progress_bars():
    """As in a fresh `sara` process: the CLI turns the libraries' bars off before transformers is
    imported, which in this test process happened long before."""
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    yield
    if was_on:
        logging.enable_progress_bar()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def data_file(work) -> Path:
    path = work / "records.json"
    path.write_text(json.dumps(RECORDS))
    return path


@pytest.fixture(scope="module")
def runs(work, llama_dir, data_file) -> dict[str, Path]:
    return {method: train_run(work, llama_dir, data_file, method) for method in ADAPTER}


@pytest.fixture(scope="module")
def gpt2_run(work, gpt2_dir, data_file) -> Path:
    return train_run(work, gpt2_dir, data_file, "sara", targets="c_attn")


@pytest.fixture(scope="module")
def merged(work, runs, data_file) -> dict[str, tuple[Path, object]]:
    """{name: (merged folder, CLI result)} for every method (Mo-SARA with mean routing)."""
    done = {}
    for method, run in runs.items():
        out = work / f"merged-{method}"
        extra = ["--routing", "mean", "--calibration", data_file] if method == "mosara" else []
        done[method] = (out, run_cli(run, "--out", out, *extra))
    return done


@pytest.fixture(scope="module")
def special(work, runs, gpt2_run) -> dict[str, tuple[Path, object]]:
    """bf16 output, small shards, and the GPT-2 (Conv1D) merge."""
    cases = {"bf16": (runs["sara"], ["--dtype", "bfloat16"]),
             "sharded": (runs["pissa"], ["--max-shard-size", "200KB"]),
             "gpt2": (gpt2_run, [])}
    done = {}
    for name, (run, extra) in cases.items():
        out = work / f"merged-{name}"
        done[name] = (out, run_cli(run, "--out", out, *extra))
    return done


@pytest.fixture(scope="module")
def plain(work, merged, special, llama_dir, gpt2_dir) -> dict[str, np.ndarray]:
    """{name: logits} of each merged folder, computed in a child process without sara."""
    llama_ids, gpt2_ids = token_ids(llama_dir, work), token_ids(gpt2_dir, work)
    jobs, names = [], []
    for name, (out, result) in {**merged, **special}.items():
        if result.exit_code != 0:
            continue  # the test of that merge reports it
        jobs.append((str(out), str(gpt2_ids if name == "gpt2" else llama_ids), str(work / f"logits-{name}.npy")))
        names.append(name)
    scratch = work / "child-cwd"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    child = subprocess.run([sys.executable, "-I", "-c", CHILD, json.dumps(jobs)], cwd=scratch, env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    dtypes = dict(line.rsplit(" ", 1) for line in child.stdout.strip().splitlines())
    return {name: (np.load(target), dtypes[folder]) for name, (folder, _, target) in zip(names, jobs)}


# -- 1. merged = adapter model, in plain transformers ------------------------------------------------

@pytest.mark.parametrize("method", EXACT)
def test_merged_checkpoint_loads_without_sara_and_matches_adapter(method, runs, merged, plain, work, llama_dir):
    out, result = merged[method]
    assert result.exit_code == 0, result.output
    diff, agreement = figures(result.output)
    assert "verification (float32)" in result.output
    assert diff <= FP32_TOLERANCE and agreement == 100.0
    logits, dtype = plain[method]
    assert dtype == "torch.float32"
    reference = adapter_logits(runs[method], token_ids(llama_dir, work))
    assert np.abs(logits - reference).max() <= FP32_TOLERANCE
    base = base_logits(llama_dir, work)
    assert np.abs(reference - base).max() > 1e-3, "the adapter did not move; the test proves nothing"


# -- 2. what is copied, what is written ---------------------------------------------------------------

@pytest.mark.parametrize("method", EXACT)
def test_non_targets_bit_identical_and_files_copied(method, runs, merged, llama_dir):
    out, result = merged[method]
    config, _ = adapter_state(runs[method])
    base, new = tensors(llama_dir), tensors(out)
    assert set(base) == set(new)
    targets = {f"{m}.weight" for m in config["ranks"]}
    assert targets <= set(base)
    for name in base:
        assert new[name].dtype == base[name].dtype, name
        if name in targets:
            assert not torch.equal(new[name], base[name]), f"{name} did not change"
        else:
            assert torch.equal(new[name], base[name]), f"{name} is not bit-identical to the base"

    written = json.loads((out / "config.json").read_text())
    assert not [k for k in written if k.startswith("sara")]
    assert written == json.loads((llama_dir / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (llama_dir / name).is_file(), f"the fixture base lacks {name}"
        assert (out / name).read_bytes() == (llama_dir / name).read_bytes(), name
    assert not (out / checkpoint.CONFIG_NAME).exists() and not (out / "adapter_config.json").exists()

    card = (out / "README.md").read_text()
    diff, _ = figures(result.output)
    assert str(llama_dir) in card and f"method: {method}" in card and f"sara {__version__}" in card
    assert f"largest absolute logit difference: {diff:.3g}" in card
    assert "greedy next-token agreement: 100.00%" in card
    assert "dtype: float32" in card


def test_output_is_readable_by_other_users(merged):
    out, _ = merged["sara"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


# -- 3. SARA's update has rank <= k ----------------------------------------------------------------

def test_sara_update_rank_at_most_k(runs, merged, llama_dir):
    config, _ = adapter_state(runs["sara"])
    base, new = tensors(llama_dir), tensors(merged["sara"][0])
    for module, k in config["ranks"].items():
        name = f"{module}.weight"
        delta = new[name].double().numpy() - base[name].double().numpy()  # (out, in)
        s = np.linalg.svd(delta, compute_uv=False)
        # The difference of two float32 matrices carries ~1e-9 rounding noise in every entry,
        # so the noise singular values sit near 1e-8; the trained ones are many orders larger.
        rank = np.linalg.matrix_rank(delta, tol=1e-5 * s[0])
        assert 1 <= rank <= k, (module, rank, k, s[:k + 2])


# -- 4. PiSSA/SORSA: merged = W + (trained - initial) --------------------------------------------------

@pytest.mark.parametrize("method", ("pissa", "sorsa"))
def test_residual_methods_merge_to_w_plus_trained_minus_initial(method, runs, merged, llama_dir):
    config, grouped = adapter_state(runs[method])
    base, new = tensors(llama_dir), tensors(merged[method][0])
    for module in config["ranks"]:
        t = grouped[module]
        if method == "pissa":
            update = t["pissa_B"] @ t["pissa_A"] - t["pissa_B0"] @ t["pissa_A0"]
        else:
            update = ((t["sorsa_U"] * t["sorsa_S"]) @ t["sorsa_Vh"]
                      - (t["sorsa_U0"] * t["sorsa_S0"]) @ t["sorsa_Vh0"])
        assert np.abs(update).max() > 1e-4, f"{module} did not train"
        expected = base[f"{module}.weight"].double().numpy() + update
        got = new[f"{module}.weight"].double().numpy()
        # float32 result: one rounding of W (|W| < 1) plus the float32 product of the factors.
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


# -- 5. atomic output ------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupt"])
def test_failure_half_way_leaves_nothing(failure, runs, tmp_path, monkeypatch):
    original = merge_module.ShardWriter.flush
    calls = []

    def flush_then_fail(self):
        original(self)
        calls.append(1)
        if len(calls) == 2:  # one shard is on disk, more are coming
            raise failure

    monkeypatch.setattr(merge_module.ShardWriter, "flush", flush_then_fail)
    out = tmp_path / "merged"
    result = run_cli(runs["sara"], "--out", out, "--max-shard-size", "200KB")
    assert len(calls) == 2
    if isinstance(failure, OSError):
        one_line_error(result, f"no space left on the device while writing {out}", f"nothing was written at {out}")
        assert result.exit_code == 2
    else:
        assert result.exit_code == 130
    nothing_left(tmp_path, set(), out)


def test_failed_verification_leaves_nothing(runs, tmp_path, monkeypatch):
    original = merge_module.factors

    def wrong_update(*args, **kwargs):
        B, A, scale = original(*args, **kwargs)
        return B * 1.5, A, scale  # a plausible but wrong merge rule

    monkeypatch.setattr(merge_module, "factors", wrong_update)
    out = tmp_path / "merged"
    one_line_error(run_cli(runs["sara"], "--out", out), "verification failed", "nothing was written")
    nothing_left(tmp_path, set(), out)


def test_existing_out_needs_overwrite_and_survives_a_failed_overwrite(runs, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    one_line_error(run_cli(runs["lora"], "--out", out), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "old"

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(merge_module, "copy_base_files", fail)
        one_line_error(run_cli(runs["lora"], "--out", out, "--overwrite"), "Input/output error")
    assert sorted(os.listdir(tmp_path)) == ["merged"]
    assert sorted(os.listdir(out)) == ["keep.txt"]

    result = run_cli(runs["lora"], "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # no backup or staging folder left
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


# -- 6. Mo-SARA --------------------------------------------------------------------------------------

def test_mosara_refused_by_default(runs, data_file, tmp_path):
    out = tmp_path / "merged"
    one_line_error(run_cli(runs["mosara"], "--out", out), "--routing mean", "--calibration")
    one_line_error(run_cli(runs["mosara"], "--out", out, "--routing", "mean"), "--calibration")
    one_line_error(run_cli(runs["mosara"], "--out", out, "--routing", "mean", "--calibration",
                           tmp_path / "missing.json"), "missing.json", "does not exist")
    one_line_error(run_cli(runs["mosara"], "--out", out, "--routing", "sometimes"), "refuse or mean")
    one_line_error(run_cli(runs["sara"], "--out", out, "--routing", "mean", "--calibration", data_file),
                   "Mo-SARA adapters only")
    nothing_left(tmp_path, set(), out)


def test_mosara_mean_routing_reports_fidelity(runs, merged, plain, data_file, work, llama_dir):
    out, result = merged["mosara"]
    assert result.exit_code == 0, result.output
    assert "calibration loss routed" in result.output
    diff, agreement = figures(result.output)
    assert diff > 0 and 0 < agreement <= 100
    _, grouped = adapter_state(runs["mosara"])
    assert all(np.abs(t["mosara_v"]).max() > 1e-3 for t in grouped.values()), "v did not train"
    card = (out / "README.md").read_text()
    assert "## Routing" in card and str(data_file) in card
    assert f"largest absolute logit difference: {diff:.3g}" in card
    assert "greedy next-token agreement" in card and "calibration loss: routed" in card

    # The merged checkpoint is exactly the routed model with every gate pinned to its layer's
    # mean over the calibration tokens.
    logits, _ = plain["mosara"]
    assert np.abs(logits - static_gate_logits(runs["mosara"], data_file, work, llama_dir)).max() <= FP32_TOLERANCE


def static_gate_logits(run: Path, data_file: Path, work: Path, base: Path) -> np.ndarray:
    from sara_cli.adapters.registry import MoSaraLayer
    from sara_cli.data.dataset import Tokenize
    from sara_cli.adapters.gates import collect_gates

    model, tokenizer, _ = checkpoint.load_adapter_model(checkpoint.find_adapter_dir(run))
    texts = [Tokenize(tokenizer, "alpaca", 0, True).texts(r)[1] for r in RECORDS]
    mean = {name: g.mean(dim=0) for name, g in collect_gates(model, tokenizer, texts).items()}
    for name, layer in model.named_modules():
        if isinstance(layer, MoSaraLayer):
            layer.gates = lambda z, g=mean[name]: g.expand(*z.shape[:-1], g.shape[0])
            layer.fast_inference = False  # the inference path folds the router in: it would bypass gates()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.load(token_ids(base, work)))).logits.numpy()


def test_mosara_static_router_merges_exactly(runs, data_file, tmp_path):
    """A router that ignores its input gives every token the same gate: the mean merge is exact."""
    adapter = tmp_path / "adapter"
    shutil.copytree(checkpoint.find_adapter_dir(runs["mosara"]), adapter)
    state = load_file(str(adapter / checkpoint.WEIGHTS_NAME))
    for key in [k for k in state if k.endswith("mosara_router_in")]:
        state[key] = torch.zeros_like(state[key])  # router logits 0: g = 1/m for every token
    for key in [k for k in state if k.endswith("mosara_lambda")]:
        state[key] = state[key] * torch.linspace(0.5, 2.0, state[key].shape[0])[:, None]  # distinct experts
    save_file(state, str(adapter / checkpoint.WEIGHTS_NAME))
    report = merge_module.merge(adapter, tmp_path / "merged", routing="mean", calibration=str(data_file))
    v = report.verification
    assert v["max_abs_logit_diff"] <= FP32_TOLERANCE and v["greedy_agreement"] == 1.0
    assert abs(v["calibration_loss_change"]) <= 1e-5


@pytest.mark.parametrize("v_position", ["after", "before"])
def test_mosara_static_delta_weight(v_position):
    from sara_cli.adapters.registry import MoSaraLayer

    torch.manual_seed(0)
    layer = MoSaraLayer(torch.nn.Linear(6, 5), rank=3, num_experts=4, v_position=v_position)
    with torch.no_grad():
        layer.mosara_v.normal_()
        layer.mosara_lambda.normal_()
    gbar = torch.softmax(torch.randn(4), dim=0)
    U, Vh = layer.mosara_U.double().numpy(), layer.mosara_Vh.double().numpy()
    Lam, v = layer.mosara_lambda.detach().double().numpy(), layer.mosara_v.detach().double().numpy()
    core = U @ np.diag(gbar.double().numpy() @ Lam) @ Vh  # (5, 6)
    expected = np.diag(v) @ core if v_position == "after" else core @ np.diag(v)
    np.testing.assert_allclose(layer.static_delta_weight(gbar).detach().double().numpy(), expected, atol=1e-6)

    # With gates fixed at gbar, the routed branch is x delta^T.
    layer.gates = lambda z: gbar.expand(*z.shape[:-1], 4)
    x = torch.randn(2, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer.branch(x), x @ layer.static_delta_weight(gbar).T, atol=1e-5, rtol=1e-5)


# -- 7. PEFT LoRA export ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", EXACT)
def test_peft_lora_export_round_trip(method, runs, merged, plain, tmp_path, llama_dir, work):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "peft"
    result = run_cli(runs[method], "--out", out, "--format", "peft-lora")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    exported = json.loads((out / "adapter_config.json").read_text())
    config, _ = adapter_state(runs[method])
    doubled = 2 if method in ("pissa", "sorsa") else 1  # trained and initial factors, side by side
    assert exported["rank_pattern"] == {m: doubled * r for m, r in config["ranks"].items()}
    assert exported["alpha_pattern"] == exported["rank_pattern"]  # PEFT scale alpha / r = 1
    assert exported["peft_type"] == "LORA" and "PEFT LoRA adapter" in (out / "README.md").read_text()

    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(np.load(token_ids(llama_dir, work)))).logits.numpy()
    assert np.abs(logits - plain[method][0]).max() <= FP32_TOLERANCE


def test_peft_lora_export_on_conv1d(gpt2_run, plain, tmp_path, gpt2_dir, work):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "peft"
    assert run_cli(gpt2_run, "--out", out, "--format", "peft-lora").exit_code == 0
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_dir), str(out)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(np.load(token_ids(gpt2_dir, work)))).logits.numpy()
    assert np.abs(logits - plain["gpt2"][0]).max() <= FP32_TOLERANCE


VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py


def vllm_problems(folder: Path, max_lora_rank: int) -> list[str]:
    """What vLLM would refuse or get wrong serving `folder` with --max-lora-rank N, written from
    its rules (vllm/config/lora.py, vllm/lora/peft_helper.py), not from sara's code:
    - --max-lora-rank is one of VLLM_MAX_LORA_RANKS;
    - the early check compares the top-level `r` (newer versions: also rank_pattern) with it;
    - older versions ignore rank_pattern/alpha_pattern and apply lora_alpha / r to every module,
      newer ones the per-module alpha / rank: either way every module must get the scale 1 the
      factors were written for; use_rslora would make it alpha / sqrt(r);
    - each module's factors (rank = rows of lora_A) are zero-padded up to the cap;
    - DoRA, modules_to_save, bias and base-modifying inits (PiSSA, OLoRA, ...) are refused."""
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(str(folder / "adapter_model.safetensors"))
    problems = []
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        problems.append(f"--max-lora-rank {max_lora_rank} is not an allowed value")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            problems.append(f"missing {key}")
    if max([config["r"], *config.get("rank_pattern", {}).values()]) > max_lora_rank:
        problems.append("rank above max_lora_rank")
    if config.get("use_dora") or config.get("modules_to_save") or config.get("bias", "none") != "none":
        problems.append("DoRA, modules_to_save or bias")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        problems.append(f"init_lora_weights {init}")
    if config.get("use_rslora") or config["lora_alpha"] / config["r"] != 1:
        problems.append("the scale vLLM applies to every module is not 1")
    modules = {k[len("base_model.model."):-len(".lora_A.weight")] for k in weights if k.endswith(".lora_A.weight")}
    for module in modules:
        A = weights[f"base_model.model.{module}.lora_A.weight"]
        B = weights[f"base_model.model.{module}.lora_B.weight"]
        rank = A.shape[0]
        if B.shape[1] != rank or rank > max_lora_rank:
            problems.append(f"{module}: factors {tuple(B.shape)} x {tuple(A.shape)} do not fit the cap")
        if config["rank_pattern"].get(module) != rank or config["alpha_pattern"].get(module) != rank:
            problems.append(f"{module}: rank_pattern/alpha_pattern disagree with the tensors")
        if module.split(".")[-1] not in config["target_modules"]:
            problems.append(f"{module} not in target_modules")
    return problems


def smallest_allowed(rank: int) -> int | None:
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)


@pytest.mark.parametrize("method", ["sara", "pissa"])
def test_peft_lora_export_meets_vllm_rules(method, runs, tmp_path):
    out = tmp_path / "peft"
    result = run_cli(runs[method], "--out", out, "--format", "peft-lora")
    assert result.exit_code == 0, result.output
    exported = json.loads((out / "adapter_config.json").read_text())
    top = max(exported["rank_pattern"].values())
    assert exported["r"] == exported["lora_alpha"] == top  # not the median: vLLM's early check sees it
    cap = smallest_allowed(top)
    assert f"serve with vLLM --max-lora-rank {cap}" in result.output
    assert vllm_problems(out, cap) == []
    lower = VLLM_MAX_LORA_RANKS[VLLM_MAX_LORA_RANKS.index(cap) - 1]
    assert "rank above max_lora_rank" in vllm_problems(out, lower)  # the checker's rank rule bites
    assert re.search(r"verification \(float32, exported LoRA vs adapter\): .* \[passed\]", result.output)


def test_max_rank_truncates_by_svd_with_reported_energy(runs, tmp_path, llama_dir, work):
    """Modules above --max-rank hold the best rank-N approximation of their update (numpy SVD),
    the kept energy is its share of ||delta W||_F^2, PEFT loads the result, and vLLM can serve it."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    config, state = adapter_state(runs["sara"])
    ranks = config["ranks"]
    cap = sorted(set(ranks.values()))[len(set(ranks.values())) // 2] - 1  # some modules above, maybe some not
    assert cap >= 1 and any(k > cap for k in ranks.values())
    out = tmp_path / "peft"
    result = run_cli(runs["sara"], "--out", out, "--format", "peft-lora", "--max-rank", cap)
    assert result.exit_code == 0, result.output
    assert "[an approximation: reported, not judged]" in result.output
    assert f"truncated to --max-rank {cap}" in result.output
    exported = json.loads((out / "adapter_config.json").read_text())
    weights = load_file(str(out / "adapter_model.safetensors"))
    card = (out / "README.md").read_text()
    base = tensors(llama_dir)
    expected_weights = {}
    for module, k in ranks.items():
        t = state[module]
        delta = (t["sara_U"] * t["sara_lambda"]) @ t["sara_Vh"]  # (out, in) float64
        U, S, Vh = np.linalg.svd(delta, full_matrices=False)
        n = min(k, cap)
        best = (U[:, :n] * S[:n]) @ Vh[:n]
        A = weights[f"base_model.model.{module}.lora_A.weight"].double().numpy()
        B = weights[f"base_model.model.{module}.lora_B.weight"].double().numpy()
        assert A.shape == (n, delta.shape[1]) and exported["rank_pattern"][module] == n
        np.testing.assert_allclose(B @ A, best, atol=1e-6 * np.abs(delta).max())
        if k > cap:
            energy = float((S[:n] ** 2).sum() / (S**2).sum())
            assert 0 < energy < 1
            row = re.search(rf"\| {re.escape(module)} \| {k} \| {n} \| ([\d.]+)% \|", card)
            assert row, card
            assert float(row.group(1)) / 100 == pytest.approx(energy, abs=5e-7)  # printed to 4 decimals in %
        expected_weights[module] = base[module + ".weight"].double().numpy() + best
    assert exported["r"] == exported["lora_alpha"] == cap
    assert vllm_problems(out, smallest_allowed(cap)) == []

    # PEFT loads it, and computes the base plus the truncated update.
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir).eval(), str(out)).eval()
    reference = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        for module, weight in expected_weights.items():
            reference.get_submodule(module).weight.copy_(torch.from_numpy(weight))
        ids = torch.from_numpy(np.load(token_ids(llama_dir, work)))
        np.testing.assert_allclose(model(input_ids=ids).logits.numpy(), reference(input_ids=ids).logits.numpy(),
                                   atol=FP32_TOLERANCE)


def test_max_rank_report_figures_come_from_the_export(runs, tmp_path):
    """The reported figures compare the untruncated adapter with the truncated export: a cap at
    the largest rank changes nothing (passed), a cap of 1 moves the logits."""
    config, _ = adapter_state(runs["sara"])
    top = max(config["ranks"].values())
    same = merge_module.merge(runs["sara"], tmp_path / "same", fmt="peft-lora", max_rank=top)
    assert same.export["truncated"] == {} and same.verification["passed"]
    cut = merge_module.merge(runs["sara"], tmp_path / "cut", fmt="peft-lora", max_rank=1)
    assert cut.verification["exact"] is False and "passed" not in cut.verification
    assert cut.verification["max_abs_logit_diff"] > 10 * same.verification["max_abs_logit_diff"]
    assert set(cut.export["truncated"]) == {m for m, k in config["ranks"].items() if k > 1}


@pytest.mark.parametrize(("rank", "cap"), [(1, 1), (2, 8), (8, 8), (9, 16), (300, 320), (321, 512),
                                           (512, 512), (513, None)])
def test_vllm_max_lora_rank(rank, cap):
    from sara_cli.merging.export import vllm_max_lora_rank

    assert vllm_max_lora_rank(rank) == cap == smallest_allowed(rank)


def test_rank_above_vllm_cap_warns():
    from rich.console import Console

    from sara_cli.cli.views import export_report

    console = Console(record=True, width=200)
    export_report(console, {"rank": 600, "min_rank": 4, "vllm_max_lora_rank": None, "max_rank": None,
                            "truncated": {}})
    text = console.export_text()
    assert "no vLLM --max-lora-rank serves it" in text
    assert "warning: the largest rank, 600, exceeds vLLM's largest --max-lora-rank (512)" in text
    assert "--max-rank 512" in text and "--format hf" in text


def test_max_rank_needs_peft_lora_and_a_positive_value(runs, tmp_path):
    out = tmp_path / "out"
    one_line_error(run_cli(runs["sara"], "--out", out, "--max-rank", 8), "--max-rank", "--format peft-lora")
    one_line_error(run_cli(runs["sara"], "--out", out, "--format", "peft-lora", "--max-rank", 0),
                   "--max-rank must be at least 1, got 0")
    assert not out.exists()


def test_peft_lora_rejects_dtype(runs, tmp_path):
    out = tmp_path / "peft"
    one_line_error(run_cli(runs["sara"], "--out", out, "--format", "peft-lora", "--dtype", "bfloat16"),
                   "--dtype", "float32")
    assert not out.exists()


# -- 8. dtype and shards ----------------------------------------------------------------------------

def test_bfloat16_output(special, plain, llama_dir, runs, work):
    out, result = special["bf16"]
    assert result.exit_code == 0, result.output
    assert "verification (bfloat16)" in result.output
    diff, _ = figures(result.output)
    assert f"largest absolute logit difference: {diff:.3g}" in (out / "README.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    base, new = tensors(llama_dir), tensors(out)
    assert {t.dtype for t in new.values()} == {torch.bfloat16}
    targets = {f"{m}.weight" for m in checkpoint.read_config(checkpoint.find_adapter_dir(runs["sara"]))["ranks"]}
    for name in set(base) - targets:
        assert torch.equal(new[name], base[name].to(torch.bfloat16)), name  # one cast, nothing else
    logits, dtype = plain["bf16"]
    assert dtype == "torch.bfloat16"
    reference = adapter_logits(runs["sara"], token_ids(llama_dir, work))
    spread = reference.max() - reference.min()
    assert np.abs(logits - reference).max() <= verify_module.HALF_PRECISION_TOLERANCE * spread


def test_small_shards_with_index(special, plain, llama_dir, runs, work):
    out, result = special["sharded"]
    assert result.exit_code == 0, result.output
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s)
                                   for s in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base = tensors(llama_dir)
    assert set(index["weight_map"]) == set(base)
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        stored = load_file(str(out / shard))
        assert set(stored) == {n for n, s in index["weight_map"].items() if s == shard}
        assert sum(t.numel() * t.element_size() for t in stored.values()) <= 200_000 or len(stored) == 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in base.values())
    reference = adapter_logits(runs["pissa"], token_ids(llama_dir, work))
    assert np.abs(plain["sharded"][0] - reference).max() <= FP32_TOLERANCE


@pytest.mark.parametrize("text, size", [("200KB", 200_000), ("5GB", 5 * 10**9), ("1.5MiB", 1_572_864),
                                        ("4096", 4096)])
def test_parse_size(text, size):
    assert merge_module.parse_size(text) == size


def test_parse_size_rejects_nonsense(runs, tmp_path):
    one_line_error(run_cli(runs["sara"], "--out", tmp_path / "m", "--max-shard-size", "big"), "--max-shard-size")


# -- 9. bad input ----------------------------------------------------------------------------------

def perturbed_llama(folder: Path) -> Path:
    from conftest import _save, tiny_llama

    model = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    return _save(model, folder)


def test_bad_inputs_fail_in_one_line_and_write_nothing(runs, tmp_path, gpt2_dir, llama_dir):
    out = tmp_path / "out"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "empty-run").mkdir()
    one_line_error(run_cli(scratch / "empty-run", "--out", out), "holds no sara adapter")
    one_line_error(run_cli(scratch / "no-such-run", "--out", out), "does not exist")
    not_it = "is not the model this adapter was trained on"
    one_line_error(run_cli(runs["sara"], "--out", out, "--base", gpt2_dir), not_it, "--force")

    other = perturbed_llama(scratch / "other-llama")
    one_line_error(run_cli(runs["sara"], "--out", out, "--base", other), not_it, "--force")

    quantized = scratch / "quantized"
    shutil.copytree(llama_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    one_line_error(run_cli(runs["sara"], "--out", out, "--base", quantized), "quantized", "bitsandbytes")

    blocker = scratch / "a-file"
    blocker.write_text("")
    one_line_error(run_cli(runs["sara"], "--out", blocker / "merged"), "is a file")
    one_line_error(run_cli(runs["sara"], "--out", blocker), "is a file")
    assert blocker.is_file() and blocker.read_text() == ""
    one_line_error(run_cli(runs["sara"], "--out", out, "--dtype", "float64"), "--dtype")
    one_line_error(run_cli(runs["sara"], "--out", out, "--format", "gguf"), "--format")
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["scratch"]
    assert sorted(os.listdir(scratch)) == ["a-file", "empty-run", "other-llama", "quantized"]


def test_force_merges_onto_another_base(runs, tmp_path):
    other = perturbed_llama(tmp_path / "other-llama")
    out = tmp_path / "merged"
    result = run_cli(runs["sara"], "--out", out, "--base", other, "--force")
    assert result.exit_code == 0, result.output
    assert str(other) in (out / "README.md").read_text()
    config, _ = adapter_state(runs["sara"])
    base, new = tensors(other), tensors(out)
    untouched = next(n for n in base if n.removesuffix(".weight") not in config["ranks"])
    assert torch.equal(new[untouched], base[untouched])


def test_no_verify_says_so(runs, tmp_path):
    out = tmp_path / "merged"
    result = run_cli(runs["lora"], "--out", out, "--no-verify")
    assert result.exit_code == 0 and "verification" not in result.output
    assert "not verified (`--no-verify`)" in (out / "README.md").read_text()


# -- 10. GPT-2 (Conv1D, weights stored (in, out)) ----------------------------------------------------

def test_gpt2_conv1d_merge(special, plain, gpt2_run, gpt2_dir, work):
    out, result = special["gpt2"]
    assert result.exit_code == 0, result.output
    diff, agreement = figures(result.output)
    assert diff <= FP32_TOLERANCE and agreement == 100.0
    reference = adapter_logits(gpt2_run, token_ids(gpt2_dir, work))
    assert np.abs(plain["gpt2"][0] - reference).max() <= FP32_TOLERANCE
    assert np.abs(reference - base_logits(gpt2_dir, work)).max() > 1e-3
    config, grouped = adapter_state(gpt2_run)
    base, new = tensors(gpt2_dir), tensors(out)
    changed = {n for n in base if not torch.equal(base[n], new[n])}
    assert len(changed) == len(config["ranks"]) and all(n.endswith("attn.c_attn.weight") for n in changed)
    for module, t in grouped.items():
        name = next(n for n in changed if module.endswith(n.removesuffix(".weight")))
        update = (t["sara_U"] * t["sara_lambda"]) @ t["sara_Vh"]  # (out, in)
        np.testing.assert_allclose(new[name].double().numpy(), base[name].double().numpy() + update.T,
                                   rtol=0, atol=2e-6)


# -- 11. the functional update against numpy ---------------------------------------------------------

def _random(*shape):
    return np.random.default_rng(sum(shape)).standard_normal(shape)


def _torch(arrays: dict) -> dict:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in arrays.items()}


def _delta(method, options, arrays, mean_gate=None) -> np.ndarray:
    B, A, scale = merge_module.factors(method, options, _torch(arrays), mean_gate)
    return scale * (B.double().numpy() @ A.double().numpy())


def test_factors_lora():
    t = {"lora_A": _random(3, 4), "lora_B": _random(5, 3)}
    np.testing.assert_allclose(_delta("lora", {"alpha": 6.0}, t), 2.0 * t["lora_B"] @ t["lora_A"], atol=1e-5)


def test_factors_pissa():
    t = {"pissa_A": _random(2, 4), "pissa_B": _random(5, 2), "pissa_A0": _random(2, 5)[:, :4],
         "pissa_B0": _random(5, 3)[:, :2]}
    expected = t["pissa_B"] @ t["pissa_A"] - t["pissa_B0"] @ t["pissa_A0"]
    np.testing.assert_allclose(_delta("pissa", {}, t), expected, atol=1e-5)


def test_factors_sorsa():
    t = {"sorsa_U": _random(5, 2), "sorsa_S": _random(2), "sorsa_Vh": _random(2, 4),
         "sorsa_U0": _random(5, 3)[:, :2], "sorsa_S0": _random(3)[:2], "sorsa_Vh0": _random(3, 4)[:2]}
    expected = (t["sorsa_U"] @ np.diag(t["sorsa_S"]) @ t["sorsa_Vh"]
                - t["sorsa_U0"] @ np.diag(t["sorsa_S0"]) @ t["sorsa_Vh0"])
    np.testing.assert_allclose(_delta("sorsa", {}, t), expected, atol=1e-5)


def test_factors_sara_with_and_without_lambda():
    t = {"sara_U": _random(5, 3), "sara_lambda": _random(3), "sara_Vh": _random(3, 4)}
    np.testing.assert_allclose(_delta("sara", {}, t), t["sara_U"] @ np.diag(t["sara_lambda"]) @ t["sara_Vh"],
                               atol=1e-5)
    del t["sara_lambda"]
    np.testing.assert_allclose(_delta("sara", {"use_lambda": False}, t), t["sara_U"] @ t["sara_Vh"], atol=1e-5)


@pytest.mark.parametrize("v_position", ["after", "before"])
def test_factors_mosara_mean_gate(v_position):
    t = {"mosara_U": _random(5, 3), "mosara_Vh": _random(3, 4), "mosara_lambda": _random(2, 3),
         "mosara_v": _random(5 if v_position == "after" else 4)}
    gbar = np.array([0.25, 0.75])
    core = t["mosara_U"] @ np.diag(gbar @ t["mosara_lambda"]) @ t["mosara_Vh"]  # (5, 4)
    expected = np.diag(t["mosara_v"]) @ core if v_position == "after" else core @ np.diag(t["mosara_v"])
    got = _delta("mosara", {"v_position": v_position}, t, torch.tensor(gbar, dtype=torch.float32))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_factors_unknown_method():
    with pytest.raises(SaraError, match="unknown adapter method"):
        merge_module.factors("dora", {}, {})
