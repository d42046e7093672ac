"""Training: the synthetic shapes world, its judge, the training loop and recipes."""
