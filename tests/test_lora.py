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


# -- other tools' layouts, in and out ----------------------------------------------------------------


def _random_pairs(pipe, part: str, names, rank=2, seed=7):
    """{module path: (down, up)} with random factors for linear / conv modules of one part."""
    g = torch.Generator().manual_seed(seed)
    model = getattr(pipe, part)
    out = {}
    for name in names:
        w = model.get_submodule(name).weight
        down_shape = (rank, *w.shape[1:]) if w.ndim == 2 else (rank, w.shape[1], *w.shape[2:])
        up_shape = (w.shape[0], rank) if w.ndim == 2 else (w.shape[0], rank, 1, 1)
        out[name] = (torch.randn(down_shape, generator=g) * 0.2, torch.randn(up_shape, generator=g) * 0.2)
    return out


def _diffusers_with(tiny_dir, lora_file):
    """diffusers' own pipeline on the same weights, with the LoRA loaded by its own load_lora_weights."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.load_lora_weights(str(lora_file))
    return pipe


def _same_outputs(ours, theirs, atol=1e-5):
    x, c, ids = _inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(ours.unet(x, 10, c).sample, theirs.unet(x, 10, c).sample, rtol=0, atol=atol)
        torch.testing.assert_close(ours.text_encoder(ids)[0], theirs.text_encoder(ids)[0], rtol=0, atol=atol)


def test_peft_writer_output_loads_in_diffusers_and_here(peft_models, tiny_dir, tmp_path, no_network):
    """layout="peft" writes what diffusers' load_lora_weights reads (network blocked), with the
    text encoder spelled as hub LoRAs spell it (text_encoder.text_model.encoder.layers.N...)."""
    _, unet, text, unet_state, text_state = peft_models
    # one rank and alpha for both parts: retrain the text adapter's factor as the U-Net's (alpha 8 / rank 4)
    path = save_lora(tmp_path / "p.safetensors", unet_state=unet_state, text_encoder_state=text_state, rank=4, alpha=8,
                     layout="peft", metadata={"note": "x"})  # fmt: skip
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight" in keys
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 8 and meta["note"] == "x"
    theirs = _diffusers_with(tiny_dir, path)
    ours = _fresh()
    report = ours.load_lora(path)
    assert report.unmatched_keys == [] and report.applied_keys == len(keys)  # every text-encoder key too
    assert report.layers["text_encoder"] == len(text_state) // 2
    _same_outputs(ours, theirs)
    x, c, _ = _inputs(3)
    with torch.no_grad():  # and both equal the peft model the state came from (the U-Net part: same alpha)
        torch.testing.assert_close(ours.unet(x, 10, c).sample, unet(x, 10, c).sample, rtol=0, atol=1e-5)


def test_hub_era_text_encoder_keys_apply(tmp_path, tiny_dir, no_network):
    """transformers 4.x names the text encoder's modules text_model.encoder...; all of them must apply."""
    base = _fresh()
    te = _random_pairs(base, "text_encoder", ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"])
    unet = _random_pairs(base, "unet", ["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"])
    tensors = {}
    for name, (down, up) in te.items():
        tensors[f"text_encoder.text_model.{name}.lora_A.weight"], tensors[f"text_encoder.text_model.{name}.lora_B.weight"] = down, up
    for name, (down, up) in unet.items():
        tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"] = down, up
    save_file(tensors, str(tmp_path / "hub.safetensors"))
    report = base.load_lora(tmp_path / "hub.safetensors")
    assert report.applied_keys == 6 and report.unmatched_keys == [] and report.layers == {"unet": 1, "text_encoder": 2}
    _same_outputs(base, _diffusers_with(tiny_dir, tmp_path / "hub.safetensors"))


def test_pre_peft_diffusers_layouts_load_as_diffusers_loads_them(tmp_path, tiny_dir, no_network):
    """Attention processors (…processor.to_q_lora.down.weight), LoRA-compatible layers (…lora.down.weight)
    and the text encoder's to_q_lora / lora_linear_layer keys: the same deltas as diffusers applies."""
    base = _fresh()
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    unet = _random_pairs(base, "unet", [f"{attn}.to_q", f"{attn}.to_k", f"{attn}.to_v", f"{attn}.to_out.0",
                                        "mid_block.resnets.0.conv1", "up_blocks.0.attentions.0.proj_in"])  # fmt: skip
    te = _random_pairs(base, "text_encoder", ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.out_proj",
                                              "encoder.layers.1.self_attn.v_proj"])  # fmt: skip
    tensors = {}

    def put(stem, down, up, old=True):
        tensors[f"{stem}.down.weight"], tensors[f"{stem}.up.weight"] = down, up

    for proj, name in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
        put(f"unet.{attn}.processor.{proj}_lora", *unet[f"{attn}.{name}"])
    put("unet.mid_block.resnets.0.conv1.lora", *unet["mid_block.resnets.0.conv1"])
    put("unet.up_blocks.0.attentions.0.proj_in.lora", *unet["up_blocks.0.attentions.0.proj_in"])
    put("text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora", *te["encoder.layers.0.self_attn.q_proj"])
    put("text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora", *te["encoder.layers.0.self_attn.out_proj"])
    put("text_encoder.text_model.encoder.layers.1.self_attn.v_proj.lora_linear_layer", *te["encoder.layers.1.self_attn.v_proj"])
    save_file(tensors, str(tmp_path / "old.safetensors"))
    report = base.load_lora(tmp_path / "old.safetensors")
    assert report.unmatched_keys == [] and report.layers == {"unet": 6, "text_encoder": 3}
    _same_outputs(base, _diffusers_with(tiny_dir, tmp_path / "old.safetensors"))


def test_files_in_no_known_layout_say_so(tmp_path):
    save_file({"hada_w1_a": torch.zeros(2, 2), "something.else": torch.zeros(1)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(InvalidInputError, match="in no layout latentdiff reads.*LoHa"):
        _fresh().load_lora(tmp_path / "loha.safetensors")


def test_damaged_lora_values_are_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    stem = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    down, up = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    nan = down.clone()
    nan[0, 0] = float("nan")
    save_file({f"{stem}.lora_down.weight": nan, f"{stem}.lora_up.weight": up}, str(tmp_path / "nan.safetensors"))
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor([1.0, 2.0])},
              str(tmp_path / "vector.safetensors"))  # fmt: skip
    pipe = _fresh()
    with pytest.raises(InvalidInputError, match="lora_down.weight holds NaN or infinite values"):
        pipe.load_lora(tmp_path / "nan.safetensors")
    with pytest.raises(InvalidInputError, match=r"\.alpha holds 2 values; alpha is one number"):
        pipe.load_lora(tmp_path / "vector.safetensors")
    for scale in (-1e308, float("nan"), 101):
        with pytest.raises(InvalidInputError, match="LoRA scale must be a finite number from -100 to 100"):
            pipe.load_lora(_kohya(tmp_path, "ok.safetensors", {stem: (down, up)}), scale=scale)
    assert pipe.loras.adapters == {}


def test_a_lora_that_overflows_is_an_error_not_a_black_image(tmp_path, capsys):
    """Finite but enormous weights: the result is inf / NaN. No PNG, one line naming the LoRA."""
    stem = "lora_unet_mid_block_resnets_0_conv1"  # a 3x3 convolution whose output reaches a group norm
    path = _kohya(tmp_path, "huge.safetensors", {stem: (torch.full((2, 64, 3, 3), 1e18), torch.full((64, 2, 1, 1), 1e18))})
    out = tmp_path / "x.png"
    code = main(["generate", "x", "--preset", "tiny", "--steps", "2", "--lora", f"{path}:50", "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists() and not list(tmp_path.glob("*.png"))
    assert err[-1].startswith("latentdiff: error: ") and "NaN or infinite" in err[-1] and "LoRA 'huge' at scale 50" in err[-1]
