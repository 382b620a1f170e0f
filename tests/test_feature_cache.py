"""U-Net feature caching (DeepCache): off and at interval 1 it changes nothing; at interval N the deep
blocks run once every N U-Net calls and only the shallow path runs in between, on SD-style and
SDXL-style U-Nets alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdiff import InvalidInputError, call_kwargs
from latentdiff.generation.feature_cache import FeatureCache, branch_count, deep_modules

KW = {"num_inference_steps": 5, "guidance_scale": 3.0, "seed": [1, 2], "num_images_per_prompt": 2,
      "scheduler": "ddim", "output_type": "np", "progress": False}  # fmt: skip


def count_calls(unet) -> dict[str, list]:
    """How often conv_in and every resnet computed, counted by forward hooks on conv_in and on each
    resnet's first convolution (a skipped module is still called, but runs none of its children)."""
    counts: dict[str, list] = {}
    names = [n for n, m in unet.named_modules() if n == "conv_in" or n.endswith(tuple(f"resnets.{i}" for i in range(4)))]
    for name in names:
        counts[name] = []
        inner = unet.get_submodule(name if name == "conv_in" else f"{name}.conv1")
        inner.register_forward_hook(lambda m, a, o, name=name: counts[name].append(1))
    return counts


def test_off_and_interval_one_change_nothing(tiny):
    plain = tiny("a cat", **KW)
    assert "cache_interval" not in plain.params[0]  # recipes of uncached images are as before
    one = tiny("a cat", cache_interval=1, **KW)
    assert np.array_equal(plain.images, one.images)  # bit for bit
    assert "forward" not in tiny.unet.__dict__ and "forward" not in tiny.unet.mid_block.__dict__  # all put back


def test_deep_blocks_run_every_n_calls_and_the_recipe_remakes_the_image():
    from latentdiff import LatentDiffusion

    pipe = LatentDiffusion.from_preset("tiny")
    counts = count_calls(pipe.unet)
    result = pipe("a cat", cache_interval=2, **KW)
    calls = {name: len(c) for name, c in counts.items()}
    assert calls["conv_in"] == 5 and calls["mid_block.resnets.0"] == 3  # full calls at steps 0, 2, 4
    last = f"up_blocks.{len(pipe.unet.up_blocks) - 1}.resnets.{len(pipe.unet.up_blocks[-1].resnets) - 1}"
    # branch 0, the default: between full calls only conv_in and the last up block's last layer run
    assert {n for n, c in calls.items() if c == 5} == {"conv_in", last}
    assert all(c == 3 for n, c in calls.items() if n not in ("conv_in", last))
    uncached = pipe("a cat", **KW).images
    assert 1e-4 < np.abs(result.images - uncached).max() and np.isfinite(result.images).all()
    params = result.params[1]
    assert (params["cache_interval"], params["cache_branch"]) == (2, 0)
    again = pipe(**call_kwargs(params), output_type="np", progress=False).images[0]
    np.testing.assert_allclose(again, result.images[1], atol=1e-5)


def test_deeper_branches_keep_more_of_the_path_fresh(tiny):
    unet = tiny.unet
    skipped = [{id(p) for m in deep_modules(unet, b) for p in m.parameters()} for b in range(branch_count(unet))]
    assert all(a > b for a, b in zip(skipped, skipped[1:]))  # each branch skips strictly less than the one before
    assert {id(p) for p in unet.mid_block.parameters()} <= skipped[-1]  # the mid block is always deep
    with pytest.raises(InvalidInputError, match=f"cache_branch must be from 0 to {branch_count(unet) - 1}"):
        tiny("x", cache_interval=2, cache_branch=branch_count(unet), num_inference_steps=1, output_type="latent")
    with pytest.raises(InvalidInputError, match="cache_branch needs cache_interval"):
        tiny("x", cache_branch=1, num_inference_steps=1, output_type="latent")


def test_sdxl_style_unet():
    """The same glue on an SDXL-layout U-Net (text_time micro-conditioning, a first block without attention)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
    ).eval()  # fmt: skip
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    extra = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}

    def run(t):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=text, added_cond_kwargs=extra).sample

    plain = [run(t) for t in (900, 700, 500)]
    with FeatureCache(unet, interval=1):
        assert all(torch.equal(a, run(t)) for a, t in zip(plain, (900, 700, 500)))
    counts = count_calls(unet)
    with FeatureCache(unet, interval=3, branch=1) as cache:
        cached = [run(t) for t in (900, 700, 500)]
    assert torch.equal(cached[0], plain[0]) and not torch.equal(cached[1], plain[1])
    assert cache.calls == 3 and cache.full_calls == 1
    fresh = {n for n, c in counts.items() if len(c) == 3}  # branch 1: the last two layers of the last up block
    assert fresh == {"conv_in", "up_blocks.1.resnets.1", "up_blocks.1.resnets.2", "down_blocks.0.resnets.0"}


def test_a_cached_call_is_the_shallow_path_on_the_kept_feature(tiny):
    """What branch 0 keeps, in closed form (DeepCache's Eq. 3-4 on the tiny layout, whose last up block is
    an UpBlock2D of two resnets): a cached call at (x2, t2) is conv_out(act(norm(R1(cat[h, conv_in(x2)],
    emb(t2))))), where h is the output of that block's first resnet R0 at the last full call (x1, t1) and
    conv_in(x2) is the first skip connection. Built here from diffusers' own modules, not FeatureCache."""
    unet = tiny.unet
    up = unet.up_blocks[-1]
    assert type(up).__name__ == "UpBlock2D" and len(up.resnets) == 2 and up.upsamplers is None
    generator = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    text1, text2 = torch.randn(2, 77, 32, generator=generator), torch.randn(2, 77, 32, generator=generator)
    t1, t2 = torch.tensor([801, 801]), torch.tensor([601, 601])
    kept = {}
    hook = up.resnets[0].register_forward_hook(lambda module, args, output: kept.__setitem__("h", output))
    with torch.no_grad():
        unet(x1, t1, text1)
        hook.remove()
        emb = unet.time_embedding(unet.time_proj(t2).to(x2.dtype))  # (B, 4 * C0)
        shallow = up.resnets[1](torch.cat([kept["h"], unet.conv_in(x2)], dim=1), emb)
        expected = unet.conv_out(unet.conv_act(unet.conv_norm_out(shallow)))
        with FeatureCache(unet, interval=2, branch=0) as cache:
            first = unet(x1, t1, text1).sample
            second = unet(x2, t2, text2).sample
        plain1, plain2 = unet(x1, t1, text1).sample, unet(x2, t2, text2).sample
    assert cache.full_calls == 1 and torch.equal(first, plain1)
    torch.testing.assert_close(second, expected, atol=1e-6, rtol=0)
    assert (second - plain2).abs().max() > 1e-3  # the deep path really was not recomputed


def test_the_cache_equals_the_deepcache_package_on_diffusers_pipeline(tiny):
    """The deepcache package (Ma et al.'s own helper) wrapped around diffusers' StableDiffusionPipeline
    on the same weights makes the same cached images, bit for bit, at several intervals. (With a
    sampler of one U-Net call per step, DDIM here: ours counts U-Net calls, the package counts
    positions in the timestep list, which differ where a sampler calls the U-Net twice at a step.)"""
    deepcache = pytest.importorskip("DeepCache", reason="pip install DeepCache (the test extra has it)")
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    ref = StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
                                  scheduler=DDIMScheduler.from_config(tiny.scheduler_config), safety_checker=None,
                                  feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    helper = deepcache.DeepCacheSDHelper(pipe=ref)
    prompts = ["a cat", "a red circle"]
    for interval in (2, 3):
        ours = tiny(prompts, num_inference_steps=7, guidance_scale=4.0, seed=[0, 1], cache_interval=interval,
                    scheduler="ddim", output_type="np", progress=False).images  # fmt: skip
        helper.set_params(cache_interval=interval, cache_branch_id=0)
        helper.enable()
        try:
            theirs = ref(prompts, num_inference_steps=7, guidance_scale=4.0, output_type="np",
                         generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images  # fmt: skip
        finally:
            helper.disable()
        assert np.array_equal(np.asarray(ours), theirs), interval
        plain = tiny(prompts, num_inference_steps=7, guidance_scale=4.0, seed=[0, 1], scheduler="ddim", output_type="np",
                     progress=False)  # fmt: skip
        assert not np.array_equal(plain.images, ours)  # the cache changed the images (so equality says something)
