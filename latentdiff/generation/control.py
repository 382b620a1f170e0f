"""Conditioning beyond text: ControlNet, T2I-Adapter and IP-Adapter, as inputs to the denoising loop.

``pipe.controls`` (:class:`Controls`) holds what a pipeline has loaded: its ControlNets and
T2I-Adapters in load order (the call gives one control image, scale, start and end per entry, in
that order) and at most one IP-Adapter with its CLIP image encoder. For each group of images that
is denoised together, :meth:`Controls.prepare` turns the request's pictures into a
:class:`ControlStep`, which the loop (``sampling.denoise``) calls at every step for the U-Net's extra
keyword arguments:

- ControlNet (Zhang et al. 2023): the ControlNets read the scaled latents, the timestep, the text
  conditioning and their control image ((B, 3, H, W) in [0, 1], twice under guidance) and give
  residuals for the U-Net's skip connections and middle block, each multiplied by its scale and
  summed (diffusers' ``MultiControlNetModel`` order). A ControlNet acts on step i of N only while
  ``start <= i / N`` and ``(i + 1) / N <= end`` (diffusers' ``control_guidance_start`` / ``_end``);
  off, it is not run at all, which equals adding its zero residuals.
- T2I-Adapter (Mou et al. 2023): features of the control image, computed once, times the scale,
  added inside the encoder blocks (``down_intrablock_additional_residuals``) on the same steps rule.
- IP-Adapter (Ye et al. 2023): the CLIP image embedding of ``ip_image`` (zeros for the unconditional
  pass) goes to the U-Net's image projection and decoupled cross-attention, weighted by ``ip_scale``.

Everything is made as diffusers' ``StableDiffusionControlNetPipeline`` (img2img, inpaint),
``StableDiffusionAdapterPipeline`` and ``IPAdapterMixin`` make it, so that the images are theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import InvalidInputError, MissingFileError

KINDS = {"controlnet": "ControlNet", "t2i_adapter": "T2I-Adapter"}


@dataclass
class Control:
    """One loaded ControlNet or T2I-Adapter."""

    name: str
    kind: str  # "controlnet" | "t2i_adapter"
    model: torch.nn.Module
    path: Optional[str]  # where it was loaded from (None: given as a module, e.g. by the trainer)
    _hash: Optional[tuple] = None

    def weight_hash(self) -> str:
        from ..models.hashing import weight_hash, weights_fingerprint

        key = weights_fingerprint([self.model])
        if self._hash is None or self._hash[0] != key:
            self._hash = (key, weight_hash([(self.kind, self.model)]))
        return self._hash[1]

    def record(self) -> dict[str, Any]:
        """What a recipe keeps of it: enough to load it again and to tell that it is the same."""
        return {"name": self.name, "kind": self.kind, "path": self.path, "weight_hash": self.weight_hash()}


@dataclass
class IPAdapter:
    """The loaded IP-Adapter: its file, the image encoder, and the U-Net's attention processors from before."""

    path: str
    encoder_path: str
    encoder: torch.nn.Module  # CLIPVisionModelWithProjection
    processor: Any  # CLIPImageProcessor
    sha256: str
    saved_processors: dict = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        from ..models.hashing import weight_hash

        return {"path": self.path, "sha256": self.sha256, "image_encoder": self.encoder_path,
                "image_encoder_hash": weight_hash([("image_encoder", self.encoder)])}  # fmt: skip


def is_ip_adapter_key(key: str) -> bool:
    """U-Net tensors that an IP-Adapter adds (kept out of the model's weight hash)."""
    return key.startswith("unet.") and (".processor." in key or key.startswith("unet.encoder_hid_proj."))


class Controls:
    """A pipeline's ControlNets and T2I-Adapters (in load order) and its IP-Adapter."""

    def __init__(self):
        self.items: list[Control] = []
        self.ip: Optional[IPAdapter] = None

    def __len__(self) -> int:
        return len(self.items)

    def names(self) -> list[str]:
        return [c.name for c in self.items]

    def add(self, pipe, kind: str, model: torch.nn.Module, path, name: Optional[str] = None) -> Control:
        """Add a loaded module, moved to the pipeline's device and dtype; ``name`` defaults to the file's stem."""
        if name is not None and (not isinstance(name, str) or not name):
            raise InvalidInputError(f"a {KINDS[kind]}'s name must be a non-empty string, got {name!r}")
        if name is None:
            stem = Path(path).stem if path is not None else kind
            name, k = stem, 2
            while name in self.names():
                name, k = f"{stem}-{k}", k + 1
        elif name in self.names():
            raise InvalidInputError(f"a control named {name!r} is loaded already; give another name, or unload it first")
        torch.nn.Module.to(model, device=pipe.device, dtype=pipe.dtype)
        control = Control(name, kind, model, None if path is None else str(Path(path).expanduser().resolve()))
        self.items.append(control)
        return control

    def remove(self, name: Optional[str] = None) -> None:
        if name is None:
            self.items.clear()
            return
        if name not in self.names():
            raise InvalidInputError(f"no control named {name!r} is loaded (loaded: {', '.join(self.names()) or 'none'})")
        self.items = [c for c in self.items if c.name != name]

    def to(self, device=None, dtype=None) -> None:
        for module in [c.model for c in self.items] + ([self.ip.encoder] if self.ip else []):
            torch.nn.Module.to(module, device=device, dtype=dtype)

    def records(self) -> list[dict[str, Any]]:
        return [c.record() for c in self.items]

    # -- the IP-Adapter ----------------------------------------------------------------------------

    def load_ip_adapter(self, pipe, path, image_encoder) -> IPAdapter:
        """Install an IP-Adapter in ``pipe.unet`` with diffusers' own U-Net loader (replacing one loaded before)."""
        from ..models.adapters import check_ip_keys, load_image_encoder, read_ip_adapter
        from ..models.hashing import file_sha256

        if image_encoder is None:
            raise InvalidInputError("load_ip_adapter needs image_encoder=: the folder of the CLIP vision model "
                                    "the IP-Adapter was trained with (CLIPVisionModelWithProjection)")  # fmt: skip
        state = read_ip_adapter(path)
        encoder, processor = load_image_encoder(image_encoder)
        self.unload_ip_adapter(pipe)
        check_ip_keys(state, pipe.unet, path)
        saved = dict(pipe.unet.attn_processors)
        try:
            pipe.unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
        except Exception as e:  # noqa: BLE001 - shapes of another model family
            pipe.unet.set_attn_processor(saved)
            pipe.unet.encoder_hid_proj = None
            raise InvalidInputError(f"the IP-Adapter {path} does not fit this model ({type(e).__name__}: "
                                    f"{str(e).strip().splitlines()[0][:200]}); is it made for this model's family?") from None  # fmt: skip
        torch.nn.Module.to(pipe.unet, device=pipe.device, dtype=pipe.dtype)
        torch.nn.Module.to(encoder, device=pipe.device, dtype=pipe.dtype)
        self.ip = IPAdapter(str(Path(path).expanduser().resolve()), str(Path(image_encoder).expanduser().resolve()),
                            encoder, processor, file_sha256(path), saved)  # fmt: skip
        return self.ip

    def unload_ip_adapter(self, pipe) -> None:
        """Give the U-Net back its attention processors from before and drop the image projection."""
        if self.ip is None:
            return
        pipe.unet.set_attn_processor(self.ip.saved_processors)
        pipe.unet.encoder_hid_proj = None
        pipe.unet.register_to_config(encoder_hid_dim_type=None)
        self.ip = None

    # -- inputs to the loop ------------------------------------------------------------------------

    def prepare(self, pipe, request, images: list[int], size: tuple[int, int]) -> Optional["ControlStep"]:
        """The loop's extra inputs for the images ``images`` (indices into the call) at ``size``, or None."""
        if not self.items and request.ip_images is None:
            return None
        guided = request.guided
        height, width = size
        nets, adapters = [], []
        for j, control in enumerate(self.items):
            pictures = [request.per_image(request.control_images[j])[m] for m in images]
            scale, start, end = request.control_scales[j], request.control_starts[j], request.control_ends[j]
            model = control.model
            if control.kind == "controlnet":
                pixels = control_processor(pipe.vae_scale_factor).preprocess(pictures, height=height, width=width)
                pixels = pixels.to(device=pipe.device, dtype=model.dtype)  # (B, 3, H, W) in [0, 1]
                nets.append((model, torch.cat([pixels, pixels]) if guided else pixels, scale, start, end))
            else:
                grey = model.config.in_channels == 1
                pixels = control_processor(pipe.vae_scale_factor, grey).preprocess(pictures, height=height, width=width)
                features = model(pixels.to(device=pipe.device, dtype=model.dtype))
                features = [f * scale for f in features]  # (B, C_k, H/8/2^k, W/8/2^k) per level
                adapters.append(([torch.cat([f, f]) if guided else f for f in features], start, end))
        embeds = None
        if request.ip_images is not None:
            embeds = self._ip_embeds(pipe, [request.per_image(request.ip_images)[m] for m in images], guided)
            self._set_ip_scale(pipe, request.ip_scale)
        return ControlStep(nets, adapters, embeds)

    def _ip_embeds(self, pipe, pictures, guided: bool) -> list[torch.Tensor]:
        """[(B or 2B, tokens, D)]: the image embedding of each picture (each distinct one encoded once), and
        for the unconditional pass zeros (plain IP-Adapter) or the embedding of a black image (Plus), as
        diffusers' ``encode_image`` makes them."""
        from diffusers.models.embeddings import ImageProjection

        ip = self.ip
        order = list({id(p): p for p in pictures}.values())
        position = {id(p): i for i, p in enumerate(order)}
        pixels = ip.processor(order, return_tensors="pt").pixel_values
        pixels = pixels.to(device=pipe.device, dtype=next(ip.encoder.parameters()).dtype)
        plain = isinstance(pipe.unet.encoder_hid_proj.image_projection_layers[0], ImageProjection)
        if plain:
            cond = ip.encoder(pixels).image_embeds  # (U, D)
            uncond = torch.zeros_like(cond)
        else:  # IP-Adapter Plus reads the penultimate hidden states
            cond = ip.encoder(pixels, output_hidden_states=True).hidden_states[-2]  # (U, T, D)
            uncond = ip.encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        index = torch.tensor([position[id(p)] for p in pictures], device=cond.device)
        cond, uncond = cond[index].unsqueeze(1), uncond[index].unsqueeze(1)  # (B, 1, D) or (B, 1, T, D)
        return [torch.cat([uncond, cond]) if guided else cond]

    @staticmethod
    def _set_ip_scale(pipe, scale: float) -> None:
        from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

        for processor in pipe.unet.attn_processors.values():
            if isinstance(processor, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)):
                processor.scale = [scale]


@dataclass
class ControlStep:
    """The U-Net's extra inputs at each step for one group of images (see the module docstring)."""

    nets: list  # (ControlNet, control pixels (B or 2B, 3, H, W), scale, start, end)
    adapters: list  # (scaled T2I-Adapter features, one (B or 2B, C, h, w) per level, start, end)
    ip_embeds: Optional[list]  # [(B or 2B, 1, D)] for the U-Net's added_cond_kwargs

    def __call__(self, i: int, count: int, t, model_in: torch.Tensor, embeds: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments for ``unet(model_in, t, embeds, ...)`` at step ``i`` of ``count``; ``model_in``
        is the scaled latent input (B or 2B, C, h, w), without an inpainting U-Net's extra channels."""
        extra: dict[str, Any] = {}
        down = mid = None
        for net, pixels, scale, start, end in self.nets:
            if not active(i, count, start, end):
                continue
            d, m = net(model_in, t, encoder_hidden_states=embeds, controlnet_cond=pixels, conditioning_scale=scale,
                       guess_mode=False, return_dict=False)  # fmt: skip
            down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
        if down is not None:
            extra.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        intra = None
        for features, start, end in self.adapters:
            if active(i, count, start, end):
                intra = list(features) if intra is None else [a + b for a, b in zip(intra, features)]
        if intra is not None:  # (the U-Net pops from the list: a fresh one each step)
            extra["down_intrablock_additional_residuals"] = [f.clone() for f in intra]
        if self.ip_embeds is not None:
            extra["added_cond_kwargs"] = {"image_embeds": self.ip_embeds}
        return extra


def active(i: int, count: int, start: float, end: float) -> bool:
    """Whether a control acts on step ``i`` of ``count`` (diffusers' ``controlnet_keep``)."""
    return not (i / count < start or (i + 1) / count > end)


@lru_cache(maxsize=8)
def control_processor(vae_scale_factor: int, grey: bool = False):
    """diffusers' control-image preprocessing: RGB (or greyscale for 1-channel adapters), resized, in [0, 1]."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_convert_rgb=not grey, do_normalize=False,
                             do_convert_grayscale=grey)  # fmt: skip


# The default model's ControlNet (trained by training/configs/controlnet-default-model.toml): the
# shape's silhouette, white on black, says where the shape goes. load_controlnet("default"), --controlnet default
DEFAULT_CONTROLNET = Path(__file__).parents[1] / "assets" / "default_controlnet"


def default_controlnet() -> Path:
    """The shipped default ControlNet's folder, or one line saying it is not there."""
    if not (DEFAULT_CONTROLNET / "config.json").is_file():
        raise MissingFileError("no default ControlNet is shipped in this install (assets/default_controlnet); make one "
                               "with latentdiff train --config training/configs/controlnet-default-model.toml, or give "
                               "a ControlNet folder or file: load_controlnet(PATH), --controlnet PATH")  # fmt: skip
    return DEFAULT_CONTROLNET
