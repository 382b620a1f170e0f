"""LoRA: kohya and peft layouts, exact deltas, several adapters, fuse / unload, the trainer's writer.

References: peft's own LoRA layers on the same U-Net / text encoder (the trainer's path), and
the closed form W + scale * (alpha / r) * B A for fused weights.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from latentdiff import InvalidInputError, LatentDiffusion
from latentdiff.cli import main
from latentdiff.generation.recipe import read_recipe
from latentdiff.models.lora import add_lora_adapter, parse_lora_spec, save_lora

_BASE: list = []


def _fresh():
    """A private copy of the tiny model (building one is slower than copying it)."""
    if not _BASE:
        _BASE.append(LatentDiffusion.from_preset("tiny", seed=0))
    return copy.deepcopy(_BASE[0])


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 77, 32, generator=g),
        torch.randint(0, 49000, (2, 77), generator=g),
    )


@torch.no_grad()
def _unet_out(unet, x, c):
    return unet(x, 10, c).sample


@pytest.fixture(scope="module")
def peft_models():
    """The tiny U-Net and text encoder with a peft LoRA adapter whose B is random (so it does something)."""
    from peft import get_peft_model_state_dict

    base = _fresh()
    unet, text = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    add_lora_adapter(unet, rank=4, alpha=8, targets=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"])
    add_lora_adapter(text, rank=2, alpha=2, targets=["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(1)
    for model in (unet, text):
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.1
    return base, unet, text, get_peft_model_state_dict(unet), get_peft_model_state_dict(text)


@pytest.fixture(scope="module")
def trained_lora(peft_models, tmp_path_factory):
    _, _, _, unet_state, _ = peft_models
    return save_lora(tmp_path_factory.mktemp("lora") / "trained.safetensors", unet_state=unet_state, rank=4, alpha=8,
                     metadata={"ss_output_name": "trained"})  # fmt: skip


def test_trainer_file_matches_peft(peft_models, tmp_path):
    base, unet, text, unet_state, text_state = peft_models
    path = save_lora(
        tmp_path / "both.safetensors", unet_state=unet_state, text_encoder_state=text_state, rank=4, alpha=8
    )
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert (
        meta["ss_network_module"] == "networks.lora"
        and meta["ss_network_dim"] == "4"
        and meta["ss_network_alpha"] == "8"
    )
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    # the text encoder was trained with alpha 2 at rank 2 (factor 1): rewrite it with its own alpha
    te_path = save_lora(tmp_path / "te.safetensors", text_encoder_state=text_state, rank=2, alpha=2)

    pipe = _fresh()
    report = pipe.load_lora(path, name="u")
    assert report.applied_keys == 3 * (len(unet_state) + len(text_state)) // 2 and report.unmatched_keys == []
    assert report.layers == {"unet": len(unet_state) // 2, "text_encoder": len(text_state) // 2}
    x, c, ids = _inputs()
    torch.testing.assert_close(_unet_out(pipe.unet, x, c), _unet_out(unet, x, c), rtol=0, atol=1e-5)
    pipe.unload_lora()
    pipe.load_lora(te_path)
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], text(ids)[0], rtol=0, atol=1e-5)
        assert not torch.allclose(pipe.text_encoder(ids)[0], base.text_encoder(ids)[0], atol=1e-3)


def test_scale_is_linear_and_zero_is_the_base_image(trained_lora):
    pipe, base = _fresh(), _fresh()
    pipe.load_lora(trained_lora, scale=0.0)
    kw = dict(seed=5, num_inference_steps=2, height=32, width=32, output_type="np")
    np.testing.assert_array_equal(pipe("a cat", **kw).images, base("a cat", **kw).images)
    # each adapted layer moves linearly with the scale (the network as a whole does not)
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        b = layer(h)
        pipe.set_lora_scale("trained", 1.0)
        full = layer(h) - b
        pipe.set_lora_scale("trained", -0.5)
        torch.testing.assert_close(layer(h) - b, -0.5 * full, rtol=1e-5, atol=1e-6)
    assert full.abs().max() > 1e-3


def _kohya(tmp_path, name, layers: dict, alpha=2.0):
    """A kohya-layout file: {kohya stem: (down, up)} with one alpha for all."""
    tensors = {}
    for stem, (down, up) in layers.items():
        tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = down, up
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(tmp_path / name))
    return tmp_path / name


def test_kohya_delta_changes_exactly_the_targeted_weights(tmp_path):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    # one linear layer by diffusers' name, the same U-Net's attention in the original layout's name
    # (input_blocks.3.1 = down_blocks.1.attentions.0), a 3x3 convolution (LoCon) and a text-encoder layer
    layers = {
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": (r(2, 32), r(64, 2)),
        "lora_unet_input_blocks_3_1_transformer_blocks_0_ff_net_2": (r(2, 256), r(64, 2)),
        "lora_unet_up_blocks_1_resnets_0_conv1": (r(2, 96, 3, 3), r(32, 2, 1, 1)),
        "lora_te_text_model_encoder_layers_1_mlp_fc1": (r(2, 32), r(64, 2)),
    }
    targets = {
        ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"): layers[next(iter(layers))],
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight"): list(layers.values())[1],
        ("unet", "up_blocks.1.resnets.0.conv1.weight"): list(layers.values())[2],
        ("text_encoder", "encoder.layers.1.mlp.fc1.weight"): list(layers.values())[3],
    }
    path = _kohya(tmp_path, "k.safetensors", layers, alpha=1.0)  # alpha / r = 0.5
    pipe, base = _fresh(), _fresh()
    report = pipe.load_lora(path, scale=0.8)
    assert report.applied_keys == 12 and report.unmatched_keys == [] and report.layers == {"unet": 3, "text_encoder": 1}
    x, c, _ = _inputs()
    hooked = _unet_out(pipe.unet, x, c)
    before = {p: {k: v.clone() for k, v in getattr(pipe, p).state_dict().items()} for p in ("unet", "text_encoder")}
    pipe.fuse_lora()
    for part in ("unet", "text_encoder"):
        for key, value in getattr(pipe, part).state_dict().items():
            if (part, key) in targets:
                down, up = targets[(part, key)]
                delta = 0.8 * 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(value.shape)
                torch.testing.assert_close(value, before[part][key] + delta, rtol=0, atol=1e-6)
            else:
                assert torch.equal(value, before[part][key]), key
    torch.testing.assert_close(_unet_out(pipe.unet, x, c), hooked, rtol=0, atol=1e-5)  # hook == fused
    assert pipe.weight_hash() != base.weight_hash()
    pipe.unload_lora()  # exact original weights back
    assert pipe.weight_hash() == base.weight_hash()
    assert torch.equal(_unet_out(pipe.unet, x, c), _unet_out(base.unet, x, c))


def test_lora_for_another_architecture_matches_nothing(tmp_path):
    g = torch.Generator().manual_seed(0)
    # the right names, SD 1.5's widths (320 / 768): nothing fits the tiny model
    wrong_shapes = {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": (torch.randn(4, 768, generator=g),
                                                                                          torch.randn(320, 4, generator=g))}  # fmt: skip
    sdxl = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (torch.randn(4, 32), torch.randn(32, 4))}
    pipe = _fresh()
    for name, layers in (("sd15.safetensors", wrong_shapes), ("sdxl.safetensors", sdxl)):
        with pytest.raises(InvalidInputError, match="matched nothing"):
            pipe.load_lora(_kohya(tmp_path, name, layers))
    assert pipe.loras.adapters == {}
    assert main(["generate", "x", "--preset", "tiny", "--lora", str(tmp_path / "sdxl.safetensors"), "-o",
                 str(tmp_path / "x.png")]) == 2  # fmt: skip


def test_partly_matching_lora_reports_its_leftovers(tmp_path, capsys):
    layers = {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": (torch.randn(2, 64), torch.randn(64, 2)),
              "lora_unet_no_such_layer": (torch.randn(2, 4), torch.randn(4, 2))}  # fmt: skip
    report = _fresh().load_lora(_kohya(tmp_path, "p.safetensors", layers))
    assert report.applied_keys == 3
    assert report.unmatched_keys == [
        "lora_unet_no_such_layer." + k for k in ("alpha", "lora_down.weight", "lora_up.weight")
    ]
    assert "3 keys applied to 1 layers" in capsys.readouterr().err


def test_several_adapters_add_up_and_unload_by_name(trained_lora, tmp_path):
    """Two adapters on one layer add their deltas, each at its own scale; unloading one leaves the other."""
    g = torch.Generator().manual_seed(4)
    other = {
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": (torch.randn(2, 64, generator=g) * 0.1,
                                                                             torch.randn(64, 2, generator=g) * 0.1)
    }  # fmt: skip
    other_path = _kohya(tmp_path, "other.safetensors", other)
    pick = lambda p: p.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q  # noqa: E731  both adapt it
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    base = _fresh()
    with torch.no_grad():
        b = pick(base)(h)
        deltas = []
        for path, scale in ((trained_lora, 1.0), (other_path, 0.5)):
            single = _fresh()
            single.load_lora(path, scale=scale)
            deltas.append(pick(single)(h) - b)
        pipe = _fresh()
        pipe.load_lora(trained_lora)
        pipe.load_lora(other_path, scale=0.5)
        torch.testing.assert_close(pick(pipe)(h) - b, deltas[0] + deltas[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInputError, match="already loaded"):
        pipe.load_lora(other_path, scale=0.5)
    pipe.unload_lora("trained")
    x, c, _ = _inputs()
    single.unload_lora()
    single.load_lora(other_path, scale=0.5)
    assert torch.equal(_unet_out(pipe.unet, x, c), _unet_out(single.unet, x, c))
    assert list(pipe.loras.adapters) == ["other"]


def test_peft_layout_files_load(peft_models, tmp_path):
    """The diffusers layout (unet.<module>.lora_A.weight), as diffusers' save_lora_weights writes it."""
    _, unet, _, unet_state, _ = peft_models
    save_file({f"unet.{k}": v.contiguous() for k, v in unet_state.items()}, str(tmp_path / "d.safetensors"),
              {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.r": 4})})  # fmt: skip
    pipe = _fresh()
    assert pipe.load_lora(tmp_path / "d.safetensors").applied_keys == len(unet_state)
    x, c, _ = _inputs()
    torch.testing.assert_close(_unet_out(pipe.unet, x, c), _unet_out(unet, x, c), rtol=0, atol=1e-5)


def test_cli_lora_is_recorded_and_reapplied(trained_lora, tmp_path, capsys):
    out = tmp_path / "l.png"
    args = ["generate", "a cat", "--preset", "tiny", "--steps", "2", "--size", "32x32", "--seed", "4", "--no-progress"]
    assert main([*args, "--lora", f"{trained_lora}:0.7", "-o", str(out)]) == 0
    recipe = read_recipe(out)
    (entry,) = recipe["loras"]
    assert entry["name"] == "trained" and entry["scale"] == 0.7 and len(entry["sha256"]) == 16
    assert main(["generate", "--from-png", str(out), "-o", str(tmp_path / "again.png"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err and err.count("LoRA 'trained': 132 keys applied") == 2  # reapplied for the remake
    a, b = (np.asarray(Image.open(p)) for p in (out, tmp_path / "again.png"))
    np.testing.assert_array_equal(a, b)


def test_batch_passes_loras_and_keeps_runs_apart(trained_lora, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    args = ["batch", str(prompts), "--out", str(tmp_path / "out"), "--preset", "tiny", "--steps", "2", "--size", "32x32",
            "--no-progress"]  # fmt: skip
    assert main([*args, "--lora", f"{trained_lora}:0.5"]) == 0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["loras"][0]["scale"] == 0.5
    assert read_recipe(next((tmp_path / "out").glob("*.png")))["loras"][0]["name"] == "trained"
    assert main(args) == 2  # the same folder without the LoRA is another run


def test_lora_after_fused_projections_is_refused(trained_lora):
    pipe = _fresh()
    pipe.unet.fuse_qkv_projections()  # what optimize() does; hooks on to_q would never run
    with pytest.raises(InvalidInputError, match="load LoRAs before optimizing"):
        pipe.load_lora(trained_lora)


def test_lora_spec_parsing():
    assert parse_lora_spec("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_spec("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora_spec(r"C:\loras\x.safetensors") == (r"C:\loras\x.safetensors", 1.0)
