"""wpeft: parameter-efficient fine-tuning of weather foundation models (WeatherPEFT and baselines)."""

import importlib.util

# The eccodes wheel (GRIB reading via cfgrib) bundles its own PROJ library. When it is loaded
# before pyproj's (cartopy maps), the two copies crash the interpreter at exit. Loading pyproj
# first, where it is installed, avoids that for every wpeft user.
if importlib.util.find_spec("pyproj") is not None:
    import pyproj  # noqa: F401

__version__ = "0.1.0"

__all__ = ["__version__"]
