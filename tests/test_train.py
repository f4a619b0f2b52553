"""`sara train` end to end on the tiny Llama: dry run, one short run per method, adapter round trip,
interruption and resume (SIGTERM, SIGKILL), output-folder rules, gradient checkpointing, SORSA's
regulariser step, and bad input (DDP and FSDP: tests/test_distributed.py).

Runs go through the real CLI: in-process with Typer's runner, or as a separate process
(`python -m sara_cli`, `torchrun`) where a signal or a second rank is needed. Every run is a few
optimizer steps on 32 short records, so the file stays within a few minutes on two CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import one_line_error
import sara_cli
from sara_cli.adapters import checkpoint
from sara_cli.model import hub
from sara_cli.training import rundir
from sara_cli import recipe as recipe_module
from sara_cli.training import train as train_module
from sara_cli.cli.app import app
from sara_cli.errors import SaraError
from sara_cli.adapters.inject import adapter_layers, is_adapter_parameter
from sara_cli.recipe import load_recipe

METHODS = ["sara", "mosara", "lora", "pissa", "sorsa"]
ADAPTER_OPTIONS = {
    "sara": {"tau": 0.5},
    "mosara": {"tau": 0.5, "num_experts": 3},
    "lora": {"rank": 4, "alpha": 8.0},
    "pissa": {"rank": 4},
    "sorsa": {"rank": 4, "gamma": 1e-3},
}
TARGETS = ["q_proj", "v_proj"]
PARAMETER_LINE = re.compile(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]

runner = CliRunner()


# -- fixtures and helpers --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    """32 short instruction records (8 steps per epoch at batch 4)."""
    records = [{"instruction": f"Add {i} and {i + 3}.", "input": "" if i % 2 else f"{i} + {i + 3}",
                "output": f"The answer is {2 * i + 3}."} for i in range(32)]
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(records))
    return path


def write_recipe(folder: Path, model_dir: Path, data: Path, method: str = "sara", *,
                 adapter: dict | None = None, train: dict | None = None, name: str = "recipe.yaml") -> Path:
    """A recipe for `method` on the tiny Llama; output goes to folder/out unless train overrides it."""
    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "adapter": {"method": method, "targets": ",".join(TARGETS), **ADAPTER_OPTIONS[method], **(adapter or {})},
        "data": {"train_file": str(data), "cutoff_len": 64},
        "train": {"output_dir": str(folder / "out"), "learning_rate": 1e-2, "max_steps": 3,
                  "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 2, "seed": 7,
                  **(train or {})},
    }
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def sara(*args: str):
    """Run the CLI in-process."""
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    """Whitespace collapsed, so rich's line wrapping does not matter."""
    return " ".join(text.split())


def loss_records(output_dir: Path) -> list[dict]:
    lines = (output_dir / rundir.LOG_NAME).read_text().splitlines()
    return [r for r in map(json.loads, filter(str.strip, lines)) if "loss" in r]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the lock file's (it holds the PID of the last run)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK_NAME}


def load_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / checkpoint.WEIGHTS_NAME))


@pytest.fixture
def built(monkeypatch) -> dict:
    """Keeps the model `train.build` returned, so a test can look at it after training in-process."""
    seen = {}
    real_build = train_module.build

    def spy(recipe, initialize_from=None):
        result = real_build(recipe, initialize_from=initialize_from)
        seen["model"] = result[0]
        return result

    monkeypatch.setattr(train_module, "build", spy)
    return seen


def token_batch() -> torch.Tensor:
    return torch.randint(4, 1024, (2, 12), generator=torch.Generator().manual_seed(3))


# -- 1. dry run ------------------------------------------------------------------------------------

def test_dry_run_prints_recipe_ranks_and_parameters_and_trains_nothing(tmp_path, llama_dir, data_file):
    recipe = write_recipe(tmp_path, llama_dir, data_file, "sara")
    result = sara("train", recipe, "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "method: sara" in out and "tau: 0.5" in out and "output_dir:" in out  # the resolved recipe
    model, _, layers, _ = train_module.build(load_recipe(recipe))
    header = next(line for line in out.splitlines() if "layer" in line and "q_proj" in line)
    assert header.split()[1:-1:2] == ["layer", *TARGETS]  # ┃ layer ┃ q_proj ┃ v_proj ┃
    for index in range(2):  # the rank table: one row per layer, k per module
        row = next(line for line in out.splitlines() if line.split()[:2] == ["│", str(index)])
        ranks = [int(n) for n in row.split()[3::2]]
        assert ranks == [layers[f"model.layers.{index}.self_attn.{m}"].rank() for m in TARGETS]
    match = PARAMETER_LINE.search(out)
    assert match, out
    trainable, total = (int(match.group(i).replace(",", "")) for i in (1, 2))
    # SARA: U (out, k), Vh (k, in) and lambda (k) per module, counted from the shapes by hand.
    expected = sum(layer.rank() * (layer.in_features + layer.out_features + 1) for layer in layers.values())
    base_total = sum(p.numel() for n, p in model.named_parameters() if not is_adapter_parameter(n))
    assert trainable == expected and total == base_total + expected
    assert float(match.group(3)) == pytest.approx(100 * trainable / total, abs=1e-4)
    assert "nothing trained" in out
    assert not (tmp_path / "out").exists()


def test_the_rank_table_reads_at_80_columns_with_all_linear(tmp_path, llama_dir, data_file):
    from rich.console import Console

    from sara_cli.cli.views import TrainReporter

    recipe = load_recipe(write_recipe(tmp_path, llama_dir, data_file, "lora", adapter={"targets": "all-linear"}))
    model, _, layers, _ = train_module.build(recipe)
    console = Console(width=80, record=True, color_system=None)
    TrainReporter(console).built(recipe, model, layers)
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    header = next(line for line in text.splitlines() if "layer" in line)
    assert header.split()[1:-1:2] == ["layer", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"]
    rows = [line.split() for line in text.splitlines() if line.startswith("│")]
    assert [row[1] for row in rows] == ["0", "1"] and all(row[3::2][:7] == ["4"] * 7 for row in rows)


# -- 2 and 3. one short run per method, and the adapter round trip ----------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_short_run_writes_the_run_folder_and_the_adapter_round_trips(method, tmp_path, llama_dir, data_file, built):
    recipe_path = write_recipe(tmp_path, llama_dir, data_file, method, adapter={"dropout": 0.05})
    result = sara("train", recipe_path)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    adapter_dir = out / "adapter"
    assert sorted(p.name for p in adapter_dir.iterdir()) == [checkpoint.WEIGHTS_NAME, checkpoint.CONFIG_NAME]
    assert load_recipe(out / checkpoint.RECIPE_NAME) == load_recipe(recipe_path)
    losses = loss_records(out)
    assert [r["step"] for r in losses] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in losses)
    assert (out / "loss.png").read_bytes().startswith(PNG_MAGIC)
    assert "adapter:" in result.stdout and "MB" in result.stdout

    config = checkpoint.read_config(adapter_dir)
    assert config["method"] == method
    for key, value in ADAPTER_OPTIONS[method].items():
        assert config["options"][key] == value
    assert [name.rsplit(".", 1)[-1] for name in config["targets"]] == TARGETS * 2
    trained = built["model"].eval()
    assert config["ranks"] == {name: layer.rank() for name, layer in adapter_layers(trained).items()}
    assert all(rank >= 1 for rank in config["ranks"].values())
    assert config["base_model"]["name_or_path"] == str(llama_dir)
    assert config["base_model"]["path"] == str(llama_dir)
    assert config["base_model"]["fingerprint"] == hub.fingerprint(llama_dir)
    assert config["sara_version"] == sara_cli.__version__

    # A fresh base plus the saved adapter gives the trained model's logits (fp32).
    loaded, _, _ = checkpoint.load_adapter_model(adapter_dir)
    fresh, _, _, _ = train_module.build(load_recipe(recipe_path))  # same seed: the initial adapter
    ids = token_batch()
    with torch.no_grad():
        expected = trained(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=0)
        assert (fresh.eval()(ids).logits - expected).abs().max() > 1e-4  # training changed the output
    initial = dict(fresh.named_parameters()) | dict(fresh.named_buffers())
    for name, tensor in (dict(trained.named_parameters()) | dict(trained.named_buffers())).items():
        if not is_adapter_parameter(name):
            continue
        if isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad:
            assert not torch.equal(tensor, initial[name]), f"{name} did not move"
        else:  # frozen Mo-SARA vectors, initial PiSSA/SORSA factors
            assert torch.equal(tensor, initial[name]), name


# -- 4. interruption and resume ---------------------------------------------------------------------

SLOW_STEPS = """\
# Test helper: slows every optimizer step, so a run can be signalled part-way.
import os, time
import sara_cli.training.train as _train
_delay = float(os.environ["SARA_TEST_STEP_DELAY"])
_train.SignalCallback.on_step_begin = lambda self, *args, **kwargs: time.sleep(_delay)
"""
RESUME_STEPS = 10  # 8 steps per epoch: the resumed part crosses an epoch boundary


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory, llama_dir, data_file):
    """The resume recipe (dropout on: the restored RNG state matters) and an uninterrupted run's adapter."""
    folder = tmp_path_factory.mktemp("resume")
    hook = folder / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_STEPS)

    def recipe(name):
        return write_recipe(folder, llama_dir, data_file, "sara", name=f"{name}.yaml",
                            adapter={"dropout": 0.1},
                            train={"output_dir": str(folder / name), "max_steps": RESUME_STEPS})

    result = sara("train", recipe("reference"))  # in-process: a CPU run is deterministic across processes
    assert result.exit_code == 0, result.output
    return {"recipe": recipe, "hook": hook, "reference": load_tensors(folder / "reference" / "adapter")}


def sara_process(recipe: Path, hook: Path, delay: float) -> tuple[list[str], dict]:
    """(argv, kwargs) for `python -m sara_cli train RECIPE` with slowed steps."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SARA_TEST_STEP_DELAY": str(delay), "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return [sys.executable, "-m", "sara_cli", "train", str(recipe)], {"env": env}


def wait_until(condition, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before it was interrupted: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the run did not reach the step to interrupt at")
        time.sleep(0.05)


def logged_step(output_dir: Path) -> int:
    try:
        lines = (output_dir / rundir.LOG_NAME).read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):  # a line being written
            pass
    return max(steps)


def interrupt(recipe: Path, output_dir: Path, hook: Path, sig: int) -> subprocess.CompletedProcess:
    """Start a slowed run, send `sig` once step 3 is logged (checkpoint-2 is then complete)."""
    argv, kwargs = sara_process(recipe, hook, delay=0.3)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    wait_until(lambda: logged_step(output_dir) >= 3, process)
    os.kill(process.pid, sig)
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def resume_and_compare(recipe: Path, output_dir: Path, setup: dict, checkpoint_name: str) -> None:
    argv, kwargs = sara_process(recipe, setup["hook"], delay=0)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)
    assert result.returncode == 0, result.stderr
    assert f"resuming from {checkpoint_name}" in result.stdout
    assert [r["step"] for r in loss_records(output_dir)] == list(range(1, RESUME_STEPS + 1))
    resumed = load_tensors(output_dir / "adapter")
    assert resumed.keys() == setup["reference"].keys()
    for key, value in setup["reference"].items():
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=0, msg=key)


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_to_the_same_adapter(resume_setup):
    recipe = resume_setup["recipe"]("sigterm")
    output_dir = Path(load_recipe(recipe).train.output_dir)
    result = interrupt(recipe, output_dir, resume_setup["hook"], signal.SIGTERM)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("stopped:")]
    assert len(lines) == 1 and "checkpoint saved" in lines[0] and "Rerun" in lines[0], result.stderr
    step = int(re.search(r"at step (\d+)", lines[0]).group(1))
    assert 3 <= step < RESUME_STEPS
    assert rundir.complete_checkpoints(output_dir)[-1].name == f"checkpoint-{step}"
    assert not (output_dir / "adapter").exists() and not (output_dir / rundir.STAGING).exists()
    resume_and_compare(recipe, output_dir, resume_setup, f"checkpoint-{step}")


def test_sigkill_then_rerun_resumes_from_the_last_complete_checkpoint(resume_setup):
    recipe = resume_setup["recipe"]("sigkill")
    output_dir = Path(load_recipe(recipe).train.output_dir)
    result = interrupt(recipe, output_dir, resume_setup["hook"], signal.SIGKILL)
    assert result.returncode == -signal.SIGKILL
    newest = rundir.complete_checkpoints(output_dir)[-1]
    assert int(newest.name.split("-")[1]) >= 2
    resume_and_compare(recipe, output_dir, resume_setup, newest.name)


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(monkeypatch):
    """Under DDP the flag is all-reduced: a rank that got no signal stops with its peer."""
    import torch.distributed as dist
    from transformers import TrainerControl

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *args: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda flag, op=None: flag.fill_(1))  # the peer was signalled

    class Args:
        device = torch.device("cpu")

    callback, control = train_module.SignalCallback(), TrainerControl()
    callback.on_step_end(Args(), None, control)
    assert control.should_save and control.should_training_stop
    assert callback.received == signal.SIGTERM


# -- 5. the output folder ---------------------------------------------------------------------------

def finished_run(tmp_path, llama_dir, data_file, **train):
    recipe = write_recipe(tmp_path, llama_dir, data_file, "lora", train={"max_steps": 2, **train})
    result = sara("train", recipe)
    assert result.exit_code == 0, result.output
    return recipe, tmp_path / "out"


def test_a_finished_run_is_not_overwritten_without_overwrite(tmp_path, llama_dir, data_file):
    recipe, out = finished_run(tmp_path, llama_dir, data_file)
    before = snapshot(out)
    result = sara("train", recipe)
    one_line_error(result, "finished run", "--overwrite")
    assert snapshot(out) == before


def test_overwrite_keeps_the_old_run_aside_until_the_new_one_succeeds(tmp_path, llama_dir, data_file, monkeypatch):
    recipe, out = finished_run(tmp_path, llama_dir, data_file)
    before = snapshot(out)

    def crash(self, *args, **kwargs):
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(train_module.SignalCallback, "on_step_begin", crash)
        result = sara("train", recipe, "--overwrite")
    assert result.exit_code == 1 and "simulated crash" in result.stderr
    (aside,) = tmp_path.glob("out.previous-*")
    assert snapshot(aside) == before  # the finished run, intact

    result = sara("train", recipe, "--overwrite", "train.max_steps=3")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in loss_records(out)] == [1, 2, 3]
    assert snapshot(aside) == before  # an earlier failure's copy is never deleted by a later run

    # Overwriting a finished run that succeeds removes the copy it had moved aside.
    result = sara("train", recipe, "--overwrite", "train.max_steps=2")
    assert result.exit_code == 0, result.output
    assert "kept at" in flat(result.stdout)
    assert list(tmp_path.glob("out.previous-*")) == [aside]
    assert [r["step"] for r in loss_records(out)] == [1, 2]


def test_checkpoints_without_adapter_resume_refuse_no_resume_and_other_recipes(tmp_path, llama_dir, data_file):
    recipe, out = finished_run(tmp_path, llama_dir, data_file, max_steps=4)
    shutil.rmtree(out / "adapter")  # as if stopped after checkpoint-4
    before = snapshot(out)

    one_line_error(sara("train", recipe, "--no-resume"), "checkpoints", "--overwrite")
    one_line_error(sara("train", recipe, "adapter.rank=2"), "different recipe", "adapter")
    assert snapshot(out) == before

    result = sara("train", recipe, "--no-resume", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "resuming" not in result.stdout
    assert (out / "adapter" / checkpoint.CONFIG_NAME).is_file()
    assert not list(tmp_path.glob("out.previous-*"))


def test_overwrite_keeps_files_that_sara_train_did_not_make(tmp_path, llama_dir, data_file):
    """A merge or eval results inside the run folder, and the user's own files, outlive --overwrite."""
    recipe, out = finished_run(tmp_path, llama_dir, data_file)
    (out / "merged").mkdir()
    (out / "merged" / "model.safetensors").write_bytes(b"merged weights")
    (out / "notes.txt").write_text("mine")
    foreign = {k: v for k, v in snapshot(out).items() if k.startswith(("merged", "notes"))}
    result = sara("train", recipe, "--overwrite")
    assert result.exit_code == 0, result.output
    (aside,) = tmp_path.glob("out.previous-*")
    assert snapshot(aside) == foreign  # the old run's own files are gone, the others kept
    notices = flat(result.stdout)
    assert "merged, notes.txt (not made by sara train) will stay there" in notices
    assert f"kept {aside / 'merged'}, {aside / 'notes.txt'}" in notices
    assert not (out / "merged").exists() and (out / "adapter" / checkpoint.CONFIG_NAME).is_file()


def test_resume_refuses_changed_training_settings_and_names_each(tmp_path, llama_dir, data_file):
    recipe, out = finished_run(tmp_path, llama_dir, data_file, max_steps=4)
    shutil.rmtree(out / "adapter")  # stopped after checkpoint-4
    before = snapshot(out)
    line = one_line_error(sara("train", recipe, "train.learning_rate=2.0e-2", "train.seed=8"),
                          "train.learning_rate: 0.01 -> 0.02", "train.seed: 7 -> 8", "--overwrite",
                          "train.output_dir")
    assert str(out) in line
    assert snapshot(out) == before


def test_resume_applies_a_changed_logging_cadence_and_records_it(tmp_path, llama_dir, data_file):
    recipe, out = finished_run(tmp_path, llama_dir, data_file, max_steps=4)
    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "checkpoint-4")  # stopped after checkpoint-2
    result = sara("train", recipe, "train.logging_steps=2")
    assert result.exit_code == 0, result.output
    assert "resuming from checkpoint-2" in result.stdout
    assert [r["step"] for r in loss_records(out)] == [1, 2, 4]  # every step before, every second after
    assert load_recipe(out / checkpoint.RECIPE_NAME).train.logging_steps == 2


def test_a_second_run_on_a_locked_folder_fails_at_once_naming_the_holder(tmp_path, llama_dir, data_file):
    recipe = write_recipe(tmp_path, llama_dir, data_file)
    out = tmp_path / "out"
    with rundir.locked(out):  # as a first run would hold it
        result = sara("train", recipe)
    one_line_error(result, str(out), "in use by another sara train", f"PID {os.getpid()}")
    assert [p.name for p in out.iterdir()] == [rundir.LOCK_NAME]


def test_a_lock_file_left_by_a_killed_run_does_not_block(tmp_path, llama_dir, data_file):
    recipe = write_recipe(tmp_path, llama_dir, data_file)
    out = tmp_path / "out"
    out.mkdir()
    (out / rundir.LOCK_NAME).write_text("999999\n")  # its process is gone, and with it the flock
    result = sara("train", recipe)
    assert result.exit_code == 0, result.output
    assert (out / rundir.LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, llama_dir):
    recipe = write_recipe(tmp_path, llama_dir, tmp_path / "absent.json")
    one_line_error(sara("train", recipe), "absent.json", stdout_empty=False)
    assert not (tmp_path / "out").exists()


def test_a_cutoff_that_leaves_no_response_token_trains_nothing_and_is_refused(tmp_path, llama_dir, data_file):
    recipe = write_recipe(tmp_path, llama_dir, data_file)
    args = ("data.cutoff_len=8", "data.train_on_inputs=false")
    one_line_error(sara("train", recipe, *args, "--dry-run"), "data.cutoff_len 8", "train_on_inputs",
                   stdout_empty=False)
    one_line_error(sara("train", recipe, *args), "data.cutoff_len 8", stdout_empty=False)
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_is_a_one_line_error(tmp_path, llama_dir, data_file):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    recipe = write_recipe(tmp_path, llama_dir, data_file, train={"output_dir": str(target)})
    one_line_error(sara("train", recipe), "is a file")
    assert target.read_text() == "not a folder"


def test_unwritable_output_dir_is_a_one_line_error(tmp_path, llama_dir, data_file):
    if os.geteuid() == 0:  # root ignores permission bits: a path under a file cannot be created either
        blocker = tmp_path / "blocker"
        blocker.write_text("")
        target = blocker / "sub"
    else:
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o500)
        target = parent / "sub"
    recipe = write_recipe(tmp_path, llama_dir, data_file, train={"output_dir": str(target)})
    try:
        one_line_error(sara("train", recipe), "cannot write", str(target))
    finally:
        if os.geteuid() != 0:
            target.parent.chmod(0o700)
    assert not target.exists()


# -- 6. gradient checkpointing ----------------------------------------------------------------------

def enable_checkpointing(model, args) -> None:
    """What the Trainer does with activation_checkpointing (gradient_checkpointing before v5)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=args.activation_checkpointing_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)


def disable_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_every_adapter_parameter_a_gradient(method, tmp_path, llama_dir, data_file):
    recipe = load_recipe(write_recipe(tmp_path, llama_dir, data_file, method,
                                      train={"gradient_checkpointing": True}))
    args = train_module.training_arguments(recipe, tmp_path / "out", has_eval=False, use_cuda=False)
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs
    assert kwargs == {"use_reentrant": False}  # needs no input gradients to reach the adapters
    model, _, layers, _ = train_module.build(recipe)
    with torch.no_grad():  # move off the zero inits (lambda, B, v), which zero some gradients by design
        generator = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    calls = []
    for layer in layers.values():
        layer.register_forward_hook(lambda *_: calls.append(1))
    ids = token_batch()

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        calls.clear()
        enable_checkpointing(model, args) if checkpointing else disable_checkpointing(model)
        model.config.use_cache = False
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    checkpointed = gradients(True)
    assert len(calls) == 2 * len(layers)  # each adapter ran again in the backward: checkpointing is on
    assert checkpointed and all(is_adapter_parameter(n) for n in checkpointed)
    for name, grad in checkpointed.items():
        assert grad is not None and grad.abs().sum() > 0, f"{name} got no gradient"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)  # the base stays frozen
    plain = gradients(False)
    assert len(calls) == len(layers)
    for name, grad in plain.items():  # recomputation changes nothing (no dropout here)
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5)


def test_training_with_gradient_checkpointing_moves_the_adapter(tmp_path, llama_dir, data_file, built):
    recipe = write_recipe(tmp_path, llama_dir, data_file, "sara", train={"gradient_checkpointing": True})
    result = sara("train", recipe)
    assert result.exit_code == 0, result.output
    assert all(math.isfinite(r["loss"]) for r in loss_records(tmp_path / "out"))
    trained = built["model"]
    fresh, _, _, _ = train_module.build(load_recipe(recipe))
    initial = dict(fresh.named_parameters())
    for name, p in trained.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, initial[name]), f"{name} did not move"


# -- 7. SORSA's regulariser step ---------------------------------------------------------------------

def test_sorsa_callback_applies_the_chosen_rule_once_per_optimizer_step():
    from types import SimpleNamespace

    class Layer:
        def __init__(self):
            self.gammas, self.scales = [], []

        def orthonormal_step(self, gamma):
            self.gammas.append(gamma)

        def add_orthonormal_gradient(self, scale):
            self.scales.append(scale)

    args = SimpleNamespace(learning_rate=0.5)
    for update in ("decoupled", "reference"):
        layers = [Layer(), Layer()]
        callback = train_module.SorsaCallback(layers, gamma=0.25, update=update)
        for _ in range(3):
            callback.on_pre_optimizer_step(args, None, None)
            callback.on_optimizer_step(args, None, None)
        if update == "decoupled":  # a plain step of gamma after the optimizer, per layer
            assert [(l.gammas, l.scales) for l in layers] == [([0.25] * 3, [])] * 2
        else:  # gamma / lr_peak, averaged over the 2 L = 4 factors, into the gradients
            assert [(l.gammas, l.scales) for l in layers] == [([], [0.25 / 0.5 / 4] * 3)] * 2


@torch.no_grad()
def orthonormality_deviation(model) -> float:
    """Sum over layers of ||U^T U - I||_F + ||Vh Vh^T - I||_F, in float64."""
    total = 0.0
    for layer in adapter_layers(model).values():
        U, Vh = layer.sorsa_U.double(), layer.sorsa_Vh.double()  # (out, r), (r, in)
        eye = torch.eye(U.shape[1], dtype=torch.float64)
        total += float(torch.linalg.matrix_norm(U.T @ U - eye) + torch.linalg.matrix_norm(Vh @ Vh.T - eye))
    return total


# Through AdamW the first step moves every coordinate by about lr, along the float32 rounding
# noise that M is at init, so the reference rule needs a few steps to show (docs/methods.md 3.3).
SORSA_TRAIN = {"reference": {"learning_rate": 1e-3, "max_steps": 8}, "decoupled": {"learning_rate": 1e-2}}


@pytest.mark.parametrize("update", ["reference", "decoupled"])
def test_sorsa_training_pulls_the_factors_towards_orthonormal(tmp_path, llama_dir, data_file, built, update):
    deviation = {}
    for gamma in (0.0, 1e-3):
        folder = tmp_path / f"gamma-{gamma}"
        folder.mkdir()
        recipe = write_recipe(folder, llama_dir, data_file, "sorsa", adapter={"gamma": gamma, "sorsa_update": update},
                              train=SORSA_TRAIN[update])
        result = sara("train", recipe)
        assert result.exit_code == 0, result.output
        deviation[gamma] = orthonormality_deviation(built["model"])
        logged = [r["orthonormality"] for r in loss_records(folder / "out")]
        assert len(logged) == SORSA_TRAIN[update].get("max_steps", 3)  # mean ||M||_F, as the SORSA code logs it
        assert all(v > 0 for v in logged)
    assert deviation[1e-3] < deviation[0.0]


def test_sorsa_reference_rule_joins_the_clipped_gradient_once_per_optimizer_step(tmp_path, llama_dir, data_file,
                                                                                 monkeypatch):
    """Where the SORSA trainer adds its regulariser: after clipping (so it is not clipped), before
    optimizer.step(), once per optimizer step whatever the accumulation, not divided by it."""
    records = []

    class Recording(train_module.SorsaCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            params = [p for p in kwargs["model"].parameters() if p.requires_grad]
            clipped = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
            before = [(l.sorsa_U.grad.clone(), l.sorsa_Vh.grad.clone()) for l in self.layers]
            factors = [(l.sorsa_U.detach().double().clone(), l.sorsa_Vh.detach().double().clone())
                       for l in self.layers]
            super().on_pre_optimizer_step(args, state, control, **kwargs)
            added = [(l.sorsa_U.grad - b[0], l.sorsa_Vh.grad - b[1]) for l, b in zip(self.layers, before)]
            records.append((args.gradient_accumulation_steps, clipped, factors, added))

    monkeypatch.setattr(train_module, "SorsaCallback", Recording)
    gamma, lr, max_norm = 1e-3, 1e-2, 1e-3
    for accumulation in (1, 2):
        folder = tmp_path / f"accumulation-{accumulation}"
        folder.mkdir()
        recipe = write_recipe(folder, llama_dir, data_file, "sorsa", adapter={"gamma": gamma},
                              train={"max_steps": 2, "gradient_accumulation_steps": accumulation,
                                     "per_device_train_batch_size": 2, "max_grad_norm": max_norm,
                                     "learning_rate": lr})
        result = sara("train", recipe)
        assert result.exit_code == 0, result.output
    assert [r[0] for r in records] == [1, 1, 2, 2]  # one call per optimizer step, not per micro-batch
    for step, (_, clipped, factors, added) in enumerate(records):
        assert clipped <= max_norm * (1 + 1e-4)  # the hook sees the loss gradient already clipped
        scale = gamma / lr / (2 * len(factors))  # 4 layers, 8 factors
        total = 0.0
        for (U, Vh), (dU, dVh) in zip(factors, added):
            eye = torch.eye(U.shape[1], dtype=torch.float64)
            M_U, M_Vh = U.T @ U - eye, Vh @ Vh.T - eye
            if step % 2 == 0:  # at init M is float32 rounding, so only the size 2 * scale is defined
                assert abs(float(dU.norm()) - 2 * scale) < 1e-3 * scale
            else:
                torch.testing.assert_close(dU.double(), scale * 2 * U @ M_U / torch.linalg.matrix_norm(M_U),
                                           rtol=1e-4, atol=1e-7)
                torch.testing.assert_close(dVh.double(), scale * 2 * M_Vh @ Vh / torch.linalg.matrix_norm(M_Vh),
                                           rtol=1e-4, atol=1e-7)
            total += float(dU.norm() ** 2 + dVh.norm() ** 2)
        assert math.sqrt(total) > 10 * max_norm  # unclipped: far larger than the clipped loss gradient


# -- 8. DDP and FSDP on the CPU: tests/test_distributed.py ------------------------------------


# -- 9. bad input -----------------------------------------------------------------------------------

def test_missing_recipe_file(tmp_path):
    one_line_error(sara("train", tmp_path / "nope.yaml"), "nope.yaml", "does not exist")


def test_missing_data_file(tmp_path, llama_dir):
    recipe = write_recipe(tmp_path, llama_dir, tmp_path / "absent.json")
    one_line_error(sara("train", recipe), "absent.json", "does not exist", stdout_empty=False)
    assert not (tmp_path / "out").exists()


def test_record_without_output_names_the_file_and_index(tmp_path, llama_dir):
    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(8)]
    del records[5]["output"]
    data = tmp_path / "broken.json"
    data.write_text(json.dumps(records))
    recipe = write_recipe(tmp_path, llama_dir, data)
    one_line_error(sara("train", recipe), "broken.json", "record 5", "'output'", stdout_empty=False)
    one_line_error(sara("train", recipe, "--dry-run"), "record 5", stdout_empty=False)  # a dry run checks the data


def test_targets_not_in_the_model_lists_the_existing_names(tmp_path, llama_dir, data_file):
    recipe = write_recipe(tmp_path, llama_dir, data_file, adapter={"targets": "query_key_value"})
    one_line_error(sara("train", recipe), "query_key_value", "q_proj", "v_proj", "down_proj", stdout_empty=False)


def test_report_to_a_missing_logger_is_a_clear_error():
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(SaraError, match="pip install wandb"):
        recipe_module.check_report_to("wandb")
    with pytest.raises(SaraError, match="unknown logger 'wandbb'"):
        recipe_module.check_report_to(["wandbb"])
    recipe_module.check_report_to("none")
