"""Training data: finding and checking captioned images, aspect-ratio buckets and per-sample
choices, the latent cache, and the built-in data sets (``builders``)."""
