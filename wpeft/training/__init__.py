"""Fine-tuning runs: the training loop and the comparison matrix."""
