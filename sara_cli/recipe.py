"""Recipes: the YAML that describes a run, validated by a pydantic schema.

A recipe has four sections, `model`, `adapter`, `data` and `train`. The `train` section uses
transformers' `TrainingArguments` names unchanged. Every problem is reported at once, one line
each, naming the field, the value received and what is allowed; unknown keys get a
did-you-mean suggestion, and a setting that does not apply to the chosen method is an error.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from sara_cli.errors import SaraError

Method = Literal["sara", "mosara", "lora", "pissa", "sorsa"]
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
              "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr",
              "cosine_warmup_with_min_lr", "warmup_stable_decay")

# Adapter settings each method accepts (beyond method, targets, dropout), with paper defaults.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "sara": {"tau": 0.01, "use_lambda": True, "init_lambda": "zeros", "zero_init": "none"},
    "mosara": {"tau": 0.5, "num_experts": 5, "v_position": "after"},
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


def _file_error(err: dict):
    """A validation error without the union's tag in its location; an unknown key of a listed
    file suggests that file's keys."""
    from pydantic_core import InitErrorDetails, PydanticCustomError

    loc = tuple(p for p in err["loc"] if p not in (ONE_FILE, FILE_LIST))
    kind = err["type"]
    if kind == "extra_forbidden" and len(loc) == 3 and loc[0] in ("train_file", "eval_file"):
        kind = PydanticCustomError("unknown_file_key", "unknown key" + _suggest(str(loc[-1]), DataFile.model_fields))
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


def _suggest(key: str, allowed) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(sorted(allowed))}"


def _applicability(raw: dict) -> list[str]:
    """Settings given for a method they do not apply to."""
    adapter = raw.get("adapter")
    if not isinstance(adapter, dict) or adapter.get("method") not in METHOD_DEFAULTS:
        return []
    method = adapter["method"]
    problems = []
    all_method_keys = set().union(*METHOD_DEFAULTS.values())
    for key, value in adapter.items():
        # null means unset, so a resolved recipe (every key, None where unused) loads again
        if value is not None and key in all_method_keys and key not in METHOD_DEFAULTS[method]:
            users = [m for m, d in METHOD_DEFAULTS.items() if key in d]
            problems.append(f"adapter.{key}: does not apply to method '{method}' (it is a setting of "
                            f"{', '.join(users)}); remove it")
    # null takes the default, as validate() fills it in
    init_lambda, use_lambda = adapter.get("init_lambda") or "zeros", adapter.get("use_lambda") is not False
    if method == "sara" and adapter.get("zero_init") == "up" and init_lambda == "zeros" and use_lambda:
        problems.append("adapter.zero_init: 'up' with init_lambda 'zeros' can never train (U = 0 and "
                        "lambda = 0 make every gradient zero); set init_lambda: ones or zero_init: none")
    return problems


CONVERSATION_COLUMNS = {"messages", "system"}
INSTRUCTION_COLUMNS = {"instruction", "input", "output", "system", "history"}


def _data_problems(data: dict) -> list[str]:
    """Data settings that cannot work together, per file (checked before defaults are filled)."""
    problems, files = [], []
    for key in ("train_file", "eval_file"):
        value = data.get(key)
        if isinstance(value, str):
            files.append((f"data.{key}", _entry(value, data, "train")))
        elif isinstance(value, list):
            files += [(f"data.{key}.{i}", _entry(v, data, "train")) for i, v in enumerate(value)
                      if isinstance(v, (str, dict))]
    for where, entry in files:
        fmt, template, columns = entry["format"], entry["template"], entry["columns"]
        columns = set(columns) if isinstance(columns, dict) else set()
        if fmt in ("sharegpt", "messages") and template != "chat":
            problems.append(f"{where}: format {fmt} holds conversations, which only template: chat renders; "
                            "set template: chat")
        if fmt in ("sharegpt", "messages") and columns - CONVERSATION_COLUMNS:
            problems.append(f"{where}: columns {', '.join(sorted(columns - CONVERSATION_COLUMNS))} do not apply "
                            f"to format {fmt} (it maps messages and system)")
        elif fmt == "instruction" and "messages" in columns:
            problems.append(f"{where}: columns.messages does not apply to format instruction; "
                            "use format: sharegpt or messages")
        if template != "chat" and columns & {"system", "history"}:
            problems.append(f"{where}: columns {', '.join(sorted(columns & {'system', 'history'}))} need "
                            "template: chat (alpaca and plain prompts have no system prompt or history)")
    if data.get("loss_on") is not None and not any(
            e["template"] == "chat" and e["train_on_inputs"] is False for _, e in files):
        problems.append(f"data.loss_on: got {data['loss_on']!r}, but no file uses template: chat with "
                        "train_on_inputs: false; loss_on picks which assistant turns are targets, so remove it")
    return problems


def _conflicts(raw: dict) -> list[str]:
    """Pairs of settings where one would silently override or break the other."""
    problems = []
    data, train, model = raw.get("data"), raw.get("train"), raw.get("model")
    if isinstance(model, dict) and model.get("load_in_4bit") is True and model.get("load_in_8bit") is True:
        problems.append("model.load_in_8bit: load_in_4bit and load_in_8bit are both true; choose one")
    if isinstance(data, dict):
        problems += _data_problems(data)
    if isinstance(data, dict) and data.get("eval_file") and data.get("val_set_size"):
        problems.append(f"data.val_set_size: got {data['val_set_size']!r} together with data.eval_file; "
                        "the eval file would replace the held-out split, so set only one")
    if isinstance(train, dict):
        if train.get("warmup_ratio") is not None and train.get("warmup_steps"):
            problems.append(f"train.warmup_ratio: got {train['warmup_ratio']!r} together with warmup_steps "
                            f"{train['warmup_steps']!r}; the ratio would win, so set only one")
        if train.get("bf16") is True and train.get("fp16") is True:
            problems.append("train.fp16: bf16 and fp16 are both true; choose one mixed precision")
        steps = train.get("max_steps")
        if steps == 0 and not isinstance(steps, bool):  # the Trainer would run one step at lr 0
            problems.append("train.max_steps: got 0, which trains nothing; give a positive number of "
                            "steps, or -1 to train for num_train_epochs")
    return problems


def _expected(section: str, key: str) -> str:
    """What a field accepts, from its schema: 'a number with 0 < tau <= 1', 'one of: a, b'."""
    import typing

    model = SECTIONS.get(section)
    info = model.model_fields.get(key) if model is not None else None
    if info is None:
        return ""
    annotation = info.annotation
    kinds = typing.get_args(annotation) if typing.get_origin(annotation) is Union else (annotation,)
    kinds = [k for k in kinds if k is not type(None)]
    literals = [v for k in kinds if typing.get_origin(k) is Literal for v in typing.get_args(k)]
    if literals:
        return "one of: " + ", ".join(map(str, literals))
    noun = ("an integer" if int in kinds and float not in kinds else "a number" if float in kinds
            else "true or false" if bool in kinds else "a string" if str in kinds else "")
    signs = {"gt": ("<", ">"), "ge": ("<=", ">="), "lt": ("<", "<"), "le": ("<=", "<=")}
    bounds = {attr: getattr(item, attr) for item in info.metadata for attr in signs
              if getattr(item, attr, None) is not None}
    low = next(((a, v) for a, v in bounds.items() if a in ("gt", "ge")), None)
    high = next(((a, v) for a, v in bounds.items() if a in ("lt", "le")), None)
    if noun and low and high:
        return f"{noun} with {low[1]:g} {signs[low[0]][0]} {key} {signs[high[0]][0]} {high[1]:g}"
    if noun and (low or high):
        attr, value = low or high
        return f"{noun} {signs[attr][1]} {value:g}"
    return noun


def _format_pydantic(error: ValidationError, overridden: dict[str, str]) -> list[str]:
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
            lines.append(f"{loc}: unknown section{_suggest(loc, SECTIONS)}")
        elif err["type"] == "extra_forbidden":
            section = str(err["loc"][0])
            allowed = SECTIONS[section].model_fields if section in SECTIONS else SECTIONS
            lines.append(f"{loc}: unknown key{_suggest(str(err['loc'][-1]), allowed)}")
        elif err["type"] == "missing":
            lines.append(f"{loc}: required but missing")
        else:
            field = ".".join(str(p) for p in err["loc"][:2])
            source = f" (from the override {overridden[field]})" if field in overridden else ""
            # Literal errors already list the allowed values.
            expected = (_expected(*map(str, err["loc"][:2]))
                        if len(err["loc"]) >= 2 and err["type"] != "literal_error" else "")
            lines.append(f"{loc}: got {err.get('input')!r}{source}; {err['msg'].lower()}"
                         + (f"; expected {expected}" if expected else ""))
    return lines


def set_override(raw: dict, override: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML (numbers, bools, lists).

    Raises:
        SaraError: not section.key=value, an unknown section, or a value that is not YAML.
    """
    import yaml

    if "=" not in override or "." not in override.split("=", 1)[0]:
        raise SaraError(f"override '{override}' is not section.key=value, e.g. adapter.tau=0.02")
    path, value = override.split("=", 1)
    section, key = path.split(".", 1)
    if section not in SECTIONS:
        raise SaraError(f"override '{override}': unknown section '{section}'{_suggest(section, SECTIONS)}")
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise SaraError(f"recipe section '{section}' must be a mapping")
    try:
        raw[section][key] = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SaraError(f"override '{override}': the value {value!r} is not valid YAML ({problem}); "
                        f"close brackets and quotes, e.g. adapter.targets=[q_proj,v_proj] or "
                        f"{path}='text'") from None


def validate(raw: Any, source: str = "recipe", overridden: dict[str, str] | None = None) -> Recipe:
    """Validate a raw recipe dict; every problem is reported in one SaraError.

    Args:
        overridden: {"section.key": the override that set it}, so a message can name it.

    Raises:
        SaraError: one line for a single problem; a header and one line per problem otherwise.
    """
    if not isinstance(raw, dict):
        raise SaraError(f"{source}: a recipe is a YAML mapping with sections model, adapter, data, train")
    problems = _applicability(raw) + _conflicts(raw)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems += _format_pydantic(exc, overridden or {})
        recipe = None
    if len(problems) == 1:
        raise SaraError(f"{source}: {problems[0]}")
    if problems:
        raise SaraError(f"{source} has {len(problems)} problems:\n  " + "\n  ".join(problems))
    for key, value in METHOD_DEFAULTS[recipe.adapter.method].items():
        if getattr(recipe.adapter, key) is None:
            setattr(recipe.adapter, key, value)
    return recipe


def load_recipe(path: Path | str, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file.

    Raises:
        SaraError: missing file, invalid YAML, or any schema problem (all listed at once).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SaraError(f"recipe {path} does not exist; give the path of a YAML recipe (see recipes/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SaraError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    raw = raw if raw is not None else {}
    if not isinstance(raw, dict):  # checked before overrides, which need a mapping
        return validate(raw, str(path))
    overridden = {}
    for override in overrides or []:
        set_override(raw, override)
        overridden[override.split("=", 1)[0]] = override
    return validate(raw, str(path), overridden)


# report_to name -> the package its integration needs
REPORTERS = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow", "comet_ml": "comet_ml",
             "clearml": "clearml", "neptune": "neptune", "aim": "aim", "dvclive": "dvclive",
             "swanlab": "swanlab", "trackio": "trackio"}


def check_report_to(report_to) -> None:
    """Fail before any work when train.report_to names a logger whose package is missing.

    Raises:
        SaraError: an unknown logger name, or one whose package is not installed.
    """
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to)
    for name in names:
        if name in ("none", "all"):
            continue
        package = REPORTERS.get(name)
        if package is None:
            raise SaraError(f"train.report_to: unknown logger '{name}'; use none, all or one of "
                            f"{', '.join(sorted(REPORTERS))}")
        found = importlib.util.find_spec(package) is not None or (
            name == "tensorboard" and importlib.util.find_spec("tensorboardX") is not None)
        if not found:
            raise SaraError(f"train.report_to: {name} needs the {package} package, which is not "
                            f"installed; pip install {package}, or set report_to: none")
