"""Latent consistency distillation: a few-step student from a guided teacher.

Luo et al. 2023, "Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step
Inference", Algorithm 1 (LCD), and Luo et al. 2023, "LCM-LoRA". With a ``[distill]`` section the
trainer's U-Net stage minimises, for each sample of a batch:

1. a solver step n ~ U{0..N-1} on the skipping-step schedule t_n = (n+1) k - 1 (k = T / N: N is
   LCMScheduler's ``original_inference_steps``, 50), and z_{t_n} = a z_0 + s eps (the forward process);
2. a guidance scale w ~ U[guidance_min, guidance_max];
3. the frozen **teacher**'s classifier-free-guided prediction at (z_{t_n}, t_n), as the pipeline
   guides it (uncond + w (cond - uncond)), and one **DDIM step** (Song et al. 2021, eq. 12 with
   eta = 0) from t_n to t_{n-1} = t_n - k: z' = a' x0 + s' eps (Sec. 4.2: the augmented PF-ODE solver);
4. the **consistency function** f(z, t) = c_skip(t) z + c_out(t) x0(z, t) (Sec. 4.1: the boundary
   condition f(z, 0) = z; c_skip / c_out are LCMScheduler's own, so training and sampling agree) of the
   **online** student at (z_{t_n}, t_n) and of the **target** network, an EMA of the student (rate
   ``target_decay``), at (z', t_{n-1}), without gradient;
5. the pseudo-Huber distance sqrt(d^2 + c^2) - c between the two (Song & Dhariwal 2023).

The student starts as the teacher. Trained in full it gets a guidance-embedding input
(``time_cond_proj_dim``, zero-initialised so it starts exactly as the teacher) and learns every w
of the range; trained as a LoRA it has no such input (Luo et al.'s LCM-LoRA) and the teacher is the
same U-Net with its adapters switched off. The output is a model folder whose scheduler is
``LCMScheduler`` (full), or ``lora.safetensors`` (LoRA): both run with the ``lcm`` sampler.

What diffusers gives is used as it is: the noise schedule (``DDPMScheduler``), c_skip / c_out
(``LCMScheduler``), the guidance embedding (its LCM pipeline's), the EMA (``training_utils.EMAModel``
with a constant rate). Every random draw is made for the global batch from the micro-step's seed, as
the diffusion loss's are, so resuming and any number of processes give the same run.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from ..errors import InvalidInputError
from .objective import x0_and_noise


def make_student(pipe, config) -> Optional[torch.nn.Module]:
    """Before the trained modules are chosen: for a full student, replace ``pipe.unet`` by a copy of
    the teacher (with a zero-initialised guidance-embedding input if asked) and return the teacher;
    for a LoRA student return None (the teacher is the U-Net with its adapters off)."""
    from diffusers import UNet2DConditionModel

    teacher = pipe.unet
    if teacher.config.time_cond_proj_dim is not None:
        raise InvalidInputError("model.path is LCM-distilled already (its U-Net takes a guidance embedding); "
                                "distil from the model it was distilled from")  # fmt: skip
    if config.lora.enabled:
        return None
    dim = config.distill.guidance_embedding_dim or None
    student = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=dim)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"time_embedding.cond_proj.weight"}, (missing, unexpected)
    if dim is not None:
        with torch.no_grad():
            student.time_embedding.cond_proj.weight.zero_()  # w enters as 0: the student starts as the teacher
    pipe.unet = student.to(teacher.dtype)
    return teacher.requires_grad_(False).eval()


class Distiller:
    """The teacher, the solver's schedule, the target network and the distillation loss of one run."""

    def __init__(self, session, pipe, noise_scheduler, teacher: Optional[torch.nn.Module]):
        from diffusers import LCMScheduler

        from ..data.dataset import tokenize
        from .setup import WEIGHT_DTYPES

        config, device = session.config, session.device
        self.settings = config.distill
        self.noise_scheduler = noise_scheduler
        self.teacher = None if teacher is None else teacher.to(device, WEIGHT_DTYPES[config.train.mixed_precision])
        # the scheduler the distilled model samples with: its c_skip / c_out and solver schedule are the training's
        self.lcm = LCMScheduler.from_config(lcm_scheduler_config(pipe.scheduler_config, noise_scheduler))
        steps, trained = self.lcm.config.original_inference_steps, noise_scheduler.config.num_train_timesteps
        self.skip = trained // steps  # k
        self.solver_timesteps = torch.arange(1, steps + 1, device=device) * self.skip - 1  # t_n, (N,)
        self.embedding_dim = pipe.unet.config.time_cond_proj_dim
        with torch.no_grad():  # the teacher's unconditional input: the empty caption, (1, 77, D)
            encoder = pipe.text_encoder
            ids = tokenize(pipe.tokenizer, [""]).to(encoder.device)
            self.uncond = encoder(ids)[0].to(device)
        self.target = None  # EMAModel over the student's trained parameters (attach_target)
        self._target_names: list[str] = []

    def attach_target(self, student: torch.nn.Module, params: list) -> None:
        """The target network: diffusers' EMAModel over the student's trained ``params`` (those of the
        prepared modules), at the paper's constant rate from the first step on."""
        from diffusers.training_utils import EMAModel

        named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        assert [id(p) for _, p in named] == [id(p) for p in params], "the student's parameters are the trained ones"
        self._target_names = [n for n, _ in named]
        decay = self.settings.target_decay
        # update_after_step=-1: EMAModel's first step would copy the student outright (decay 0 at step 1)
        self.target = EMAModel(params, decay=decay, min_decay=decay, update_after_step=-1)

    def loss(self, unet, student: torch.nn.Module, latents: torch.Tensor, cond: torch.Tensor, draw: Callable,
             global_batch: int) -> torch.Tensor:  # fmt: skip
        """The distillation loss of one micro-batch: ``latents`` z_0 (B, C, h, w), ``cond`` (B, L, D);
        ``unet`` is the trained U-Net as prepared (DDP), ``student`` the same unwrapped; ``draw(what,
        size, kind)`` draws this rank's slice of a draw for all ``global_batch`` samples of every rank."""
        b = latents.shape[0]
        s = self.settings
        index = draw("solver_step", (global_batch,), len(self.solver_timesteps))
        t = self.solver_timesteps[index]  # t_n (B,)
        t_prev = (t - self.skip).clamp(min=0)  # t_{n-1}: one solver step earlier in noise, 0 at the end
        noise = draw("noise")
        z_t = self.noise_scheduler.add_noise(latents, noise, t)
        guidance = s.guidance_min + (s.guidance_max - s.guidance_min) * draw("guidance", (global_batch,), "uniform")  # (B,)
        extra = {}
        if self.embedding_dim is not None:
            from ..generation.sampling import guidance_embedding

            extra["timestep_cond"] = guidance_embedding(guidance, self.embedding_dim).to(latents.device)

        with torch.no_grad():
            # the teacher's guided estimate, then one DDIM step t_n -> t_{n-1}
            teacher = self.teacher if self.teacher is not None else student
            dtype = next(teacher.parameters()).dtype
            with self._adapters_off(student) if self.teacher is None else contextlib.nullcontext():
                pair = teacher(torch.cat([z_t, z_t]).to(dtype), torch.cat([t, t]),
                               torch.cat([self.uncond.expand(b, -1, -1), cond]).to(dtype)).sample.float()  # fmt: skip
            out_u, out_c = pair.chunk(2)
            guided = out_u + guidance.view(-1, 1, 1, 1) * (out_c - out_u)
            z_prev = ddim_step(guided, z_t, t, t_prev, self.noise_scheduler)  # (B, C, h, w)
            # the target network (the EMA weights in the student's place) at (z', t_{n-1})
            ema = dict(zip(self._target_names, self.target.shadow_params))
            out = torch.func.functional_call(student, ema, (z_prev, t_prev),
                                             {"encoder_hidden_states": cond, **extra}).sample.float()  # fmt: skip
            target = self._consistency(out, z_prev, t_prev)
        prediction = self._consistency(unet(z_t, t, cond, **extra).sample.float(), z_t, t)
        c = s.huber_c
        return (torch.sqrt((prediction - target) ** 2 + c * c) - c).mean()

    def _consistency(self, output: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return consistency(output, z, t, self.lcm, self.noise_scheduler)

    @staticmethod
    @contextlib.contextmanager
    def _adapters_off(model: torch.nn.Module):
        """The LoRA student with its adapters switched off: the teacher (peft's enable_adapters)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)


def consistency(output: torch.Tensor, z: torch.Tensor, t: torch.Tensor, lcm, noise_scheduler) -> torch.Tensor:
    """f(z, t) = c_skip(t) z + c_out(t) x0(z, t) (Luo et al. 2023, eq. 9) for a model ``output`` at ``z``
    (B, C, h, w) and ``t`` (B,): the denoised latent that ``lcm`` (an LCMScheduler) forms in its step."""
    c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t.float())
    x0, _ = x0_and_noise(output, z, t, noise_scheduler)
    return c_skip.view(-1, 1, 1, 1) * z + c_out.view(-1, 1, 1, 1) * x0


def ddim_step(output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, noise_scheduler):
    """One deterministic DDIM step (Song et al. 2021, eq. 12, eta = 0) per sample, from ``t`` to ``t_prev``
    (B,): z' = a' x0 + s' eps with the x0 and eps that ``output`` predicts at (``z_t``, ``t``). diffusers'
    DDIMScheduler.step computes the same for a whole batch at one timestep; the batch here mixes them."""
    x0, eps = x0_and_noise(output, z_t, t, noise_scheduler)
    abar = noise_scheduler.alphas_cumprod.to(z_t.device, torch.float32)[t_prev].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def lcm_scheduler_config(model_config: dict, noise_scheduler) -> dict:
    """The scheduler config the distilled model samples with: the teacher's, as trained, as LCMScheduler."""
    from .objective import inference_scheduler_config

    return {**inference_scheduler_config(model_config, noise_scheduler), "_class_name": "LCMScheduler"}
