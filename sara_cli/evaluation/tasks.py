"""Benchmark tasks for `sara eval`: names, test data, the prompt, answer extraction and scoring.

Everything here follows the LLM-Adapters evaluation protocol (Hu et al., EMNLP 2023,
arXiv:2304.01933; github.com/AGI-Edgerunners/LLM-Adapters, `evaluate.py` for math and
`commomsense_evaluate.py` for commonsense) so that our accuracies are comparable with the
numbers published with it. Its quirks are kept on purpose and listed in `docs/eval.md`:
a number is the LAST match of `-?\\d+\\.?\\d*` after deleting commas (so "3-4" reads as -4),
AQuA takes the FIRST capital A-E anywhere in the response (so "A train ..." reads as A), and
label words are matched case-sensitively on the raw response.

This module is pure Python (no torch, no transformers) so scoring a predictions file is
cheap and testable; generation lives in `evaluate.py`.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sara_cli.errors import SaraError

logger = logging.getLogger(__name__)

# LLM-Adapters calls this `miss`: a numeric prediction is right within this absolute error.
ABS_TOLERANCE = 0.001
RESPONSE_MARKER = "### Response:"
NUMBER_PATTERN = r"-?\d+\.?\d*"
LETTER_PATTERN = r"A|B|C|D|E"
_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "eval"


@dataclass(frozen=True)
class Task:
    """One benchmark and the rules used to score it.

    Attributes:
        name: lower-case registry name (`gsm8k`, `arc-easy`) or, for an ad-hoc file, its stem
            (its folder's name for a `test.json` in a folder named after a task).
        family: "math" or "commonsense".
        folder: folder name in the LLM-Adapters `dataset/` tree (`gsm8k`, `ARC-Easy`).
        answer_kind: "numeric" (last number), "letter" (AQuA, first A-E) or "label"
            (commonsense, first match of `pattern`).
        pattern: the regular expression applied to the response.
        max_new_tokens: generation budget LLM-Adapters uses (256 math, 32 commonsense).
        bundled: whether a copy of the test set ships in `sara_cli/assets/eval`.
        source: for an ad-hoc task, the JSON/JSONL file holding its records; else None.
    """

    name: str
    family: str
    folder: str
    answer_kind: str
    pattern: str
    max_new_tokens: int
    bundled: bool = True
    source: Path | None = None


def _math(name: str, folder: str) -> Task:
    if name == "aqua":
        return Task(name, "math", folder, "letter", LETTER_PATTERN, 256)
    return Task(name, "math", folder, "numeric", NUMBER_PATTERN, 256)


def _commonsense(name: str, folder: str, labels: str, bundled: bool = True) -> Task:
    return Task(name, "commonsense", folder, "label", labels, 32, bundled)


_ANSWERS_1_TO_5 = r"answer1|answer2|answer3|answer4|answer5"
TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        _math("addsub", "AddSub"),
        _math("aqua", "AQuA"),
        _math("gsm8k", "gsm8k"),
        _math("multiarith", "MultiArith"),
        _math("singleeq", "SingleEq"),
        _math("svamp", "SVAMP"),
        _math("mawps", "mawps"),
        _commonsense("boolq", "boolq", r"true|false"),
        _commonsense("piqa", "piqa", r"solution1|solution2"),
        _commonsense("social_i_qa", "social_i_qa", _ANSWERS_1_TO_5),
        # HellaSwag's test.json is not in shared/data, so nothing is bundled for it.
        _commonsense("hellaswag", "hellaswag", r"ending1|ending2|ending3|ending4", bundled=False),
        _commonsense("winogrande", "winogrande", r"option1|option2"),
        _commonsense("arc-challenge", "ARC-Challenge", _ANSWERS_1_TO_5),
        _commonsense("arc-easy", "ARC-Easy", _ANSWERS_1_TO_5),
        _commonsense("openbookqa", "openbookqa", _ANSWERS_1_TO_5),
    )
}
# Registry names and folder names both resolve; both are matched case-insensitively.
_BY_KEY: dict[str, Task] = {
    **{task.folder.lower(): task for task in TASKS.values()},
    **TASKS,
}


def _valid_names() -> str:
    return ", ".join(TASKS)


def resolve_tasks(spec: str) -> list[Task]:
    """Turn a `--task` value into tasks.

    Args:
        spec: comma-separated items. Each is a task name or LLM-Adapters folder name
            (case-insensitive: "svamp", "SVAMP", "ARC-Easy"), or the path of an existing
            .json/.jsonl file of records, which becomes an ad-hoc task (see `_adhoc_task`).

    Returns:
        The tasks in the order given, without duplicates.

    Raises:
        SaraError: an empty spec, an unknown name, a missing file, or an ad-hoc file whose
            scoring rules cannot be inferred.
    """
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise SaraError(f"--task is empty (received {spec!r}); give one or more of: {_valid_names()}.")
    tasks: list[Task] = []
    for item in items:
        task = _BY_KEY.get(item.lower())
        if task is None:
            task = _adhoc_task(item)
        if task not in tasks:
            tasks.append(task)
    return tasks


def _adhoc_task(item: str) -> Task:
    """Build a task for a records file, borrowing the rules of the task it is named after.

    The file stem is matched first ("gsm8k.jsonl"); a file called test.json(l) is matched by
    its folder instead ("data/SVAMP/test.json"), which is the LLM-Adapters layout. With no
    match, answers that all parse as numbers give a numeric math task.
    """
    path = Path(item)
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise SaraError(
            f"Unknown task {item!r}; valid names are: {_valid_names()} "
            "(or the path of a .json/.jsonl file of records)."
        )
    if not path.is_file():
        raise SaraError(f"Task file {path} does not exist; pass the path of an existing .json or .jsonl file.")
    name = path.stem
    known = _BY_KEY.get(name.lower())
    if known is None and name.lower() == "test":
        folder = path.resolve().parent.name
        if folder.lower() in _BY_KEY:
            name, known = folder, _BY_KEY[folder.lower()]
    records = _read_records(path)
    if not records:
        raise SaraError(f"Task file {path} has no records; each record needs 'instruction' and 'answer'.")
    _check_fields(records, ("instruction", "answer"), path)
    if known is not None:
        rules = known
    elif all(_parses_as_float(record["answer"]) for record in records):
        rules = _math(name, name)
    else:
        raise SaraError(
            f"Cannot tell how to score {path}: its answers are not all numbers and its name "
            f"{name!r} is not a task; rename it after the task it follows (e.g. piqa.json). "
            f"Valid names: {_valid_names()}."
        )
    return Task(name, rules.family, name, rules.answer_kind, rules.pattern, rules.max_new_tokens, True, path)


def eval_prompt(instruction: str) -> str:
    """The LLM-Adapters evaluation prompt (`generate_prompt` with no input), byte for byte.

    The odd whitespace (a space after "request.", 16-space indents and 16 trailing spaces)
    comes from an indented triple-quoted f-string in LLM-Adapters and is kept, because
    changing the prompt changes what the model generates.
    """
    indent = " " * 16
    return (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request. \n\n"
        f"{indent}### Instruction:\n{indent}{instruction}\n\n"
        f"{indent}### Response:\n{indent}"
    )


def extract_response(decoded: str) -> str:
    """Return the model's response from the decoded prompt + generation.

    As in LLM-Adapters (`output.split("### Response:")[1].strip()`), this is the text between
    the first marker (the prompt's own) and a second one, if the model wrote one.

    Raises:
        SaraError: the decoded text has no "### Response:" marker (the prompt was cut).
    """
    parts = decoded.split(RESPONSE_MARKER)
    if len(parts) < 2:
        raise SaraError(
            f"Decoded text has no {RESPONSE_MARKER!r} marker (received {decoded[:60]!r}...); "
            "decode prompt and generation together, and make sure the prompt is not truncated."
        )
    return parts[1].strip()


def extract_prediction(task: Task, response: str) -> str | float | None:
    """Read the model's answer from its response with the LLM-Adapters rules.

    Args:
        task: decides the rule (see `Task.answer_kind`).
        response: the text after "### Response:" (see `extract_response`).

    Returns:
        numeric: the last number after deleting commas, as a float; letter/label: the first
        match of the task's pattern (case-sensitive); None when nothing matches (LLM-Adapters
        uses inf or "" there, which is never correct either).
    """
    if task.answer_kind == "numeric":
        numbers = re.findall(task.pattern, response.replace(",", ""))
        return float(numbers[-1]) if numbers else None
    match = re.search(task.pattern, response.strip())
    return match.group(0) if match else None


def is_correct(task: Task, prediction: str | float | None, answer: object) -> bool:
    """Whether a prediction from `extract_prediction` matches the gold answer.

    Numeric tasks compare `abs(prediction - float(answer)) <= 0.001`; the others compare
    strings exactly, as LLM-Adapters does.

    Raises:
        SaraError: a numeric task whose answer does not parse as a number.
    """
    if prediction is None:
        return False
    if task.answer_kind == "numeric":
        if not _parses_as_float(answer):
            raise SaraError(
                f"Task {task.name} expects numeric answers but received {answer!r}; fix the data "
                "or name the task it follows."
            )
        return abs(float(prediction) - float(answer)) <= ABS_TOLERANCE
    return prediction == answer


def load_records(task: Task, data_dir: Path | None, limit: int | None) -> list[dict]:
    """Load a task's test records.

    Args:
        task: the task; an ad-hoc task always reads its own `source` file.
        data_dir: a folder holding `<Folder>/test.json` (or `test.jsonl`), the LLM-Adapters
            `dataset/` layout; None reads the copy bundled in `sara_cli/assets/eval`.
        limit: keep only the first `limit` records; None keeps all.

    Returns:
        Records with at least `instruction` and `answer`, in file order.

    Raises:
        SaraError: a missing or empty file, hellaswag without data_dir, unreadable JSON, a
            record without `instruction`/`answer`, a non-numeric answer for a numeric task, limit < 1.
    """
    if limit is not None and limit < 1:
        raise SaraError(f"--limit must be a positive integer (received {limit}); omit it to use every record.")
    path = records_path(task, data_dir)
    records = _read_records(path)
    if not records:
        raise SaraError(f"{path} has no records; each record needs 'instruction' and 'answer'.")
    _check_fields(records, ("instruction", "answer"), path)
    if task.answer_kind == "numeric":
        for index, record in enumerate(records):
            if not _parses_as_float(record["answer"]):
                raise SaraError(
                    f"{path} record {index}: answer {record['answer']!r} is not a number, but task "
                    f"{task.name} is scored numerically; fix the record or pick the right task."
                )
    logger.debug("Loaded %d records for %s from %s", len(records), task.name, path)
    return records if limit is None else records[:limit]


def records_path(task: Task, data_dir: Path | None) -> Path:
    """The file `load_records` reads for `task` (see there).

    Raises:
        SaraError: no such file.
    """
    if task.source is not None:
        return task.source
    if data_dir is None:
        if not task.bundled:
            raise SaraError(
                f"Task {task.name} has no bundled test set; pass --data-dir with a folder "
                f"containing {task.folder}/test.json (LLM-Adapters dataset/ layout)."
            )
        path = _ASSETS / task.folder / "test.json.gz"
        if not path.is_file():
            raise SaraError(f"Bundled test set {path} is missing; reinstall sara-cli or pass --data-dir.")
        return path
    folder = Path(data_dir) / task.folder
    for name in ("test.json", "test.jsonl"):
        if (folder / name).is_file():
            return folder / name
    raise SaraError(
        f"No test set for {task.name}: neither {folder / 'test.json'} nor {folder / 'test.jsonl'} "
        f"exists; pass --data-dir pointing at the folder that contains {task.folder}/."
    )


def score_outputs(task: Task, outputs: Sequence[str], answers: Sequence[object]) -> dict:
    """Score model responses against gold answers.

    Args:
        task: decides extraction and comparison.
        outputs: responses (text after "### Response:"), one per record.
        answers: gold answers, aligned with `outputs`.

    Returns:
        {"task", "n", "correct", "accuracy", "records"}; each record is
        {"index", "answer", "prediction", "correct"}. Accuracy is 0.0 when n is 0.
    """
    records = []
    for index, (output, answer) in enumerate(zip(outputs, answers, strict=True)):
        prediction = extract_prediction(task, output)
        correct = is_correct(task, prediction, answer)
        records.append({"index": index, "answer": answer, "prediction": prediction, "correct": correct})
    correct = sum(record["correct"] for record in records)
    n = len(records)
    return {"task": task.name, "n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "records": records}


def score_predictions(path: Path, task: Task) -> dict:
    """Score a saved predictions file (`sara eval --score`).

    Args:
        path: a JSON list or JSONL file of records, each with `output` or `response` (the model's
            response) and `answer`.
        task: decides extraction and comparison.

    Returns:
        See `score_outputs`.

    Raises:
        SaraError: the file is missing, unreadable or empty, or a record lacks `output`/`answer`.
    """
    path = Path(path)
    if not path.is_file():
        raise SaraError(f"Predictions file {path} does not exist; pass the file written by `sara eval`.")
    records = _read_records(path)
    if not records:
        raise SaraError(f"Predictions file {path} has no records; it needs objects with 'output' and 'answer'.")
    # Files written by `sara eval` call the model's text `response`; other tools say `output`.
    field = "output" if "output" in records[0] or "response" not in records[0] else "response"
    _check_fields(records, (field, "answer"), path)
    for index, record in enumerate(records):
        if not isinstance(record[field], str):
            raise SaraError(
                f"{path} record {index}: '{field}' must be a string (received {type(record[field]).__name__}); "
                "store the model's response text."
            )
    return score_outputs(task, [r[field] for r in records], [r["answer"] for r in records])


def _read_records(path: Path) -> list:
    """Read a JSON list, a JSONL file, or a gzip of either (by suffix)."""
    raw = path.read_bytes()
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        raw = gzip.decompress(raw)
        suffixes = suffixes[:-1]
    text = raw.decode("utf-8")
    if suffixes and suffixes[-1] == ".jsonl":
        return _parse_lines(text, path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        # A .json file that is really JSONL ("Extra data" after the first object) is common.
        try:
            return _parse_lines(text, path)
        except SaraError:
            raise SaraError(f"{path} is not valid JSON ({error}); fix the file.") from None
    if not isinstance(records, list):
        raise SaraError(
            f"{path} holds a JSON {type(records).__name__}, not a list of records; "
            "use a JSON list or one JSON object per line (.jsonl)."
        )
    return records


def _parse_lines(text: str, path: Path) -> list:
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise SaraError(f"{path} line {line_number} is not valid JSON ({error}); fix the file.") from None
    return records


def _check_fields(records: list, fields: tuple[str, ...], path: Path) -> None:
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise SaraError(
                f"{path} record {index} is a {type(record).__name__}, not an object; "
                f"each record needs the fields {', '.join(fields)}."
            )
        missing = [field for field in fields if field not in record]
        if missing:
            raise SaraError(
                f"{path} record {index} lacks {', '.join(repr(f) for f in missing)}; "
                f"each record needs the fields {', '.join(fields)}."
            )


def _parses_as_float(value: object) -> bool:
    # bool is an int subclass; True scoring as 1.0 would hide a broken file.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True
