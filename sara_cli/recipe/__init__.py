"""Recipes: the YAML that describes a run. The schema, its error messages, overrides and the
cross-field checks; imports only `errors` (and pydantic, yaml), so it loads before torch and every
stage can read its section.
"""

from sara_cli.recipe.checks import REPORTERS, check_report_to
from sara_cli.recipe.load import load_recipe, validate
from sara_cli.recipe.overrides import set_override
from sara_cli.recipe.schema import (METHOD_DEFAULTS, SECTIONS, AdapterSection, DataFile, DataSection,
                                    ModelSection, Recipe, TrainSection, resolve_data_defaults)

__all__ = ["REPORTERS", "check_report_to", "load_recipe", "validate", "set_override", "METHOD_DEFAULTS",
           "SECTIONS", "AdapterSection", "DataFile", "DataSection", "ModelSection", "Recipe",
           "TrainSection", "resolve_data_defaults"]
