"""The training run: full U-Net fine-tuning, LoRA, training from scratch, LCM distillation or a ControlNet,
under Accelerate.

``train(config)`` is all a script needs: ``training/train.py`` and ``latentdiff train`` read a TOML
file into :class:`~latentdiff.train.config.TrainConfig` and call it. The same code runs on one CPU,
one GPU, or many under ``accelerate launch``. It reads as its steps: start the session, load the
model and the data, train the VAE first where the run asks for it, set the U-Net stage up
(``setup.py``), run the loop below, and write the outputs (``outputs.py``).

Reproducibility: every random choice derives from ``train.seed`` and a position. Sample choices
(caption, crop, flip, batch order) come from ``(epoch, index)`` (see ``data/buckets.py``); the
diffusion noise, timesteps and posterior samples of a micro-step are drawn for the whole *global*
batch from a generator seeded by the micro-step number, and each rank keeps its slice. So a resumed
run equals an uninterrupted one, and N processes with batch B equal one process with batch N*B.
"""

from __future__ import annotations

import time

import torch

from ..data.dataset import encode_captions
from ..tomlconfig import to_toml
from . import checkpoints
from .config import TrainConfig, check_config
from .objective import diffusion_loss, draw_global, noise_scheduler_for, step_seed
from .outputs import save_outputs, validate
from .setup import Run, TrainResult, checkpoint_objects, load_data, load_model, load_vae, setup, start


def train(config: TrainConfig) -> TrainResult:
    """Run (or, with ``checkpoint.resume``, continue) the run that ``config`` describes."""
    check_config(config)
    session = start(config)
    pipe = load_model(config)
    if config.controlnet.enabled:
        from .controlnet import check_base

        check_base(pipe)
    noise_scheduler = noise_scheduler_for(config.objective, pipe.scheduler_config)
    data = load_data(session, pipe)
    if config.vae.steps > 0 and not config.model.vae_path:
        from .vae_stage import train_vae

        pipe.vae = load_vae(str(train_vae(session, pipe, data)))
        if config.train.max_steps == 0:  # the VAE stage alone (its folder is <output_dir>/vae)
            return session.end()
    run = setup(session, pipe, noise_scheduler, data)
    resumed_at = run.steps.step if session.resume_from is not None else None
    loop(run)
    if resumed_at is None or run.steps.step > resumed_at:  # (a finished run resumed has its final checkpoint)
        save_checkpoint(run)
    validate(run, run.steps.step)
    save_outputs(run, run.steps.step)
    session.result.steps = run.steps.step
    return session.end()


def loop(run: Run) -> None:
    """The optimizer steps still to run, with logging, validation and checkpoints at their cadences."""
    session, acc, steps = run.session, run.session.accelerator, run.steps
    config = session.config
    interval_loss = torch.zeros((), device=session.device)
    interval_count, interval_start, interval_images = 0, time.perf_counter(), 0
    grad_norm = None
    load = lambda sampler: torch.utils.data.DataLoader(run.dataset, batch_sampler=sampler, **run.loader_kwargs)  # noqa: E731
    for batch in steps.batches(run.batches, load):
        with acc.accumulate(*run.modules):
            loss = batch_loss(run, batch, steps.micro)
            acc.backward(loss)
            if acc.sync_gradients and config.optim.max_grad_norm > 0:
                grad_norm = acc.clip_grad_norm_(run.params, config.optim.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        interval_loss += loss.detach()  # stays on the device: no host sync per step
        interval_count += 1
        interval_images += run.global_batch // config.train.gradient_accumulation
        if not steps.advance(acc.sync_gradients):
            continue  # gradients still accumulating
        if not acc.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits too
            run.lr_scheduler.step()
        if run.ema is not None:
            run.ema.step(run.params)
        if run.distill is not None:  # the target network follows the student
            run.distill.target.step(run.params)
        if steps.every(config.train.log_every) or steps.finished:
            mean = acc.reduce(interval_loss / interval_count, reduction="mean").item()
            elapsed = time.perf_counter() - interval_start
            values = {"loss": mean, "lr": run.lr_scheduler.get_last_lr()[0], "images_per_s": interval_images / elapsed}
            if grad_norm is not None:
                values["grad_norm"] = float(grad_norm)
            session.log(values, steps.step)
            session.result.losses.append(mean)
            steps.bar.set_postfix(loss=f"{mean:.4f}", lr=f"{values['lr']:.2e}")
            interval_loss.zero_()
            interval_count, interval_start, interval_images = 0, time.perf_counter(), 0
        if steps.due(config.validation.every):
            validate(run, steps.step)
        if steps.due(config.checkpoint.every):
            save_checkpoint(run)
    steps.close()


def batch_loss(run: Run, batch: dict[str, torch.Tensor], micro: int) -> torch.Tensor:
    """The diffusion loss of one micro-batch (this rank's part of the global batch)."""
    session, pipe = run.session, run.pipe
    config, device = session.config, session.device
    seed, per_rank = config.train.seed, config.train.batch_size
    if "latent_dist" in batch:
        mean, std = batch["latent_dist"].to(device, non_blocking=True).chunk(2, dim=1)
    else:
        with torch.no_grad():
            pixels = batch["pixels"].to(device, pipe.vae.dtype, non_blocking=True)  # (B, 3, H, W)
            dist = pipe.vae.encode(pixels).latent_dist
            mean, std = dist.mean.float(), dist.std.float()  # (B, C, H/8, W/8)
    shape = (per_rank * session.world, *mean.shape[1:])

    def draw(what, size=shape, kind="normal"):
        return draw_global(size, step_seed(seed, micro, what), device, session.rank, per_rank, kind)

    latents = (mean + std * draw("posterior")) * pipe.vae.config.scaling_factor  # z_0 ~ q(z | x), scaled
    if "text_embeds" in batch:
        cond, pooled = batch["text_embeds"].to(device, non_blocking=True), batch.get("pooled")  # (B, 77, D), (B, D')
    else:
        ids = [batch[key] for key in ("input_ids", "input_ids_2") if key in batch]  # (B, 77) per encoder
        with torch.set_grad_enabled(run.train_text_encoder):
            cond, pooled = encode_captions(run.text_encoders, ids, pipe.sdxl)
    if run.distill is not None:  # latent consistency distillation (distill.py)
        student = session.accelerator.unwrap_model(run.unet)
        return run.distill.loss(run.unet, student, latents, cond.to(latents.dtype), draw, shape[0])
    noise = draw("noise")
    if config.objective.noise_offset:
        noise = noise + config.objective.noise_offset * draw("offset", (shape[0], shape[1], 1, 1))
    timesteps = draw("timesteps", (shape[0],), run.noise_scheduler.config.num_train_timesteps)
    noisy = run.noise_scheduler.add_noise(latents, noise, timesteps)  # z_t = a_t z_0 + s_t eps
    extra = {}
    if pooled is not None:  # SDXL: the pooled text embedding and each sample's micro-conditioning
        extra["added_cond_kwargs"] = {"text_embeds": pooled.to(device, noisy.dtype),
                                      "time_ids": batch["time_ids"].to(device, noisy.dtype)}  # fmt: skip
    if run.controlnet is not None:  # the frozen U-Net steered by the ControlNet being trained (controlnet.py)
        from .controlnet import controlled_prediction

        control = batch["conditioning_pixels"].to(device, non_blocking=True)  # (B, 3, H, W) in [0, 1]
        pred = controlled_prediction(run.controlnet, run.unet, noisy, timesteps, cond.to(noisy.dtype), control, extra)
    else:
        pred = run.unet(noisy, timesteps, cond.to(noisy.dtype), **extra).sample
    return diffusion_loss(pred, latents, noise, timesteps, run.noise_scheduler, config.objective.snr_gamma).mean()


def save_checkpoint(run: Run) -> None:
    """A checkpoint of the U-Net stage where it stands (collective)."""
    session, config = run.session, run.session.config
    state = {
        **run.steps.state(),  # step, epoch, position (batches of `epoch` already consumed), micro_step, seconds
        "seed": config.train.seed,  # the data order and noise derive from it
        "world_batch": run.global_batch,
        "processes": session.world,
        "threads": torch.get_num_threads(),  # CPU sums split over another thread count round differently
    }
    path = checkpoints.save(session.accelerator, session.out, run.steps.step, state, to_toml(config),
                            config.checkpoint.keep, checkpoint_objects(run.lr_scheduler, run.ema, run.distill))  # fmt: skip
    session.say(f"saved {path.name}")
