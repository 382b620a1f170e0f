"""The fast path (pipe.optimize, --fast) against the default path, and the sync-free denoising loop.

Tolerance, from first principles: on CPU in float32 the fast path does the same arithmetic in
another order. A fused QKV projection is one GEMM over the same inner dimension K; channels_last
convolutions reorder the K = 9 * C_in sums. Each reordered sum of K terms moves by about
sqrt(K) * 2**-24 relative (K ~ 300-600 here: ~1.5e-6), and the tiny U-Net / VAE chain a few dozen
such ops over 3 steps, so the images (floats in [0, 1]) should agree to ~1e-5. We allow 1e-4: 40x
below one 8-bit level (3.9e-3), and a wrong fusion or layout gives errors of order 0.1.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from latentdiff import InvalidInputError, LatentDiffusion
from latentdiff.cli import main
from latentdiff.generation.samplers import SAMPLERS, make_scheduler
from latentdiff.generation.sampling import denoise, make_generators
from latentdiff.models.architectures import PRESETS

TOLERANCE = 1e-4
RUN = {"num_inference_steps": 3, "seed": [11, 12], "output_type": "np", "progress": False}
PROMPTS = ["a red apple", "a lighthouse at dusk"]


def fresh() -> LatentDiffusion:
    return LatentDiffusion.from_preset("tiny", seed=0)  # optimize() changes a pipeline in place


@pytest.mark.parametrize("scheduler", [None, "dpmpp_2m"])
def test_fused_channels_last_matches_default(tiny, scheduler):
    fast = fresh().optimize(compile=False)
    assert any(hasattr(m, "to_qkv") for m in fast.unet.modules())  # really fused
    expected = tiny(PROMPTS, scheduler=scheduler, **RUN).images
    got = fast(PROMPTS, scheduler=scheduler, **RUN).images
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    assert fast.weight_hash() == tiny.weight_hash()  # fused copies are not new weights


def test_compiled_fast_path_matches_default_and_compiles_once_per_shape(tiny):
    # backend="eager" runs dynamo's graph capture (what inductor would compile) without code
    # generation, which takes ~40 s per module on 2 CPU cores; fullgraph: no graph breaks.
    fast = fresh().optimize(backend="eager", fullgraph=True)
    expected = tiny(PROMPTS, **RUN).images
    got = fast(PROMPTS, **RUN).images
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    modules = sorted(r.module for r in fast.compile_report)
    assert modules == ["unet", "vae.decoder"], fast.compile_report
    assert all(r.seconds > 0 and r.compiled for r in fast.compile_report)

    fast(PROMPTS, **RUN)  # same shapes: nothing new to compile
    assert len(fast.compile_report) == 2
    fast(PROMPTS[0], **{**RUN, "seed": 3})  # batch 1: the U-Net and decoder shapes change
    assert sorted(r.module for r in fast.compile_report[2:]) == ["unet", "vae.decoder"]


@pytest.mark.skipif(
    os.environ.get("LATENTDIFF_TEST_INDUCTOR") != "1",
    reason="inductor code generation takes ~40 s per module on 2 CPU cores; set LATENTDIFF_TEST_INDUCTOR=1",
)
def test_inductor_compiled_fast_path_matches_default(tiny):
    fast = fresh().optimize()
    np.testing.assert_allclose(fast(PROMPTS, **RUN).images, tiny(PROMPTS, **RUN).images, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_optimize_keeps_the_weight_hash_of_sdxl_models(preset):
    """Both text encoders (or the refiner's second alone) are part of the weights that the hash names."""
    pipe = LatentDiffusion.from_preset(preset, seed=0)
    before = pipe.weight_hash()
    pipe.optimize(compile=False)
    assert any(hasattr(m, "to_qkv") for m in pipe.unet.modules())
    assert pipe.weight_hash() == before
    with torch.no_grad():
        pipe.text_encoder_2.text_model.final_layer_norm.bias.add_(1)  # a change in the second encoder is seen
    assert pipe.weight_hash() != before


def test_optimize_twice_and_bad_options():
    pipe = fresh()
    pipe.optimize(compile=False)
    assert pipe.optimize(compile=False) is pipe  # same options: nothing to do
    with pytest.raises(InvalidInputError, match="already optimized"):
        pipe.optimize(compile=False, fuse_qkv=False)
    with pytest.raises(InvalidInputError, match="backend"):
        fresh().optimize(backend="no-such-backend")
    with pytest.raises(InvalidInputError, match="dtype"):
        fresh().optimize(dtype="float8")


def test_cpu_keeps_float32_unless_asked():
    assert fresh().optimize(compile=False).dtype == torch.float32
    assert fresh().optimize(compile=False, dtype="bfloat16").dtype == torch.bfloat16


# -- no host-device sync inside the loop ---------------------------------------------------------
#
# On the "meta" device tensors have shapes but no values, so anything that would read a device
# value on the host (.item(), int(t), `t >= 0`, nonzero(), indexing a host table with a device
# index) raises. Running the whole loop there (U-Net, CFG, rescale, scheduler steps, callback)
# shows that no step waits for the GPU.

# ddpm searches its device timestep table each step and lcm reads a device value (diffusers'
# code); the others are sync-free.
SYNC_FREE = [name for name in SAMPLERS if name not in ("ddpm", "lcm")]


def _meta_scheduler(name):
    sched = make_scheduler(name, PRESETS["tiny"].scheduler)
    try:
        sched.set_timesteps(4, device="meta")  # every table diffusers puts on the device is there
    except NotImplementedError:
        # these (Euler family, LMS) build their tables with host arithmetic, which meta cannot do;
        # they keep sigmas on the host and only the timesteps on the device: do the same
        sched.set_timesteps(4)
        sched.timesteps = sched.timesteps.to("meta")
    host = make_scheduler(name, PRESETS["tiny"].scheduler)
    host.set_timesteps(4)
    return sched, host.timesteps


@pytest.fixture(scope="module")
def meta_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**PRESETS["tiny"].unet).eval()


@pytest.mark.parametrize("name", SYNC_FREE)
def test_denoising_loop_never_reads_the_device(meta_unet, name):
    sched, timesteps = _meta_scheduler(name)
    latents = torch.zeros(2, 4, 8, 8, device="meta")
    cond = torch.zeros(2, 77, 32, device="meta")
    seen = []
    out = denoise(
        meta_unet, sched, latents, cond, cond, guidance_scale=7.5, guidance_rescale=0.5, eta=0.5,
        generators=make_generators([1, 2]), timesteps=timesteps, callback=lambda i, t, z: seen.append(t),
    )  # fmt: skip
    assert out.device.type == "meta" and out.shape == latents.shape
    assert seen == [int(t) for t in timesteps]


def test_the_meta_check_catches_a_sync():
    # diffusers' own loop passes the device timestep to scheduler.step; DDIM then indexes its
    # host table with it and compares it with 0: a sync, which the meta device reports.
    sched, _ = _meta_scheduler("ddim")
    z = torch.zeros(1, 4, 8, 8, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        sched.step(z, sched.timesteps[0], z)


def test_cli_fast_flag(tmp_path, monkeypatch, capsys, tiny):
    import torch._dynamo
    from PIL import Image

    # Dynamo's official off switch (TORCH_COMPILE_DISABLE): the CLI path runs, without 40 s of codegen,
    # and the report says that nothing was compiled.
    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    out = tmp_path / "fast.png"
    assert main(["generate", "a red apple", "--preset", "tiny", "--steps", "2", "--seed", "5", "--fast",
                 "--no-progress", "-o", str(out)]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "unet not compiled" in err and "vae.decoder not compiled" in err and "compiled unet" not in err
    expected = tiny("a red apple", num_inference_steps=2, seed=5, progress=False).images[0]
    diff = np.abs(np.asarray(Image.open(out), dtype=int) - np.asarray(expected, dtype=int))
    assert diff.max() <= 1


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_benchmark_script_runs_on_tiny(preset, tmp_path, capsys):
    """Smoke test of benchmarks/inference.py at the smallest settings (no timing asserted)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "inference.py"
    spec = importlib.util.spec_from_file_location("bench_inference", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "inference.json"
    bench.main(["--preset", preset, "--steps", "1", "--runs", "1", "--warmup", "0", "--batch", "2",
                "--unet-runs", "1", "--no-compile", "--json", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"diffusers eager", "latentdiff default", "latentdiff fast"}
    # fp32 on CPU: the same image to ~1e-6 (129 dB measured); 100 dB is an rms error of 1e-5, the
    # fast path's own tolerance above, while a wrong fusion or layout gives errors of order 0.1 (20 dB)
    assert result["psnr_fast_vs_diffusers_eager_db"] >= 100
    assert result["unet_tflop_per_cfg_step"] > 0
    assert "PSNR of latentdiff fast vs diffusers eager" in capsys.readouterr().out


def test_training_benchmark_script_runs_on_tiny_sdxl(tmp_path, capsys):
    """Smoke test of benchmarks/training.py with an SDXL preset (pooled embeddings and time ids reach the
    plain loop's U-Net and the FLOP count); no timing asserted."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_training", Path(__file__).parents[1] / "benchmarks" / "training.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # (it puts benchmarks/ on sys.path for its shared helpers in inference.py)
    out = tmp_path / "training.json"
    bench.main(["--preset", "tiny-sdxl", "--size", "64", "--batch", "1", "--steps", "1", "--warmup", "0", "--no-lora",
                "--json", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["rows"]] == [bench.PLAIN, bench.OURS]
    assert all(r["images_per_s"] > 0 for r in result["rows"]) and result["gflop_per_image"] > 0
