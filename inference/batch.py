"""Batch inference entry point: ``accelerate launch inference/batch.py PROMPTS --out DIR [options]``.

The same code and options as ``latentdiff batch`` (see ``latentdiff batch --help``); every process
of the launch takes its own share of the images.
"""

import sys

from latentdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
