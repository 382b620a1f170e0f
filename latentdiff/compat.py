"""Which third-party releases work together, said in one line instead of a traceback.

pip resolves each of our dependencies to its newest release independently, and a pair of releases
can disagree in a way that neither declares in its metadata (transformers 5.24's ``add_adapter``
refuses peft < 0.22, and the newest peft on the index was 0.21.2). ``DependencyError`` names both
releases and the command that fixes it; ``declared_conflicts`` finds the pairs that *are*
declared (what ``pip check`` reports) so a test can name them too.
"""

from __future__ import annotations

import importlib.metadata as md
import re

from .errors import LatentDiffusionError

# Our own floor for LoRA: ``peft.inject_adapter_in_model`` with ``init_lora_weights="gaussian"`` and
# ``get_peft_model_state_dict`` on a plain module (what the trainer and the tests call).
PEFT_FOR_LORA = "0.17"


class DependencyError(LatentDiffusionError, ImportError):
    """Two installed releases do not work together, or one is too old for a feature."""


def installed(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """'0.21.2' -> (0, 21, 2); pre/post/local parts are ignored (enough for floors we set)."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def require(name: str, minimum: str, feature: str, *, because: str = "") -> str:
    """Return ``name``'s installed version, or raise a one-line ``DependencyError`` naming the pair."""
    have = installed(name)
    if have is None:
        raise DependencyError(f"{feature} needs {name} >= {minimum}, which is not installed: pip install '{name}>={minimum}'")
    if _release(have) < _release(minimum):
        why = f" ({because})" if because else ""
        raise DependencyError(
            f"{feature} needs {name} >= {minimum}, but {name} {have} is installed{why}; "
            f"run: pip install -U '{name}>={minimum}'"
        )
    return have


def versions(names=("torch", "diffusers", "transformers", "accelerate", "peft", "datasets", "safetensors")) -> dict:
    """Installed versions of the stack (None where absent): for model cards, reports and errors."""
    return {name: installed(name) for name in names}


def declared_conflicts(root: str = "latentdiff") -> list[str]:
    """One line per requirement that an installed distribution declares and the environment breaks.

    Walks the dependency closure of ``root`` the way ``pip check`` does (``root``'s own extras count
    where their packages are installed; other packages' extras do not), e.g. ``"transformers 5.24.0 requires huggingface-hub>=1.0, but 0.9.0 is installed"``.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    seen: set[str] = set()
    todo = [root]
    problems: list[str] = []
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for text in dist.requires or []:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                # Another package's extras are not ours to judge (nobody asked for transformers[dev]);
                # our own extras count wherever their package is installed.
                if key != root or "extra" not in str(req.marker) or installed(req.name) is None:
                    continue
            have = installed(req.name)
            if have is None:
                if req.marker is None:
                    problems.append(f"{dist.metadata['Name']} {dist.version} requires {req}, which is not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{dist.metadata['Name']} {dist.version} requires {req}, but {req.name} {have} is installed")
            todo.append(req.name)
    return problems
