"""Training noise schedules: beta_t for t = 1..T by name, the quantities derived from it, and their plot.

``latentdiff schedules`` prints and plots them; the trainer's forward process (``objective.py``)
is built from :func:`noise_schedule_config`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InvalidInputError

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
