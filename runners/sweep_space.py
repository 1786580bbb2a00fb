"""The search space of ``runner sweep``: ``--grid`` specs parsed, typed and validated before any trial starts.

A spec is ``KEY=V1,V2,...`` (discrete values: a grid dimension, or a choice for random / Optuna search) or, for
``--search random|optuna`` only, ``KEY=uniform:LOW:HIGH``, ``KEY=loguniform:LOW:HIGH`` or ``KEY=randint:LOW:HIGH``
(``HIGH`` included). ``KEY`` is any ``--set`` key of the task or estimator config. Every value (both ends of a
range) is planned with :func:`lvzoo.runners.plan.plan_run`, so an unknown key, a value of the wrong type or one the
config's validators refuse is a one-line :class:`ConfigError`; values are typed as the config stores them.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from lvzoo.runners.plan import ESTIMATOR_PREFIX, TASK_PREFIX, ConfigError, RunPlan, config_to_dict, plan_run

Search = Literal["grid", "random", "optuna"]
RANGE_KINDS = ("uniform", "loguniform", "randint")
#: The seed is a dimension of every sweep's space under this key.
SEED_KEY = "seed"
#: Epoch metrics of the training loop itself (``lvzoo.runners.trainer``), valid for every task.
LOOP_METRICS = (
    "train_loss",
    "support_mean",
    "support_p10",
    "support_median",
    "support_p90",
    "decoder_calls",
    "decoder_calls_epoch",
    "epoch_time_s",
    "val_time_s",
)


@attrs.frozen
class Dimension:
    """One searched key: discrete ``values`` or a range ``kind`` over ``[low, high]`` (typed values)."""

    key: str
    values: tuple[Any, ...] = ()
    kind: str | None = None
    low: Any = None
    high: Any = None

    def describe(self) -> str:
        if self.kind is None:
            return ",".join(map(str, self.values))
        return f"{self.kind}:{self.low}:{self.high}"


@attrs.frozen
class Space:
    """The validated search space: the dimensions, the seeds and how they are searched."""

    dimensions: tuple[Dimension, ...]
    seeds: tuple[int, ...]
    search: Search
    samples: int

    def param_space(self) -> dict[str, Any]:
        """Ray Tune's ``param_space``: ``grid_search`` (grid) or ``choice`` / distributions (random, Optuna)."""
        from ray import tune

        space: dict[str, Any] = {}
        for dim in self.dimensions:
            if dim.kind is None:
                space[dim.key] = (
                    tune.grid_search(list(dim.values)) if self.search == "grid" else tune.choice(list(dim.values))
                )
            elif dim.kind == "uniform":
                space[dim.key] = tune.uniform(dim.low, dim.high)
            elif dim.kind == "loguniform":
                space[dim.key] = tune.loguniform(dim.low, dim.high)
            else:
                space[dim.key] = tune.randint(dim.low, dim.high + 1)
        if self.search == "optuna":
            space[SEED_KEY] = self.seeds[0]
        else:
            space[SEED_KEY] = tune.grid_search(list(self.seeds))
        return space

    def to_params(self) -> dict[str, str]:
        """MLflow params of the parent run: ``space.<key>`` for every dimension, the seeds and the search."""
        params = {f"space.{dim.key}": dim.describe() for dim in self.dimensions}
        params.update(
            {"space.seed": ",".join(map(str, self.seeds)), "search": self.search, "samples": str(self.samples)}
        )
        return params

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> Space:
        data = json.loads(text)
        dims = tuple(
            Dimension(d["key"], tuple(d["values"]), d["kind"], d["low"], d["high"]) for d in data["dimensions"]
        )
        return cls(dims, tuple(data["seeds"]), data["search"], int(data["samples"]))


def _split_spec(spec: str) -> tuple[str, str]:
    key, sep, text = spec.partition("=")
    key, text = key.strip(), text.strip()
    if not sep or not key or not text:
        raise ConfigError(f"--grid expects KEY=V1,V2,... or KEY=uniform|loguniform|randint:LOW:HIGH, got {spec!r}")
    if key == SEED_KEY:
        raise ConfigError("the seed is not a --grid key; use --seeds S1,S2,...")
    return key, text


def plan_value(plan: RunPlan, key: str) -> Any:
    """The value a ``--set`` key resolved to in ``plan`` (``task.x`` / ``estimator.x`` / a bare unambiguous name)."""
    task_values, estimator_values = config_to_dict(plan.task_config), config_to_dict(plan.estimator_config)
    if key.startswith(TASK_PREFIX) and key[len(TASK_PREFIX) :] in task_values:
        return task_values[key[len(TASK_PREFIX) :]]
    if key.startswith(ESTIMATOR_PREFIX) and key[len(ESTIMATOR_PREFIX) :] in estimator_values:
        return estimator_values[key[len(ESTIMATOR_PREFIX) :]]
    return task_values[key] if key in task_values else estimator_values[key]


def _canonical_key(key: str, plan: RunPlan) -> str:
    """``task.x`` / ``estimator.x`` for a bare key (the plan has already refused unknown and ambiguous keys)."""
    if key.startswith((TASK_PREFIX, ESTIMATOR_PREFIX)):
        return key
    return TASK_PREFIX + key if key in config_to_dict(plan.task_config) else ESTIMATOR_PREFIX + key


@attrs.frozen
class Planner:
    """Plans one run of the sweep's task and estimator with the ``--set`` overrides plus a point of the space."""

    task: Any
    estimator: Any
    overrides: Mapping[str, Any]
    epochs: int | None
    data_dir: Path | None

    def plan(self, point: Mapping[str, Any], seed: int = 0) -> RunPlan:
        # validated on the CPU: the driver need not have the trials' accelerator
        return plan_run(
            self.task,
            self.estimator,
            {**self.overrides, **point},
            epochs=self.epochs,
            seed=seed,
            device="cpu",
            data_dir=self.data_dir,
        )


def parse_space(
    planner: Planner, specs: Sequence[str], seeds: Sequence[int], search: Search, samples: int
) -> tuple[Space, list[RunPlan]]:
    """The validated space and the plans of its discrete grid points (every combination of the discrete values;
    for ranges, both ends), refusing any bad key or value with a one-line :class:`ConfigError`."""
    if samples < 1:
        raise ConfigError(f"--samples must be a positive int, got {samples}")
    if search == "optuna" and len(seeds) > 1:
        raise ConfigError("--search optuna searches one seed; pass a single --seeds value (one sweep per seed)")
    raw: dict[str, list[str] | tuple[str, str, str]] = {}
    for spec in specs:
        key, text = _split_spec(spec)
        if key in raw:
            raise ConfigError(f"--grid key {key!r} given twice")
        kind, _, rest = text.partition(":")
        if kind in RANGE_KINDS and rest:
            if search == "grid":
                raise ConfigError(f"--grid {key}={text}: ranges need --search random or optuna")
            low, sep, high = rest.partition(":")
            if not sep or not low or not high:
                raise ConfigError(f"--grid {key}={text}: a range is {kind}:LOW:HIGH")
            raw[key] = (kind, low, high)
        else:
            values = [item.strip() for item in text.split(",") if item.strip()]
            if len(set(values)) != len(values):
                raise ConfigError(f"--grid {key} has duplicate values: {text!r}")
            raw[key] = values
    base = planner.plan({})
    discrete = {key: value for key, value in raw.items() if isinstance(value, list)}
    ranges = {key: value for key, value in raw.items() if isinstance(value, tuple)}
    plans = [planner.plan(dict(zip(discrete, combo, strict=True))) for combo in itertools.product(*discrete.values())]
    dimensions: list[Dimension] = []
    for key, values in discrete.items():
        typed = tuple(plan_value(planner.plan({key: value}), key) for value in values)
        dimensions.append(Dimension(_canonical_key(key, base), typed))
    for key, (kind, low_text, high_text) in ranges.items():
        low, high = (plan_value(planner.plan({key: text}), key) for text in (low_text, high_text))
        numeric = int if kind == "randint" else (int, float)
        if isinstance(low, bool) or not isinstance(low, numeric) or not isinstance(high, numeric):
            raise ConfigError(f"--grid {key}: {kind} needs {'int' if kind == 'randint' else 'numeric'} bounds")
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(
                f"--grid {key}: {kind} needs 0 < LOW < HIGH"
                if kind == "loguniform"
                else f"--grid {key}: {kind} needs LOW < HIGH"
            )
        dimensions.append(Dimension(_canonical_key(key, base), (), kind, low, high))
    keys = [dim.key for dim in dimensions]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--grid names the same config field twice: {', '.join(keys)}")
    return Space(tuple(dimensions), tuple(seeds), search, samples), plans


def check_metric(metric: str, reported: Sequence[str]) -> None:
    """Refuse a selection metric the trials will not report (``reported``: the task's ``val_*`` names)."""
    accepted = sorted({*reported, *LOOP_METRICS})
    if metric not in accepted:
        raise ConfigError(f"the task does not report metric {metric!r}; accepted: {', '.join(accepted)}")
