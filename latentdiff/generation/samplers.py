"""Samplers by name, and the training noise schedules.

Every sampler is a diffusers scheduler built from the model's own scheduler config (the dict
read from ``scheduler/scheduler_config.json``) plus a few named options. We build from that raw
dict rather than from an in-memory scheduler's ``.config``: diffusers' ``from_config`` drops the
keys a scheduler took as *defaults* (``config._use_default_values``), so going through another
scheduler class would silently change, for example, ``timestep_spacing``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

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


# ---------------------------------------------------------------------------------------------
# Training noise schedules: beta_t for t = 1..T and the quantities derived from it.

# name -> keyword arguments of diffusers' DDPMScheduler that produce it
NOISE_SCHEDULES: dict[str, dict[str, Any]] = {
    # Ho et al. 2020, Sec. 4: betas linear from 1e-4 to 0.02 over T = 1000.
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    # Stable Diffusion: linear in sqrt(beta) from sqrt(0.00085) to sqrt(0.012).
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    # Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T)+s)/(1+s) * pi/2),
    # s = 0.008, betas clipped at 0.999.
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
}


def noise_schedule_config(name: str, num_train_timesteps: int = 1000, zero_terminal_snr: bool = False) -> dict:
    """A scheduler config (``DDPMScheduler`` keys) for training noise schedule ``name``.

    ``zero_terminal_snr`` rescales the betas so that alpha_bar_T = 0 (Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1).
    """
    if name not in NOISE_SCHEDULES:
        raise InvalidInputError(f"unknown noise schedule {name!r}; valid names: {', '.join(NOISE_SCHEDULES)}")
    if num_train_timesteps < 2:
        raise InvalidInputError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": num_train_timesteps,
        "rescale_betas_zero_snr": zero_terminal_snr,
        **NOISE_SCHEDULES[name],
    }


def alphas_cumprod(name: str, num_train_timesteps: int = 1000, zero_terminal_snr: bool = False) -> torch.Tensor:
    """alpha_bar_t for t = 1..T as a (T,) float64 tensor; index i holds t = i + 1."""
    from diffusers import DDPMScheduler

    config = noise_schedule_config(name, num_train_timesteps, zero_terminal_snr)
    config.pop("_class_name")
    return DDPMScheduler(**config).alphas_cumprod.double()


def log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """log SNR(t) = log(alpha_bar / (1 - alpha_bar)) (Kingma et al. 2021); -inf where alpha_bar = 0."""
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


def plot_schedules(path: str, num_train_timesteps: int = 1000) -> list[str]:
    """Plot alpha_bar_t and log-SNR(t) of every schedule (and its zero-terminal-SNR rescale).

    Returns the curve labels. Needs matplotlib (``pip install 'latentdiff[plot]'``); uses a bare
    ``Figure``, so the caller's pyplot backend and state are untouched.
    """
    from ..fileio import atomic_write

    suffix = path.rsplit(".", 1)[-1].lower() if "." in path else ""
    if suffix not in ("png", "pdf", "svg"):
        raise InvalidInputError(f"cannot plot to {path}: give a .png, .pdf or .svg file name")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise InvalidInputError("plotting needs matplotlib: pip install 'latentdiff[plot]'") from None

    t = torch.arange(1, num_train_timesteps + 1)
    fig = Figure(figsize=(11, 4.2))
    ax_a, ax_s = fig.subplots(1, 2)
    labels = []
    for colour, name in enumerate(NOISE_SCHEDULES):
        for zsnr in (False, True):  # one colour per schedule, dashed when rescaled
            label = name + (" + zero-terminal-SNR" if zsnr else "")
            ab = alphas_cumprod(name, num_train_timesteps, zsnr)
            style = {"linestyle": "--" if zsnr else "-", "color": f"C{colour}", "label": label}
            ax_a.plot(t, ab, **style)
            ax_s.plot(t, log_snr(ab), **style)
            labels.append(label)
    ax_a.set(xlabel="timestep t", ylabel=r"$\bar\alpha_t$", title=r"signal kept, $\bar\alpha_t$")
    ax_s.set(xlabel="timestep t", ylabel=r"$\log\,\mathrm{SNR}(t)$", title="log signal-to-noise ratio")
    ax_s.set_ylim(bottom=-20)
    for ax in (ax_a, ax_s):
        ax.grid(alpha=0.3)
    ax_a.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format=suffix, dpi=110)
    return labels
