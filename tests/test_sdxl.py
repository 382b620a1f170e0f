"""SDXL base and refiner against diffusers' StableDiffusionXL pipelines on the same tiny weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from helpers import REFERENCE_SCHEDULERS, picture
from latentdiff import InvalidInputError, LatentDiffusion
from latentdiff.generation.recipe import call_kwargs

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"
SEEDS = [3, 11]
GUIDANCE = 5.0  # diffusers' SDXL default (ours is 7.5): always passed, on both sides


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    pipe = LatentDiffusion.from_preset("tiny-sdxl", seed=0)
    return pipe, pipe.save_pretrained(tmp_path_factory.mktemp("sdxl") / "base")


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    pipe = LatentDiffusion.from_preset("tiny-sdxl-refiner", seed=1)
    return pipe, pipe.save_pretrained(tmp_path_factory.mktemp("sdxl") / "refiner")


def reference(cls, folder, scheduler=None):
    pipe = cls.from_pretrained(folder, local_files_only=True)
    if scheduler is not None:
        sched_cls, options = REFERENCE_SCHEDULERS[scheduler]
        pipe.scheduler = sched_cls.from_pretrained(folder, subfolder="scheduler", **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def mask(width=48, height=64) -> Image.Image:
    m = np.zeros((height, width), np.uint8)
    m[16:48, 8:40] = 255
    return Image.fromarray(m)


@pytest.mark.parametrize("scheduler", [None, "ddim", "euler_a", "dpmpp_2m_karras", "heun"])
def test_txt2img_matches_diffusers(base, scheduler):
    """Two seeds, a negative prompt, a non-square size, the model's own and other schedulers."""
    pipe, folder = base
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, num_inference_steps=3, height=64, width=48,
                seed=SEEDS, scheduler=scheduler, guidance_scale=GUIDANCE, output_type="np", progress=False).images  # fmt: skip
    theirs = reference(StableDiffusionXLPipeline, folder, scheduler)(
        [PROMPT] * 2, negative_prompt=[NEGATIVE] * 2, num_inference_steps=3, height=64, width=48,
        guidance_scale=GUIDANCE, generator=generators(SEEDS), output_type="np",
    ).images  # fmt: skip
    assert ours.shape == (2, 64, 48, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.abs(ours[0] - ours[1]).max() > 1e-2


def test_second_prompts_zero_negatives_and_micro_conditioning_match_diffusers(base):
    pipe, folder = base
    ref = reference(StableDiffusionXLPipeline, folder)
    common = {"num_inference_steps": 3, "height": 48, "width": 64, "guidance_scale": GUIDANCE}
    # no negative prompt: zeros (force_zeros_for_empty_prompt); prompt_2 to the second encoder
    ours = pipe(PROMPT, prompt_2="a watercolour", seed=5, output_type="np", progress=False, **common).images
    theirs = ref(PROMPT, prompt_2="a watercolour", generator=generators([5]), output_type="np", **common).images
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # negative_prompt_2 and every micro-conditioning value, the negative ones too
    micro = {"original_size": (512, 384), "crops_coords_top_left": (16, 8), "target_size": (96, 128),
             "negative_original_size": (256, 256), "negative_crops_coords_top_left": (16, 8),
             "negative_target_size": (64, 64)}  # fmt: skip
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, negative_prompt_2="grainy", seed=5, output_type="np",
                progress=False, **micro, **common).images  # fmt: skip
    theirs = ref(PROMPT, negative_prompt=NEGATIVE, negative_prompt_2="grainy", generator=generators([5]),
                 output_type="np", **micro, **common).images  # fmt: skip
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    plain = pipe(PROMPT, negative_prompt=NEGATIVE, negative_prompt_2="grainy", seed=5, output_type="np",
                 progress=False, **common).images  # fmt: skip
    assert np.abs(plain - ours).max() > 1e-3  # the micro-conditioning reached the U-Net


def test_clip_skip_of_both_encoders_matches_diffusers(base):
    pipe, folder = base
    common = {"num_inference_steps": 2, "height": 64, "width": 64, "guidance_scale": GUIDANCE, "clip_skip": 1}
    ours = pipe(PROMPT, seed=2, output_type="np", progress=False, **common).images
    theirs = reference(StableDiffusionXLPipeline, folder)(PROMPT, generator=generators([2]), output_type="np", **common).images
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    with pytest.raises(InvalidInputError, match="clip_skip"):
        pipe(PROMPT, clip_skip=2, num_inference_steps=1, progress=False)  # 3 layers: the penultimate and one before


def test_long_and_weighted_prompts_use_both_encoders(base):
    pipe, _ = base
    long = ", ".join(["a very detailed photograph of a red fox in the snow"] * 12)  # > 75 tokens: two chunks
    from latentdiff.generation.request import Request

    groups = pipe._encode(Request.resolve(pipe, prompt=[PROMPT, long], negative_prompt="x", progress=False))
    assert [g.cond.shape[1] for g in groups] == [77, 154] and groups[1].cond.shape[-1] == 80
    weighted = pipe._encode(Request.resolve(pipe, prompt="a (red:1.5) fox", progress=False))[0]
    plain = pipe._encode(Request.resolve(pipe, prompt="a red fox", progress=False))[0]
    diff = (weighted.cond - plain.cond).abs().amax(dim=(0, 1))
    assert diff[:32].max() > 1e-4 and diff[32:].max() > 1e-4  # each encoder's half is weighted
    # a long prompt in the same call does not change a short prompt's image
    alone = pipe(PROMPT, seed=1, num_inference_steps=2, output_type="np", progress=False).images[0]
    mixed = pipe([PROMPT, long], seed=[1, 2], num_inference_steps=2, output_type="np", progress=False).images[0]
    np.testing.assert_allclose(alone, mixed, atol=1e-5, rtol=0)


def test_long_and_weighted_prompts_through_each_encoder_in_closed_form(base):
    """A 150-token prompt: two chunks of 75, each wrapped BOS tokens EOS pad... and encoded alone by each
    encoder (its penultimate layer), the two widths side by side; the pooled embedding is the second
    encoder's projection of the first chunk; the negative prompt is padded with the empty prompt's chunk.
    Computed here with the plain transformers models."""
    from latentdiff.generation.request import Request

    pipe, _ = base
    tokens = pipe.tokenizer(" ".join(f"word{i}" for i in range(200)), add_special_tokens=False).input_ids[:150]
    text = pipe.tokenizer.decode(tokens)
    assert pipe.tokenizer_2(text, add_special_tokens=False).input_ids == tokens

    def encode(chunk):  # -> (77, D1 + D2), (D2,)
        states, pooled = [], None
        for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = [tok.bos_token_id, *chunk, tok.eos_token_id]
            ids += [tok.pad_token_id] * (77 - len(ids))
            with torch.no_grad():
                out = enc(torch.tensor([ids]), output_hidden_states=True)
            states.append(out.hidden_states[-2][0])
            pooled = getattr(out, "text_embeds", None)
        return torch.cat(states, dim=-1), pooled[0]

    (first, pooled), (second, _), (negative, negative_pooled), (empty, _) = (
        encode(c) for c in (tokens[:75], tokens[75:], pipe.tokenizer("blurry", add_special_tokens=False).input_ids, []))
    group = pipe._encode(Request.resolve(pipe, prompt=text, negative_prompt="blurry", progress=False))[0]
    assert pipe.tokenizer_2.pad_token_id != pipe.tokenizer.pad_token_id  # "!" vs <|endoftext|>, as released
    torch.testing.assert_close(group.cond[0], torch.cat([first, second]), atol=1e-5, rtol=0)
    torch.testing.assert_close(group.pooled[0], pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(group.uncond[0], torch.cat([negative, empty]), atol=1e-5, rtol=0)
    torch.testing.assert_close(group.uncond_pooled[0], negative_pooled, atol=1e-5, rtol=0)
    # weights, the web UIs' way, on each encoder's half alone: scale the token's states, then restore
    # that half's mean; the pooled embedding stays unweighted
    red = pipe.tokenizer("a red fox", add_special_tokens=False).input_ids
    plain, plain_pooled = encode(red)
    w = torch.ones(77, 1)
    w[2] = 1.5  # BOS, "a", "red"
    halves = []
    for z in plain.split([pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size], dim=-1):
        halves.append(z * w * (z.mean() / (z * w).mean()))
    weighted = pipe._encode(Request.resolve(pipe, prompt="a (red:1.5) fox", progress=False))[0]
    torch.testing.assert_close(weighted.cond[0], torch.cat(halves, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weighted.pooled[0], plain_pooled, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_img2img_matches_diffusers(base, scheduler):
    pipe, folder = base
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, image=picture(48, 64), strength=0.6, num_images_per_prompt=2,
                num_inference_steps=4, seed=SEEDS, scheduler=scheduler, guidance_scale=GUIDANCE, output_type="np",
                progress=False).images  # fmt: skip
    theirs = reference(StableDiffusionXLImg2ImgPipeline, folder, scheduler)(
        [PROMPT] * 2, negative_prompt=[NEGATIVE] * 2, image=[picture(48, 64)] * 2, strength=0.6,
        num_inference_steps=4, guidance_scale=GUIDANCE, generator=generators(SEEDS), output_type="np",
    ).images  # fmt: skip
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_inpainting_matches_diffusers(base):
    pipe, folder = base
    kwargs = {"image": picture(48, 64), "mask_image": mask(), "strength": 1.0, "num_inference_steps": 3,
              "guidance_scale": GUIDANCE, "output_type": "latent"}  # fmt: skip
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, seed=SEEDS, progress=False,
                scheduler="euler_a", **kwargs).images  # fmt: skip
    theirs = reference(StableDiffusionXLInpaintPipeline, folder, "euler_a")(
        [PROMPT] * 2, negative_prompt=[NEGATIVE] * 2, generator=generators(SEEDS), height=64, width=48,
        **{**kwargs, "image": [kwargs["image"]] * 2, "mask_image": [mask()] * 2},
    ).images  # fmt: skip
    assert ours.shape == (2, 4, 8, 6)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)  # latents are O(10): relative too


def test_nine_channel_inpainting_model_matches_diffusers(tmp_path):
    """An SDXL inpainting U-Net (9 input channels: latents, mask, masked image's latents), at part strength."""
    from latentdiff.models.architectures import build_components

    pipe = LatentDiffusion(**build_components("tiny-sdxl", seed=2, overrides={"unet": {"in_channels": 9}}), source={})
    folder = pipe.save_pretrained(tmp_path / "inpaint")
    kwargs = {"image": picture(48, 64, seed=1), "mask_image": mask(), "strength": 0.8, "num_inference_steps": 4,
              "guidance_scale": GUIDANCE, "output_type": "latent"}  # fmt: skip
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, seed=SEEDS, progress=False,
                scheduler="euler", **kwargs).images  # fmt: skip
    theirs = reference(StableDiffusionXLInpaintPipeline, folder, "euler")(
        [PROMPT] * 2, negative_prompt=[NEGATIVE] * 2, generator=generators(SEEDS), height=64, width=48,
        **{**kwargs, "image": [kwargs["image"]] * 2, "mask_image": [mask()] * 2},
    ).images  # fmt: skip
    assert pipe.unet.config.in_channels == 9 and ours.shape == (2, 4, 8, 6)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheduler", [None, "dpmpp_2m", "heun"])
def test_base_to_refiner_hand_off_matches_diffusers(base, refiner, scheduler):
    (pipe, base_dir), (ref_pipe, refiner_dir) = base, refiner
    steps, split = 6, 0.7
    latents = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, seed=SEEDS, num_inference_steps=steps,
                   denoising_end=split, scheduler=scheduler, guidance_scale=GUIDANCE, output_type="latent",
                   progress=False).images  # fmt: skip
    ours = ref_pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, seed=SEEDS, image=latents,
                    num_inference_steps=steps, denoising_start=split, scheduler=scheduler, guidance_scale=GUIDANCE,
                    aesthetic_score=7.0, output_type="np", progress=False)  # fmt: skip
    their_latents = reference(StableDiffusionXLPipeline, base_dir, scheduler)(
        [PROMPT] * 2, negative_prompt=[NEGATIVE] * 2, num_inference_steps=steps, denoising_end=split,
        guidance_scale=GUIDANCE, generator=generators(SEEDS), output_type="latent",
    ).images  # fmt: skip
    torch.testing.assert_close(latents, their_latents, atol=1e-4, rtol=1e-4)
    theirs = reference(StableDiffusionXLImg2ImgPipeline, refiner_dir, scheduler)(
        [PROMPT] * 2, negative_prompt=[NEGATIVE] * 2, image=their_latents, num_inference_steps=steps,
        denoising_start=split, guidance_scale=GUIDANCE, aesthetic_score=7.0, generator=generators(SEEDS),
        output_type="np",
    ).images  # fmt: skip
    np.testing.assert_allclose(ours.images, theirs, atol=1e-4, rtol=0)
    assert ours.params[0]["denoising_start"] == split and ours.params[0]["aesthetic_score"] == 7.0


def test_refiner_txt2img_and_arguments_that_do_not_apply(base, refiner):
    (pipe, _), (ref_pipe, _) = base, refiner
    assert ref_pipe.text_encoder is None and ref_pipe.time_id_count == 5 and not ref_pipe.force_zeros_for_empty_prompt
    image = ref_pipe(PROMPT, seed=1, num_inference_steps=2, output_type="np", progress=False).images
    assert image.shape == (1, 64, 64, 3)
    with pytest.raises(InvalidInputError, match="aesthetic_score applies to the SDXL refiner"):
        pipe(PROMPT, aesthetic_score=6.0, num_inference_steps=1)
    with pytest.raises(InvalidInputError, match="target_size applies to SDXL base"):
        ref_pipe(PROMPT, target_size=(64, 64), num_inference_steps=1)
    with pytest.raises(InvalidInputError, match="denoising_start needs image="):
        pipe(PROMPT, denoising_start=0.5, num_inference_steps=1)
    sd = LatentDiffusion.from_preset("tiny")
    with pytest.raises(InvalidInputError, match="prompt_2 applies to SDXL models only"):
        sd(PROMPT, prompt_2="x", num_inference_steps=1)


def test_prompt_embeds_with_pooled_embeds(base):
    pipe, folder = base
    ref = reference(StableDiffusionXLPipeline, folder)
    cond, uncond, pooled, uncond_pooled = ref.encode_prompt(PROMPT, device="cpu", negative_prompt=NEGATIVE)
    common = {"num_inference_steps": 2, "guidance_scale": GUIDANCE, "output_type": "np"}
    ours = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=uncond_pooled, seed=4, progress=False, **common).images  # fmt: skip
    text = pipe(PROMPT, negative_prompt=NEGATIVE, seed=4, progress=False, **common).images
    np.testing.assert_allclose(ours, text, atol=1e-5, rtol=0)
    with pytest.raises(InvalidInputError, match="pooled_prompt_embeds"):
        pipe(prompt_embeds=cond, num_inference_steps=1)


def test_recipe_remakes_the_image_and_hires_runs(base, tmp_path):
    pipe, _ = base
    result = pipe(PROMPT, prompt_2="oil painting", negative_prompt=NEGATIVE, seed=7, num_inference_steps=2,
                  crops_coords_top_left=(8, 0), progress=False)  # fmt: skip
    path = result.save(tmp_path / "a.png")[0]
    from latentdiff.generation.recipe import read_recipe

    recipe = read_recipe(path)
    assert recipe["prompt_2"] == "oil painting" and recipe["crops_coords_top_left"] == [8, 0]
    again = pipe(**call_kwargs(recipe), progress=False).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(result.images[0]))
    zero = pipe(PROMPT, seed=7, num_inference_steps=2, progress=False)
    assert zero.params[0]["negative_prompt"] is None  # remade with zeros again
    big = pipe(PROMPT, seed=7, num_inference_steps=2, hires_scale=1.5, output_type="np", progress=False).images
    assert big.shape == (1, 96, 96, 3)


def test_hires_pixel_mode_is_diffusers_txt2img_then_img2img_with_the_generator_going_on(base):
    """Independent reference: diffusers' SDXL txt2img, a Lanczos resize, then diffusers' SDXL img2img (its
    micro-conditioning defaults: the new size) whose generator has made the base image's one draw."""
    pipe, folder = base
    ref = reference(StableDiffusionXLPipeline, folder, "euler")
    img2img = StableDiffusionXLImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    common = {"negative_prompt": NEGATIVE, "num_inference_steps": 4, "guidance_scale": GUIDANCE}
    gen = torch.Generator("cpu").manual_seed(21)
    first = ref(PROMPT, height=48, width=64, generator=[gen], output_type="pil", **common).images[0]
    theirs = img2img(PROMPT, image=first.resize((128, 96), Image.LANCZOS), strength=0.5, generator=[gen],
                     output_type="np", **common).images  # fmt: skip
    ours = pipe(PROMPT, height=48, width=64, seed=21, scheduler="euler", hires_scale=2.0, hires_upscale="pixel",
                hires_strength=0.5, output_type="np", progress=False, **common).images  # fmt: skip
    assert ours.shape == theirs.shape == (1, 96, 128, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_half_precision_vae_overflow_is_redone_in_float32(base):
    pipe = LatentDiffusion.from_preset("tiny-sdxl", seed=0)
    assert pipe.vae.config.force_upcast  # SDXL's VAE overflows in float16
    pipe.vae.half()
    decoder = pipe.vae.decoder
    forward = decoder.forward

    def overflowing(z, *args, **kwargs):
        out = forward(z, *args, **kwargs)
        return out * float("inf") if out.dtype == torch.float16 else out

    decoder.forward = overflowing
    with pytest.warns(UserWarning, match="float32"):
        image = pipe(PROMPT, seed=1, num_inference_steps=2, output_type="np", progress=False).images
    assert np.isfinite(image).all() and image.std() > 0.01


def test_single_file_round_trips_through_diffusers_both_ways(base, refiner, tmp_path, no_network):
    """Our sgm-layout file (base and refiner) loads in diffusers' from_single_file, given the folder as its
    local config and no network, into exactly our weights, and back into ours; the two give the same image.
    Without our embedded configuration the variant is detected from the keys alone."""
    for (pipe, folder), cls in ((base, StableDiffusionXLPipeline), (refiner, StableDiffusionXLImg2ImgPipeline)):
        path = pipe.save_single_file(tmp_path / f"{folder.name}.safetensors")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
        bigg = "conditioner.embedders.1.model." if pipe.text_encoder is not None else "conditioner.embedders.0.model."
        assert bigg + "transformer.resblocks.0.attn.in_proj_weight" in keys and bigg + "text_projection" in keys
        theirs = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
        for name, module in pipe.networks():
            mine, other = module.state_dict(), getattr(theirs, name).state_dict()
            assert mine.keys() == other.keys(), name
            assert all(torch.equal(mine[k], other[k]) for k in mine), name
        loaded = LatentDiffusion.from_single_file(path)
        assert loaded.weight_hash() == pipe.weight_hash() and loaded.sdxl and loaded.time_id_count == pipe.time_id_count
        # a file without our embedded configuration: the variant is detected from its keys (the real SDXL shapes
        # would not load into the tiny model, so detection alone)
        from latentdiff.models.single_file import detect_architecture, read_checkpoint

        tensors, _ = read_checkpoint(path)
        assert detect_architecture(tensors, {}).name == ("sdxl" if pipe.text_encoder is not None else "sdxl-refiner")
    ours = LatentDiffusion.from_single_file(tmp_path / "base.safetensors")
    image = ours(PROMPT, seed=2, num_inference_steps=2, guidance_scale=GUIDANCE, output_type="np", progress=False).images
    ref = StableDiffusionXLPipeline.from_single_file(str(tmp_path / "base.safetensors"), config=str(base[1]),
                                                     local_files_only=True)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPT, num_inference_steps=2, guidance_scale=GUIDANCE, generator=generators([2]), output_type="np").images
    np.testing.assert_allclose(image, theirs, atol=1e-4, rtol=0)


def _kohya_sdxl_lora(pipe, path, *, everything: bool, rank: int = 2, seed: int = 0):
    """A kohya-layout SDXL LoRA for ``pipe``: the U-Net under the original (sgm) names, lora_te1_ / lora_te2_.
    ``everything``: every linear and convolution layer; else attention and MLP projections only."""
    from safetensors.torch import save_file

    from latentdiff.models import ldm_layout as L

    g = torch.Generator().manual_seed(seed)
    tensors = {}

    def add(stem, module):
        w = module.weight
        down = torch.randn((rank, *w.shape[1:]), generator=g) * 0.3
        up = torch.randn((w.shape[0], rank, *([1, 1] if w.ndim == 4 else [])), generator=g) * 0.3
        tensors.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(1.0)})

    wanted = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    for path_, module in pipe.unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and (everything or path_.endswith(wanted[:4])):
            old = L.unet_key(path_ + ".weight", pipe.unet.config).removesuffix(".weight")
            add("lora_unet_" + old.replace(".", "_"), module)
    for prefix, encoder in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
        for path_, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and (everything or path_.endswith(wanted[4:])):
                name = path_ if path_ == "text_projection" else "text_model." + path_.removeprefix("text_model.")
                add(prefix + name.replace(".", "_"), module)
    save_file(tensors, str(path))
    return tensors


def test_kohya_sdxl_lora_applies_every_key_and_matches_diffusers(base, tmp_path, no_network):
    pipe, folder = base
    model = LatentDiffusion.from_pretrained(folder)
    full = tmp_path / "full.safetensors"
    keys = _kohya_sdxl_lora(model, full, everything=True)
    report = model.load_lora(full)
    assert report.applied_keys == len(keys) and report.unmatched_keys == []
    assert report.layers["text_encoder"] > 0 and report.layers["text_encoder_2"] > 0
    model.unload_lora()
    # the attention / MLP part against diffusers' own kohya reader, on the same weights
    attn = tmp_path / "attn.safetensors"
    _kohya_sdxl_lora(model, attn, everything=False, seed=1)
    model.load_lora(attn, scale=0.8)
    common = {"num_inference_steps": 2, "guidance_scale": GUIDANCE, "output_type": "np"}
    ours = model(PROMPT, negative_prompt=NEGATIVE, seed=3, progress=False, **common).images
    ref = reference(StableDiffusionXLPipeline, folder)
    ref.load_lora_weights(str(attn), adapter_name="a")
    ref.set_adapters(["a"], adapter_weights=[0.8])
    theirs = ref(PROMPT, negative_prompt=NEGATIVE, generator=generators([3]), **common).images
    plain = pipe(PROMPT, negative_prompt=NEGATIVE, seed=3, progress=False, **common).images
    assert np.abs(plain - ours).max() > 1e-3
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    from safetensors.torch import load_file, save_file

    second = tmp_path / "te2.safetensors"  # the second encoder's part alone: nothing in an SD 1.x model
    save_file({k: v for k, v in load_file(str(attn)).items() if k.startswith("lora_te2_")}, str(second))
    with pytest.raises(InvalidInputError, match="matched nothing"):
        LatentDiffusion.from_preset("tiny").load_lora(second)


def test_peft_layout_sdxl_lora_written_and_read_like_diffusers(base, tmp_path, no_network):
    from peft import get_peft_model_state_dict

    from latentdiff.models.lora import add_lora_adapter, save_lora

    pipe, folder = base
    trained = LatentDiffusion.from_pretrained(folder)
    states = {}
    for name, targets in (("unet", ["to_q", "to_v"]), ("text_encoder", ["q_proj"]), ("text_encoder_2", ["v_proj"])):
        module = getattr(trained, name)
        with torch.random.fork_rng():
            torch.manual_seed(4)
            add_lora_adapter(module, rank=2, alpha=2.0, targets=targets)
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.3)
        states[name] = get_peft_model_state_dict(module)
    common = {"num_inference_steps": 2, "guidance_scale": GUIDANCE, "output_type": "np"}
    expected = trained(PROMPT, seed=6, progress=False, **common).images  # the peft layers themselves
    for layout in ("peft", "kohya"):
        path = save_lora(tmp_path / f"{layout}.safetensors", unet_state=states["unet"], text_encoder_state=states["text_encoder"],
                         text_encoder_2_state=states["text_encoder_2"], rank=2, alpha=2.0, layout=layout, sdxl=True)  # fmt: skip
        model = LatentDiffusion.from_pretrained(folder)
        report = model.load_lora(path)
        assert report.unmatched_keys == [] and report.layers["text_encoder_2"] > 0
        np.testing.assert_allclose(model(PROMPT, seed=6, progress=False, **common).images, expected, atol=1e-4, rtol=0)
    ref = reference(StableDiffusionXLPipeline, folder)
    ref.load_lora_weights(str(tmp_path / "peft.safetensors"))
    theirs = ref(PROMPT, generator=generators([6]), **common).images
    np.testing.assert_allclose(theirs, expected, atol=1e-4, rtol=0)


def test_sdxl_textual_inversion_adds_a_token_to_both_encoders(base, tmp_path):
    from safetensors.torch import save_file

    pipe, folder = base
    model = LatentDiffusion.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "sxl.safetensors"
    save_file({"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 48, generator=g)}, str(path))
    embedding = model.load_textual_inversion(path)
    assert embedding.tokens == ["sxl", "sxl_1"]
    assert len(model.tokenizer) == len(model.tokenizer_2) == 49410
    common = {"num_inference_steps": 2, "guidance_scale": GUIDANCE, "output_type": "np", "progress": False}
    with_token = model("a photo in sxl", seed=1, **common).images
    assert np.abs(with_token - model("a photo in", seed=1, **common).images).max() > 1e-4
    # the same vectors through diffusers' loader, once per encoder
    ref = reference(StableDiffusionXLPipeline, folder)
    g = torch.Generator().manual_seed(0)
    clip_l, clip_g = torch.randn(2, 32, generator=g), torch.randn(2, 48, generator=g)
    ref.load_textual_inversion(clip_l, token="sxl", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(clip_g, token="sxl", text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    theirs = ref("a photo in sxl", generator=generators([1]), num_inference_steps=2, guidance_scale=GUIDANCE,
                 output_type="np").images  # fmt: skip
    np.testing.assert_allclose(with_token, theirs, atol=1e-4, rtol=0)
    sd_file = tmp_path / "sd.safetensors"
    save_file({"emb_params": torch.zeros(1, 32)}, str(sd_file))
    with pytest.raises(InvalidInputError, match="SD 1.x / 2.x embedding"):
        model.load_textual_inversion(sd_file, token="other")
    with pytest.raises(InvalidInputError, match="SDXL embedding"):
        LatentDiffusion.from_preset("tiny").load_textual_inversion(path)


def test_command_line_generate_batch_info_and_convert_take_sdxl(base, tmp_path, capsys):
    import json

    from latentdiff.cli import main
    from latentdiff.generation.recipe import read_recipe

    _, folder = base
    # generate: the second prompt reaches the recipe, and --from-png remakes the image
    assert main(["generate", "a cat", "--prompt-2", "a painting", "--model", str(folder), "--steps", "2", "--seed", "4",
                 "--size", "48x64", "-o", str(tmp_path / "cat.png"), "--no-progress"]) == 0  # fmt: skip
    recipe = read_recipe(tmp_path / "cat.png")
    assert recipe["prompt_2"] == "a painting" and recipe["negative_prompt"] is None and (recipe["width"], recipe["height"]) == (48, 64)
    assert main(["generate", "--from-png", str(tmp_path / "cat.png"), "-o", str(tmp_path / "again.png"), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cat.png")), np.asarray(Image.open(tmp_path / "again.png")))
    # batch: the rows' images equal the call's
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a dog", "seed": 2, "negative_prompt": "blurry"}) + "\n")
    assert main(["batch", str(rows), "--out", str(tmp_path / "out"), "--model", str(folder), "--steps", "2", "--no-progress"]) == 0
    made = next((tmp_path / "out").glob("*.png"))
    pipe = LatentDiffusion.from_pretrained(folder)
    direct = pipe("a dog", negative_prompt="blurry", seed=2, num_inference_steps=2, progress=False).images[0]
    assert np.abs(np.asarray(Image.open(made), dtype=int) - np.asarray(direct, dtype=int)).max() <= 1
    # info and convert (folder -> single file -> folder: the same weights)
    capsys.readouterr()
    assert main(["info", str(folder)]) == 0
    shown = capsys.readouterr().out
    assert "family: SDXL" in shown and "text_encoder_2" in shown and "CLIPTextModelWithProjection" in shown
    assert main(["convert", str(folder), str(tmp_path / "m.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "back")]) == 0
    assert LatentDiffusion.from_pretrained(tmp_path / "back").weight_hash() == pipe.weight_hash()
    capsys.readouterr()
    assert main(["generate", "x", "--preset", "tiny", "--prompt-2", "y", "--steps", "1", "-o", str(tmp_path / "x.png")]) != 0
    assert "prompt_2 applies to SDXL models only" in capsys.readouterr().err
