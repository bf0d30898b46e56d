"""The HTTP serving layer around a fake model: validation, PNGs that record their settings, errors and the queue."""

import base64
import io
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from difflab.serve import create_app, run_server

PAGE_IDS = ["prompt", "negative", "guidance", "steps", "solver", "seed", "count", "generate", "progress", "error",
            "grid"]


def decode(png: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(png)))
    image.load()
    return image


def wait_until(condition, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.02)


@pytest.fixture
def backend(fake_backend):
    return fake_backend()


@pytest.fixture
def client(backend):
    return TestClient(create_app(backend, max_n=8))


def test_generate_returns_pngs_with_their_seeds_and_settings(client, backend):
    request = {"prompt": "  a red fox ", "negative_prompt": "blur", "guidance": 3.5, "steps": 5, "solver": "heun",
               "seed": 7, "n": 3, "size": 32}
    response = client.post("/v1/generate", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    settings = {"run": "fake-run", "prompt": "a red fox", "negative_prompt": "blur", "guidance": 3.5, "steps": 5,
                "solver": "heun", "seed": 7, "n": 3, "size": 32, "resolution": 8}
    assert body["settings"] == settings
    assert [image["seed"] for image in body["images"]] == [7, 8, 9]
    assert body["seconds"] >= 0
    image_settings = {key: value for key, value in settings.items() if key != "n"}
    for i, image in enumerate(body["images"]):
        png = decode(image["png"])
        assert png.format == "PNG" and png.mode == "RGB" and png.size == (32, 32)
        assert json.loads(png.text["difflab"]) == {**image_settings, "seed": 7 + i}
        assert len(png.getcolors()) == 2  # the fake's checkerboard, upscaled with nearest-neighbour: no blended pixels
    assert backend.calls == [dict(prompt="a red fox", negative_prompt="blur", guidance=3.5, steps=5, solver="heun",
                                  seed=7, n=3)]


@pytest.mark.parametrize("resolution, size", [(8, 64), (32, 256), (64, 256), (512, 512)])
def test_defaults_come_from_the_backend_and_the_size_is_the_largest_up_to_256(fake_backend, resolution, size):
    backend = fake_backend()
    backend.info["resolution"] = resolution
    client = TestClient(create_app(backend))
    assert client.get("/v1/info").json()["defaults"] == {"guidance": 2.0, "steps": 4, "solver": "euler", "n": 4,
                                                         "size": size}
    body = client.post("/v1/generate", json={"prompt": "fox", "n": 1}).json()
    assert decode(body["images"][0]["png"]).size == (size, size)
    assert {key: body["settings"][key] for key in ("guidance", "steps", "solver", "size")} == {
        "guidance": 2.0, "steps": 4, "solver": "euler", "size": size}


def test_the_same_seed_gives_the_same_bytes_and_each_image_is_reproducible_alone(client):
    first = client.post("/v1/generate", json={"prompt": "fox", "seed": 7, "n": 3}).json()
    again = client.post("/v1/generate", json={"prompt": "fox", "seed": 7, "n": 3}).json()
    alone = client.post("/v1/generate", json={"prompt": "fox", "seed": 8, "n": 1}).json()
    assert [image["png"] for image in again["images"]] == [image["png"] for image in first["images"]]
    assert alone["images"][0]["png"] == first["images"][1]["png"]
    other = client.post("/v1/generate", json={"prompt": "fox", "seed": 9, "n": 1}).json()
    assert other["images"][0]["png"] != alone["images"][0]["png"]


def test_a_null_seed_reports_a_random_seed_that_reproduces(client):
    drawn = client.post("/v1/generate", json={"prompt": "fox", "seed": None, "n": 2}).json()
    seed = drawn["settings"]["seed"]
    assert isinstance(seed, int) and [image["seed"] for image in drawn["images"]] == [seed, seed + 1]
    replay = client.post("/v1/generate", json={"prompt": "fox", "seed": seed, "n": 2}).json()
    assert [image["png"] for image in replay["images"]] == [image["png"] for image in drawn["images"]]


@pytest.mark.parametrize(
    "request_body, message",
    [
        ({}, "prompt: Field required"),
        ({"prompt": ""}, "prompt: String should have at least 1 character; allowed: text of 1 to 500 characters"),
        ({"prompt": " \n\t "}, "prompt: String should have at least 1 character"),
        ({"prompt": "x" * 501}, "prompt: String should have at most 500 characters"),
        ({"prompt": 5}, "prompt: Input should be a valid string"),
        ({"prompt": "fox", "steps": 0}, "steps: Input should be greater than or equal to 1; allowed: an integer from 1 "
                                        "to 10"),
        ({"prompt": "fox", "steps": 11}, "steps: Input should be less than or equal to 10"),
        ({"prompt": "fox", "steps": "5"}, "steps: Input should be a valid integer"),
        ({"prompt": "fox", "steps": None}, "steps: Input should be a valid integer"),
        ({"prompt": "fox", "solver": "nope"}, "solver: Input should be 'euler' or 'heun'; allowed: one of euler, heun"),
        ({"prompt": "fox", "n": 9}, "n: Input should be less than or equal to 8; allowed: an integer from 1 to 8"),
        ({"prompt": "fox", "n": 0}, "n: Input should be greater than or equal to 1"),
        ({"prompt": "fox", "n": 2.5}, "n: Input should be a valid integer"),
        ({"prompt": "fox", "guidance": 20.5}, "guidance: Input should be less than or equal to 20; allowed: a number "
                                              "from 0 to 20"),
        ({"prompt": "fox", "guidance": "high"}, "guidance: Input should be a valid number"),
        ({"prompt": "fox", "seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"prompt": "fox", "seed": 2**32}, "seed: Input should be less than or equal to 4294967295"),
        ({"prompt": "fox", "seed": 2**32 - 2, "n": 3}, "seed: 4294967294 + n - 1 exceeds 4294967295"),
        ({"prompt": "fox", "size": 48}, "size: Input should be 8, 16, 32 or 64"),
        ({"prompt": "fox", "size": 128}, "allowed: one of 8, 16, 32, 64 (the native 8 px times 1, 2, 4 or 8)"),
        ({"prompt": "fox", "colour": "red"}, "colour: unknown field; the fields are prompt, negative_prompt, guidance"),
    ],
)
def test_an_invalid_request_is_a_422_that_names_the_field_and_what_it_accepts(client, backend, request_body, message):
    response = client.post("/v1/generate", json=request_body)
    assert response.status_code == 422
    assert message in "\n".join(entry["msg"] for entry in response.json()["detail"])
    assert backend.calls == []


def test_malformed_json_is_a_422(client):
    response = client.post("/v1/generate", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"].startswith("body: invalid JSON")


def test_an_oversize_body_is_a_413_declared_or_streamed(client, backend):
    declared = client.post("/v1/generate", json={"prompt": "x" * 20000})
    streamed = client.post("/v1/generate", content=(b"x" * 1000 for _ in range(20)),
                           headers={"content-type": "application/json"})
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json() == {"detail": "request body too large: the limit is 16384 bytes"}
    assert "content-length" not in streamed.request.headers
    assert backend.calls == []


def test_health_info_progress_openapi_and_page(client):
    assert client.get("/healthz").json() == {"status": "ok", "run": "fake-run", "busy": False, "queued": 0}
    assert client.get("/v1/progress").json() == {"running": False, "step": 0, "total": 0, "queued": 0}
    info = client.get("/v1/info").json()
    assert info["solvers"] == ["euler", "heun"] and info["max_steps"] == 10 and info["run"] == "fake-run"
    assert (info["max_n"], info["sizes"], info["max_prompt_length"]) == (8, [8, 16, 32, 64], 500)
    schema = client.get("/openapi.json").json()
    assert schema["info"]["title"] == "difflab" and schema["info"]["description"]
    assert schema["components"]["schemas"]["GenerateRequest"]["properties"]["steps"]["maximum"] == 10
    assert "/v1/generate" in schema["paths"]
    docs = client.get("/docs")  # Swagger UI from the fastapi-offline wheel, not a CDN
    assert docs.status_code == 200 and "https://" not in docs.text
    assert client.get(re.search(r'src="([^"]*swagger-ui-bundle[^"]*)"', docs.text)[1]).status_code == 200
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html")
    for element_id in PAGE_IDS:
        assert f'id="{element_id}"' in page.text
    assert "/openapi.json" in page.text and "https://" not in page.text  # nothing from the network


def test_a_backend_value_error_is_a_422_and_a_crash_a_500_that_the_server_survives(client, backend):
    backend.error = ValueError("the text encoder cannot encode this prompt")
    response = client.post("/v1/generate", json={"prompt": "fox"})
    assert (response.status_code, response.json()) == (422, {"detail": "the text encoder cannot encode this prompt"})
    backend.error = RuntimeError("CUDA out of memory\nsecond line of a long message")
    response = client.post("/v1/generate", json={"prompt": "fox"})
    assert (response.status_code, response.json()) == (500, {"detail": "generation failed (RuntimeError): CUDA out "
                                                                       "of memory"})
    backend.error = None
    assert client.post("/v1/generate", json={"prompt": "fox", "n": 1}).status_code == 200
    assert client.get("/healthz").json()["busy"] is False


def test_one_generation_at_a_time_and_a_full_queue_answers_503(fake_backend, live_server):
    gate = threading.Event()  # holds the first accepted generation after its first step
    backend = fake_backend(gate=gate)
    url = live_server(create_app(backend, queue_size=1))

    def post(seed):
        return httpx.post(f"{url}/v1/generate", json={"prompt": "fox", "seed": seed, "n": 1}, timeout=20)

    with httpx.Client(base_url=url, timeout=5) as probe, ThreadPoolExecutor(6) as pool:
        try:
            futures = [pool.submit(post, seed) for seed in range(6)]
            # One runs and one waits; the other four are refused at once, while the model is still held.
            wait_until(lambda: sum(future.done() for future in futures) == 4)
            start = time.perf_counter()
            assert probe.get("/healthz").json() == {"status": "ok", "run": "fake-run", "busy": True, "queued": 1}
            assert probe.get("/v1/progress").json() == {"running": True, "step": 1, "total": 4, "queued": 1}
            assert time.perf_counter() - start < 2  # the event loop answers while the model works
        finally:
            gate.set()
        responses = [future.result() for future in futures]
    accepted = [response for response in responses if response.status_code == 200]
    refused = [response for response in responses if response.status_code != 200]
    assert len(accepted) == 2 and {response.status_code for response in refused} == {503}
    for response in refused:
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["detail"].startswith("the server is busy (1 waiting for the model); retry in")
    assert backend.max_running == 1
    assert sorted(call["seed"] for call in backend.calls) == sorted(r.json()["settings"]["seed"] for r in accepted)
    assert httpx.get(f"{url}/healthz", timeout=5).json()["busy"] is False


def test_run_server_binds_to_localhost_and_logs_the_url(fake_backend, monkeypatch, capsys):
    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server: served.append(server.config))
    run_server(fake_backend(), port=8123, max_n=2)
    (config,) = served
    assert (config.host, config.port) == ("127.0.0.1", 8123)
    assert "http://127.0.0.1:8123/" in capsys.readouterr().err  # uvicorn's own log handler, as the user sees it
    info = TestClient(config.app).get("/v1/info").json()
    assert info["max_n"] == 2
