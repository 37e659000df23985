"""Backbones: wpeft's adapter around ``aurora.Aurora``, named configs and the shipped pretrained
backbone (pretraining itself is :mod:`wpeft.training.pretrain`)."""
