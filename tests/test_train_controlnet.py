"""ControlNet training (the trainer's [controlnet] section): the start against diffusers' from_unet, the
first step's loss against diffusers' ControlNetModel + UNet2DConditionModel by hand, frozen parts, exact
resume, two processes, outputs that diffusers and our pipeline load, the conditioning image's view, and
bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import train_in_two_processes
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from latentdiff import InvalidInputError, LatentDiffusion
from latentdiff.cli import main
from latentdiff.train.config import TrainConfig
from latentdiff.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "training" / "configs" / "tiny-test.toml"
# what ControlNet training asks of the tiny test config: a frozen model, the ControlNet alone
CONTROLNET = [
    "controlnet.enabled=true",
    "model.train_text_encoder=false",
    "validation.prompts=[]",
    "checkpoint.every=0",
]
WEIGHTS = "diffusion_pytorch_model.safetensors"
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "black": (10, 10, 10)}


@pytest.fixture(scope="module")
def controlled(tmp_path_factory) -> Path:
    """8 captioned 64x64 pictures (a coloured circle or square, each at its own place) with their outline on
    black as the conditioning image, in an imagefolder: metadata.jsonl with file_name, text, conditioning_image."""
    folder = tmp_path_factory.mktemp("controlled")
    (folder / "edges").mkdir()
    lines = []
    for i, (name, rgb) in enumerate(list(COLOURS.items()) * 2):
        shape = "circle" if i < 4 else "square"
        box = (6 + 3 * i, 10 + i, 38 + 3 * i, 42 + i)
        image, edges = Image.new("RGB", (64, 64), (255, 255, 255)), Image.new("RGB", (64, 64), (0, 0, 0))
        (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=rgb)
        (ImageDraw.Draw(edges).ellipse if shape == "circle" else ImageDraw.Draw(edges).rectangle)(
            box, outline=(255, 255, 255)
        )
        image.save(folder / f"{i}.png")
        edges.save(folder / "edges" / f"{i}.png")
        lines.append(
            json.dumps({"file_name": f"{i}.png", "text": f"a {name} {shape}", "conditioning_image": f"edges/{i}.png"})
        )
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def config(data: Path, model: Path, out: Path, *overrides: str) -> TrainConfig:
    return TrainConfig.load(CONFIG, [f"data.path={data}", f"model.path={model}", f"train.output_dir={out}", *CONTROLNET,
                                     *overrides])  # fmt: skip


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the start and the step ---------------------------------------------------------------------------


def test_a_new_controlnet_is_diffusers_from_unet(controlled, tiny_dir, tmp_path):
    """Every tensor as diffusers' ControlNetModel.from_unet makes it (RNG seeded with train.seed for the
    conditioning encoder's random start), the zero convolutions at zero."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from latentdiff.train.controlnet import make_controlnet

    ours = make_controlnet(
        LatentDiffusion.from_pretrained(tiny_dir), config(controlled, tiny_dir, tmp_path, "train.seed=7")
    )
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet", local_files_only=True)
    torch.manual_seed(7)
    theirs = ControlNetModel.from_unet(unet)
    assert same_tensors(ours.state_dict(), theirs.state_dict())
    assert all(p.requires_grad for p in ours.parameters()) and ours.training
    zero = [
        p for name, p in ours.named_parameters() if name.startswith(("controlnet_down_blocks", "controlnet_mid_block"))
    ]
    assert zero and all(not p.any() for p in zero)


def test_a_new_controlnet_reads_control_images_at_the_models_own_scale(controlled, tiny_dir, tmp_path):
    """The default model's VAE downscales 4x, not SD's 8x: a new ControlNet's conditioning encoder must
    bring a control image of the picture's size down to the latent size (diffusers' from_unet with its
    (16, 32, 96, 256) default would make 8x8 features for 16x16 latents)."""
    from latentdiff.train.controlnet import make_controlnet

    pipe = LatentDiffusion.from_pretrained()  # the embedded default model: 64 px pictures, 16x16 latents
    assert pipe.vae_scale_factor == 4
    net = make_controlnet(pipe, config(controlled, tiny_dir, tmp_path))
    latents = torch.zeros(1, pipe.unet.config.in_channels, 16, 16)
    text = torch.zeros(1, 77, pipe.unet.config.cross_attention_dim)
    down, mid = net(latents, 10, encoder_hidden_states=text, controlnet_cond=torch.zeros(1, 3, 64, 64), return_dict=False)
    assert down[0].shape[-2:] == (16, 16) and mid.shape[-2:] == (16 // 2 ** (len(pipe.unet.down_blocks) - 1),) * 2


def _perturbed_controlnet(tiny_dir: Path, folder: Path) -> Path:
    """A ControlNet of the tiny model whose zero convolutions are not zero (so its residuals count)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(1)
    net = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_dir / "unet", local_files_only=True))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    net.save_pretrained(folder, safe_serialization=True)
    return folder


def test_first_step_loss_is_diffusers_controlnet_and_unet_by_hand_and_only_the_controlnet_changes(
    controlled, tiny_dir, tmp_path, monkeypatch
):
    """The logged loss of step 1 equals min-SNR-weighted MSE of diffusers' UNet2DConditionModel steered by
    diffusers' ControlNetModel on the same batch, posterior sample, noise and timesteps (the trainer's
    draws: its batch order and the micro-step's seeds); afterwards U-Net, VAE and text encoder are
    bit-identical to what was loaded and the ControlNet is not."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from latentdiff.data.buckets import BucketBatches
    from latentdiff.train import loop
    from latentdiff.train.objective import draw_global, step_seed

    start = _perturbed_controlnet(tiny_dir, tmp_path / "start")
    loaded = []
    monkeypatch.setattr(
        loop, "load_model", lambda cfg: loaded.append(LatentDiffusion.from_pretrained(cfg.model.path)) or loaded[-1]
    )
    result = train(config(controlled, tiny_dir, tmp_path / "out", f"controlnet.path={start}", "train.max_steps=1",
                          "train.log_every=1", "train.ema=false", "optim.warmup_steps=0", "data.random_flip=false",
                          "data.caption_dropout=0.0", "objective.noise_schedule=''", "objective.prediction_type=''",
                          "objective.snr_gamma=5.0"))  # fmt: skip

    # by hand, from the files, with diffusers and transformers
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(tiny_dir / "vae", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(tiny_dir / "text_encoder", local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer", local_files_only=True)
    controlnet = ControlNetModel.from_pretrained(start, local_files_only=True)
    schedule = DDPMScheduler.from_pretrained(tiny_dir / "scheduler", local_files_only=True)
    rows = [json.loads(line) for line in (controlled / "metadata.jsonl").read_text().splitlines()]
    batch = [rows[i] for i in BucketBatches([0] * len(rows), 2, seed=0).global_batches(0)[0]]
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(controlled / r["file_name"]), np.float32) / 127.5 - 1)
                          for r in batch]).permute(0, 3, 1, 2)  # fmt: skip
    control = torch.stack([torch.from_numpy(np.asarray(Image.open(controlled / r["conditioning_image"]), np.float32) / 255)
                           for r in batch]).permute(0, 3, 1, 2)  # fmt: skip
    ids = tokenizer(
        [r["text"] for r in batch], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        shape = posterior.mean.shape  # (2, 4, 8, 8)
        eps = draw_global(shape, step_seed(0, 0, "posterior"), "cpu", 0, 2)
        latents = (posterior.mean + posterior.std * eps) * vae.config.scaling_factor
        noise = draw_global(shape, step_seed(0, 0, "noise"), "cpu", 0, 2)
        t = draw_global((2,), step_seed(0, 0, "timesteps"), "cpu", 0, 2, 1000)
        noisy = schedule.add_noise(latents, noise, t)
        text = encoder(ids.input_ids)[0]
        down, mid = controlnet(noisy, t, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
        pred = unet(noisy, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        plain = unet(noisy, t, text).sample
    abar = schedule.alphas_cumprod[t]
    snr = abar / (1 - abar)
    weight = torch.minimum(snr, torch.tensor(5.0)) / snr  # min-SNR-gamma for epsilon-prediction (Hang et al. 2023)
    expected = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean().item()
    without = (F.mse_loss(plain, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean().item()
    assert result.losses[0] == pytest.approx(expected, rel=1e-5, abs=0)
    assert abs(expected - without) > 1e-3 * expected  # the residuals count in that loss

    pipe = loaded[0]
    fresh = LatentDiffusion.from_pretrained(tiny_dir)
    for name in ("unet", "vae", "text_encoder"):
        assert same_tensors(getattr(pipe, name).state_dict(), getattr(fresh, name).state_dict()), name
    trained = load_file(result.controlnet_dir / WEIGHTS)
    assert trained.keys() == controlnet.state_dict().keys()
    assert not same_tensors(trained, controlnet.state_dict())
    assert result.model_dir is None and result.lora_file is None


# -- resume, outputs, processes -----------------------------------------------------------------------


def test_resume_is_exact_and_the_controlnet_loads_in_diffusers_and_ours(controlled, tiny_dir, reference, tmp_path):
    """A run with cached latents, EMA and validation, stopped at a checkpoint and resumed, gives the
    ControlNet of an uninterrupted run bit for bit; the folder loads in diffusers' ControlNetModel /
    StableDiffusionControlNetPipeline and in our load_controlnet, and both make the same images."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    edges = controlled / "edges" / "0.png"
    steps = ["train.max_steps=4", "checkpoint.every=2", "data.cache=true", "validation.prompts=['a red circle']",
             f"validation.control_images=['{edges}']"]  # fmt: skip
    straight = train(config(controlled, tiny_dir, tmp_path / "a", *steps))
    first = tmp_path / "a" / "checkpoint-00000002"
    shutil.copytree(first, tmp_path / "b" / first.name)
    resumed = train(config(controlled, tiny_dir, tmp_path / "b", *steps))
    a, b = load_file(straight.controlnet_dir / WEIGHTS), load_file(resumed.controlnet_dir / WEIGHTS)
    assert same_tensors(a, b)
    assert a["controlnet_mid_block.weight"].abs().max() > 0  # the zero convolutions have learned
    card = (straight.controlnet_dir / "README.md").read_text()
    assert "(ControlNet)" in card and "controlnet" in card
    assert (tmp_path / "a" / "validation" / "step-00000004.png").is_file()

    ours = LatentDiffusion.from_pretrained(tiny_dir)
    ours.load_controlnet(tmp_path / "a")  # the run's folder: its controlnet/
    kwargs = {"num_inference_steps": 3, "height": 64, "width": 64, "output_type": "np"}
    mine = ours("a red circle", control_image=str(edges), seed=[3], **kwargs).images
    net = ControlNetModel.from_pretrained(straight.controlnet_dir, local_files_only=True)
    ref = StableDiffusionControlNetPipeline(**{k: v for k, v in reference.components.items() if k != "controlnet"},
                                            controlnet=net, requires_safety_checker=False)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    theirs = ref(
        "a red circle", image=Image.open(edges).convert("RGB"), generator=[torch.Generator().manual_seed(3)], **kwargs
    ).images
    np.testing.assert_allclose(mine, theirs, atol=1e-4, rtol=0)
    ours.unload_controlnet()
    assert np.abs(ours("a red circle", seed=[3], **kwargs).images - mine).max() > 1e-3  # the ControlNet acts


def test_two_processes_equal_one_with_the_same_global_batch(controlled, tiny_dir, tmp_path):
    common = ["train.max_steps=3", "optim.eps=1e-3", "train.ema=false"]
    done = train_in_two_processes(CONFIG, [f"data.path={controlled}", f"model.path={tiny_dir}",
                                           f"train.output_dir={tmp_path / 'two'}", "train.batch_size=1", *CONTROLNET, *common])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 3 steps; result in") == 1 and str(tmp_path / "two" / "controlnet") in done.stdout
    one = train(config(controlled, tiny_dir, tmp_path / "one", "train.batch_size=2", *common))
    two, single = load_file(tmp_path / "two" / "controlnet" / WEIGHTS), load_file(one.controlnet_dir / WEIGHTS)
    # the same samples, noise and timesteps; only the order of the gradient sum differs (as test_train's)
    assert two.keys() == single.keys() and max((two[k] - single[k]).abs().max().item() for k in two) <= 1e-5


def test_bf16_gradient_checkpointing_channels_last_and_accumulation(controlled, tiny_dir, tmp_path):
    """The trainer's memory and precision options with a ControlNet: a frozen bf16 U-Net, a float32 ControlNet
    under autocast, checkpointed activations of both; validation runs the float32 ControlNet beside it."""
    edges = controlled / "edges" / "1.png"
    result = train(config(controlled, tiny_dir, tmp_path / "bf16", "train.max_steps=1", "optim.warmup_steps=0", "train.mixed_precision='bf16'",
                          "train.gradient_checkpointing=true", "train.channels_last=true", "train.gradient_accumulation=2",
                          "train.batch_size=1", "validation.prompts=['a blue circle']", f"validation.control_images=['{edges}']"))  # fmt: skip
    weights = load_file(result.controlnet_dir / WEIGHTS)
    assert {w.dtype for w in weights.values()} == {torch.float32} and weights[
        "controlnet_mid_block.weight"
    ].abs().max() > 0
    assert (tmp_path / "bf16" / "validation" / "step-00000001.png").is_file()


# -- data -----------------------------------------------------------------------------------------------


def test_the_conditioning_image_takes_the_images_crop_and_flip(tmp_path):
    """An asymmetric picture wider than the training size, and its copy as the conditioning image: with
    random crops and flips, every sample's conditioning pixels ([0, 1]) are its image's pixels ([-1, 1])."""
    from latentdiff.data.buckets import assign_buckets
    from latentdiff.data.dataset import TrainDataset
    from latentdiff.data.sources import DataConfig, scan

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 112, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        shutil.copy(tmp_path / f"{i}.png", tmp_path / f"{i}-copy.png")
    (tmp_path / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "text": "x", "hint": f"{i}-copy.png"}) + "\n" for i in range(2)))  # fmt: skip
    data = DataConfig(path=str(tmp_path), resolution=48, center_crop=False, random_flip=True, caption_dropout=0.0)
    source = scan(data, progress=False, conditioning="hint")
    buckets, bucket_of = assign_buckets(source.records, data)
    dataset = TrainDataset(source, buckets, bucket_of, data, seed=0, conditioning=True)
    views = set()
    for epoch in range(6):
        for index in range(2):
            item = dataset[epoch, index]
            assert item["conditioning_pixels"].shape == item["pixels"].shape == (3, 48, 48)
            torch.testing.assert_close(item["conditioning_pixels"], (item["pixels"] + 1) / 2, atol=1e-6, rtol=0)
            views.add(dataset.choices(epoch, index)[0])
    assert {v.flip for v in views} == {False, True} and len({v.box for v in views}) > 2  # crops and flips were drawn


def test_rows_without_a_usable_conditioning_image_are_skipped_with_a_reason(controlled, tmp_path):
    from latentdiff.data.sources import DataConfig, scan

    folder = tmp_path / "data"
    shutil.copytree(controlled, folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[1]["conditioning_image"] = "edges/nowhere.png"
    (folder / "edges" / "2.png").write_bytes(b"not a picture")
    del rows[3]["conditioning_image"]
    Image.new("RGB", (64, 32)).save(folder / "edges" / "4.png")  # another aspect ratio
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = scan(DataConfig(path=str(folder)), progress=False, conditioning="conditioning_image")
    assert len(source.records) == 4
    reasons = {Path(key).name: reason for key, reason in source.skipped}
    assert "FileNotFoundError" in reasons["1.png"] and reasons["2.png"].startswith("conditioning image: ")
    assert "is empty" in reasons["3.png"] and "aspect ratio" in reasons["4.png"]

    # a datasets folder (save_to_disk) with an image column: the conditioning images come from the same rows
    images = [Image.open(folder / f"{i}.png") for i in (0, 5)]
    edges = [Image.open(folder / "edges" / f"{i}.png") for i in (0, 5)]
    table = datasets.Dataset.from_dict({"image": images, "text": ["a", "b"], "edges": edges},
                                       features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                                                   "edges": datasets.Image()}))  # fmt: skip
    table.save_to_disk(str(tmp_path / "saved"))
    saved = scan(DataConfig(path=str(tmp_path / "saved")), progress=False, conditioning="edges")
    assert len(saved.records) == 2 and not saved.skipped
    assert np.array_equal(np.asarray(saved.conditioning_image(saved.records[1])), np.asarray(edges[1].convert("RGB")))
    with pytest.raises(InvalidInputError, match=r"no conditioning image column 'hint' \(columns: image, text, edges\); "
                                                r"set controlnet.conditioning_column"):  # fmt: skip
        scan(DataConfig(path=str(tmp_path / "saved")), progress=False, conditioning="hint")


# -- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, message", [
    ("lora.enabled=true", "trains the ControlNet alone, with the model frozen; turn off lora.enabled"),
    ("model.train_text_encoder=true", "turn off model.train_text_encoder"),
    ("distill.enabled=true", "turn off distill.enabled"),
    ("validation.prompts=['a', 'b']", "one validation.control_images entry per validation prompt: 2 prompt(s), 0 control"),
    ("model.preset='tiny-sdxl'", "SD 1.x / 2.x models so far; model.preset 'tiny-sdxl' is SDXL"),
    ("controlnet.path='/nowhere/controlnet'", "controlnet.path: /nowhere/controlnet does not exist"),
])  # fmt: skip
def test_settings_are_one_line_before_any_work(controlled, tiny_dir, tmp_path, capsys, setting, message):
    args = [
        "train",
        "--config",
        str(CONFIG),
        "--set",
        f"data.path={controlled}",
        "--set",
        f"train.output_dir={tmp_path / 'out'}",
    ]
    if "preset" not in setting:
        args += ["--set", f"model.path={tiny_dir}"]
    for item in CONTROLNET + [setting]:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_data_without_the_conditioning_column_is_one_line(shapes, tiny_dir, tmp_path, capsys):
    args = ["train", "--config", str(CONFIG), "--set", f"data.path={shapes}", "--set", f"model.path={tiny_dir}",
            "--set", f"train.output_dir={tmp_path / 'out'}"]  # fmt: skip
    for item in CONTROLNET:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no conditioning image column 'conditioning_image' (columns: text, file_name)" in err[0], (
        err
    )
    assert "controlnet.conditioning_column" in err[0]
