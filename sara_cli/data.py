"""Records -> prompts -> tokens.

Records are instruction records (`instruction`, `input`, `output`, the LLM-Adapters format) read
with the `datasets` library from JSON/JSONL/CSV/Parquet files, `builtin:` data, or the hub.
"""

from __future__ import annotations

from pathlib import Path

from sara_cli import builtin
from sara_cli.errors import SaraError

# The LLM-Adapters training prompt (finetune.py, generate_prompt), whitespace included:
# every line after the preamble is indented by 16 spaces, with a line of 16 spaces between
# blocks. Upstream's preambles end in two spaces (no input) and one space (with input): those
# are what is left of a `# noqa: E501` that an earlier version had inside the string.
INDENT = " " * 16
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.  \n\n")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                         "provides further context. Write a response that appropriately completes "
                         "the request. \n\n")
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def alpaca_prompt(instruction: str, input_text: str = "", output: str = "") -> str:
    """The LLM-Adapters training prompt; with output="" it is the prompt part alone."""
    if input_text:
        return (f"{ALPACA_PREAMBLE_INPUT}{INDENT}### Instruction:\n{INDENT}{instruction}\n{INDENT}\n"
                f"{INDENT}### Input:\n{INDENT}{input_text}\n{INDENT}\n"
                f"{INDENT}### Response:\n{INDENT}{output}")
    return (f"{ALPACA_PREAMBLE}{INDENT}### Instruction:\n{INDENT}{instruction}\n{INDENT}\n"
            f"{INDENT}### Response:\n{INDENT}{output}")


def plain_prompt(instruction: str, input_text: str = "", output: str = "") -> str:
    """Instruction, optional input, then the output, separated by newlines."""
    prompt = instruction + (f"\n{input_text}" if input_text else "") + "\n"
    return prompt + output


REQUIRED_FIELDS = ("instruction", "output")  # every template; `input` is optional


def load_records(reference: str, split: str = "train", limit: int | None = None,
                 columns: dict[str, str] | None = None):
    """Load a dataset of records with `datasets`.

    Args:
        reference: a local file (.json/.jsonl/.csv/.parquet), builtin:NAME, or a hub dataset id.

    Raises:
        SaraError: missing file, unsupported extension, or a dataset that cannot be loaded.
    """
    from datasets import load_dataset

    if builtin.is_builtin(reference):
        reference = str(builtin.data_path(reference))
    path = Path(reference).expanduser()
    try:
        if path.suffix in FILE_BUILDERS or path.exists():
            if not path.is_file():
                raise SaraError(f"data file {reference} does not exist; check the path")
            builder = FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise SaraError(f"data file {path} has an unsupported extension; use "
                                ".json, .jsonl, .csv or .parquet")
            if path.stat().st_size == 0:
                raise SaraError(f"data file {path} is empty; it needs instruction records")
            dataset = load_dataset(builder, data_files=str(path), split="train")
        else:
            dataset = load_dataset(reference, split=split)
    except SaraError:
        raise
    except Exception as exc:
        detail = (str(exc).splitlines() or [""])[0][:200]  # some errors (StopIteration) have no text
        raise SaraError(f"could not load data '{reference}' ({type(exc).__name__}: {detail}); "
                        "check the file or dataset id") from None
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    for field, column in (columns or {}).items():
        if column not in dataset.column_names:
            raise SaraError(f"data.columns maps {field} to '{column}', which {reference} does not have; "
                            f"its columns are: {', '.join(dataset.column_names)}")
        if field in dataset.column_names and field != column:
            dataset = dataset.remove_columns(field)
        if field != column:
            dataset = dataset.rename_column(column, field)
    return dataset


def check_data_reference(data: str, flag: str = "--data") -> None:
    """Fail early, naming the flag, when `data` names a local records file that is not there.

    Raises:
        SaraError: a .json/.jsonl/.csv/.parquet path that is not a file.
    """
    import datasets

    datasets.disable_progress_bars()  # the library's "Generating train split" bars, one per load
    path = Path(data).expanduser()
    if not builtin.is_builtin(data) and path.suffix.lower() in FILE_BUILDERS and not path.is_file():
        raise SaraError(f"{flag} {data} does not exist; give a .json, .jsonl, .csv or .parquet file of "
                        "instruction records, or builtin:mawps-quickstart")


def check_records(dataset, template: str, source: str) -> None:
    """Every record has the fields the template needs, as strings.

    Raises:
        SaraError: naming the file and the first bad record's index.
    """
    if len(dataset) == 0:
        raise SaraError(f"{source} holds no records")
    needed = REQUIRED_FIELDS
    if template == "chat" and "messages" in dataset.column_names:
        needed = ("messages",)
    for field in needed:
        if field not in dataset.column_names:
            raise SaraError(f"{source}: record 0 has no '{field}' field; records need "
                            f"{', '.join(needed)} (and optionally input)")
        for i, value in enumerate(dataset[field]):
            if value is None:
                raise SaraError(f"{source}: record {i} has no '{field}' field")


def _text(value) -> str:
    """A record field as text: None is empty; numbers (CSV columns, JSON answers) become strings."""
    return "" if value is None else str(value)


def record_texts(record: dict, template: str, tokenizer=None) -> tuple[str, str]:
    """(prompt, prompt + completion) of a record under a template; `chat` needs the tokenizer."""
    instruction, input_text, output = (_text(record.get(k)) for k in ("instruction", "input", "output"))
    if template == "alpaca":
        return alpaca_prompt(instruction, input_text), alpaca_prompt(instruction, input_text, output)
    if template == "plain":
        return plain_prompt(instruction, input_text), plain_prompt(instruction, input_text, output)
    messages = record.get("messages") or [
        {"role": "user", "content": instruction + (f"\n\n{input_text}" if input_text else "")},
        {"role": "assistant", "content": output}]
    if tokenizer is None or tokenizer.chat_template is None:
        raise SaraError("template 'chat' needs a tokenizer with a chat template; this one has "
                        "none. Use template: alpaca or plain")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return prompt, full


class Tokenize:
    """Turn one record into input_ids / attention_mask / labels, as LLM-Adapters does.

    Truncate to cutoff_len, append EOS when there is room, and with train_on_inputs=False set
    the prompt's labels to -100.
    """

    def __init__(self, tokenizer, template: str, cutoff_len: int, train_on_inputs: bool):
        self.tokenizer = tokenizer
        self.template = template
        self.cutoff_len = cutoff_len
        self.train_on_inputs = train_on_inputs

    def texts(self, record: dict) -> tuple[str, str]:
        """(prompt, prompt + completion) for a record."""
        return record_texts(record, self.template, self.tokenizer)

    def _encode(self, text: str, add_eos: bool) -> list[int]:
        special = self.template != "chat"  # chat templates write their own special tokens
        ids = self.tokenizer(text, truncation=True, max_length=self.cutoff_len,
                             add_special_tokens=special)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if add_eos and eos is not None and (not ids or ids[-1] != eos) and len(ids) < self.cutoff_len:
            ids = ids + [eos]
        return ids

    def __call__(self, record: dict) -> dict:
        prompt, full = self.texts(record)
        input_ids = self._encode(full, add_eos=True)
        labels = list(input_ids)
        if not self.train_on_inputs:
            prompt_len = len(self._encode(prompt, add_eos=False))
            labels[:prompt_len] = [-100] * min(prompt_len, len(labels))
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def load_split(data_cfg, seed: int):
    """Load and check the train (and eval) records of a recipe's data section, untokenized.

    Cheap next to loading a model, so `sara train` calls it first and bad data fails fast.
    Returns (train records, eval records or None).
    """
    train = load_records(data_cfg.train_file, data_cfg.train_split, data_cfg.limit, data_cfg.columns)
    check_records(train, data_cfg.template, data_cfg.train_file)
    evaluation = None
    if data_cfg.eval_file:
        evaluation = load_records(data_cfg.eval_file, columns=data_cfg.columns)
        check_records(evaluation, data_cfg.template, data_cfg.eval_file)
    elif data_cfg.val_set_size:
        size = data_cfg.val_set_size
        if (isinstance(size, int) and size >= len(train)) or (isinstance(size, float) and size >= 1):
            raise SaraError(f"data.val_set_size {size} leaves no training records "
                            f"({len(train)} in all); lower it")
        split = train.train_test_split(test_size=size, shuffle=True, seed=seed)
        train, evaluation = split["train"], split["test"]
    return train, evaluation


def tokenize_split(train, evaluation, data_cfg, tokenizer):
    """Tokenize records from `load_split` into input_ids / attention_mask / labels."""
    tokenize = Tokenize(tokenizer, data_cfg.template, data_cfg.cutoff_len, data_cfg.train_on_inputs)
    train = train.map(tokenize, remove_columns=train.column_names, desc="tokenize", keep_in_memory=True)
    if evaluation is not None:
        evaluation = evaluation.map(tokenize, remove_columns=evaluation.column_names,
                                    desc="tokenize eval", keep_in_memory=True)
    return train, evaluation


def prepare(data_cfg, tokenizer, seed: int):
    """Load, check and tokenize the train (and eval) sets of a recipe's data section.

    Returns:
        (train_dataset, eval_dataset or None), both with input_ids/attention_mask/labels.
    """
    train, evaluation = load_split(data_cfg, seed)
    return tokenize_split(train, evaluation, data_cfg, tokenizer)
