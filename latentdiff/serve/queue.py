"""The job queue, in SQLite (stdlib ``sqlite3``, WAL, ``synchronous=FULL``).

A job is committed before the server answers the request that made it, so an accepted job
survives any crash. Each of its images is a row of ``images`` written in the same transaction
that records it done, after its PNG is already in place (written atomically). After a crash,
:meth:`JobQueue.recover` puts running jobs back in the queue; the images they already have are
not made again, and the others are made under the same file names, from the same stored seeds,
so every accepted job finishes exactly once: none lost, none duplicated.

One connection, shared by the HTTP threads and the worker under a lock: every operation is a
few short statements.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Optional

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- queue order
    id TEXT NOT NULL UNIQUE,
    idem_key TEXT UNIQUE,                   -- the Idempotency-Key header, if one was sent
    body_hash TEXT NOT NULL,                -- of the request body: a key reused with another body is refused
    kind TEXT NOT NULL,                     -- 'native' or 'a1111' (how its answer is shaped)
    spec TEXT NOT NULL,                     -- JSON: the checked pipeline arguments, one seed per image
    batch_key TEXT NOT NULL,                -- jobs with equal keys may share U-Net batches
    total INTEGER NOT NULL,                 -- images
    state TEXT NOT NULL,                    -- queued, running, done, failed, cancelled
    attempts INTEGER NOT NULL DEFAULT 0,    -- times a worker started it (a crash loop ends at MAX_ATTEMPTS)
    error TEXT,
    warnings TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS images (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    k INTEGER NOT NULL,
    file TEXT NOT NULL,                     -- name inside the images folder
    seed INTEGER NOT NULL,
    params TEXT NOT NULL,                   -- JSON: the image's recipe
    batch TEXT NOT NULL,                    -- the U-Net batch it was made in (shared by other jobs' images)
    PRIMARY KEY (job_id, k)
);
"""
ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "cancelled")
MAX_ATTEMPTS = 3


class QueueFull(Exception):
    pass


class KeyReused(Exception):
    """An Idempotency-Key sent again with a different body."""


class JobQueue:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed job survives power loss, not only a crash
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self):
        return _Transaction(self._db, self._lock)

    # -- submitting and reading --------------------------------------------------------------------

    def submit(self, *, spec: dict, batch_key: str, total: int, kind: str, body_hash: str,
               idem_key: Optional[str] = None, max_queued: int = 1000) -> tuple[dict, bool]:  # fmt: skip
        """Commit a new job and return (job, True); with a known ``idem_key``, (that job, False)."""
        with self._tx() as db:
            if idem_key is not None:
                row = db.execute("SELECT * FROM jobs WHERE idem_key = ?", (idem_key,)).fetchone()
                if row is not None:
                    if row["body_hash"] != body_hash:
                        raise KeyReused(idem_key)
                    return _job(row), False
            waiting = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0]
            if waiting >= max_queued:
                raise QueueFull(waiting)
            job_id = secrets.token_hex(8)
            db.execute(
                "INSERT INTO jobs (id, idem_key, body_hash, kind, spec, batch_key, total, state, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?)",
                (job_id, idem_key, body_hash, kind, json.dumps(spec), batch_key, total, time.time()),
            )
            return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()), True

    def get(self, job_id: str) -> Optional[dict]:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def images(self, job_id: str) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM images WHERE job_id = ? ORDER BY k", (job_id,)).fetchall()
        return [{**dict(r), "params": json.loads(r["params"])} for r in rows]

    def jobs(self, states=ACTIVE + FINISHED, limit: int = 50) -> list[dict]:
        """Newest first."""
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq DESC LIMIT ?",
                                    (*states, limit)).fetchall()  # fmt: skip
        return [_job(r) for r in rows]

    def position(self, job_id: str) -> int:
        """Jobs ahead of this one in the queue (0: next, or running)."""
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running') AND seq < "
                "(SELECT seq FROM jobs WHERE id = ?)", (job_id,)
            ).fetchone()[0]  # fmt: skip

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in ACTIVE + FINISHED} | {r[0]: r[1] for r in rows}

    # -- the worker's side ---------------------------------------------------------------------------

    def recover(self) -> int:
        """After a restart: running jobs go back to the queue (their finished images stay)."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'").rowcount

    def next_batch(self, size: int) -> list[tuple[dict, int]]:
        """Up to ``size`` images still to make, as (job, image index), from the oldest active job and
        the jobs after it with the same batch key, in queue order. Their jobs are marked running."""
        with self._tx() as db:
            while True:
                head = db.execute("SELECT * FROM jobs WHERE state IN ('queued', 'running') ORDER BY seq LIMIT 1").fetchone()
                if head is None:
                    return []
                if head["state"] == "queued" and head["attempts"] >= MAX_ATTEMPTS:
                    db.execute("UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ?",
                               (time.time(), f"the server stopped while making this job {MAX_ATTEMPTS} times; "
                                "it is not tried again", head["id"]))  # fmt: skip
                    continue
                break
            rows = db.execute("SELECT * FROM jobs WHERE state IN ('queued', 'running') AND batch_key = ? ORDER BY seq",
                              (head["batch_key"],)).fetchall()  # fmt: skip
            batch: list[tuple[dict, int]] = []
            for row in rows:
                if row["state"] == "queued" and row["attempts"] >= MAX_ATTEMPTS:
                    continue
                made = {r[0] for r in db.execute("SELECT k FROM images WHERE job_id = ?", (row["id"],))}
                wanted = [k for k in range(row["total"]) if k not in made][: size - len(batch)]
                if not wanted:
                    continue
                if row["state"] == "queued":
                    db.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, "
                               "started = COALESCE(started, ?) WHERE id = ?", (time.time(), row["id"]))  # fmt: skip
                job = _job(row)
                job["state"] = "running"
                batch += [(job, k) for k in wanted]
                if len(batch) >= size:
                    break
            return batch

    def record_images(self, rows: list[dict], warnings: dict[str, list[str]]) -> list[str]:
        """Record finished images (their PNGs already in place) and finish the jobs that are
        complete; returns the ids of the jobs finished. Images of jobs that were cancelled or
        removed meanwhile are not recorded."""
        done = []
        with self._tx() as db:
            for r in rows:
                state = db.execute("SELECT state FROM jobs WHERE id = ?", (r["job_id"],)).fetchone()
                if state is None or state[0] not in ACTIVE:
                    continue
                db.execute("INSERT OR REPLACE INTO images (job_id, k, file, seed, params, batch) VALUES (?, ?, ?, ?, ?, ?)",
                           (r["job_id"], r["k"], r["file"], r["seed"], json.dumps(r["params"], sort_keys=True),
                            r["batch"]))  # fmt: skip
            for job_id in dict.fromkeys(r["job_id"] for r in rows):
                row = db.execute("SELECT total, state, warnings FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None or row["state"] not in ACTIVE:
                    continue
                if job_id in warnings:
                    merged = list(dict.fromkeys(json.loads(row["warnings"]) + warnings[job_id]))
                    db.execute("UPDATE jobs SET warnings = ? WHERE id = ?", (json.dumps(merged), job_id))
                made = db.execute("SELECT COUNT(*) FROM images WHERE job_id = ?", (job_id,)).fetchone()[0]
                if made >= row["total"]:
                    db.execute("UPDATE jobs SET state = 'done', finished = ? WHERE id = ?", (time.time(), job_id))
                    done.append(job_id)
        return done

    def fail(self, job_id: str, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = 'failed', error = ?, finished = ? WHERE id = ? AND state IN "
                       "('queued', 'running')", (error, time.time(), job_id))  # fmt: skip

    def cancel(self, job_id: str) -> Optional[str]:
        """Cancel a queued or running job; returns its state afterwards (None: no such job)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ? AND state IN "
                       "('queued', 'running')", (time.time(), job_id))  # fmt: skip
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else row[0]

    def expire(self, keep_seconds: float) -> list[str]:
        """Remove jobs finished more than ``keep_seconds`` ago; returns their image files."""
        cutoff = time.time() - keep_seconds
        with self._tx() as db:
            files = [r[0] for r in db.execute(
                "SELECT file FROM images WHERE job_id IN (SELECT id FROM jobs WHERE state IN "
                "('done', 'failed', 'cancelled') AND finished < ?)", (cutoff,))]  # fmt: skip
            db.execute("DELETE FROM jobs WHERE state IN ('done', 'failed', 'cancelled') AND finished < ?", (cutoff,))
        return files


class _Transaction:
    """``with`` block = one ``BEGIN IMMEDIATE`` ... ``COMMIT`` under the queue's lock."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock):
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, tb) -> None:
        try:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            self.lock.release()


def _job(row: sqlite3.Row) -> dict[str, Any]:
    job = dict(row)
    job["spec"] = json.loads(job["spec"])
    job["warnings"] = json.loads(job["warnings"])
    return job
