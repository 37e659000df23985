"""Backbones: wpeft's adapter around ``aurora.Aurora``, named configs and pretraining."""
