"""The README's sample grid: each listed prompt with the default model, one row per prompt.

    python inference/samples.py -o docs/samples.png     # (what made the committed grid)

Options: --model FOLDER, --seeds 0 1 2 3, --steps 25, --guidance 5, prompts as arguments.
"""

import argparse

from latentdiff import LatentDiffusion
from latentdiff.fileio import atomic_write
from latentdiff.generation.images import grid

PROMPTS = [
    "red apple",
    "sunflower",
    "a red circle in the top left on a blue background",
    "a yellow star in the center on a black background",
    "a green triangle in the bottom right on a white background",
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", nargs="*", default=PROMPTS, help="prompts (default: the README's list)")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="one column per seed")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("-o", "--output", default="samples.png")
    args = parser.parse_args(argv)
    pipe = LatentDiffusion.from_pretrained(args.model)
    images = []
    for prompt in args.prompts:
        result = pipe(prompt, num_images_per_prompt=len(args.seeds), seed=list(args.seeds),
                      num_inference_steps=args.steps, guidance_scale=args.guidance)  # fmt: skip
        images += result.images
    with atomic_write(args.output) as f:
        grid(images, columns=len(args.seeds)).save(f, format="PNG")
    print(f"wrote {args.output}: {len(args.prompts)} prompts x {len(args.seeds)} seeds")


if __name__ == "__main__":
    main()
