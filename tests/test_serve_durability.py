"""The service's queue is durable: after SIGKILL and a restart every accepted job finishes exactly
once (none lost, none duplicated, no truncated PNG), and finished jobs stay until their retention."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
from PIL import Image

from helpers import Server, wait_for

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx2")


def states(db_path) -> dict[str, str]:
    with sqlite3.connect(db_path) as db:  # read as another process would: the killed server's commits only
        return dict(db.execute("SELECT id, state FROM jobs"))


def test_sigkill_mid_run_then_restart_finishes_every_job_exactly_once(tmp_path):
    data = tmp_path / "data"
    server = Server(data).start()
    bodies = [{"prompt": f"job {i}", "seed": 100 * i, "num_images_per_prompt": 2 if i % 4 == 0 else 1,
               "num_inference_steps": 8, "height": 48, "width": 48} for i in range(20)]  # fmt: skip
    expected = sorted((i, k) for i in range(20) for k in range(bodies[i]["num_images_per_prompt"]))
    with server.client() as client:
        ids = []
        for i, body in enumerate(bodies):
            answer = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"job-{i}"})
            assert answer.status_code == 201
            ids.append(answer.json()["id"])
        while sum(s == "done" for s in states(data / "queue.sqlite").values()) < 3:
            time.sleep(0.02)
    server.kill()  # SIGKILL: no shutdown code runs
    before = states(data / "queue.sqlite")
    assert set(before) == set(ids)  # every accepted job was committed
    done_before = {i for i, s in before.items() if s == "done"}
    assert 3 <= len(done_before) < 20, "the kill came after the last job; make the jobs slower"
    with sqlite3.connect(data / "queue.sqlite") as db:
        finished_before = dict(db.execute("SELECT id, finished FROM jobs WHERE state = 'done'"))

    server = Server(data).start()
    try:
        with server.client() as client:
            jobs = [wait_for(client, job_id, timeout=300) for job_id in ids]
            assert [j["state"] for j in jobs] == ["done"] * 20
            # the same Idempotency-Keys give the same jobs, not new ones
            for i, body in enumerate(bodies[:3]):
                again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"job-{i}"})
                assert again.status_code == 200 and again.json()["id"] == ids[i]
            # finished jobs are still served after the restart
            png = client.get(f"/v1/jobs/{ids[0]}/images/1")  # (job 0 has two images)
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    finally:
        server.stop()

    with sqlite3.connect(data / "queue.sqlite") as db:
        rows = db.execute("SELECT job_id, k, file, seed FROM images").fetchall()
        finished_after = dict(db.execute("SELECT id, finished FROM jobs"))
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 20
    assert sorted((ids.index(job_id), k) for job_id, k, _, _ in rows) == expected
    assert {i: finished_after[i] for i in done_before} == finished_before  # not made a second time
    files = sorted(p.name for p in (data / "images").iterdir())
    assert files == sorted(f"{ids[i]}-{k}.png" for i, k in expected)  # no duplicates, no temporary leftovers
    for job_id, k, name, seed in rows:
        with Image.open(data / "images" / name) as image:
            image.load()  # a truncated PNG fails here
            recipe = json.loads(image.info["latentdiff"])
        assert recipe["seed"] == seed == 100 * ids.index(job_id) + k


def test_finished_jobs_expire_after_the_retention_time(tmp_path):
    from latentdiff.serve.queue import JobQueue

    queue = JobQueue(tmp_path / "q.sqlite")
    old, _ = queue.submit(spec={"prompt": "a"}, batch_key="k", total=1, kind="native", body_hash="1")
    new, _ = queue.submit(spec={"prompt": "b"}, batch_key="k", total=1, kind="native", body_hash="2")
    batch = queue.next_batch(4)
    assert [(job["id"], k) for job, k in batch] == [(old["id"], 0), (new["id"], 0)]
    rows = [{"job_id": job["id"], "k": k, "file": f"{job['id']}-{k}.png", "seed": 1, "params": {}, "batch": "b"}
            for job, k in batch]  # fmt: skip
    assert queue.record_images(rows, {}) == [old["id"], new["id"]]
    with queue._tx() as db:  # the first finished two days ago
        db.execute("UPDATE jobs SET finished = ? WHERE id = ?", (time.time() - 2 * 86400, old["id"]))
    assert queue.expire(keep_seconds=86400) == [f"{old['id']}-0.png"]
    assert queue.get(old["id"]) is None and queue.images(old["id"]) == []
    assert queue.get(new["id"])["state"] == "done" and len(queue.images(new["id"])) == 1
