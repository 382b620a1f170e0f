"""What a model is and how its weights are stored: architectures, diffusers folders, single-file
checkpoints, safe tensor loading, weight hashes, the shipped CLIP tokenizer, LoRA and textual
inversion."""
