"""The HTTP API and web page around one text-to-image backend: validated requests, a bounded queue, PNGs that
record their settings."""

import asyncio
import base64
import io
import json
import logging
import math
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from typing import Annotated, Any, Callable, Literal, Protocol

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi_offline import FastAPIOffline
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

import difflab

MAX_PROMPT_CHARS = 500
MAX_GUIDANCE = 20.0
MAX_SEED = 2**32 - 1
SCALES = (1, 2, 4, 8)  # output sizes are whole multiples of the native resolution, so upscaled pixels stay square
LARGEST_DEFAULT_SIZE = 256
PNG_TEXT_KEY = "difflab"

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """A model the server can run: its description and one blocking call that makes images."""

    info: dict  # {"run", "resolution", "solvers", "defaults": {"guidance", "steps", "solver"}, "max_steps", "text"}

    def generate(self, *, prompt: str, negative_prompt: str, guidance: float, steps: int, solver: str,
                 seed: int, n: int, progress: Callable[[int, int], None]) -> list[Image.Image]:
        """n RGB images at the native resolution; image i is reproducible alone from seed + i.
        Calls progress(done_steps, total_steps) as it goes. Blocking, CPU/GPU bound. Raises ValueError
        for a bad request it could not know about in advance (e.g. a prompt the model cannot encode)."""


class ImageOut(BaseModel):
    png: str = Field(description="base64 PNG; its tEXt chunk 'difflab' holds the settings that made it, as JSON")
    seed: int = Field(description="the seed that reproduces this image alone (request seed + index)")


class GenerateResponse(BaseModel):
    images: list[ImageOut]
    settings: dict[str, Any] = Field(description="every setting used, the resolved seed and size and the run")
    seconds: float = Field(description="time the generation took (model and PNG encoding), without the queue wait")


class Detail(BaseModel):
    detail: str


class GenerationQueue:
    """One generation at a time on a worker thread, at most `queue_size` waiting behind it.

    A single-thread executor gives FIFO order and concurrency 1 without asyncio primitives, which belong to
    one event loop; the counters are plain attributes that the event loop reads for /healthz and /v1/progress.
    """

    def __init__(self, queue_size: int):
        self.queue_size = queue_size
        self.admitted = 0  # running + waiting
        self.running = False
        self.step = self.total = 0
        self.last_seconds = 0.0
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="difflab-generate")

    @property
    def queued(self) -> int:
        return max(0, self.admitted - self.running)

    def submit(self, job: Callable[[Callable[[int, int], None]], Any]) -> Future | None:
        """Queue `job(progress)`, or return None when the queue is full."""
        with self._lock:
            if self.admitted > self.queue_size:
                return None
            self.admitted += 1
        future = self._executor.submit(self._run, job)
        future.add_done_callback(self._release)  # also for a waiting job cancelled by its client
        return future

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the last generation's duration for each admitted request."""
        return max(1, math.ceil(self.last_seconds * self.admitted))

    def _run(self, job):
        self.running, self.step, self.total = True, 0, 0
        start = time.perf_counter()
        try:
            return job(self._progress)
        finally:
            self.last_seconds = time.perf_counter() - start
            self.running = False

    def _progress(self, step: int, total: int) -> None:
        self.step, self.total = step, total

    def _release(self, future: Future) -> None:
        with self._lock:
            self.admitted -= 1


class BodyLimit:
    """Refuses a request body over `max_bytes` with 413 before anything parses it, whether or not it declares
    its length (a chunked body is counted as it streams in)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, for handlers that wait on it
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        detail = f"request body too large: the limit is {self.max_bytes} bytes"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def _upscale_to_png(image: Image.Image, size: int, settings: dict) -> str:
    """Nearest-neighbour upscale (crisp model pixels, no invented detail) to a base64 PNG carrying `settings`."""
    text = PngImagePlugin.PngInfo()
    text.add_text(PNG_TEXT_KEY, json.dumps(settings))
    buffer = io.BytesIO()
    image.convert("RGB").resize((size, size), Image.Resampling.NEAREST).save(buffer, format="PNG", pnginfo=text)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _first_line(exc: BaseException) -> str:
    """The exception's message on one line, for a JSON detail; the traceback goes to the log."""
    return next(iter(str(exc).strip().splitlines()), "") or type(exc).__name__


def create_app(backend: Backend, *, queue_size: int = 4, max_n: int = 16, max_body_bytes: int = 16384) -> FastAPI:
    """The FastAPI app serving `backend`: POST /v1/generate, GET /v1/info, /v1/progress, /healthz and the page at /."""
    info = backend.info
    defaults = info["defaults"]
    resolution = info["resolution"]
    sizes = tuple(resolution * scale for scale in SCALES)
    default_size = max([size for size in sizes if size <= LARGEST_DEFAULT_SIZE], default=resolution)
    default_n = min(4, max_n)
    # One description per field, used both in the OpenAPI schema and in every 422 message about that field.
    allowed = {
        "prompt": f"text of 1 to {MAX_PROMPT_CHARS} characters (surrounding whitespace is stripped)",
        "negative_prompt": f"text of at most {MAX_PROMPT_CHARS} characters",
        "guidance": f"a number from 0 to {MAX_GUIDANCE:g}",
        "steps": f"an integer from 1 to {info['max_steps']}",
        "solver": "one of " + ", ".join(info["solvers"]),
        "seed": f"an integer from 0 to {MAX_SEED}, or null for a random seed (image i uses seed + i)",
        "n": f"an integer from 1 to {max_n}",
        "size": "one of " + ", ".join(map(str, sizes)) + f" (the native {resolution} px times 1, 2, 4 or 8)",
    }

    class GenerateRequest(BaseModel):
        """A text-to-image request; the ranges come from the served model and the server's limits."""

        # Strict: "4" is not a step count and 2.5 is not an image count; say so instead of coercing.
        model_config = ConfigDict(extra="forbid", strict=True,
                                  json_schema_extra={"examples": [{"prompt": "a red fox", "seed": 0, "n": 4}]})

        prompt: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_PROMPT_CHARS)] \
            = Field(description=allowed["prompt"])
        negative_prompt: Annotated[str, StringConstraints(strip_whitespace=True, max_length=MAX_PROMPT_CHARS)] \
            = Field("", description=allowed["negative_prompt"])
        guidance: float = Field(defaults["guidance"], ge=0, le=MAX_GUIDANCE, description=allowed["guidance"])
        steps: int = Field(defaults["steps"], ge=1, le=info["max_steps"], description=allowed["steps"])
        solver: Literal[tuple(info["solvers"])] = Field(defaults["solver"], description=allowed["solver"])
        seed: int | None = Field(None, ge=0, le=MAX_SEED, description=allowed["seed"])
        n: int = Field(default_n, ge=1, le=max_n, description=allowed["n"])
        size: Literal[sizes] = Field(default_size, description=allowed["size"])

    fields = ", ".join(GenerateRequest.model_fields)

    def describe(error: dict) -> dict:
        """FastAPI's error entry with a message that names the field and what it accepts."""
        loc = error["loc"]
        field = loc[1] if len(loc) > 1 and isinstance(loc[1], str) else "body"
        if error["type"] == "extra_forbidden":
            message = f"{field}: unknown field; the fields are {fields}"
        elif error["type"] == "json_invalid":
            message = f"body: invalid JSON: {error['ctx']['error']}"
        elif field in allowed:
            message = f"{field}: {error['msg']}; allowed: {allowed[field]}"
        else:
            message = f"{field}: {error['msg']}"
        return {"loc": list(loc), "msg": message, "type": error["type"]}

    queue = GenerationQueue(queue_size)
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    # FastAPI's own /docs and /redoc load Swagger UI and ReDoc from a CDN, which offline users cannot reach;
    # fastapi-offline serves the same pages from files in its wheel.
    app = FastAPIOffline(
        title="difflab",
        version=difflab.__version__,
        description=f"Text-to-image generation with the difflab run `{info['run']}`: POST /v1/generate returns PNGs "
                    "that carry their settings. One generation runs at a time; a full queue answers 503 with "
                    "Retry-After. The web page is at /.",
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        return JSONResponse({"detail": [describe(error) for error in exc.errors()]}, status_code=422)

    @app.post("/v1/generate", response_model=GenerateResponse,
              responses={413: {"model": Detail}, 422: {"description": "invalid request; `detail` says why"},
                         500: {"model": Detail}, 503: {"model": Detail, "description": "queue full; see Retry-After"}})
    async def generate(request: GenerateRequest):
        """Generate `n` images; image i is reproducible alone with seed + i."""
        seed = secrets.randbelow(2**31) if request.seed is None else request.seed
        if seed + request.n - 1 > MAX_SEED:  # image i's seed must itself be a valid request seed
            message = f"seed: {seed} + n - 1 exceeds {MAX_SEED}; allowed: {allowed['seed']}"
            return JSONResponse({"detail": [{"loc": ["body", "seed"], "msg": message, "type": "less_than_equal"}]},
                                status_code=422)
        settings = {"run": info["run"], **request.model_dump(), "seed": seed, "resolution": resolution}
        image_settings = {key: value for key, value in settings.items() if key != "n"}

        def job(progress):
            start = time.perf_counter()
            images = backend.generate(prompt=request.prompt, negative_prompt=request.negative_prompt,
                                      guidance=request.guidance, steps=request.steps, solver=request.solver,
                                      seed=seed, n=request.n, progress=progress)
            pngs = [_upscale_to_png(image, request.size, {**image_settings, "seed": seed + i})
                    for i, image in enumerate(images)]
            return pngs, time.perf_counter() - start

        future = queue.submit(job)
        if future is None:
            retry = queue.retry_after()
            detail = f"the server is busy ({queue.queued} waiting for the model); retry in {retry} s"
            return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": str(retry)})
        try:
            pngs, seconds = await asyncio.wrap_future(future)
        except ValueError as exc:
            return JSONResponse({"detail": _first_line(exc)}, status_code=422)
        except Exception as exc:
            logger.exception("generation failed for %r", settings)
            detail = f"generation failed ({type(exc).__name__}): {_first_line(exc)}"
            return JSONResponse({"detail": detail}, status_code=500)
        return {"images": [{"png": png, "seed": seed + i} for i, png in enumerate(pngs)],
                "settings": settings, "seconds": seconds}

    @app.get("/v1/info")
    async def describe_model() -> dict:
        """The model (run, native resolution, solvers, defaults) and the server's limits, for clients and the page."""
        return {**info, "defaults": {**defaults, "n": default_n, "size": default_size}, "max_n": max_n,
                "sizes": list(sizes), "max_prompt_length": MAX_PROMPT_CHARS, "max_guidance": MAX_GUIDANCE,
                "queue_size": queue_size}

    @app.get("/v1/progress")
    async def progress() -> dict:
        """The running generation's step, polled by the page's progress bar."""
        return {"running": queue.running, "step": queue.step, "total": queue.total, "queued": queue.queued}

    @app.get("/healthz")
    async def health() -> dict:
        return {"status": "ok", "run": info["run"], "busy": queue.running, "queued": queue.queued}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    return app


def run_server(backend: Backend, host: str = "127.0.0.1", port: int = 8000, **app_options) -> None:
    """Serve `backend` until interrupted; localhost by default because the API has no authentication."""
    config = uvicorn.Config(create_app(backend, **app_options), host=host, port=port)
    logging.getLogger("uvicorn.error").info("difflab serve: open http://%s:%d/ in a browser", host, port)
    uvicorn.Server(config).run()
