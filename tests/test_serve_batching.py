"""Batching that changes no pixel: images of different jobs made in one shared U-Net batch equal
the same requests run alone, pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import Server, png_pixels, wait_for

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx2")

COMMON = {"num_inference_steps": 3, "height": 32, "width": 32, "scheduler": "euler_a", "guidance_scale": 6.0}
REQUESTS = [  # compatible: same size, steps, sampler and guidance; prompts of one 77-token chunk
    {"prompt": "a red circle", "seed": 1, "num_images_per_prompt": 2},
    {"prompt": "a yellow star in the center", "negative_prompt": "blurry", "seed": 10},
    {"prompt": "", "seed": 20},
]


def pixels(client, job) -> list[np.ndarray]:
    return [png_pixels(client.get(image["url"]).content) for image in job["images"]]


def test_a_shared_batch_gives_the_pixels_of_each_request_alone(tmp_path):
    server = Server(tmp_path / "data", "--batch-size", "4").start()
    try:
        with server.client() as client:
            # keep the worker busy with another kind of job, so that the requests queue up together
            blocker = client.post("/v1/jobs", json={"prompt": "busy", "seed": 0, "num_inference_steps": 150,
                                                    "height": 64, "width": 64}).json()  # fmt: skip
            shared = [client.post("/v1/jobs", json={**COMMON, **r}).json() for r in REQUESTS]
            assert client.get(f"/v1/jobs/{blocker['id']}").json()["state"] != "done", "the blocker was too quick"
            shared = [wait_for(client, job["id"]) for job in shared]
            batches = {image["batch"] for job in shared for image in job["images"]}
            assert len(batches) == 1, "the four images were not made in one U-Net batch"
            alone = []
            for r in REQUESTS:  # each on its own: nothing else is queued
                alone.append(wait_for(client, client.post("/v1/jobs", json={**COMMON, **r}).json()["id"]))
            assert len({image["batch"] for job in alone for image in job["images"]} - batches) == 3
            for together, single in zip(shared, alone):
                assert together["seeds"] == single["seeds"]
                for a, b in zip(pixels(client, together), pixels(client, single)):
                    assert np.array_equal(a, b)
            # and a job with more images than a batch is split over several batches
            many = wait_for(client, client.post("/v1/jobs", json={**COMMON, "prompt": "x", "seed": 5,
                                                                   "num_images_per_prompt": 6}).json()["id"])  # fmt: skip
            assert len({image["batch"] for image in many["images"]}) == 2 and many["images_done"] == 6
    finally:
        server.stop()
