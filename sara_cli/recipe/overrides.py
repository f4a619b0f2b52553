"""Command-line overrides of a recipe: `section.key=value`, the value parsed as YAML."""

from __future__ import annotations

from sara_cli.errors import SaraError
from sara_cli.recipe.messages import suggest
from sara_cli.recipe.schema import SECTIONS


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
        raise SaraError(f"override '{override}': unknown section '{section}'{suggest(section, SECTIONS)}")
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
