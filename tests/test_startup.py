"""Start-up: ``import latentdiff`` and ``latentdiff --help`` load neither torch nor diffusers nor
transformers (each costs seconds); the lazy exports still work."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

HEAVY = {"torch", "diffusers", "transformers", "fastapi", "uvicorn", "ray", "fsspec"}


def imported_by(*args: str) -> set[str]:
    """Top-level packages that ``python -X importtime ARGS`` imports (read from its import log)."""
    done = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s*(\S+)\s*$", done.stderr, flags=re.M)}


def test_import_latentdiff_loads_no_heavy_library():
    code = "import json, sys, latentdiff; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = set(json.loads(done.stdout))
    assert "latentdiff" in loaded and not loaded & HEAVY, sorted(loaded & HEAVY)
    assert not imported_by("-c", "import latentdiff") & HEAVY  # the import log agrees


@pytest.mark.parametrize("command", [[], ["generate"], ["batch"], ["train"], ["info"], ["convert"], ["data"],
                                     ["eval"], ["schedules"], ["serve"]])  # fmt: skip
def test_help_loads_no_heavy_library(command):
    loaded = imported_by("-m", "latentdiff", *command, "--help")
    assert not loaded & HEAVY, sorted(loaded & HEAVY)


def test_the_lazy_exports_resolve():
    code = (
        "import json, sys, latentdiff\n"
        "names = {n: type(getattr(latentdiff, n)).__name__ for n in latentdiff.__all__}\n"
        "print(json.dumps([names, 'torch' in sys.modules, 'LatentDiffusion' in dir(latentdiff)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    names, torch_loaded, listed = json.loads(done.stdout.strip().splitlines()[-1])
    assert names["LatentDiffusion"] == names["GenerationResult"] == "type" and names["call_kwargs"] == "function"
    assert names["__version__"] == "str" and torch_loaded and listed
