"""Samplers by name: the diffusers scheduler each name stands for, built from the model's own config.

Every sampler is a diffusers scheduler built from the model's own scheduler config (the dict
read from ``scheduler/scheduler_config.json``) plus a few named options. We build from that raw
dict rather than from an in-memory scheduler's ``.config``: diffusers' ``from_config`` drops the
keys a scheduler took as *defaults* (``config._use_default_values``), so going through another
scheduler class would silently change, for example, ``timestep_spacing``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import InvalidInputError


@dataclass(frozen=True)
class SamplerSpec:
    class_name: str  # a diffusers scheduler class
    options: dict[str, Any] = field(default_factory=dict)


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec("DDIMScheduler"),
    "ddpm": SamplerSpec("DDPMScheduler"),
    "pndm": SamplerSpec("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": SamplerSpec("LMSDiscreteScheduler"),
    "euler": SamplerSpec("EulerDiscreteScheduler"),
    "euler_a": SamplerSpec("EulerAncestralDiscreteScheduler"),
    "heun": SamplerSpec("HeunDiscreteScheduler"),
    "dpmpp_2m": SamplerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpmpp_2m_karras": SamplerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    # diffusers' DPMSolverSDEScheduler draws its Brownian noise from one seed for the whole
    # batch (or the global RNG) and ignores the per-image generators, which would break the
    # seed contract; the multistep SDE solver draws from the generators.
    "dpmpp_sde_karras": SamplerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": SamplerSpec("UniPCMultistepScheduler"),
    "lcm": SamplerSpec("LCMScheduler"),
}


def check_sampler_name(name: str) -> SamplerSpec:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise InvalidInputError(
            f"unknown scheduler {name!r}; valid names: {', '.join(SAMPLERS)}"
        ) from None


def make_scheduler(name: str, model_config: dict[str, Any]):
    """A fresh diffusers scheduler ``name`` built from the model's raw scheduler config."""
    import diffusers

    spec = check_sampler_name(name)
    cls = getattr(diffusers, spec.class_name)
    config = {k: v for k, v in model_config.items() if k != "_class_name"}
    return cls.from_config(config, **spec.options)


def fresh_scheduler(pipe, name: Optional[str]):
    """A new scheduler for one run (schedulers keep per-run state): sampler ``name`` built from the
    model's raw config, or with None a new instance of ``pipe.scheduler`` (the model's own, or
    whatever the user set it to) with its config."""
    if name is None:
        return type(pipe.scheduler).from_config(pipe.scheduler.config)
    return make_scheduler(name, pipe.scheduler_config)


def scheduler_from_config(model_config: dict[str, Any]):
    """The model's own scheduler, as its folder names it."""
    import diffusers

    class_name = model_config.get("_class_name")
    cls = getattr(diffusers, str(class_name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise InvalidInputError(
            f"scheduler config names class {class_name!r}, which diffusers does not have; "
            f"fix scheduler/scheduler_config.json or pass scheduler= one of: {', '.join(SAMPLERS)}"
        )
    return cls.from_config(model_config)


# -- A1111 sampler names -------------------------------------------------------------------------
# The A1111 web UI names a sampler by a label plus a "Schedule type" (since 1.9; before that the
# schedule was part of the label: "DPM++ 2M Karras"). Each of our samplers as A1111 names it, and
# which A1111 (label, schedule) pairs run as which of ours. "Automatic" is the sampler's default
# schedule here. Pairs not listed (DPM++ SDE, DPM2, Restart, exponential schedules, ...) have no
# latentdiff equivalent and are refused by name rather than swapped for something else.
A1111_NAMES: dict[str, tuple[str, str]] = {
    "euler_a": ("Euler a", "Automatic"),
    "euler": ("Euler", "Automatic"),
    "lms": ("LMS", "Automatic"),
    "heun": ("Heun", "Automatic"),
    "dpmpp_2m": ("DPM++ 2M", "Uniform"),
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
    "dpmpp_sde_karras": ("DPM++ 2M SDE", "Karras"),  # the multistep SDE solver, see above
    "ddim": ("DDIM", "Automatic"),
    "pndm": ("PLMS", "Automatic"),
    "unipc": ("UniPC", "Automatic"),
    "lcm": ("LCM", "Automatic"),
    "ddpm": ("DDPM", "Automatic"),  # not an A1111 sampler; written so that the infotext is true
}
_A1111_EXTRA = {  # further pairs that run as one of ours: A1111 calls DPM++ 2M's default Karras
    ("DPM++ 2M", "Automatic"): "dpmpp_2m_karras",
    ("DPM++ 2M SDE", "Automatic"): "dpmpp_sde_karras",
}
_A1111_ALIASES = {  # A1111's old k-diffusion aliases -> (label, schedule)
    "k_euler_a": ("Euler a", "Automatic"), "k_euler_ancestral": ("Euler a", "Automatic"),
    "k_euler": ("Euler", "Automatic"), "k_lms": ("LMS", "Automatic"), "k_heun": ("Heun", "Automatic"),
    "k_dpmpp_2m": ("DPM++ 2M", "Automatic"), "k_dpmpp_2m_ka": ("DPM++ 2M", "Karras"),
    "k_dpmpp_2m_sde_ka": ("DPM++ 2M SDE", "Karras"),
}  # fmt: skip
A1111_SCHEDULES = ("Automatic", "Uniform", "Karras")
# The model's own scheduler (scheduler=None) by its diffusers class, where the class alone says which it is.
_BY_CLASS = {spec.class_name: name for name, spec in SAMPLERS.items() if not spec.options}
_BY_CLASS["PNDMScheduler"] = "pndm"


def from_a1111(sampler: str, schedule: Optional[str] = None) -> str:
    """Our sampler name for an A1111 sampler label (``"DPM++ 2M"``, ``"DPM++ 2M Karras"``,
    ``"k_euler_a"``) and schedule type (``"Karras"``; None or ``"Automatic"``: the default).
    Our own names are accepted as they are. Raises ``InvalidInputError`` naming what cannot be mapped.
    """
    if sampler in SAMPLERS and not schedule:
        return sampler
    label, sched = _A1111_ALIASES.get(sampler.lower(), (sampler.strip(), None))
    words = label.rsplit(" ", 1)
    if sched is None and len(words) == 2 and words[1].lower() in ("karras", "uniform"):  # "DPM++ 2M Karras"
        label, sched = words[0], words[1]
    given = (schedule or "Automatic").strip()
    if sched is not None and schedule and given.lower() not in ("automatic", sched.lower()):
        raise InvalidInputError(f"sampler {sampler!r} names schedule {sched}, but the schedule type is {schedule!r}")
    sched = sched or given
    labels = {la.lower(): la for la, _ in A1111_NAMES.values()}
    schedules = {s.lower(): s for s in A1111_SCHEDULES}
    key = (labels.get(label.lower(), label), schedules.get(sched.lower(), sched))
    table = {pair: name for name, pair in A1111_NAMES.items()} | _A1111_EXTRA
    if key in table:
        return table[key]
    if key[0] in labels.values():
        ok = sorted({s for (la, s) in table if la == key[0]})
        raise InvalidInputError(f"sampler {key[0]!r} with schedule type {key[1]!r} has no latentdiff equivalent; "
                                f"schedule types for it: {', '.join(ok)}")  # fmt: skip
    raise InvalidInputError(
        f"sampler {sampler!r} has no latentdiff equivalent; A1111 samplers that map: "
        f"{', '.join(dict.fromkeys(la for la, _ in A1111_NAMES.values()))} (or a latentdiff name: {', '.join(SAMPLERS)})"
    )


def to_a1111(name: Optional[str], scheduler_class: Optional[str] = None) -> tuple[str, str]:
    """(A1111 sampler label, schedule type) of our sampler ``name``; for None (the model's own
    scheduler) by its diffusers class, or the class name itself where no label fits."""
    if name is None:
        name = _BY_CLASS.get(scheduler_class or "")
        if name is None:
            return scheduler_class or "unknown", "Automatic"
    return A1111_NAMES[name]
