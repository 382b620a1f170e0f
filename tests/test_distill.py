"""Latent consistency distillation (the trainer's [distill] section): the solver step against
diffusers' DDIM, the student's start, exact resume, two processes, and outputs that diffusers'
LCM pipelines load and run to the same images as ours."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import train_in_two_processes
from latentdiff import InvalidInputError, LatentDiffusion
from latentdiff.cli import main
from latentdiff.train.config import TrainConfig
from latentdiff.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "training" / "configs" / "tiny-test.toml"
# what distillation asks of the tiny test config: the teacher's own objective, the U-Net alone
DISTILL = ["distill.enabled=true", "model.train_text_encoder=false", "objective.noise_schedule=''",
           "objective.prediction_type=''", "validation.prompts=[]", "distill.guidance_embedding_dim=16",
           "data.caption_dropout=0.0", "checkpoint.every=0"]  # fmt: skip


def config(shapes: Path, teacher: Path, out: Path, *overrides: str) -> TrainConfig:
    return TrainConfig.load(CONFIG, [f"data.path={shapes}", f"model.path={teacher}", f"train.output_dir={out}",
                                     *DISTILL, *overrides])  # fmt: skip


def test_solver_step_is_diffusers_ddim():
    """Our per-sample DDIM step equals diffusers' DDIMScheduler.step at each sample's timestep, on the
    skipping-step schedule (trailing spacing: 999, 979, ..., 19) down to t = 0."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from latentdiff.train.distill import ddim_step

    for kind in ("epsilon", "v_prediction"):
        betas = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": kind}
        noise = DDPMScheduler(**betas)
        ddim = DDIMScheduler(**betas, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
        ddim.set_timesteps(50)
        t = torch.tensor([999, 519, 19])
        z, out = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
        ours = ddim_step(out, z, t, (t - 20).clamp(min=0), noise)
        theirs = torch.cat([ddim.step(out[i : i + 1], int(t[i]), z[i : i + 1]).prev_sample for i in range(3)])
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_consistency_function_is_lcm_schedulers_denoised():
    """f(z, t) equals the ``denoised`` latent of diffusers' LCMScheduler.step at each sample's timestep
    (LCM's own schedule, 4 steps), for eps- and v-prediction, zero terminal SNR included."""
    from diffusers import DDPMScheduler, LCMScheduler

    from latentdiff.train.distill import consistency

    for kind, zero_snr in (("epsilon", False), ("v_prediction", True)):
        betas = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": kind,
                 "rescale_betas_zero_snr": zero_snr}  # fmt: skip
        noise, lcm = DDPMScheduler(**betas), LCMScheduler(**betas)
        lcm.set_timesteps(4)
        t = lcm.timesteps.clone()  # (4,): 999, 759, 499, 259
        z, out = torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4)
        ours = consistency(out, z, t, LCMScheduler(**betas), noise)
        theirs = []
        for i in range(4):
            lcm._step_index = i  # the step that t[i] is
            theirs.append(lcm.step(out[i : i + 1], t[i], z[i : i + 1], generator=torch.Generator().manual_seed(0)).denoised)
        torch.testing.assert_close(ours, torch.cat(theirs), atol=1e-5, rtol=1e-5)


def test_the_default_models_lcm_lora_config_is_valid():
    """The pending recipe for the default model's LCM-LoRA loads and passes every check."""
    from latentdiff.train.config import check_config

    cfg = TrainConfig.load(ROOT / "training" / "configs" / "lcm-default-model.toml")
    check_config(cfg)
    assert cfg.distill.enabled and cfg.lora.enabled and cfg.model.path == "default" and cfg.validation.scheduler == "lcm"


def test_the_student_starts_as_the_teacher(tiny_dir, shapes, tmp_path):
    from latentdiff.train.distill import make_student

    cfg = config(shapes, tiny_dir, tmp_path)
    pipe = LatentDiffusion.from_pretrained(tiny_dir)
    teacher = make_student(pipe, cfg)
    student = pipe.unet
    assert student is not teacher and student.config.time_cond_proj_dim == 16
    from latentdiff.generation.sampling import guidance_embedding

    z, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = teacher(z, t, text).sample
        got = student(z, t, text, timestep_cond=guidance_embedding([3.0, 9.0], 16)).sample
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_full_distillation_resumes_exactly_and_diffusers_runs_it(tiny_dir, shapes, tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    steps = ["train.max_steps=4", "checkpoint.every=2"]
    straight = train(config(shapes, tiny_dir, tmp_path / "a", *steps))
    first = tmp_path / "a" / "checkpoint-00000002"
    assert (first / "target.safetensors").is_file()  # the target network is part of the checkpoint
    shutil.copytree(first, tmp_path / "b" / first.name)
    resumed = train(config(shapes, tiny_dir, tmp_path / "b", *steps))
    for file in ("unet/diffusion_pytorch_model.safetensors",):
        a, b = load_file(straight.model_dir / file), load_file(resumed.model_dir / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "cond_proj.weight" in " ".join(a) and a["time_embedding.cond_proj.weight"].abs().max() > 0  # w-conditioning learned
    assert "LCM-distilled" in (straight.model_dir / "README.md").read_text()

    ours = LatentDiffusion.from_pretrained(straight.model_dir)
    assert type(ours.scheduler).__name__ == "LCMScheduler" and ours.unet.config.time_cond_proj_dim == 16
    kwargs = {"num_inference_steps": 2, "guidance_scale": 5.0, "height": 64, "width": 64, "output_type": "np"}
    mine = ours("a red circle", seed=[1, 2], num_images_per_prompt=2, progress=False, **kwargs).images
    theirs = LatentConsistencyModelPipeline.from_pretrained(straight.model_dir, local_files_only=True, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    images = theirs(["a red circle"] * 2, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kwargs).images
    np.testing.assert_allclose(mine, images, atol=1e-4, rtol=0)


def test_lcm_lora_two_processes_equal_one_and_diffusers_runs_it(tiny_dir, shapes, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    common = ["train.max_steps=2", "optim.eps=1e-3", "train.ema=false", "lora.enabled=true", "lora.rank=4",
              "lora.alpha=4.0", "lora.layout='peft'", "optim.lr=1e-2"]  # fmt: skip
    done = train_in_two_processes(CONFIG, [f"data.path={shapes}", f"model.path={tiny_dir}", f"train.output_dir={tmp_path / 'two'}",
                                           "train.batch_size=1", *DISTILL, *common], timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    one = train(config(shapes, tiny_dir, tmp_path / "one", "train.batch_size=2", *common))
    two = load_file(tmp_path / "two" / "lora.safetensors")
    single = load_file(one.lora_file)
    assert two.keys() == single.keys() and max((two[k] - single[k]).abs().max().item() for k in two) <= 1e-5
    assert "LCM-LoRA" in (tmp_path / "one" / "README.md").read_text()

    kwargs = {"num_inference_steps": 3, "guidance_scale": 1.0, "height": 64, "width": 64, "output_type": "np"}
    ours = LatentDiffusion.from_pretrained(tiny_dir)
    ours.load_lora(one.lora_file)
    mine = ours("a blue square", seed=7, scheduler="lcm", progress=False, **kwargs).images
    theirs = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True, safety_checker=None)
    theirs.scheduler = LCMScheduler.from_config(theirs.scheduler.config)
    theirs.load_lora_weights(str(one.lora_file))
    theirs.set_progress_bar_config(disable=True)
    images = theirs("a blue square", generator=[torch.Generator().manual_seed(7)], **kwargs).images
    np.testing.assert_allclose(mine, images, atol=1e-4, rtol=0)


@pytest.mark.parametrize("setting, message", [
    ("model.path=''", "distill.enabled needs the teacher: model.path"),
    ("validation.prompts=['x']", "set validation.scheduler = \"lcm\""),
    ("distill.guidance_min=0.5", "distill.guidance_min and guidance_max must satisfy"),
    ("objective.snr_gamma=5.0", "follows the teacher's own noise schedule"),
])  # fmt: skip
def test_distillation_settings_are_checked_before_any_work(shapes, tiny_dir, tmp_path, capsys, setting, message):
    args = ["train", "--config", str(CONFIG), "--set", f"data.path={shapes}", "--set", f"model.path={tiny_dir}",
            "--set", f"train.output_dir={tmp_path / 'out'}"]  # fmt: skip
    for item in DISTILL + [setting]:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_distilled_teacher_is_refused(tiny_dir, shapes, tmp_path):
    from latentdiff.train.distill import make_student

    pipe = LatentDiffusion.from_pretrained(tiny_dir)
    make_student(pipe, config(shapes, tiny_dir, tmp_path))
    with pytest.raises(InvalidInputError, match="LCM-distilled already"):
        make_student(pipe, config(shapes, tiny_dir, tmp_path))
