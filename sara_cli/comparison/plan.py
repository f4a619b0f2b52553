"""What a comparison runs: its arms, seeds, budget and rates, and one variant per arm, seed and rate.

An arm is a method, optionally with fixed settings (`sara:tau=0.01`). An arm without its size
setting (rank for LoRA/PiSSA/SORSA, tau for SARA/Mo-SARA) is sized to the budget: a rank by
division, a tau by bisection on the cached spectra, the rule `sara analyze --match-lora-rank` uses.
Everything here is checked before a model loads, except the sizes, which need the spectra.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sara_cli.errors import SaraError
from sara_cli.recipe.schema import METHOD_DEFAULTS

SIZE_KEY = {"lora": "rank", "pissa": "rank", "sorsa": "rank", "sara": "tau", "mosara": "tau"}
TOLERANCE = 0.02  # a budget is met within 2% of its parameter count
DEFAULT_HOLDOUT = 200


@dataclass(frozen=True)
class Arm:
    """One line of the comparison: a method and the settings given for it in --methods."""

    label: str  # as written: "sara", "sara:tau=0.01"
    method: str
    settings: dict = field(default_factory=dict, hash=False)

    @property
    def budgeted(self) -> bool:
        """True when the budget sets this arm's size (its spec does not)."""
        return SIZE_KEY[self.method] not in self.settings

    @property
    def slug(self) -> str:
        """The label as a folder name: sara:tau=0.01 -> sara-tau0.01."""
        return re.sub(r"[^A-Za-z0-9.]+", "-", self.label.replace("=", "")).strip("-")


@dataclass(frozen=True)
class Budget:
    kind: str  # none, lora-rank or params
    value: int = 0

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}={self.value}"


def _value(text: str):
    """A setting's value as YAML reads it: 0.01 -> float, 5 -> int, true -> bool."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_arms(text: str) -> list[Arm]:
    """--methods: `method[:key=value...]`, comma-separated, e.g. lora,sara,sara:tau=0.01.

    Raises:
        SaraError: an unknown method or setting, a malformed entry, or an arm given twice.
    """
    arms: list[Arm] = []
    for entry in [e.strip() for e in text.split(",") if e.strip()]:
        method, *pairs = entry.split(":")
        if method not in METHOD_DEFAULTS:
            raise SaraError(f"unknown method '{method}' in --methods; allowed: {', '.join(METHOD_DEFAULTS)}")
        settings = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not value:
                raise SaraError(f"--methods entry '{entry}': write settings as {method}:key=value")
            if key not in METHOD_DEFAULTS[method]:
                raise SaraError(f"--methods entry '{entry}': '{key}' is not a {method} setting; allowed: "
                                f"{', '.join(METHOD_DEFAULTS[method])}")
            settings[key] = _value(value)
        if any(a.label == entry for a in arms):
            raise SaraError(f"--methods names '{entry}' twice; give each arm once")
        arms.append(Arm(entry, method, settings))
    if not arms:
        raise SaraError("--methods is empty; name methods, e.g. --methods lora,sara")
    return arms


def parse_seeds(text: str) -> list[int]:
    """--seeds: distinct non-negative integers, comma-separated."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SaraError(f"--seeds must be whole numbers separated by commas, e.g. 0,1,2; got '{text}'") from None
    if not seeds or min(seeds) < 0:
        raise SaraError(f"--seeds needs at least one seed, each 0 or more; got '{text}'")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise SaraError(f"--seeds repeats {', '.join(map(str, repeated))}; a repeated seed is the same run, "
                        "so give each seed once")
    return seeds


def parse_budget(text: str) -> Budget:
    """--budget: none, lora-rank=R or params=N."""
    if text == "none":
        return Budget("none")
    kind, _, value = text.partition("=")
    if kind in ("lora-rank", "params"):
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number >= 1:
            return Budget(kind, number)
    raise SaraError(f"--budget must be none, lora-rank=R or params=N (R, N at least 1); got '{text}'")


def _per_method(text: str, flag: str, arms: list[Arm], parse) -> dict:
    methods = {a.method for a in arms}
    found = {}
    for entry in [e.strip() for e in text.split(",") if e.strip()]:
        method, sep, value = entry.partition("=")
        if not sep or method not in METHOD_DEFAULTS:
            raise SaraError(f"{flag} entry '{entry}': write method=value, e.g. lora=3e-4")
        value = parse(value, entry)
        if method in methods:  # another method's rate is kept out, so one --lr serves several runs
            found[method] = value
    return found


def _rate(value: str, entry: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        rate = 0.0
    if not rate > 0 or rate != rate or rate == float("inf"):
        raise SaraError(f"learning rate '{value}' in '{entry}' must be a positive number, e.g. 3e-4")
    return rate


def parse_rates(rates: str | None, grid: str | None, arms: list[Arm]) -> tuple[dict, dict]:
    """--lr (one rate per method) and --lr-grid (rates separated by ':'), as {method: rate} and
    {method: [rates]}, for the methods of `arms` (others may be named and are left out). A grid must cover every method with as many points, so that no method is
    tuned more finely than another.

    Raises:
        SaraError: a malformed entry, a method given in both, an uneven grid.
    """
    fixed = _per_method(rates or "", "--lr", arms, _rate)
    grids = _per_method(grid or "", "--lr-grid",  arms,
                        lambda value, entry: sorted({_rate(v, entry) for v in value.split(":")}))
    both = sorted(set(fixed) & set(grids))
    if both:
        raise SaraError(f"{', '.join(both)} has a rate in --lr and a grid in --lr-grid; give one")
    if grids:
        methods = sorted({a.method for a in arms})
        missing = [m for m in methods if m not in grids]
        sizes = {len(g) for g in grids.values()}
        if missing or len(sizes) > 1:
            raise SaraError("--lr-grid must give every method in --methods a grid of the same size, so no "
                            f"method is tuned more finely than another (got {_grid_text(grids)}"
                            + (f"; missing {', '.join(missing)})" if missing else ")"))
    return fixed, grids


def _grid_text(grids: dict) -> str:
    return ", ".join(f"{m}={':'.join(f'{r:g}' for r in rates)}" for m, rates in grids.items())


# -- sizes from the budget -----------------------------------------------------------------------

def parameter_count(method: str, options: dict, matrices) -> int:
    """Trainable parameters of `method` with `options` on `matrices` (analysis MatrixResults with
    their spectra), by each method's formula (docs/methods.md)."""
    from sara_cli.analysis.analyze import lora_count, mosara_count, sara_count
    from sara_cli.model.spectrum import rank_for_tau

    if method in ("lora", "pissa", "sorsa"):  # SORSA adds its r singular values per matrix
        extra = options["rank"] * len(matrices) if method == "sorsa" else 0
        return lora_count(matrices, options["rank"]) + extra
    experts = options.get("num_experts") or METHOD_DEFAULTS["mosara"]["num_experts"]
    total = 0
    for m in matrices:
        k = rank_for_tau(m.spectrum, options["tau"])
        total += (sara_count(m.shape, k) if method == "sara" else
                  mosara_count(m.shape, k, experts, options.get("v_position") == "before"))
    return total


def budget_count(budget: Budget, matrices) -> int:
    """The budget as a parameter count: LoRA rank R's count on these matrices, or N."""
    from sara_cli.analysis.analyze import lora_count

    if budget.kind == "lora-rank":
        return lora_count(matrices, budget.value)
    return budget.value


def size_for_budget(method: str, options: dict, matrices, target: int) -> tuple[dict, int]:
    """The size setting whose count is nearest `target`: ({rank: r} or {tau: t}, count)."""
    if method in ("lora", "pissa", "sorsa"):
        per_rank = parameter_count(method, {**options, "rank": 1}, matrices)
        low = max(1, target // per_rank)
        rank = min((low, low + 1), key=lambda r: (abs(r * per_rank - target), r))
        return {"rank": rank}, rank * per_rank
    from sara_cli.analysis.analyze import match_count

    tau, count = match_count(lambda t: parameter_count(method, {**options, "tau": t}, matrices), target)
    return {"tau": tau}, count


def within_budget(count: int, target: int) -> bool:
    return abs(count - target) <= TOLERANCE * target
