"""Write constraints.txt from a `pip freeze` of an environment where the whole suite passed.

usage: python .ci/write_constraints.py FREEZE_FILE constraints.txt   (run by `bash .ci/newest --freeze`)
"""
import datetime
import os
import platform
import sys

src, dst = sys.argv[1], sys.argv[2]
pins = [line.strip() for line in open(src) if "==" in line and not line.lower().startswith("latentdiff")]
torch = next((p for p in pins if p.lower().startswith("torch==")), "torch==?")
header = f"""\
# The exact releases the whole suite last passed with, on Python {platform.python_version()} ({platform.machine()}),
# {datetime.date.today().isoformat()}, with every optional extra installed. Written by `bash .ci/newest --freeze`.
# .ci/run and the README's quick start install with it (pip install -c constraints.txt ...).
# torch is left out on purpose: it was {torch.split('==')[1].split('+')[0]} (CPU build), and a pin here would replace
# a user's CUDA/ROCm build; install the build that fits your hardware first.
"""
body = "".join(p + "\n" for p in pins if not p.lower().startswith(("torch==", "nvidia-", "triton==")))
tmp = dst + ".tmp"
with open(tmp, "w") as f:
    f.write(header + body)
os.replace(tmp, dst)
