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
