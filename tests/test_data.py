"""Data: the exact training prompts, tokenization and masking, and loading records from files.

The expected prompts are written out literally (not rebuilt from sara's constants), so a
whitespace change in `sara_cli/data.py` fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import one_line_error
from sara_cli.data.dataset import Tokenize, alpaca_prompt, check_records, load_records, plain_prompt, prepare
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

def split_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """The prompt's ids (BOS included), then the answer's, each tokenized on its own."""
    return tokenizer(prompt)["input_ids"] + tokenizer(answer, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("joint", [False, True])
def test_eos_appended_when_there_is_room(tokenizer, joint):
    record = {"instruction": "Add 2 and 3.", "output": "The answer is 5"}
    row = Tokenize(tokenizer, "alpaca", 256, True, joint=joint)(record)
    text = (tokenizer(ALPACA_NO_INPUT)["input_ids"] if joint
            else split_ids(tokenizer, alpaca_prompt("Add 2 and 3."), "The answer is 5"))
    expected = text + [tokenizer.eos_token_id]
    assert row["input_ids"] == expected
    assert row["input_ids"][0] == tokenizer.bos_token_id
    assert row["attention_mask"] == [1] * len(expected)
    # Exactly one token of room: EOS still fits and fills it.
    exact = Tokenize(tokenizer, "alpaca", len(expected), True, joint=joint)(record)
    assert exact["input_ids"] == expected


@pytest.mark.parametrize("joint", [False, True])
def test_no_eos_when_truncated_at_cutoff(tokenizer, joint):
    record = {"instruction": "Add 2 and 3.", "output": "The answer is 5"}
    full = (tokenizer(ALPACA_NO_INPUT)["input_ids"] if joint
            else split_ids(tokenizer, alpaca_prompt("Add 2 and 3."), "The answer is 5"))
    for cutoff in (16, len(full)):  # cut mid-text, and cut exactly at the text's end
        row = Tokenize(tokenizer, "alpaca", cutoff, True, joint=joint)(record)
        assert row["input_ids"] == full[:cutoff]
        assert row["input_ids"][-1] != tokenizer.eos_token_id
        assert len(row["labels"]) == cutoff


def test_joint_tokenization_merges_the_prompts_last_token_with_the_answer(tokenizer):
    """Why split is the default: tokenized as one string, the prompt's closing newline-and-16-
    spaces token is not what the training text holds, so no training example shows the model the
    token every generation starts on."""
    prompt = alpaca_prompt("Add 2 and 3.")
    joint = tokenizer(ALPACA_NO_INPUT)["input_ids"]
    alone = tokenizer(prompt)["input_ids"]
    assert joint[:len(alone)] != alone


@pytest.mark.parametrize("template", ["alpaca", "plain", "chat"])
@pytest.mark.parametrize("record", [{"instruction": "Add 2 and 3.", "output": "The answer is 5"},
                                    {"instruction": "Add the numbers.", "input": "2 and 3", "output": " 5\n"}])
def test_training_ids_start_with_exactly_what_generation_is_fed(tokenizer, template, record):
    """For each template, the ids sara chat feeds the model for a message (and the masked prompt
    of the training example) are exactly the start of the training ids, which go on past them."""
    from sara_cli.data.prompts import render

    row = Tokenize(tokenizer, template, 256, False)(record)
    message = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    if template == "chat":  # chat feeds the rendered conversation, whose template writes BOS
        prompt = render(tokenizer, [{"role": "user", "content": message}], generation_prompt=True)
        fed = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        prompt = (alpaca_prompt if template == "alpaca" else plain_prompt)(record["instruction"], record.get("input", ""))
        fed = tokenizer(prompt)["input_ids"]
    assert row["input_ids"][:len(fed)] == fed and len(row["input_ids"]) > len(fed)
    assert row["labels"][:len(fed)] == [-100] * len(fed) and row["labels"][len(fed)] != -100


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


# -- multi-turn chat: labels on the assistant turns ------------------------------------------------

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
# A Llama-3-style template (as in Meta's tokenizer_config.json, without the date header), written
# here so that no download is needed; the generation variant marks assistant text itself.
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
LLAMA3_GENERATION = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def llama3_tokenizer():
    """The bundled tokenizer with Llama 3's header tokens, its template, and <|eot_id|> as EOS
    (as Llama-3-Instruct sets it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3
    tok.eos_token = "<|eot_id|>"
    return tok


def expected_row(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) from literal text segments, each tokenized on its own: (text, target)."""
    ids, labels = [], []
    for text, target in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if target else [-100] * len(piece)
    return ids, labels


TINY_SEGMENTS = [("<s>system\nBe brief.</s>\n<s>user\nhi</s>\n<s>assistant\n", False),
                 ("hello there</s>\n", True), ("<s>user\n2+2?</s>\n<s>assistant\n", False), ("4</s>\n", True)]
LLAMA3_SEGMENTS = [
    ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
     "<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
    ("hello there<|eot_id|>", True),
    ("<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
    ("4<|eot_id|>", True)]


@pytest.mark.parametrize("template", ["tiny", "llama3", "llama3-generation"])
def test_every_assistant_turn_is_a_target_token_by_token(tokenizer, llama3_tokenizer, template):
    tok, segments = (tokenizer, TINY_SEGMENTS) if template == "tiny" else (llama3_tokenizer, LLAMA3_SEGMENTS)
    if template == "llama3-generation":
        tok = copy_tokenizer(llama3_tokenizer, LLAMA3_GENERATION)  # transformers' assistant mask
    ids, labels = expected_row(tok, segments)
    full = tok("".join(text for text, _ in segments), add_special_tokens=False)["input_ids"]
    assert ids == full  # segment boundaries fall between tokens, so the reference is exact
    row = Tokenize(tok, "chat", 256, False, "all_assistant_turns").encode({"messages": CONVERSATION})
    assert row["input_ids"] == ids and row["labels"] == labels  # the templates end turns in EOS: no extra one
    assert row["num_targets"] == sum(label != -100 for label in labels) and not row["truncated"]

    last = Tokenize(tok, "chat", 256, False, "last_turn")({"messages": CONVERSATION})
    _, last_labels = expected_row(tok, [(text, target and i == len(segments) - 1)
                                        for i, (text, target) in enumerate(segments)])
    assert last["input_ids"] == ids and last["labels"] == last_labels
    everything = Tokenize(tok, "chat", 256, True)({"messages": CONVERSATION})
    assert everything["labels"] == everything["input_ids"] == ids


def copy_tokenizer(tokenizer, chat_template: str):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = chat_template
    return tok


def test_chat_appends_eos_only_when_the_template_writes_none(llama3_tokenizer):
    tok = copy_tokenizer(llama3_tokenizer, LLAMA3)
    tok.eos_token = "</s>"  # base Llama 3: EOS is not the end-of-turn token
    row = Tokenize(tok, "chat", 256, False)({"messages": CONVERSATION})
    ids, labels = expected_row(tok, LLAMA3_SEGMENTS)
    assert row["input_ids"] == ids + [tok.eos_token_id]
    assert row["labels"] == labels + [tok.eos_token_id]  # it continues the last turn, a target


def test_chat_truncation_keeps_the_targets_that_fit(tokenizer):
    ids, labels = expected_row(tokenizer, TINY_SEGMENTS)
    cutoff = len(expected_row(tokenizer, TINY_SEGMENTS[:1])[0]) + 2  # two tokens into the first reply
    row = Tokenize(tokenizer, "chat", cutoff, False).encode({"messages": CONVERSATION})
    assert row["input_ids"] == ids[:cutoff] and row["labels"] == labels[:cutoff]
    assert row["truncated"] and row["num_targets"] == 2


def test_template_that_rewrites_earlier_turns_needs_last_turn(tmp_path, tokenizer):
    # Like reasoning templates, this one drops an earlier reply's <think> block once a later turn
    # follows, so the turn's text is not a prefix of the whole conversation.
    template = ("{% for m in messages %}<s>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not loop.last %}"
                "{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}</s>\n{% endfor %}"
                "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    tok = copy_tokenizer(tokenizer, template)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>greet</think>hello"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]
    path = write_json(tmp_path / "think.json", [{"messages": messages}])
    section = DataSection(train_file=str(path), template="chat")
    with pytest.raises(SaraError, match=r"think\.json: record 0 cannot be split into turns.*loss_on: last_turn"):
        prepare(section, tok, seed=0)
    train, _ = prepare(DataSection(train_file=str(path), template="chat", loss_on="last_turn"), tok, seed=0)
    kept = [i for i, label in zip(train[0]["input_ids"], train[0]["labels"]) if label != -100]
    assert tok.decode(kept) == "ciao</s>\n"


def test_chat_template_refusal_names_the_record(tmp_path, tokenizer):
    tok = copy_tokenizer(tokenizer, "{% for m in messages %}{% if m['role'] == 'system' %}"
                                    "{{ raise_exception('no system messages') }}{% endif %}{{ m['content'] }}{% endfor %}")
    path = write_json(tmp_path / "sys.json", [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}])
    with pytest.raises(SaraError, match=r"sys\.json: record 1 .*refused.*no system messages"):
        prepare(DataSection(train_file=str(path), template="chat"), tok, seed=0)


# -- ShareGPT, messages, and column mapping --------------------------------------------------------

SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                              {"from": "gpt", "value": "hello there"}, {"from": "human", "value": "2+2?"},
                              {"from": "gpt", "value": "4"}]}


def test_sharegpt_and_messages_give_the_same_tokens(tmp_path, tokenizer):
    sharegpt = write_json(tmp_path / "sharegpt.json", [SHAREGPT])
    messages = write_json(tmp_path / "messages.json", [{"messages": CONVERSATION}])
    ids, labels = expected_row(tokenizer, TINY_SEGMENTS)
    for path, fmt in ((sharegpt, "sharegpt"), (sharegpt, "auto"), (messages, "messages"), (messages, "auto")):
        train, _ = prepare(DataSection(train_file=str(path), template="chat", format=fmt), tokenizer, seed=0)
        assert (train[0]["input_ids"], train[0]["labels"]) == (ids, labels), (path.name, fmt)


def test_sharegpt_tags_and_role_names(tmp_path, tokenizer):
    # LLaMA-Factory's tags: other keys and role names; and its usual extra roles (observation).
    record = {"dialog": [{"speaker": "customer", "text": "hi"}, {"speaker": "agent", "text": "hello there"}],
              "system": "Be brief."}
    path = write_json(tmp_path / "tags.json", [record])
    section = DataSection(train_file=str(path), template="chat", format="sharegpt", columns={"messages": "dialog"},
                          tags={"role_tag": "speaker", "content_tag": "text", "user_tag": "customer",
                                "assistant_tag": "agent"})
    train, _ = prepare(section, tokenizer, seed=0)
    assert train[0]["input_ids"] == expected_row(tokenizer, TINY_SEGMENTS[:2])[0]

    unknown = write_json(tmp_path / "unknown.json", [SHAREGPT, {"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(SaraError, match=r"unknown\.json: record 1 message 0 has role 'robot' under 'from'"):
        prepare(DataSection(train_file=str(unknown), template="chat"), tokenizer, seed=0)
    no_reply = write_json(tmp_path / "no_reply.json", [{"conversations": [{"from": "human", "value": "x"}]}])
    with pytest.raises(SaraError, match=r"no_reply\.json: record 0 has no assistant message"):
        prepare(DataSection(train_file=str(no_reply), template="chat"), tokenizer, seed=0)
    no_text = write_json(tmp_path / "no_text.json", [{"conversations": [{"from": "human"}]}])
    with pytest.raises(SaraError, match=r"no_text\.json: record 0 message 0 has no 'value' text"):
        prepare(DataSection(train_file=str(no_text), template="chat"), tokenizer, seed=0)


def test_conversations_need_the_chat_template(tmp_path, tokenizer):
    path = write_json(tmp_path / "sharegpt.json", [SHAREGPT])
    with pytest.raises(SaraError, match=r"sharegpt\.json holds conversations.*set data\.template: chat"):
        prepare(DataSection(train_file=str(path)), tokenizer, seed=0)


def test_columns_map_metamathqa_and_system_and_history(tmp_path, tokenizer):
    # MetaMathQA's fields: query and response, no conversion script.
    math = write_json(tmp_path / "metamath.json", [{"query": "What is 2+2?", "response": "4", "type": "GSM_AnsAug"}])
    train, _ = prepare(DataSection(train_file=str(math), columns={"instruction": "query", "output": "response"},
                                   train_on_inputs=False), tokenizer, seed=0)
    expected = Tokenize(tokenizer, "alpaca", 256, False)({"instruction": "What is 2+2?", "output": "4"})
    assert train[0]["input_ids"] == expected["input_ids"] and train[0]["labels"] == expected["labels"]
    # LLaMA-Factory's alpaca columns with a system prompt and history become a conversation.
    record = {"prompt": "2+2?", "answer": "4", "sys": "Be brief.", "past": [["hi", "hello there"]]}
    path = write_json(tmp_path / "history.json", [record])
    section = DataSection(train_file=str(path), template="chat", columns={
        "instruction": "prompt", "output": "answer", "system": "sys", "history": "past"})
    train, _ = prepare(section, tokenizer, seed=0)
    assert (train[0]["input_ids"], train[0]["labels"]) == expected_row(tokenizer, TINY_SEGMENTS)


# -- several datasets ------------------------------------------------------------------------------

def test_a_list_of_files_with_their_own_settings(tmp_path, tokenizer):
    from sara_cli.data.dataset import load_split, tokenize_split

    math = write_json(tmp_path / "math.json", [{"query": f"{i}+{i}?", "response": f"{2 * i}"} for i in range(10)])
    chat = write_json(tmp_path / "chat.json", [SHAREGPT] * 4)
    plain = write_json(tmp_path / "plain.json", records(6))
    section = DataSection(train_file=[
        {"path": str(math), "columns": {"instruction": "query", "output": "response"}, "limit": 8, "weight": 0.5},
        {"path": str(chat), "template": "chat", "weight": 2},
        str(plain)], template="plain")
    # Every file's settings are filled in from the section: recipe.yaml records what was used.
    files = section.model_dump()["train_file"]
    assert [(f["template"], f["limit"], f["weight"], f["train_on_inputs"]) for f in files] == [
        ("plain", 8, 0.5, True), ("chat", None, 2.0, False), ("plain", None, 1.0, True)]
    assert section.loss_on == "all_assistant_turns"
    assert DataSection.model_validate(section.model_dump()) == section  # recipe.yaml loads back the same

    prepared = tokenize_split(load_split(section, 0), section, tokenizer, seed=0)
    stats = prepared.stats["train"]
    assert stats.files == {str(math): 4, str(chat): 8, str(plain): 6} and stats.records == 18
    chat_ids = expected_row(tokenizer, TINY_SEGMENTS)[0]
    assert sum(row == chat_ids for row in prepared.train["input_ids"]) == 8
    plain_ids = Tokenize(tokenizer, "plain", 256, True)(records(6)[0])["input_ids"]
    assert plain_ids in prepared.train["input_ids"]
    # The half of math.json's first 8 records is drawn under the seed: the same for the same seed.
    again = tokenize_split(load_split(section, 0), section, tokenizer, seed=0)
    other = tokenize_split(load_split(section, 0), section, tokenizer, seed=1)

    def math_rows(prepared):  # math.json's share comes first: files keep their order in the mix
        return prepared.train["input_ids"][:4]

    assert math_rows(again) == math_rows(prepared) and math_rows(other) != math_rows(prepared)
    every = [Tokenize(tokenizer, "plain", 256, True)({"instruction": f"{i}+{i}?", "output": f"{2 * i}"})["input_ids"]
             for i in range(8)]
    assert all(row in every for row in math_rows(prepared))


def test_held_out_records_never_reach_training(tmp_path, tokenizer):
    rows_a = records(20)
    a = write_json(tmp_path / "a.json", rows_a)
    b = write_json(tmp_path / "b.json", [{"instruction": f"Name {i}.", "output": f"n{i}"} for i in range(10)])
    section = DataSection(train_file=[{"path": str(a), "weight": 3}, str(b)], val_set_size=6)
    train, evaluation = prepare(section, tokenizer, seed=5)
    assert len(evaluation) == 6  # held out of the union of both files
    held = [tuple(ids) for ids in evaluation["input_ids"]]
    trained = [tuple(ids) for ids in train["input_ids"]]
    assert not set(held) & set(trained)  # the weight repeats only training records
    of_a = {tuple(Tokenize(tokenizer, "alpaca", 256, True)(r)["input_ids"]) for r in rows_a}
    held_a = sum(ids in of_a for ids in held)
    assert len(train) == 3 * (20 - held_a) + (10 - (6 - held_a))
    assert all(trained.count(ids) == 3 for ids in of_a - set(held))


def test_eval_files_follow_the_same_rules(tmp_path, tokenizer):
    a = write_json(tmp_path / "a.json", records(4))
    chat = write_json(tmp_path / "chat.json", [SHAREGPT])
    section = DataSection(train_file=str(a), eval_file=[{"path": str(chat), "template": "chat", "weight": 3},
                                                        {"path": str(a), "limit": 2}])
    train, evaluation = prepare(section, tokenizer, seed=0)
    assert (len(train), len(evaluation)) == (4, 5)
    assert evaluation[0]["labels"] == expected_row(tokenizer, TINY_SEGMENTS)[1]  # chat masks even with alpaca around


# -- tokenize once ---------------------------------------------------------------------------------

@pytest.fixture
def counted(monkeypatch, tmp_path):
    """A fresh datasets cache, and the number of records tokenized so far."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    calls = {"records": 0}
    real = Tokenize.encode

    def encode(self, record):
        calls["records"] += 1
        return real(self, record)

    monkeypatch.setattr(Tokenize, "encode", encode)
    return calls


def test_a_second_run_reads_the_tokens_back(tmp_path, tokenizer, counted):
    path = write_json(tmp_path / "ten.json", records(10))
    first, _ = prepare(DataSection(train_file=str(path), val_set_size=2), tokenizer, seed=0)
    assert counted["records"] == 10
    again, _ = prepare(DataSection(train_file=str(path), val_set_size=2), tokenizer, seed=0)
    assert counted["records"] == 10 and again["input_ids"] == first["input_ids"]  # nothing tokenized
    # Anything that changes the tokens is part of the key: cutoff, template, masking, tokenizer.
    for section, tok in ((DataSection(train_file=str(path), cutoff_len=16), tokenizer),
                         (DataSection(train_file=str(path), template="plain"), tokenizer),
                         (DataSection(train_file=str(path), train_on_inputs=False), tokenizer),
                         (DataSection(train_file=str(path), template="chat"), copy_tokenizer(tokenizer, LLAMA3))):
        before = counted["records"]
        prepare(section, tok, seed=0)
        assert counted["records"] == before + 10, section


def test_an_edited_file_is_tokenized_again(tmp_path, tokenizer, counted):
    import os

    path = write_json(tmp_path / "r.json", records(4))
    stat = path.stat()
    prepare(DataSection(train_file=str(path)), tokenizer, seed=0)
    changed = records(4)
    changed[0]["output"] = "The answer is 7"  # same size, and the old modification time put back
    write_json(path, changed)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    train, _ = prepare(DataSection(train_file=str(path)), tokenizer, seed=0)
    assert counted["records"] == 8
    assert train[0]["input_ids"] == Tokenize(tokenizer, "alpaca", 256, True)(changed[0])["input_ids"]


def test_token_statistics(tmp_path, tokenizer):
    from sara_cli.data.dataset import load_split, tokenize_split

    rows = records(6)
    rows[0]["output"] = "a long answer " * 20  # cut at cutoff_len
    path = write_json(tmp_path / "six.json", rows)
    section = DataSection(train_file=str(path), cutoff_len=40, train_on_inputs=False)
    stats = tokenize_split(load_split(section, 0), section, tokenizer, seed=0).stats["train"]
    tokenize = Tokenize(tokenizer, "alpaca", 40, False)
    expected = [tokenize(r) for r in rows]
    untruncated = [len(tokenizer(alpaca_prompt(r["instruction"], "", r["output"]))["input_ids"]) for r in rows]
    assert stats.records == 6 and stats.tokens == sum(len(e["input_ids"]) for e in expected)
    assert stats.truncated == sum(n > 40 for n in untruncated) == 1
    # Targets: labels the loss uses, i.e. not -100, and not the first (nothing predicts it).
    assert stats.targets == sum(sum(label != -100 for label in e["labels"][1:]) for e in expected)
    assert stats.packs is None and stats.files == {str(path): 6}


# -- bad data: one line naming the file, the line or record, and the fix ---------------------------

def train_on(tmp_path, model_dir: Path, data: Path, *args: str, **settings):
    """`sara train` on a recipe whose data is `data` (in-process, through the CLI)."""
    import yaml

    from conftest import run_cli

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "adapter": {"method": "lora", "targets": "q_proj,v_proj", "rank": 2, "alpha": 4},
        "data": {"train_file": str(data), "cutoff_len": 64, **settings},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
                  "logging_steps": 1, "learning_rate": 1e-2}}))
    return run_cli("train", recipe, *args)


BAD_FILES = {
    # name: (bytes, fragments the one error line must hold)
    "latin1.json": (b'[{"instruction": "a", "output": "b"},\n {"instruction": "caf\xe9", "output": "d"}]',
                    ("is not UTF-8 text", "byte 0xe9 at line 2", "re-save the file as UTF-8")),
    "broken.json": (b'[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
                    ("is not valid JSON", "line 2, column 22", "fix that line")),
    "broken.jsonl": (b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n',
                     ("line 2 is not valid JSON", "JSON Lines")),
    "empty-list.json": (b"[]\n", ("holds no records (an empty JSON list)", "add records")),
    "latin1.csv": (b"instruction,output\ncaf\xe9,b\n", ("is not UTF-8 text", "line 2")),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_data_file_is_one_line_naming_file_and_line(tmp_path, llama_dir, name):
    content, fragments = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    result = train_on(tmp_path, llama_dir, path)
    assert result.exit_code == 2
    one_line_error(result, str(path), *fragments, stdout_empty=False)
    assert not (tmp_path / "out").exists()  # it failed before anything was written


def test_bad_record_in_a_list_names_its_file(tmp_path, llama_dir):
    good = write_json(tmp_path / "good.json", records(4))
    bad = write_json(tmp_path / "bad.json", [SHAREGPT, {"conversations": [{"from": "human", "value": "?"}]}])
    # A list through an override, as on the command line.
    result = train_on(tmp_path, llama_dir, good, f"data.train_file=[{good}, {{path: {bad}, template: chat}}]")
    assert result.exit_code == 2
    one_line_error(result, str(bad), "record 1 has no assistant message", stdout_empty=False)


def test_dry_run_prints_token_statistics(tmp_path, llama_dir):
    path = write_json(tmp_path / "train.json", records(8))
    result = train_on(tmp_path, llama_dir, path, "--dry-run", train_on_inputs=False, val_set_size=2)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "data (train): 6 records," in text and "data (eval): 2 records," in text
    assert "of records truncated at cutoff_len 64" in text and "of tokens are targets" in text


# -- every format trains the tiny model ------------------------------------------------------------

def test_mixed_formats_train_packed(tmp_path, llama_dir):
    """MetaMathQA-style columns, ShareGPT and messages conversations in one packed run."""
    import math

    import yaml

    math_file = write_json(tmp_path / "metamath.json",
                           [{"query": f"What is {i} plus {i}?", "response": f"{2 * i}"} for i in range(24)])
    sharegpt = write_json(tmp_path / "sharegpt.json", [SHAREGPT] * 8)
    messages = write_json(tmp_path / "messages.json", [{"messages": CONVERSATION}] * 8)
    files = [{"path": str(math_file), "columns": {"instruction": "query", "output": "response"},
              "train_on_inputs": False},
             {"path": str(sharegpt), "template": "chat", "format": "sharegpt", "weight": 0.5},
             {"path": str(messages), "template": "chat", "limit": 4}]
    evaluation = [{"path": str(sharegpt), "template": "chat", "limit": 2}]
    result = train_on(tmp_path, llama_dir, math_file, f"data.train_file={json.dumps(files)}",
                      f"data.eval_file={json.dumps(evaluation)}", "train.max_steps=12", "train.eval_steps=6",
                      "train.learning_rate=3e-2", packing=True)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "data (train): 32 records" in text and "data (eval): 2 records" in text  # 24 + 8 / 2 + 4
    assert "packed into" in text and f"mix (train): {math_file} 24, {sharegpt} 4, {messages} 4" in text
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["data"]
    assert [(f["path"], f["template"], f["weight"], f["limit"]) for f in saved["train_file"]] == [
        (str(math_file), "alpaca", 1.0, None), (str(sharegpt), "chat", 0.5, None), (str(messages), "chat", 1.0, 4)]
    assert saved["packing"] is True and saved["loss_on"] == "all_assistant_turns"
    log = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert sum("eval_loss" in r for r in log) == 2 and all(math.isfinite(r["eval_loss"]) for r in log if "eval_loss" in r)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_chat_recipe_dry_runs_on_local_files_of_the_same_shape(tmp_path, llama_dir):
    """recipes/qwen2.5-0.5b-chat-sara.yaml with the tiny Llama, and UltraChat- and OpenHermes-
    shaped local files (their columns, keys and role names) in place of the hub datasets."""
    import yaml

    from conftest import run_cli

    recipe = ASSETS.parents[1] / "recipes" / "qwen2.5-0.5b-chat-sara.yaml"
    data = yaml.safe_load(recipe.read_text())["data"]
    ultrachat = write_json(tmp_path / "ultrachat.json", [
        {"prompt": "hi", "prompt_id": str(i), "messages": CONVERSATION[1:]} for i in range(6)])
    hermes = write_json(tmp_path / "hermes.json", [
        {"conversations": [{"from": m["from"], "value": m["value"], "weight": None} for m in SHAREGPT["conversations"]]}
        for _ in range(8)])
    local = {"HuggingFaceH4/ultrachat_200k": str(ultrachat), "teknium/OpenHermes-2.5": str(hermes)}
    train_files = [{**f, "path": local[f["path"]], "split": None} for f in data["train_file"]]
    eval_files = [{**f, "path": local[f["path"]], "split": None} for f in data["eval_file"]]
    result = run_cli("train", recipe, f"model.name_or_path={llama_dir}", "model.dtype=float32", "train.bf16=false",
                     f"train.output_dir={tmp_path / 'out'}", "data.cutoff_len=128",
                     f"data.train_file={json.dumps(train_files)}", f"data.eval_file={json.dumps(eval_files)}",
                     "--dry-run")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    # UltraChat: its first 6 (of limit 20,000); OpenHermes: half of its 8 (weight 0.5).
    assert f"mix (train): {ultrachat} 6, {hermes} 4" in text and "data (eval): 6 records" in text
    assert "packed into" in text and "nothing trained" in text


def test_nothing_to_learn_is_an_error(tmp_path, tokenizer):
    path = write_json(tmp_path / "long.json", records(3))
    with pytest.raises(SaraError, match=r"no training record keeps a target token within data\.cutoff_len 8"):
        prepare(DataSection(train_file=str(path), cutoff_len=8, train_on_inputs=False), tokenizer, seed=0)


def test_a_run_recorded_before_data_tokenize_resumes_only_as_joint():
    """Its ids were built from the joined text: resuming with split would change the run."""
    from sara_cli.training.rundir import changed_settings

    before = {"data": {"template": "alpaca", "cutoff_len": 64}}
    assert changed_settings(before, {"data": {**before["data"], "tokenize": "split"}}) == [
        "data.tokenize: joint -> split"]
    assert changed_settings(before, {"data": {**before["data"], "tokenize": "joint"}}) == []


def test_numbers_in_text_fields_are_text_only_where_the_reader_typed_them(tmp_path):
    """A CSV column of answers loads as integers, and a JSON column mixing "7" and 7 decodes both
    as numbers: there the number is the user's text. A JSON number alone is refused (1e3 would
    train as "1000.0")."""
    csv = tmp_path / "r.csv"
    csv.write_text("instruction,output\n1+1?,2\n2+2?,4\n")
    check_records(load_records(str(csv)), "alpaca", str(csv))
    mixed = write_json(tmp_path / "mixed.json", [{"instruction": "1+1?", "output": "2"},
                                                  {"instruction": "2+2?", "output": 4}])
    check_records(load_records(str(mixed)), "alpaca", str(mixed))
    number = write_json(tmp_path / "number.json", [{"instruction": "1000?", "output": 1e3}])
    with pytest.raises(SaraError, match=r"record 0 field 'output' is a number \(1000.0\), not text"):
        check_records(load_records(str(number)), "alpaca", str(number))
