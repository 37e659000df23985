"""wpeft: parameter-efficient fine-tuning of weather foundation models (WeatherPEFT and baselines)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
