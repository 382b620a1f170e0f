"""Batch inference: deterministic whatever the batching or process count, resumable, nothing lost."""

from __future__ import annotations

import io
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

from helpers import BATCH_ROWS, free_port
from latentdiff.batch.rows import Defaults, Row, expand, image_seed, read_rows
from latentdiff.cli import main
from latentdiff.generation.recipe import read_recipe

ROOT = Path(__file__).resolve().parents[1]
ROWS = BATCH_ROWS


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
    assert len(errors) == 1 and "seed must be a whole number" in errors[0].reason
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,colour\nx,red\n")
    with pytest.raises(ValueError, match="unknown: colour"):
        read_rows(bad, Defaults())


def test_duplicate_ids_are_errors(tmp_path):
    rows, errors = read_rows(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "id": "x"}, {"prompt": "b", "id": "x"}]), Defaults())
    assert len(rows) == 1 and "id 'x' (its own id) is taken by the row on line 1" in errors[0].reason


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


def test_a_resume_with_another_cpu_thread_count_says_so(prompts, tmp_path, capsys):
    import torch

    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        assert batch(prompts, "--out", out, "--threads", "1") == 0
        assert json.loads((out / "run.json").read_text())["cpu_threads"] == 1
        capsys.readouterr()
        (out / "4-1.png").unlink()
        assert batch(prompts, "--out", out, "--threads", "2") == 0  # the same run: carries on, with a warning
        assert capsys.readouterr().err.count("was started with 1 CPU threads and goes on with 2") == 1
        assert (out / "4-1.png").is_file() and json.loads((out / "run.json").read_text())["cpu_threads"] == 1
        (out / "4-1.png").unlink()
        assert batch(prompts, "--out", out, "--threads", "1") == 0
        assert "CPU threads" not in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


def test_another_runs_folder_is_refused_unless_overwrite(prompts, tmp_path, capsys):
    out = tmp_path / "out"
    assert batch(prompts, "--out", out) == 0
    (out / "notes.txt").write_text("mine")
    Image.new("RGB", (4, 4)).save(out / "holiday-1.png")  # a user's own file with a similar name
    steps3 = ["batch", str(prompts), "--out", str(out), "--preset", "tiny", "--steps", "3", "--no-progress"]
    assert main(steps3) == 2
    assert "holds 7 images of another run (another model, dtype, device, base seed or defaults" in capsys.readouterr().err
    assert main([*steps3, "--overwrite"]) == 0
    assert all(r["params"]["num_inference_steps"] == 3 for r in manifest(out) if r["id"] != "3")
    assert (out / "notes.txt").read_text() == "mine" and (out / "holiday-1.png").is_file()  # not ours: kept
    # a changed prompt under an existing id is another run too
    write_jsonl(prompts, [{**ROWS[0], "prompt": "a green apple"}, *ROWS[1:]])
    assert main(steps3) == 2
    assert "rows this file does not have, or other values; e.g. 1-0.png" in capsys.readouterr().err


def test_a_second_prompts_file_into_the_same_folder_is_refused(prompts, tmp_path, capsys):
    out = tmp_path / "out"
    assert batch(prompts, "--out", out) == 0
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "something else", "id": "x"}])
    assert batch(other, "--out", out) == 2
    assert "images of another run" in capsys.readouterr().err
    assert not (out / "x-0.png").exists() and len(manifest(out)) == 7


def test_overwrite_deletes_only_our_images(prompts, tmp_path):
    out = tmp_path / "out"
    assert batch(prompts, "--out", out) == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    with open(out / "manifest.jsonl", "a") as f:  # a hostile or foreign manifest line
        f.write(json.dumps({"file": str(victim)}) + "\n" + json.dumps({"file": "../victim.txt"}) + "\n")
    assert batch(prompts, "--out", out, "--seed", "5", "--overwrite") == 0
    assert victim.read_text() == "keep me"
    assert len(manifest(out)) == 7 and all(r["file"].endswith(".png") for r in manifest(out))


def test_planted_crash_states_are_repaired(prompts, tmp_path):
    """What SIGKILL can leave: a truncated manifest line, a PNG without its line, a temp file."""
    out = tmp_path / "out"
    assert batch(prompts, "--out", out) == 0
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])  # cut mid-line
    (out / "5-0.png").unlink()
    (out / ".5-0.png.abc123.tmp").write_bytes(b"\x89PNG half")
    (out / ".unrelated.tmp").write_text("not ours")
    assert batch(prompts, "--out", out) == 0
    assert not (out / ".5-0.png.abc123.tmp").exists() and (out / ".unrelated.tmp").exists()
    records = manifest(out)
    assert [r["file"] for r in records] == ["1-0.png", "1-1.png", "house-0.png", "3-0.png", "4-0.png", "4-1.png", "5-0.png"]
    assert all(read_recipe(out / r["file"]) == r["params"] for r in records)


def test_text_encodings_and_nulls(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_bytes("\ufeff# comment first\nun café\n".encode())
    rows, errors = read_rows(txt, Defaults())
    assert [r.prompt for r in rows] == ["un café"] and not errors
    csv_file = tmp_path / "p.csv"
    csv_file.write_bytes("\ufeffprompt,n\na cat,2\n".encode())
    assert [(r.prompt, r.n) for r in read_rows(csv_file, Defaults())[0]] == [("a cat", 2)]
    jsonl = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "n": None, "id": None, "seed": None}, {"prompt": "b", "id": True}])
    rows, errors = read_rows(jsonl, Defaults(n=2))
    assert [(r.id, r.n, r.seed) for r in rows] == [("1", 2, None)]
    assert "id must be a string or a whole number" in errors[0].reason
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text.*save it as UTF-8"):
        read_rows(latin, Defaults())


def test_limits_are_checked_when_the_file_is_read(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "n": 10**9}, {"prompt": "b", "width": 10**6},
                                                 {"prompt": "c", "scheduler": "nope"}, {"prompt": "d"}])  # fmt: skip
    rows, errors = read_rows(prompts, Defaults())
    assert [r.prompt for r in rows] == ["d"]
    assert ["at most 10000" in errors[0].reason, "above the limit pixels" in errors[1].reason] == [True, True]
    assert "unknown scheduler 'nope'" in errors[2].reason
    # bad CLI defaults fail at once, before any model is loaded
    assert batch(prompts, "--out", tmp_path / "o", "-n", "0") == 2
    assert "n must be a whole number of at least 1" in capsys.readouterr().err


def test_ids_differing_only_in_case_get_distinct_files(tmp_path):
    rows, _ = read_rows(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "id": "A"}, {"prompt": "y", "id": "a"}]), Defaults())
    files = [it.file for it in expand(rows, 0)]
    assert len({f.lower() for f in files}) == 2


def test_txt_file_end_to_end(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("# my prompts\na cat\n\na dog\n")
    assert batch(prompts, "--out", tmp_path / "out", "-n", "2") == 0
    assert [(r["id"], r["index"]) for r in manifest(tmp_path / "out")] == [("2", 0), ("2", 1), ("4", 0), ("4", 1)]


def _batch_command(prompts: Path, out: Path, *extra) -> list[str]:
    return [*extra, str(ROOT / "inference" / "batch.py"), str(prompts), "--out", str(out), "--preset", "tiny",
            "--no-progress"]  # fmt: skip


def test_two_processes_make_the_same_images(prompts, tmp_path):
    assert batch(prompts, "--out", tmp_path / "one", "--steps", "2") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = _batch_command(prompts, tmp_path / "two", sys.executable, "-m", "torch.distributed.run",
                             "--nproc_per_node", "2", "--master_port", str(free_port()))  # fmt: skip
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
    from latentdiff.batch.local import _make
    from latentdiff.batch.storage import PartWriter, open_folder

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
    errors = _make(pipe, expand(rows, 0), tmp_path, PartWriter(open_folder(tmp_path), "t"))
    assert pipe.calls == [["fine", "cursed", "ok"], ["fine"], ["cursed"], ["ok"]]
    assert [(e["id"], e["reason"]) for e in errors] == [("2", "RuntimeError: CUDA out of memory")]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["1-0.png", "3-0.png"]


def test_two_processes_refuse_another_runs_folder_without_hanging(prompts, tmp_path):
    """The folder check runs on the main process; its verdict must reach the other one too."""
    assert batch(prompts, "--out", tmp_path / "out") == 0
    command = _batch_command(prompts, tmp_path / "out", sys.executable, "-m", "torch.distributed.run",
                             "--nproc_per_node", "2", "--master_port", str(free_port()))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*command, "--steps", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("holds 7 images of another run") == 2  # both processes say why


# -- file names, ids and csv fields ------------------------------------------------------------------


def test_ids_never_share_a_file(tmp_path):
    """"x y" is written as x_y_<8 hex of its SHA-256>; an id spelled exactly like that must get
    another file, not overwrite it."""
    import hashlib

    hashed = "x_y_" + hashlib.sha256(b"x y").hexdigest()[:8]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "one", "id": "x y"}, {"prompt": "two", "id": hashed}])
    out = tmp_path / "out"
    assert batch(prompts, "--out", out) == 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert len(files) == 2 and f"{hashed}-0.png" in files
    assert sorted(read_recipe(out / f)["prompt"] for f in files) == ["one", "two"]
    assert sorted(r["file"] for r in manifest(out)) == files


def test_a_file_name_collision_is_an_error_when_the_file_is_read(tmp_path, monkeypatch):
    import latentdiff.batch.rows as rows_module

    monkeypatch.setattr(rows_module, "file_stem", lambda row_id: "same")  # as if two stems collided
    rows, errors = read_rows(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "id": "p"}, {"prompt": "b", "id": "q"}]), Defaults())
    assert [r.id for r in rows] == ["p"]
    assert errors[0].line == 2 and "id 'q' would write the same files as id 'p' on line 1" in errors[0].reason


def test_csv_fields_beyond_the_header_and_ids_equal_as_text_are_row_errors(tmp_path):
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("prompt,seed\na cat, sitting,5\na dog,6\n")
    rows, errors = read_rows(csv_file, Defaults())
    assert [r.prompt for r in rows] == ["a dog"]
    assert errors[0].line == 2 and "3 fields but the header names 2 (extra: '5')" in errors[0].reason and "quotes" in errors[0].reason
    rows, errors = read_rows(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "id": 1}, {"prompt": "b", "id": "1"}]), Defaults())
    assert len(rows) == 1 and "id '1' (its own id) is taken by the row on line 1 (ids are compared as text: 1 there)" in errors[0].reason
    rows, errors = read_rows(write_jsonl(tmp_path / "q.jsonl", [{"prompt": "bad \ud800 text"}, {"prompt": "b" * 30000}]), Defaults())
    assert not rows and "prompt is not valid text" in errors[0].reason and "above the limit prompt_chars" in errors[1].reason


# -- what a run says, and what it checks before loading -----------------------------------------------


def test_a_run_ends_with_one_line_saying_what_happened(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"prompt": "bad", "width": 100}, {"prompt": "also fine"}])
    out = tmp_path / "out"
    assert batch(prompts, "--out", out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("latentdiff: 1 of 3 rows failed, 2 images made; first: line 2 (id '2'): width must be a positive "
                       f"multiple of 8, got 100 (try 96 or 104); all reasons in {out / 'errors.jsonl'}")  # fmt: skip
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "fine"}, {"prompt": "also fine", "n": 2}])
    assert batch(good, "--out", tmp_path / "g") == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"latentdiff: 3 images made; all 3 are in {tmp_path / 'g'}"
    assert batch(good, "--out", tmp_path / "g") == 0  # a finished folder: a success with nothing to do
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"latentdiff: nothing to do: all 3 images are already in {tmp_path / 'g'}"


def test_the_folder_is_checked_before_the_model_loads(prompts, tmp_path, capsys, monkeypatch):
    from latentdiff import LatentDiffusion
    from latentdiff.batch.folder import lock_folder

    out = tmp_path / "out"
    assert batch(prompts, "--out", out) == 0

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the folder was checked")

    monkeypatch.setattr(LatentDiffusion, "from_preset", refuse)
    assert main(["batch", str(prompts), "--out", str(out), "--preset", "tiny", "--steps", "3", "--no-progress"]) == 2
    assert "holds 7 images of another run" in capsys.readouterr().err
    held = lock_folder(tmp_path / "busy")  # another batch writing there
    try:
        assert batch(prompts, "--out", tmp_path / "busy") == 2
        assert "another latentdiff batch is writing into" in capsys.readouterr().err
    finally:
        held.close()
    assert batch(prompts, "--out", tmp_path / "o2", "--batch-size", "100") == 2
    assert "--batch-size 100 is above the limit images=64" in capsys.readouterr().err


# -- other file systems, other engines -----------------------------------------------------------------


def test_a_folder_on_an_fsspec_file_system_holds_the_same_run(prompts, tmp_path):
    """--out on a file system that can neither rename nor append (fsspec's in-memory one, standing in
    for object storage): the same files, manifest and resume as on a local disk."""
    import fsspec

    fs, root, url = fsspec.filesystem("memory"), "/latentdiff-test/out", "memory://latentdiff-test/out"
    try:
        assert batch(prompts, "--out", url, "--batch-size", "3") == 0
        assert batch(prompts, "--out", tmp_path / "local", "--batch-size", "3") == 0
        names = sorted(n.rsplit("/", 1)[1] for n in fs.ls(root, detail=False))
        pngs = sorted(p.name for p in (tmp_path / "local").glob("*.png"))
        assert [n for n in names if n.endswith(".png")] == pngs and len(pngs) == 7
        assert all(fs.cat_file(f"{root}/{name}") == (tmp_path / "local" / name).read_bytes() for name in pngs)
        assert not [n for n in names if ".part-" in n or n.endswith(".tmp")]

        def timeless(data: bytes):
            return [{**json.loads(line), "seconds": None} for line in data.decode().splitlines()]

        assert timeless(fs.cat_file(f"{root}/manifest.jsonl")) == timeless((tmp_path / "local" / "manifest.jsonl").read_bytes())
        # resume: a lost image and a lost manifest are made good, nothing else is made again
        fs.rm_file(f"{root}/4-1.png")
        fs.pipe_file(f"{root}/manifest.jsonl", b"")
        kept = fs.cat_file(f"{root}/1-0.png")
        assert batch(prompts, "--out", url) == 0
        after, before = timeless(fs.cat_file(f"{root}/manifest.jsonl")), timeless((tmp_path / "local" / "manifest.jsonl").read_bytes())
        assert [r["file"] for r in after] == [r["file"] for r in before]
        assert [r for r in after if r["file"] != "4-1.png"] == [r for r in before if r["file"] != "4-1.png"]
        remade = np.asarray(Image.open(io.BytesIO(fs.cat_file(f"{root}/4-1.png"))), dtype=int)
        assert np.abs(remade - pixels(tmp_path / "local" / "4-1.png")).max() <= 1  # (made alone this time)
        assert fs.cat_file(f"{root}/1-0.png") == kept
        assert batch(prompts, "--out", url, "--seed", "5") == 2  # another run: refused, as on a local disk
    finally:
        fs.rm("/latentdiff-test", recursive=True)


def test_engine_ray_without_ray_says_how_to_install_it(prompts, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert batch(prompts, "--out", tmp_path / "out", "--engine", "ray") == 2
    assert capsys.readouterr().err == ('latentdiff: error: --engine ray needs Ray Data, which is not installed: '
                                       'pip install "latentdiff[ray]"\n')  # fmt: skip
    assert not (tmp_path / "out").exists()  # said before anything else
    assert batch(prompts, "--out", tmp_path / "out", "--workers", "2") == 2
    assert "--workers is for --engine ray" in capsys.readouterr().err
