"""Data: the exact training prompts, tokenization and masking, and loading records from files.

The expected prompts are written out literally (not rebuilt from sara's constants), so a
whitespace change in `sara_cli/data.py` fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sara_cli.data import Tokenize, alpaca_prompt, check_records, load_records, prepare
from sara_cli.errors import SaraError
from sara_cli.recipe import DataSection

ASSETS = Path(__file__).resolve().parents[1] / "sara_cli" / "assets"

# LLM-Adapters finetune.py, generate_prompt, without an input: two spaces after the preamble.
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n"
    "\n"
    "                ### Instruction:\n"
    "                Add 2 and 3.\n"
    "                \n"
    "                ### Response:\n"
    "                The answer is 5"
)
# ... and with an input: the longer preamble (one space after it upstream) and an Input block.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                Add the numbers.\n"
    "                \n"
    "                ### Input:\n"
    "                2 and 3\n"
    "                \n"
    "                ### Response:\n"
    "                The answer is 5"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


def records(n: int) -> list[dict]:
    return [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"The answer is {2 * i}"}
            for i in range(n)]


# -- templates -------------------------------------------------------------------------------------

def test_alpaca_prompt_without_input_byte_for_byte():
    assert alpaca_prompt("Add 2 and 3.", "", "The answer is 5") == ALPACA_NO_INPUT
    # The prompt alone is everything up to the response text, trailing 16 spaces included.
    assert alpaca_prompt("Add 2 and 3.") == ALPACA_NO_INPUT[: -len("The answer is 5")]
    assert ALPACA_NO_INPUT.encode().count(b"request.  \n\n") == 1


def test_alpaca_prompt_with_input_byte_for_byte():
    assert alpaca_prompt("Add the numbers.", "2 and 3", "The answer is 5") == ALPACA_WITH_INPUT
    assert alpaca_prompt("Add the numbers.", "2 and 3") == ALPACA_WITH_INPUT[: -len("The answer is 5")]


def test_docs_show_the_same_prompt():
    docs = (ASSETS.parents[1] / "docs" / "recipes.md").read_text()
    block = next(b.split("\n", 1)[1] for b in docs.split("```")[1::2] if "PROMPT_NO_INPUT = (" in b)
    prompts: dict = {}
    exec(block, prompts)
    no_input = prompts["PROMPT_NO_INPUT"].format(instruction="Add 2 and 3.", output="The answer is 5")
    assert no_input == ALPACA_NO_INPUT
    assert prompts["PROMPT_WITH_INPUT"].format(instruction="Add the numbers.", input="2 and 3",
                                               output="The answer is 5") == ALPACA_WITH_INPUT


def test_tokenize_texts_for_alpaca_plain_and_chat(tokenizer):
    record = {"instruction": "Add 2 and 3.", "input": "", "output": "The answer is 5"}
    prompt, full = Tokenize(tokenizer, "alpaca", 256, True).texts(record)
    assert full == ALPACA_NO_INPUT and full.startswith(prompt) and full[len(prompt):] == "The answer is 5"

    plain = Tokenize(tokenizer, "plain", 256, True)
    assert plain.texts(record) == ("Add 2 and 3.\n", "Add 2 and 3.\nThe answer is 5")
    assert plain.texts({**record, "input": "x"}) == ("Add 2 and 3.\nx\n", "Add 2 and 3.\nx\nThe answer is 5")

    # The bundled tokenizer's chat template: <s>{role}\n{content}</s>\n per message.
    chat = Tokenize(tokenizer, "chat", 256, True)
    assert chat.texts(record) == ("<s>user\nAdd 2 and 3.</s>\n<s>assistant\n",
                                  "<s>user\nAdd 2 and 3.</s>\n<s>assistant\nThe answer is 5</s>\n")
    assert chat.texts({**record, "input": "x"})[0] == "<s>user\nAdd 2 and 3.\n\nx</s>\n<s>assistant\n"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert chat.texts({"messages": messages}) == ("<s>user\nhi</s>\n<s>assistant\n",
                                                  "<s>user\nhi</s>\n<s>assistant\nhello</s>\n")


def test_numbers_in_records_become_text(tokenizer):
    # CSV columns and JSON answers can be numbers; 0 must not vanish.
    assert Tokenize(tokenizer, "plain", 64, True).texts({"instruction": 7, "output": 0}) == ("7\n", "7\n0")


def test_chat_template_missing_is_an_error(tokenizer):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")
    bare.chat_template = None
    with pytest.raises(SaraError, match="chat template"):
        Tokenize(bare, "chat", 64, True)({"instruction": "q", "output": "a"})


# -- tokenization ----------------------------------------------------------------------------------

def test_eos_appended_when_there_is_room(tokenizer):
    record = {"instruction": "Add 2 and 3.", "output": "The answer is 5"}
    row = Tokenize(tokenizer, "alpaca", 256, True)(record)
    expected = tokenizer(ALPACA_NO_INPUT)["input_ids"] + [tokenizer.eos_token_id]
    assert row["input_ids"] == expected
    assert row["input_ids"][0] == tokenizer.bos_token_id
    assert row["attention_mask"] == [1] * len(expected)
    # Exactly one token of room: EOS still fits and fills it.
    exact = Tokenize(tokenizer, "alpaca", len(expected), True)(record)
    assert exact["input_ids"] == expected


def test_no_eos_when_truncated_at_cutoff(tokenizer):
    record = {"instruction": "Add 2 and 3.", "output": "The answer is 5"}
    full = tokenizer(ALPACA_NO_INPUT)["input_ids"]
    for cutoff in (16, len(full)):  # cut mid-text, and cut exactly at the text's end
        row = Tokenize(tokenizer, "alpaca", cutoff, True)(record)
        assert row["input_ids"] == full[:cutoff]
        assert row["input_ids"][-1] != tokenizer.eos_token_id
        assert len(row["labels"]) == cutoff


def test_labels_mask_exactly_the_prompt(tokenizer):
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The answer is 5"}
    prompt_len = len(tokenizer(alpaca_prompt("Add the numbers.", "2 and 3"))["input_ids"])
    masked = Tokenize(tokenizer, "alpaca", 256, False)(record)
    ids, labels = masked["input_ids"], masked["labels"]
    assert 0 < prompt_len < len(ids)
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert -100 not in labels[prompt_len:]

    unmasked = Tokenize(tokenizer, "alpaca", 256, True)(record)
    assert unmasked["labels"] == unmasked["input_ids"] == ids


def test_prompt_longer_than_cutoff_masks_everything(tokenizer):
    row = Tokenize(tokenizer, "alpaca", 8, False)({"instruction": "Add 2 and 3.", "output": "5"})
    assert len(row["input_ids"]) == 8 and row["labels"] == [-100] * 8


def test_chat_tokens_and_mask(tokenizer):
    record = {"instruction": "Add 2 and 3.", "output": "5"}
    row = Tokenize(tokenizer, "chat", 256, False)(record)
    prompt = "<s>user\nAdd 2 and 3.</s>\n<s>assistant\n"
    full = tokenizer(prompt + "5</s>\n", add_special_tokens=False)["input_ids"]
    # The template writes its own <s>, and its own </s> (EOS) ending the turn: nothing is added.
    assert row["input_ids"] == full
    assert row["input_ids"][:2] != [tokenizer.bos_token_id] * 2
    prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert row["labels"] == [-100] * prompt_len + row["input_ids"][prompt_len:]


# -- files -----------------------------------------------------------------------------------------

@pytest.fixture
def data_files(tmp_path):
    """The same three records as .json, .jsonl, .csv and .parquet."""
    import pandas as pd

    rows = records(3)
    frame = pd.DataFrame(rows)
    paths = {"json": write_json(tmp_path / "r.json", rows), "jsonl": tmp_path / "r.jsonl",
             "csv": tmp_path / "r.csv", "parquet": tmp_path / "r.parquet"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    frame.to_csv(paths["csv"], index=False)
    frame.to_parquet(paths["parquet"], index=False)
    return rows, paths


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet"])
def test_load_records_from_each_format(data_files, kind):
    rows, paths = data_files
    dataset = load_records(str(paths[kind]))
    got = [{k: r[k] if r[k] is not None else "" for k in ("instruction", "input", "output")} for r in dataset]
    assert got == rows  # CSV reads an empty input as missing; the template treats both alike


def test_load_records_builtin():
    dataset = load_records("builtin:mawps-quickstart", limit=5)
    assert len(dataset) == 5 and {"instruction", "output"} <= set(dataset.column_names)


def test_columns_rename(tmp_path):
    path = tmp_path / "e2e.csv"
    path.write_text('mr,ref\n"name[Blue Spice], area[city centre]",Blue Spice is in the city centre.\n'
                    '"name[Alimentum], food[Italian]",Alimentum serves Italian food.\n')
    dataset = load_records(str(path), columns={"instruction": "mr", "output": "ref"})
    assert set(dataset.column_names) == {"instruction", "output"}
    assert dataset[1] == {"instruction": "name[Alimentum], food[Italian]",
                          "output": "Alimentum serves Italian food."}
    with pytest.raises(SaraError, match=r"maps input to 'notes'.*its columns are: mr, ref"):
        load_records(str(path), columns={"input": "notes"})


def test_columns_replace_an_existing_field(tmp_path):
    path = write_json(tmp_path / "r.json", [{"instruction": "q", "output": "old", "response": "new"}])
    dataset = load_records(str(path), columns={"output": "response"})
    assert dataset[0] == {"instruction": "q", "output": "new"}


def test_record_missing_output_names_file_and_index(tmp_path, tokenizer):
    rows = records(4)
    del rows[2]["output"]
    path = write_json(tmp_path / "broken.json", rows)
    with pytest.raises(SaraError) as info:
        prepare(DataSection(train_file=str(path)), tokenizer, seed=0)
    message = str(info.value)
    assert str(path) in message and "record 2" in message and "'output'" in message

    no_field = write_json(tmp_path / "no_output.json", [{"instruction": "q"}])
    with pytest.raises(SaraError, match=r"no_output\.json: record 0 has no 'output' field"):
        check_records(load_records(str(no_field)), "alpaca", str(no_field))


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(SaraError, match=r"nope\.json does not exist"):
        load_records(str(tmp_path / "nope.json"))
    text = tmp_path / "records.txt"
    text.write_text("hello")
    with pytest.raises(SaraError, match="unsupported extension"):
        load_records(str(text))


def test_empty_files_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SaraError, match=r"empty\.jsonl is empty"):
        load_records(str(empty))
    no_records = write_json(tmp_path / "none.json", [])
    with pytest.raises(SaraError, match=r"none\.json"):
        load_records(str(no_records))


# -- prepare: splits and limits --------------------------------------------------------------------

@pytest.mark.parametrize("size, sizes", [(3, (7, 3)), (0.2, (8, 2)), (0, (10, None))])
def test_val_set_size_split(tmp_path, tokenizer, size, sizes):
    path = write_json(tmp_path / "ten.json", records(10))
    train, evaluation = prepare(DataSection(train_file=str(path), val_set_size=size), tokenizer, seed=42)
    assert (len(train), None if evaluation is None else len(evaluation)) == sizes
    assert set(train.column_names) == {"input_ids", "attention_mask", "labels"}


def test_val_set_size_too_large(tmp_path, tokenizer):
    path = write_json(tmp_path / "ten.json", records(10))
    for size in (10, 1.0):
        with pytest.raises(SaraError, match="leaves no training records"):
            prepare(DataSection(train_file=str(path), val_set_size=size), tokenizer, seed=42)


def test_limit_keeps_the_first_records(tmp_path, tokenizer):
    rows = records(10)
    path = write_json(tmp_path / "ten.json", rows)
    dataset = load_records(str(path), limit=4)
    assert [r["output"] for r in dataset] == [r["output"] for r in rows[:4]]
    assert len(load_records(str(path), limit=50)) == 10
    train, _ = prepare(DataSection(train_file=str(path), limit=4), tokenizer, seed=0)
    first = Tokenize(tokenizer, "alpaca", 256, True)(rows[0])
    assert len(train) == 4 and train[0]["input_ids"] == first["input_ids"]


def test_eval_file_uses_the_same_columns(tmp_path, tokenizer):
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(3)]
    train_path = write_json(tmp_path / "train.json", rows)
    eval_path = write_json(tmp_path / "eval.json", rows[:2])
    section = DataSection(train_file=str(train_path), eval_file=str(eval_path), template="plain",
                          columns={"instruction": "q", "output": "a"}, train_on_inputs=False)
    train, evaluation = prepare(section, tokenizer, seed=0)
    assert (len(train), len(evaluation)) == (3, 2)
    prompt_len = len(tokenizer("question 0\n")["input_ids"])
    assert train[0]["labels"][:prompt_len] == [-100] * prompt_len
