"""Tests for sara_cli/tasks.py: the LLM-Adapters prompt, extraction quirks, loading and scoring.

Expected values are written out by hand from the LLM-Adapters source (evaluate.py,
commomsense_evaluate.py), never computed with the code under test.
"""

import gzip
import json
from pathlib import Path

import pytest

from sara_cli.errors import SaraError
from sara_cli.evaluation.tasks import (
    TASKS,
    eval_prompt,
    extract_prediction,
    extract_response,
    is_correct,
    load_records,
    resolve_tasks,
    score_predictions,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent")
BUNDLED = Path(__file__).resolve().parents[1] / "sara_cli" / "assets" / "eval"


def task(name):
    return TASKS[name]


# --- the prompt ---------------------------------------------------------------------------


def test_eval_prompt_is_byte_identical_to_llm_adapters():
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
        "\n"
        "                ### Instruction:\n"
        "                What is 2 + 3?\n"
        "\n"
        "                ### Response:\n"
        "                "
    )
    assert eval_prompt("What is 2 + 3?") == expected


def test_extract_response_takes_text_between_first_and_second_marker():
    decoded = eval_prompt("Q") + "The answer is 5.</s>"
    assert extract_response(decoded) == "The answer is 5.</s>"
    # A second marker written by the model ends the response ([1] of the split).
    assert extract_response(eval_prompt("Q") + " 7\n### Response: 9") == "7"


def test_extract_response_without_marker_is_an_error():
    with pytest.raises(SaraError, match="### Response:"):
        extract_response("no marker here")


# --- numeric extraction -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("The total is 1,234.5 dollars", 1234.5),
        ("1,000", 1000.0),
        ("It drops to -7 degrees", -7.0),
        ("Half is 0.25 and then 3.75", 3.75),
        ("3-4", -4.0),  # kept quirk: the minus of a range is read as a sign
        ("1/2", 2.0),  # kept quirk: fractions give their denominator
        ("First 12, then 5. So 8", 8.0),  # the LAST number wins, not the first
        ("The answer is 5.", 5.0),  # "5." matches and parses
    ],
)
def test_numeric_extraction(response, expected):
    assert extract_prediction(task("gsm8k"), response) == expected


def test_numeric_no_number_is_wrong():
    prediction = extract_prediction(task("svamp"), "I do not know.")
    assert prediction is None
    assert not is_correct(task("svamp"), prediction, "0.0")


def test_numeric_tolerance_is_absolute_0_001():
    assert is_correct(task("gsm8k"), 576.0009, "576.0")
    assert not is_correct(task("gsm8k"), 576.002, "576.0")
    assert is_correct(task("mawps"), -15.0, "-15.0")


# --- letter and label extraction ----------------------------------------------------------


def test_aqua_takes_first_capital_a_to_e_anywhere():
    assert extract_prediction(task("aqua"), "A train travels 60 km; the answer is (C)") == "A"
    assert extract_prediction(task("aqua"), "the answer is (d)") is None  # case-sensitive
    assert extract_prediction(task("aqua"), "So the answer is E.") == "E"
    assert is_correct(task("aqua"), "C", "C")
    assert not is_correct(task("aqua"), "A", "C")


@pytest.mark.parametrize(
    ("name", "response", "expected"),
    [
        ("boolq", "false, not true", "false"),
        ("boolq", "True", None),  # matching is on the raw (not lowercased) response
        ("piqa", "solution2 is better than solution1", "solution2"),
        ("social_i_qa", "the correct answer is answer3 (not answer1)", "answer3"),
        ("arc-easy", "answer5", "answer5"),
        ("openbookqa", "answer4 or answer2", "answer4"),
        ("hellaswag", "ending3, then ending1", "ending3"),
        ("winogrande", "option1 option2", "option1"),
    ],
)
def test_commonsense_first_candidate_wins(name, response, expected):
    assert extract_prediction(task(name), response) == expected


def test_commonsense_comparison_is_exact():
    assert is_correct(task("piqa"), "solution1", "solution1")
    assert not is_correct(task("piqa"), "solution2", "solution1")
    assert not is_correct(task("boolq"), None, "true")


# --- resolving tasks ----------------------------------------------------------------------


def test_resolve_names_and_folders_case_insensitively():
    tasks = resolve_tasks("SVAMP, arc-easy,ARC-Challenge,gsm8k,GSM8K")
    assert [t.name for t in tasks] == ["svamp", "arc-easy", "arc-challenge", "gsm8k"]
    assert tasks[0].family == "math" and tasks[0].max_new_tokens == 256
    assert tasks[1].folder == "ARC-Easy" and tasks[1].max_new_tokens == 32


def test_unknown_task_lists_valid_names():
    with pytest.raises(SaraError, match="gsm8k") as info:
        resolve_tasks("gsm9k")
    assert "'gsm9k'" in str(info.value) and "winogrande" in str(info.value)


def test_missing_task_file_is_an_error(tmp_path):
    with pytest.raises(SaraError, match="does not exist"):
        resolve_tasks(str(tmp_path / "nope.json"))


def test_adhoc_files(tmp_path):
    numbers = tmp_path / "mine.jsonl"
    numbers.write_text('{"instruction": "1+1?", "answer": "2"}\n{"instruction": "2+2?", "answer": 4}\n')
    (adhoc,) = resolve_tasks(str(numbers))
    assert (adhoc.name, adhoc.answer_kind, adhoc.source) == ("mine", "numeric", numbers)
    assert [r["answer"] for r in load_records(adhoc, None, None)] == ["2", 4]

    piqa = tmp_path / "PIQA.json"
    piqa.write_text(json.dumps([{"instruction": "q", "answer": "solution1"}]))
    (named,) = resolve_tasks(str(piqa))
    assert (named.name, named.answer_kind, named.pattern) == ("PIQA", "label", task("piqa").pattern)

    (tmp_path / "AQuA").mkdir()
    in_folder = tmp_path / "AQuA" / "test.json"
    in_folder.write_text(json.dumps([{"instruction": "q", "answer": "B"}]))
    assert resolve_tasks(str(in_folder))[0].answer_kind == "letter"

    words = tmp_path / "words.json"
    words.write_text(json.dumps([{"instruction": "q", "answer": "yes"}]))
    with pytest.raises(SaraError, match="rename it after the task"):
        resolve_tasks(str(words))


# --- loading records ----------------------------------------------------------------------


def test_load_records_from_data_dir(tmp_path):
    (tmp_path / "SVAMP").mkdir()
    rows = [{"instruction": f"q{i}", "answer": f"{i}.0"} for i in range(5)]
    (tmp_path / "SVAMP" / "test.json").write_text(json.dumps(rows))
    assert load_records(task("svamp"), tmp_path, 2) == rows[:2]
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "test.jsonl").write_text('{"instruction": "q", "answer": "true"}\n')
    assert load_records(task("boolq"), tmp_path, None) == [{"instruction": "q", "answer": "true"}]


def test_load_records_errors(tmp_path):
    with pytest.raises(SaraError, match="--data-dir") as info:
        load_records(task("gsm8k"), tmp_path, None)
    assert str(tmp_path / "gsm8k" / "test.json") in str(info.value)
    with pytest.raises(SaraError, match="--data-dir"):
        load_records(task("hellaswag"), None, None)
    (tmp_path / "gsm8k").mkdir()
    path = tmp_path / "gsm8k" / "test.json"
    path.write_text(json.dumps([{"instruction": "q", "answer": "1"}, {"instruction": "q"}]))
    with pytest.raises(SaraError, match=r"record 1 lacks 'answer'") as info:
        load_records(task("gsm8k"), tmp_path, None)
    assert str(path) in str(info.value)
    with pytest.raises(SaraError, match="--limit"):
        load_records(task("gsm8k"), tmp_path, 0)


def test_bundled_records_load():
    records = load_records(task("gsm8k"), None, 3)
    assert len(records) == 3 and set(records[0]) >= {"instruction", "answer"}


@needs_shared
def test_bundled_copies_match_shared_bytes():
    shared = sorted(SHARED_DATA.glob("*/test/*/test.json"))
    assert len(shared) == 14
    for source in shared:
        bundled = BUNDLED / source.parent.name / "test.json.gz"
        assert gzip.decompress(bundled.read_bytes()) == source.read_bytes(), source


# --- scoring predictions files ------------------------------------------------------------


def test_score_predictions_json_and_jsonl(tmp_path):
    rows = [
        {"output": "So the total is 1,234.5", "answer": "1234.5"},
        {"output": "No idea", "answer": "3.0"},
        {"output": "3-4", "answer": "-4.0"},
        {"output": "The answer is 7", "answer": "8.0"},
    ]
    as_json = tmp_path / "preds.json"
    as_json.write_text(json.dumps(rows))
    as_jsonl = tmp_path / "preds.jsonl"
    as_jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for path in (as_json, as_jsonl):
        result = score_predictions(path, task("gsm8k"))
        assert (result["task"], result["n"], result["correct"], result["accuracy"]) == ("gsm8k", 4, 2, 0.5)
        assert [r["prediction"] for r in result["records"]] == [1234.5, None, -4.0, 7.0]
        assert [r["correct"] for r in result["records"]] == [True, False, True, False]


def test_score_predictions_errors(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(SaraError, match="no records"):
        score_predictions(empty, task("gsm8k"))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n")
    with pytest.raises(SaraError, match="no records"):
        score_predictions(blank, task("gsm8k"))
    no_output = tmp_path / "no_output.jsonl"
    no_output.write_text('{"output": "1", "answer": "1"}\n{"answer": "2"}\n')
    with pytest.raises(SaraError, match="record 1 lacks 'output'"):
        score_predictions(no_output, task("gsm8k"))
    no_answer = tmp_path / "no_answer.json"
    no_answer.write_text(json.dumps([{"output": "1"}]))
    with pytest.raises(SaraError, match="record 0 lacks 'answer'"):
        score_predictions(no_answer, task("gsm8k"))
    with pytest.raises(SaraError, match="does not exist"):
        score_predictions(tmp_path / "missing.json", task("gsm8k"))


def _write_predictions(path, records, template):
    path.write_text(json.dumps([{"output": template(r["answer"]), "answer": r["answer"]} for r in records]))
    return path


@needs_shared
@pytest.mark.parametrize("folder", ["gsm8k", "SVAMP", "mawps", "AddSub", "AQuA"])
def test_scoring_real_math_data(tmp_path, folder):
    records = json.loads((SHARED_DATA / "math" / "test" / folder / "test.json").read_text())
    (math_task,) = resolve_tasks(folder)
    right = _write_predictions(tmp_path / "right.json", records, lambda a: f"The answer is {a}")
    assert score_predictions(right, math_task)["accuracy"] == 1.0
    if math_task.answer_kind == "numeric":
        wrong = _write_predictions(tmp_path / "wrong.json", records, lambda a: f"The answer is {float(a) + 1}")
        assert score_predictions(wrong, math_task)["accuracy"] == 0.0


@needs_shared
@pytest.mark.parametrize("folder", ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "openbookqa"])
def test_scoring_real_commonsense_data(tmp_path, folder):
    records = json.loads((SHARED_DATA / "commonsense" / "test" / folder / "test.json").read_text())
    right = _write_predictions(tmp_path / "right.json", records, lambda a: f"the correct answer is {a}")
    assert score_predictions(right, resolve_tasks(folder)[0])["accuracy"] == 1.0


def test_score_accepts_the_response_field_that_sara_eval_writes(tmp_path):
    from sara_cli.evaluation.tasks import resolve_tasks, score_predictions

    path = tmp_path / "svamp.jsonl"
    rows = [{"instruction": "q", "response": "so 3 + 4 = 7", "prediction": 7.0, "answer": "7", "correct": True},
            {"instruction": "q", "response": "it is 8", "prediction": 8.0, "answer": "9", "correct": False}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task,) = resolve_tasks("svamp")
    result = score_predictions(path, task)
    assert (result["n"], result["correct"]) == (2, 1)
