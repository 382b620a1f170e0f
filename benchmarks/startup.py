"""Start-up time of the command line: wall time of whole commands, and where the imports go.

Runs each command ``--runs`` times, interleaved (round r runs every command once before round
r + 1), in fresh processes, and prints the median and the minimum wall time. Then runs the generate
command once more under ``python -X importtime`` and prints the top-level packages by cumulative
import time, so the cost can be traced to what imports it.

    OMP_NUM_THREADS=1 python benchmarks/startup.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_json  # noqa: E402


def commands(out: str) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "import latentdiff": [py, "-c", "import latentdiff"],
        "latentdiff --help": [py, "-m", "latentdiff", "--help"],
        "import torch": [py, "-c", "import torch"],
        "import diffusers' U-Net + VAE + transformers' CLIP": [py, "-c",
            "import diffusers.models.unets.unet_2d_condition, diffusers.models.autoencoders.autoencoder_kl, "
            "transformers.models.clip.modeling_clip"],  # fmt: skip
        'latentdiff generate "red apple" --seed 1': [py, "-m", "latentdiff", "generate", "red apple", "--seed", "1",
                                                     "-o", out, "--no-progress"],  # fmt: skip
    }


def import_profile(command: list[str], top: int) -> list[tuple[str, float]]:
    """(package, cumulative seconds) of the first-level imports ``command`` makes, largest first."""
    done = subprocess.run([command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True, check=True)
    totals: dict[str, float] = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
        if not cumulative.isdigit():
            continue
        raw = line.split("|")[2]
        if len(raw) - len(raw.lstrip(" ")) == 1:  # a module imported at the top level of the process
            totals[name] = totals.get(name, 0.0) + int(cumulative) / 1e6
    return sorted(totals.items(), key=lambda kv: -kv[1])[:top]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--top", type=int, default=12, help="packages listed in the import profile")
    p.add_argument("--json", default="benchmarks/results/startup.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(str(Path(tmp) / "a.png"))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        for cmd in cmds.values():  # once each, untimed: the file cache is warm for every command alike
            subprocess.run(cmd, capture_output=True, check=True, env=env)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for _ in range(args.runs):
            for name, cmd in cmds.items():
                start = time.perf_counter()
                subprocess.run(cmd, capture_output=True, check=True, env=env)
                times[name].append(time.perf_counter() - start)
        profile = import_profile(cmds['latentdiff generate "red apple" --seed 1'], args.top)
    result = {"command": "python benchmarks/startup.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "threads": env["OMP_NUM_THREADS"], "cpus": os.cpu_count(),
              "wall_s": {n: {"median": statistics.median(t), "min": min(t), "runs": t} for n, t in times.items()},
              "generate_imports_s": dict(profile)}  # fmt: skip
    print(f"wall time, {args.runs} interleaved runs each (OMP_NUM_THREADS={env['OMP_NUM_THREADS']}):")
    for name, row in result["wall_s"].items():
        print(f"  {name:55} median {row['median']:6.2f} s   min {row['min']:6.2f} s")
    print("generate: top-level imports by cumulative time (python -X importtime, one run):")
    for name, seconds in profile:
        print(f"  {name:55} {seconds:6.2f} s")
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
