"""ControlNet, T2I-Adapter and IP-Adapter against diffusers' own pipelines on tiny random weights;
single-file ControlNets, recipes, the command line, batch rows and control images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import picture
from latentdiff import InvalidInputError, LatentDiffusion, MissingFileError
from latentdiff.cli import main

PROMPTS = ["a red circle", "a blue square"]
STEPS = 4


def _random_controlnet(unet, seed: int):
    """A ControlNet of ``unet``'s shape with random weights (a fresh one's zero convolutions would do nothing)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


@pytest.fixture(scope="module")
def controlnet_dirs(tiny, tmp_path_factory):
    """Two random ControlNets for the tiny model, as diffusers folders."""
    root = tmp_path_factory.mktemp("controlnets")
    for seed in (0, 1):
        _random_controlnet(tiny.unet, seed).save_pretrained(root / f"cn{seed}")
    return [root / "cn0", root / "cn1"]


@pytest.fixture
def pipe(tiny):
    """The session's tiny model; the controls a test loads are removed afterwards."""
    yield tiny
    tiny.unload_controlnet()


def _generators(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _reference(cls, reference, controlnet):
    from diffusers import ControlNetModel

    nets = [ControlNetModel.from_pretrained(p, local_files_only=True) for p in controlnet]
    net = nets if len(nets) > 1 else nets[0]  # (a list: the pipeline makes its MultiControlNetModel)
    ref = cls(**{k: v for k, v in reference.components.items() if k != "controlnet"}, controlnet=net,
              requires_safety_checker=False)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    return ref


# -- ControlNet equals diffusers --------------------------------------------------------------------


def test_controlnet_equals_diffusers(pipe, reference, controlnet_dirs):
    from diffusers import StableDiffusionControlNetPipeline

    ref = _reference(StableDiffusionControlNetPipeline, reference, controlnet_dirs[:1])
    pipe.load_controlnet(controlnet_dirs[0])
    control, seeds = picture(64, 64, seed=3), [3, 4]
    ours = pipe(PROMPTS, control_image=control, control_scale=0.7, control_end=0.7, seed=seeds,
                num_inference_steps=STEPS, output_type="np").images  # fmt: skip
    theirs = ref(PROMPTS, image=control, controlnet_conditioning_scale=0.7, control_guidance_end=0.7,
                 num_inference_steps=STEPS, height=64, width=64, generator=_generators(seeds), output_type="np").images  # fmt: skip
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    pipe.unload_controlnet()
    plain = pipe(PROMPTS, seed=seeds, num_inference_steps=STEPS, output_type="np").images
    assert np.abs(ours - plain).max() > 1e-2  # the ControlNet did something


def test_several_controlnets_equal_diffusers_multicontrolnet(pipe, reference, controlnet_dirs):
    from diffusers import StableDiffusionControlNetPipeline

    ref = _reference(StableDiffusionControlNetPipeline, reference, controlnet_dirs)
    for path in controlnet_dirs:
        pipe.load_controlnet(path)
    images, seeds = [picture(64, 64, seed=1), picture(48, 40, seed=2)], [7]
    kwargs = dict(control_scale=[0.6, 1.3], control_start=[0.0, 0.25], control_end=[0.75, 1.0])
    ours = pipe(PROMPTS[0], control_image=images, seed=seeds, num_inference_steps=STEPS, output_type="np", **kwargs).images
    theirs = ref(PROMPTS[0], image=images, controlnet_conditioning_scale=[0.6, 1.3], control_guidance_start=[0.0, 0.25],
                 control_guidance_end=[0.75, 1.0], num_inference_steps=STEPS, height=64, width=64,
                 generator=_generators(seeds), output_type="np").images  # fmt: skip
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert [c.name for c in pipe.controls.items] == ["cn0", "cn1"]


def test_controlnet_img2img_equals_diffusers(pipe, reference, controlnet_dirs, tiny_dir):
    from diffusers import DDIMScheduler, StableDiffusionControlNetImg2ImgPipeline

    ref = _reference(StableDiffusionControlNetImg2ImgPipeline, reference, controlnet_dirs[:1])
    pipe.load_controlnet(controlnet_dirs[0])
    start, control, seeds = picture(64, 64, seed=5), picture(64, 64, seed=6), [11, 12]
    ours = pipe(PROMPTS[0], image=start, strength=0.7, control_image=control, control_scale=0.9, num_images_per_prompt=2,
                seed=seeds, num_inference_steps=STEPS, scheduler="ddim", output_type="np").images  # fmt: skip
    ref.scheduler = DDIMScheduler.from_pretrained(tiny_dir, subfolder="scheduler")
    # (the scale given: diffusers' img2img and inpaint variants default to 0.8 and 0.5, ours is 1 everywhere)
    theirs = ref([PROMPTS[0]] * 2, image=start, control_image=control, controlnet_conditioning_scale=0.9, strength=0.7,
                 num_inference_steps=STEPS, generator=_generators(seeds), output_type="np").images  # fmt: skip
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_controlnet_inpainting_equals_diffusers(pipe, reference, controlnet_dirs, tiny_dir):
    from diffusers import DDIMScheduler, StableDiffusionControlNetInpaintPipeline

    ref = _reference(StableDiffusionControlNetInpaintPipeline, reference, controlnet_dirs[:1])
    pipe.load_controlnet(controlnet_dirs[0])
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    start, control, seeds = picture(64, 64, seed=5), picture(64, 64, seed=6), [21]
    ours = pipe(PROMPTS[1], image=start, mask_image=mask, strength=0.8, control_image=control, control_scale=1.0,
                seed=seeds, num_inference_steps=STEPS, scheduler="ddim", output_type="latent").images  # fmt: skip
    ref.scheduler = DDIMScheduler.from_pretrained(tiny_dir, subfolder="scheduler")
    theirs = ref(PROMPTS[1], image=start, mask_image=mask, control_image=control, controlnet_conditioning_scale=1.0,
                 strength=0.8, num_inference_steps=STEPS, height=64, width=64, generator=_generators(seeds),
                 output_type="latent").images  # fmt: skip
    plain = ref(PROMPTS[1], image=start, mask_image=mask, control_image=control, controlnet_conditioning_scale=0.0,
                strength=0.8, num_inference_steps=STEPS, height=64, width=64, generator=_generators(seeds),
                output_type="latent").images  # fmt: skip
    assert (theirs - plain).abs().max() > 1e-2  # the ControlNet did something inside the mask
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_controlnet_with_hires_and_its_recipe(pipe, controlnet_dirs, tmp_path):
    from latentdiff import call_kwargs

    pipe.load_controlnet(controlnet_dirs[0], name="edges")
    control = tmp_path / "control.png"
    picture(64, 64, seed=8).save(control)
    kwargs = dict(seed=2, num_inference_steps=3, hires_scale=1.5, hires_strength=0.6, output_type="np")
    made = pipe(PROMPTS[0], control_image=control, control_scale=0.9, **kwargs)
    assert made.images.shape == (1, 96, 96, 3)
    params = made.params[0]
    assert params["controls"] == [{"name": "edges", "kind": "controlnet", "path": str(controlnet_dirs[0].resolve()),
                                   "weight_hash": pipe.controls.items[0].weight_hash()}]  # fmt: skip
    assert params["control_image"] == [str(control.resolve())] and len(params["control_image_hash"][0]) == 16
    assert params["control_scale"] == [0.9] and params["control_end"] == [1.0]
    again = pipe(**{**call_kwargs(params), "output_type": "np"})
    np.testing.assert_allclose(again.images, made.images, atol=1e-6)
    pipe.unload_controlnet()
    plain = pipe(PROMPTS[0], **kwargs).images
    assert np.abs(plain - made.images).max() > 1e-2


def test_control_arguments_are_checked(pipe, controlnet_dirs, tmp_path, monkeypatch):
    with pytest.raises(InvalidInputError, match="control_image needs a ControlNet"):
        pipe("x", control_image=picture(), num_inference_steps=2)
    pipe.load_controlnet(controlnet_dirs[0])
    pipe.load_controlnet(controlnet_dirs[1])
    with pytest.raises(InvalidInputError, match="give control_image="):
        pipe("x", num_inference_steps=2)
    with pytest.raises(InvalidInputError, match="one entry per control"):
        pipe("x", control_image=picture(), num_inference_steps=2)
    with pytest.raises(InvalidInputError, match="got 3 control_scale values for 2 controls"):
        pipe("x", control_image=[picture()] * 2, control_scale=[1.0] * 3, num_inference_steps=2)
    with pytest.raises(InvalidInputError, match="must be below control_end"):
        pipe("x", control_image=[picture()] * 2, control_start=0.5, control_end=0.5, num_inference_steps=2)
    with pytest.raises(InvalidInputError, match="is loaded already"):
        pipe.load_controlnet(controlnet_dirs[0], name="cn0")
    monkeypatch.setattr("latentdiff.generation.control.DEFAULT_CONTROLNET", tmp_path / "not-shipped")
    with pytest.raises(MissingFileError, match="no default ControlNet is shipped in this install"):
        pipe.load_controlnet("default")


# -- single files -----------------------------------------------------------------------------------


def test_single_file_controlnets_load_as_diffusers_reads_them(pipe, controlnet_dirs, tmp_path, capsys):
    from diffusers import ControlNetModel
    from safetensors.torch import load_file, save_file

    from latentdiff.models.controlnet import save_single_file

    folder = ControlNetModel.from_pretrained(controlnet_dirs[0], local_files_only=True)
    original = save_single_file(folder, tmp_path / "control_tiny.safetensors")
    tensors = load_file(original)
    assert all(k.startswith("control_model.") for k in tensors) and "control_model.input_hint_block.14.weight" in tensors
    theirs = ControlNetModel.from_single_file(str(original), config=str(controlnet_dirs[0]), local_files_only=True)
    expected = theirs.state_dict()
    # the same file as a safe pickle, without the prefix, and inside a full model release
    torch.save({"state_dict": tensors}, tmp_path / "control_tiny.pth")
    save_file({k.removeprefix("control_model."): v for k, v in tensors.items()}, tmp_path / "bare.safetensors")
    full = {**tensors, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "first_stage_model.x": torch.zeros(1)}
    save_file(full, tmp_path / "full.safetensors")
    for name in ("control_tiny.safetensors", "control_tiny.pth", "bare.safetensors", "full.safetensors"):
        control = pipe.load_controlnet(tmp_path / name)
        ours = control.model.state_dict()
        assert ours.keys() == expected.keys()
        assert all(torch.equal(ours[k], expected[k]) for k in ours), name
        pipe.unload_controlnet()

    # an unknown key is an error naming it; strict=False loads what fits and says what did not
    save_file({**tensors, "control_model.extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    with pytest.raises(InvalidInputError, match="1 unexpected: control_model.extra.weight"):
        pipe.load_controlnet(tmp_path / "extra.safetensors")
    pipe.load_controlnet(tmp_path / "extra.safetensors", strict=False)
    assert "1 unexpected: control_model.extra.weight" in capsys.readouterr().err
    # a ControlNet for another base model (here: another text width) says so
    other = LatentDiffusion(**_other_family(), source={"preset": "other"})
    with pytest.raises(InvalidInputError, match="does not fit this model's U-Net"):
        other.load_controlnet(original)
    with pytest.raises(InvalidInputError, match="made for another base model"):
        other.load_controlnet(controlnet_dirs[0])
    with pytest.raises(InvalidInputError, match="is not a ControlNet"):
        save_file({"foo": torch.zeros(1)}, tmp_path / "foo.safetensors")
        pipe.load_controlnet(tmp_path / "foo.safetensors")


def _other_family():
    from latentdiff.models.architectures import PRESETS, build_components

    return build_components(PRESETS["tiny"].with_overrides({"unet": {"cross_attention_dim": 16}, "text_encoder":
                                                            {"hidden_size": 16, "projection_dim": 16}}))  # fmt: skip


# -- command line, batch ----------------------------------------------------------------------------


def test_cli_controlnet_and_from_png(controlnet_dirs, tmp_path, capsys):
    from latentdiff.generation.recipe import read_recipe

    control = tmp_path / "edges.png"
    picture(64, 64, seed=4).save(control)
    out = tmp_path / "a.png"
    common = ["--preset", "tiny", "--steps", "2", "--no-progress", "--threads", "1"]
    assert main(["generate", "a cat", "--seed", "5", "--controlnet", f"{controlnet_dirs[0]}:0.8", "--control-image",
                 str(control), "-o", str(out), *common]) == 0  # fmt: skip
    recipe = read_recipe(out)
    assert recipe["control_scale"] == [0.8] and recipe["controls"][0]["path"] == str(controlnet_dirs[0].resolve())
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "-o", str(again), "--no-progress", "--threads", "1"]) == 0
    assert "may not match" not in capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    picture(64, 64, seed=9).save(control)  # the control image changed: said
    assert main(["generate", "--from-png", str(out), "-o", str(tmp_path / "b.png"), "--no-progress"]) == 0
    assert f"the input {control.resolve()} has changed since" in capsys.readouterr().err
    recipe["controls"][0]["path"] = str(tmp_path / "gone")  # the ControlNet is gone: cannot be remade
    from latentdiff.generation.recipe import save_png

    save_png(Image.open(out).convert("RGB"), tmp_path / "edited.png", recipe)
    assert main(["generate", "--from-png", str(tmp_path / "edited.png"), "-o", str(tmp_path / "c.png")]) == 2
    assert "which is missing; it cannot be remade without it" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("latentdiff.generation.control.DEFAULT_CONTROLNET", tmp_path / "not-shipped")
        assert main(["generate", "x", "--controlnet", "default", "--control-image", str(control), *common]) == 2
    assert "no default ControlNet is shipped in this install" in capsys.readouterr().err
    assert main(["generate", "x", "--control-image", str(control), *common]) == 2
    assert "--control-image needs --controlnet" in capsys.readouterr().err


def test_batch_rows_name_their_control_images(tiny, controlnet_dirs, tmp_path):
    for seed in (1, 2):
        picture(64, 64, seed=seed).save(tmp_path / f"c{seed}.png")
    rows = [{"prompt": "a cat", "seed": 3, "control_image": "c1.png"}, {"prompt": "a dog", "seed": 4, "id": "dog"},
            {"prompt": "an owl", "control_image": "missing.png"}]  # fmt: skip
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    code = main(["batch", str(tmp_path / "rows.jsonl"), "--out", str(out), "--preset", "tiny", "--steps", "2",
                 "--controlnet", str(controlnet_dirs[0]), "--control-image", str(tmp_path / "c2.png"),
                 "--no-progress", "--batch-size", "2"])  # fmt: skip
    assert code == 1  # the row whose control image is missing
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and "missing.png does not exist" in errors[0]["reason"]
    manifest = {r["id"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert manifest["1"]["params"]["control_image"] == [str((tmp_path / "c1.png").resolve())]
    assert manifest["dog"]["params"]["control_image"] == [str((tmp_path / "c2.png").resolve())]
    tiny.load_controlnet(controlnet_dirs[0])
    try:
        alone = tiny("a dog", seed=4, num_inference_steps=2, control_image=tmp_path / "c2.png").images[0]
    finally:
        tiny.unload_controlnet()
    made = np.asarray(Image.open(out / manifest["dog"]["file"]), dtype=int)
    assert np.abs(made - np.asarray(alone, dtype=int)).max() <= 1  # batched with another row: 1e-6 rounding


# -- control images ---------------------------------------------------------------------------------


def test_canny_control_images(tmp_path, capsys):
    import cv2

    from latentdiff import canny

    source = tmp_path / "photo.jpg"
    picture(80, 60, seed=2).save(source)
    edges = canny(source, low=50, high=150)
    expected = cv2.Canny(np.asarray(Image.open(source).convert("L")), 50, 150)
    assert edges.mode == "RGB" and edges.size == (80, 60)
    assert np.array_equal(np.asarray(edges)[..., 0], expected) and expected.max() == 255
    out = tmp_path / "edges" / "canny.png"
    assert main(["control", "canny", str(source), "-o", str(out), "--low", "50", "--high", "150"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(edges))
    assert main(["control", "canny", str(source), "-o", str(out), "--low", "200", "--high", "100"]) == 2
    assert "must not be above high" in capsys.readouterr().err


# -- T2I-Adapter and IP-Adapter ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def attention_first(tmp_path_factory):
    """A tiny model whose first U-Net block has cross-attention (as SD's does; T2I-Adapters need it), on disk."""
    from latentdiff.models.architectures import PRESETS, build_components

    arch = PRESETS["tiny"].with_overrides({"unet": {"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                                                    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}})  # fmt: skip
    model = LatentDiffusion(**build_components(arch, 0), source={"preset": "tiny-attention-first"})
    return model.save_pretrained(tmp_path_factory.mktemp("models") / "attention-first")


def test_t2i_adapter_equals_diffusers(attention_first, tmp_path, no_network):
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    torch.manual_seed(0)
    adapter = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=8)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    adapter.save_pretrained(tmp_path / "adapter")
    ours = LatentDiffusion.from_pretrained(attention_first)
    ours.load_t2i_adapter(tmp_path / "adapter")
    control, seeds = picture(64, 64, seed=1), [5, 6]
    made = ours(PROMPTS, control_image=control, control_scale=0.8, seed=seeds, num_inference_steps=STEPS,
                output_type="np").images  # fmt: skip
    ref = StableDiffusionAdapterPipeline.from_pretrained(
        attention_first, adapter=T2IAdapter.from_pretrained(tmp_path / "adapter"), local_files_only=True,
        safety_checker=None, requires_safety_checker=False)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPTS, image=[control] * 2, adapter_conditioning_scale=0.8, num_inference_steps=STEPS, height=64, width=64,
                 generator=_generators(seeds), output_type="np").images  # fmt: skip
    np.testing.assert_allclose(made, theirs, atol=1e-4, rtol=0)
    with pytest.raises(InvalidInputError, match="multiples of 16"):
        ours("x", control_image=control, height=72, width=64, num_inference_steps=2)
    with pytest.raises(InvalidInputError, match="first block has cross-attention"):
        LatentDiffusion.from_preset("tiny").load_t2i_adapter(tmp_path / "adapter")


def _tiny_ip_adapter(unet, folder, clip_dim: int = 16):
    """A random IP-Adapter file (image_proj / ip_adapter layout) for ``unet`` and a tiny CLIP vision encoder."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
        projection_dim=clip_dim))  # fmt: skip
    encoder.save_pretrained(folder / "image_encoder")
    cross = unet.config.cross_attention_dim
    tensors = {"image_proj.proj.weight": torch.randn(4 * cross, clip_dim) * 0.1, "image_proj.proj.bias": torch.randn(4 * cross) * 0.1,
               "image_proj.norm.weight": 1 + torch.randn(cross) * 0.1, "image_proj.norm.bias": torch.randn(cross) * 0.1}  # fmt: skip
    layers = [name for name in unet.attn_processors if not name.endswith("attn1.processor")]
    for j, name in enumerate(layers):
        block = name.split(".")[0]
        width = (unet.config.block_out_channels[-1] if block == "mid_block" else
                 unet.config.block_out_channels[int(name.split(".")[1])] if block == "down_blocks" else
                 list(reversed(unet.config.block_out_channels))[int(name.split(".")[1])])  # fmt: skip
        for kv in "kv":
            tensors[f"ip_adapter.{2 * j + 1}.to_{kv}_ip.weight"] = torch.randn(width, cross) * 0.2
    save_file(tensors, folder / "ip_adapter.safetensors")
    return folder / "ip_adapter.safetensors", folder / "image_encoder"


def test_ip_adapter_equals_diffusers(tiny_dir, tmp_path, no_network):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    ours = LatentDiffusion.from_pretrained(tiny_dir)
    base_hash = ours.weight_hash()
    weights, encoder = _tiny_ip_adapter(ours.unet, tmp_path)
    ours.load_ip_adapter(weights, image_encoder=encoder)
    assert ours.weight_hash() == base_hash  # the adapter is recorded beside the model, not in its hash
    prompt_image, seeds = picture(40, 40, seed=7), [1, 2]
    made = ours(PROMPTS[0], ip_image=prompt_image, ip_scale=0.6, num_images_per_prompt=2, seed=seeds,
                num_inference_steps=STEPS, output_type="np")  # fmt: skip
    ref = StableDiffusionPipeline.from_pretrained(
        tiny_dir, image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder), local_files_only=True,
        safety_checker=None, requires_safety_checker=False)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip_adapter.safetensors", local_files_only=True)
    ref.set_ip_adapter_scale(0.6)
    theirs = ref(PROMPTS[0], ip_adapter_image=prompt_image, num_images_per_prompt=2, num_inference_steps=STEPS,
                 height=64, width=64, generator=_generators(seeds), output_type="np").images  # fmt: skip
    np.testing.assert_allclose(made.images, theirs, atol=1e-4, rtol=0)
    params = made.params[0]
    assert params["ip_adapter"]["path"] == str(weights.resolve()) and params["ip_scale"] == 0.6
    with pytest.raises(InvalidInputError, match="an IP-Adapter is loaded: give ip_image="):
        ours("x", num_inference_steps=2)
    ours.unload_ip_adapter()  # back to the plain model, exactly
    plain = ours(PROMPTS[0], seed=seeds, num_images_per_prompt=2, num_inference_steps=STEPS, output_type="np").images
    expected = LatentDiffusion.from_pretrained(tiny_dir)(PROMPTS[0], seed=seeds, num_images_per_prompt=2,
                                                         num_inference_steps=STEPS, output_type="np").images  # fmt: skip
    np.testing.assert_array_equal(plain, expected)
    assert np.abs(plain - made.images).max() > 1e-2
    with pytest.raises(InvalidInputError, match="ip_image needs an IP-Adapter"):
        ours("x", ip_image=prompt_image, num_inference_steps=2)


def test_ip_adapter_files_read_safely(tmp_path):
    """The releases' .bin pickle ({"image_proj": {...}, "ip_adapter": {...}}) is read with weights_only and
    gives the same tensors as the .safetensors layout; other keys and missing parts are one-line errors."""
    from safetensors.torch import save_file

    from latentdiff.models.adapters import read_ip_adapter

    proj, attn = {"proj.weight": torch.randn(8, 4)}, {"1.to_k_ip.weight": torch.randn(8, 8)}
    torch.save({"image_proj": proj, "ip_adapter": attn}, tmp_path / "ip.bin")
    save_file({**{f"image_proj.{k}": v for k, v in proj.items()}, **{f"ip_adapter.{k}": v for k, v in attn.items()}},
              tmp_path / "ip.safetensors")  # fmt: skip
    for name in ("ip.bin", "ip.safetensors"):
        state = read_ip_adapter(tmp_path / name)
        assert state.keys() == {"image_proj", "ip_adapter"}
        assert torch.equal(state["image_proj"]["proj.weight"], proj["proj.weight"])
        assert torch.equal(state["ip_adapter"]["1.to_k_ip.weight"], attn["1.to_k_ip.weight"])
    save_file({"image_proj.proj.weight": proj["proj.weight"]}, tmp_path / "half.safetensors")
    with pytest.raises(InvalidInputError, match="is not an IP-Adapter"):
        read_ip_adapter(tmp_path / "half.safetensors")
    torch.save({"image_proj": proj, "ip_adapter": attn, "lora": {"x": torch.zeros(1)}}, tmp_path / "faceid.bin")
    with pytest.raises(InvalidInputError, match="keys outside image_proj / ip_adapter"):
        read_ip_adapter(tmp_path / "faceid.bin")


def test_sdxl_models_refuse_controls_in_one_line(controlnet_dirs):
    sdxl = LatentDiffusion.from_preset("tiny-sdxl")
    for load in (lambda: sdxl.load_controlnet(controlnet_dirs[0]), lambda: sdxl.load_t2i_adapter(controlnet_dirs[0]),
                 lambda: sdxl.load_ip_adapter(controlnet_dirs[0], image_encoder=controlnet_dirs[0])):  # fmt: skip
        with pytest.raises(InvalidInputError, match="this is an SDXL model") as e:
            load()
        assert "\n" not in str(e.value)
