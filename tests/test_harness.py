"""`sara eval --harness`: lm-evaluation-harness on the model as sara loads it, offline.

The harness scores the routed Mo-SARA run through HFLM(pretrained=<model object>). A generating
sara_<task> must reproduce `sara eval --task` exactly (same generations, same extraction); a
sara_<task>_mc task is checked against log-likelihoods computed here with the model directly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import one_line_error, run_cli
from sara_cli.evaluation import tasks

lm_eval = pytest.importorskip("lm_eval")  # a dev dependency: CI installs it

pytestmark = pytest.mark.usefixtures("one_thread")
LIMIT = 6
TOKENS = 12


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def harness_files(folder: Path, task: str) -> tuple[dict, list[dict]]:
    (results,) = folder.glob("results_*.json")
    (samples,) = folder.glob(f"samples_{task}_*.jsonl")
    return json.loads(results.read_text()), [json.loads(line) for line in samples.read_text().splitlines()]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shipped_task_files_are_the_registry():
    from sara_cli.evaluation import harness

    shipped = {p.stem: p.read_text() for p in harness.TASKS_DIR.glob("*.yaml")}
    assert set(shipped) == set(harness.HARNESS_TASKS)
    for name, (task, multiple_choice) in harness.HARNESS_TASKS.items():
        assert shipped[name] == harness.task_yaml(task, multiple_choice), name
    # Named so they cannot be taken for the harness's own tasks.
    assert all(name.startswith("sara_") for name in shipped)
    assert {"sara_svamp", "sara_arc_easy", "sara_boolq_mc"} <= set(shipped)
    assert "sara_svamp_mc" not in shipped  # numeric answers have no labels to score


def test_generating_task_runs_offline_and_equals_sara_scoring(trained_mosara_run, tmp_path):
    """Beside sara's own results in the run, the harness gets the same generations and the same
    accuracy. The test set is rewritten so that about half of the answers are what the model says,
    so the accuracy is neither 0 nor 1."""
    common = ["--limit", LIMIT, "--max-new-tokens", TOKENS, "--batch-size", 1]
    first = ok(run_cli("eval", trained_mosara_run, "--task", "svamp", *common))
    own = trained_mosara_run / "eval" / "fast"
    assert f"wrote {own}/summary.json" in first.stdout
    generated = rows(own / "svamp.jsonl")
    records = [{"instruction": r["instruction"], "answer": r["answer"]} for r in generated]
    hits = [i for i, r in enumerate(generated) if r["prediction"] is not None][::2]
    assert hits, [r["response"] for r in generated]  # the trained run writes numbers
    for i in hits:
        records[i]["answer"] = str(generated[i]["prediction"])
    data_dir = tmp_path / "data"
    (data_dir / "SVAMP").mkdir(parents=True)
    (data_dir / "SVAMP" / "test.json").write_text(json.dumps(records))

    ok(run_cli("eval", trained_mosara_run, "--task", "svamp", "--data-dir", data_dir, "--out", tmp_path / "sara",
               *common))
    sara = rows(tmp_path / "sara" / "svamp.jsonl")
    accuracy = json.loads((tmp_path / "sara" / "summary.json").read_text())["tasks"]["svamp"]["accuracy"]
    assert 0 < accuracy < 1

    result = ok(run_cli("eval", trained_mosara_run, "--harness", "sara_svamp", "--data-dir", data_dir, *common))
    folder = trained_mosara_run / "eval" / "harness"
    assert f"wrote {folder}/results_" in result.stdout and "sara_svamp" in result.stdout
    results, samples = harness_files(folder, "sara_svamp")
    assert results["results"]["sara_svamp"]["acc,none"] == pytest.approx(accuracy)
    assert results["n-samples"]["sara_svamp"]["effective"] == LIMIT
    assert "sara adapter" in results["config"]["model_args"]["pretrained"]
    assert [s["filtered_resps"][0].strip() for s in samples] == [r["response"] for r in sara]
    assert [s["acc"] for s in samples] == [float(r["correct"]) for r in sara]
    assert (own / "summary.json").is_file()  # sara's own results are still there, beside


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context), summed over the continuation's tokens, in float64."""
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context.rstrip())["input_ids"])  # trailing spaces go with the answer
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(sum(logprobs[t - 1, whole[t]] for t in range(start, len(whole))))


def test_multiple_choice_task_is_the_log_likelihood_argmax(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "harness"
    ok(run_cli("eval", llama_dir, "--harness", "sara_boolq_mc", "--limit", 3, "--out", out))
    results, samples = harness_files(out, "sara_boolq_mc")
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    correct = []
    for sample, record in zip(samples, tasks.load_records(tasks.TASKS["boolq"], None, 3)):
        prompt = tasks.eval_prompt(record["instruction"])
        scores = [reference_loglikelihood(model, tokenizer, prompt, label) for label in ("true", "false")]
        assert [float(r[0]) for r in sample["filtered_resps"]] == pytest.approx(scores, abs=1e-4)  # saved as text
        correct.append(float(["true", "false"][scores.index(max(scores))] == record["answer"]))
    assert results["results"]["sara_boolq_mc"]["acc,none"] == pytest.approx(sum(correct) / 3)


def test_harness_bad_input_is_one_line_before_the_model_loads(llama_dir, tmp_path, monkeypatch):
    one_line_error(run_cli("eval", llama_dir, "--harness", "sara_svmap"), "unknown harness task 'sara_svmap'",
                   "sara_svamp")
    one_line_error(run_cli("eval", llama_dir, "--harness", "sara_svamp", "--task", "svamp"), "--harness", "--task")
    one_line_error(run_cli("eval", llama_dir, "--harness", "sara_svamp", "--protocol", "llm-adapters"), "--protocol")
    one_line_error(run_cli("eval", llama_dir, "--harness", "sara_svamp", "--json", tmp_path / "x.json"), "--json")
    one_line_error(run_cli("eval", llama_dir, "--harness", "sara_svamp", "--harness-args", "num_fewshot"),
                   "KEY=VALUE")
    one_line_error(run_cli("eval", llama_dir, "--harness", "sara_svamp", "--harness-args", "limit=3"), "--limit")
    one_line_error(run_cli("eval", llama_dir, "--harness", "sara_svamp", "--harness-args", "bogus=1"),
                   "bogus", "simple_evaluate")
    one_line_error(run_cli("eval", llama_dir, "--harness", "sara_svamp", "--harness-args", "num_fewshot=2"),
                   "zero-shot")
    one_line_error(run_cli("eval", llama_dir, "--harness", "sara_hellaswag"), "--data-dir", "hellaswag")
    blocker = tmp_path / "a-file"
    blocker.write_text("keep")
    one_line_error(run_cli("eval", llama_dir, "--harness", "sara_svamp", "--out", blocker), "is a file")
    assert blocker.read_text() == "keep"
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    one_line_error(run_cli("eval", llama_dir, "--harness", "sara_svamp"), 'pip install "sara-cli[harness]"')
