"""Smoke tests of the CPU benchmark scripts (no timing asserted: speed is measured, not tested)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_layout_measures_four_variants_of_the_same_function(tmp_path):
    out = tmp_path / "layout.json"
    load("cpu_layout").main(["--model", "", "--preset", "tiny", "--runs", "1", "--batch", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["batches"]["1"]
    assert set(rows) == {"as loaded", "channels_last", "fused QKV", "channels_last + fused QKV"}
    # a memory layout or a fused projection changes the float summation order, never the function
    assert all(r["max_abs_diff"] < 1e-4 for r in rows.values())
    assert rows["as loaded"]["unet_vs_as_loaded"] == 1.0


def test_startup_import_profile_names_what_a_command_imports():
    profile = dict(load("startup").import_profile([sys.executable, "-c", "import json, fractions"], top=50))
    assert "json" in profile and "fractions" in profile
    assert "json.decoder" not in profile  # nested imports count towards their top-level package
    assert all(seconds >= 0 for seconds in profile.values())


def test_feature_cache_benchmark_compares_against_no_cache(tmp_path):
    out = tmp_path / "cache.json"
    load("feature_cache").main(["--model", "", "--preset", "tiny", "--intervals", "1", "2", "--steps", "3",
                                "--runs", "1", "--json", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert set(rows) == {"no cache", "interval 1", "interval 2"}
    assert rows["interval 1"]["psnr_vs_uncached_db"] == float("inf")  # a full call every step: the same images
    assert rows["interval 2"]["psnr_vs_uncached_db"] < float("inf")  # cached steps change the image


def test_feature_cache_benchmark_runs_the_deepcache_package_beside_ours(tmp_path):
    pytest.importorskip("DeepCache", reason="the comparison needs: pip install DeepCache")
    out = tmp_path / "cache.json"
    load("feature_cache").main(["--model", "", "--preset", "tiny", "--intervals", "2", "--steps", "3", "--runs", "1",
                                "--deepcache", "--json", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert set(rows) == {"no cache", "interval 2", "diffusers no cache", "deepcache interval 2"}
    # diffusers' pipeline uncached makes latentdiff's images (the same weights, seeds and sampler)
    assert rows["diffusers no cache"]["psnr_vs_latentdiff_uncached_db"] > 60
    assert rows["deepcache interval 2"]["psnr_vs_uncached_db"] < float("inf")
