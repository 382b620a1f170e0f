"""Scripted batch inference: a prompts file in, a folder of PNGs plus a manifest out."""
