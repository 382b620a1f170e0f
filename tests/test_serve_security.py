"""``latentdiff serve`` is safe by default: loopback only unless a token is given, bearer auth on
every route, and limits that answer 4xx with a message naming the field."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import Server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx2")

TOKEN = "s3cret-token"
LIMITS = ["--max-steps", "5", "--max-images", "3", "--max-side", "64", "--max-body", "200000"]


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("secured") / "data", *LIMITS, token=TOKEN).start()
    yield s
    s.stop()


def test_another_address_needs_a_token(tmp_path):
    env = {**os.environ, "LATENTDIFF_TOKEN": ""}
    done = subprocess.run([sys.executable, "-m", "latentdiff", "serve", "--host", "0.0.0.0", "--preset", "tiny",
                           "--data", str(tmp_path / "d")], capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert done.returncode == 2 and "--token" in done.stderr and not (tmp_path / "d").exists()


def test_every_route_needs_the_token(secured):
    with secured.client() as authorized:
        paths = authorized.get("/openapi.json").json()["paths"]
    routes = ["/", "/docs", "/openapi.json"]
    for path, methods in paths.items():
        concrete = path.replace("{job_id}", "x").replace("{k}", "0")
        routes += [(method.upper(), concrete) for method in methods]
    assert len(routes) > 15
    with secured.client(token="wrong") as wrong, secured.client(token=None) as anonymous:
        anonymous.headers.pop("Authorization", None)
        for route in routes:
            method, path = route if isinstance(route, tuple) else ("GET", route)
            for client in (anonymous, wrong):
                answer = client.request(method, path, json={})
                assert answer.status_code == 401, (method, path, answer.status_code)
                assert "Bearer" in answer.headers.get_list("www-authenticate")


def test_the_token_opens_it_as_bearer_or_as_a_browsers_basic_password(secured):
    with secured.client() as bearer:
        assert bearer.get("/v1/health").status_code == 200
        assert bearer.get("/").status_code == 200
    with secured.client(token=None, auth=("anyone", TOKEN)) as basic:
        basic.headers.pop("Authorization", None)
        assert basic.get("/v1/health").status_code == 200


@pytest.mark.parametrize("body, field, words", [
    ({"num_inference_steps": 6}, "num_inference_steps", "at most 5 steps"),
    ({"num_images_per_prompt": 4}, "num_images_per_prompt", "at most 3 images"),
    ({"width": 72}, "width", "at most 64 pixels"),
    ({"height": 64, "hires_scale": 2.0}, "hires_scale", "at most 64"),
    ({"prompt": "word " * 1000}, "prompt", "at most 4000 characters"),
])  # fmt: skip
def test_limits_give_422_naming_the_field(secured, body, field, words):
    with secured.client() as client:
        answer = client.post("/v1/jobs", json={"prompt": "x", "num_inference_steps": 2, **body})
    assert answer.status_code == 422, answer.text
    (detail,) = answer.json()["detail"]
    assert detail["loc"] == ["body", field] and words in detail["msg"]


def test_limits_apply_to_a1111_requests_under_their_names(secured):
    with secured.client() as client:
        answer = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "batch_size": 2, "n_iter": 2})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "batch_size"]


def test_bodies_over_the_limit_get_413(secured):
    big = b'{"prompt": "' + b"x" * 300_000 + b'"}'
    with secured.client() as client:
        stated = client.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"})
        assert stated.status_code == 413 and "200000 bytes" in stated.json()["detail"]
        chunked = client.post("/v1/jobs", content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
                              headers={"Content-Type": "application/json"})  # fmt: skip
        assert chunked.status_code == 413
        assert client.get("/v1/health").status_code == 200  # and the server is fine


def test_oversized_input_images_are_refused(secured):
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (2000, 10)).save(buffer, format="PNG")
    body = {"prompt": "x", "num_inference_steps": 2, "image": base64.b64encode(buffer.getvalue()).decode()}
    with secured.client() as client:
        answer = client.post("/v1/jobs", json=body)
    assert answer.status_code == 422 and "2000x10" in answer.json()["detail"][0]["msg"]
