"""The README's sample grids: prompts drawn by a model, one labelled row per prompt.

    python inference/samples.py -o docs/samples.png                      # the committed grid (guidance 5)
    python inference/samples.py --guidance 1 5 -o docs/guidance.png      # the same prompts without and with CFG

The default prompts are held-out shapes captions (combinations the default model never saw in
training) and emoji names. Options: --model FOLDER, --seeds 0 1 2 3, --steps 25, --guidance G [G ...],
--scale 2 (pixels per image pixel), prompts as arguments. With --controlnet PATH (or default) and one
--control-images FILE per prompt, each row starts with its control image:

    latentdiff data shapes data/shapes-control --count 16 --control silhouette
    python inference/samples.py --controlnet default -o docs/controlnet.png \
        --control-images data/shapes-control/test/00000[0-3]_conditioning_image.png -- \
        "an orange square in the center on a blue background" "a black triangle on the right on a red background" \
        "a green star at the bottom on an orange background" "a black circle at the bottom on a blue background"

(the captions of those four held-out rows).
"""

import argparse

from PIL import Image

from latentdiff import LatentDiffusion
from latentdiff.fileio import atomic_write
from latentdiff.generation.images import grid

PROMPTS = [
    # held out of the shapes training set: never seen together in training
    "a red circle at the top on an orange background",
    "a yellow star in the bottom right on a green background",
    "a purple square in the top right on a white background",
    "a white triangle in the bottom left on a black background",
    # emoji names (training captions of the emoji set)
    "red apple",
    "sunflower",
    "rocket",
    "blue heart",
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", nargs="*", default=PROMPTS, help="prompts (default: the README's list)")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="one column per seed")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, nargs="+", default=[5.0], help="one block of columns per value")
    parser.add_argument("--scale", type=int, default=2, help="enlarge each image this many times (default 2)")
    parser.add_argument("--controlnet", default=None, help="a ControlNet folder or file, or 'default'")
    parser.add_argument("--control-images", nargs="+", default=None, metavar="FILE", help="one per prompt")
    parser.add_argument("-o", "--output", default="samples.png")
    args = parser.parse_args(argv)
    controls = args.control_images or []
    if (args.controlnet is None) != (not controls) or (controls and len(controls) != len(args.prompts)):
        parser.error("--controlnet takes --control-images, one per prompt")
    pipe = LatentDiffusion.from_pretrained(args.model)
    if args.controlnet:
        pipe.load_controlnet(args.controlnet)
    images = []
    for i, prompt in enumerate(args.prompts):
        control = {}
        if controls:
            picture = Image.open(controls[i]).convert("RGB")
            images.append(picture.resize((pipe.default_size,) * 2))
            control = {"control_image": picture}
        for guidance in args.guidance:
            result = pipe(prompt, num_images_per_prompt=len(args.seeds), seed=list(args.seeds),
                          num_inference_steps=args.steps, guidance_scale=guidance, **control)  # fmt: skip
            images += result.images
    several = len(args.guidance) > 1
    columns = [f"g {g:g}, seed {s}" if several else f"seed {s}" for g in args.guidance for s in args.seeds]
    columns = ["control image"] * bool(controls) + columns
    sheet = grid(images, columns=len(columns), row_labels=list(args.prompts), column_labels=columns, scale=args.scale)
    with atomic_write(args.output) as f:
        sheet.save(f, format="PNG")
    print(f"wrote {args.output}: {len(args.prompts)} prompts x {len(columns)} images")


if __name__ == "__main__":
    main()
