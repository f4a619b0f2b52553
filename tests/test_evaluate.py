"""End-to-end tests of `sara eval` (sara_cli/evaluate.py) on the tiny Llama, through the real CLI.

Extraction and scoring rules are unit-tested in test_tasks.py; here the question is whether the
command wires them up right: which model it loads, how it generates under each protocol, what it
writes, and how it fails. Reference values (losses, LLM-Adapters scores) are computed in this file
independently of the code under test.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from conftest import one_line_error, run_cli
import torch

from sara_cli.evaluation import evaluate, tasks

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent")
TASKS = ["svamp", "aqua", "boolq", "piqa"]  # numeric, letter and two label tasks
LIMIT = 5
RECORDS = [  # instruction records for --task loss; short, so nothing is truncated
    {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5. The answer is 5."},
    {"instruction": "Is the sky green?", "input": "", "output": "false"},
    {"instruction": "Name a colour.", "input": "Pick a warm one.", "output": "Red."},
]


pytestmark = pytest.mark.usefixtures("one_thread")


def ok(result):
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def sara_run(llama_dir, tmp_path_factory) -> Path:
    """A finished two-step SARA run on the tiny Llama, trained through the API."""
    from sara_cli.recipe import validate
    from sara_cli.training.train import train

    out = tmp_path_factory.mktemp("sara-run") / "run"
    recipe = validate({
        "model": {"name_or_path": str(llama_dir), "dtype": "float32"},
        "adapter": {"method": "sara", "targets": "q_proj,v_proj", "tau": 0.5, "init_lambda": "ones"},
        "data": {"train_file": "builtin:mawps-quickstart", "limit": 8, "cutoff_len": 96,
                 "train_on_inputs": False},
        "train": {"output_dir": str(out), "max_steps": 2, "per_device_train_batch_size": 4,
                  "learning_rate": 0.05, "logging_steps": 1, "save_steps": 100},
    })
    train(recipe)
    assert (out / "adapter" / "sara_config.json").is_file()
    return out


@pytest.fixture(scope="module")
def merged_dir(sara_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "model"
    ok(run_cli("merge", sara_run, "--out", out))
    return out


def check_outputs(out: Path, task_names: list[str], protocol: str) -> dict:
    """The per-task JSONL files and summary.json are complete and agree with re-scoring."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == protocol
    assert summary["model"] and summary["seconds"] > 0
    assert list(summary["tasks"]) == task_names
    for name in task_names:
        task = tasks.TASKS[name]
        rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        source = tasks.load_records(task, None, LIMIT)
        assert len(rows) == LIMIT
        for row, record in zip(rows, source):
            assert set(row) == {"instruction", "response", "prediction", "answer", "correct"}
            assert (row["instruction"], row["answer"]) == (record["instruction"], record["answer"])
            assert isinstance(row["response"], str) and isinstance(row["correct"], bool)
            prediction = tasks.extract_prediction(task, row["response"])
            assert row["prediction"] == prediction
            assert row["correct"] == tasks.is_correct(task, prediction, row["answer"])
        stats = summary["tasks"][name]
        assert stats["n"] == LIMIT
        assert stats["correct"] == sum(row["correct"] for row in rows)
        assert stats["accuracy"] == pytest.approx(stats["correct"] / LIMIT)
        assert stats["seconds"] >= 0 and stats["examples_per_second"] > 0
        assert stats["generated_tokens_per_second"] > 0
    mean = sum(summary["tasks"][n]["accuracy"] for n in task_names) / len(task_names)
    assert summary["mean_accuracy"] == pytest.approx(mean)
    return summary


def responses(out: Path, name: str) -> list[str]:
    return [json.loads(line)["response"] for line in (out / f"{name}.jsonl").read_text().splitlines()]


# -- end to end ------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["fast", "llm-adapters"])
def test_eval_end_to_end(llama_dir, tmp_path, protocol):
    out = tmp_path / "results"
    result = ok(run_cli("eval", llama_dir, "--task", ",".join(TASKS), "--limit", LIMIT, "--protocol", protocol,
                        "--max-new-tokens", 8, "--batch-size", 3, "--out", out))
    check_outputs(out, TASKS, protocol)
    table = result.stdout
    for name in TASKS:
        assert re.search(rf"\b{name}\b\s*│\s*{LIMIT}\s*│", table), table
    assert re.search(r"mean\s*│.*\d\.\d{4}", table), table
    assert f"{protocol}" in table and "summary.json" in table


def test_eval_accepts_run_adapter_and_merged_folders(llama_dir, sara_run, merged_dir, tmp_path):
    """A run folder, its adapter/ folder and its merged checkpoint give the same greedy answers,
    and those differ from the base model's."""
    got = {}
    for kind, model in (("run", sara_run), ("adapter", sara_run / "adapter"), ("merged", merged_dir),
                        ("base", llama_dir)):
        out = tmp_path / kind
        ok(run_cli("eval", model, "--task", "svamp,boolq", "--limit", LIMIT, "--max-new-tokens", 8, "--out", out))
        summary = check_outputs(out, ["svamp", "boolq"], "fast")
        got[kind] = (summary["model"], responses(out, "svamp") + responses(out, "boolq"))
    assert got["run"][0].startswith("sara adapter") and got["run"][0].endswith("adapter")
    assert got["adapter"][0] == got["run"][0]
    assert got["merged"][0] == str(merged_dir)
    # SARA merges exactly in float32: the adapter is applied on its base, and nothing else changes.
    assert got["run"][1] == got["adapter"][1] == got["merged"][1]
    assert got["run"][1] != got["base"][1]


def test_results_of_a_run_go_inside_it(sara_run, llama_dir, tmp_path, monkeypatch):
    """No --out: RUN/eval/<protocol> for a run or its adapter/ folder, said on stdout; a model
    that is not a run keeps ./eval-results/<name>-<protocol>."""
    monkeypatch.chdir(tmp_path)
    for model in (sara_run, sara_run / "adapter"):
        result = ok(run_cli("eval", model, "--task", "boolq", "--limit", 2, "--max-new-tokens", 2))
        assert f"wrote {sara_run / 'eval' / 'fast'}/summary.json" in result.stdout
        check_outputs_n(sara_run / "eval" / "fast", "boolq", 2)
    result = ok(run_cli("eval", llama_dir, "--task", "boolq", "--limit", 2, "--max-new-tokens", 2))
    assert f"wrote eval-results/{llama_dir.name}-fast/summary.json" in result.stdout
    check_outputs_n(tmp_path / "eval-results" / f"{llama_dir.name}-fast", "boolq", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval-results"]


def test_results_folder_names_what_was_evaluated(tmp_path):
    """A run's checkpoint-N gets its own folder in RUN/eval; an adapter folder outside a run does
    not count as a run."""
    run = tmp_path / "run"
    for folder in ("adapter", "checkpoint-20"):
        (run / folder).mkdir(parents=True)
        (run / folder / "sara_config.json").write_text("{}")
    (run / "recipe.yaml").write_text("model: {}\n")
    loose = tmp_path / "loose-adapter"
    loose.mkdir()
    (loose / "sara_config.json").write_text("{}")
    assert evaluate.results_folder(str(run), "fast") == run / "eval" / "fast"
    assert evaluate.results_folder(str(run / "adapter"), "harness") == run / "eval" / "harness"
    assert evaluate.results_folder(str(run / "checkpoint-20"), "fast") == run / "eval" / "checkpoint-20-fast"
    assert evaluate.results_folder(str(loose), "fast") == Path("eval-results") / "loose-adapter-fast"
    assert evaluate.results_folder("builtin:tiny-llama", "fast") == Path("eval-results") / "builtin-tiny-llama-fast"
    assert evaluate.results_folder(str(run), "fast", tmp_path / "mine") == tmp_path / "mine"


def check_outputs_n(out: Path, task: str, n: int) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"][task]["n"] == n and len((out / f"{task}.jsonl").read_text().splitlines()) == n


def test_out_is_checked_before_any_work(sara_run, llama_dir, tmp_path):
    """A file, a path under a file, or a folder that train and merge manage: one line, at once,
    and nothing changes there."""
    blocker = tmp_path / "a-file"
    blocker.write_text("keep")
    adapter_files = {p.name: p.read_bytes() for p in (sara_run / "adapter").iterdir()}
    cases = [(blocker, "is a file"), (blocker / "results", "is a file"),
             (sara_run / "adapter", "adapter or checkpoint folder"),
             (sara_run / "adapter" / "results", "adapter or checkpoint folder"),
             (sara_run, "is a run folder")]
    for out, message in cases:
        one_line_error(run_cli("eval", llama_dir, "--task", "svamp", "--out", out), "--out", message)
    one_line_error(run_cli("eval", llama_dir, "--task", "loss", "--data", "builtin:mawps-quickstart",
                           "--json", blocker / "loss.json"), "--json", "is a file")
    assert blocker.read_text() == "keep"
    assert {p.name: p.read_bytes() for p in (sara_run / "adapter").iterdir()} == adapter_files
    assert not (sara_run / "summary.json").exists()


# -- protocols -------------------------------------------------------------------------------------


def test_fast_batches_match_one_at_a_time(llama_dir, monkeypatch):
    """Left padding + the attention mask: a padded batch decodes exactly as each prompt alone."""
    model, tokenizer, _, _ = evaluate.load_model(str(llama_dir), device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    records = [r for name in ("svamp", "boolq", "aqua") for r in tasks.load_records(tasks.TASKS[name], None, 3)]
    prompts = [tasks.eval_prompt(r["instruction"]) for r in records]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert len(set(lengths)) > 3  # the batch really needs padding

    calls, outputs = [], []
    generate = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        outputs.append(generate(**kwargs))
        return outputs[-1]

    monkeypatch.setattr(model, "generate", spy)
    batched, batched_tokens = evaluate.generate(model, tokenizer, prompts, "fast", len(prompts), 10)
    (call,) = calls
    assert call["num_beams"] == 1 and call["do_sample"] is False and call["max_new_tokens"] == 10
    mask, ids = call["attention_mask"], call["input_ids"]  # (B, T)
    for row in range(len(prompts)):
        real = int(mask[row].sum())
        assert real in lengths
        assert mask[row, -real:].all() and not mask[row, :-real].any()  # padding on the left
        assert (ids[row, :-real] == tokenizer.pad_token_id).all()

    calls.clear()
    single, single_tokens = evaluate.generate(model, tokenizer, prompts, "fast", 1, 10)
    assert len(calls) == len(prompts) and all(c["input_ids"].shape[0] == 1 for c in calls)
    assert batched == single
    assert batched_tokens == single_tokens

    # The comparison can catch a broken mask: attending to the padding changes the answers.
    unmasked = generate(input_ids=ids, attention_mask=torch.ones_like(mask), max_new_tokens=10, do_sample=False,
                        pad_token_id=tokenizer.pad_token_id)
    assert not torch.equal(unmasked, outputs[0])


def test_llm_adapters_protocol_is_one_by_one_with_four_beams(llama_dir, tmp_path, monkeypatch):
    from transformers import GenerationMixin, LlamaForCausalLM

    calls = []

    def spy(self, *args, **kwargs):
        calls.append(dict(kwargs))
        kwargs["max_new_tokens"] = 4  # what was asked is recorded; 256 beam steps would only cost time
        return GenerationMixin.generate(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", spy)
    ok(run_cli("eval", llama_dir, "--task", "svamp,boolq", "--limit", 2, "--protocol", "llm-adapters",
               "--out", tmp_path))
    assert len(calls) == 4
    for call in calls:
        assert call["input_ids"].shape[0] == 1
        assert call["num_beams"] == 4 and call["do_sample"] is False
    assert [c["max_new_tokens"] for c in calls] == [256, 256, 32, 32]  # math, then commonsense
    assert json.loads((tmp_path / "summary.json").read_text())["protocol"] == "llm-adapters"


# -- loss mode -------------------------------------------------------------------------------------


def reference_loss(model, tokenizer, records, mask_prompt: bool) -> tuple[float, int]:
    """Mean next-token cross-entropy in float64, one record at a time (no padding at all), on the
    prompt's ids followed by the answer's (data.tokenize: split, the default)."""
    from sara_cli.data.dataset import alpaca_prompt

    total, count = 0.0, 0
    for r in records:
        prompt_ids = tokenizer(alpaca_prompt(r["instruction"], r["input"]))["input_ids"]
        ids = prompt_ids + tokenizer(r["output"], add_special_tokens=False)["input_ids"]
        ids = ids + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (T, V)
        nll = -torch.log_softmax(logits[:-1], dim=-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        first = len(prompt_ids) - 1 if mask_prompt else 0  # position predicting the first scored token
        total += float(nll[first:].sum())
        count += len(ids) - 1 - first
    return total / count, count


def loss_from_cli(model, records_file: Path, json_path: Path) -> dict:
    result = ok(run_cli("eval", model, "--task", "loss", "--data", records_file, "--batch-size", 2,
                        "--json", json_path))
    report = json.loads(json_path.read_text())
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]), rel=1e-12)
    assert f"mean token loss {report['loss']:.4f}" in result.stdout
    assert f"perplexity {report['perplexity']:.3f}" in result.stdout
    assert report["records"] == len(RECORDS)
    return report


@pytest.fixture
def records_file(tmp_path) -> Path:
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def test_loss_mode_on_a_plain_checkpoint(llama_dir, records_file, tmp_path):
    """A plain model: the default alpaca template, every token scored (batches of 2 are padded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = loss_from_cli(llama_dir, records_file, tmp_path / "loss.json")
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    loss, count = reference_loss(model, AutoTokenizer.from_pretrained(llama_dir), RECORDS, mask_prompt=False)
    assert report["tokens"] == count
    torch.testing.assert_close(report["loss"], loss, rtol=1e-5, atol=0)  # float32 logits vs float64


def test_loss_mode_on_a_run_uses_its_template_and_masking(sara_run, records_file, tmp_path):
    """A run trained with train_on_inputs: false scores only the response tokens."""
    from sara_cli.adapters import checkpoint

    report = loss_from_cli(sara_run, records_file, tmp_path / "loss.json")
    model, tokenizer, _ = checkpoint.load_adapter_model(sara_run / "adapter", device="cpu")
    loss, count = reference_loss(model, tokenizer, RECORDS, mask_prompt=True)
    assert report["tokens"] == count
    torch.testing.assert_close(report["loss"], loss, rtol=1e-5, atol=0)


def test_loss_of_a_run_is_kept_in_the_run_and_of_a_base_only_printed(sara_run, llama_dir, records_file,
                                                                      tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "copy-of-run"
    shutil.copytree(sara_run, run)
    monkeypatch.chdir(tmp_path)
    result = ok(run_cli("eval", run, "--task", "loss", "--data", records_file, "--batch-size", 2))
    kept = run / "eval" / "loss" / "records.json"
    assert f"wrote {kept}" in result.stdout
    explicit = loss_from_cli(run, records_file, tmp_path / "explicit.json")
    assert json.loads(kept.read_text()) == explicit
    ok(run_cli("eval", llama_dir, "--task", "loss", "--data", records_file, "--batch-size", 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy-of-run", "explicit.json", "records.jsonl"]


# -- --score ---------------------------------------------------------------------------------------


def test_score_hand_made_files(tmp_path):
    as_list = tmp_path / "boolq.json"
    as_list.write_text(json.dumps([{"output": "the correct answer is true", "answer": "true"},
                                   {"output": "True", "answer": "true"},  # case-sensitive: no prediction
                                   {"output": "false, not true", "answer": "false"}]))
    result = ok(run_cli("eval", "--score", as_list, "--task", "boolq", "--json", tmp_path / "boolq-score.json"))
    assert "boolq: 2/3 correct, accuracy 0.6667" in result.stdout
    saved = json.loads((tmp_path / "boolq-score.json").read_text())
    assert (saved["task"], saved["n"], saved["correct"]) == ("boolq", 3, 2)
    assert [r["prediction"] for r in saved["records"]] == ["true", None, "false"]

    as_lines = tmp_path / "aqua.jsonl"
    as_lines.write_text('{"output": "A train at 60 km/h: (C)", "answer": "C"}\n\n'  # reads as A
                        '{"output": "The answer is (C).", "answer": "C"}\n'
                        '{"output": "(c)", "answer": "C"}\n')  # case-sensitive: no prediction
    result = ok(run_cli("eval", "--score", as_lines, "--task", "aqua"))
    assert "aqua: 1/3 correct, accuracy 0.3333" in result.stdout
    assert not (tmp_path / "aqua-score.json").exists()


def llm_adapters_correct(dataset: str, output: str, label: str) -> bool:
    """LLM-Adapters evaluate.py, rewritten from its source: extract_answer_number/_letter + the check."""
    if dataset == "aqua":
        found = re.findall(r"A|B|C|D|E", output.strip())
        return (found[0] if found else "") == label
    numbers = re.findall(r"-?\d+\.?\d*", output.replace(",", ""))
    prediction = float(numbers[-1]) if numbers else float("inf")
    return abs(float(label) - prediction) <= 0.001


@needs_shared
def test_score_reproduces_llm_adapters_on_real_boolq(tmp_path):
    records = json.loads((SHARED_DATA / "commonsense" / "test" / "boolq" / "test.json").read_text())
    predictions = tmp_path / "boolq.jsonl"
    predictions.write_text("".join(json.dumps({"output": r["output"], "answer": r["answer"]}) + "\n"
                                   for r in records))
    result = ok(run_cli("eval", "--score", predictions, "--task", "boolq"))
    assert f"boolq: {len(records)}/{len(records)} correct, accuracy 1.0000" in result.stdout


@needs_shared
@pytest.mark.parametrize(("folder", "name"), [("SVAMP", "svamp"), ("gsm8k", "gsm8k"), ("AQuA", "aqua")])
def test_score_reproduces_llm_adapters_on_real_math_rationales(tmp_path, folder, name):
    """The stored rationales are often wrong, so the score is a real test of the rules."""
    records = json.loads((SHARED_DATA / "math" / "test" / folder / "test.json").read_text())
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([{"output": r["output"], "answer": r["answer"]} for r in records]))
    ok(run_cli("eval", "--score", predictions, "--task", name, "--json", tmp_path / "score.json"))
    saved = json.loads((tmp_path / "score.json").read_text())
    expected = [llm_adapters_correct(name, r["output"], r["answer"]) for r in records]
    assert 0 < sum(expected) < len(records)
    assert [r["correct"] for r in saved["records"]] == expected
    assert (saved["n"], saved["correct"]) == (len(records), sum(expected))


# -- bad input -------------------------------------------------------------------------------------


def test_unknown_task_lists_valid_ones(llama_dir):
    one_line_error(run_cli("eval", llama_dir, "--task", "svamp,gsm9k"), "'gsm9k'", "svamp", "winogrande")


def test_missing_data_folder(llama_dir):
    one_line_error(run_cli("eval", llama_dir, "--task", "svamp", "--data-dir", "/nonexistent"),
                   "/nonexistent/SVAMP/test.json", "--data-dir")


def test_records_without_answer(llama_dir, tmp_path):
    (tmp_path / "SVAMP").mkdir()
    (tmp_path / "SVAMP" / "test.json").write_text(json.dumps([{"instruction": "q", "answer": "1"},
                                                              {"instruction": "q"}]))
    one_line_error(run_cli("eval", llama_dir, "--task", "svamp", "--data-dir", tmp_path), "record 1 lacks 'answer'")
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"output": "3"}\n')
    one_line_error(run_cli("eval", "--score", predictions, "--task", "svamp"), "record 0 lacks 'answer'")


@pytest.mark.parametrize(("name", "content"), [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("list.json", "[]")])
def test_empty_predictions_file(tmp_path, name, content):
    predictions = tmp_path / name
    predictions.write_text(content)
    one_line_error(run_cli("eval", "--score", predictions, "--task", "gsm8k"), "has no records")


def test_folder_that_is_neither_checkpoint_nor_run(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    one_line_error(run_cli("eval", tmp_path, "--task", "svamp", "--limit", 1),
                   "neither a model checkpoint", "nor a sara run")


def test_limit_zero(llama_dir):
    one_line_error(run_cli("eval", llama_dir, "--task", "svamp", "--limit", 0), "--limit", "got 0")


# -- --template ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_run(llama_dir, tmp_path_factory) -> Path:
    """A finished two-step LoRA run trained with the plain template."""
    from sara_cli.recipe import validate
    from sara_cli.training.train import train

    out = tmp_path_factory.mktemp("plain-run") / "run"
    train(validate({
        "model": {"name_or_path": str(llama_dir), "dtype": "float32"},
        "adapter": {"method": "lora", "targets": "q_proj,v_proj", "rank": 2},
        "data": {"train_file": "builtin:mawps-quickstart", "limit": 8, "template": "plain", "cutoff_len": 64},
        "train": {"output_dir": str(out), "max_steps": 1, "per_device_train_batch_size": 4, "save_steps": 100},
    }))
    return out


@pytest.mark.parametrize("template, expected", [
    ("run", "{q}\n"),  # the run's plain template: the question, then a newline
    ("plain", "{q}\n"),
    # LLM-Adapters' finetune.py prompt: two spaces after "request.", and its 16-space indents
    ("alpaca", "Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.  \n\n" + " " * 16 + "### Instruction:\n" + " " * 16 + "{q}\n" + " " * 16 + "\n"
               + " " * 16 + "### Response:\n" + " " * 16),
    ("llm-adapters", "Below is an instruction that describes a task. Write a response that appropriately "
                     "completes the request. \n\n" + " " * 16 + "### Instruction:\n" + " " * 16 + "{q}\n\n"
                     + " " * 16 + "### Response:\n" + " " * 16),
])
def test_template_chooses_the_prompt(plain_run, tmp_path, monkeypatch, template, expected):
    seen = {}
    original = evaluate.generate

    def spy(model, tokenizer, prompts, *args, **kwargs):
        seen["prompts"] = prompts
        return original(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate", spy)
    result = evaluate.benchmarks(str(plain_run), "svamp", None, "fast", 2, 2, 3, tmp_path / "out", template=template)
    questions = [r["instruction"] for r in tasks.load_records(tasks.TASKS["svamp"], None, 2)]
    assert seen["prompts"] == [expected.format(q=q) for q in questions]
    assert result.summary["template"] == ("plain" if template == "run" else template)
    assert result.results[0].n == 2


def test_template_run_needs_a_model_that_records_one(llama_dir):
    one_line_error(run_cli("eval", llama_dir, "--task", "svamp", "--template", "run"),
                   "records no training template", "--template llm-adapters")
    one_line_error(run_cli("eval", llama_dir, "--task", "svamp", "--template", "jinja"),
                   "--template must be one of", "got 'jinja'")
