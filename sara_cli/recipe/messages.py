"""Recipe errors as users read them: one line per problem, naming the field, the value received
and what the field accepts (read from the schema), with a did-you-mean for unknown keys.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import ValidationError

from sara_cli.recipe.schema import SECTIONS, suggest


def describe_expected(section: str, key: str) -> str:
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


def format_validation_error(error: ValidationError, overridden: dict[str, str]) -> list[str]:
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
            lines.append(f"{loc}: unknown section{suggest(loc, SECTIONS)}")
        elif err["type"] == "extra_forbidden":
            section = str(err["loc"][0])
            allowed = SECTIONS[section].model_fields if section in SECTIONS else SECTIONS
            lines.append(f"{loc}: unknown key{suggest(str(err['loc'][-1]), allowed)}")
        elif err["type"] == "missing":
            lines.append(f"{loc}: required but missing")
        else:
            field = ".".join(str(p) for p in err["loc"][:2])
            source = f" (from the override {overridden[field]})" if field in overridden else ""
            # Literal errors already list the allowed values.
            expected = (describe_expected(*map(str, err["loc"][:2]))
                        if len(err["loc"]) >= 2 and err["type"] != "literal_error" else "")
            lines.append(f"{loc}: got {err.get('input')!r}{source}; {err['msg'].lower()}"
                         + (f"; expected {expected}" if expected else ""))
    return lines
