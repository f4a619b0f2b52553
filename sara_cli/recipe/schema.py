"""The recipe schema: four pydantic sections, `model`, `adapter`, `data` and `train`.

The `train` section uses transformers' `TrainingArguments` names unchanged. Each field carries its
type and bounds; `messages.py` turns a failed validation into one line per field.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator


Method = Literal["sara", "mosara", "lora", "pissa", "sorsa"]
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
              "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr",
              "cosine_warmup_with_min_lr", "warmup_stable_decay")

# Adapter settings each method accepts (beyond method, targets, dropout), with paper defaults.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "sara": {"tau": 0.01, "use_lambda": True, "init_lambda": "zeros", "zero_init": "none"},
    "mosara": {"tau": 0.5, "num_experts": 5, "v_position": "after", "storage": "compact"},
    "lora": {"rank": 8, "alpha": 16.0},
    "pissa": {"rank": 8, "svd": "lowrank"},
    "sorsa": {"rank": 8, "gamma": 4e-4, "sorsa_update": "reference", "svd": "full"},
}


class Section(BaseModel):
    # NaN and infinity are never a meaningful setting; without this, `tau: nan` would be
    # reported as "should be less than or equal to 1".
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(Section):
    name_or_path: str = Field(description="Local checkpoint folder, builtin:NAME, or hub id.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype of the frozen base; auto keeps the checkpoint's.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")
    attn_implementation: Optional[Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3",
                                          "flex_attention"]] = Field(None, description="Attention kernel.")
    load_in_4bit: bool = Field(False, description="Load the frozen base as 4-bit NF4 (bitsandbytes).")
    load_in_8bit: bool = Field(False, description="Load the frozen base as 8-bit LLM.int8() (bitsandbytes).")


class AdapterSection(Section):
    method: Method = Field(description="sara, mosara, lora, pissa or sorsa.")
    targets: Union[str, list[str]] = Field("q_proj,v_proj", description="Module suffixes or all-linear.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    tau: Optional[float] = Field(None, gt=0.0, le=1.0, description="SARA/Mo-SARA: share of the singular-value sum.")
    num_experts: Optional[int] = Field(None, ge=1, le=64, description="Mo-SARA: singular-value sets m.")
    v_position: Optional[Literal["after", "before"]] = Field(None, description="Mo-SARA: where the scale v sits.")
    storage: Optional[Literal["compact", "full"]] = Field(
        None, description="Mo-SARA: compact files leave out U_k, V_k (rebuilt from the base on load).")
    rank: Optional[int] = Field(None, ge=1, description="LoRA/PiSSA/SORSA rank r.")
    alpha: Optional[float] = Field(None, gt=0.0, description="LoRA: scale alpha/r.")
    gamma: Optional[float] = Field(None, ge=0.0, description="SORSA: regulariser strength.")
    sorsa_update: Optional[Literal["reference", "decoupled"]] = Field(
        None, description="SORSA: regulariser through the optimizer (reference) or a separate step.")
    svd: Optional[Literal["lowrank", "full"]] = Field(None, description="PiSSA/SORSA init SVD route.")
    use_lambda: Optional[bool] = Field(None, description="SARA ablation: train lambda.")
    init_lambda: Optional[Literal["zeros", "ones", "random"]] = Field(None, description="SARA ablation: lambda init.")
    zero_init: Optional[Literal["none", "up"]] = Field(None, description="SARA ablation: zero the output factor U.")

    def layer_options(self) -> dict[str, Any]:
        """The settings the adapter layers take, defaults filled in."""
        return {k: v for k, v in self.model_dump().items() if k not in ("method", "targets") and v is not None}


Template = Literal["alpaca", "plain", "chat"]
Format = Literal["auto", "instruction", "sharegpt", "messages"]
# What `columns` can map: instruction records' fields, and the conversation of a chat record.
ColumnName = Literal["instruction", "input", "output", "system", "history", "messages"]
# LLaMA-Factory's dataset_info `tags`: which keys and role names a conversation's messages use.
TagName = Literal["role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag",
                  "observation_tag", "function_tag"]
# Union tags, never field names, so that _file_error can drop them from error locations.
ONE_FILE, FILE_LIST = "one file", "file list"


class DataFile(Section):
    """One dataset of a list in `data.train_file` / `data.eval_file`; unset keys take the data
    section's values (recipe.yaml records them filled in)."""

    path: str = Field(description="JSON/JSONL/CSV/Parquet file, builtin:NAME, or hub dataset id.")
    split: Optional[str] = Field(None, description="Split of a hub dataset.")
    format: Optional[Format] = Field(None, description="instruction, sharegpt, messages, or auto.")
    columns: Optional[dict[ColumnName, str]] = Field(None, description="Column mapping for this file.")
    tags: Optional[dict[TagName, str]] = Field(None, description="Message keys and role names for this file.")
    template: Optional[Template] = Field(None, description="Prompt template for this file.")
    train_on_inputs: Optional[bool] = Field(None, description="False masks non-target tokens out of the loss.")
    limit: Optional[int] = Field(None, ge=1, description="Use only the first N records of this file.")
    weight: Optional[float] = Field(None, gt=0.0, description="Times each record is used: 2 doubles it, 0.5 takes a seeded half.")


def _which_files(value) -> Optional[str]:
    if isinstance(value, str):
        return ONE_FILE
    return FILE_LIST if isinstance(value, list) else None


Files = Annotated[Union[Annotated[str, Tag(ONE_FILE)], Annotated[list[DataFile], Tag(FILE_LIST)]],
                  Discriminator(_which_files, custom_error_type="files",
                                custom_error_message="give one file (a string) or a list of files")]


class DataSection(Section):
    train_file: Files = Field(description="A file, builtin:NAME or hub dataset id, or a list of them.")
    train_split: str = Field("train", description="Split of a hub dataset.")
    eval_file: Optional[Files] = Field(None, description="Optional evaluation file(s).")
    format: Format = Field("auto", description="Record format: instruction, sharegpt, messages, or auto.")
    columns: dict[ColumnName, str] = Field(
        default_factory=dict, description="Rename dataset columns to sara's fields, e.g. {instruction: query, output: response}.")
    tags: dict[TagName, str] = Field(default_factory=dict, description="Message keys and role names (LLaMA-Factory's tags).")
    template: Template = Field("alpaca", description="Prompt template.")
    cutoff_len: int = Field(256, ge=8, description="Truncate examples to this many tokens.")
    train_on_inputs: Optional[bool] = Field(None, description="False masks prompt tokens out of the loss; default false for chat.")
    loss_on: Optional[Literal["last_turn", "all_assistant_turns"]] = Field(
        None, description="Chat: which assistant turns are targets; default all_assistant_turns.")
    val_set_size: Union[int, float] = Field(0, ge=0, description="Hold out N records (or a fraction) for eval.")
    limit: Optional[int] = Field(None, ge=1, description="Use only the first N records of each file.")
    packing: bool = Field(False, description="Pack records into sequences of cutoff_len tokens.")
    tokenize: Literal["split", "joint"] = Field(
        "split", description="alpaca/plain: split tokenizes prompt and answer apart (a generation prompt is "
                             "then exactly a prefix of the training ids); joint tokenizes the whole text at "
                             "once, as LLM-Adapters does.")

    @model_validator(mode="wrap")
    @classmethod
    def _resolve(cls, data, handler):
        """Fill the settings that depend on others (so recipe.yaml says what the run used), and
        word errors inside a list of files as errors of that file."""
        try:
            return handler(resolve_data_defaults(data) if isinstance(data, dict) else data)
        except ValidationError as exc:
            raise ValidationError.from_exception_data(exc.title, [_file_error(e) for e in exc.errors()]) from None

    def files(self, which: str = "train") -> list[DataFile]:
        """The train or eval datasets, each with every setting filled in ([] without eval files)."""
        value = self.train_file if which == "train" else self.eval_file
        if value is None:
            return []
        if isinstance(value, str):
            return [DataFile.model_validate(_entry(value, self.model_dump(), which))]
        return list(value)


def suggest(key: str, allowed) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(sorted(allowed))}"


def _file_error(err: dict):
    """A validation error without the union's tag in its location; an unknown key of a listed
    file suggests that file's keys."""
    from pydantic_core import InitErrorDetails, PydanticCustomError

    loc = tuple(p for p in err["loc"] if p not in (ONE_FILE, FILE_LIST))
    kind = err["type"]
    if kind == "extra_forbidden" and len(loc) == 3 and loc[0] in ("train_file", "eval_file"):
        kind = PydanticCustomError("unknown_file_key", "unknown key" + suggest(str(loc[-1]), DataFile.model_fields))
    elif kind == "files":
        kind = PydanticCustomError("files", err["msg"])
    elif kind == "model_type" and len(loc) == 2:
        kind = PydanticCustomError("file_entry", "give a path, or a mapping with path and this file's settings")
    details = {"type": kind, "loc": loc, "input": err.get("input")}
    if "ctx" in err and not isinstance(kind, PydanticCustomError):
        details["ctx"] = err["ctx"]
    return InitErrorDetails(**details)


def _entry(value, data: dict, which: str) -> dict:
    """A file of the data section with the section's settings filled in where it sets none."""
    entry = {"path": value} if isinstance(value, str) else dict(value)
    template = entry.get("template") or data.get("template") or "alpaca"
    defaults = {"split": (data.get("train_split") or "train") if which == "train" else "train",
                "format": data.get("format") or "auto", "columns": data.get("columns") or {},
                "tags": data.get("tags") or {}, "template": template, "limit": data.get("limit"),
                "weight": 1.0}
    for key, default in defaults.items():
        if entry.get(key) is None:
            entry[key] = default
    if entry.get("train_on_inputs") is None:
        explicit = data.get("train_on_inputs")
        entry["train_on_inputs"] = explicit if explicit is not None else template != "chat"
    return entry


def resolve_data_defaults(data: dict) -> dict:
    """Fill `train_on_inputs` (false for chat, as assistant turns are the targets), `loss_on`
    (all assistant turns, where a chat file masks its prompts) and every listed file's settings."""
    data = dict(data)
    entries = []
    for which, key in (("train", "train_file"), ("eval", "eval_file")):
        value = data.get(key)
        if isinstance(value, list):
            data[key] = [_entry(e, data, which) if isinstance(e, (str, dict)) else e for e in value]
            entries += [e for e in data[key] if isinstance(e, dict)]
        elif isinstance(value, str):
            entries.append(_entry(value, data, which))
    if data.get("loss_on") is None and any(e["template"] == "chat" and e["train_on_inputs"] is False
                                           for e in entries):
        data["loss_on"] = "all_assistant_turns"
    if data.get("train_on_inputs") is None:
        data["train_on_inputs"] = (data.get("template") or "alpaca") != "chat"
    return data


class TrainSection(Section):
    output_dir: str
    learning_rate: float = Field(3e-4, gt=0.0)
    num_train_epochs: float = Field(3.0, gt=0.0)
    max_steps: int = Field(-1, ge=-1, description="-1: train num_train_epochs; else this many optimizer steps.")
    per_device_train_batch_size: int = Field(4, ge=1)
    per_device_eval_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr_scheduler_type: Literal[SCHEDULERS] = "linear"  # type: ignore[valid-type]
    warmup_steps: float = Field(0, ge=0)
    warmup_ratio: Optional[float] = Field(None, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    label_smoothing_factor: float = Field(0.0, ge=0.0, lt=1.0)
    optim: str = "adamw_torch"
    bf16: Optional[bool] = None
    fp16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 42
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(500, ge=1)
    save_total_limit: Optional[int] = Field(3, ge=1)
    eval_steps: Optional[int] = Field(None, ge=1)
    report_to: Union[str, list[str]] = "none"
    dataloader_num_workers: int = Field(0, ge=0)
    ddp_backend: Optional[Literal["nccl", "gloo", "mpi", "ccl", "hccl"]] = None


class Recipe(Section):
    model: ModelSection
    adapter: AdapterSection
    data: DataSection
    train: TrainSection

    def resolved(self) -> dict:
        """The recipe as a plain dict, method defaults filled in (what is written to the run)."""
        return self.model_dump(mode="json")


SECTIONS = {"model": ModelSection, "adapter": AdapterSection, "data": DataSection, "train": TrainSection}
