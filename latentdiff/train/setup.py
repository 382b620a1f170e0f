"""Setting a training run up, in the order it must happen.

:func:`start` makes the :class:`Session` (the accelerator, the output folder, logging), which both
stages of a run share; :func:`load_model` and :func:`load_data` bring the model and the checked
images; after an optional VAE stage (``vae_stage.py``), :func:`setup` turns them into a
:class:`Run`, the state the U-Net loop reads: the trained modules (frozen parts, adapters,
precision), the cache, the batches, the optimizer, ``accelerator.prepare``, the trainable
parameters and EMA of the *prepared* modules, and the position of a resumed run.

Every piece of work the main process does alone while the others wait goes through
``distributed.on_main``, so a failure there ends every process instead of leaving them at a barrier.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..data.buckets import BucketBatches, assign_buckets
from ..data.dataset import TrainDataset
from ..data.sources import Source, scan, skipped_report
from ..distributed import on_main
from ..errors import InvalidInputError, MissingFileError
from ..fileio import atomic_write
from ..models.architectures import downscale_factor
from ..tomlconfig import to_dict
from . import checkpoints
from .config import TrainConfig
from .steps import Steps

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Optional[Path] = None  # the final diffusers folder (full fine-tune / from scratch)
    lora_file: Optional[Path] = None  # the LoRA file (LoRA runs)
    controlnet_dir: Path | None = None  # the ControlNetModel folder (ControlNet runs)
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss of each log interval, this session
    skipped: list[tuple[str, str]] = field(default_factory=list)
    cache: Any = None  # CacheStats when data.cache
    vae_psnr: Optional[float] = None  # held-out PSNR (dB) after a VAE stage
    vae_seconds: Optional[float] = None  # wall time of the VAE stage, all sessions (from its report)
    vae_steps: Optional[int] = None
    cache_seconds: float = 0.0  # wall time of filling the latent cache in this session
    main_process: bool = True  # False on the other ranks of a multi-process run


class Session:
    """The accelerator, the output folder and the reporting of one run (both of its stages)."""

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
        # train.mixed_precision decides (it also sets the frozen parts' dtype); `accelerate launch` passes
        # its config's mixed_precision in the environment, which the explicit argument below overrides
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        launcher_differs = launcher not in ("", "no", run.mixed_precision)
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
        self.resume_from: Optional[Path] = None  # the checkpoint the U-Net stage continues from (start())
        if run.tensorboard and not self.tensorboard:
            self.say("warning: TensorBoard is not installed (pip install tensorboard); logging to log.jsonl only")
        if launcher_differs:
            self.say(f"warning: the accelerate config asks for mixed_precision={launcher}, the training config for "
                     f"train.mixed_precision={run.mixed_precision!r}; the training config's is used "
                     "(set train.mixed_precision to change it)")  # fmt: skip

    def say(self, text: str) -> None:
        if self.main:
            print(text, flush=True)

    def log(self, values: dict[str, float], step: int) -> None:
        """One line of log.jsonl (and TensorBoard), written by the main process."""
        on_main(self._write_log, values, step)

    def forget_log_after(self, step: int, key: str) -> None:
        """On a resume from ``step``: drop the log.jsonl lines with ``key`` (one stage's) after it, which
        the stopped run wrote after its last checkpoint and this run will write again (collective)."""
        on_main(_trim_log, self.out / "log.jsonl", step, key)

    def _write_log(self, values: dict[str, float], step: int) -> None:
        with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tensorboard:
            self.accelerator.log(values, step=step)

    def steps(self, total: int, what: str, state: Optional[dict[str, Any]] = None) -> Steps:
        """A stage's bookkeeping (see ``steps.py``), at ``state`` (a checkpoint's) or at the start, with a
        progress bar on the main process."""
        from tqdm.auto import tqdm

        start = (state or {}).get("step", 0)
        bar = tqdm(total=total, initial=start, desc=what, unit="step",
                   disable=not (self.main and self.config.train.progress), dynamic_ncols=True)  # fmt: skip
        return Steps(total, state, bar)

    def end(self) -> TrainResult:
        self.accelerator.end_training()
        return self.result


def start(config: TrainConfig) -> Session:
    """The session of a run: the output folder, cleared of what a crash mid-save left, the
    checkpoint to resume from, and the trackers."""
    session = Session(config)
    session.out.mkdir(parents=True, exist_ok=True)
    on_main(_remove_stale_checkpoints, session.out)
    session.resume_from = checkpoints.resolve(config.checkpoint.resume, session.out)
    if session.tensorboard:
        session.accelerator.init_trackers("latentdiff", config=_flat_scalars(to_dict(config)))
    return session


def load_model(config: TrainConfig):
    """The pipeline to train: a pretrained folder, or random weights of a preset (with the config's
    architecture overrides); with ``model.vae_path``, its VAE replaced."""
    from ..generation.pipeline import LatentDiffusion

    model = config.model
    vae = load_vae(model.vae_path) if model.vae_path else None
    if model.path:  # "default": the embedded default model
        pipe = LatentDiffusion.from_pretrained(None if model.path == "default" else model.path)
    else:
        from ..models.architectures import build_components

        unet = dict(model.unet_config)
        if vae is not None:  # a new U-Net takes the latents of the VAE it is given, unless told otherwise
            channels = vae.config.latent_channels
            unet = {"in_channels": channels, "out_channels": channels, **unet}
        overrides = {"unet": unet, "vae": model.vae_config, "text_encoder": model.text_encoder_config}
        pipe = LatentDiffusion(**build_components(model.preset, model.init_seed, overrides),
                               source={"preset": model.preset, "seed": model.init_seed})  # fmt: skip
    if vae is not None:
        pipe.vae = vae
    return pipe


def load_vae(path: str):
    """An AutoencoderKL from a model folder (its ``vae/``) or a bare VAE folder; ``"default"``: the
    embedded default model's (in float32)."""
    from diffusers import AutoencoderKL

    from ..generation.pipeline import DEFAULT_MODEL_DIR

    root = DEFAULT_MODEL_DIR if path == "default" else Path(path).expanduser()
    folder = root / "vae" if (root / "vae" / "config.json").is_file() else root
    if not (folder / "config.json").is_file():
        raise MissingFileError(f"model.vae_path: {root} holds no VAE (no config.json there or in vae/)")
    return AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)


@dataclass
class TrainingData:
    """The checked images and the bucket (training size) of each."""

    source: Source
    buckets: list[tuple[int, int]]
    bucket_of: list[int]


def load_data(session: Session, pipe) -> TrainingData:
    """Scan the data once, on the main process (every rank gets the same list), and bucket it."""
    config = session.config
    source = on_main(_scan, session, share=True)
    session.result.skipped = source.skipped
    if not source.records:
        raise InvalidInputError(f"no usable training images in {config.data.path}")
    buckets, bucket_of = assign_buckets(source.records, config.data)
    factor = downscale_factor(pipe.vae) * downscale_factor(pipe.unet)
    for w, h in buckets:
        if w % factor or h % factor:
            raise InvalidInputError(
                f"training size {w}x{h} is not a multiple of {factor} (VAE x U-Net downsampling); "
                f"use a data.resolution / data.bucket_step that is"
            )
    return TrainingData(source, buckets, bucket_of)


@dataclass
class Run:
    """The U-Net stage, set up: what the loop, validation, checkpoints and the outputs read."""

    session: Session
    pipe: Any  # the LatentDiffusion being trained (its modules unwrapped)
    noise_scheduler: Any  # the forward process q(z_t | z_0) (objective.noise_scheduler_for)
    data: TrainingData
    dataset: TrainDataset
    batches: BucketBatches
    loader_kwargs: dict[str, Any]
    global_batch: int  # samples per optimizer step, all processes
    modules: list  # the trained modules, as accelerate prepared them
    unet: Any  # the U-Net the loss calls: the prepared one if trained, else the frozen one
    text_encoder: Any  # the same for the text encoder (None: an SDXL refiner has only the second)
    train_text_encoder: bool  # (SDXL: both encoders train, or neither)
    params: list  # trainable parameters of the prepared modules (clipping, EMA)
    optimizer: Any  # accelerate's wrapper: it skips the step while gradients accumulate, and scales fp16
    lr_scheduler: Any  # stepped once per optimizer step (by the loop)
    ema: Any  # diffusers' EMAModel over `params`, or None
    steps: Steps  # where the stage stands (from the checkpoint on a resume), and its wall time
    text_encoder_2: Any = None  # SDXL's second text encoder, as text_encoder
    distill: Any = None  # distill.Distiller: teacher, target network and loss of a distillation run, or None
    controlnet: Any = None  # the ControlNet being trained, as prepared (ControlNet runs; the U-Net is frozen), or None

    @property
    def text_encoders(self) -> list:
        """The text encoders the loss calls, in order (SDXL: two; the refiner: the second alone)."""
        return [te for te in (self.text_encoder, self.text_encoder_2) if te is not None]


def setup(session: Session, pipe, noise_scheduler, data: TrainingData) -> Run:
    """Everything the U-Net loop needs, in the order it must be made (see the module docstring)."""
    config, acc = session.config, session.accelerator
    distiller = teacher = controlnet = None
    if config.distill.enabled:  # the student starts as the teacher (distill.py)
        from .distill import Distiller, make_student

        teacher = make_student(pipe, config)
    if config.controlnet.enabled:  # a trainable copy of the U-Net's encoder (controlnet.py)
        from .controlnet import make_controlnet

        controlnet = make_controlnet(pipe, config)
    modules, train_te = choose_trained(session, pipe, controlnet)
    if config.distill.enabled:
        distiller = Distiller(session, pipe, noise_scheduler, teacher)
    started = time.perf_counter()
    cache = fill_cache(session, pipe, data, train_te)
    session.result.cache_seconds = time.perf_counter() - started
    global_batch = config.train.batch_size * session.world * config.train.gradient_accumulation
    batches = BucketBatches(data.bucket_of, config.train.batch_size, config.train.seed, session.world, session.rank)
    dataset = TrainDataset(data.source, data.buckets, data.bucket_of, config.data, config.train.seed,
                           tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, time_ids=pipe.time_id_count,
                           cache=cache, conditioning=controlnet is not None)  # fmt: skip
    workers = config.data.num_workers
    loader_kwargs = {"num_workers": workers, "pin_memory": session.device.type == "cuda"}
    if workers:
        loader_kwargs.update(persistent_workers=False, prefetch_factor=4)
    # The optimizer is made from the modules as they are (accelerate's prepare maps it onto what it
    # makes of them); everything else that holds parameters is made from the prepared modules.
    optimizer, lr_scheduler = make_optimizer(config, modules, text_encoders(pipe), session.device)
    prepared = acc.prepare(*modules, optimizer)
    modules, optimizer = list(prepared[:-1]), prepared[-1]
    # Under FSDP2 prepare replaces the parameters with sharded ones: clipping and the EMA must
    # act on those, not on the tensors the modules held before.
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    ema = None
    if config.train.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=config.train.ema_decay)
    if distiller is not None:
        distiller.attach_target(acc.unwrap_model(modules[0]), params)
    # The LR schedule is stepped by us once per optimizer step (accelerate's wrapper would step it once
    # per process). It and the EMA are saved with the checkpoint by checkpoints.save, as JSON +
    # safetensors: registered with accelerate they would be pickles that resuming loads with
    # weights_only=False (code a stranger put in the folder would run).
    if config.lora.enabled:
        acc.register_save_state_pre_hook(_keep_trainable_weights)
    objects = checkpoint_objects(lr_scheduler, ema, distiller)
    state = _resume(session, global_batch, objects)
    return Run(
        session=session, pipe=pipe, noise_scheduler=noise_scheduler, data=data, dataset=dataset, batches=batches,
        loader_kwargs=loader_kwargs, global_batch=global_batch, modules=modules,
        unet=_prepared_or_frozen(acc, modules, pipe.unet), text_encoder=_prepared_or_frozen(acc, modules, pipe.text_encoder),
        text_encoder_2=_prepared_or_frozen(acc, modules, pipe.text_encoder_2), train_text_encoder=train_te, params=params, optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema,
        steps=session.steps(config.train.max_steps, "training", state), distill=distiller,
        controlnet=None if controlnet is None else _prepared_or_frozen(acc, modules, controlnet),
    )  # fmt: skip


def choose_trained(session: Session, pipe, controlnet=None) -> tuple[list[torch.nn.Module], bool]:
    """Freeze what stays fixed, add LoRA adapters, set precision and memory options; returns the
    modules to train and whether the text encoder is one of them. A ``controlnet`` is trained alone."""
    config, device = session.config, session.device
    unet, vae, encoders = pipe.unet, pipe.vae, text_encoders(pipe)
    for module in (unet, vae, *encoders):
        module.requires_grad_(False).eval()
    lora = config.lora
    train_unet = (config.model.train_unet or lora.enabled) and controlnet is None
    train_te = config.model.train_text_encoder and controlnet is None  # (SDXL: both encoders)
    if lora.enabled:
        from ..models.lora import add_lora_adapter

        # A's Gaussian start from the run's seed, not from whatever the global RNG holds by now: the same
        # run in a fresh process, in a test process, or as rank 0 of many (DDP copies rank 0's to the rest)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.train.seed)
            add_lora_adapter(unet, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.unet_targets)
            if train_te:
                for te in encoders:
                    add_lora_adapter(te, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                                     targets=lora.text_encoder_targets)  # fmt: skip
    elif train_unet:
        unet.requires_grad_(True)
    if train_te and not lora.enabled:
        for te in encoders:
            te.requires_grad_(True)
    if train_te and pipe.sdxl and pipe.text_encoder is not None:
        # SDXL reads the first encoder's penultimate layer: its last layer and final norm get no gradient,
        # so they stay frozen (else multi-process runs would wait for their gradients forever)
        last = pipe.text_encoder.config.num_hidden_layers - 1
        for name, param in pipe.text_encoder.named_parameters():
            if f"encoder.layers.{last}." in name or "final_layer_norm" in name:
                param.requires_grad_(False)
    modules = ([unet] if train_unet else []) + (encoders if train_te else [])
    if controlnet is not None:
        modules.append(controlnet)
    if config.train.channels_last:
        for module in (unet, controlnet) if controlnet is not None else (unet,):
            module.to(memory_format=torch.channels_last)
    if controlnet is not None and config.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # the frozen U-Net's activations are kept for the ControlNet's gradient
    for module in modules:
        module.train()
        if config.train.compile:
            module.compile()  # in place: names, state dicts and checkpoints stay those of the module
        if config.train.gradient_checkpointing:
            if module is unet or module is controlnet:
                module.enable_gradient_checkpointing()
            else:
                module.gradient_checkpointing_enable()
    # Frozen parts run in the mixed-precision dtype to save memory; the SD VAE overflows in fp16, so it
    # stays in fp32 unless the run is bf16.
    weight_dtype = WEIGHT_DTYPES[config.train.mixed_precision]
    if not train_te:
        for te in encoders:
            te.to(device, dtype=weight_dtype)
    if unet not in modules:  # a text-encoder-only or ControlNet run still runs the frozen U-Net
        unet.to(device, dtype=weight_dtype)
    if controlnet is not None:
        controlnet.to(device)  # trained in float32 (accelerate's autocast under mixed precision)
    # (torch's .to: diffusers' own warns about fp32-only modules even when the VAE lists none)
    torch.nn.Module.to(vae, device, dtype=torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32)
    if session.main:
        count = sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
        what = "LoRA adapters" if lora.enabled else " + ".join(
            n for n, m in (("U-Net", unet), ("text encoder", pipe.text_encoder), ("text encoder 2", pipe.text_encoder_2),
                           ("ControlNet", controlnet)) if m is not None and m in modules
        )  # fmt: skip
        print(f"training {what}: {count:,} parameters")
    return modules, train_te


def text_encoders(pipe) -> list:
    """The pipeline's text encoders, in order (SD: one; SDXL: two; the SDXL refiner: the second)."""
    return [module for _, module in pipe.encoders]


def fill_cache(session: Session, pipe, data: TrainingData, train_te: bool):
    """With ``data.cache``: encode what the cache lacks (every rank a share) and return the cache
    (None without); the encoders then leave the accelerator until validation needs them."""
    from ..data.cache import LatentCache
    from ..models.hashing import weight_hash

    config = session.config
    if not config.data.cache:
        return None
    root = Path(config.data.cache_dir).expanduser() if config.data.cache_dir else session.out / "cache"
    text_frozen = not train_te
    encoders = [(name, module) for name, module in pipe.networks() if name.startswith("text_encoder")]
    cache = LatentCache(
        root,
        vae_hash=weight_hash([("vae", pipe.vae)]),
        text_hash=weight_hash(encoders) if text_frozen else None,
        time_ids=pipe.time_id_count,
    )
    stats = cache.fill(data.source, data.buckets, data.bucket_of, config.data, vae=pipe.vae,
                       text_encoders=text_encoders(pipe), tokenizers=[tok for tok, _ in pipe.encoders], sdxl=pipe.sdxl,
                       rank=session.rank, world=session.world, progress=session.main and config.train.progress)  # fmt: skip
    session.accelerator.wait_for_everyone()
    session.result.cache = stats
    session.say(stats.line())
    pipe.vae.to("cpu")
    if text_frozen:
        for te in text_encoders(pipe):
            te.to("cpu")
    return cache


def make_optimizer(config: TrainConfig, modules, encoders, device):
    """AdamW (or 8-bit AdamW) over the trainable parameters, the text encoders' at their own rate, and
    the LR schedule."""
    from diffusers.optimization import get_scheduler

    opt = config.optim
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    te_params = {id(p) for te in encoders for p in te.parameters()}
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
        fused = device.type == "cuda"  # one kernel for all parameters on the GPU
        optimizer = torch.optim.AdamW(groups, fused=fused, **kwargs)
    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[opt.lr_schedule]
    lr_scheduler = get_scheduler(name, optimizer, num_warmup_steps=opt.warmup_steps,
                                 num_training_steps=config.train.max_steps)  # fmt: skip
    return optimizer, lr_scheduler


def checkpoint_objects(lr_scheduler, ema, distiller=None) -> dict[str, Any]:
    """What a U-Net stage checkpoint holds besides accelerate's state, by name (in the order older
    checkpoints registered them with accelerate: custom_checkpoint_0, _1); a distillation's target network."""
    objects = {"lr_scheduler": lr_scheduler, "ema": ema}
    if distiller is not None:
        objects["target"] = distiller.target
    return objects


def _resume(session: Session, global_batch: int, objects: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Restore the prepared state from ``session.resume_from`` (collective); returns its trainer state."""
    config, path = session.config, session.resume_from
    if path is None:
        return None
    state = checkpoints.load(session.accelerator, path, strict=not config.lora.enabled, objects=objects)
    if state.get("seed") != config.train.seed or state.get("world_batch") != global_batch:
        raise InvalidInputError(
            f"{path} was made with train.seed={state.get('seed')} and a global batch of "
            f"{state.get('world_batch')}; this run has {config.train.seed} and {global_batch}. "
            "Resume with the same settings (or start a new output_dir)"
        )
    session.say(f"resumed from {path.name}: step {state['step']}, epoch {state['epoch']}, "
                f"batch {state['position']} of the epoch")  # fmt: skip
    threads = torch.get_num_threads()
    if session.accelerator.device.type == "cpu" and state.get("threads", threads) != threads:
        session.say(f"note: {path.name} was written with {state['threads']} CPU threads per process and this run "
                    f"has {threads}; it carries on correctly, but not bit for bit as an uninterrupted run would "
                    f"(set --threads {state['threads']} for that)")  # fmt: skip
    session.forget_log_after(state["step"], UNET_LOG_KEY)
    return state


def _scan(session: Session) -> Source:
    """Main process: find and check the images; report and list the skipped ones."""
    config = session.config
    column = config.controlnet.conditioning_column if config.controlnet.enabled else None
    source = scan(config.data, progress=config.train.progress, conditioning=column)
    print(f"training data: {len(source.records)} images from {config.data.path}")
    if source.skipped:
        print(skipped_report(source.skipped))
        with atomic_write(session.out / "skipped.jsonl", "w") as f:
            for key, reason in source.skipped:
                f.write(json.dumps({"image": key, "reason": reason}) + "\n")
    return source


UNET_LOG_KEY = "loss"  # what the U-Net stage's log lines have (the VAE stage's: vae_loss / vae_psnr)


def _trim_log(path: Path, step: int, key: str) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by the crash
            continue
        later = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step
        if not (later and any(k.startswith(key) for k in record)):
            kept.append(line + "\n")
    with atomic_write(path, "w") as f:
        f.writelines(kept)


def _remove_stale_checkpoints(out: Path) -> None:
    for stale in checkpoints.remove_stale(out):
        print(f"removed an incomplete checkpoint left by a crash: {stale.name}")


def _prepared_or_frozen(acc, prepared: list, module):
    """``module`` as accelerate prepared it, if it is trained; else itself (None stays None)."""
    if module is None:
        return None
    for candidate in prepared:
        if acc.unwrap_model(candidate) is module:
            return candidate
    return module


def _keep_trainable_weights(models, weights, output_dir) -> None:
    """accelerate save hook for LoRA runs: checkpoint only the adapter weights, not the frozen base."""
    for model, state in zip(models, weights):
        keep = {name for name, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in keep]:
            del state[key]


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
