"""Checks the schema cannot express field by field: settings that do not apply to the chosen
method, data settings that cannot work together, pairs of settings where one would silently
override the other, and loggers whose package is missing.
"""

from __future__ import annotations

from sara_cli.errors import SaraError
from sara_cli.recipe.schema import METHOD_DEFAULTS, _entry


def applicability(raw: dict) -> list[str]:
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


def conflicts(raw: dict) -> list[str]:
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
