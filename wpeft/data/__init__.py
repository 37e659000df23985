"""Data: the internal schema, the embedded synthetic world, and readers for real ERA5 data."""
