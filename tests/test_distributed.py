"""Training on 2 CPU processes (gloo): DDP under torchrun and FSDP2 under accelerate, each equal to
the single-process run; FSDP stopped by SIGTERM and resumed sharded; the settings sara refuses.

The runs are the expensive part (a few seconds of training, most of the time in starting the
processes), so each is made once per module and shared by the tests. The FSDP config is the one
docs/recipes.md shows, read from that page.
"""

from __future__ import annotations

import json
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
from safetensors.torch import load_file

from conftest import one_line_error, run_cli
from sara_cli.adapters import checkpoint
from sara_cli.training import rundir

REPO = Path(__file__).resolve().parents[1]
RECORDS = [{"instruction": f"Add {i} and {i + 3}.", "input": "" if i % 2 else f"{i} + {i + 3}",
            "output": f"The answer is {2 * i + 3}."} for i in range(32)]
SLOW_STEPS = """\
# Test helper: slows every optimizer step, so a run can be signalled part-way.
import os, time
if os.environ.get("SARA_TEST_STEP_DELAY"):
    import sara_cli.training.train as _train
    _delay = float(os.environ["SARA_TEST_STEP_DELAY"])
    _train.SignalCallback.on_step_begin = lambda self, *args, **kwargs: time.sleep(_delay)
"""


def docs_block(marker: str, language: str = "yaml") -> str:
    """The first `language` code block after `marker` in docs/recipes.md."""
    text = (REPO / "docs" / "recipes.md").read_text()
    after = text[text.index(marker):]
    return re.search(rf"```{language}\n(.*?)```", after, re.S).group(1)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / checkpoint.WEIGHTS_NAME))


def assert_same_adapter(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    # The batch is split over 2 processes (and threads differ): equal up to float32 summation
    # order, which Adam amplifies on near-zero gradients to ~3e-6 after 4 steps at lr 1e-2.
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def write_recipe(folder: Path, llama_dir: Path, data: Path, name: str, batch: int, steps: int = 4) -> Path:
    """SARA on the tiny Llama, output in folder/name; save every 2 steps."""
    spec = {"model": {"name_or_path": str(llama_dir), "dtype": "float32"},
            "adapter": {"method": "sara", "targets": "q_proj,v_proj", "tau": 0.5},
            "data": {"train_file": str(data), "cutoff_len": 64},
            "train": {"output_dir": str(folder / name), "learning_rate": 1e-2, "max_steps": steps,
                      "per_device_train_batch_size": batch, "logging_steps": 1, "save_steps": 2, "seed": 7}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def write_data(folder: Path) -> Path:
    path = folder / "train.json"
    path.write_text(json.dumps(RECORDS))
    return path


class Runs:
    def __init__(self, folder: Path, llama_dir: Path):
        self.folder = folder
        self.data = write_data(folder)
        self.llama_dir = llama_dir
        self.fsdp_config = folder / "fsdp-cpu.yaml"
        self.fsdp_config.write_text(docs_block("`fsdp-cpu.yaml`, **run on 2 CPU processes**"))
        hook = folder / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(SLOW_STEPS)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])}

    def recipe(self, name: str, batch: int, steps: int = 4) -> Path:
        return write_recipe(self.folder, self.llama_dir, self.data, name, batch, steps)

    def single(self, name: str, steps: int = 4) -> Path:
        """In-process, batch 4: what 2 processes of batch 2 must reproduce."""
        result = run_cli("train", self.recipe(name, 4, steps))
        assert result.exit_code == 0, result.output
        return self.folder / name

    def launcher(self, kind: str) -> list[str]:
        if kind == "ddp":
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        config = self.fsdp_config
        if kind == "zero3":
            marker = "**ZeRO-3, run on 2 CPU processes**"
            (self.folder / "ds_zero3.json").write_text(docs_block(marker, "json"))
            config = self.folder / "accelerate-zero3.yaml"
            config.write_text(docs_block(marker).replace("ds_zero3.json", str(self.folder / "ds_zero3.json")))
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]

    def launch(self, kind: str, name: str, steps: int = 4, **popen) -> subprocess.Popen:
        argv = [*self.launcher(kind), "-m", "sara_cli", "train", str(self.recipe(name, 2, steps))]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**self.env, **popen.pop("env", {})}, **popen)

    def run(self, kind: str, name: str, steps: int = 4) -> subprocess.CompletedProcess:
        process = self.launch(kind, name, steps)
        stdout, stderr = process.communicate(timeout=300)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama_dir) -> dict:
    r = Runs(tmp_path_factory.mktemp("distributed"), llama_dir)
    return {"runs": r, "single": r.single("single"), "ddp": r.run("ddp", "ddp"), "fsdp": r.run("fsdp", "fsdp")}


# -- DDP ------------------------------------------------------------------------------------------

def test_torchrun_ddp_on_cpu_saves_the_adapter_once(runs):
    result, out = runs["ddp"], runs["runs"].folder / "ddp"
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        rundir.LOCK_NAME, "adapter", "checkpoint-2", "checkpoint-4", "loss.png", "recipe.yaml", "trainer_log.jsonl"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [checkpoint.WEIGHTS_NAME, checkpoint.CONFIG_NAME]
    for name in ("checkpoint-2", "checkpoint-4"):  # each rank's RNG state made it in before the rename
        files = {p.name for p in (out / name).iterdir()}
        assert {"rng_state_0.pth", "rng_state_1.pth", checkpoint.WEIGHTS_NAME, "trainer_state.json"} <= files
    steps = [json.loads(line)["step"] for line in (out / rundir.LOG_NAME).read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3, 4]  # rank 0 alone logged
    assert result.stdout.count("adapter:") == 1 and result.stdout.count("no CUDA GPU") == 1
    assert result.stdout.count("trainable params:") == 1


def test_ddp_equals_the_single_process_run(runs):
    assert runs["ddp"].returncode == 0, runs["ddp"].stderr[-3000:]
    assert_same_adapter(adapter(runs["runs"].folder / "ddp"), adapter(runs["single"]))


# -- FSDP2 ----------------------------------------------------------------------------------------

def test_fsdp_from_the_docs_config_equals_the_single_process_and_ddp_runs(runs):
    result, out = runs["fsdp"], runs["runs"].folder / "fsdp"
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stdout.count("adapter:") == 1
    assert_same_adapter(adapter(out), adapter(runs["single"]))
    assert_same_adapter(adapter(out), adapter(runs["runs"].folder / "ddp"))
    assert {t.dtype for t in adapter(out).values()} == {torch.float32}


def test_fsdp_checkpoints_hold_the_adapter_not_the_sharded_base(runs):
    files = {p.name for p in (runs["runs"].folder / "fsdp" / "checkpoint-2").iterdir()}
    assert {checkpoint.WEIGHTS_NAME, "optimizer.bin", "rng_state_0.pth", "rng_state_1.pth"} <= files
    assert not [name for name in files if "pytorch_model" in name or name.startswith("model")]


def test_fsdp_stopped_by_sigterm_resumes_sharded(runs):
    r = runs["runs"]
    out = r.folder / "fsdp-resume"
    process = r.launch("fsdp", "fsdp-resume", steps=6, env={"SARA_TEST_STEP_DELAY": "0.4"})
    deadline = time.monotonic() + 240
    while not (out / rundir.LOG_NAME).is_file() or '"step": 3' not in (out / rundir.LOG_NAME).read_text():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run did not reach step 3"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)  # the launcher forwards it to both ranks
    _, stderr = process.communicate(timeout=120)
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and "checkpoint saved" in stopped[0], stderr[-3000:]
    step = int(re.search(r"at step (\d+)", stopped[0]).group(1))
    assert 3 <= step < 6 and not (out / "adapter").exists()
    resumed = r.run("fsdp", "fsdp-resume", steps=6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-" in resumed.stdout
    steps = [json.loads(line)["step"] for line in (out / rundir.LOG_NAME).read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert_same_adapter(adapter(out), adapter(r.single("single-6", steps=6)))


# -- DeepSpeed ZeRO-3 (not a sara dependency: runs where deepspeed is installed) --------------------

def test_deepspeed_zero3(runs):
    pytest.importorskip("deepspeed")
    r = runs["runs"]
    result = r.run("zero3", "zero3")
    assert result.returncode == 0, result.stderr[-3000:]
    out = r.folder / "zero3"
    assert (out / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's own, partitioned checkpoint
    assert_same_adapter(adapter(out), adapter(runs["single"]))
    for name in ("adapter", "checkpoint-4"):
        shutil.rmtree(out / name)
    resumed = r.run("zero3", "zero3")
    assert resumed.returncode == 0 and "resuming from checkpoint-2" in resumed.stdout, resumed.stderr[-3000:]
    assert_same_adapter(adapter(out), adapter(runs["single"]))


# -- refused -------------------------------------------------------------------------------------

@pytest.fixture
def fsdp_env(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    return monkeypatch


def test_fsdp1_is_refused_before_any_work(fsdp_env, tmp_path, llama_dir):
    fsdp_env.setenv("FSDP_VERSION", "1")
    recipe = write_recipe(tmp_path, llama_dir, write_data(tmp_path), "fsdp1", 2)
    one_line_error(run_cli("train", recipe), "FSDP version 1", "fsdp_version: 2")
    assert not (tmp_path / "fsdp1").exists()


def test_a_quantized_base_under_fsdp_is_refused(fsdp_env, tmp_path, llama_dir):
    recipe = write_recipe(tmp_path, llama_dir, write_data(tmp_path), "q", 2)
    one_line_error(run_cli("train", recipe, "model.load_in_4bit=true"), "load_in_4bit", "FSDP", "DDP")
    assert not (tmp_path / "q").exists()


# -- identical init on every rank -------------------------------------------------------------------

CHECK = """
import os, sys, torch, torch.distributed as dist
from torch import nn
sys.path.insert(0, sys.argv[1])
from sara_cli.adapters.registry import SaraLayer
from sara_cli.training import distributed
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(rank)  # a different init on each rank: the check must repair it
layers = {"a": SaraLayer(nn.Linear(8, 6), rank=3)}
agreed = distributed.check_identical(layers)
gathered = [torch.zeros(6, 3) for _ in range(2)]
dist.all_gather(gathered, layers["a"].sara_U.data.contiguous())
again = distributed.check_identical(layers)
# One write per rank: print() writes its pieces separately, which two ranks interleave.
sys.stdout.write(f"{rank} {agreed} {again} {torch.equal(gathered[0], gathered[1])}\\n")
sys.stdout.flush()
dist.destroy_process_group()  # an open gloo group can abort the process at exit
"""


def test_check_identical_repairs_ranks_that_differ(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(REPO)], capture_output=True, text=True, timeout=180,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(result.stdout.strip().splitlines()) == ["0 False True True", "1 False True True"]
