"""The paper's three set-ups as named recipes: one command and the paths of your data.

A recipe is a complete :class:`~wpeft.training.loop.TrainConfig` except for where the data live::

    wpeft recipes                                          # list them
    wpeft train --recipe paper-downscaling \\
        --data-path /data/wb1/1.40625deg --coarse-path /data/wb1/5.625deg \\
        --checkpoint aurora-0.25-pretrained.ckpt --out runs/downscaling --dry-run

Everything else (variables, levels, region, periods, leads, loss weights, the prompt count
P = 30 / 5 / 20 of METHOD.md §4, budget and optimiser) comes from the recipe and may be
overridden on the command line (``--steps``, ``--task-option data.region=[...]``, ...).

What the paper states is kept (variables, levels, resolutions, leads, region size, loss weights,
P). What it leaves open is marked ``# our choice`` below: the exact periods (WeatherBench's
customary 1979-2015 / 2016 / 2017-2018 split for downscaling, ENS-10's own 1998-2015 training
years with the last two as validation, and an ERA5-CH split), the China box's corners, and the
optimiser settings.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wpeft.errors import ConfigError
from wpeft.options import set_dotted

__all__ = ["RECIPES", "Recipe", "get_recipe"]

#: Aurora's 13 pressure levels (hPa), the WeatherBench2 set.
LEVELS_13 = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)
_AURORA_SURFACE = ("2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind")
_AURORA_ATMOS = (
    "temperature",
    "u_component_of_wind",
    "v_component_of_wind",
    "specific_humidity",
    "geopotential",
)


@dataclass(frozen=True)
class Recipe:
    """A named set-up.

    Attributes:
        name: What ``--recipe`` takes.
        task: The task it trains.
        summary: One line for ``wpeft recipes``.
        paths: ``{path name: task option}`` the user supplies, e.g. ``{"data": "data.path"}``;
            the CLI offers ``--<name>-path`` for each. The first is required.
        task_options: The task's settings (``data`` without its path).
        method / method_options / budget / backbone / steps / batch_size / lr: The run.
        example: Example paths (WeatherBench2 / ENS-10 names) for the README and ``--help``.
    """

    name: str
    task: str
    summary: str
    paths: Mapping[str, str]
    task_options: Mapping[str, Any]
    method: str = "weatherpeft"
    method_options: Mapping[str, Any] = field(default_factory=dict)
    budget: float | None = 0.003
    backbone: str = "1.3b"
    steps: int = 20_000
    batch_size: int = 1
    lr: float = 1e-4
    example: Mapping[str, str] = field(default_factory=dict)

    def train_options(self, paths: Mapping[str, str], **overrides: Any) -> dict[str, Any]:
        """The keyword arguments of ``TrainConfig`` with the user's ``paths`` filled in.

        Args:
            paths: ``{path name: path}``; names must be among :attr:`paths`, the first required.
            overrides: ``TrainConfig`` fields to change (``steps=2``, ``backbone="tiny"``).
                ``task_options`` are merged into the recipe's key by key, nested mappings too
                (``{"data": {"train": [...]}}`` or ``{"data.train": [...]}`` change the
                training period and keep the rest of ``data``).

        Raises:
            ConfigError: a missing or unknown path name.
        """
        unknown = sorted(set(paths) - set(self.paths))
        if unknown:
            raise ConfigError(
                f"Recipe {self.name!r} takes paths {sorted(self.paths)}; got unknown {unknown}."
            )
        first = next(iter(self.paths))
        if not paths.get(first):
            raise ConfigError(
                f"Recipe {self.name!r} needs --{first}-path (e.g. {self.example.get(first, 'PATH')})."
            )
        task_options = copy.deepcopy(dict(self.task_options))
        for name, path in paths.items():
            set_dotted(task_options, self.paths[name], str(path))
        _deep_update(task_options, overrides.pop("task_options", None) or {})
        method_options = dict(self.method_options) | dict(overrides.pop("method_options", None) or {})
        options: dict[str, Any] = dict(
            task=self.task,
            method=self.method,
            budget=self.budget,
            backbone=self.backbone,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            task_options=task_options,
            method_options=method_options,
        )
        options.update(overrides)
        return options


def _deep_update(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """Merge ``extra`` into ``base`` in place: nested mappings key by key, dotted keys into
    nested mappings, anything else replaced."""
    for key, value in extra.items():
        if "." in key:
            set_dotted(base, key, copy.deepcopy(value))
        elif isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="paper-downscaling",
            task="downscaling",
            summary="ERA5 5.625° -> 1.40625° (WeatherBench), 2t/10u/10v + t/u/v/q/z at 13 levels, P = 30",
            paths={"data": "data.path", "coarse": "coarse_path"},
            task_options={
                "data": {
                    "variables": list(_AURORA_SURFACE + _AURORA_ATMOS),
                    "levels": list(LEVELS_13),
                    "train": ["1979-01-01", "2015-12-31"],  # our choice (WeatherBench's split)
                    "val": ["2016-01-01", "2016-12-31"],
                    "test": ["2017-01-01", "2018-12-31"],
                    "time_step_hours": 6,
                },
                "surface_weight": 0.25,
                "atmos_weight": 1.0,
            },
            method_options={"num_prompts": 30},
            example={
                "data": "weatherbench/1.40625deg",
                "coarse": "weatherbench/5.625deg",
            },
        ),
        Recipe(
            name="paper-postprocessing",
            task="postprocessing",
            summary="ENS-10 (10 members, 0.5°) + ERA5 truth at +48 h, Gaussian CRPS on T850/Z500/T2m, P = 5",
            paths={"data": "data.path", "truth": "truth_path"},
            task_options={
                "data": {
                    "variables": ["2m_temperature", "temperature", "geopotential"],
                    "levels": [500, 850],
                    "train": ["1998-01-01", "2013-12-31"],  # our choice: ENS-10 trains on
                    "val": ["2014-01-01", "2015-12-31"],  # 1998-2015, we hold 2014-15 out
                    "test": ["2016-01-01", "2017-12-31"],  # ENS-10's test years
                },
                "lead_hours": 48,
            },
            method_options={"num_prompts": 5},
            example={"data": "ens10/", "truth": "era5-0.5deg.zarr"},
        ),
        Recipe(
            name="paper-precipitation",
            task="precipitation",
            summary="ERA5 0.25° China 240 x 240, 6-h precipitation at +12/+24/+36 h, P = 20",
            paths={"data": "data.path"},
            task_options={
                "data": {
                    "region": [15.25, 75.0, 70.0, 129.75],  # our choice of corners: 240 x 240
                    "train": ["2000-01-01", "2016-12-31"],  # our choice
                    "val": ["2017-01-01", "2017-12-31"],
                    "test": ["2018-01-01", "2018-12-31"],
                    "time_step_hours": 6,
                },
                "input_gap_hours": 12,
                "leads_hours": [12, 24, 36],
            },
            method_options={"num_prompts": 20},
            example={
                "data": "gs://weatherbench2/datasets/era5/"
                "1959-2023_01_10-wb13-6h-1440x721_with_derived_variables.zarr"
            },
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    """A recipe by name; unknown names list the known ones."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"Unknown recipe {name!r}; recipes: {sorted(RECIPES)}.") from None
