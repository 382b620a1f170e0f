"""Single-file checkpoints: export, load, architecture detection, key accounting, safe loading.

The independent reference for our key layout is diffusers' own single-file loader (its
``single_file_utils`` conversion), given a local config folder so that it stays offline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from latentdiff import InvalidInputError, LatentDiffusion
from latentdiff.cli import main
from latentdiff.models.single_file import detect_architecture, original_state_dict

STEPS = 2


def _image(pipe, seed=3, **kw):
    return pipe("a red apple", seed=seed, num_inference_steps=STEPS, height=32, width=32, output_type="np", **kw).images


def _states(pipe):
    return {n: getattr(pipe, n).state_dict() for n in ("unet", "vae", "text_encoder")}


def _assert_same_weights(a, b):
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = a[name], b[name]
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k], sb[k].to(sa[k].dtype)), f"{name}.{k}"


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory):
    return tiny.save_single_file(tmp_path_factory.mktemp("single") / "tiny.safetensors")


@pytest.fixture(scope="module")
def tiny_v(tmp_path_factory):
    """A tiny SD 2.x-shaped model: OpenCLIP text tower (exact GELU), linear projections, v-prediction."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    base = LatentDiffusion.from_preset("tiny", seed=1)
    config = base.text_encoder.config
    config.hidden_act = "gelu"
    torch.manual_seed(5)
    text_encoder = CLIPTextModel(config).eval()
    unet = UNet2DConditionModel(**{**dict(base.unet.config), "use_linear_projection": True}).eval()
    pipe = LatentDiffusion(unet=unet, vae=base.vae, text_encoder=text_encoder, tokenizer=base.tokenizer,
                           scheduler_config={**base.scheduler_config, "prediction_type": "v_prediction"},
                           source={"preset": "tiny-v"})  # fmt: skip
    folder = pipe.save_pretrained(tmp_path_factory.mktemp("tiny_v") / "folder")
    return pipe, folder


def test_exported_file_gives_the_folders_image(tiny, tiny_file, no_network):
    loaded = LatentDiffusion.from_single_file(tiny_file)
    _assert_same_weights(_states(tiny), _states(loaded))
    np.testing.assert_array_equal(_image(loaded), _image(tiny))
    assert loaded.scheduler_config == tiny.scheduler_config


def test_diffusers_single_file_loader_reads_our_layout(tiny, tiny_file, tiny_dir, no_network):
    from diffusers import StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_single_file(str(tiny_file), config=str(tiny_dir), local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    _assert_same_weights(_states(tiny), _states(theirs))
    ours = LatentDiffusion.from_single_file(tiny_file)
    out = theirs("a red apple", num_inference_steps=STEPS, generator=[torch.Generator("cpu").manual_seed(3)],
                 height=32, width=32, output_type="np").images  # fmt: skip
    np.testing.assert_allclose(_image(ours), out, atol=1e-4)


def test_openclip_layout_round_trips_through_diffusers(tiny_v, tmp_path, no_network):
    from diffusers import StableDiffusionPipeline

    pipe, folder = tiny_v
    path = pipe.save_single_file(tmp_path / "v.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    # the v-prediction marker where ComfyUI reads one: a "v_pred" key of the state dict itself
    assert "v_pred" in keys and "ztsnr" not in keys
    theirs = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    _assert_same_weights(_states(pipe), _states(theirs))
    ours = LatentDiffusion.from_single_file(path)
    _assert_same_weights(_states(pipe), _states(ours))
    assert ours.scheduler_config["prediction_type"] == "v_prediction"


def _meta_checkpoint(preset: str) -> dict:
    """Original-layout keys with the real shapes of a preset, on the meta device (no memory)."""
    from latentdiff.models.architectures import build_components

    return original_state_dict(build_components(preset, empty=True))


@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_detection_from_keys_and_shapes(preset):
    tensors = _meta_checkpoint(preset)
    arch = detect_architecture(tensors, {})
    if preset == "sd15":
        assert arch.name == "sd1" and arch.text_encoder["hidden_act"] == "quick_gelu"
        assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in tensors)
        return
    # 2.x base and 768-v files have the same shapes: without other evidence the base is assumed ...
    assert arch.name == "sd2" and arch.scheduler["prediction_type"] == "epsilon" and arch.unet["sample_size"] == 64
    # ... a v_pred marker (a key, or a metadata entry) says v-prediction ...
    assert detect_architecture({**tensors, "v_pred": torch.tensor(1)}, {}).name == "sd2-v"
    assert detect_architecture(tensors, {"v_pred": "1"}).scheduler["prediction_type"] == "v_prediction"
    # ... and so do the released v weights' widely spread norm biases (the heuristic ComfyUI uses)
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    spread = torch.linspace(-0.3, 0.3, tensors[key].shape[0])
    assert detect_architecture({**tensors, key: spread}, {}).name == "sd2-v"
    assert detect_architecture({**tensors, key: spread * 0.1}, {}).name == "sd2"
    assert detect_architecture(tensors, {}, variant="sd2-v").unet["sample_size"] == 96


@pytest.mark.parametrize("preset", ["sd15", "sd21", "sdxl", "sdxl-refiner"])
def test_release_files_have_every_key_accounted_for(preset):
    """Release files also hold EMA and schedule buffers, CLIP's position ids, and (SD 2.x) OpenCLIP's
    24th layer and contrastive head: known and unused, not unexpected. Shapes on the meta device."""
    from latentdiff.models.architectures import build_components
    from latentdiff.models.single_file import account, model_rules, networks

    tensors = _meta_checkpoint(preset)
    arch = detect_architecture(tensors, {})
    parts = build_components(arch, empty=True)
    extra = ["model_ema.decay", "model_ema.num_updates", "alphas_cumprod", "betas", "posterior_variance"]
    extra += {"sd15": ["cond_stage_model.transformer.text_model.embeddings.position_ids"],
              "sd21": ["cond_stage_model.model.transformer.resblocks.23.ln_1.weight",
                       "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"],
              "sdxl": ["conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                       "conditioner.embedders.1.model.logit_scale"],
              "sdxl-refiner": ["conditioner.embedders.0.model.logit_scale"]}[preset]  # fmt: skip
    shapes = {(p, k): tuple(v.shape) for p, m in networks(parts).items() for k, v in m.state_dict().items()}
    first = parts["text_encoder"] or parts["text_encoder_2"]
    report, _ = account({**tensors, **{k: torch.zeros(1) for k in extra}}, model_rules(parts), shapes,
                        first.config.num_hidden_layers)  # fmt: skip
    assert report.clean, report.lines()
    assert report.loaded == len(tensors) and sum(report.ignored.values()) == len(extra)
    if preset.startswith("sdxl"):
        assert arch.name == preset
        assert any(k.startswith("model.diffusion_model.label_emb.0.0.") for k in tensors)
        bigg = "conditioner.embedders.1.model." if preset == "sdxl" else "conditioner.embedders.0.model."
        assert tensors[bigg + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3 * 1280, 1280)
        assert bigg + "text_projection" in tensors


def _edited(path: Path, out: Path, drop: str | None, add: str) -> Path:
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    if drop is not None:
        del tensors[drop]
    tensors[add] = torch.zeros(3)
    save_file(tensors, str(out), metadata)
    return out


def test_missing_and_unexpected_keys(tmp_path, capsys):
    drop = "model.diffusion_model.middle_block.1.proj_out.bias"
    add = "model.diffusion_model.some_new_layer.weight"
    tiny = LatentDiffusion.from_preset("tiny", seed=7)  # not the weights a fresh model starts from
    bad = _edited(tiny.save_single_file(tmp_path / "t.safetensors"), tmp_path / "bad.safetensors", drop, add)
    with pytest.raises(InvalidInputError) as e:
        LatentDiffusion.from_single_file(bad)
    assert drop in str(e.value) and add in str(e.value) and "strict=False" in str(e.value)
    loaded = LatentDiffusion.from_single_file(bad, strict=False)
    err = capsys.readouterr().err
    assert f"1 missing: {drop}" in err and f"1 unexpected: {add}" in err
    # everything else was loaded: only the dropped tensor differs from the original
    ours, theirs = _states(tiny)["unet"], _states(loaded)["unet"]
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == ["mid_block.attentions.0.proj_out.bias"]
    # the command line says the same in one line, and converts with --no-strict
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 2
    assert drop in capsys.readouterr().err
    assert main(["convert", str(bad), str(tmp_path / "out"), "--no-strict"]) == 0
    # an extra key alone: every tensor comes from the file
    extra = _edited(tmp_path / "t.safetensors", tmp_path / "extra.safetensors", None, add)
    loaded = LatentDiffusion.from_single_file(extra, strict=False)
    assert f"1 unexpected: {add}" in capsys.readouterr().err
    _assert_same_weights(_states(tiny), _states(loaded))


def test_convert_round_trips_are_identical(tiny, tiny_dir, tmp_path, capsys):
    file = tmp_path / "model.safetensors"
    assert main(["convert", str(tiny_dir), str(file)]) == 0
    assert main(["convert", str(file), str(tmp_path / "folder")]) == 0
    _assert_same_weights(_states(tiny), _states(LatentDiffusion.from_pretrained(tmp_path / "folder")))
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "again.safetensors")]) == 0
    with safe_open(str(file), "pt") as a, safe_open(str(tmp_path / "again.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    # a .ckpt out is a plain pickle that loads with weights_only=True, and back to the same weights
    assert main(["convert", str(file), str(tmp_path / "model.ckpt")]) == 0
    assert "state_dict" in torch.load(tmp_path / "model.ckpt", weights_only=True)
    _assert_same_weights(_states(tiny), _states(LatentDiffusion.from_single_file(tmp_path / "model.ckpt")))


def test_generate_and_info_take_a_single_file(tiny_file, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", "an apple", "--model", str(tiny_file), "--steps", "2", "--seed", "1", "--size", "32x32",
                 "-o", str(out), "--no-progress"]) == 0  # fmt: skip
    assert main(["info", str(tiny_file)]) == 0
    assert "weight hash" in capsys.readouterr().out


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "x": Payload()}, evil)
    with pytest.raises(InvalidInputError, match=r"refused to load .*evil\.ckpt.*run code \(it names exec\)"):
        LatentDiffusion.from_single_file(evil)
    assert not marker.exists()
    assert main(["convert", str(evil), str(tmp_path / "out")]) == 2 and not marker.exists()
    # the file is a live one: an unrestricted load would have run the payload
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "ran"


def test_truncated_safetensors_names_the_file(tiny_file, tmp_path, capsys):
    cut = tmp_path / "cut.safetensors"
    data = Path(tiny_file).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match=r"cut\.safetensors is not a readable safetensors file.*truncated"):
        LatentDiffusion.from_single_file(cut)
    assert main(["generate", "x", "--model", str(cut), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cut.safetensors" in err[0]


def test_wrong_files_say_what_they_are(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, str(lora))
    with pytest.raises(InvalidInputError, match="LoRA"):
        LatentDiffusion.from_single_file(lora)
    with pytest.raises(InvalidInputError, match="unknown variant 'sd3'"):
        LatentDiffusion.from_single_file(lora, variant="sd3")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(InvalidInputError, match="unknown weights format '.txt'"):
        LatentDiffusion.from_single_file(tmp_path / "x.txt")
