"""``latentdiff serve``: every endpoint against a running server (a subprocess on 127.0.0.1 and a
free port), through a real HTTP client; A1111 clients' payloads give latentdiff generate's pixels."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from helpers import Server, picture, png_pixels, wait_for
from latentdiff.cli import main

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx2 = pytest.importorskip("httpx2")

SMALL = {"num_inference_steps": 2, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve") / "data").start()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_health_models_and_docs(client):
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["model"] == "preset-tiny" and "queued" in health["queue"]
    (model,) = client.get("/v1/models").json()
    assert model["name"] == "preset-tiny" and len(model["hash"]) == 16 and model["default_size"] == 64
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}/events", "/sdapi/v1/txt2img", "/sdapi/v1/img2img"} <= set(paths)


def test_a_job_from_post_to_png(client):
    created = client.post("/v1/jobs", json={"prompt": "a red circle", "seed": 7, "num_images_per_prompt": 2, **SMALL})
    assert created.status_code == 201, created.text
    job = wait_for(client, created.json()["id"])
    assert job["state"] == "done" and job["seeds"] == [7, 8] and job["images_done"] == 2
    assert job["progress"] == {"step": 2, "steps": 2}
    assert [im["k"] for im in job["images"]] == [0, 1]
    png = client.get(job["images"][1]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    recipe = json.loads(image.info["latentdiff"])  # the recipe, as every latentdiff PNG carries it
    assert recipe["seed"] == 8 and recipe["prompt"] == "a red circle" and recipe["num_inference_steps"] == 2
    assert "Seed: 8, Size: 32x32" in image.info["parameters"]  # and A1111's infotext beside it
    assert client.get(f"/v1/jobs/{job['id']}/images/2").status_code == 404
    assert client.get("/v1/jobs/nosuchjob").status_code == 404
    assert any(j["id"] == job["id"] for j in client.get("/v1/jobs").json())


def test_the_same_idempotency_key_gives_the_same_job(client):
    body = {"prompt": "a blue square", **SMALL}  # no seed: the job's random seeds are drawn once
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.json()["seeds"] == first.json()["seeds"]
    other = client.post("/v1/jobs", json={**body, "prompt": "other"}, headers={"Idempotency-Key": "k-1"})
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["detail"]
    wait_for(client, first.json()["id"])


def test_events_stream_progress_then_done(client):
    job = client.post("/v1/jobs", json={"prompt": "a star", "seed": 1, **SMALL, "num_inference_steps": 6}).json()
    events = []
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    assert events[-1][0] == "done" and events[-1][1]["images_done"] == 1
    steps = [data["progress"]["step"] for kind, data in events if kind == "progress"]
    assert steps == sorted(steps) and events[-1][1]["progress"] == {"step": 6, "steps": 6}


def test_cancel_a_queued_and_a_running_job(client):
    slow = client.post("/v1/jobs", json={"prompt": "slow", "seed": 1, "num_inference_steps": 100,
                                         "num_images_per_prompt": 8, "height": 64, "width": 64}).json()  # fmt: skip
    queued = client.post("/v1/jobs", json={"prompt": "waiting", "seed": 2, **SMALL}).json()
    assert client.delete(f"/v1/jobs/{queued['id']}").json()["state"] == "cancelled"
    for _ in range(400):  # until the slow one runs
        if client.get(f"/v1/jobs/{slow['id']}").json()["state"] == "running":
            break
    assert client.delete(f"/v1/jobs/{slow['id']}").json()["state"] == "cancelled"
    final = wait_for(client, slow["id"])
    assert final["state"] == "cancelled" and final["images_done"] < 8
    assert wait_for(client, queued["id"])["images_done"] == 0
    done = client.post("/v1/jobs", json={"prompt": "quick", "seed": 3, **SMALL}).json()
    wait_for(client, done["id"])
    assert client.delete(f"/v1/jobs/{done['id']}").status_code == 409
    assert client.delete("/v1/jobs/nosuchjob").status_code == 404


def test_generate_answers_with_the_pngs_inline(client):
    answer = client.post("/v1/generate", json={"prompt": "a green triangle", "seed": 11, **SMALL})
    assert answer.status_code == 200, answer.text
    (image,) = answer.json()["images"]
    assert base64.b64decode(image["png_base64"]) == client.get(image["url"]).content


def test_image_to_image_and_inpainting_take_inline_images(client):
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    body = {"prompt": "a cat", "seed": 5, **SMALL, "image": b64png(picture(32, 32)), "strength": 0.5}
    job = wait_for(client, client.post("/v1/jobs", json=body).json()["id"])
    assert job["state"] == "done" and job["images"][0]["params"]["strength"] == 0.5
    inpaint = wait_for(client, client.post("/v1/jobs", json={**body, "mask_image": b64png(mask)}).json()["id"])
    assert inpaint["state"] == "done" and inpaint["images"][0]["params"]["mask_hash"]
    for path in ("/etc/passwd", "data/input.png"):  # never a path on the server
        refused = client.post("/v1/jobs", json={**body, "image": path})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "image"]


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "num_inference_steps": "2"}, "num_inference_steps"),  # wrong type
    ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
    ({"prompt": "x", "scheduler": "DPM++ Turbo"}, "scheduler"),  # unknown sampler
    ({"prompt": "x", "height": 30}, "height"),  # checked as the pipeline checks it
    ({"prompt": "x", "seed": -5}, "seed"),
    ({"prompt": "x", "strength": 0.5}, "strength"),  # strength without an image
    ({"prompt": "x", "image_path": "/tmp/a.png"}, "image_path"),  # unknown field
    ({"prompt": "x", "model": "sd15"}, "model"),  # only the models served
    ({"negative_prompt": "x"}, "prompt"),  # missing
])  # fmt: skip
def test_bad_bodies_get_422_naming_the_field(client, body, field):
    answer = client.post("/v1/jobs", json=body)
    assert answer.status_code == 422, answer.text
    assert field in [d["loc"][-1] for d in answer.json()["detail"]], answer.text


def test_malformed_json_gets_422(client):
    answer = client.post("/v1/jobs", content=b'{"prompt": "x",', headers={"Content-Type": "application/json"})
    assert answer.status_code == 422 and answer.json()["detail"][0]["type"] == "json_invalid"


# -- A1111 ---------------------------------------------------------------------------------------------

# A txt2img payload as A1111 API clients send it: the documented fields of /sdapi/v1/txt2img
# (StableDiffusionProcessingTxt2Img), most at their defaults.
A1111_PAYLOAD = {
    "prompt": "a red circle in the top left", "negative_prompt": "blurry", "styles": [], "seed": 1234,
    "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
    "sampler_name": "DPM++ 2M", "scheduler": "Karras", "batch_size": 2, "n_iter": 1, "steps": 3, "cfg_scale": 7,
    "width": 32, "height": 32, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
    "do_not_save_grid": False, "eta": 0, "denoising_strength": 0, "s_min_uncond": 0, "s_churn": 0, "s_tmax": 0,
    "s_tmin": 0, "s_noise": 1, "override_settings": {"CLIP_stop_at_last_layers": 2},
    "override_settings_restore_afterwards": True, "refiner_checkpoint": "", "refiner_switch_at": 0,
    "disable_extra_networks": False, "comments": {}, "enable_hr": False, "firstphase_width": 0,
    "firstphase_height": 0, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_prompt": "", "hr_negative_prompt": "", "sampler_index": "Euler", "script_name": None,
    "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {},
}  # fmt: skip


def test_a1111_txt2img_gives_latentdiff_generates_image(client, tmp_path):
    answer = client.post("/sdapi/v1/txt2img", json=A1111_PAYLOAD)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert len(result["images"]) == 2 and result["parameters"]["sampler_name"] == "DPM++ 2M"
    info = json.loads(result["info"])  # the JSON string A1111 clients parse
    assert info["all_seeds"] == [1234, 1235] and info["seed"] == 1234  # image i gets seed + i
    assert info["sampler_name"] == "DPM++ 2M" and info["extra_generation_params"] == {"Schedule type": "Karras"}
    assert info["clip_skip"] == 2 and info["width"] == 32 and len(info["infotexts"]) == 2
    assert info["infotexts"][1].startswith("a red circle in the top left\nNegative prompt: blurry\nSteps: 3, "
                                           "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1235")  # fmt: skip
    # the same settings on the command line (A1111's clip skip 2 is our --clip-skip 1)
    for i, seed in enumerate((1234, 1235)):
        out = tmp_path / f"cli-{i}.png"
        assert main(["generate", "a red circle in the top left", "--negative", "blurry", "--seed", str(seed),
                     "--scheduler", "dpmpp_2m_karras", "--steps", "3", "--cfg", "7", "--size", "32x32",
                     "--clip-skip", "1", "--preset", "tiny", "--device", "cpu", "--no-progress", "-o", str(out)]) == 0
        served = png_pixels(base64.b64decode(result["images"][i]))
        assert np.array_equal(served, np.asarray(Image.open(out).convert("RGB")))


def test_a1111_seed_minus_one_draws_a_random_seed(client):
    body = {**A1111_PAYLOAD, "seed": -1, "batch_size": 1, "n_iter": 2, "steps": 2}
    info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
    first = info["all_seeds"][0]
    assert first >= 0 and info["all_seeds"] == [first, first + 1]


def test_a1111_img2img_with_an_inpainting_mask(client):
    mask = Image.new("L", (48, 48), 0)
    mask.paste(255, (0, 0, 24, 48))
    body = {"init_images": [b64png(picture(48, 48))], "mask": b64png(mask), "prompt": "a cat", "seed": 3,
            "steps": 2, "width": 32, "height": 32, "denoising_strength": 0.75, "sampler_name": "Euler a",
            "mask_blur": 2, "inpainting_fill": 1, "inpaint_full_res": False}  # fmt: skip
    answer = client.post("/sdapi/v1/img2img", json=body)
    assert answer.status_code == 200, answer.text
    (image,) = answer.json()["images"]
    assert png_pixels(base64.b64decode(image)).shape == (32, 32, 3)
    info = json.loads(answer.json()["info"])
    assert info["denoising_strength"] == 0.75 and info["sampler_name"] == "Euler a" and "Denoising strength: 0.75" in info["infotexts"][0]
    assert client.post("/sdapi/v1/img2img", json={**body, "init_images": []}).status_code == 422


def test_a1111_png_info_reads_our_pngs(client):
    answer = client.post("/sdapi/v1/txt2img", json={**A1111_PAYLOAD, "batch_size": 1})
    image = answer.json()["images"][0]
    info = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image}).json()
    assert info["info"].startswith("a red circle in the top left\nNegative prompt: blurry\n")
    assert info["parameters"]["Steps"] == "3" and info["parameters"]["Size-1"] == "32"
    assert json.loads(info["items"]["latentdiff"])["seed"] == 1234


@pytest.mark.parametrize("change, field", [
    ({"sampler_name": "DPM++ SDE"}, "sampler_name"),  # no latentdiff equivalent
    ({"sampler_name": None, "sampler_index": "Restart"}, "sampler_index"),
    ({"steps": "many"}, "steps"),
    ({"restore_faces": True}, "restore_faces"),  # would change the picture in a way latentdiff cannot
    ({"subseed_strength": 0.3}, "subseed_strength"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
    ({"override_settings": {"sd_model_checkpoint": "v1-5-pruned.safetensors"}}, "override_settings"),
    ({"width": 36}, "width"),
])  # fmt: skip
def test_a1111_refusals_name_the_field(client, change, field):
    answer = client.post("/sdapi/v1/txt2img", json={**A1111_PAYLOAD, **change})
    assert answer.status_code == 422, answer.text
    assert field in [d["loc"][-1] for d in answer.json()["detail"]], answer.text


def test_a1111_lists_samplers_models_options_progress(client):
    samplers = {s["name"]: s for s in client.get("/sdapi/v1/samplers").json()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(samplers)
    assert "dpmpp_2m_karras" in samplers["DPM++ 2M"]["aliases"]
    (model,) = client.get("/sdapi/v1/sd-models").json()
    assert model["title"].startswith("preset-tiny [") and "/" not in model["filename"]  # no server paths
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == model["title"] and options["CLIP_stop_at_last_layers"] == 1
    set_ = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "show_progressbar": True})
    assert set_.status_code == 200 and set_.json()["ignored"] == ["show_progressbar"]
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
    bad = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": "two"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "CLIP_stop_at_last_layers"
    client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})
    progress = client.get("/sdapi/v1/progress").json()
    assert 0 <= progress["progress"] <= 1 and {"job_count", "sampling_step"} <= set(progress["state"])
