"""Recipes: the YAML that describes a run, validated by a pydantic schema.

A recipe has four sections, `model`, `adapter`, `data` and `train`. The `train` section uses
transformers' `TrainingArguments` names unchanged. Every problem is reported at once, one line
each, naming the field, the value received and what is allowed; unknown keys get a
did-you-mean suggestion, and a setting that does not apply to the chosen method is an error.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name_or_path: str = Field(description="Local checkpoint folder, builtin:NAME, or hub id.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype of the frozen base; auto keeps the checkpoint's.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")
    attn_implementation: Optional[Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3",
                                          "flex_attention"]] = Field(None, description="Attention kernel.")


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


class DataSection(Section):
    train_file: str = Field(description="JSON/JSONL/CSV/Parquet file, builtin:NAME, or hub dataset id.")
    train_split: str = Field("train", description="Split of a hub dataset.")
    eval_file: Optional[str] = Field(None, description="Optional evaluation file.")
    columns: dict[Literal["instruction", "input", "output"], str] = Field(
        default_factory=dict, description="Rename dataset columns to instruction/input/output, e.g. {instruction: mr, output: ref}.")
    template: Literal["alpaca", "plain", "chat"] = Field("alpaca", description="Prompt template.")
    cutoff_len: int = Field(256, ge=8, description="Truncate examples to this many tokens.")
    train_on_inputs: bool = Field(True, description="False masks prompt tokens out of the loss.")
    val_set_size: Union[int, float] = Field(0, ge=0, description="Hold out N records (or a fraction) for eval.")
    limit: Optional[int] = Field(None, ge=1, description="Use only the first N training records.")


class TrainSection(Section):
    output_dir: str
    learning_rate: float = Field(3e-4, gt=0.0)
    num_train_epochs: float = Field(3.0, gt=0.0)
    max_steps: int = Field(-1, ge=-1)
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


def _conflicts(raw: dict) -> list[str]:
    """Pairs of settings where one would silently override or break the other."""
    problems = []
    data, train = raw.get("data"), raw.get("train")
    if isinstance(data, dict) and data.get("eval_file") and data.get("val_set_size"):
        problems.append(f"data.val_set_size: got {data['val_set_size']!r} together with data.eval_file; "
                        "the eval file would replace the held-out split, so set only one")
    if isinstance(train, dict):
        if train.get("warmup_ratio") is not None and train.get("warmup_steps"):
            problems.append(f"train.warmup_ratio: got {train['warmup_ratio']!r} together with warmup_steps "
                            f"{train['warmup_steps']!r}; the ratio would win, so set only one")
        if train.get("bf16") is True and train.get("fp16") is True:
            problems.append("train.fp16: bf16 and fp16 are both true; choose one mixed precision")
    return problems


def _format_pydantic(error: ValidationError) -> list[str]:
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
            lines.append(f"{loc}: got {err.get('input')!r}; {err['msg'].lower()}")
    return lines


def set_override(raw: dict, override: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML (numbers, bools, lists)."""
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
    raw[section][key] = yaml.safe_load(value) if value != "" else None


def validate(raw: Any, source: str = "recipe") -> Recipe:
    """Validate a raw recipe dict; every problem is reported in one SaraError."""
    if not isinstance(raw, dict):
        raise SaraError(f"{source}: a recipe is a YAML mapping with sections model, adapter, data, train")
    problems = _applicability(raw) + _conflicts(raw)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems += _format_pydantic(exc)
        recipe = None
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise SaraError(f"{source} has {count}:\n  " + "\n  ".join(problems))
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
    for override in overrides or []:
        set_override(raw, override)
    return validate(raw, str(path))
