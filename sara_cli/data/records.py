"""Records from files: loading, the formats users bring, and the checks that name a bad record.

Three formats reach the templates in one of two shapes:
- instruction records (`instruction`, `input`, `output`; optionally `system` and `history`, a list
  of earlier [instruction, response] pairs), the LLM-Adapters / Alpaca format;
- conversations, a list of messages: ShareGPT (`conversations`, each `{from, value}` with `from`
  human/gpt/system) and OpenAI-style `messages` (`{role, content}`). Both become `messages` with
  roles system/user/assistant/tool, reading role names as LLaMA-Factory does.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from contextlib import contextmanager
from pathlib import Path

from sara_cli.model import builtin
from sara_cli.errors import SaraError

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
REQUIRED_FIELDS = ("instruction", "output")  # instruction records; `input` is optional
CONVERSATION_FIELDS = ("messages", "conversations")
# Role names seen in ShareGPT-style data (LLaMA-Factory's defaults and common variants).
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
              "function_call": "assistant", "system": "system", "observation": "tool", "tool": "tool",
              "function": "tool", "ipython": "tool"}
TAG_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "system_tag": "system",
             "observation_tag": "tool", "function_tag": "assistant"}
MESSAGE_KEYS = {"sharegpt": ("from", "value"), "messages": ("role", "content")}


# -- files -----------------------------------------------------------------------------------------

def file_digest(path: Path) -> str:
    """sha256 of a file's bytes: the key of its cached Arrow copy and of its tokenized cache."""
    stat = Path(path).stat()
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int, ctime_ns: int) -> str:
    """Read once per process and version of the file (loading and tokenizing both need it). Any
    write changes ctime, which, unlike mtime, cannot be set back."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _quiet_datasets():
    """datasets logs a parse failure at ERROR level before raising; sara reports it in one line."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_records(reference: str, split: str = "train", limit: int | None = None,
                 columns: dict[str, str] | None = None):
    """Load a dataset of records with `datasets`.

    A local file's Arrow copy is cached under a key of its contents (not its modification time),
    so an edited file is always read again.

    Args:
        reference: a local file (.json/.jsonl/.csv/.parquet), builtin:NAME, or a hub dataset id.
        columns: {sara field: dataset column} renames, e.g. {"instruction": "query"}.

    Raises:
        SaraError: a missing, empty, unreadable or malformed file (naming the line where it can),
            or a dataset that cannot be loaded.
    """
    import datasets

    if builtin.is_builtin(reference):
        reference = str(builtin.data_path(reference))
    path = Path(reference).expanduser()
    try:
        with _quiet_datasets():
            if path.suffix in FILE_BUILDERS or path.exists():
                _check_file(path, reference)
                cache = Path(datasets.config.HF_DATASETS_CACHE) / "sara" / f"{path.stem}-{file_digest(path)[:20]}"
                dataset = datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path),
                                                split="train", cache_dir=str(cache))
            else:
                dataset = datasets.load_dataset(reference, split=split)
    except SaraError:
        raise
    except Exception as exc:
        if path.is_file():
            raise SaraError(diagnose(path) or _failure(reference, exc)) from None
        raise SaraError(_failure(reference, exc)) from None
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return rename_columns(dataset, columns or {}, reference)


FOLDER_GIVEN = ("is a folder; give a .json, .jsonl, .csv or .parquet file of records in it (sara "
                "reads one file per entry: list several under data.train_file)")


def _check_file(path: Path, reference: str) -> None:
    if path.is_dir():
        raise SaraError(f"data file {reference} {FOLDER_GIVEN}")
    if not path.is_file():
        raise SaraError(f"data file {reference} does not exist; check the path")
    if path.suffix not in FILE_BUILDERS:
        raise SaraError(f"data file {path} has an unsupported extension; use .json, .jsonl, .csv or .parquet")
    if path.stat().st_size == 0:
        raise SaraError(f"data file {path} is empty; it needs records (see docs/recipes.md, data)")


def _failure(reference: str, exc: Exception) -> str:
    """The innermost cause's first line (datasets wraps parse errors in a generic one)."""
    while (exc.__cause__ or exc.__context__) is not None and "generating the dataset" in str(exc):
        exc = exc.__cause__ or exc.__context__
    detail = (str(exc).splitlines() or [""])[0][:200]  # some errors (StopIteration) have no text
    return (f"could not load data '{reference}' ({type(exc).__name__}: {detail}); check the file "
            "or dataset id")


def diagnose(path: Path) -> str | None:
    """What is wrong with a local file that `datasets` failed to read, naming the line: bytes that
    are not UTF-8, JSON that does not parse, a JSON list with no records. None if no such fault."""
    import json

    if path.suffix not in (".json", ".jsonl", ".csv"):
        return None  # Parquet is binary; its reader's own message says what is wrong
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        return (f"data file {path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} "
                "cannot be decoded; re-save the file as UTF-8")
    if path.suffix not in (".json", ".jsonl"):
        return None
    if not text.strip():
        return f"data file {path} holds no records (only whitespace); add records, one JSON object each"
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            return (f"data file {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column "
                    f"{exc.colno}; fix that line")
        if not records:
            return f"data file {path} holds no records (an empty JSON list); add records to it"
        bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
        if bad is not None:
            return f"data file {path}: record {bad} is not a JSON object; each record is {{\"field\": value, ...}}"
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            return (f"data file {path} line {number} is not valid JSON ({exc.msg} at column {exc.colno}); "
                    "fix that line (JSON Lines: one record per line)")
        if not isinstance(value, dict):
            return f"data file {path} line {number} is not a JSON object; each record is {{\"field\": value, ...}}"
    return None


def rename_columns(dataset, columns: dict[str, str], reference: str):
    """Rename dataset columns to sara's fields; a field's own column is replaced by the mapped one."""
    for field, column in columns.items():
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
    if not builtin.is_builtin(data) and path.is_dir():
        raise SaraError(f"{flag} {data} {FOLDER_GIVEN}")
    if not builtin.is_builtin(data) and path.suffix.lower() in FILE_BUILDERS and not path.is_file():
        raise SaraError(f"{flag} {data} does not exist; give a .json, .jsonl, .csv or .parquet file of "
                        "instruction records, or builtin:mawps-quickstart")


# -- formats ---------------------------------------------------------------------------------------

def detect_format(dataset, fmt: str = "auto") -> str:
    """instruction, sharegpt or messages: the given format, or the one the columns show."""
    if fmt != "auto":
        return fmt
    field = next((f for f in CONVERSATION_FIELDS if f in dataset.column_names), None)
    if field is None:
        return "instruction"
    value = dataset[0][field] if len(dataset) else None  # one row, not the whole column
    first = value[0] if isinstance(value, list) and value else None
    return "sharegpt" if isinstance(first, dict) and "from" in first else "messages"


def _role_names(tags: dict | None) -> dict[str, str]:
    names = dict(ROLE_NAMES)
    for tag, role in TAG_ROLES.items():
        if (tags or {}).get(tag):
            names[tags[tag]] = role
    return names


def conversation(record: dict, fmt: str = "auto", tags: dict | None = None) -> list[dict] | None:
    """A record's messages as [{role, content}] with sara's roles, or None for an instruction record.

    Instruction records with `system` or `history` become conversations too.

    Raises:
        ValueError: a message that is not {role, content} text, or an unknown role (the caller
            names the file and record).
    """
    tags = tags or {}
    field = next((f for f in CONVERSATION_FIELDS if record.get(f) is not None), None)
    if field is None:
        if fmt in ("sharegpt", "messages"):
            raise ValueError(f"has no '{CONVERSATION_FIELDS[0]}' or '{CONVERSATION_FIELDS[1]}' list")
        if not record.get("system") and not record.get("history"):
            return None
        return _instruction_conversation(record)
    raw = record[field]
    if not isinstance(raw, list):
        raise ValueError(f"field '{field}' is not a list of messages")
    names = _role_names(tags)
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": str(record["system"])})
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is not a mapping")
        style = fmt if fmt in MESSAGE_KEYS else "sharegpt" if "from" in message else "messages"
        role_key = tags.get("role_tag") or MESSAGE_KEYS[style][0]
        content_key = tags.get("content_tag") or MESSAGE_KEYS[style][1]
        role, content = message.get(role_key), message.get(content_key)
        if role not in names:
            known = ", ".join(sorted(names))
            raise ValueError(f"message {i} has role {role!r} under '{role_key}'; known roles: {known} "
                             "(data.tags maps others)")
        if not isinstance(content, str):
            what = "no" if content is None else f"a {type(content).__name__} as its"
            raise ValueError(f"message {i} has {what} '{content_key}' text")
        messages.append({"role": names[role], "content": content})
    return messages


def _text(value) -> str:
    """A record field as text: None is empty; numbers (CSV columns, JSON answers) become strings."""
    return "" if value is None else str(value)


def _instruction_conversation(record: dict) -> list[dict]:
    messages = [{"role": "system", "content": _text(record["system"])}] if record.get("system") else []
    for turn in record.get("history") or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise ValueError("history holds an entry that is not an [instruction, response] pair")
        messages += [{"role": "user", "content": _text(turn[0])}, {"role": "assistant", "content": _text(turn[1])}]
    instruction, input_text = _text(record.get("instruction")), _text(record.get("input"))
    messages += [{"role": "user", "content": instruction + (f"\n\n{input_text}" if input_text else "")},
                 {"role": "assistant", "content": _text(record.get("output"))}]
    return messages


def check_text(values, field: str, source: str, numbers_are_text: bool = False) -> None:
    """Every value of a text field is text. A list, mapping or true/false would become its Python
    repr as training text, and a number its str(), which need not be what the file says (1e3 ->
    "1000.0"): all are refused. `numbers_are_text`: a CSV column, or a JSON column that mixes
    numbers and strings (datasets reads it as `Json`, decoding the text "7" as 7), where a number
    is what the user wrote.

    Raises:
        SaraError: naming the record (0-based), the field and what it holds.
    """
    for i, value in enumerate(values):
        if value is None or isinstance(value, str):
            continue
        if numbers_are_text and isinstance(value, (int, float)) and not isinstance(value, bool):
            continue
        kind = {list: "a list", dict: "a mapping", bool: "true/false"}.get(type(value), "a number")
        raise SaraError(f"{source}: record {i} field '{field}' is {kind} ({str(value)[:40]}), not text; "
                        f"write it as a string, e.g. \"{field}\": \"7\"")


def check_records(dataset, template: str, source: str, fmt: str = "auto", tags: dict | None = None) -> None:
    """Every record has what its format and template need.

    Raises:
        SaraError: naming the file and the first bad record's index (0-based), and the fix.
    """
    if len(dataset) == 0:
        raise SaraError(f"{source} holds no records")
    fmt = detect_format(dataset, fmt)
    if fmt == "instruction":
        for field in REQUIRED_FIELDS:
            if field not in dataset.column_names:
                raise SaraError(f"{source}: record 0 has no '{field}' field; records need "
                                f"{', '.join(REQUIRED_FIELDS)} (and optionally input), or data.columns "
                                f"mapping them; its columns are: {', '.join(dataset.column_names)}")
            for i, value in enumerate(dataset[field]):
                if value is None:
                    raise SaraError(f"{source}: record {i} has no '{field}' field")
        for field in ("instruction", "input", "output", "system"):
            if field in dataset.column_names:
                numbers_are_text = (str(source).lower().endswith(".csv")
                                    or type(dataset.features[field]).__name__ == "Json")
                check_text(dataset[field], field, source, numbers_are_text)
        if template != "chat" or not any(f in dataset.column_names for f in ("system", "history")):
            return  # alpaca and plain prompts ignore other columns
    elif template != "chat":
        raise SaraError(f"{source} holds conversations ({fmt} format); template {template} cannot "
                        "render them: set data.template: chat")
    columns = [c for c in (*CONVERSATION_FIELDS, "system", "history", "instruction", "input", "output")
               if c in dataset.column_names]
    i = 0
    for batch in dataset.select_columns(columns).iter(batch_size=1024):  # not all conversations at once
        for values in zip(*(batch[c] for c in columns)):
            try:
                messages = conversation(dict(zip(columns, values)), fmt, tags)
            except ValueError as exc:
                raise SaraError(f"{source}: record {i} {exc}") from None
            if messages is not None and not any(m["role"] == "assistant" for m in messages):
                raise SaraError(f"{source}: record {i} has no assistant message, so nothing to learn; "
                                "remove it or add the reply")
            i += 1
