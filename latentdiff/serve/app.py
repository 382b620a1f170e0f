"""The FastAPI application: the native ``/v1`` routes, the web page, auth and body limits.

``create_app(config)`` builds it; the model is loaded and the worker started when the app starts
(uvicorn's lifespan), and the worker stopped when it stops. OpenAPI docs are at ``/docs``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, FastAPI, Header, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse

from .._version import __version__
from ..errors import InvalidInputError
from ..fileio import atomic_write
from .config import ServeConfig
from .jobs import FieldError, JobRequest, body_hash, native_call, prepare
from .queue import FINISHED, JobQueue, KeyReused, QueueFull
from .worker import Worker, _expected_steps

log = logging.getLogger("latentdiff.serve")
STATIC = Path(__file__).parent / "static"
NATIVE_NAMES = {name: name for name in JobRequest.model_fields} | {"prompt": "prompt"}


@dataclass
class Server:
    """What the routes share: the settings, the model, the queue and the worker."""

    config: ServeConfig
    pipe: Any
    queue: JobQueue
    worker: Worker
    model_name: str
    options: dict = field(default_factory=dict)  # A1111 options that apply (a1111.py)

    @property
    def images_dir(self) -> Path:
        return self.config.data / "images"

    def model_info(self) -> dict[str, Any]:
        return {"name": self.model_name, "hash": self.pipe.weight_hash(), "source": self.pipe.source,
                "default_size": self.pipe.default_size, "batch_size": self.config.batch_size}  # fmt: skip

    def submit(self, call: dict, images: dict, *, kind: str, digest: str, idem_key: Optional[str], names: dict):
        """Check a call and commit its job; returns (job, created)."""
        spec, key, total, notes = prepare(self.pipe, call, images, self.config.limits, names)
        try:
            job, created = self.queue.submit(spec=spec, batch_key=key, total=total, kind=kind, body_hash=digest,
                                             idem_key=idem_key, max_queued=self.config.limits.max_queued)  # fmt: skip
        except QueueFull:
            raise HTTPException(429, f"the queue holds {self.config.limits.max_queued} jobs; try again later") from None
        except KeyReused:
            raise HTTPException(409, f"Idempotency-Key {idem_key!r} was used for another request body") from None
        if created:
            self.worker.notify()
        return job, created, notes

    def status(self, job: dict) -> dict[str, Any]:
        """A job as the API shows it: state, progress (step i of n), errors, images."""
        images = self.queue.images(job["id"]) if job["state"] != "queued" else []
        steps = _expected_steps(job["spec"])
        live = self.worker.progress.get(job["id"])
        step = steps if job["state"] == "done" else live["step"] if live and job["state"] == "running" else 0
        return {
            "id": job["id"], "state": job["state"], "created": job["created"], "started": job["started"],
            "finished": job["finished"], "error": job["error"], "warnings": job["warnings"],
            "images_total": job["total"], "images_done": len(images), "progress": {"step": step, "steps": steps},
            "queue_position": self.queue.position(job["id"]) if job["state"] == "queued" else 0,
            "prompt": job["spec"]["prompt"], "seeds": job["spec"]["seeds"],
            "images": [{"k": im["k"], "seed": im["seed"], "url": f"/v1/jobs/{job['id']}/images/{im['k']}",
                        "batch": im["batch"], "params": im["params"]} for im in images],  # fmt: skip
        }

    async def wait(self, job_id: str) -> dict:
        """The job once it has finished (done, failed or cancelled)."""
        while True:
            job = self.queue.get(job_id)
            if job is None or job["state"] in FINISHED:
                return job
            await asyncio.sleep(0.05)

    def png(self, job_id: str, k: int) -> Path:
        for image in self.queue.images(job_id):
            if image["k"] == k:
                return self.images_dir / image["file"]
        raise HTTPException(404, f"job {job_id} has no finished image {k}")

    def save_options(self) -> None:
        with atomic_write(self.config.data / "options.json", "w") as f:
            json.dump(self.options, f, indent=2)


def load_server(config: ServeConfig) -> Server:
    """Load the model, open the queue, start the worker."""
    import torch

    from ..commands import _load

    config.data.mkdir(parents=True, exist_ok=True)
    (config.data / "images").mkdir(exist_ok=True)
    pipe = _load(config.model, config.preset, config.preset_seed).to(config.device, getattr(torch, config.dtype))
    if config.preset:
        name = f"preset-{config.preset}"
    else:
        from ..generation.infotext import model_name

        name = model_name(pipe.source)
    queue = JobQueue(config.data / "queue.sqlite")
    worker = Worker(pipe, queue, config.data / "images", config.batch_size, config.keep_hours * 3600)
    options = {}
    if (config.data / "options.json").is_file():
        options = json.loads((config.data / "options.json").read_text(encoding="utf-8"))
    server = Server(config=config, pipe=pipe, queue=queue, worker=worker, model_name=name, options=options)
    worker.start()
    return server


def create_app(config: ServeConfig, server: Optional[Server] = None) -> FastAPI:
    """The application; ``server`` (already loaded) or one loaded at start-up from ``config``."""
    from .a1111 import a1111_router

    holder: dict[str, Server] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        holder["server"] = server or await asyncio.to_thread(load_server, config)
        log.warning("latentdiff serve: model %s, batch size %d, data in %s", holder["server"].model_name,
                    config.batch_size, config.data)  # fmt: skip
        yield
        holder["server"].worker.stop()
        holder["server"].queue.close()

    app = FastAPI(title="latentdiff", version=__version__, lifespan=lifespan,
                  description="Text-to-image over HTTP: a durable job queue, an A1111-compatible subset, "
                              "batching that changes no pixel.")  # fmt: skip
    app.add_middleware(BodyLimit, max_body=config.limits.max_body)
    if config.token:
        app.add_middleware(BearerAuth, token=config.token)

    def current() -> Server:
        return holder["server"]

    @app.exception_handler(FieldError)
    async def field_error(request: Request, e: FieldError):
        return JSONResponse(status_code=422, content={"detail": [{"loc": ["body", e.field], "msg": str(e), "type": "value_error"}]})

    @app.exception_handler(InvalidInputError)
    async def invalid(request: Request, e: InvalidInputError):
        return JSONResponse(status_code=422, content={"detail": [{"loc": ["body"], "msg": str(e), "type": "value_error"}]})

    app.include_router(native_router(current))
    app.include_router(a1111_router(current))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    return app


def native_router(current) -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["native"])

    @r.get("/health")
    def health():
        s = current()
        return {"status": "ok", "version": __version__, "model": s.model_name, "queue": s.queue.counts(),
                "batch_size": s.config.batch_size}  # fmt: skip

    @r.get("/models")
    def models():
        return [current().model_info()]

    @r.post("/jobs", status_code=201)
    def submit(body: JobRequest, idempotency_key: Optional[str] = Header(None, max_length=200)):
        """Queue a job; answers once it is committed. The same ``Idempotency-Key`` gives the same job."""
        s = current()
        call, images = native_call(body, s.config.limits, [s.model_name])
        job, created, _ = s.submit(call, images, kind="native", digest=body_hash(body), idem_key=idempotency_key,
                                   names=NATIVE_NAMES)  # fmt: skip
        status = s.status(job)
        return status if created else JSONResponse(status, status_code=200)

    @r.get("/jobs")
    def recent(limit: int = 50):
        s = current()
        return [s.status(job) for job in s.queue.jobs(limit=min(max(limit, 1), 500))]

    @r.get("/jobs/{job_id}")
    def get_job(job_id: str):
        s = current()
        return s.status(_job(s, job_id))

    @r.get("/jobs/{job_id}/images/{k}", response_class=FileResponse,
           responses={200: {"content": {"image/png": {}}, "description": "the PNG, with its recipe"}})  # fmt: skip
    def image(job_id: str, k: int):
        s = current()
        _job(s, job_id)
        return FileResponse(s.png(job_id, k), media_type="image/png", filename=f"{job_id}-{k}.png")

    @r.delete("/jobs/{job_id}")
    def cancel(job_id: str):
        s = current()
        before = _job(s, job_id)
        if before["state"] in FINISHED:
            raise HTTPException(409, f"job {job_id} has already finished ({before['state']})")
        state = s.queue.cancel(job_id)
        s.worker.cancel(job_id)
        s.worker.notify()
        return {"id": job_id, "state": state}

    @r.get("/jobs/{job_id}/events")
    async def events(job_id: str):
        """Server-sent events: ``progress`` whenever the job's state or step changes, then one
        ``done``, ``failed`` or ``cancelled`` event; each carries the job as ``GET /v1/jobs/{id}`` shows it."""
        s = current()
        _job(s, job_id)

        async def stream():
            last = None
            while True:
                job = s.queue.get(job_id)
                if job is None:  # removed (retention) while we watched
                    yield f"event: gone\ndata: {json.dumps({'id': job_id})}\n\n"
                    return
                status = s.status(job)
                mark = (status["state"], status["progress"]["step"], status["images_done"])
                finished = status["state"] in FINISHED
                if mark != last or finished:
                    kind = status["state"] if finished else "progress"
                    yield f"event: {kind}\ndata: {json.dumps(status)}\n\n"
                    last = mark
                if finished:
                    return
                await asyncio.sleep(0.1)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @r.post("/generate")
    async def generate(body: JobRequest, idempotency_key: Optional[str] = Header(None, max_length=200)):
        """Queue a job and answer when it has finished, with its PNGs inline (base64)."""
        s = current()
        call, images = native_call(body, s.config.limits, [s.model_name])
        job, _, _ = await asyncio.to_thread(s.submit, call, images, kind="native", digest=body_hash(body),
                                            idem_key=idempotency_key, names=NATIVE_NAMES)  # fmt: skip
        job = await s.wait(job["id"])
        status = s.status(job)
        if job["state"] != "done":
            return JSONResponse(status, status_code=500 if job["state"] == "failed" else 409)
        for image in status["images"]:
            image["png_base64"] = base64.b64encode(s.png(job["id"], image["k"]).read_bytes()).decode()
        return status

    return r


def _job(s: Server, job_id: str) -> dict:
    job = s.queue.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept {s.config.keep_hours:g} hours)")
    return job


# -- middleware (plain ASGI, so that they also cover the docs and streaming responses) ----------------


class BearerAuth:
    """Every request must carry ``Authorization: Bearer TOKEN``. Browsers may send the token as the
    password of HTTP Basic auth instead (they ask for it once, then send it with every request,
    the web page's included)."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._allowed(dict(scope["headers"]).get(b"authorization", b"")):
            return await self.app(scope, receive, send)
        await _plain(send, 401, "missing or wrong token: send 'Authorization: Bearer TOKEN'",
                     [(b"www-authenticate", b"Bearer"), (b"www-authenticate", b'Basic realm="latentdiff"')])  # fmt: skip

    def _allowed(self, header: bytes) -> bool:
        scheme, _, value = header.partition(b" ")
        if scheme.lower() == b"bearer":
            return hmac.compare_digest(value.strip(), self.token)
        if scheme.lower() == b"basic":
            try:
                password = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(password, self.token)
        return False


class BodyLimit:
    """Request bodies above ``max_body`` bytes get 413, whether or not they state their length."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _plain(send, 413, self._message())
        seen = 0
        answered = False

        async def counted():
            nonlocal seen, answered
            message = await receive()
            if message["type"] == "http.request" and not answered:
                seen += len(message.get("body", b""))
                if seen > self.max_body:  # answer now; the app sees the client go away
                    answered = True
                    await _plain(send, 413, self._message())
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message):
            if not answered:
                await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not answered:
                raise

    def _message(self) -> str:
        return f"the request body is larger than this server takes ({self.max_body} bytes)"


async def _plain(send, status: int, message: str, headers=()):
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
