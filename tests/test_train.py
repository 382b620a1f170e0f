"""The trainer end to end on the tiny preset: resume, SIGKILL, multi-process, caching, VAE stage, outputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from helpers import free_port, train_in_two_processes
from latentdiff import InvalidInputError, LatentDiffusion
from latentdiff.cli import main
from latentdiff.train.config import ObjectiveConfig, TrainConfig
from latentdiff.train.loop import train
from latentdiff.train.objective import diffusion_loss, draw_global, noise_scheduler_for
from latentdiff.train.vae_stage import psnr

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "training" / "configs" / "tiny-test.toml"
WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors"}


def config(shapes: Path, out: Path, *overrides: str) -> TrainConfig:
    return TrainConfig.load(CONFIG, [f"data.path={shapes}", f"train.output_dir={out}", "validation.prompts=[]", *overrides])


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v for part, file in WEIGHTS.items() for k, v in load_file(model_dir / file).items()}


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, worst


# -- exact resume -------------------------------------------------------------------------------


def test_resume_from_the_middle_gives_identical_weights(shapes, tmp_path):
    straight = train(config(shapes, tmp_path / "a", "train.max_steps=6", "checkpoint.every=3"))
    assert (tmp_path / "a" / "checkpoint-00000003").is_dir()
    # a run stopped after step 3 leaves exactly checkpoint 3 behind; resume = "latest" carries on from it
    shutil.copytree(tmp_path / "a" / "checkpoint-00000003", tmp_path / "b" / "checkpoint-00000003")
    resumed = train(config(shapes, tmp_path / "b", "train.max_steps=6", "checkpoint.every=3"))
    assert resumed.steps == straight.steps == 6
    assert_same_weights(straight.model_dir, resumed.model_dir)  # EMA weights: the EMA state resumed too
    # the trained model is not simply the initial one
    assert not torch.equal(weights(straight.model_dir)["unet.conv_in.weight"], LatentDiffusion.from_preset("tiny").unet.conv_in.weight)


def test_sigkill_between_checkpoints_resumes_from_the_last_complete_one(shapes, tmp_path):
    command = [sys.executable, "-m", "latentdiff", "train", "--config", str(CONFIG), "--set", f"data.path={shapes}",
               "--set", f"train.output_dir={tmp_path / 'killed'}", "--set", "validation.prompts=[]",
               "--set", "train.max_steps=400", "--set", "checkpoint.every=2", "--set", "checkpoint.keep=1",
               "--set", "optim.lr_schedule='constant'",
               # the same CPU threads as the runs in this process: a float sum split over another number of
               # threads rounds differently, so bit-exact resume needs the same thread count
               "--threads", str(torch.get_num_threads())]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out = tmp_path / "killed"
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-00000004").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before checkpoint 4"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # what a crash mid-save leaves: a hidden temporary folder, and a folder without its trainer state
    (out / ".checkpoint-00000099.tmp").mkdir()
    (out / "checkpoint-00000098").mkdir()
    newest = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
    assert newest >= 4
    # (a constant learning rate, so that stopping at newest + 2 instead of 400 changes nothing before it)
    resumed = train(config(shapes, out, "checkpoint.every=2", "checkpoint.keep=1", "optim.lr_schedule='constant'",
                           f"train.max_steps={newest + 2}"))  # fmt: skip
    assert not (out / ".checkpoint-00000099.tmp").exists()
    straight = train(config(shapes, tmp_path / "straight", "checkpoint.every=0", "optim.lr_schedule='constant'",
                            f"train.max_steps={newest + 2}"))  # fmt: skip
    assert_same_weights(resumed.model_dir, straight.model_dir)


# -- multi-process ------------------------------------------------------------------------------


def test_two_processes_equal_one_with_the_same_global_batch(shapes, tmp_path):
    common = ["train.max_steps=3", "checkpoint.every=0", "optim.eps=1e-3", "train.ema=false"]
    done = train_in_two_processes(CONFIG, [f"data.path={shapes}", f"train.output_dir={tmp_path / 'two'}", "train.batch_size=1",
                                           "validation.prompts=['a red circle', 'a blue square', 'a green circle']", *common])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 3 steps") == 1  # one report, from the main process
    two = tmp_path / "two"
    assert [p.name for p in two.glob("checkpoint-*")] == ["checkpoint-00000003"]
    assert (two / "model" / "model_index.json").is_file() and (two / "validation" / "step-00000003.png").is_file()
    grid = Image.open(two / "validation" / "step-00000003.png")
    # three prompts split across the ranks, gathered on the main process in order, each row labelled
    assert json.loads(grid.text["validation"])["prompts"] == ["a red circle", "a blue square", "a green circle"]
    assert grid.size[0] > 64 and grid.size[1] > 3 * 64

    one = train(config(shapes, tmp_path / "one", "train.batch_size=2", *common))
    # The same samples, noise and timesteps; only the order of the gradient sum differs (fp32 rounding, ~1e-7
    # relative). Adam's eps = 1e-3 keeps its update a smooth function of the gradient, so that stays small.
    assert_same_weights(two / "model", one.model_dir, atol=1e-5)


def test_a_failure_in_main_only_checkpoint_code_ends_every_rank(shapes, tmp_path):
    """The main process's part of a checkpoint save fails (a full disk): every rank must end with
    that error, not wait at a barrier for ever. Two plain processes, started without a launcher
    that would kill the survivor, so a hang would be a hang."""
    script = tmp_path / "fail_on_main.py"
    script.write_text(
        "import os, sys\n"
        "from latentdiff.train import checkpoints\n"
        "def full_disk(folder):\n"
        "    raise OSError(28, 'No space left on device (injected)')\n"
        "if os.environ['RANK'] == '0':\n"
        "    checkpoints._fsync_tree = full_disk  # sealing a checkpoint, the main process alone\n"
        "from latentdiff.cli import main\n"
        "sys.exit(main(['train', *sys.argv[1:]]))\n"
    )
    command = [sys.executable, str(script), "--config", str(CONFIG), "--set", f"data.path={shapes}",
               "--set", f"train.output_dir={tmp_path / 'out'}", "--set", "validation.prompts=[]",
               "--set", "train.batch_size=1", "--set", "train.max_steps=2", "--set", "checkpoint.every=1"]  # fmt: skip
    port, procs, logs = free_port(), [], []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        logs.append(open(tmp_path / f"rank{rank}.err", "w+"))
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=logs[-1], start_new_session=True))
    deadline = time.monotonic() + 300
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        hung = [rank for rank, p in enumerate(procs) if p.poll() is None]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    errors = [(tmp_path / f"rank{rank}.err").read_text() for rank in range(2)]
    assert not hung, f"ranks {hung} still running 300 s later:\n" + "\n".join(e[-2000:] for e in errors)
    assert [p.returncode for p in procs] == [1, 1], errors  # 1: the environment failed (an OSError), not a bug
    assert "No space left on device (injected)" in errors[0]
    assert "on the main process: [Errno 28] No space left on device (injected)" in errors[1]
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # nothing half-written under a final name


def test_clipping_and_ema_act_on_the_parameters_prepare_gives(shapes, tmp_path, monkeypatch):
    """accelerate's prepare may hand back modules holding new parameter tensors (FSDP2 swaps in
    sharded ones and points the optimizer at them); gradient clipping and the EMA must act on those.
    So a prepare that swaps every parameter for an equal new one must change nothing."""
    from accelerate import Accelerator

    settings = ["train.max_steps=3", "checkpoint.every=0", "train.ema=true", "optim.max_grad_norm=0.01"]
    plain = train(config(shapes, tmp_path / "plain", *settings))
    prepare = Accelerator.prepare

    def swapping_prepare(self, *objects):
        new = {}
        for module in (o for o in objects if isinstance(o, torch.nn.Module)):
            for name, param in list(module.named_parameters()):
                owner, _, leaf = name.rpartition(".")
                new[id(param)] = torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                setattr(module.get_submodule(owner), leaf, new[id(param)])
        for optimizer in (o for o in objects if isinstance(o, torch.optim.Optimizer)):
            for group in optimizer.param_groups:
                group["params"] = [new.get(id(p), p) for p in group["params"]]
        return prepare(self, *objects)

    monkeypatch.setattr(Accelerator, "prepare", swapping_prepare)
    swapped = train(config(shapes, tmp_path / "swapped", *settings))
    assert_same_weights(plain.model_dir, swapped.model_dir)


# -- learning -----------------------------------------------------------------------------------


def test_loss_falls_well_below_its_start_on_a_small_fixed_set(shapes, tmp_path):
    result = train(config(shapes, tmp_path / "fit", "train.max_steps=240", "train.log_every=20", "checkpoint.every=0",
                          "train.ema=false", "optim.lr_schedule='constant'", "data.caption_dropout=0.0",
                          "model.train_text_encoder=false", "train.batch_size=8", "data.cache=true"))  # fmt: skip
    first, last = result.losses[0], result.losses[-1]
    assert last < 0.35 * first, result.losses


# -- caching ------------------------------------------------------------------------------------


def test_cache_is_reused_and_an_edited_image_alone_is_encoded_again(shapes, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    calls = []
    original = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: calls.append(x.shape[0]) or original(self, x, *a, **k))
    settings = ["data.cache=true", f"data.cache_dir={tmp_path / 'cache'}", "model.train_text_encoder=false",
                "train.max_steps=4", "checkpoint.every=0", "train.log_every=1"]  # fmt: skip

    first = train(config(data, tmp_path / "r1", *settings))
    assert sum(calls) == 8 * 2  # every image, flipped and not
    assert (first.cache.latents_encoded, first.cache.texts_encoded) == (16, 9)  # 8 captions + the empty one

    calls.clear()
    second = train(config(data, tmp_path / "r2", *settings))
    assert calls == [] and second.cache.latents_reused == 16 and second.cache.texts_reused == 9
    assert second.losses == first.losses
    assert_same_weights(first.model_dir, second.model_dir)

    image = Image.open(data / "3.png")
    image.putpixel((0, 0), (0, 0, 0))
    image.save(data / "3.png")
    third = train(config(data, tmp_path / "r3", *settings))
    assert sum(calls) == 2 and third.cache.latents_encoded == 2 and third.cache.latents_reused == 14


# -- from scratch with a VAE stage ---------------------------------------------------------------


def test_psnr_closed_form():
    reference = torch.zeros(2, 3, 4, 4)
    noisy = reference + 0.2  # error 0.1 on the [0, 1] scale: PSNR = 10 log10(1 / 0.01) = 20 dB
    assert torch.allclose(psnr(reference, noisy), torch.tensor([20.0, 20.0]), atol=1e-4)


def test_vae_stage_trains_a_vae_and_reports_held_out_psnr(shapes, tmp_path):
    from latentdiff.train.vae_stage import _held_out_psnr  # noqa: F401  (the stage's own metric)

    result = train(config(shapes, tmp_path / "scratch", "vae.steps=30", "vae.batch_size=4", "vae.lr=2e-3",
                          "vae.holdout=2", "train.max_steps=1", "checkpoint.every=0"))  # fmt: skip
    trained = result.vae_psnr
    vae_dir = tmp_path / "scratch" / "vae"
    assert (vae_dir / "psnr.json").is_file() and np.isfinite(trained)
    # the final model carries the trained VAE with a data-derived latent scale
    final = LatentDiffusion.from_pretrained(result.model_dir)
    assert final.vae.config.scaling_factor != LatentDiffusion.from_preset("tiny").vae.config.scaling_factor
    # and it reconstructs held-out images better than the untrained VAE it started from
    untrained = LatentDiffusion.from_preset("tiny").vae
    image = torch.from_numpy(np.asarray(Image.open(shapes / "0.png"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        before = psnr(image, untrained.decode(untrained.encode(image).latent_dist.mean).sample)
        after = psnr(image, final.vae.decode(final.vae.encode(image).latent_dist.mean).sample)
    assert after > before + 3, (before, after)


def test_max_steps_zero_runs_the_vae_stage_alone(shapes, tmp_path):
    result = train(config(shapes, tmp_path / "vae-only", "vae.steps=2", "vae.batch_size=4", "vae.holdout=2",
                          "train.max_steps=0", "checkpoint.every=0"))  # fmt: skip
    out = tmp_path / "vae-only"
    assert (out / "vae" / "config.json").is_file() and np.isfinite(result.vae_psnr)
    report = json.loads((out / "vae" / "psnr.json").read_text())
    assert report["steps"] == 2 and 0 < report["seconds"] < 600  # the stage's wall time, for the model card
    assert result.steps == 0 and result.model_dir is None and result.lora_file is None
    assert not (out / "model").exists() and not list(out.glob("checkpoint-*"))  # no U-Net stage at all


def test_architecture_overrides_change_a_from_scratch_model(shapes, tmp_path):
    result = train(config(shapes, tmp_path / "wider", "model.unet_config.layers_per_block=2",
                          "model.vae_config.norm_num_groups=4", "train.max_steps=1", "checkpoint.every=0"))  # fmt: skip
    model = LatentDiffusion.from_pretrained(result.model_dir)
    assert model.unet.config.layers_per_block == 2 and model.vae.config.norm_num_groups == 4
    assert model.unet.config.block_out_channels == LatentDiffusion.from_preset("tiny").unet.config.block_out_channels


# -- objective ----------------------------------------------------------------------------------


def test_min_snr_weights_follow_the_closed_form():
    for kind in ("epsilon", "v_prediction", "sample"):
        sched = noise_scheduler_for(ObjectiveConfig(prediction_type=kind, noise_schedule="linear"), {})
        t = torch.tensor([10, 500, 990])
        latents, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
        pred = torch.randn(3, 4, 2, 2)
        plain = diffusion_loss(pred, latents, noise, t, sched, snr_gamma=0.0)
        weighted = diffusion_loss(pred, latents, noise, t, sched, snr_gamma=5.0)
        abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t]
        snr = abar / (1 - abar)
        expected = {"epsilon": snr.clamp(max=5) / snr, "v_prediction": snr.clamp(max=5) / (snr + 1), "sample": snr.clamp(max=5)}[kind]
        assert torch.allclose(weighted.double(), plain.double() * expected, rtol=1e-4), kind
        if kind == "v_prediction":  # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)
            v = abar.sqrt().view(-1, 1, 1, 1) * noise - (1 - abar).sqrt().view(-1, 1, 1, 1) * latents
            assert torch.allclose(plain.double(), (pred.double() - v).pow(2).mean(dim=(1, 2, 3)), rtol=1e-4)


def test_each_rank_draws_its_slice_of_the_global_batch():
    whole = draw_global((6, 4, 2, 2), 1234, "cpu", rank=0, per_rank=6)
    parts = [draw_global((6, 4, 2, 2), 1234, "cpu", rank=r, per_rank=2) for r in range(3)]
    assert torch.equal(whole, torch.cat(parts))


# -- outputs ------------------------------------------------------------------------------------


def test_final_model_loads_in_diffusers_with_the_trained_schedule(shapes, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = train(config(shapes, tmp_path / "v", "train.max_steps=2", "checkpoint.every=0", "objective.prediction_type='v_prediction'",
                          "objective.zero_terminal_snr=true", "objective.snr_gamma=5.0", "objective.noise_offset=0.05"))  # fmt: skip
    card = (result.model_dir / "README.md").read_text()
    assert "zero_terminal_snr = true" in card and "8 images used" in card
    ours = LatentDiffusion.from_pretrained(result.model_dir)
    assert ours.scheduler_config["prediction_type"] == "v_prediction" and ours.scheduler_config["timestep_spacing"] == "trailing"
    theirs = StableDiffusionPipeline.from_pretrained(result.model_dir, local_files_only=True, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 3, "guidance_scale": 3.0, "height": 64, "width": 64}
    a = ours("a red circle", seed=5, output_type="np", **kwargs).images[0]
    b = theirs("a red circle", generator=torch.Generator().manual_seed(5), output_type="np", **kwargs).images[0]
    assert np.abs(a - b).max() < 1e-5


# -- LoRA ---------------------------------------------------------------------------------------


def test_lora_run_writes_a_small_adapter_that_the_pipeline_loads(shapes, tiny_dir, tmp_path):
    result = train(config(shapes, tmp_path / "lora", f"model.path={tiny_dir}", "lora.enabled=true", "lora.rank=4",
                          "lora.alpha=4.0", "model.train_text_encoder=true", "train.max_steps=3", "optim.lr=1e-2",
                          "checkpoint.every=0"))  # fmt: skip
    assert result.model_dir is None and result.lora_file.is_file()
    # the checkpoint holds the adapters, not the frozen base weights
    saved = load_file(tmp_path / "lora" / "checkpoint-00000003" / "model.safetensors")
    assert saved and all("lora" in key for key in saved)
    tensors = load_file(result.lora_file)
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith("lora_te_") for k in tensors)

    kwargs = {"num_inference_steps": 2, "guidance_scale": 2.0, "seed": 3, "output_type": "np"}
    base = LatentDiffusion.from_pretrained(tiny_dir)
    plain = base("a red circle", **kwargs).images[0]
    report = base.load_lora(result.lora_file, scale=1.0)
    assert report.unmatched_keys == [] and report.applied_keys == len(tensors)
    adapted = base("a red circle", **kwargs).images[0]
    assert np.abs(adapted - plain).max() > 1e-3  # the adapter changes the image
    base.set_lora_scale(report.name, 0.0)
    assert np.array_equal(base("a red circle", **kwargs).images[0], plain)  # scale 0 is the base model


# -- precision and memory options ------------------------------------------------------------------


def test_bf16_gradient_checkpointing_and_tensorboard(shapes, tmp_path):
    pytest.importorskip("tensorboard")
    result = train(config(shapes, tmp_path / "bf16", "train.mixed_precision='bf16'", "train.gradient_checkpointing=true",
                          "model.train_text_encoder=false", "train.max_steps=2", "train.log_every=1", "checkpoint.every=0",
                          "validation.prompts=['a red circle']", "train.tensorboard=true"))  # fmt: skip
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    events = list((tmp_path / "bf16" / "logs").rglob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 0


def test_8bit_adam_without_bitsandbytes_says_what_to_install(shapes, tmp_path):
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(Exception, match="pip install bitsandbytes"):
        train(config(shapes, tmp_path / "adam8", "optim.use_8bit_adam=true", "train.max_steps=1"))


def test_gradient_accumulation_steps_the_optimizer_once_per_global_batch(shapes, tmp_path):
    result = train(config(shapes, tmp_path / "accum", "train.gradient_accumulation=2", "train.batch_size=1",
                          "train.max_steps=2", "checkpoint.every=0", "train.ema=false"))  # fmt: skip
    assert result.steps == 2
    folder = tmp_path / "accum" / "checkpoint-00000002"
    state = json.loads((folder / "trainer_state.json").read_text())
    assert (state["micro_step"], state["world_batch"]) == (4, 2)
    optimizer = torch.load(folder / "optimizer.bin", weights_only=True)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {2}  # Adam stepped twice, not four times


def test_vae_lr_holds_then_decays_linearly_to_zero():
    from types import SimpleNamespace

    from latentdiff.train.vae_stage import stage_lr

    stage = SimpleNamespace(steps=10, decay_steps=4, lr=1e-3)
    assert [round(stage_lr(stage, s) / 1e-3, 6) for s in range(10)] == [1, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    # extending a run (steps and decay_steps raised together) keeps the LR of every step already run
    longer = SimpleNamespace(steps=14, decay_steps=8, lr=1e-3)
    assert all(stage_lr(longer, s) == stage_lr(SimpleNamespace(steps=6, decay_steps=0, lr=1e-3), s) for s in range(6))
    assert stage_lr(SimpleNamespace(steps=10, decay_steps=0, lr=2e-4), 9) == 2e-4


def test_loss_plot_from_the_log_of_both_stages(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from latentdiff.train.outputs import plot_training_log

    log = tmp_path / "log.jsonl"
    rows = [{"step": 1, "vae_loss": 0.5}, {"step": 2, "vae_loss": 0.3, "vae_psnr": 20.0}, {"step": 1, "loss": 0.2},
            {"step": 2, "loss": 0.1}, {"step": 2, "loss": 0.1}]  # a resumed session may log a step twice
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_training_log(log, tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").size[0] > Image.open(tmp_path / "loss.png").size[1]  # two panels
    log.write_text(json.dumps({"step": 1, "lr": 1e-3}) + "\n")
    assert not plot_training_log(log, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


# -- hostile and damaged checkpoints -------------------------------------------------------------------


class _Payload:
    """Unpickled without weights_only, this writes the marker file: code a stranger planted."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _plant(path: Path, marker: Path) -> None:
    torch.save({"state": _Payload(marker)}, path)


def test_resume_runs_no_code_planted_in_the_checkpoint(shapes, tmp_path):
    settings = ("train.max_steps=4", "checkpoint.every=2", "checkpoint.keep=2")
    train(config(shapes, tmp_path / "run", *settings))
    newest = tmp_path / "run" / "checkpoint-00000004"
    assert (newest / "lr_scheduler.json").is_file() and (newest / "ema.safetensors").is_file()
    assert not list(newest.glob("custom_checkpoint_*.pkl"))  # nothing accelerate would unpickle unsafely
    marker = tmp_path / "payload-ran"
    # the payload is live: an unsafe load runs it
    _plant(tmp_path / "probe.pkl", marker)
    torch.load(tmp_path / "probe.pkl", weights_only=False)
    assert marker.read_text() == "ran"
    marker.unlink()
    for planted in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin"):
        folder = tmp_path / planted
        shutil.copytree(tmp_path / "run", folder)
        _plant(folder / "checkpoint-00000004" / planted, marker)
        with pytest.raises(InvalidInputError, match=f"{planted}: its pickle asks to run code .*resume from the previous "
                                                    "checkpoint .*checkpoint-00000002"):  # fmt: skip
            train(config(shapes, folder, "train.max_steps=6", "checkpoint.every=2", "checkpoint.keep=2"))
        assert not marker.exists(), f"the payload in {planted} ran"


def test_a_damaged_checkpoint_file_is_one_line_naming_it(shapes, tmp_path, capsys):
    train(config(shapes, tmp_path / "run", "train.max_steps=4", "checkpoint.every=2", "checkpoint.keep=2"))
    newest = tmp_path / "run" / "checkpoint-00000004"
    for name in ("optimizer.bin", "model.safetensors", "ema.json"):
        damaged = tmp_path / f"damaged-{name}"
        shutil.copytree(tmp_path / "run", damaged)
        file = damaged / "checkpoint-00000004" / name
        file.write_bytes((newest / name).read_bytes()[: file.stat().st_size // 2])  # truncated: a crash, a full disk
        code = main(["train", "--config", str(CONFIG), "--set", f"data.path={shapes}", "--set", f"train.output_dir={damaged}",
                     "--set", "validation.prompts=[]", "--set", "train.max_steps=6", "--set", "checkpoint.every=2"])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("latentdiff: error: checkpoint file "), err[-3:]
        assert str(file) in err[-1] and f"checkpoint.resume={damaged / 'checkpoint-00000002'}" in err[-1]


def test_checkpoints_from_before_still_resume_exactly(shapes, tmp_path):
    """Checkpoints written before this format hold the schedule and EMA as accelerate's
    custom_checkpoint_0 / _1.pkl: read with weights_only=True, they resume exactly as before."""
    from latentdiff.train.checkpoints import _read_state

    straight = train(config(shapes, tmp_path / "a", "train.max_steps=6", "checkpoint.every=3"))
    old = tmp_path / "b" / "checkpoint-00000003"
    shutil.copytree(tmp_path / "a" / "checkpoint-00000003", old)
    for index, key in enumerate(("lr_scheduler", "ema")):
        torch.save(_read_state(old, key, index), old / f"custom_checkpoint_{index}.pkl")
        (old / f"{key}.json").unlink()
        (old / f"{key}.safetensors").unlink()
    resumed = train(config(shapes, tmp_path / "b", "train.max_steps=6", "checkpoint.every=3"))
    assert_same_weights(straight.model_dir, resumed.model_dir)


def test_log_does_not_repeat_steps_after_a_resume(shapes, tmp_path):
    train(config(shapes, tmp_path / "a", "train.max_steps=6", "checkpoint.every=3", "train.log_every=1"))
    # a run killed after logging step 6 but before its checkpoint 6 was sealed
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-00000003", tmp_path / "b" / "checkpoint-00000003")
    shutil.copy(tmp_path / "a" / "log.jsonl", tmp_path / "b" / "log.jsonl")
    train(config(shapes, tmp_path / "b", "train.max_steps=6", "checkpoint.every=3", "train.log_every=1"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_the_launchers_mixed_precision_is_overridden_with_a_warning(shapes, tmp_path, monkeypatch, capsys):
    from latentdiff.train.setup import Session

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` sets from its YAML
    session = Session(config(shapes, tmp_path / "mp", "train.mixed_precision='no'"))
    assert session.accelerator.mixed_precision == "no"
    out = capsys.readouterr().out
    assert "accelerate config asks for mixed_precision=bf16" in out and "train.mixed_precision='no'" in out
    session.end()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # the launcher's default: nothing to say
    Session(config(shapes, tmp_path / "mp2")).end()
    assert "mixed_precision" not in capsys.readouterr().out


@pytest.mark.parametrize("setting, message", [
    ("optim.beta1=1.5", "optim.beta1 must be in \\[0, 1\\), got 1.5"),
    ("optim.beta2=-0.1", "optim.beta2 must be in \\[0, 1\\)"),
    ("optim.eps=-1.0", "optim.eps must be positive"),
    ("optim.weight_decay=-1.0", "optim.weight_decay must be 0 or more"),
    ("data.num_workers=-1", "data.num_workers must be 0 or more"),
    ("optim.warmup_steps=-5", "optim.warmup_steps must be 0 or more"),
    ("checkpoint.every=-1", "checkpoint.every must be 0 or more"),
    ("vae.lr=-1.0", "vae.batch_size and vae.lr must be positive"),
    ("lora.layout='safetensors'", "lora.layout must be kohya or peft"),
    ("validation.scheduler='warp'", "unknown scheduler 'warp'"),
])  # fmt: skip
def test_out_of_range_settings_are_one_line_before_any_work(shapes, tmp_path, capsys, setting, message):
    import re

    code = main(["train", "--config", str(CONFIG), "--set", f"data.path={shapes}", "--set", f"train.output_dir={tmp_path}",
                 "--set", "validation.prompts=['x']", "--set", setting])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(message, err[0]), err
    assert not list(tmp_path.iterdir())  # refused before the run started


def test_validation_grids_are_labelled(shapes, tmp_path):
    result = train(config(shapes, tmp_path / "v", "train.max_steps=1", "checkpoint.every=0",
                          "validation.prompts=['a red circle', 'a blue square']", "validation.seeds=[0, 1]"))  # fmt: skip
    grid = Image.open(result.output_dir / "validation" / "step-00000001.png")
    meta = json.loads(grid.text["validation"])
    assert meta["prompts"] == ["a red circle", "a blue square"] and meta["seeds"] == [0, 1] and meta["step"] == 1
    pixels = np.asarray(grid.convert("L"))
    left = grid.size[0] - 2 * 64  # a label column beside the two image columns, a header band above the rows
    top = grid.size[1] - 2 * 64
    assert left > 0 and top > 0
    labels = [pixels[top + r * 64 : top + (r + 1) * 64, :left] for r in range(2)]
    assert all((band < 128).any() for band in labels)  # text is drawn
    assert not np.array_equal(labels[0], labels[1])  # and each row says its own prompt


def test_the_first_run_config_trains_on_the_default_models_vae(shapes, tmp_path):
    """training/README's first run, cut to 2 steps: no VAE stage (the default model's VAE), a labelled grid per
    validation."""
    first = TrainConfig.load(ROOT / "training" / "configs" / "first-run.toml",
                             [f"data.path={shapes}", f"train.output_dir={tmp_path / 'first'}", "train.max_steps=2",
                              "train.batch_size=2", "validation.every=1", "validation.steps=2", "checkpoint.every=0"])  # fmt: skip
    result = train(first)
    assert result.vae_psnr is None and not (tmp_path / "first" / "vae").exists()  # no VAE stage
    grids = sorted(p.name for p in (tmp_path / "first" / "validation").glob("*.png"))
    assert grids == ["step-00000001.png", "step-00000002.png"]
    model = LatentDiffusion.from_pretrained(result.model_dir)
    default = LatentDiffusion.from_pretrained()
    assert all(torch.equal(a, b) for a, b in zip(model.vae.state_dict().values(), default.vae.state_dict().values()))


# -- SDXL -----------------------------------------------------------------------------------------

SDXL_WEIGHTS = {**WEIGHTS, "text_encoder_2": "text_encoder_2/model.safetensors"}


@pytest.fixture(scope="module")
def wide_shapes(tmp_path_factory) -> Path:
    """6 captioned pictures of three sizes (square, wide, tall): several buckets, crops and original sizes."""
    folder = tmp_path_factory.mktemp("wide")
    lines = []
    for i, size in enumerate([(64, 64), (96, 64), (64, 96)] * 2):
        image = Image.new("RGB", size, (255, 255, 255))
        ImageDraw.Draw(image).ellipse((8, 8, 40 + 8 * i, 40), fill=(40 * i, 200 - 30 * i, 90))
        image.save(folder / f"{i}.png")
        lines.append(f'{{"file_name": "{i}.png", "text": "shape number {i}"}}\n')
    (folder / "metadata.jsonl").write_text("".join(lines))
    return folder


def sdxl_config(data: Path, out: Path, *overrides: str) -> TrainConfig:
    return config(data, out, "model.preset='tiny-sdxl'", "data.bucket_step=32", "data.center_crop=false", *overrides)


def sdxl_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v for part, file in SDXL_WEIGHTS.items() for k, v in load_file(model_dir / file).items()}


def test_sdxl_resume_is_exact_and_the_model_loads_in_diffusers_with_the_same_image(wide_shapes, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    common = ("train.max_steps=4", "checkpoint.every=2")
    straight = train(sdxl_config(wide_shapes, tmp_path / "a", *common))
    shutil.copytree(tmp_path / "a" / "checkpoint-00000002", tmp_path / "b" / "checkpoint-00000002")
    resumed = train(sdxl_config(wide_shapes, tmp_path / "b", *common))
    wa, wb = sdxl_weights(straight.model_dir), sdxl_weights(resumed.model_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    initial = LatentDiffusion.from_preset("tiny-sdxl")
    assert not torch.equal(wa["text_encoder_2.text_projection.weight"], initial.text_encoder_2.text_projection.weight)
    ours = LatentDiffusion.from_pretrained(straight.model_dir)
    assert ours.sdxl and ours.force_zeros_for_empty_prompt
    theirs = StableDiffusionXLPipeline.from_pretrained(straight.model_dir, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 3, "guidance_scale": 3.0, "height": 64, "width": 96}
    a = ours("shape number 1", seed=5, output_type="np", progress=False, **kwargs).images[0]
    b = theirs("shape number 1", generator=torch.Generator().manual_seed(5), output_type="np", **kwargs).images[0]
    assert np.abs(a - b).max() < 1e-4


def test_sdxl_samples_carry_their_true_size_and_crop_and_the_cache_holds_them(wide_shapes, tmp_path):
    from latentdiff.data.buckets import assign_buckets, choose_view, sample_rng
    from latentdiff.data.dataset import TrainDataset
    from latentdiff.data.sources import scan

    cfg = sdxl_config(wide_shapes, tmp_path / "c", "data.cache=true", "model.train_text_encoder=false",
                      "train.max_steps=2", "checkpoint.every=0", "data.center_crop=true")  # fmt: skip
    result = train(cfg)
    assert result.cache.latents_encoded > 0 and result.cache.texts_encoded == 7
    pipe = LatentDiffusion.from_preset("tiny-sdxl")
    source = scan(cfg.data)
    buckets, bucket_of = assign_buckets(source.records, cfg.data)
    from latentdiff.data.cache import LatentCache
    from latentdiff.models.hashing import weight_hash

    cache = LatentCache(tmp_path / "c" / "cache", weight_hash([("vae", pipe.vae)]),
                        weight_hash([n for n in pipe.networks() if n[0].startswith("text_encoder")]), time_ids=6)  # fmt: skip
    plain = TrainDataset(source, buckets, bucket_of, cfg.data, cfg.train.seed, tokenizer=pipe.tokenizer,
                         tokenizer_2=pipe.tokenizer_2, time_ids=6)  # fmt: skip
    cached = TrainDataset(source, buckets, bucket_of, cfg.data, cfg.train.seed, cache=cache, time_ids=6)
    for index, record in enumerate(source.records):
        view = choose_view(record.size, buckets[bucket_of[index]], cfg.data, sample_rng(cfg.train.seed, 0, index))
        item, stored = plain[(0, index)], cached[(0, index)]
        (w, h), (left, top, right, bottom) = record.size, view.box
        left = view.resize[0] - right if view.flip else left
        assert item["time_ids"].tolist() == [h, w, top, left, bottom - view.box[1], right - view.box[0]]
        assert torch.equal(stored["time_ids"], item["time_ids"])
        assert stored["text_embeds"].shape == (77, 80) and stored["pooled"].shape == (48,)
    assert any(record.size != (64, 64) for record in source.records)


def test_sdxl_lora_run_writes_both_encoders_kohya_keys_that_apply(wide_shapes, tmp_path):
    base_dir = LatentDiffusion.from_preset("tiny-sdxl").save_pretrained(tmp_path / "base")
    result = train(sdxl_config(wide_shapes, tmp_path / "lora", f"model.path={base_dir}", "lora.enabled=true", "lora.rank=2",
                               "lora.alpha=2.0", "model.train_text_encoder=true", "train.max_steps=2", "optim.lr=1e-2",
                               "checkpoint.every=0"))  # fmt: skip
    tensors = load_file(result.lora_file)
    assert {k.split("_")[1] for k in tensors} == {"unet", "te1", "te2"}
    pipe = LatentDiffusion.from_pretrained(base_dir)
    report = pipe.load_lora(result.lora_file)
    assert report.unmatched_keys == [] and report.applied_keys == len(tensors)


def test_sdxl_two_processes_equal_one_with_the_same_global_batch(wide_shapes, tmp_path):
    common = ["train.max_steps=2", "checkpoint.every=0", "optim.eps=1e-3", "train.ema=false", "model.preset='tiny-sdxl'",
              "data.bucket_step=32", "data.center_crop=false"]  # fmt: skip
    done = train_in_two_processes(CONFIG, [f"data.path={wide_shapes}", f"train.output_dir={tmp_path / 'two'}",
                                           "train.batch_size=1", "validation.prompts=[]", *common])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    one = train(config(wide_shapes, tmp_path / "one", "train.batch_size=2", "validation.prompts=[]", *common))
    wa, wb = sdxl_weights(tmp_path / "two" / "model"), sdxl_weights(one.model_dir)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
