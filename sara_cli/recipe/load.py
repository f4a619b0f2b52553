"""Reading a recipe: YAML -> overrides -> schema and cross-field checks -> a `Recipe`, with every
problem reported at once in one `SaraError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sara_cli.errors import SaraError
from sara_cli.recipe.checks import applicability, conflicts
from sara_cli.recipe.messages import format_validation_error
from sara_cli.recipe.overrides import set_override
from sara_cli.recipe.schema import METHOD_DEFAULTS, Recipe


def validate(raw: Any, source: str = "recipe", overridden: dict[str, str] | None = None) -> Recipe:
    """Validate a raw recipe dict; every problem is reported in one SaraError.

    Args:
        overridden: {"section.key": the override that set it}, so a message can name it.

    Raises:
        SaraError: one line for a single problem; a header and one line per problem otherwise.
    """
    if not isinstance(raw, dict):
        raise SaraError(f"{source}: a recipe is a YAML mapping with sections model, adapter, data, train")
    problems = applicability(raw) + conflicts(raw)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems += format_validation_error(exc, overridden or {})
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
