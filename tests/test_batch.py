"""Batch inference: deterministic whatever the batching or process count, resumable, nothing lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentdiff.batch import Defaults, Row, image_seed, read_rows
from latentdiff.cli import main
from latentdiff.metadata import read_recipe

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    {"prompt": "a red apple", "n": 2},
    {"prompt": "a lighthouse", "seed": 40, "id": "house"},
    {"prompt": "a bowl of soup", "negative_prompt": "blurry", "steps": 3},
    {"prompt": "a fox", "guidance": 3.0, "scheduler": "euler_a", "n": 2},
    {"prompt": "a tall tower", "width": 48, "height": 64},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def batch(*args) -> int:
    return main(["batch", *map(str, args), "--preset", "tiny", "--steps", "2", "--no-progress"])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=int)


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture
def prompts(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", ROWS)


def test_batch_size_does_not_change_the_images(prompts, tmp_path):
    assert batch(prompts, "--out", tmp_path / "bs1", "--batch-size", "1") == 0
    assert batch(prompts, "--out", tmp_path / "bs4", "--batch-size", "4") == 0
    files = sorted(p.name for p in (tmp_path / "bs1").glob("*.png"))
    assert files == sorted(p.name for p in (tmp_path / "bs4").glob("*.png")) and len(files) == 7
    for name in files:
        assert np.abs(pixels(tmp_path / "bs1" / name) - pixels(tmp_path / "bs4" / name)).max() <= 1, name
    # the images differ from each other, so the comparison means something
    assert np.abs(pixels(tmp_path / "bs1" / "1-0.png") - pixels(tmp_path / "bs1" / "1-1.png")).max() > 10


def test_same_command_twice_gives_identical_files(prompts, tmp_path):
    for name in ("a", "b"):
        assert batch(prompts, "--out", tmp_path / name, "--batch-size", "3") == 0
    files = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a" / "manifest.jsonl").read_text().count("\n") == 7


def test_manifest_and_recipes(prompts, tmp_path):
    out = tmp_path / "out"
    assert batch(prompts, "--out", out, "--seed", "9") == 0
    lines = manifest(out)
    assert [(r["id"], r["index"]) for r in lines] == [("1", 0), ("1", 1), ("house", 0), ("3", 0), ("4", 0), ("4", 1), ("5", 0)]
    by_id = {(r["id"], r["index"]): r for r in lines}
    assert by_id[("house", 0)]["seed"] == 40 and by_id[("house", 0)]["file"] == "house-0.png"
    soup = by_id[("3", 0)]
    assert soup["params"]["negative_prompt"] == "blurry" and soup["params"]["num_inference_steps"] == 3
    assert by_id[("4", 1)]["params"]["scheduler"] == "euler_a" and by_id[("4", 1)]["params"]["guidance_scale"] == 3.0
    assert (by_id[("5", 0)]["params"]["width"], by_id[("5", 0)]["params"]["height"]) == (48, 64)
    for record in lines:
        assert read_recipe(out / record["file"]) == record["params"]
        assert record["seconds"] > 0
    assert (out / "errors.jsonl").read_text() == ""


def test_seeds_depend_only_on_the_row():
    row = Row(id="x", line=1, prompt="p", negative_prompt="", seed=None, n=2, steps=1, guidance=1.0,
              width=None, height=None, scheduler=None)  # fmt: skip
    moved = Row(**{**row.__dict__, "line": 50, "prompt": "other"})
    assert image_seed(row, 1, 0) == image_seed(moved, 1, 0)
    assert len({image_seed(row, 0, 0), image_seed(row, 1, 0), image_seed(row, 0, 1)}) == 3
    assert 0 <= image_seed(row, 0, 0) < 2**64
    seeded = Row(**{**row.__dict__, "seed": 100})
    assert [image_seed(seeded, i, 7) for i in range(2)] == [100, 101]


def test_bad_rows_are_reported_and_the_rest_is_made(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "good one"},
        '{"prompt": "broken json"',
        {"negative_prompt": "no prompt here"},
        {"prompt": "bad size", "width": 100},
        {"prompt": "bad scheduler", "scheduler": "warp_drive"},
        {"prompt": "typo key", "stpes": 3},
        {"prompt": "good two", "id": "two"},
    ])  # fmt: skip
    out = tmp_path / "out"
    assert batch(prompts, "--out", out) == 1
    assert sorted(p.name for p in out.glob("*.png")) == ["1-0.png", "two-0.png"]
    errors = {e["line"]: e["reason"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert set(errors) == {2, 3, 4, 5, 6}
    assert "not valid JSON" in errors[2] and "missing prompt" in errors[3]
    assert "width must be a positive multiple of 8, got 100" in errors[4]
    assert "unknown scheduler 'warp_drive'; valid names:" in errors[5]
    assert "unknown key 'stpes'" in errors[6]
    assert len(manifest(out)) == 2


def test_txt_and_csv_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\n\na cat\n  a dog  \n")
    rows, errors = read_rows(txt, Defaults())
    assert [(r.id, r.prompt) for r in rows] == [("3", "a cat"), ("4", "a dog")] and not errors
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('prompt,seed,n,id\n"a cat, sitting",5,2,c1\na dog,,,\nx,notanumber,,\n')
    rows, errors = read_rows(csv_file, Defaults(n=3))
    assert [(r.id, r.prompt, r.seed, r.n) for r in rows] == [("c1", "a cat, sitting", 5, 2), ("3", "a dog", None, 3)]
    assert len(errors) == 1 and "seed must be a int" in errors[0].reason
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,colour\nx,red\n")
    with pytest.raises(ValueError, match="unknown: colour"):
        read_rows(bad, Defaults())


def test_duplicate_ids_are_errors(tmp_path):
    rows, errors = read_rows(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "id": "x"}, {"prompt": "b", "id": "x"}]), Defaults())
    assert len(rows) == 1 and "used by an earlier row" in errors[0].reason


def test_resume_makes_only_what_is_missing(prompts, tmp_path):
    out = tmp_path / "out"
    assert batch(prompts, "--out", out) == 0
    (out / "4-1.png").unlink()
    (out / "manifest.jsonl").write_text("")  # as if killed before any manifest line landed
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert batch(prompts, "--out", out) == 0
    assert (out / "4-1.png").is_file()
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in out.glob("*.png") if p.name in stamps)
    assert sorted(r["file"] for r in manifest(out)) == sorted(p.name for p in out.glob("*.png"))


def test_another_runs_folder_is_refused_unless_overwrite(prompts, tmp_path, capsys):
    out = tmp_path / "out"
    assert batch(prompts, "--out", out) == 0
    assert main(["batch", str(prompts), "--out", str(out), "--preset", "tiny", "--steps", "3", "--no-progress"]) == 2
    assert "holds another run (different defaults)" in capsys.readouterr().err
    assert main(["batch", str(prompts), "--out", str(out), "--preset", "tiny", "--steps", "3", "--no-progress",
                 "--overwrite"]) == 0  # fmt: skip
    assert all(r["params"]["num_inference_steps"] == 3 for r in manifest(out) if r["id"] != "3")
    # a changed prompt under an existing id is another run too
    write_jsonl(prompts, [{**ROWS[0], "prompt": "a green apple"}, *ROWS[1:]])
    assert main(["batch", str(prompts), "--out", str(out), "--preset", "tiny", "--steps", "3", "--no-progress"]) == 2
    assert "was not made from what row '1' asks for now" in capsys.readouterr().err


def _batch_command(prompts: Path, out: Path, *extra) -> list[str]:
    return [*extra, str(ROOT / "inference" / "batch.py"), str(prompts), "--out", str(out), "--preset", "tiny",
            "--no-progress"]  # fmt: skip


def test_two_processes_make_the_same_images(prompts, tmp_path):
    assert batch(prompts, "--out", tmp_path / "one", "--steps", "2") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = _batch_command(prompts, tmp_path / "two", sys.executable, "-m", "torch.distributed.run",
                             "--nproc_per_node", "2", "--master_port", "29533")  # fmt: skip
    proc = subprocess.run([*command, "--steps", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert files == sorted(p.name for p in (tmp_path / "two").glob("*.png"))
    for name in files:
        assert np.abs(pixels(tmp_path / "one" / name) - pixels(tmp_path / "two" / name)).max() <= 1, name
    assert sorted(r["file"] for r in manifest(tmp_path / "two")) == files
    assert not list((tmp_path / "two").glob("*.part-*"))  # parts merged away


def test_sigkill_then_resume_loses_nothing(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"picture number {i}"} for i in range(12)])
    out = tmp_path / "out"
    command = _batch_command(prompts, out, sys.executable)
    proc = subprocess.Popen([*command, "--steps", "25", "--batch-size", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(out.glob("*.png"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    made_before = len(list(out.glob("*.png")))
    assert 2 <= made_before < 12, "the run should have been killed part way"
    for png in out.glob("*.png"):  # whatever exists under a final name is complete
        Image.open(png).load()
    assert subprocess.run([*command, "--steps", "25", "--batch-size", "4"], capture_output=True).returncode == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"{i}-0.png" for i in range(1, 13))
    for png in pngs:
        Image.open(out / png).load()
    lines = manifest(out)
    assert sorted(r["file"] for r in lines) == pngs  # one line per image, none without its file
    assert not list(out.glob(".*.tmp"))


def test_a_failing_batch_is_retried_image_by_image(tiny, tmp_path):
    """Out of memory (or any other failure) in one batch: retry alone, record only what still fails."""
    from latentdiff.batch import _make, expand

    class Flaky:
        def __init__(self):
            self.calls = []

        def __call__(self, prompts, **kwargs):
            self.calls.append(list(prompts))
            if len(prompts) > 1 or prompts == ["cursed"]:
                raise RuntimeError("CUDA out of memory")
            return tiny(prompts, **{**kwargs, "num_inference_steps": 1})

    rows, _ = read_rows(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"prompt": "cursed"}, {"prompt": "ok"}]),
                        Defaults())  # fmt: skip
    pipe = Flaky()
    errors = _make(pipe, expand(rows, 0), tmp_path, tmp_path / "part.jsonl")
    assert pipe.calls == [["fine", "cursed", "ok"], ["fine"], ["cursed"], ["ok"]]
    assert [(e["id"], e["reason"]) for e in errors] == [("2", "RuntimeError: CUDA out of memory")]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["1-0.png", "3-0.png"]
