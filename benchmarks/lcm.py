"""The default model's LCM-LoRA against its teacher, in one run: every ``latentdiff eval`` figure, and
the wall time per image.

- Figures: ``latentdiff eval`` on the same data sets, prompts and seeds; the teacher guided at
  ``--guidance`` with ``--steps`` steps and its own sampler, the LCM-LoRA at ``--lcm-steps`` steps with
  the ``lcm`` sampler and no guidance pass. The gap is in points (percentage points; dB for the VAE,
  which the LoRA does not touch).
- Time: one image at a time, teacher and LCM-LoRA in turn (``interleaved`` from inference.py), so
  that both see the same machine; the median of ``--runs`` rounds.

Issue 20's target: every figure within 10 points of the teacher's, and at least 8x less time per image.

    OMP_NUM_THREADS=1 python benchmarks/lcm.py --data data/shapes data/emoji
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_json  # noqa: E402
from inference import interleaved  # noqa: E402

PROMPTS = ["a red circle at the top on an orange background", "blue heart"]


def figures(report: dict, guidance: float) -> dict[str, float]:
    """The eval report's figures at one guidance scale, flat: name -> value (accuracies in %)."""
    out = {}
    g = str(guidance)
    if "shapes" in report:
        for name, value in report["shapes"]["accuracy"][g].items():
            out[f"shapes {name}"] = 100 * value
    if "emoji" in report:
        for name, value in report["emoji"]["retrieval"][g].items():
            out[f"emoji {name}"] = 100 * value
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="data sets made by 'latentdiff data' (shapes, emoji)")
    p.add_argument("--guidance", type=float, default=5.0, help="the teacher's guidance (default 5, the one distilled)")
    p.add_argument("--steps", type=int, default=25, help="the teacher's steps (default 25)")
    p.add_argument("--lcm-steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=64, help="held-out shapes captions (default 64)")
    p.add_argument("--captions", type=int, default=50, help="emoji captions (default 50)")
    p.add_argument("--runs", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="benchmarks/results/lcm.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from latentdiff import LatentDiffusion
    from latentdiff.evaluate import EvalConfig, evaluate

    teacher = LatentDiffusion.from_pretrained()
    student = LatentDiffusion.from_pretrained(lcm=True)
    common = {"data": [Path(d) for d in args.data], "prompts": args.prompts, "captions": args.captions, "psnr_images": 16}
    teacher_report = evaluate(EvalConfig(**common, guidance=(args.guidance,), steps=args.steps), pipe=teacher)
    student_report = evaluate(EvalConfig(**common, steps=args.lcm_steps, scheduler="lcm", lcm=True), pipe=student)
    ours, theirs = figures(student_report, 1.0), figures(teacher_report, args.guidance)
    gaps = {name: ours[name] - theirs[name] for name in theirs}

    size = teacher.default_size
    one = {"height": size, "width": size, "seed": 0, "output_type": "np", "progress": False}
    timed = interleaved(
        {
            "teacher": lambda: teacher(PROMPTS[:1], num_inference_steps=args.steps, guidance_scale=args.guidance, **one),
            "lcm": lambda: student(PROMPTS[:1], num_inference_steps=args.lcm_steps, guidance_scale=1.0,
                                   scheduler="lcm", **one),  # fmt: skip
        },
        args.runs,
        1,
        "cpu",
    )
    seconds = {name: statistics.median(times) for name, (times, _) in timed.items()}
    speedup = seconds["teacher"] / seconds["lcm"]
    met = all(gap >= -10 for gap in gaps.values()) and speedup >= 8
    result = {"command": "python benchmarks/lcm.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "torch": torch.__version__, "threads": args.threads, "teacher": {"steps": args.steps, "guidance": args.guidance,
              "figures": theirs, "seconds_per_image": seconds["teacher"]}, "lcm": {"steps": args.lcm_steps,
              "figures": ours, "seconds_per_image": seconds["lcm"]}, "gap_points": gaps, "speedup": speedup,
              "target_met": met, "vae_psnr_db": {k: v["psnr_db"] for k, v in teacher_report["vae"].items()}}  # fmt: skip
    print(f"teacher: {args.steps} steps, guidance {args.guidance:g}; LCM-LoRA: {args.lcm_steps} steps, no guidance pass; "
          f"{args.threads} thread(s)")  # fmt: skip
    print(f"  {'figure':28} {'teacher':>9} {'LCM-LoRA':>9} {'gap':>8}")
    for name in theirs:
        print(f"  {name:28} {theirs[name]:8.1f}% {ours[name]:8.1f}% {gaps[name]:+7.1f}")
    print(f"  {'seconds per image':28} {seconds['teacher']:9.3f} {seconds['lcm']:9.3f} {speedup:7.2f}x")
    print(f"target (every figure within 10 points, at least 8x faster): {'met' if met else 'missed'}")
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
