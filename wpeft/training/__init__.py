"""Training: the fine-tuning loop, the comparison matrix and pretraining the backbone."""
