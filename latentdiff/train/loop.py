"""The training loop: full U-Net fine-tuning, LoRA, or training from scratch, under Accelerate.

``train(config)`` is all a script needs: ``training/train.py`` and ``latentdiff train`` read a TOML
file into :class:`~latentdiff.train_config.TrainConfig` and call it. The same code runs on one CPU,
one GPU, or many under ``accelerate launch``.

Reproducibility: every random choice derives from ``train.seed`` and a position. Sample choices
(caption, crop, flip, batch order) come from ``(epoch, index)`` (see ``data.py``); the diffusion
noise, timesteps and posterior samples of a micro-step are drawn for the whole *global* batch from
a generator seeded by the micro-step number, and each rank keeps its slice. So a resumed run equals
an uninterrupted one, and N processes with batch B equal one process with batch N*B.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..data.buckets import BucketBatches, assign_buckets
from ..data.dataset import TrainDataset
from ..data.sources import scan, skipped_report
from ..errors import InvalidInputError, MissingFileError
from ..fileio import atomic_write
from ..generation.images import grid
from ..models.architectures import downscale_factor
from ..tomlconfig import to_dict, to_toml
from . import checkpoints
from .config import TrainConfig, check_config
from .objective import diffusion_loss, draw_global, inference_scheduler_config, noise_scheduler_for, step_seed

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Optional[Path] = None  # the final diffusers folder (full fine-tune / from scratch)
    lora_file: Optional[Path] = None  # the LoRA file (LoRA runs)
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss of each log interval, this session
    skipped: list[tuple[str, str]] = field(default_factory=list)
    cache: Any = None  # CacheStats when data.cache
    vae_psnr: Optional[float] = None  # held-out PSNR (dB) after a VAE stage
    main_process: bool = True  # False on the other ranks of a multi-process run


def train(config: TrainConfig) -> TrainResult:
    """Run (or, with ``checkpoint.resume``, continue) the run that ``config`` describes."""
    check_config(config)
    return Trainer(config).run()


class Trainer:
    """One training run. Kept as an object only so its steps can be read one method at a time."""

    def __init__(self, config: TrainConfig):
        import torch.distributed as dist
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import ProjectConfiguration

        if not (dist.is_available() and dist.is_initialized()):
            # A single process may train several times (notebooks, tests) with other precision settings;
            # accelerate keeps its state process-wide and refuses a change, so start it afresh.
            AcceleratorState._reset_state(reset_partial_state=True)
        self.config = config
        self.out = Path(config.train.output_dir).expanduser().resolve()
        run = config.train
        self.tensorboard = run.tensorboard and _have_tensorboard()
        self.accelerator = Accelerator(
            mixed_precision=run.mixed_precision,
            gradient_accumulation_steps=run.gradient_accumulation,
            log_with="tensorboard" if self.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
            cpu=not torch.cuda.is_available(),
        )
        self.main = self.accelerator.is_main_process
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        # FSDP shards the weights: a forward needs every rank at once, and full weights must be gathered
        self.sharded = self.accelerator.distributed_type == "FSDP"
        self.device = self.accelerator.device
        self.result = TrainResult(self.out, main_process=self.main)
        if run.tensorboard and not self.tensorboard:
            self.say("warning: TensorBoard is not installed (pip install tensorboard); logging to log.jsonl only")

    # -- small helpers --------------------------------------------------------------------------

    def say(self, text: str) -> None:
        if self.main:
            print(text, flush=True)

    def log(self, values: dict[str, float], step: int) -> None:
        if self.main:
            with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tensorboard:
            self.accelerator.log(values, step=step)

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        config, acc = self.config, self.accelerator
        self.out.mkdir(parents=True, exist_ok=True)
        if self.main:
            for stale in checkpoints.remove_stale(self.out):
                print(f"removed an incomplete checkpoint left by a crash: {stale.name}")
        acc.wait_for_everyone()
        resume_from = checkpoints.resolve(config.checkpoint.resume, self.out)
        if self.tensorboard:
            acc.init_trackers("latentdiff", config=_flat_scalars(to_dict(config)))

        self.pipe = self.load_model()
        self.noise_scheduler = noise_scheduler_for(config.objective, self.pipe.scheduler_config)
        self.load_data()
        if config.vae.steps > 0 and not config.model.vae_path:
            from .vae_stage import train_vae

            self.pipe.vae = load_vae(str(train_vae(self)))
            if config.train.max_steps == 0:  # the VAE stage alone (its folder is <output_dir>/vae)
                acc.end_training()
                return self.result
        trainables = self.setup_modules()
        self.fill_cache()
        batches, loader_kwargs = self.make_batches()
        optimizer, lr_scheduler = self.make_optimizer(trainables)
        self.ema = self.make_ema(trainables)
        self.prepare(optimizer, lr_scheduler)
        optimizer = self.optimizer  # accelerate's wrapper: it skips the step while gradients accumulate, and scales fp16

        step, epoch, position, micro = 0, 0, 0, 0
        self.elapsed_before = 0.0
        self.started = time.perf_counter()
        if resume_from is not None:
            state = checkpoints.load(acc, resume_from, strict=not config.lora.enabled)
            step, epoch, position, micro = state["step"], state["epoch"], state["position"], state["micro_step"]
            self.elapsed_before = state.get("seconds", 0.0)
            if state.get("seed") != config.train.seed or state.get("world_batch") != self.global_batch:
                raise InvalidInputError(
                    f"{resume_from} was made with train.seed={state.get('seed')} and a global batch of "
                    f"{state.get('world_batch')}; this run has {config.train.seed} and {self.global_batch}. "
                    "Resume with the same settings (or start a new output_dir)"
                )
            self.say(f"resumed from {resume_from.name}: step {step}, epoch {epoch}, batch {position} of the epoch")
        run = config.train

        bar = self._progress_bar(step, run.max_steps)
        interval_loss = torch.zeros((), device=self.device)
        interval_count, interval_start, interval_images = 0, time.perf_counter(), 0
        grad_norm = None
        while step < run.max_steps:
            batches.epoch, batches.start = epoch, position
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, **loader_kwargs)
            for batch in loader:
                with acc.accumulate(*self.trained_modules):
                    loss = self.loss(batch, micro)
                    acc.backward(loss)
                    if acc.sync_gradients and config.optim.max_grad_norm > 0:
                        grad_norm = acc.clip_grad_norm_(self.trainable_params, config.optim.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                micro += 1
                position += 1
                interval_loss += loss.detach()  # stays on the device: no host sync per step
                interval_count += 1
                interval_images += self.global_batch // run.gradient_accumulation
                if not acc.sync_gradients:
                    continue
                if not acc.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits too
                    lr_scheduler.step()
                step += 1
                if self.ema is not None:
                    self.ema.step(self.trainable_params)
                bar.update(1)
                if step % run.log_every == 0 or step == run.max_steps:
                    mean = acc.reduce(interval_loss / interval_count, reduction="mean").item()
                    elapsed = time.perf_counter() - interval_start
                    values = {"loss": mean, "lr": lr_scheduler.get_last_lr()[0], "images_per_s": interval_images / elapsed}
                    if grad_norm is not None:
                        values["grad_norm"] = float(grad_norm)
                    self.log(values, step)
                    self.result.losses.append(mean)
                    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{values['lr']:.2e}")
                    interval_loss.zero_()
                    interval_count, interval_start, interval_images = 0, time.perf_counter(), 0
                every = config.validation.every
                if every and step % every == 0 and step != run.max_steps:
                    self.validate(step)
                every = config.checkpoint.every
                if every and step % every == 0 and step != run.max_steps:
                    self.save_checkpoint(step, epoch, position, micro)
                if step >= run.max_steps:
                    break
            else:  # the epoch ran out: the next one starts at its first batch
                epoch, position = epoch + 1, 0
        bar.close()

        if resume_from is None or step > _step_of(resume_from):
            self.save_checkpoint(step, epoch, position, micro)
        self.validate(step)
        self.save_outputs(step, self.elapsed_before + time.perf_counter() - self.started)
        acc.end_training()
        self.result.steps = step
        return self.result

    # -- set-up ---------------------------------------------------------------------------------

    def load_model(self):
        from ..generation.pipeline import LatentDiffusion

        model = self.config.model
        if model.path:
            pipe = LatentDiffusion.from_pretrained(model.path)
        else:
            from ..models.architectures import build_components

            overrides = {"unet": model.unet_config, "vae": model.vae_config, "text_encoder": model.text_encoder_config}
            pipe = LatentDiffusion(**build_components(model.preset, model.init_seed, overrides),
                                   source={"preset": model.preset, "seed": model.init_seed})  # fmt: skip
        if model.vae_path:
            pipe.vae = load_vae(model.vae_path)
        return pipe

    def load_data(self) -> None:
        from accelerate.utils import broadcast_object_list

        config = self.config
        holder = [None]
        if self.main:
            holder[0] = scan(config.data, progress=config.train.progress)
        broadcast_object_list(holder)  # one scan, every rank the same list
        self.source = holder[0]
        self.result.skipped = self.source.skipped
        if self.main:
            print(f"training data: {len(self.source.records)} images from {config.data.path}")
            if self.source.skipped:
                print(skipped_report(self.source.skipped))
                with atomic_write(self.out / "skipped.jsonl", "w") as f:
                    for key, reason in self.source.skipped:
                        f.write(json.dumps({"image": key, "reason": reason}) + "\n")
        if not self.source.records:
            raise InvalidInputError(f"no usable training images in {config.data.path}")
        self.buckets, self.bucket_of = assign_buckets(self.source.records, config.data)
        factor = downscale_factor(self.pipe.vae) * downscale_factor(self.pipe.unet)
        for w, h in self.buckets:
            if w % factor or h % factor:
                raise InvalidInputError(
                    f"training size {w}x{h} is not a multiple of {factor} (VAE x U-Net downsampling); "
                    f"use a data.resolution / data.bucket_step that is"
                )

    def setup_modules(self) -> list[torch.nn.Parameter]:
        """Freeze what stays fixed, add LoRA adapters, and return the parameters to train."""
        config, pipe = self.config, self.pipe
        unet, te, vae = pipe.unet, pipe.text_encoder, pipe.vae
        for module in (unet, te, vae):
            module.requires_grad_(False).eval()
        lora = config.lora
        train_unet = config.model.train_unet or lora.enabled
        self.train_te = config.model.train_text_encoder
        if lora.enabled:
            from ..models.lora import add_lora_adapter

            add_lora_adapter(unet, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.unet_targets)
            if self.train_te:
                add_lora_adapter(te, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                                 targets=lora.text_encoder_targets)  # fmt: skip
        elif train_unet:
            unet.requires_grad_(True)
        if self.train_te and not lora.enabled:
            te.requires_grad_(True)
        self.trained_modules = ([unet] if train_unet else []) + ([te] if self.train_te else [])
        if config.train.channels_last:
            unet.to(memory_format=torch.channels_last)
        for module in self.trained_modules:
            module.train()
            if config.train.compile:
                module.compile()  # in place: names, state dicts and checkpoints stay those of the module
            if config.train.gradient_checkpointing:
                if module is unet:
                    unet.enable_gradient_checkpointing()
                else:
                    te.gradient_checkpointing_enable()
        # Frozen parts run in the mixed-precision dtype to save memory; the SD VAE overflows in fp16, so it
        # stays in fp32 unless the run is bf16.
        weight_dtype = WEIGHT_DTYPES[config.train.mixed_precision]
        if not self.train_te:
            te.to(self.device, dtype=weight_dtype)
        if unet not in self.trained_modules:  # a text-encoder-only run still runs the frozen U-Net
            unet.to(self.device, dtype=weight_dtype)
        # (torch's .to: diffusers' own warns about fp32-only modules even when the VAE lists none)
        torch.nn.Module.to(vae, self.device, dtype=torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32)
        params = [p for m in self.trained_modules for p in m.parameters() if p.requires_grad]
        if self.main:
            count = sum(p.numel() for p in params)
            what = "LoRA adapters" if lora.enabled else " + ".join(
                n for n, m in (("U-Net", unet), ("text encoder", te)) if m in self.trained_modules
            )
            print(f"training {what}: {count:,} parameters")
        return params

    def fill_cache(self) -> None:
        from ..data.cache import LatentCache
        from ..models.hashing import weight_hash

        config, pipe = self.config, self.pipe
        self.cache = None
        if not config.data.cache:
            return
        root = Path(config.data.cache_dir).expanduser() if config.data.cache_dir else self.out / "cache"
        text_frozen = not self.train_te
        self.cache = LatentCache(
            root,
            vae_hash=weight_hash([("vae", pipe.vae)]),
            text_hash=weight_hash([("text_encoder", pipe.text_encoder)]) if text_frozen else None,
        )
        stats = self.cache.fill(self.source, self.buckets, self.bucket_of, config.data, vae=pipe.vae,
                                text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, rank=self.rank,
                                world=self.world, progress=self.main and config.train.progress)  # fmt: skip
        self.accelerator.wait_for_everyone()
        self.result.cache = stats
        self.say(stats.line())
        # With everything cached the encoders leave the accelerator until validation needs them.
        pipe.vae.to("cpu")
        if text_frozen:
            pipe.text_encoder.to("cpu")

    def make_batches(self):
        config = self.config
        self.global_batch = config.train.batch_size * self.world * config.train.gradient_accumulation
        batches = BucketBatches(self.bucket_of, config.train.batch_size, config.train.seed, self.world, self.rank)
        self.dataset = TrainDataset(self.source, self.buckets, self.bucket_of, config.data, config.train.seed,
                                    tokenizer=self.pipe.tokenizer, cache=self.cache)  # fmt: skip
        workers = config.data.num_workers
        kwargs = {"num_workers": workers, "pin_memory": self.device.type == "cuda"}
        if workers:
            kwargs.update(persistent_workers=False, prefetch_factor=4)
        return batches, kwargs

    def make_optimizer(self, params):
        from diffusers.optimization import get_scheduler

        opt = self.config.optim
        self.trainable_params = params
        te_params = {id(p) for p in self.pipe.text_encoder.parameters()}
        groups = [{"params": [p for p in params if id(p) not in te_params], "lr": opt.lr},
                  {"params": [p for p in params if id(p) in te_params], "lr": opt.text_encoder_lr or opt.lr}]  # fmt: skip
        groups = [g for g in groups if g["params"]]
        kwargs = {"betas": (opt.beta1, opt.beta2), "eps": opt.eps, "weight_decay": opt.weight_decay}
        if opt.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise InvalidInputError("optim.use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
            optimizer = bnb.optim.AdamW8bit(groups, **kwargs)
        else:
            fused = self.device.type == "cuda"  # one kernel for all parameters on the GPU
            optimizer = torch.optim.AdamW(groups, fused=fused, **kwargs)
        name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[opt.lr_schedule]
        lr_scheduler = get_scheduler(name, optimizer, num_warmup_steps=opt.warmup_steps,
                                     num_training_steps=self.config.train.max_steps)  # fmt: skip
        return optimizer, lr_scheduler

    def make_ema(self, params):
        if not self.config.train.ema:
            return None
        from diffusers.training_utils import EMAModel

        return EMAModel(params, decay=self.config.train.ema_decay)

    def prepare(self, optimizer, lr_scheduler) -> None:
        acc = self.accelerator
        prepared = acc.prepare(*self.trained_modules, optimizer)
        self.trained_modules, self.optimizer = list(prepared[:-1]), prepared[-1]
        self.unet = self._trained_or_frozen(self.pipe.unet)
        self.text_encoder = self._trained_or_frozen(self.pipe.text_encoder)
        # The LR schedule is stepped by us once per optimizer step (accelerate's wrapper would step it once
        # per process), and saved with the checkpoint like the EMA.
        self.lr_scheduler = lr_scheduler
        acc.register_for_checkpointing(lr_scheduler)
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)
        if self.config.lora.enabled:
            acc.register_save_state_pre_hook(_keep_trainable_weights)

    def _trained_or_frozen(self, module):
        for prepared in self.trained_modules:
            if self.accelerator.unwrap_model(prepared) is module:
                return prepared
        return module

    # -- one step -------------------------------------------------------------------------------

    def loss(self, batch: dict[str, torch.Tensor], micro: int) -> torch.Tensor:
        config, pipe = self.config, self.pipe
        seed, per_rank = config.train.seed, config.train.batch_size
        if "latent_dist" in batch:
            mean, std = batch["latent_dist"].to(self.device, non_blocking=True).chunk(2, dim=1)
        else:
            with torch.no_grad():
                pixels = batch["pixels"].to(self.device, pipe.vae.dtype, non_blocking=True)  # (B, 3, H, W)
                dist = pipe.vae.encode(pixels).latent_dist
                mean, std = dist.mean.float(), dist.std.float()  # (B, C, H/8, W/8)
        shape = (per_rank * self.world, *mean.shape[1:])

        def draw(what, size=shape, kind="normal"):
            return draw_global(size, step_seed(seed, micro, what), self.device, self.rank, per_rank, kind)

        latents = (mean + std * draw("posterior")) * pipe.vae.config.scaling_factor  # z_0 ~ q(z | x), scaled
        noise = draw("noise")
        if config.objective.noise_offset:
            noise = noise + config.objective.noise_offset * draw("offset", (shape[0], shape[1], 1, 1))
        timesteps = draw("timesteps", (shape[0],), self.noise_scheduler.config.num_train_timesteps)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)  # z_t = a_t z_0 + s_t eps
        if "text_embeds" in batch:
            cond = batch["text_embeds"].to(self.device, non_blocking=True)
        else:
            with torch.set_grad_enabled(self.train_te):
                cond = self.text_encoder(batch["input_ids"].to(self.device, non_blocking=True))[0]  # (B, 77, D)
        pred = self.unet(noisy, timesteps, cond.to(noisy.dtype)).sample
        return diffusion_loss(pred, latents, noise, timesteps, self.noise_scheduler, config.objective.snr_gamma).mean()

    # -- validation, checkpoints, outputs -------------------------------------------------------

    def inference_pipe(self):
        """A pipeline over the modules being trained (no copies), with the trained noise schedule."""
        from ..generation.pipeline import LatentDiffusion

        acc, pipe = self.accelerator, self.pipe
        return LatentDiffusion(
            unet=acc.unwrap_model(self.unet),
            vae=pipe.vae,
            text_encoder=acc.unwrap_model(self.text_encoder),
            tokenizer=pipe.tokenizer,
            scheduler_config=inference_scheduler_config(pipe.scheduler_config, self.noise_scheduler),
            source={"training": str(self.out)},
        )

    def validate(self, step: int) -> None:
        from accelerate.utils import gather_object

        val = self.config.validation
        if not val.prompts:
            return
        jobs = [(p, s) for p in val.prompts for s in val.seeds]
        # prompts split across ranks; sharded weights need every rank in every forward, so all run all
        mine = list(range(len(jobs)))[0 if self.sharded else self.rank :: 1 if self.sharded else self.world]
        pipe = self.inference_pipe()
        moved = [m for m in (pipe.vae, pipe.text_encoder) if next(m.parameters()).device != self.device]
        for module in moved:
            module.to(self.device)
        if self.ema is not None:
            self.ema.store(self.trainable_params)
            self.ema.copy_to(self.trainable_params)
        for module in self.trained_modules:
            module.eval()
        size = self.config.data.resolution
        made = []
        try:
            with torch.no_grad(), self.accelerator.autocast():
                for i in mine:
                    prompt, seed = jobs[i]
                    image = pipe(prompt, seed=seed, num_inference_steps=val.steps, guidance_scale=val.guidance,
                                 scheduler=val.scheduler, height=size, width=size, output_type="np",
                                 progress=False).images[0]  # fmt: skip
                    made.append((i, (image * 255).round().astype("uint8")))
        finally:
            for module in self.trained_modules:
                module.train()
            if self.ema is not None:
                self.ema.restore(self.trainable_params)
            for module in moved:
                module.to("cpu")
        gathered = made if self.sharded else sorted(gather_object(made), key=lambda item: item[0])
        if not self.main:
            return
        sheet = grid([image for _, image in gathered], columns=len(val.seeds))
        folder = self.out / "validation"
        folder.mkdir(exist_ok=True)
        with atomic_write(folder / f"step-{step:08d}.png") as f:
            sheet.save(f, format="PNG")
        if self.tensorboard:
            import numpy as np

            self.accelerator.get_tracker("tensorboard", unwrap=True).add_image(
                "validation", np.asarray(sheet), step, dataformats="HWC"
            )

    def save_checkpoint(self, step: int, epoch: int, position: int, micro: int) -> None:
        state = {
            "step": step,
            "epoch": epoch,
            "position": position,  # batches of `epoch` already consumed
            "micro_step": micro,
            "seed": self.config.train.seed,  # the data order and noise derive from it
            "world_batch": self.global_batch,
            "processes": self.world,
            "seconds": self.elapsed_before + time.perf_counter() - self.started,  # training time, all sessions
        }
        path = checkpoints.save(self.accelerator, self.out, step, state, to_toml(self.config), self.config.checkpoint.keep)
        self.say(f"saved {path.name}")

    def save_outputs(self, step: int, seconds: float) -> None:
        """The final model folder (or LoRA file) with a model card; main process only writes."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.ema is not None:
            self.ema.copy_to(self.trainable_params)  # the final weights are the averaged ones
        full = [acc.get_state_dict(m) for m in self.trained_modules] if self.sharded else None  # collective
        if self.main:
            pipe = self.inference_pipe()
            if full is not None:  # whole weights gathered from the shards, into plain copies of the modules
                pipe.unet, pipe.text_encoder = (_gathered(acc, m, full, self.trained_modules) for m in (self.unet, self.text_encoder))
            self.result.steps = step
            card = model_card(self.config, self.result, seconds, len(self.source.records), self.world)
            if self.config.lora.enabled:
                from peft.utils import get_peft_model_state_dict

                from ..models.lora import save_lora

                lora = self.config.lora
                path = save_lora(
                    self.out / "lora.safetensors",
                    unet_state=get_peft_model_state_dict(pipe.unet),
                    text_encoder_state=get_peft_model_state_dict(pipe.text_encoder) if self.train_te else None,
                    rank=lora.rank,
                    alpha=lora.alpha,
                    metadata={"latentdiff_config": to_toml(self.config), "ss_steps": str(step)},
                )
                self.result.lora_file = path
                with atomic_write(self.out / "README.md", "w") as f:
                    f.write(card)
                print(f"LoRA written to {path}")
            else:
                folder = pipe.save_pretrained(self.out / "model")
                with atomic_write(folder / "README.md", "w") as f:
                    f.write(card)
                self.result.model_dir = folder
                print(f"model written to {folder}")
        acc.wait_for_everyone()
        if not self.main:  # every rank reports the same places
            self.result.model_dir = None if self.config.lora.enabled else self.out / "model"
            self.result.lora_file = self.out / "lora.safetensors" if self.config.lora.enabled else None

    def _progress_bar(self, start: int, total: int, what: str = "training"):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=start, desc=what, unit="step",
                    disable=not (self.main and self.config.train.progress), dynamic_ncols=True)  # fmt: skip


def load_vae(path: str):
    """An AutoencoderKL from a model folder (its ``vae/``) or a bare VAE folder."""
    from diffusers import AutoencoderKL

    root = Path(path).expanduser()
    folder = root / "vae" if (root / "vae" / "config.json").is_file() else root
    if not (folder / "config.json").is_file():
        raise MissingFileError(f"model.vae_path: {root} holds no VAE (no config.json there or in vae/)")
    return AutoencoderKL.from_pretrained(folder, local_files_only=True)


def model_card(config: TrainConfig, result: TrainResult, seconds: float, images: int, processes: int) -> str:
    """The model folder's README.md: what it was trained from, on what, how long, with what settings."""
    import sys

    from .._version import __version__

    kind = "LoRA adapter" if config.lora.enabled else ("fine-tuned" if config.model.path else "trained from scratch")
    base = config.model.path or f"random weights of preset '{config.model.preset}' (seed {config.model.init_seed})"
    rows = [
        ("base", base),
        ("data", f"{config.data.path}: {images} images used, {len(result.skipped)} skipped"),
        ("steps", f"{result.steps} optimizer steps, global batch {config.train.batch_size * processes * config.train.gradient_accumulation}"),
        ("training time", f"{seconds / 60:.1f} min (all sessions of the run)"),
        ("hardware", f"{hardware()}, {processes} process(es), mixed precision {config.train.mixed_precision}"),
        ("library", f"latentdiff {__version__}, torch {torch.__version__}"),
    ]  # fmt: skip
    if result.losses:
        rows.append(("last logged loss", f"{result.losses[-1]:.4f}"))
    if result.vae_psnr is not None:
        rows.append(("VAE held-out PSNR", f"{result.vae_psnr:.2f} dB"))
    lines = [f"# latentdiff model ({kind})", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    licences = _data_licences(config.data.path)
    if licences:
        lines += ["## Data and licences", "", *licences, ""]
    command = " ".join(["latentdiff train", *sys.argv[1:]]) if sys.argv[0].endswith("latentdiff") else " ".join(sys.argv)
    lines += ["## How it was made", "", f"`{command}` with this resolved configuration:", "", "```toml", to_toml(config) + "```", ""]
    return "\n".join(lines)


def _data_licences(paths) -> list[str]:
    """One line per data source that says where it came from and its licence (from a builder's dataset.json)."""
    lines = []
    for path in paths if isinstance(paths, list) else [paths]:
        for folder in (Path(path), Path(path).parent):
            info = folder / "dataset.json"
            if info.is_file():
                meta = json.loads(info.read_text())
                lines.append(f"- `{path}`: {meta.get('source', '?')} Licence: {meta.get('licence', 'unknown')}.")
                break
        else:
            lines.append(f"- `{path}`: no dataset.json; source and licence not recorded")
    return lines


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}"
    return f"CPU ({platform.machine()})"


def _keep_trainable_weights(models, weights, output_dir) -> None:
    """accelerate save hook for LoRA runs: checkpoint only the adapter weights, not the frozen base."""
    for model, state in zip(models, weights):
        keep = {name for name, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in keep]:
            del state[key]


def _gathered(acc, module, states, prepared):
    """``module`` as a plain unsharded copy holding the gathered full weights (or itself if not trained)."""
    for candidate, state in zip(prepared, states):
        if candidate is module:
            inner = acc.unwrap_model(module)
            # a fresh instance of the same architecture: copying the sharded module would copy its shards
            plain = type(inner).from_config(inner.config) if hasattr(type(inner), "from_config") else type(inner)(inner.config)
            plain.load_state_dict(state)
            return plain.eval()
    return acc.unwrap_model(module)


def _step_of(checkpoint: Path) -> int:
    return int(checkpoints.PATTERN.match(checkpoint.name).group(1))


def _flat_scalars(tree: dict, prefix: str = "") -> dict[str, Any]:
    """TensorBoard's hparams take scalars only: nested keys joined with '.', lists as text."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat_scalars(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _have_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True
