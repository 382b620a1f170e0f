"""The text-to-image call: ``LatentDiffusion`` and the steps of a call (request, prompts, starts,
sampling, VAE, recipe), the samplers by name, and the fast path."""
