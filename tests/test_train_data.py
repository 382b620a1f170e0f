"""Training config and data: typed TOML, dataset layouts, bucketing, caption dropout, bad images."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from PIL import Image

from helpers import png_header
from latentdiff.cli import main as cli
from latentdiff.data.buckets import BucketBatches, assign_buckets, make_buckets
from latentdiff.data.dataset import TrainDataset
from latentdiff.data.sources import DataConfig, scan
from latentdiff.errors import InvalidInputError
from latentdiff.tomlconfig import to_toml
from latentdiff.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 220, 40)}
SIZES = [(64, 64), (128, 64), (64, 128), (96, 96)]


def make_images(folder: Path, count: int, sizes=SIZES) -> list[dict]:
    """Solid-colour images of several aspect ratios; returns the imagefolder metadata rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        name = list(COLOURS)[i % len(COLOURS)]
        size = sizes[i % len(sizes)]
        Image.new("RGB", size, COLOURS[name]).save(folder / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"a {name} picture number {i}"})
    return rows


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# -- config -------------------------------------------------------------------------------------


def test_shipped_configs_load():
    for path in sorted((ROOT / "training" / "configs").glob("*.toml")):
        # the shipped configs leave the paths to --set; LoRA refuses to start without a base model; a
        # ControlNet config's validation control images are data made by its header's command
        overrides = ["model.path=/models/base"] if "lora" in path.name else []
        if "controlnet" in path.name:
            overrides += ["validation.prompts=[]", "validation.control_images=[]"]
        config = TrainConfig.load(path, overrides)
        # the resolved config written beside checkpoints reads back to the same config
        reread = path.parent / "_roundtrip.toml"
        try:
            reread.write_text(to_toml(config))
            assert TrainConfig.load(reread) == config, path.name
        finally:
            reread.unlink()


def test_unknown_key_and_wrong_type_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlr_shedule = 'cosine'\n")
    with pytest.raises(InvalidInputError, match=r"optim\.lr_shedule"):
        TrainConfig.load(bad)
    bad.write_text("[train]\nmax_steps = 'many'\n")
    with pytest.raises(InvalidInputError, match=r"train\.max_steps must be a whole number"):
        TrainConfig.load(bad)
    with pytest.raises(InvalidInputError, match=r"data\.caption_dropout"):
        TrainConfig.load(None, ["data.caption_dropout=1.5"])
    with pytest.raises(InvalidInputError, match="unknown config key colour"):
        TrainConfig.load(None, ["colour=1"])


def test_overrides_use_toml_syntax():
    config = TrainConfig.load(None, ["optim.lr=3e-5", "train.ema=true", "data.path=/data/my pets",
                                     "validation.prompts=['a', 'b']", "train.batch_size=7"])  # fmt: skip
    assert (config.optim.lr, config.train.ema, config.data.path) == (3e-5, True, "/data/my pets")
    assert (config.validation.prompts, config.train.batch_size) == (["a", "b"], 7)


def test_cli_config_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\npresett = 'tiny'\n")
    assert cli(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentdiff: error:") and "model.presett" in err and "\n" not in err
    assert cli(["train", "--config", str(tmp_path / "missing.toml")]) == 2


# -- layouts ------------------------------------------------------------------------------------


def test_imagefolder_txt_disk_and_parquet_layouts_agree(tmp_path):
    import datasets

    rows = make_images(tmp_path / "folder", 6)
    write_jsonl(tmp_path / "folder" / "metadata.jsonl", rows)
    want = {r["text"] for r in rows}

    txt = tmp_path / "txt"
    make_images(txt, 6)
    for r in rows:
        (txt / r["file_name"]).with_suffix(".txt").write_text(r["text"] + "\n")

    table = datasets.Dataset.from_dict(
        {"img": [str(tmp_path / "folder" / r["file_name"]) for r in rows], "caption": [r["text"] for r in rows]}
    ).cast_column("img", datasets.Image())
    table.save_to_disk(str(tmp_path / "disk"))
    table.to_parquet(str(tmp_path / "data.parquet"))

    for path, columns in [(tmp_path / "folder", {}), (txt, {}), (tmp_path / "disk", {"image_column": "img", "caption_column": "caption"}),
                          (tmp_path / "data.parquet", {"image_column": "img", "caption_column": "caption"})]:  # fmt: skip
        source = scan(DataConfig(path=str(path), **columns), progress=False)
        assert {r.captions[0] for r in source.records} == want, path
        assert not source.skipped
        assert all(source.image(r).size == r.size for r in source.records)


def test_several_sources_train_together(tmp_path):
    import datasets

    write_jsonl(tmp_path / "a" / "metadata.jsonl", make_images(tmp_path / "a", 3))
    rows = make_images(tmp_path / "b", 2)
    table = datasets.Dataset.from_dict({"image": [str(tmp_path / "b" / r["file_name"]) for r in rows],
                                        "text": ["from the table"] * 2}).cast_column("image", datasets.Image())  # fmt: skip
    table.to_parquet(str(tmp_path / "b.parquet"))
    source = scan(DataConfig(path=[str(tmp_path / "a"), str(tmp_path / "b.parquet")]), progress=False)
    assert [r.captions[0] for r in source.records][-2:] == ["from the table"] * 2 and len(source.records) == 5
    assert [source.image(r).size for r in source.records] == [r.size for r in source.records]


def test_repeats_oversample_a_source_and_hold_out_every_copy(tmp_path):
    from latentdiff.train.vae_stage import split_holdout

    write_jsonl(tmp_path / "a" / "metadata.jsonl", make_images(tmp_path / "a", 3))
    write_jsonl(tmp_path / "b" / "metadata.jsonl", make_images(tmp_path / "b", 2))
    paths = [str(tmp_path / "a"), str(tmp_path / "b")]
    once = scan(DataConfig(path=paths), progress=False).records
    source = scan(DataConfig(path=paths, repeats=[1, 3]), progress=False)
    assert len(source.records) == 3 + 2 * 3
    assert [r.key for r in source.records] == [r.key for r in once[:3]] + [r.key for r in once[3:]] * 3
    digests = [r.digest for r in source.records]
    kept, held = split_holdout(digests, 2, seed=0)
    held_digests = {digests[i] for i in held}
    assert len(held) == 2 == len(held_digests)  # two distinct images, one copy of each scored
    assert not held_digests & {digests[i] for i in kept}  # no copy of a held-out image is trained on
    assert sorted(kept + [i for i, d in enumerate(digests) if d in held_digests]) == list(range(len(digests)))
    for bad in ([1], [1, 0]):
        with pytest.raises(InvalidInputError, match="data.repeats needs one whole number >= 1 per data.path entry"):
            scan(DataConfig(path=paths, repeats=bad), progress=False)


def test_missing_column_is_a_clear_error(tmp_path):
    write_jsonl(tmp_path / "metadata.jsonl", make_images(tmp_path, 2))
    with pytest.raises(InvalidInputError, match="no column 'caption'.*data.caption_column"):
        scan(DataConfig(path=str(tmp_path), caption_column="caption"), progress=False)


def test_unreadable_images_are_skipped_and_listed(tmp_path):
    rows = make_images(tmp_path, 4)
    good = (tmp_path / "000.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    rows += [{"file_name": "truncated.png", "text": "t"}, {"file_name": "garbage.png", "text": "g"},
             {"file_name": "absent.png", "text": "a"}]  # fmt: skip
    write_jsonl(tmp_path / "metadata.jsonl", rows)
    source = scan(DataConfig(path=str(tmp_path)), progress=False)
    assert len(source.records) == 4
    assert sorted(Path(key).name for key, _ in source.skipped) == ["absent.png", "garbage.png", "truncated.png"]


def test_an_image_too_large_to_read_safely_is_skipped_and_counted(tmp_path, capsys):
    """A 20000x20000 PNG is a decompression bomb to PIL (DecompressionBombError): one skipped image,
    like a corrupt one, not the end of the run."""
    rows = make_images(tmp_path, 3)
    png_header(tmp_path / "bomb.png", 20000, 20000)
    write_jsonl(tmp_path / "metadata.jsonl", [*rows, {"file_name": "bomb.png", "text": "huge"}])
    source = scan(DataConfig(path=str(tmp_path)), progress=False)
    assert len(source.records) == 3
    ((key, reason),) = source.skipped
    assert key.endswith("bomb.png") and reason.startswith("DecompressionBombError")


def test_the_data_builders_folder_is_accepted_as_data_path(tmp_path):
    from latentdiff.data.builders import build, read_split

    counts = build("shapes", tmp_path / "shapes", count=12, size=32)
    source = scan(DataConfig(path=str(tmp_path / "shapes")), progress=False)
    assert not source.skipped and len(source.records) == counts["train"] == 12  # its train/ split, not 239 complaints
    assert sorted(r.captions[0] for r in source.records) == sorted(r["text"] for r in read_split(tmp_path / "shapes", "train"))


def test_several_captions_pick_one_per_sample(tmp_path):
    make_images(tmp_path, 1)
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "000.png", "text": ["one", "two", "three"]}])
    config = DataConfig(path=str(tmp_path), caption_dropout=0.0)
    source = scan(config, progress=False)
    dataset = TrainDataset(source, [(64, 64)], [0], config, seed=0)
    picked = [dataset.choices(epoch, 0)[1] for epoch in range(300)]
    assert set(picked) == {"one", "two", "three"}
    assert picked == [dataset.choices(epoch, 0)[1] for epoch in range(300)]  # a pure function of (seed, epoch, index)


# -- buckets and batches ------------------------------------------------------------------------


def test_buckets_hold_the_pixel_budget_and_step():
    for w, h in make_buckets(512, 64, 2.0):
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 2.0
    assert (512, 512) in make_buckets(512, 64, 2.0)


def test_every_batch_comes_from_one_bucket(tmp_path):
    write_jsonl(tmp_path / "metadata.jsonl", make_images(tmp_path, 16))
    config = DataConfig(path=str(tmp_path), resolution=64, bucket_step=16, buckets=True)
    source = scan(config, progress=False)
    buckets, bucket_of = assign_buckets(source.records, config)
    # 2:1 and 1:2 images go to the widest / tallest buckets within max_aspect, both square sizes to 64x64
    assert sorted({buckets[b] for b in bucket_of}) == [(48, 80), (64, 64), (80, 48)]
    dataset = TrainDataset(source, buckets, bucket_of, config, seed=0)
    batches = BucketBatches(bucket_of, batch_size=2, seed=0)
    seen = 0
    for epoch in range(3):
        batches.epoch = epoch
        for keys in batches:
            shapes = {tuple(dataset[k]["pixels"].shape) for k in keys}
            assert len(shapes) == 1 and len({bucket_of[i] for _, i in keys}) == 1
            (shape,) = shapes
            w, h = buckets[bucket_of[keys[0][1]]]
            assert shape == (3, h, w)
            seen += len(keys)
    assert seen == 3 * 16


def test_ranks_split_the_same_global_batches():
    bucket_of = [random.Random(i).randrange(3) for i in range(50)]
    single = BucketBatches(bucket_of, batch_size=4, seed=7)
    ranks = [BucketBatches(bucket_of, batch_size=2, seed=7, num_processes=2, rank=r) for r in range(2)]
    for epoch in range(2):
        for b in (single, *ranks):
            b.epoch = epoch
        for whole, *parts in zip(single, *ranks):
            assert whole == parts[0] + parts[1]
    # resuming mid-epoch continues with exactly the batches not yet seen
    single.epoch, single.start = 1, 3
    resumed = list(single)
    single.start = 0
    assert resumed == list(single)[3:]


def test_too_few_images_for_a_batch_is_a_clear_error():
    with pytest.raises(InvalidInputError, match="no bucket holds a whole global batch of 8"):
        BucketBatches([0, 0, 1, 1], batch_size=4, seed=0, num_processes=2)


def test_caption_dropout_rate(tmp_path):
    write_jsonl(tmp_path / "metadata.jsonl", make_images(tmp_path, 4))
    n = 4 * 1000
    for p in (0.0, 0.1, 0.5, 1.0):
        config = DataConfig(path=str(tmp_path), caption_dropout=p)
        source = scan(config, progress=False)
        dataset = TrainDataset(source, [(64, 64)], [0] * 4, config, seed=3)
        dropped = sum(dataset.choices(epoch, i)[1] == "" for epoch in range(1000) for i in range(4))
        # a binomial(n, p) count stays within 5 standard deviations of n*p (fails by chance < 1e-6)
        assert abs(dropped - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9, (p, dropped)


def test_cache_shares_hold_when_one_rank_writes_before_the_other_looks(shapes, tmp_path):
    """Two ranks fill one cache; rank 1 finishes before rank 0 even lists what is missing (ranks
    reach the cache at different times). Every entry must still be written by someone: shares cut
    from each rank's own list of missing entries would leave some to no rank."""
    from latentdiff import LatentDiffusion
    from latentdiff.data.cache import LatentCache, possible_views

    pipe = LatentDiffusion.from_preset("tiny")
    config = DataConfig(path=str(shapes), resolution=64, random_flip=True, num_workers=0)
    source = scan(config, progress=False)
    buckets, bucket_of = assign_buckets(source.records, config)
    cache = LatentCache(tmp_path / "cache", vae_hash="v", text_hash="t")
    encoders = dict(vae=pipe.vae, text_encoders=[pipe.text_encoder], tokenizers=[pipe.tokenizer])
    for rank in (1, 0):
        cache.fill(source, buckets, bucket_of, config, rank=rank, world=2, **encoders)
    captions = {c for r in source.records for c in r.captions} | {""}
    lost = [c for c in captions if not cache.text_file(c).is_file()]
    assert not lost, lost
    views = [(r, v) for i, r in enumerate(source.records) for v in possible_views(r, buckets[bucket_of[i]], config)]
    assert len(views) == 16 and all(cache.latent_file(r, v).is_file() for r, v in views)
    again = cache.fill(source, buckets, bucket_of, config, rank=0, world=1, **encoders)
    assert (again.latents_encoded, again.texts_encoded) == (0, 0)
