"""Train or fine-tune a latentdiff model: read a TOML config and run the library's trainer.

    accelerate launch training/train.py --config training/configs/lora-sd15.toml [--set key=value ...]

Same as ``latentdiff train --config ...``; see training/README.md.
"""

import sys

from latentdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
