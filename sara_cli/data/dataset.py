"""A recipe's data section -> tokenized train and eval sets, with statistics.

Each file (one, or a list with its own format, columns, template, limit and weight) is loaded and
checked before the model loads (`load_split`), so bad data fails fast. Once the tokenizer is
there (`tokenize_split`), each file is tokenized into the `datasets` cache under a key of its
contents, settings, tokenizer and sara's tokenization code, so a resume or a second run reads
the tokens back instead of tokenizing again. Then the files are mixed: a validation split is
held out of their union (before weights, so no record lands on both sides), each file's records
are repeated or subsampled by its weight under the seed, and with packing the records are
grouped into sequences of cutoff_len tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from sara_cli.model import builtin
from sara_cli.errors import SaraError
from sara_cli.data.prompts import Tokenize, alpaca_prompt, plain_prompt, record_texts  # noqa: F401 (re-exported)
from sara_cli.data.records import (FILE_BUILDERS, REQUIRED_FIELDS, check_data_reference,  # noqa: F401
                              check_records, detect_format, file_digest, load_records)

MODEL_COLUMNS = ["input_ids", "attention_mask", "labels"]
STATS_COLUMNS = ["num_tokens", "truncated", "num_targets"]


@dataclass
class Source:
    """One file of the data section, loaded and checked (records are untokenized)."""

    entry: object  # recipe.DataFile, every setting filled in
    records: object  # datasets.Dataset
    format: str


@dataclass
class Loaded:
    train: list[Source]
    evaluation: list[Source]


@dataclass
class Stats:
    """Token statistics of one split, as `sara train --dry-run` prints them."""

    records: int = 0
    tokens: int = 0
    truncated: int = 0
    targets: int = 0
    files: dict[str, int] = field(default_factory=dict)  # records per file in the mix
    packs: int | None = None  # sequences after packing


@dataclass
class Prepared:
    train: object  # datasets.Dataset, or packing.PackedDataset
    evaluation: object | None
    stats: dict[str, Stats]


def load_split(data_cfg, seed: int) -> Loaded:
    """Load and check the train (and eval) files of a recipe's data section, untokenized.

    Cheap next to loading a model, so `sara train` calls it first and bad data fails fast.

    Raises:
        SaraError: a missing or malformed file, a bad record (named), or a val_set_size that
            leaves no training records.
    """
    train = [_load(entry) for entry in data_cfg.files("train")]
    evaluation = [_load(entry) for entry in data_cfg.files("eval")]
    size, total = data_cfg.val_set_size, sum(len(s.records) for s in train)
    if not evaluation and size and ((isinstance(size, int) and size >= total) or
                                    (isinstance(size, float) and size >= 1)):
        raise SaraError(f"data.val_set_size {size} leaves no training records ({total} in all); lower it")
    return Loaded(train, evaluation)


def _load(entry) -> Source:
    records = load_records(entry.path, entry.split, entry.limit, entry.columns)
    fmt = detect_format(records, entry.format)
    check_records(records, entry.template, entry.path, fmt, entry.tags)
    return Source(entry, records, fmt)


# -- tokenization, cached --------------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything about a tokenizer that changes its tokens and chat rendering."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        for setting in ("truncation", "padding"):  # set by each call, not part of the vocabulary
            state.pop(setting, None)
        digest.update(json.dumps(state, sort_keys=True).encode())
    else:
        from datasets.fingerprint import Hasher

        digest.update(Hasher.hash(tokenizer).encode())
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    digest.update(json.dumps([getattr(tokenizer, "chat_template", None), special], default=str).encode())
    return digest.hexdigest()


def _code_fingerprint() -> str:
    """sara's tokenization code: a change to it never reuses tokens cached by an older version."""
    from sara_cli.data import prompts, records

    digest = hashlib.sha256()
    for module in (prompts, records):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def _tokenize_source(source: Source, data_cfg, tokenizer, tokenizer_key: str):
    entry = source.entry
    tokenize = Tokenize(tokenizer, entry.template, data_cfg.cutoff_len, entry.train_on_inputs,
                        data_cfg.loss_on, source.format, entry.tags, joint=data_cfg.tokenize == "joint")
    path = Path(entry.path).expanduser()
    content = file_digest(path) if path.is_file() else None
    if builtin.is_builtin(entry.path):
        content = file_digest(builtin.data_path(entry.path))
    key = json.dumps([source.records._fingerprint, content, entry.template, entry.train_on_inputs, source.format,
                      entry.tags, data_cfg.loss_on, data_cfg.cutoff_len, data_cfg.tokenize, tokenizer_key,
                      _code_fingerprint()],
                     sort_keys=True, default=str)

    def encode(record, index):
        try:
            return tokenize.encode(record)
        except ValueError as exc:
            raise SaraError(f"{entry.path}: record {index} {exc}") from None

    return source.records.map(encode, with_indices=True, remove_columns=source.records.column_names,
                              new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32],
                              load_from_cache_file=True, desc="tokenize")


def tokenize_split(loaded: Loaded, data_cfg, tokenizer, seed: int) -> Prepared:
    """Tokenize (or read from the cache), hold out, weight, and pack the files of `load_split`.

    Returns:
        Prepared: train and eval sets with input_ids/attention_mask/labels (packed datasets
        when data.packing), and their Stats.

    Raises:
        SaraError: a record the chat template refuses or whose turns cannot be found (naming
            the file and record), or no target token in any training record.
    """
    from datasets import concatenate_datasets

    key = tokenizer_fingerprint(tokenizer)
    train = [_tokenize_source(s, data_cfg, tokenizer, key) for s in loaded.train]
    evaluation = [_tokenize_source(s, data_cfg, tokenizer, key) for s in loaded.evaluation]
    train_set = _with_source(train, concatenate_datasets)
    eval_set, eval_sources = None, loaded.train  # a held-out split comes from the train files
    if evaluation:
        eval_set, eval_sources = _with_source(evaluation, concatenate_datasets), loaded.evaluation
    elif data_cfg.val_set_size:
        split = train_set.train_test_split(test_size=data_cfg.val_set_size, shuffle=True, seed=seed)
        train_set, eval_set = split["train"], split["test"]
    train_set = _weighted(train_set, loaded.train, seed)
    if evaluation:
        eval_set = _weighted(eval_set, loaded.evaluation, seed)
    stats = {"train": _stats(train_set, loaded.train)}
    if stats["train"].targets == 0:
        raise SaraError(f"no training record keeps a target token within data.cutoff_len {data_cfg.cutoff_len}, "
                        "so nothing would be learned; raise data.cutoff_len, or set data.train_on_inputs: true")
    if eval_set is not None:
        stats["eval"] = _stats(eval_set, eval_sources)
    train_set = _finish(train_set, data_cfg, stats["train"])
    eval_set = _finish(eval_set, data_cfg, stats["eval"]) if eval_set is not None else None
    return Prepared(train_set, eval_set, stats)


def _with_source(parts: list, concatenate):
    """One dataset of a split's files, with a `source` column (the file's index) for weighting."""
    tagged = [part.add_column("source", [index] * len(part)) for index, part in enumerate(parts)]
    return tagged[0] if len(tagged) == 1 else concatenate(tagged)


def _finish(dataset, data_cfg, stats: Stats):
    """The model's columns only; packed into sequences of cutoff_len with data.packing."""
    import numpy as np

    from sara_cli.data.packing import PackedDataset, plan_packs

    lengths = np.asarray(dataset.with_format("numpy")["num_tokens"]) if data_cfg.packing else None
    dataset = dataset.select_columns(MODEL_COLUMNS)
    if not data_cfg.packing:
        return dataset
    packs = plan_packs(lengths, data_cfg.cutoff_len)
    stats.packs = len(packs)
    return PackedDataset(dataset, packs)


def _weighted(dataset, sources: list[Source], seed: int):
    """Each file's records `weight` times: whole copies, then a seeded sample for the fraction."""
    import numpy as np

    weights = [s.entry.weight for s in sources]
    if all(w == 1.0 for w in weights):
        return dataset
    origin = np.asarray(dataset["source"])
    indices = []
    for index, weight in enumerate(weights):
        rows = np.flatnonzero(origin == index)
        whole, fraction = int(weight), weight - int(weight)
        indices += [rows] * whole
        if fraction > 0:
            rng = np.random.default_rng([seed, index])
            count = int(round(fraction * len(rows)))
            indices.append(np.sort(rng.choice(rows, size=count, replace=False)))
    return dataset.select(np.concatenate(indices) if indices else [])


def _stats(dataset, sources: list[Source]) -> Stats:
    import numpy as np

    table = dataset.select_columns(["source", *STATS_COLUMNS]).with_format("numpy")
    origin = np.asarray(table["source"])
    files: dict[str, int] = {}
    for index, source in enumerate(sources):
        files[source.entry.path] = files.get(source.entry.path, 0) + int((origin == index).sum())
    return Stats(records=len(table), tokens=int(np.asarray(table["num_tokens"]).sum()),
                 truncated=int(np.asarray(table["truncated"]).sum()),
                 targets=int(np.asarray(table["num_targets"]).sum()), files=files)


def prepare(data_cfg, tokenizer, seed: int):
    """Load, check and tokenize the train (and eval) sets of a recipe's data section.

    Returns:
        (train_dataset, eval_dataset or None), both with input_ids/attention_mask/labels.
    """
    prepared = tokenize_split(load_split(data_cfg, seed), data_cfg, tokenizer, seed)
    return prepared.train, prepared.evaluation
