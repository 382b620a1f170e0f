"""Noise schedules against the closed forms in the papers; samplers built from the model's config."""

from __future__ import annotations

import math

import numpy as np
import pytest

from latentdiff import InvalidInputError
from latentdiff.generation.samplers import SAMPLERS, make_scheduler
from latentdiff.train.noise_schedules import alphas_cumprod, log_snr, plot_schedules

T = 1000
CHECK_T = [1, 10, 250, 500, 750, 999]


def cumprod_of_betas(betas: np.ndarray, t: int) -> float:
    return float(np.prod(1.0 - betas[:t]))


@pytest.mark.parametrize("t", CHECK_T + [T])
def test_linear_is_ddpm(t):
    # Ho et al. 2020, Sec. 4: beta_t linear from 1e-4 to 0.02; alpha_bar_t = prod_{s<=t} (1 - beta_s)
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    assert alphas_cumprod("linear")[t - 1].item() == pytest.approx(cumprod_of_betas(betas, t), rel=1e-5)


@pytest.mark.parametrize("t", CHECK_T + [T])
def test_scaled_linear_is_stable_diffusion(t):
    # Stable Diffusion: sqrt(beta_t) linear from sqrt(0.00085) to sqrt(0.012)
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T, dtype=np.float64) ** 2
    assert alphas_cumprod("scaled_linear")[t - 1].item() == pytest.approx(cumprod_of_betas(betas, t), rel=1e-5)


@pytest.mark.parametrize("t", CHECK_T)
def test_cosine_is_improved_ddpm(t):
    # Nichol & Dhariwal 2021, eq. 17: alpha_bar_t = f(t) / f(0), f(t) = cos^2(((t/T) + s) / (1 + s) * pi / 2)
    s = 0.008
    f = lambda x: math.cos((x / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert alphas_cumprod("cosine")[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr(name):
    # Lin et al. 2024, Algorithm 1: shift sqrt(alpha_bar) so the last is 0, then scale it so the
    # first is unchanged: s_t = (sqrt(ab_t) - sqrt(ab_T)) * sqrt(ab_1) / (sqrt(ab_1) - sqrt(ab_T))
    plain, rescaled = alphas_cumprod(name).numpy(), alphas_cumprod(name, zero_terminal_snr=True)
    root = np.sqrt(plain)
    expected = ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2
    np.testing.assert_allclose(rescaled.numpy(), expected, rtol=1e-5, atol=1e-9)  # float32 inside diffusers
    assert rescaled[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert log_snr(rescaled)[-1].item() == -math.inf
    assert bool((rescaled[1:] <= rescaled[:-1]).all())  # still monotone


def test_cosine_keeps_more_signal_midway_than_linear():
    # the reason improved DDPM introduced it: linear destroys information too fast
    assert alphas_cumprod("cosine")[T // 2].item() > 4 * alphas_cumprod("linear")[T // 2].item()


def test_plot_writes_a_png(tmp_path):
    out = tmp_path / "schedules.png"
    labels = plot_schedules(str(out), 100)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(labels) == 6


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(InvalidInputError, match="linear, scaled_linear, cosine"):
        alphas_cumprod("sigmoid")


MODEL_CONFIG = {  # as read from an SD 1.5 folder's scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False,
}  # fmt: skip


EXPECTED = {  # the README's table, written out independently of the registry
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpmpp_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


def test_registry_has_exactly_the_design_names():
    assert list(SAMPLERS) == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_sampler_builds_from_the_model_config(name):
    class_name, options = EXPECTED[name]
    sched = make_scheduler(name, MODEL_CONFIG)
    assert type(sched).__name__ == class_name
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.beta_end == 0.012
    assert {k: sched.config[k] for k in options} == options
    sched.set_timesteps(10)
    assert len(sched.timesteps) >= 10


def test_keys_absent_from_the_file_take_each_schedulers_own_default():
    # An Euler scheduler made from this PNDM file gets Euler's own default spacing ("linspace")...
    assert make_scheduler("euler", MODEL_CONFIG).config.timestep_spacing == "linspace"
    # ...but a value the file does state is kept.
    assert make_scheduler("euler", {**MODEL_CONFIG, "timestep_spacing": "leading"}).config.timestep_spacing == "leading"
    assert make_scheduler("ddim", {**MODEL_CONFIG, "prediction_type": "v_prediction"}).config.prediction_type == "v_prediction"


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(InvalidInputError, match="valid names: ddim, ddpm, pndm"):
        make_scheduler("dpm_fast", MODEL_CONFIG)
