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


MAX_VALUES = 100_000  # a recipe has a few hundred; anchors and aliases can multiply them without end


def _loader():
    """A safe YAML loader that refuses a key given twice in one mapping and a document that
    expands, through anchors and aliases, to more than MAX_VALUES values ("billion laughs")."""
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        def construct_document(self, node):
            size = _expanded_size(node, {})
            if size > MAX_VALUES:
                raise _Refused(f"expands to more than {MAX_VALUES:,d} values through YAML anchors and "
                               "aliases (&name, *name); a recipe has a few hundred: remove the repeated aliases")
            return super().construct_document(node)

        def construct_mapping(self, node, deep=False):
            lines: dict[str, int] = {}
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                    line = key.start_mark.line + 1
                    if key.value in lines:
                        raise _Refused(f"key '{key.value}' is given twice in one mapping (line "
                                       f"{lines[key.value]} and line {line}); YAML would keep only the "
                                       "last: keep one of them")
                    lines[key.value] = line
            return super().construct_mapping(node, deep)

    return RecipeLoader


class _Refused(Exception):
    """A recipe YAML shape that is valid YAML but refused (see `_loader`)."""


def _expanded_size(node, sizes: dict) -> int:
    """How many values `node` holds once every alias is expanded; linear time (each node counted
    once, its size reused wherever an alias repeats it)."""
    import yaml

    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = 0  # a recursive alias adds nothing more
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    else:
        size = 1
    sizes[id(node)] = size
    return size


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
        raw = yaml.load(path.read_text(), Loader=_loader())
    except _Refused as exc:
        raise SaraError(f"{path}: {exc}") from None
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
