"""Batch inference on Ray Data (``--engine ray``): the local engine's images and manifest, and every
image exactly once when a worker or the driver is killed, on a local Ray cluster of 2 CPUs.

One Ray cluster serves the whole module. The killed-driver and killed-worker runs are separate
driver processes joined to it with ``--address`` (as on a real cluster); Ray restarts a killed worker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import BATCH_ROWS
from latentdiff.cli import main

ray = pytest.importorskip("ray")

ROWS = [*BATCH_ROWS,
        {"prompt": "a bad size", "width": 36},  # (fails at the call: both engines record it)
        {"prompt": "a second lighthouse", "id": "house"}]  # (refused by the reader: an id taken)  # fmt: skip
TINY = ["--preset", "tiny", "--steps", "2", "--size", "32x32", "--no-progress"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster (2 CPUs, a small object store: the rows are short JSON texts) for this
    module: its address, for driver processes of their own.

    Its workers run at the suite's own priority: Ray starts them 15 steps nicer than the raylet
    (``RAY_worker_niceness``, an increment), which on a machine busy with other work (a training
    run) left them a few percent of a core and the module took many times as long. A suite run
    under ``nice`` keeps its workers there."""
    import logging

    saved = os.environ.get("RAY_worker_niceness")
    os.environ["RAY_worker_niceness"] = "0"  # (read by the raylet that ray.init starts)
    try:
        ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
                 logging_level=logging.ERROR, log_to_driver=False)  # fmt: skip
    finally:
        os.environ.pop("RAY_worker_niceness") if saved is None else os.environ.update(RAY_worker_niceness=saved)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def check_exactly_once(out: Path, files: list[str]) -> None:
    """Every image there once and complete, one manifest line each, nothing left over."""
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(files)
    for name in pngs:
        Image.open(out / name).load()  # a truncated PNG raises here
    lines = manifest(out)
    assert sorted(r["file"] for r in lines) == pngs  # one line per image, none twice, none without its file
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.part-*"))


def driver(prompts: Path, out: Path, address: str, *extra: str) -> list[str]:
    """The command line of a driver process of its own, joined to the module's cluster."""
    return [sys.executable, "-m", "latentdiff", "batch", str(prompts), "--out", str(out), "--engine", "ray",
            "--address", address, "--preset", "tiny", "--size", "32x32", "--no-progress", *extra]  # fmt: skip


def wait_until(condition, proc, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before the test could act"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_worker_and_device_options_are_checked_first(tmp_path, capsys):
    from latentdiff.batch.ray_engine import parse_workers

    assert [parse_workers(t) for t in ("3", "1-4", "2-")] == [(3, 3), (1, 4), (2, None)]
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS[:1])
    for extra, message in [(["--workers", "0"], "--workers needs 1 <= MIN <= MAX, got '0'"),
                           (["--workers", "4-2"], "--workers needs 1 <= MIN <= MAX"),
                           (["--workers", "many"], "--workers takes N, MIN-MAX or MIN-, got 'many'"),
                           (["--device", "cuda", "--gpus-per-worker", "0"], "give each worker a GPU (--gpus-per-worker 1)"),
                           (["--device", "mps"], "--device mps with --engine ray: use cpu or cuda"),
                           (["--gpus-per-worker", "-1"], "--gpus-per-worker must be 0 or more")]:  # fmt: skip
        assert main(["batch", str(prompts), "--out", str(tmp_path / "out"), *TINY, "--engine", "ray", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not ray.is_initialized()  # all said before Ray starts (this test runs before the module's cluster)


def test_the_two_engines_write_the_same_images_and_manifest(cluster, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    # one CPU thread in both: the local engine's default follows OMP_NUM_THREADS or the idle cores, a Ray
    # worker's is --threads (1), and a float sum split over another number of threads rounds differently
    assert main(["batch", str(prompts), "--out", str(local), "--batch-size", "2", *TINY, "--threads", "1"]) == 1
    assert main(["batch", str(prompts), "--out", str(on_ray), "--batch-size", "2", *TINY, "--threads", "1",
                 "--engine", "ray", "--workers", "2"]) == 1  # fmt: skip
    files = sorted(p.name for p in local.glob("*.png"))
    assert len(files) == 7 and sorted(p.name for p in on_ray.glob("*.png")) == files
    for name in files:  # the same pixels (and recipes): the same calls were made, whatever the worker
        assert np.array_equal(np.asarray(Image.open(local / name)), np.asarray(Image.open(on_ray / name))), name
        assert (local / name).read_bytes() == (on_ray / name).read_bytes(), name

    def timeless(out):
        return sorted((json.dumps({**r, "seconds": None}, sort_keys=True) for r in manifest(out)))

    assert timeless(local) == timeless(on_ray) and len(timeless(local)) == 7
    assert [r["file"] for r in manifest(local)] == [r["file"] for r in manifest(on_ray)]  # file order, both
    assert json.loads((local / "run.json").read_text()) == json.loads((on_ray / "run.json").read_text())
    assert (local / "errors.jsonl").read_text() == (on_ray / "errors.jsonl").read_text()
    reasons = [json.loads(line) for line in (on_ray / "errors.jsonl").read_text().splitlines()]
    assert len(reasons) == 2 and "width must be a positive multiple of 8" in reasons[1]["reason"]
    assert "id 'house' (its own id) is taken by the row on line 2" in reasons[0]["reason"]
    assert not list(on_ray.glob("*.part-*"))
    # the folder the Ray engine wrote is this run's folder for the local engine too (it retries the bad row)
    stamps = {p.name: p.stat().st_mtime_ns for p in on_ray.glob("*.png")}
    assert main(["batch", str(prompts), "--out", str(on_ray), "--batch-size", "2", *TINY]) == 1
    assert {p.name: p.stat().st_mtime_ns for p in on_ray.glob("*.png")} == stamps


def test_a_killed_worker_is_restarted_and_its_work_done_once(cluster, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"picture number {i}"} for i in range(10)])
    out = tmp_path / "out"
    proc = subprocess.Popen(driver(prompts, out, cluster, "--workers", "1", "--steps", "15", "--batch-size", "1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def parts() -> dict[str, int]:  # the workers' manifest parts: ray-HOST-PID -> lines written
        return {p.name: len(p.read_text().splitlines()) for p in out.glob("manifest.part-ray-*.jsonl")}

    try:
        wait_until(lambda: any(n >= 2 for n in parts().values()), proc)
        first = next(iter(parts()))
        os.kill(int(re.search(r"-(\d+)\.jsonl$", first).group(1)), signal.SIGKILL)  # the worker, mid-run
        made_before = len(list(out.glob("*.png")))
        wait_until(lambda: len(parts()) >= 2, proc)  # Ray started another worker, which goes on
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert 2 <= made_before < 10, "the worker should have been killed part way"
    check_exactly_once(out, [f"{i}-0.png" for i in range(1, 11)])


def test_a_killed_driver_then_the_same_command_resumes(cluster, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"picture number {i}"} for i in range(10)])
    out = tmp_path / "out"
    command = driver(prompts, out, cluster, "--workers", "1", "--steps", "15", "--batch-size", "1")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: len(list(out.glob("*.png"))) >= 2, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    time.sleep(1.0)  # (Ray ends the dead driver's worker)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 2 <= len(before) < 10, "the driver should have been killed part way"
    for name in before:
        Image.open(out / name).load()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    check_exactly_once(out, [f"{i}-0.png" for i in range(1, 11)])
    assert all((out / name).stat().st_mtime_ns == stamp for name, stamp in before.items())  # kept, not made again
    assert f"images made; all 10 are in {out}" in done.stderr.strip().splitlines()[-1]


def test_another_runs_folder_is_refused(cluster, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS[:2])
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), *TINY]) == 0  # a run of the local engine: the same rules
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert main(["batch", str(prompts), "--out", str(out), *TINY, "--steps", "3", "--engine", "ray"]) == 2
    assert "holds 3 images of another run (another model, dtype, device, base seed or defaults" in capsys.readouterr().err
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "something else", "id": "x"}])
    assert main(["batch", str(other), "--out", str(out), *TINY, "--engine", "ray"]) == 2
    assert "rows this file does not have" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamps  # untouched
    check_exactly_once(out, ["1-0.png", "1-1.png", "house-0.png"])
    # the same run with a row more: the Ray engine finishes the local engine's folder, making only the new image
    more = write_jsonl(tmp_path / "more.jsonl", ROWS[:3])
    assert main(["batch", str(more), "--out", str(out), *TINY, "--engine", "ray"]) == 0
    assert "1 images made; all 4 are in" in capsys.readouterr().err
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps
    check_exactly_once(out, ["1-0.png", "1-1.png", "house-0.png", "3-0.png"])
    reference = tmp_path / "reference"  # the new image, as the local engine makes it
    assert main(["batch", str(more), "--out", str(reference), *TINY, "--threads", "1"]) == 0  # (as a Ray worker)
    assert (out / "3-0.png").read_bytes() == (reference / "3-0.png").read_bytes()

