"""The training configuration: a tree of typed dataclasses filled from TOML (see ``tomlconfig.py``).

Section by section it mirrors ``training/configs/*.toml``; :func:`check_config` rejects settings
that cannot work before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..checks import MAX_SEED
from ..data.sources import DataConfig
from ..errors import InvalidInputError
from ..generation.samplers import check_sampler_name
from ..tomlconfig import load_config

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LR_SCHEDULES = ("constant", "cosine", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class ModelConfig:
    path: str = ""  # diffusers-format folder to start from; "" = random weights of `preset` (from scratch)
    preset: str = "tiny"  # architecture of a from-scratch run (see latentdiff.models.architectures.PRESETS)
    init_seed: int = 0  # seed of the random initial weights
    vae_path: str = ""  # take the VAE from this model folder or bare AutoencoderKL folder ("default": the default model's)
    train_unet: bool = True
    train_text_encoder: bool = False
    # From scratch only: entries that replace the preset's diffusers / transformers config entries,
    # e.g. [model.vae_config] norm_num_groups = 8 (how the default model's recipe was searched)
    unet_config: dict[str, Any] = field(default_factory=dict)
    vae_config: dict[str, Any] = field(default_factory=dict)
    text_encoder_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoraSettings:
    enabled: bool = False
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    unet_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    layout: str = "kohya"  # lora.safetensors layout: kohya (web UIs, ComfyUI) or peft (diffusers' load_lora_weights)


@dataclass
class ObjectiveConfig:
    prediction_type: str = ""  # "" = the model's; epsilon, v_prediction, sample
    noise_schedule: str = ""  # "" = the model's; linear, scaled_linear, cosine
    zero_terminal_snr: bool = False  # Lin et al. 2024: rescale so the last step is pure noise (use v_prediction)
    num_train_timesteps: int = 1000
    snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (Hang et al. 2023); 0 = off, 5 is the paper's choice
    noise_offset: float = 0.0  # add offset * N(0, 1) per channel to the noise (helps very dark / bright images)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    text_encoder_lr: float = 0.0  # 0 = same as lr
    lr_schedule: str = "constant"  # constant, cosine, linear (each after `warmup_steps` of linear warm-up)
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping
    use_8bit_adam: bool = False  # bitsandbytes' AdamW8bit


@dataclass
class RunConfig:
    output_dir: str = "runs/latentdiff"
    seed: int = 0
    max_steps: int = 1000  # optimizer steps; 0 = stop after the VAE stage
    batch_size: int = 4  # per process; global batch = batch_size * processes * gradient_accumulation
    gradient_accumulation: int = 1
    mixed_precision: str = "no"  # no, fp16, bf16
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the U-Net (and text encoder) forward; pays a compile at start
    channels_last: bool = False  # U-Net activations in NHWC memory order (faster convolutions on GPUs)
    ema: bool = False
    ema_decay: float = 0.9999
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass
class CheckpointConfig:
    every: int = 500  # steps; 0 = only at the end
    keep: int = 3  # newest complete checkpoints kept
    resume: str = ""  # "" = fresh start, "latest", or a checkpoint folder


@dataclass
class ValidationConfig:
    every: int = 0  # steps; 0 = only at the end
    prompts: list[str] = field(default_factory=list)  # none = no validation images
    seeds: list[int] = field(default_factory=lambda: [0])  # one image per (prompt, seed)
    steps: int = 25
    guidance: float = 7.5
    scheduler: str = "ddim"
    # [controlnet] runs: one conditioning image (a file) per prompt, given to the ControlNet being trained
    control_images: list[str] = field(default_factory=list)


@dataclass
class VaeStageConfig:
    steps: int = 0  # > 0: train the VAE first (from-scratch models without a pretrained VAE)
    batch_size: int = 8
    lr: float = 1e-4
    # the last decay_steps of the stage lower the LR linearly to 0 ("warmup-stable-decay"; 0 = constant LR):
    # a run can be extended by raising steps and decay_steps together, and the steps already run stay valid
    decay_steps: int = 0
    kl_weight: float = 1e-6  # weight of KL(q(z|x) || N(0, I)) against the reconstruction loss
    holdout: int = 8  # images kept out of VAE training to report PSNR on
    eval_every: int = 0  # steps; 0 = only at the end


@dataclass
class DistillConfig:
    """Latent consistency distillation (Luo et al. 2023, see ``distill.py``): ``model.path`` is the
    teacher; the student is the U-Net trained in full (``model.train_unet``) or as a LoRA (``lora``)."""

    enabled: bool = False
    # the teacher's classifier-free guidance scale, drawn for each sample from [min, max] (the pipeline's
    # scale: 1 = no guidance); a full student learns to take it as an embedding, a LoRA learns one average
    guidance_min: float = 3.0
    guidance_max: float = 13.0
    guidance_embedding_dim: int = 256  # full students: the U-Net's time_cond_proj_dim (0: no guidance input)
    target_decay: float = 0.95  # EMA rate of the target network (the paper's mu)
    huber_c: float = 0.001  # pseudo-Huber loss sqrt(d^2 + c^2) - c


@dataclass
class ControlNetTrainConfig:
    """ControlNet training (Zhang et al. 2023, see ``controlnet.py``): a ControlNet learns to steer the frozen
    model (``model.path``, or a preset) from a conditioning image per training image. Only the ControlNet
    trains: the U-Net, VAE and text encoders stay as they are (``model.train_unet`` is not read)."""

    enabled: bool = False
    # a diffusers ControlNetModel folder (or single file) to continue from; "" = a new one from the U-Net's
    # encoder with zero convolutions at zero (diffusers' ControlNetModel.from_unet), so it starts as a no-op
    path: str = ""
    # the data's column of conditioning images: in an imagefolder's metadata.jsonl / .csv a path relative to
    # the folder (like file_name); in a datasets folder or a table file an image column
    conditioning_column: str = "conditioning_image"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    vae: VaeStageConfig = field(default_factory=VaeStageConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    controlnet: ControlNetTrainConfig = field(default_factory=ControlNetTrainConfig)

    @classmethod
    def load(cls, path=None, overrides=()) -> "TrainConfig":
        config = load_config(cls, path, overrides)
        check_config(config)
        return config


def check_config(config: TrainConfig) -> None:
    """Reject settings that cannot work, before any model is loaded."""

    def need(ok: bool, message: str):
        if not ok:
            raise InvalidInputError(message)

    run, data, obj, opt = config.train, config.data, config.objective, config.optim
    need(obj.prediction_type in ("",) + PREDICTION_TYPES, f"objective.prediction_type must be one of {PREDICTION_TYPES}")
    need(opt.lr_schedule in LR_SCHEDULES, f"optim.lr_schedule must be one of {LR_SCHEDULES}, got {opt.lr_schedule!r}")
    need(run.mixed_precision in MIXED_PRECISION, f"train.mixed_precision must be one of {MIXED_PRECISION}")
    need(run.max_steps >= 0, f"train.max_steps must be 0 (the VAE stage only) or more, got {run.max_steps}")
    need(run.max_steps > 0 or config.vae.steps > 0, "train.max_steps = 0 runs only the VAE stage; set vae.steps too")
    for key, value in [("train.batch_size", run.batch_size),
                       ("train.gradient_accumulation", run.gradient_accumulation), ("train.log_every", run.log_every),
                       ("data.resolution", data.resolution), ("data.bucket_step", data.bucket_step),
                       ("objective.num_train_timesteps", obj.num_train_timesteps)]:  # fmt: skip
        need(value >= 1, f"{key} must be at least 1, got {value}")
    need(0.0 <= data.caption_dropout <= 1.0, f"data.caption_dropout must be in [0, 1], got {data.caption_dropout}")
    need(opt.lr > 0, f"optim.lr must be positive, got {opt.lr}")
    need(0.0 <= run.ema_decay < 1.0, f"train.ema_decay must be in [0, 1), got {run.ema_decay}")
    need(data.max_aspect >= 1.0, f"data.max_aspect must be at least 1, got {data.max_aspect}")
    need(not (data.cache and not data.center_crop),
         "data.cache needs data.center_crop = true (a random crop cannot be cached ahead); turn one of them off")  # fmt: skip
    need(config.model.train_unet or config.model.train_text_encoder or config.lora.enabled or config.controlnet.enabled,
         "nothing to train: set model.train_unet or model.train_text_encoder, or lora.enabled")  # fmt: skip
    need(config.checkpoint.keep >= 1, "checkpoint.keep must be at least 1")
    # ranges that torch or diffusers would otherwise refuse with a traceback, or take without a word
    for key, value in [("optim.warmup_steps", opt.warmup_steps), ("checkpoint.every", config.checkpoint.every),
                       ("validation.every", config.validation.every), ("data.num_workers", data.num_workers),
                       ("data.max_samples", data.max_samples), ("vae.steps", config.vae.steps),
                       ("vae.holdout", config.vae.holdout), ("vae.eval_every", config.vae.eval_every)]:  # fmt: skip
        need(value >= 0, f"{key} must be 0 or more, got {value}")
    need(0.0 <= opt.beta1 < 1.0, f"optim.beta1 must be in [0, 1), got {opt.beta1}; 0.9 is usual")
    need(0.0 <= opt.beta2 < 1.0, f"optim.beta2 must be in [0, 1), got {opt.beta2}; 0.999 is usual")
    need(opt.eps > 0, f"optim.eps must be positive, got {opt.eps}; 1e-8 is usual")
    need(opt.weight_decay >= 0, f"optim.weight_decay must be 0 or more, got {opt.weight_decay}")
    need(opt.text_encoder_lr >= 0, f"optim.text_encoder_lr must be 0 (= optim.lr) or positive, got {opt.text_encoder_lr}")
    need(opt.max_grad_norm >= 0, f"optim.max_grad_norm must be 0 (no clipping) or positive, got {opt.max_grad_norm}")
    need(obj.snr_gamma >= 0 and obj.noise_offset >= 0,
         f"objective.snr_gamma and objective.noise_offset must be 0 or more, got {obj.snr_gamma} and {obj.noise_offset}")  # fmt: skip
    need(config.vae.kl_weight >= 0, f"vae.kl_weight must be 0 or more, got {config.vae.kl_weight}")
    lora = config.lora
    need(lora.rank >= 1 and lora.alpha > 0, f"lora.rank must be at least 1 and lora.alpha positive, got {lora.rank}, {lora.alpha}")
    need(0.0 <= lora.dropout < 1.0, f"lora.dropout must be in [0, 1), got {lora.dropout}")
    need(lora.layout in ("kohya", "peft"), f"lora.layout must be kohya or peft, got {lora.layout!r}")
    val = config.validation
    need(val.steps >= 1 and val.guidance >= 0,
         f"validation.steps must be at least 1 and validation.guidance 0 or more, got {val.steps} and {val.guidance}")  # fmt: skip
    need(all(0 <= seed <= MAX_SEED for seed in val.seeds), f"validation.seeds must be from 0 to 2**64-1, got {val.seeds}")
    if val.prompts:
        check_sampler_name(val.scheduler)
    need(not (config.model.path and (config.model.unet_config or config.model.vae_config or config.model.text_encoder_config)),
         "model.unet_config / vae_config / text_encoder_config change a from-scratch architecture; "
         "they cannot apply to a pretrained model.path")  # fmt: skip
    need(not (config.lora.enabled and not config.model.path),
         "lora.enabled needs a pretrained model (model.path): LoRA adapts existing weights")  # fmt: skip
    need(config.vae.batch_size >= 1 and config.vae.lr > 0,
         f"vae.batch_size and vae.lr must be positive, got {config.vae.batch_size} and {config.vae.lr}")  # fmt: skip
    need(0 <= config.vae.decay_steps <= config.vae.steps,
         f"vae.decay_steps must be from 0 to vae.steps ({config.vae.steps}), got {config.vae.decay_steps}")  # fmt: skip
    if config.controlnet.enabled:  # (first: it names every section it cannot be combined with)
        _check_controlnet(config, need)
    if config.distill.enabled:
        _check_distill(config, need)
    need(not (val.control_images and not config.controlnet.enabled),
         "validation.control_images are for ControlNet runs (controlnet.enabled = true)")  # fmt: skip


def _check_distill(config: TrainConfig, need) -> None:
    d, obj = config.distill, config.objective
    need(bool(config.model.path), "distill.enabled needs the teacher: model.path (a model folder, or \"default\")")
    need(not config.model.train_text_encoder, "distillation trains the U-Net only; set model.train_text_encoder = false")
    need(not (obj.prediction_type or obj.noise_schedule or obj.zero_terminal_snr or obj.snr_gamma or obj.noise_offset),
         "distillation follows the teacher's own noise schedule and prediction; leave objective.prediction_type, "
         "noise_schedule, zero_terminal_snr, snr_gamma and noise_offset unset")  # fmt: skip
    need(1.0 <= d.guidance_min <= d.guidance_max <= 100.0,
         f"distill.guidance_min and guidance_max must satisfy 1 <= min <= max <= 100, got {d.guidance_min} and {d.guidance_max}")  # fmt: skip
    need(d.guidance_embedding_dim >= 0, f"distill.guidance_embedding_dim must be 0 (none) or more, got {d.guidance_embedding_dim}")
    need(0.0 <= d.target_decay < 1.0, f"distill.target_decay must be in [0, 1), got {d.target_decay}; 0.95 is the paper's")
    need(d.huber_c > 0, f"distill.huber_c must be positive, got {d.huber_c}; 0.001 is usual")
    need(not (config.validation.prompts and config.validation.scheduler != "lcm"),
         "a distilled model samples with the lcm sampler: set validation.scheduler = \"lcm\" (and steps 1-8)")  # fmt: skip


def _check_controlnet(config: TrainConfig, need) -> None:
    from pathlib import Path

    c, val = config.controlnet, config.validation
    others = [key for key, on in (("lora.enabled", config.lora.enabled), ("distill.enabled", config.distill.enabled),
                                  ("model.train_text_encoder", config.model.train_text_encoder),
                                  ("vae.steps", config.vae.steps > 0)) if on]  # fmt: skip
    need(not others,
         f"ControlNet training trains the ControlNet alone, with the model frozen; turn off {', '.join(others)}")  # fmt: skip
    need(bool(c.conditioning_column), "controlnet.conditioning_column must name the data's conditioning image column")
    need(not c.path or Path(c.path).expanduser().exists(),
         f"controlnet.path: {c.path} does not exist; give a ControlNetModel folder or file, or \"\" for a new ControlNet")  # fmt: skip
    if not config.model.path:
        from ..models.architectures import get_preset, is_sdxl

        need(not is_sdxl(get_preset(config.model.preset).unet),
             f"ControlNet training works with SD 1.x / 2.x models so far; model.preset {config.model.preset!r} is SDXL")  # fmt: skip
    need(len(val.control_images) == len(val.prompts),
         f"a ControlNet run's validation needs one validation.control_images entry per validation prompt: "
         f"{len(val.prompts)} prompt(s), {len(val.control_images)} control image(s)")  # fmt: skip
    for image in val.control_images:
        need(Path(image).expanduser().is_file(), f"validation.control_images: {image} is not a file")
