"""Training under Accelerate: the configuration, the set-up, the loop, the objective, checkpoints,
the VAE stage and what a run writes."""
