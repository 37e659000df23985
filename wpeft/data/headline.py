"""The headline variables of the built-in tasks (the paper's), by task name.

Kept apart from :mod:`wpeft.tasks` (which imports torch and Aurora) so that the dashboard can
read them: a task class takes its ``headline`` from here, and a test checks the two agree.
"""

from __future__ import annotations

__all__ = ["BUILTIN_HEADLINES", "GLOBAL_HEADLINE"]

#: The paper's headline variables for global tasks (T2m, U10, V10, T850, Z500), WB2 names.
GLOBAL_HEADLINE: tuple[str, ...] = (
    "2m_temperature",
    "10m_u_component_of_wind",
    "10m_v_component_of_wind",
    "temperature_850",
    "geopotential_500",
)

#: Task name -> headline variables (precipitation: the 6-hourly total at 12, 24 and 36 h leads).
BUILTIN_HEADLINES: dict[str, tuple[str, ...]] = {
    "downscaling": GLOBAL_HEADLINE,
    "postprocessing": GLOBAL_HEADLINE,
    "precipitation": tuple(f"total_precipitation_6hr_{h}h" for h in (12, 24, 36)),
}
