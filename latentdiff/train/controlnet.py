"""ControlNet training: the frozen model steered by a trainable copy of its U-Net's encoder.

Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models": the ControlNet
reads the noisy latent z_t, the timestep and the text conditioning like the U-Net's encoder, plus a
conditioning image c (B, 3, H, W) in [0, 1] through a small convolutional encoder, and gives one
residual per skip connection of the U-Net and one for its middle block, each through a "zero
convolution" (a 1x1 convolution initialised at zero, Sec. 3.1). The frozen U-Net adds them:

    down, mid = controlnet(z_t, t, text, c)
    pred = unet(z_t, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid)

and the loss is the plain diffusion loss of ``pred`` (``objective.py``: prediction type, noise schedule,
min-SNR weighting as configured). A new ControlNet is diffusers' ``ControlNetModel.from_unet`` (the
encoder's weights copied, the zero convolutions at zero), so training starts from exactly the frozen
model; its conditioning encoder's random start is drawn from ``train.seed``. ``controlnet.path``
continues from an existing ControlNet instead. The result, ``<output_dir>/controlnet/``, is a
``ControlNetModel`` folder that diffusers' ``StableDiffusionControlNetPipeline`` and our
``pipe.load_controlnet`` both load.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInputError


def check_base(pipe) -> None:
    """Refuse a base model that ControlNet training does not handle (before the data is read)."""
    if pipe.sdxl:
        raise InvalidInputError("ControlNet training works with SD 1.x / 2.x models so far; model.path is an SDXL model "
                                "(SDXL ControlNets also read the pooled embedding and micro-conditioning: not wired yet)")  # fmt: skip


def make_controlnet(pipe, config) -> torch.nn.Module:
    """The ControlNet to train (float32, trainable): loaded from ``controlnet.path``, or made from
    ``pipe.unet`` as ``ControlNetModel.from_unet`` makes it, with the global RNG seeded by ``train.seed``
    for the conditioning encoder's random start (the same in every process and in a resumed run)."""
    from ..models.controlnet import controlnet_from_unet, load_controlnet

    check_base(pipe)
    path = config.controlnet.path
    if path:
        controlnet = load_controlnet(path, pipe.unet)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.train.seed)
            controlnet = controlnet_from_unet(pipe.unet, load_weights=True,
                                              conditioning_embedding_out_channels=embedding_channels(pipe.vae_scale_factor))  # fmt: skip
    return controlnet.to(torch.float32).requires_grad_(True).train()


def embedding_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """The channels of a new ControlNet's conditioning-image encoder, whose stride-2 convolutions
    (one fewer than the entries) must bring the image down to the latent size: diffusers' (16, 32, 96,
    256) for SD's 8x VAE, its first three for a 4x VAE (the default model's), and so on."""
    steps = max(vae_scale_factor, 1).bit_length() - 1
    if 2**steps != vae_scale_factor or not 1 <= steps <= 3:
        raise InvalidInputError(f"a new ControlNet needs a VAE that downscales 2x, 4x or 8x; this one downscales "
                                f"{vae_scale_factor}x (give controlnet.path, a ControlNet made for it)")  # fmt: skip
    return (16, 32, 96, 256)[: steps + 1]


def controlled_prediction(controlnet, unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,
                          control: torch.Tensor, extra: dict) -> torch.Tensor:  # fmt: skip
    """The frozen ``unet``'s prediction at ``noisy`` (B, C, h, w) with the residuals that ``controlnet``
    makes from the conditioning pixels ``control`` (B, 3, H, W) in [0, 1]. The ControlNet runs in its own
    precision (accelerate's autocast under mixed precision); the U-Net's inputs are cast to its dtype, as
    the frozen U-Net may be held in the mixed-precision dtype."""
    down, mid = controlnet(noisy, timesteps, encoder_hidden_states=cond, controlnet_cond=control.to(noisy.dtype),
                           return_dict=False, **extra)  # fmt: skip
    dtype = next(unet.parameters()).dtype
    return unet(noisy.to(dtype), timesteps, cond.to(dtype), down_block_additional_residuals=[d.to(dtype) for d in down],
                mid_block_additional_residual=mid.to(dtype), **extra).sample  # fmt: skip


class InDtype(torch.nn.Module):
    """The ControlNet being trained as the sampling loop calls it when the frozen U-Net is held in another
    precision (mixed-precision validation): inputs cast to the ControlNet's dtype, residuals to ``out_dtype``.
    (CPU autocast does not cast a group norm's input to its float32 weights.)"""

    def __init__(self, net: torch.nn.Module, out_dtype: torch.dtype):
        super().__init__()
        self.net, self.out_dtype = net, out_dtype

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, **options):
        own = self.dtype
        down, mid = self.net(sample.to(own), timestep, encoder_hidden_states=encoder_hidden_states.to(own),
                             controlnet_cond=controlnet_cond.to(own), **{**options, "return_dict": False})  # fmt: skip
        return [d.to(self.out_dtype) for d in down], mid.to(self.out_dtype)
