"""Faults across every command: damaged files, bad options, bad recipes, busy folders, outputs
over inputs, damaged checkpoints, a full disk, a model folder's own code (docs/files.md).

Every case runs the real command (Typer's runner) and asserts that it exits with code 2, prints
one `error:` line and no traceback, names the file, option or key at fault, and changes nothing
the user had: every file under the case's folders is byte-identical before and after.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import one_line_error, run_cli
from sara_cli.training import rundir

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the user's files: a base, two finished runs, data ---------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory, llama_dir) -> dict:
    """A copy of the tiny Llama, a SARA run and a Mo-SARA run on it (one step each), and data."""
    root = tmp_path_factory.mktemp("faults")
    base = root / "base"
    shutil.copytree(llama_dir, base)
    data = root / "data.json"
    data.write_text(json.dumps([{"instruction": f"Add {i} and 1.", "input": "", "output": f"{i + 1}"}
                                for i in range(8)]))
    runs = {}
    for method, options in (("sara", {"tau": 0.5}), ("mosara", {"tau": 0.5, "num_experts": 2})):
        recipe = write_recipe(root / f"{method}.yaml", base, data, root / f"run-{method}",
                              {"method": method, **options})
        result = run_cli("train", recipe)
        assert result.exit_code == 0, result.output
        runs[method] = root / f"run-{method}"
    return {"root": root, "base": base, "data": data, "runs": runs,
            "recipe": root / "sara.yaml"}


def write_recipe(path: Path, base: Path, data: Path, out: Path, adapter: dict) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(base), "dtype": "float32"},
        "adapter": {"targets": "q_proj,v_proj", **adapter},
        "data": {"train_file": str(data), "cutoff_len": 64},
        "train": {"output_dir": str(out), "max_steps": 1, "per_device_train_batch_size": 4,
                  "save_steps": 1, "logging_steps": 1},
    }, sort_keys=False))
    return path


def snapshot(*folders: Path) -> dict[str, bytes]:
    files = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.name != rundir.LOCK_NAME:
                files[str(path)] = path.read_bytes()
    return files


# -- ways to damage a copy -------------------------------------------------------------------------

def base_copy(ws: dict, tmp: Path) -> Path:
    target = tmp / "base"
    shutil.copytree(ws["base"], target)
    return target


def run_copy(ws: dict, tmp: Path, method: str = "sara") -> Path:
    target = tmp / f"run-{method}"
    shutil.copytree(ws["runs"][method], target)
    return target


def truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def random_bytes(path: Path) -> None:
    path.write_bytes(bytes((i * 7919 + 13) % 256 for i in range(4096)))


def recipe_with(ws: dict, tmp: Path, **sections) -> Path:
    raw = yaml.safe_load(ws["recipe"].read_text())
    raw["train"]["output_dir"] = str(tmp / "out")
    for section, values in sections.items():
        raw[section].update(values)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# -- the cases: (name, setup(ws, tmp) -> (argv, fragments the message must hold)) -------------------

def analyze_damaged(kind):
    def setup(ws, tmp):
        base = base_copy(ws, tmp)
        weights = base / "model.safetensors"
        {"truncated": truncate, "random": random_bytes, "empty": lambda p: p.write_bytes(b"")}[kind](weights)
        return ["analyze", base], [str(weights), "not a safetensors file, or it was cut short", "re-download"]
    return setup


def analyze_junk_config(ws, tmp):
    base = base_copy(ws, tmp)
    (base / "config.json").write_text("{not json")
    return ["analyze", base], [str(base / "config.json"), "not valid JSON", "line 1"]


def analyze_missing_shard(ws, tmp):
    base = base_copy(ws, tmp)
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    return ["analyze", base], ["model-00002-of-00002.safetensors", "re-download"]


def analyze_bin_only(ws, tmp):
    base = base_copy(ws, tmp)
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    return ["analyze", base], [str(base), ".bin"]


def analyze_json_is_a_folder(ws, tmp):
    (tmp / "k.json").mkdir()
    return ["analyze", ws["base"], "--json", tmp / "k.json"], ["--json", str(tmp / "k.json"), "is a folder"]


def analyze_plot_under_a_file(ws, tmp):
    (tmp / "blocker").write_text("")
    return ["analyze", ws["base"], "--plot", tmp / "blocker" / "k.png"], ["--plot", "is a file"]


def train_recipe(**sections):
    def setup(ws, tmp):
        return ["train", recipe_with(ws, tmp, **sections)], [key for values in sections.values() for key in values]
    return setup


def train_overrides(*overrides, fragments):
    def setup(ws, tmp):
        return ["train", recipe_with(ws, tmp), *overrides], list(fragments)
    return setup


def train_bad_yaml(ws, tmp):
    path = tmp / "recipe.yaml"
    path.write_text("model: {name_or_path: m\n")
    return ["train", path], [str(path), "not valid YAML", "line"]


def train_output_is_a_file(ws, tmp):
    (tmp / "taken").write_text("mine")
    return ["train", recipe_with(ws, tmp, train={"output_dir": str(tmp / "taken")})], ["taken", "is a file"]


def train_missing_data(ws, tmp):
    return ["train", recipe_with(ws, tmp, data={"train_file": str(tmp / "gone.json")})], ["gone.json", "does not exist"]


def train_record_without_output(ws, tmp):
    data = tmp / "bad.json"
    data.write_text(json.dumps([{"instruction": "q", "input": ""}] * 3))
    return ["train", recipe_with(ws, tmp, data={"train_file": str(data)})], ["bad.json", "record 0", "'output'"]


def train_missing_model(ws, tmp):
    return (["train", recipe_with(ws, tmp, model={"name_or_path": str(tmp / "no-model")})],
            ["no-model", "does not exist"])


def train_damaged_base(ws, tmp):
    base = base_copy(ws, tmp)
    truncate(base / "model.safetensors")
    return ["train", recipe_with(ws, tmp, model={"name_or_path": str(base)})], [str(base / "model.safetensors")]


def train_busy_folder(ws, tmp):
    return ["train", recipe_with(ws, tmp, train={"output_dir": str(ws["runs"]["sara"])}), "--overwrite"], [
        str(ws["runs"]["sara"]), "in use by another sara train"]


def train_changed_resume(ws, tmp):
    run = run_copy(ws, tmp)
    shutil.rmtree(run / "adapter")  # as if stopped after its checkpoint
    return ["train", recipe_with(ws, tmp, train={"output_dir": str(run)}), "train.learning_rate=1.0e-2"], [
        "train.learning_rate: 0.0003 -> 0.01", "--overwrite"]


def merge_args(*extra, fragments, method="sara", damage=None):
    def setup(ws, tmp):
        run = run_copy(ws, tmp, method) if damage else ws["runs"][method]
        if damage:
            damage(run)
        return ["merge", run, "--out", tmp / "merged", *extra], [
            str(f(run)) if callable(f) else f for f in fragments]
    return setup


def merge_changed_base(ws, tmp):
    base = base_copy(ws, tmp)
    run = run_copy(ws, tmp)
    config = json.loads((run / "adapter" / "sara_config.json").read_text())
    config["base_model"]["name_or_path"] = str(base)
    (run / "adapter" / "sara_config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    weights = load_file(str(base / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"][0, 0] += 1.0  # fine-tuned in place since
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    return ["merge", run, "--out", tmp / "merged"], [f"the weights of base {base} changed since", "--force"]


def merge_out_exists(ws, tmp):
    (tmp / "merged").mkdir()
    (tmp / "merged" / "keep.txt").write_text("mine")
    return ["merge", ws["runs"]["sara"], "--out", tmp / "merged"], [str(tmp / "merged"), "already exists", "--overwrite"]


def merge_out_is_a_file(ws, tmp):
    (tmp / "merged").write_text("mine")
    return ["merge", ws["runs"]["sara"], "--out", tmp / "merged"], [str(tmp / "merged"), "is a file"]


def eval_args(*args, fragments):
    def setup(ws, tmp):
        return ["eval", *[ws["runs"]["sara"] if a == "RUN" else a for a in args]], list(fragments)
    return setup


def eval_damaged_checkpoint(ws, tmp):
    base = base_copy(ws, tmp)
    truncate(base / "model.safetensors", 0.9)
    return ["eval", base, "--task", "svamp", "--limit", "1"], [str(base / "model.safetensors"), "cut short"]


def eval_junk_config(ws, tmp):
    base = base_copy(ws, tmp)
    (base / "config.json").write_text("[1, 2")
    return ["eval", base, "--task", "svamp", "--limit", "1"], [str(base / "config.json"), "not valid JSON"]


def route_args(*args, fragments, method="mosara"):
    def setup(ws, tmp):
        return ["route-map", ws["runs"][method], *[tmp / a[4:] if str(a).startswith("TMP/") else a
                                                   for a in args]], list(fragments)
    return setup


def route_out_is_a_file(ws, tmp):
    (tmp / "map").write_text("mine")
    return ["route-map", ws["runs"]["mosara"], "--task", "svamp", "--out", tmp / "map"], [str(tmp / "map"), "is a file"]


def adapter_truncated(run: Path) -> None:
    truncate(run / "adapter" / "adapter_model.safetensors")


def adapter_config_junk(run: Path) -> None:
    (run / "adapter" / "sara_config.json").write_text('{"method": "sara",')


def overlap_train(output: str, fragments):
    """train with train.output_dir set to the base, or to a folder holding its data file."""
    def setup(ws, tmp):
        if output == "base":
            return ["train", recipe_with(ws, tmp, train={"output_dir": str(ws["base"])}), "--overwrite"], [
                "train.output_dir", str(ws["base"]), *fragments]
        data = tmp / "mine" / "data.json"
        data.parent.mkdir()
        shutil.copy(ws["data"], data)
        recipe = recipe_with(ws, tmp, data={"train_file": str(data)}, train={"output_dir": str(data.parent)})
        return ["train", recipe], ["train.output_dir", str(data), *fragments]
    return setup


def merge_into_a_link_to_the_base(ws, tmp):
    (tmp / "link").symlink_to(ws["base"], target_is_directory=True)
    return ["merge", ws["runs"]["sara"], "--out", tmp / "link", "--overwrite"], [
        str(tmp / "link"), "is the base model", str(ws["base"])]


def eval_json_onto_predictions(ws, tmp):
    predictions = tmp / "p.jsonl"
    predictions.write_text(json.dumps({"output": "The answer is 2", "answer": "2"}) + "\n")
    return ["eval", "--task", "svamp", "--score", predictions, "--json", predictions], [
        "--json", "is the predictions file", str(predictions)]


def eval_out_holds_the_test_set(ws, tmp):
    test = tmp / "mine" / "svamp.json"
    test.parent.mkdir()
    test.write_text(json.dumps([{"instruction": "1 + 1?", "answer": "2"}]))
    return ["eval", ws["base"], "--task", test, "--out", test.parent], [f"--out {test.parent} contains", str(test)]


def resume_damaged(name: str, damage, why: str):
    """train resumes a run stopped after checkpoint-1 whose file `name` was damaged by `damage`."""
    def setup(ws, tmp):
        run = run_copy(ws, tmp)
        shutil.rmtree(run / "adapter")  # as if stopped after its checkpoint
        damage(run / "checkpoint-1" / name)
        return ["train", recipe_with(ws, tmp, train={"output_dir": str(run)})], [
            f"{run / 'checkpoint-1' / name} {why}", "no earlier checkpoint is complete", "--overwrite"]
    return setup


def refused_pickle(path: Path) -> None:
    """An RNG state that torch.load(weights_only=True) refuses: it pickles a class."""
    import pathlib

    import torch

    torch.save({"python": pathlib.PurePosixPath("x")}, path)


def data_with(records, name="data.json"):
    """train on a data file of `records`."""
    def setup(ws, tmp):
        data = tmp / name
        data.write_text(json.dumps(records))
        return ["train", recipe_with(ws, tmp, data={"train_file": str(data)})], [str(data)]
    return setup


def train_into_a_folder_of_other_files(ws, tmp):
    folder = tmp / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    return ["train", recipe_with(ws, tmp, train={"output_dir": str(folder)})], [
        f"train.output_dir {folder} already holds files that are not a sara run (notes.txt)", "--overwrite"]


def recipe_text(text: str, *fragments):
    def setup(ws, tmp):
        path = tmp / "recipe.yaml"
        path.write_text(text.replace("BASE", str(ws["base"])).replace("DATA", str(ws["data"])))
        return ["train", path], [str(path), *fragments]
    return setup


LAUGHS = "".join(f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['lol'] * 9)}]\n" for i in range(10))


def unfinished_run(command: str):
    def setup(ws, tmp):
        run = run_copy(ws, tmp)
        shutil.rmtree(run / "adapter")
        argv = {"eval": ["eval", run, "--task", "svamp"], "merge": ["merge", run, "--out", tmp / "m"],
                "chat": ["chat", run, "--prompt", "Hi"]}[command]
        return argv, [f"{run} is an unfinished run", f"sara train {run / 'recipe.yaml'}", str(run / "checkpoint-1")]
    return setup


CASES = {
    # analyze
    "analyze-missing-folder": lambda ws, tmp: (["analyze", tmp / "nowhere"], [str(tmp / "nowhere"), "does not exist"]),
    "analyze-no-config": lambda ws, tmp: (["analyze", tmp], [str(tmp), "no config.json"]),
    "analyze-junk-config": analyze_junk_config,
    "analyze-truncated-weights": analyze_damaged("truncated"),
    "analyze-random-weights": analyze_damaged("random"),
    "analyze-empty-weights": analyze_damaged("empty"),
    "analyze-missing-shard": analyze_missing_shard,
    "analyze-bin-only": analyze_bin_only,
    "analyze-tau-zero": lambda ws, tmp: (["analyze", ws["base"], "--tau", "0"], ["--tau 0", "(0, 1]"]),
    "analyze-tau-nan": lambda ws, tmp: (["analyze", ws["base"], "--tau", "nan"], ["--tau nan", "(0, 1]"]),
    "analyze-unknown-target": lambda ws, tmp: (["analyze", ws["base"], "--targets", "c_attn"], ["'c_attn'", "q_proj"]),
    "analyze-experts-zero": lambda ws, tmp: (["analyze", ws["base"], "--experts", "0"], ["--experts"]),
    "analyze-bad-device": lambda ws, tmp: (["analyze", ws["base"], "--device", "tpu"], ["--device", "'tpu'"]),
    "analyze-json-is-a-folder": analyze_json_is_a_folder,
    "analyze-plot-under-a-file": analyze_plot_under_a_file,
    # train
    "train-missing-recipe": lambda ws, tmp: (["train", tmp / "nope.yaml"], [str(tmp / "nope.yaml"), "does not exist"]),
    "train-bad-yaml": train_bad_yaml,
    "train-unknown-key": train_recipe(adapter={"tua": 0.5}),
    "train-tau-out-of-range": train_recipe(adapter={"tau": 1.5}),
    "train-override-not-yaml": train_overrides("adapter.targets=[q_proj", fragments=["adapter.targets=[q_proj", "YAML"]),
    "train-override-nan": train_overrides("adapter.tau=nan", fragments=["adapter.tau=nan", "finite", "0 < tau <= 1"]),
    "train-override-unknown-section": train_overrides("adaptor.tau=0.1", fragments=["adaptor", "did you mean 'adapter'"]),
    "train-max-steps-zero": train_overrides("train.max_steps=0", fragments=["train.max_steps", "trains nothing"]),
    "train-unknown-logger": train_overrides("train.report_to=wandbb", fragments=["train.report_to", "wandbb"]),
    "train-output-is-a-file": train_output_is_a_file,
    "train-missing-data": train_missing_data,
    "train-record-without-output": train_record_without_output,
    "train-missing-model": train_missing_model,
    "train-damaged-base": train_damaged_base,
    "train-unknown-target": train_overrides("adapter.targets=c_attn", fragments=["'c_attn'", "q_proj"]),
    "train-busy-folder": train_busy_folder,
    "train-changed-resume": train_changed_resume,
    # merge
    "merge-missing-run": lambda ws, tmp: (["merge", tmp / "nope", "--out", tmp / "m"], [str(tmp / "nope"), "does not exist"]),
    "merge-not-a-run": lambda ws, tmp: (["merge", tmp, "--out", tmp / "m"], [str(tmp), "holds no sara adapter"]),
    "merge-truncated-adapter": merge_args(fragments=[lambda r: r / "adapter" / "adapter_model.safetensors",
                                                     "cut short"], damage=adapter_truncated),
    "merge-junk-adapter-config": merge_args(fragments=[lambda r: r / "adapter" / "sara_config.json", "not valid JSON"],
                                            damage=adapter_config_junk),
    "merge-changed-base": merge_changed_base,
    "merge-out-exists": merge_out_exists,
    "merge-out-is-a-file": merge_out_is_a_file,
    "merge-bad-dtype": merge_args("--dtype", "int8", fragments=["--dtype", "'int8'"]),
    "merge-bad-format": merge_args("--format", "gguf", fragments=["--format", "'gguf'"]),
    "merge-bad-shard-size": merge_args("--max-shard-size", "big", fragments=["--max-shard-size", "'big'"]),
    "merge-routing-on-sara": merge_args("--routing", "mean", fragments=["--routing", "Mo-SARA", "sara adapter"]),
    "merge-mosara-without-routing": merge_args(fragments=["--routing mean", "--calibration"], method="mosara"),
    "merge-missing-calibration": merge_args("--routing", "mean", "--calibration", "gone.json",
                                            fragments=["gone.json", "does not exist"], method="mosara"),
    # outputs never overwrite inputs (--overwrite included)
    "merge-out-is-the-base": lambda ws, tmp: (["merge", ws["runs"]["sara"], "--out", ws["base"], "--overwrite"],
                                              [f"--out {ws['base']} is the base model", "choose another path"]),
    "merge-out-is-the-run": lambda ws, tmp: (["merge", ws["runs"]["sara"], "--out", ws["runs"]["sara"], "--overwrite"],
                                             [str(ws["runs"]["sara"]), "is a run folder"]),
    "merge-out-holds-the-run": lambda ws, tmp: (["merge", ws["runs"]["sara"], "--out", ws["root"], "--overwrite"],
                                                [f"--out {ws['root']} contains the adapter"]),
    "merge-out-is-a-link-to-the-base": merge_into_a_link_to_the_base,
    "merge-export-into-the-adapter": lambda ws, tmp: (
        ["merge", ws["runs"]["sara"], "--format", "peft-lora", "--out", ws["runs"]["sara"] / "adapter" / "lora"],
        ["--out", "lies inside", "adapter"]),
    "train-output-is-the-base": overlap_train("base", ["is the base model"]),
    "train-output-holds-the-data": overlap_train("data", ["contains the data file"]),
    "eval-json-is-the-predictions": eval_json_onto_predictions,
    "eval-json-is-the-data": lambda ws, tmp: (["eval", ws["runs"]["sara"], "--task", "loss", "--data", ws["data"],
                                               "--json", ws["data"]], [f"--json {ws['data']} is the data file"]),
    "eval-out-is-the-base": lambda ws, tmp: (["eval", ws["runs"]["sara"], "--task", "svamp", "--out", ws["base"]],
                                             [f"--out {ws['base']} is the run's base model"]),
    "eval-out-holds-the-test-set": eval_out_holds_the_test_set,
    "analyze-json-onto-the-weights": lambda ws, tmp: (
        ["analyze", ws["base"], "--json", ws["base"] / "model.safetensors"],
        ["--json", "lies inside the model", str(ws["base"])]),
    "route-map-out-is-the-adapter": lambda ws, tmp: (
        ["route-map", ws["runs"]["mosara"], "--task", "svamp", "--out", ws["runs"]["mosara"] / "adapter"],
        ["--out", "is the adapter"]),
    "train-output-holds-other-files": train_into_a_folder_of_other_files,
    # a resume continues exactly as the run would have gone on, or is refused
    "train-resume-without-optimizer": resume_damaged("optimizer.pt", Path.unlink, "is missing"),
    "train-resume-without-scheduler": resume_damaged("scheduler.pt", Path.unlink, "is missing"),
    "train-resume-without-rng-state": resume_damaged("rng_state.pth", Path.unlink, "is missing"),
    "train-resume-truncated-optimizer": resume_damaged("optimizer.pt", truncate, "cannot be read"),
    "train-resume-refused-rng-state": resume_damaged("rng_state.pth", refused_pickle, "cannot be read"),
    "train-resume-junk-trainer-state": resume_damaged("trainer_state.json", lambda p: p.write_text("{"),
                                                      "is not valid JSON"),
    "train-resume-truncated-adapter": resume_damaged("adapter_model.safetensors", truncate, ""),
    # the remaining holes in input checks
    "train-data-is-a-folder": lambda ws, tmp: (
        ["train", recipe_with(ws, tmp, data={"train_file": str(ws["root"])})], [f"data file {ws['root']} is a folder", ".json"]),
    "eval-loss-data-is-a-folder": lambda ws, tmp: (
        ["eval", ws["runs"]["sara"], "--task", "loss", "--data", tmp], [f"--data {tmp} is a folder"]),
    "train-output-is-a-list": data_with([{"instruction": "7?", "input": "", "output": ["7"]}] * 4),
    "train-output-is-a-json-number": data_with([{"instruction": "7?", "input": "", "output": 1e3}] * 4),
    "train-instruction-is-a-mapping": data_with([{"instruction": {"q": "7?"}, "input": "", "output": "7"}] * 4),
    "train-yaml-key-twice": recipe_text("model: {name_or_path: BASE}\nadapter:\n  tau: 0.3\n  tau: 0.9\n"
                                        "data: {train_file: DATA}\n", "key 'tau' is given twice",
                                        "line 3 and line 4"),
    "train-yaml-billion-laughs": recipe_text("model: {name_or_path: BASE}\nadapter:\n  targets:\n" + LAUGHS,
                                             "expands to more than 100,000 values", "aliases"),
    "eval-unfinished-run": unfinished_run("eval"),
    "merge-unfinished-run": unfinished_run("merge"),
    "chat-unfinished-run": unfinished_run("chat"),
    # eval
    "eval-unknown-task": eval_args("RUN", "--task", "gsm9k", fragments=["'gsm9k'", "gsm8k"]),
    "eval-bad-protocol": eval_args("RUN", "--task", "svamp", "--protocol", "slow", fragments=["--protocol", "'slow'"]),
    "eval-batch-size-zero": eval_args("RUN", "--task", "svamp", "--batch-size", "0", fragments=["--batch-size", "got 0"]),
    "eval-loss-without-data": eval_args("RUN", "--task", "loss", fragments=["--task loss", "--data"]),
    "eval-missing-score-file": lambda ws, tmp: (["eval", "--task", "svamp", "--score", tmp / "p.jsonl"],
                                                [str(tmp / "p.jsonl")]),
    "eval-missing-model": lambda ws, tmp: (["eval", tmp / "nope", "--task", "svamp"], [str(tmp / "nope"), "does not exist"]),
    "eval-damaged-checkpoint": eval_damaged_checkpoint,
    "eval-junk-config": eval_junk_config,
    # route-map
    "route-map-not-mosara": route_args("--task", "svamp", fragments=["sara adapter", "Mo-SARA"], method="sara"),
    "route-map-out-is-a-file": route_out_is_a_file,
    "route-map-unknown-task": route_args("--task", "gsm9k", fragments=["'gsm9k'"]),
    "route-map-missing-data": route_args("--data", "TMP/none.json", fragments=["none.json", "does not exist"]),
    "route-map-bad-tokens": route_args("--task", "svamp", "--tokens", "some", fragments=["--tokens", "'some'"]),
    "route-map-unknown-module": route_args("--task", "svamp", "--modules", "o_proj", fragments=["--modules o_proj", "q_proj"]),
}


def test_the_cases_cover_every_command_forty_times_over():
    commands = {name.split("-")[0] for name in CASES}
    assert commands == {"analyze", "train", "merge", "eval", "route", "chat"} and len(CASES) >= 40


@pytest.mark.parametrize("name", sorted(CASES))
def test_fault(name, workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs land where they are checked
    argv, fragments = CASES[name](workspace, tmp_path)
    if name == "train-busy-folder":  # the folder is held by a run still going
        with rundir.locked(workspace["runs"]["sara"]):
            before = snapshot(workspace["root"], tmp_path)
            result = run_cli(*argv)
    else:
        before = snapshot(workspace["root"], tmp_path)
        result = run_cli(*argv)
    # Commands that print progress (train's notices and tables) may have written to stdout first.
    line = one_line_error(result, *map(str, fragments), stdout_empty=False)
    assert result.exit_code == 2, line
    assert snapshot(workspace["root"], tmp_path) == before, "a file the user had was changed"


def test_a_damaged_newest_checkpoint_is_passed_over_and_the_resume_is_exact(workspace, tmp_path):
    """Two steps, a checkpoint after each; checkpoint-2 loses its optimizer state. The resume
    says so, continues from checkpoint-1, and ends with the uninterrupted run's adapter."""
    from safetensors.torch import load_file

    def recipe(out: Path) -> Path:
        return write_recipe(tmp_path / f"{out.name}.yaml", workspace["base"], workspace["data"], out,
                            {"method": "sara", "tau": 0.5})

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_cli("train", recipe(whole), "train.max_steps=2").exit_code == 0
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "adapter")
    (resumed / "checkpoint-2" / "optimizer.pt").unlink()
    result = run_cli("train", recipe(resumed), "train.max_steps=2")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"checkpoint-2 cannot be resumed exactly ({resumed / 'checkpoint-2' / 'optimizer.pt'} is missing)" in said
    assert "resuming from checkpoint-1" in said
    expected = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


# -- a full disk is an ordinary error ---------------------------------------------------------------

NO_SPACE = {
    "oserror": lambda: OSError(28, "No space left on device"),
    # torch.save on a full disk: a RuntimeError without errno, recognised by the free space left.
    "torch-save": lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
}


@pytest.mark.parametrize("kind", sorted(NO_SPACE))
def test_a_full_disk_while_training_names_the_checkpoint_to_resume_from(kind, workspace, tmp_path, monkeypatch):
    import sara_cli.files
    from sara_cli.training.trainer import SaraTrainer

    save = SaraTrainer._save_optimizer_and_scheduler

    def fill_up(self, output_dir):
        if self.state.global_step == 2:
            (Path(output_dir) / "optimizer.pt").write_bytes(b"half")
            raise NO_SPACE[kind]()
        return save(self, output_dir)

    monkeypatch.setattr(SaraTrainer, "_save_optimizer_and_scheduler", fill_up)
    monkeypatch.setattr(sara_cli.files.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", workspace["base"], workspace["data"], run, {"method": "sara", "tau": 0.5})
    result = run_cli("train", recipe, "train.max_steps=3")
    one_line_error(result, "no space left on the device while writing", "free space or choose another output folder",
                   f"the last complete checkpoint is {run / 'checkpoint-1'}", "rerun the same command",
                   stdout_empty=False)
    assert result.exit_code == 2
    assert sorted(p.name for p in run.iterdir() if p.name != rundir.LOCK_NAME) == [
        "checkpoint-1", "recipe.yaml", "trainer_log.jsonl"]  # no half-written checkpoint-2, no staging


def test_a_full_disk_while_merging_leaves_nothing_at_out(workspace, tmp_path, monkeypatch):
    from sara_cli.merging import merge

    def fill_up(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merge.ShardWriter, "flush", fill_up)
    before = snapshot(workspace["root"])
    result = run_cli("merge", workspace["runs"]["sara"], "--out", tmp_path / "merged")
    one_line_error(result, f"no space left on the device while writing {tmp_path / 'merged'}",
                   f"nothing was written at {tmp_path / 'merged'}")
    assert result.exit_code == 2 and list(tmp_path.iterdir()) == []
    assert snapshot(workspace["root"]) == before


# -- no code from a model folder runs unless asked ---------------------------------------------------

@pytest.fixture(scope="module")
def custom_code_base(workspace, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the tiny Llama whose config names its own model code (auto_map); importing that
    code writes a marker file. Returns (folder, marker)."""
    folder = tmp_path_factory.mktemp("custom-code") / "base"
    shutil.copytree(workspace["base"], folder)
    marker = folder.parent / "code-ran.txt"
    (folder / "custom_model.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'sara-test-custom'\n\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="sara-test-custom", auto_map={"AutoConfig": "custom_model.CustomConfig",
                                                           "AutoModelForCausalLM": "custom_model.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


@pytest.mark.parametrize("command", ["train", "eval", "chat", "analyze"])
def test_a_model_folders_own_code_never_runs_unasked(command, custom_code_base, workspace, tmp_path):
    folder, marker = custom_code_base
    argv, setting = {
        "analyze": (["analyze", folder], "sara analyze never runs a model's code"),
        "train": (["train", recipe_with(workspace, tmp_path, model={"name_or_path": str(folder)})],
                  "model.trust_remote_code: true"),
        "eval": (["eval", folder, "--task", "svamp", "--limit", "1", "--out", tmp_path / "results"],
                 "--trust-remote-code"),
        "chat": (["chat", folder, "--prompt", "Hi"], "--trust-remote-code"),
    }[command]
    before = snapshot(folder)
    result = run_cli(*argv)
    one_line_error(result, f"model {folder} needs its own Python code", setting, "code you trust",
                   stdout_empty=False)
    assert result.exit_code == 2 and not marker.exists()
    assert snapshot(folder) == before


def test_asked_to_the_folders_code_runs(custom_code_base, tmp_path):
    """The control for the test above: with --trust-remote-code the same folder's code runs."""
    folder = tmp_path / "base"
    shutil.copytree(custom_code_base[0], folder)
    marker = tmp_path / "asked.txt"
    code = (folder / "custom_model.py").read_text().replace(str(custom_code_base[1]), str(marker))
    (folder / "custom_model.py").write_text(code)
    result = run_cli("chat", folder, "--prompt", "Hi", "--max-new-tokens", "2", "--trust-remote-code")
    assert result.exit_code == 0, result.output
    assert marker.read_text() == "ran"


def test_a_billion_laughs_recipe_is_refused_within_a_second(tmp_path):
    import time

    from sara_cli.errors import SaraError
    from sara_cli.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text("model: {name_or_path: m}\nadapter:\n  targets:\n" + LAUGHS)
    started = time.perf_counter()
    with pytest.raises(SaraError, match="expands to more than"):
        load_recipe(path)
    assert time.perf_counter() - started < 1.0
