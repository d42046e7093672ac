"""The FastAPI application: A1111's API under ``/sdapi/v1``, the job API under ``/v1/jobs``, the
web UI at ``/``. ``create_app(config)`` builds it; every route sits behind :class:`Guard`.

One worker thread owns the loaded pipeline (:class:`ModelHost`); HTTP handlers only validate,
queue and wait, so generation never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union

from fastapi import Body, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..version import __version__
from ..api import Pipeline, load, resolve_device
from ..checkpoint.io import sha256_file
from ..checkpoint.load import check_file, read_vae_file
from ..errors import SfumatoError
from . import a1111, adetailer, animatediff, extensions, extras, history, pose, segment, ui, xyz
from .a1111 import Defaults, Img2ImgJob, Img2ImgRequest, PngInfoRequest, Txt2ImgJob, Txt2ImgRequest, Work
from .jobs import Job, JobQueue, QueueFull, wait
from .security import LOOPBACK_HOSTS, ApiError, Catalog, Entry, Guard, Limits, decode_image, machine_hosts

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
_MODE_TAGS = ("txt2img", "img2img")


@dataclass
class ServerConfig:
    model: Path | None = None            # None: the bundled model
    models_dir: Path | None = None
    listen: bool = False                 # False: answer loopback host names only
    api_auth: tuple[str, str] | None = None
    max_queue: int = 16
    limits: Limits = field(default_factory=Limits)
    watermark: bool = True
    device: str = "cpu"
    dtype: str = "auto"
    backend: str = "torch"               # or "openvino" (backends.openvino), for every model the server loads
    backend_precision: str = "f32"
    quant: str | None = None             # "int8": every model's UNet in 8-bit (models.quant)
    # Host names answered with listen=True: None = this machine's names and addresses without
    # api_auth (no DNS rebinding), any with it; ("*",) = any
    allowed_hosts: tuple[str, ...] | None = None
    host: str | None = None              # the address bound (one of the names answered)
    outputs_dir: Path | None = None      # the job API's images are kept here (web UI history); None: not kept
    safety_checker: Path | None = None   # the SD safety checker's folder or file (None: no checking)
    safety_action: str = "black"         # what a flagged image becomes: black or blur


FIELDS = ("sd_model_checkpoint", "sd_vae", "refiner_checkpoint", "hr_checkpoint_name")   # what chose each model


class ModelHost:
    """The loaded pipeline. Used by the worker thread only (and once before it starts)."""

    def __init__(self, config: ServerConfig, pipeline: Pipeline, entry: Entry, catalog: Catalog):
        self.config, self.catalog = config, catalog
        self.pipe: Pipeline | None = pipeline
        self.key: tuple[Entry, Entry | None, Entry | None, Entry | None] | None = (entry, None, None, None)
        self.sha256: dict[Path, str] = {}
        self._hashes: dict[tuple, str] = {}
        self.checker = None   # the safety checker, loaded once, given to every pipeline

    def get(self, checkpoint: Entry, vae: Entry | None, fields: tuple[str, ...] = FIELDS,
            refiner: Entry | None = None, hires: Entry | None = None) -> Pipeline:
        """The pipeline of ``checkpoint`` (+ ``vae``, + an SDXL ``refiner``, + a ``hires`` pass model),
        loaded if it is not the current one; a file that cannot be loaded is a 422 naming the field
        that chose it (``fields``: checkpoint's, VAE's, refiner's, hires'), without paths or contents."""
        fields = (*fields, *FIELDS[len(fields):])
        key = (checkpoint, vae, refiner, hires)
        if self.key != key:
            # a file that cannot load is refused before the model in use is given up
            for entry, field, kind, check in ((checkpoint, fields[0], "checkpoint", check_file),
                                              (vae, fields[1], "VAE", read_vae_file),
                                              (refiner, fields[2], "refiner", check_file),
                                              (hires, fields[3], "hires checkpoint", check_file)):
                if entry is not None:
                    try:
                        check(entry.path)
                    except SfumatoError as e:
                        raise _load_error(e, entry, kind, field) from None
            self.pipe = self.key = None
            gc.collect()
            try:
                self.pipe = load(checkpoint.path, vae=vae.path if vae else None, refiner=refiner.path if refiner else None,
                                 hires=hires.path if hires else None,
                                 dtype=self.config.dtype, device=self.config.device,
                                 embeddings_dir=_embeddings_dir(self.catalog), backend=self.config.backend,
                                 backend_precision=self.config.backend_precision, quant=self.config.quant)
            except SfumatoError as e:   # each file was readable alone: the one the message names (else the model)
                named = [(entry, kind, field) for entry, kind, field in
                         ((refiner, "refiner", fields[2]), (hires, "hires checkpoint", fields[3]),
                          (vae, "VAE", fields[1]))
                         if entry and (entry.path.name in str(e) or kind == "VAE" and "VAE" in str(e))]
                raise _load_error(e, *(named[0] if named else (checkpoint, "checkpoint", fields[0]))) from None
            self.key = key
        # prompt tags resolve through the catalog's folders: the names it lists are the files that load
        self.pipe.safety_checker, self.pipe.safety_action = self.checker, self.config.safety_action
        self.pipe.lora_folder = self.catalog.folder("lora")
        self.pipe.hypernet_folder = self.catalog.folder("hypernetwork")
        if checkpoint.path.is_file() and checkpoint.path not in self.sha256:
            self.sha256[checkpoint.path] = sha256_file(checkpoint.path)
            self.pipe.__dict__.setdefault("model_hash", self.sha256[checkpoint.path][:10])   # its cached_property
        return self.pipe

    def hash_of(self, path: Path) -> str:
        """A file's SHA-256, kept (by path, size and modification time)."""
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = sha256_file(path)
        return self._hashes[key]


def _load_error(e: SfumatoError, entry: Entry, kind: str, field: str) -> ApiError:
    """A model file that cannot be loaded, said without paths or contents (the log has them)."""
    log.warning("cannot load %s %s: %s", kind, entry.name, e)
    return ApiError(422, f"{kind} {entry.name!r} cannot be loaded: {e.public}", field)


@dataclass
class State:
    config: ServerConfig
    catalog: Catalog
    host: ModelHost
    queue: JobQueue
    defaults: Defaults

    def title(self, entry: Entry) -> str:
        sha = self.host.sha256.get(entry.path)
        return f"{entry.name} [{sha[:10]}]" if sha else entry.name

    def build(self, req: Txt2ImgRequest | Img2ImgRequest) -> Work | xyz.PlotWork:
        """A request validated in full: one run, or the cells of an X/Y/Z plot."""
        if xyz.wants_plot(req):
            return xyz.build_plot(req, self.defaults, self.catalog, self.config.limits)
        return a1111.build_work(req, self.defaults, self.catalog, self.config.limits)

    def submit(self, work: Work | xyz.PlotWork, origin: str) -> Job:
        def pipe_of(cell: Work) -> Pipeline:
            return self.host.get(cell.checkpoint, cell.vae, cell.fields, cell.refiner, cell.hires)

        def task(job: Job) -> dict[str, Any]:
            if isinstance(work, xyz.PlotWork):
                result = xyz.run_plot(work, job, pipe_of, self.config.watermark)
            else:
                result = a1111.run_work(work, job, pipe_of(work), self.config.watermark)
            if origin == "jobs":
                history.save_result(self.config.outputs_dir, result)
            return result

        try:
            return self.queue.submit(Job(task, kind=work.mode, origin=origin, n_iter=work.n_iter))
        except QueueFull as e:
            raise ApiError(429, str(e)) from None

    def job_status(self, job: Job, *, result: bool = True) -> dict[str, Any]:
        preview = job.preview
        return {
            "id": job.id, "mode": job.kind, "status": job.status, "position": self.queue.position(job),
            "created": job.created, "started": job.started, "finished": job.finished,
            "progress": {"progress": job.progress(), "eta_relative": job.eta(), "iteration": job.iteration,
                         "n_iter": job.n_iter, "stage": job.stage, "step": job.step, "steps": job.steps},
            "current_image": a1111.encode_png(Image.fromarray(preview)) if preview is not None else None,
            "result": job.result if result else None,
            "error": job.error.body() if job.error else None,
        }


def _embeddings_dir(catalog: Catalog) -> Path | None:
    folder = catalog.folder("embedding")
    return folder.root if folder is not None and folder.root.is_dir() else None


def create_app(config: ServerConfig, pipeline: Pipeline | None = None) -> FastAPI:
    """The server for ``config``. ``pipeline``: the default model already loaded (else loaded here)."""
    from ..data import BUNDLED_PATH

    catalog = Catalog(Path(config.model) if config.model else BUNDLED_PATH, config.models_dir)
    default = catalog.default
    if pipeline is None:
        pipeline = load(default.path, dtype=config.dtype, device=config.device, embeddings_dir=_embeddings_dir(catalog),
                        backend=config.backend, backend_precision=config.backend_precision, quant=config.quant)
    host = ModelHost(config, pipeline, default, catalog)
    for entry in catalog.builtins[1:]:   # the bundled unCLIP variant: small, so titled with its hash from the start
        host.sha256[entry.path] = host.hash_of(entry.path)
    if config.safety_checker is not None:
        from ..checkpoint.safety import load_safety_checker

        host.checker = load_safety_checker(config.safety_checker, dtype=pipeline.engine.dtype,
                                           device=pipeline.engine.device)
    host.get(default, None)
    state = State(config, catalog, host, JobQueue(config.max_queue), Defaults(default))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.queue.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.queue.stop)

    app = FastAPI(title="sfumato", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion in PyTorch: AUTOMATIC1111-compatible API, job API, web UI.")
    app.state.sfumato = state
    _add_error_handlers(app)
    _add_a1111_routes(app, state)
    _add_job_routes(app, state)
    extras.add_routes(app, state)
    segment.add_routes(app, state)
    pose.add_routes(app, state)
    adetailer.add_routes(app, state)
    animatediff.add_routes(app, state)
    ui.add_routes(app, state)
    app.mount("/", StaticFiles(directory=STATIC, html=True), name="ui")
    app.add_middleware(Guard, credentials=config.api_auth, loopback_only=not config.listen,
                       max_body=config.limits.max_body, allowed_hosts=_allowed_hosts(config))
    return app


def _allowed_hosts(config: ServerConfig) -> frozenset[str] | None:
    if config.allowed_hosts is not None:
        return None if "*" in config.allowed_hosts else frozenset(config.allowed_hosts) | LOOPBACK_HOSTS
    if config.listen and config.api_auth is None:
        return machine_hosts(config.host or "")
    return None


# -- errors ---------------------------------------------------------------------------------------

def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first["loc"] if x != "body" and x not in _MODE_TAGS]
        if first.get("type", "").startswith("union_tag"):     # the job API's ``mode``
            loc.append(str(first.get("ctx", {}).get("discriminator", "")).strip("'"))
        name = ".".join(loc) or None
        return JSONResponse(ApiError(422, first["msg"], name).body(), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(ApiError(500, f"internal error ({type(e).__name__}); see the server log").body(), 500)


def _job_response(job: Job) -> dict[str, Any]:
    """An A1111 request's answer: its result, or the error that ended it."""
    if job.status in ("done", "interrupted"):
        return job.result
    raise job.error or ApiError(503, "the request was cancelled")


# -- A1111 -----------------------------------------------------------------------------------------

def _add_a1111_routes(app: FastAPI, state: State) -> None:
    v1 = "/sdapi/v1"

    async def generate(req: Txt2ImgRequest | Img2ImgRequest, request: Request) -> dict[str, Any]:
        # decoding images and building canvases is CPU work: off the event loop
        work = await run_in_threadpool(state.build, req)
        job = state.submit(work, "a1111")
        try:
            await wait(job, request, lambda: state.queue.cancel(job))
        finally:
            state.queue.forget(job)
        result = _job_response(job)
        if req.override_settings and not req.override_settings_restore_afterwards:
            state.defaults = a1111.apply_options(req.override_settings, state.defaults, state.catalog)
        return result

    @app.post(f"{v1}/txt2img", tags=["A1111"])
    async def txt2img(req: Txt2ImgRequest, request: Request) -> dict[str, Any]:
        return await generate(req, request)

    @app.post(f"{v1}/img2img", tags=["A1111"])
    async def img2img(req: Img2ImgRequest, request: Request) -> dict[str, Any]:
        return await generate(req, request)

    @app.get(f"{v1}/progress", tags=["A1111"])
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        job = state.queue.running
        if job is None:
            idle = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                    "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
                    "queued": state.queue.queued}
            return {"progress": 0.0, "eta_relative": 0.0, "state": idle, "current_image": None, "textinfo": None}
        preview = job.preview
        image = None
        if preview is not None and not skip_current_image:
            image = a1111.encode_png(Image.fromarray(preview))
        stopping = job.stopping
        return {
            "progress": job.progress(), "eta_relative": job.eta(),
            "state": {"skipped": stopping == "skip", "interrupted": stopping in ("interrupt", "cancel"),
                      "stopping_generation": False, "job": job.kind, "job_count": job.n_iter,
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
                      "job_no": job.iteration, "sampling_step": job.step, "sampling_steps": job.steps,
                      "queued": state.queue.queued},
            "current_image": image,
            "textinfo": f"{job.stage} step {job.step}/{job.steps}" if job.steps else None,
        }

    @app.post(f"{v1}/interrupt", tags=["A1111"])
    def interrupt() -> dict[str, Any]:
        """Interrupt the A1111 request now running (jobs of the job API stop only by their id)."""
        job = state.queue.running
        if job is not None and job.origin == "a1111":
            job.request_stop("interrupt")
        return {}

    @app.post(f"{v1}/skip", tags=["A1111"])
    def skip() -> dict[str, Any]:
        """Skip the current iteration of the A1111 request now running."""
        job = state.queue.running
        if job is not None and job.origin == "a1111":
            job.request_stop("skip")
        return {}

    @app.get(f"{v1}/options", tags=["A1111"])
    def get_options() -> dict[str, Any]:
        d = state.defaults
        return {
            "sd_model_checkpoint": state.title(d.checkpoint),
            "sd_checkpoint_hash": state.host.sha256.get(d.checkpoint.path),
            "sd_vae": d.vae.name if d.vae else "Automatic",
            "CLIP_stop_at_last_layers": d.clip_skip,
            "randn_source": {v: k for k, v in a1111.RNG_SOURCES.items()}[d.rng],
            "eta_noise_seed_delta": d.ensd,
            "samples_format": "png",
            "live_previews_enable": True,
            "show_progress_every_n_steps": 1,
        }

    @app.post(f"{v1}/options", tags=["A1111"])
    async def set_options(values: dict[str, Any] = Body(...)) -> None:
        """Set options from the allow-list ``SETTABLE_OPTIONS``; a model switch loads it first."""
        new = a1111.apply_options(values, state.defaults, state.catalog)
        if (new.checkpoint, new.vae) != (state.defaults.checkpoint, state.defaults.vae):
            try:
                job = state.queue.submit(Job(lambda job: state.host.get(new.checkpoint, new.vae), kind="load",
                                             origin="options"))
            except QueueFull as e:
                raise ApiError(429, str(e)) from None
            try:
                await wait(job)
            finally:
                state.queue.forget(job)
            _job_response(job)
        state.defaults = new

    @app.get(f"{v1}/samplers", tags=["A1111"])
    def samplers() -> list[dict[str, Any]]:
        return extras.samplers()

    @app.get(f"{v1}/schedulers", tags=["A1111"])
    def schedulers() -> list[dict[str, Any]]:
        return extras.schedulers()

    @app.get(f"{v1}/sd-models", tags=["A1111"])
    def sd_models() -> list[dict[str, Any]]:
        out = []
        for entry in state.catalog.entries("checkpoint"):
            sha = state.host.sha256.get(entry.path)
            out.append({"title": state.title(entry), "model_name": entry.model_name, "hash": sha[:10] if sha else None,
                        "sha256": sha, "filename": entry.name, "config": None})
        return out

    @app.get(f"{v1}/sd-vae", tags=["A1111"])
    def sd_vae() -> list[dict[str, Any]]:
        return [{"model_name": e.stem, "filename": e.name} for e in state.catalog.entries("vae")]

    @app.get(f"{v1}/loras", tags=["A1111"])
    def loras() -> list[dict[str, Any]]:
        return [{"name": e.stem, "alias": e.stem, "path": e.name, "metadata": {}}
                for e in state.catalog.entries("lora")]

    @app.get(f"{v1}/prompt-styles", tags=["A1111"])
    def prompt_styles() -> list[dict[str, Any]]:
        try:
            styles = state.catalog.styles()
        except SfumatoError:
            raise ApiError(503, "the server's styles.csv cannot be read (see the server log)") from None
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in styles.values()]

    @app.get(f"{v1}/hypernetworks", tags=["A1111"])
    def hypernetworks() -> list[dict[str, Any]]:
        return [{"name": e.stem, "path": e.name} for e in state.catalog.entries("hypernetwork")]

    @app.get(f"{v1}/embeddings", tags=["A1111"])
    def embeddings() -> dict[str, Any]:
        found = state.host.pipe.embeddings if state.host.pipe is not None else None
        if found is None:
            return {"loaded": {}, "skipped": {}}
        none = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
        loaded = {name: {**none, "shape": int(next(iter(e.vectors.values())).shape[-1]), "vectors": e.num_vectors}
                  for name, e in found.embeddings.items()}
        return {"loaded": loaded, "skipped": {name: {**none, "shape": None, "vectors": None} for name in found.skipped}}

    @app.post(f"{v1}/refresh-checkpoints", tags=["A1111"])
    def refresh_checkpoints() -> None:
        state.catalog.refresh()

    @app.post(f"{v1}/png-info", tags=["A1111"])
    def png_info(req: PngInfoRequest) -> dict[str, Any]:
        return extras.png_info(decode_image(req.image, "image", state.config.limits))

    @app.get(f"{v1}/memory", tags=["A1111"])
    def memory() -> dict[str, Any]:
        return {"ram": _ram(), "cuda": _cuda()}

    @app.get(f"{v1}/scripts", tags=["A1111"])
    def scripts() -> dict[str, Any]:
        # "controlnet m2m" is how clients (webuiapi) tell that the ControlNet extension's API is here
        return {"txt2img": [xyz.TITLE, "controlnet m2m"], "img2img": [xyz.TITLE, "controlnet m2m"]}

    @app.get("/controlnet/version", tags=["ControlNet"])
    def controlnet_version() -> dict[str, Any]:
        return {"version": extensions.CONTROLNET_VERSION}

    @app.get("/controlnet/model_list", tags=["ControlNet"])
    def controlnet_model_list(update: bool = True) -> dict[str, Any]:
        """The ControlNet folder's models as the extension lists them: ``name [8 hex digits of sha256]``."""
        if update:
            state.catalog.refresh()
        return {"model_list": [f"{e.stem} [{state.host.hash_of(e.path)[:8]}]" for e in state.catalog.entries("controlnet")]}

    @app.get("/controlnet/module_list", tags=["ControlNet"])
    def controlnet_module_list(alias_names: bool = False) -> dict[str, Any]:
        return {"module_list": extensions.available_modules(state.catalog), "module_detail": {}}

    @app.post("/controlnet/detect", tags=["ControlNet"])
    async def controlnet_detect(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return await run_in_threadpool(extensions.detect, body, state.config.limits, state.catalog,
                                       resolve_device(state.config.device))


def _ram() -> dict[str, Any]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (AttributeError, ValueError, OSError):
        return {"error": "not available on this system"}
    return {"free": free, "used": total - free, "total": total}


def _cuda() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"error": "CUDA is not available"}
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()

    def pair(kind: str) -> dict[str, int]:
        return {"current": stats.get(f"{kind}_bytes.all.current", 0), "peak": stats.get(f"{kind}_bytes.all.peak", 0)}

    return {"system": {"free": free, "used": total - free, "total": total},
            "active": pair("active"), "allocated": pair("allocated"), "reserved": pair("reserved")}


# -- the job API -------------------------------------------------------------------------------------

JobRequest = Annotated[Union[Txt2ImgJob, Img2ImgJob], Field(discriminator="mode")]


def _add_job_routes(app: FastAPI, state: State) -> None:
    def find(job_id: str) -> Job:
        job = state.queue.get(job_id)
        if job is None or job.origin != "jobs":
            raise ApiError(404, "no such job", "id")
        return job

    @app.post("/v1/jobs", status_code=202, tags=["jobs"])
    def create_job(req: JobRequest) -> dict[str, Any]:
        """Queue a txt2img or img2img request (A1111's fields plus ``mode``); returns its ``id``."""
        work = state.build(req)
        job = state.submit(work, "jobs")
        return {"id": job.id, "status": job.status, "position": state.queue.position(job)}

    @app.get("/v1/xyz/axes", tags=["jobs"])
    def xyz_axes(mode: str = "txt2img") -> list[dict[str, Any]]:
        """The X/Y/Z plot's axis types of a tab (``script_args`` names them by index), and which vary here."""
        if mode not in xyz.AXES:
            raise ApiError(422, "must be txt2img or img2img", "mode")
        return xyz.axes(mode)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: str) -> dict[str, Any]:
        """Status, progress with a preview, and when done the A1111-shaped ``result``."""
        return state.job_status(find(job_id))

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"])
    def cancel_job(job_id: str) -> dict[str, Any]:
        """Cancel this job only: a queued one leaves the queue, a running one stops at its next step."""
        job = find(job_id)
        if not state.queue.cancel(job):
            raise ApiError(409, f"the job has already finished ({job.status})", "id")
        return {"id": job.id, "status": job.status}

    @app.post("/v1/jobs/{job_id}/interrupt", tags=["jobs"])
    def interrupt_job(job_id: str) -> dict[str, Any]:
        """Stop this job at its next step and keep what it has made, as A1111's Interrupt does: the
        finished iterations and the current one's latest image come back as its result."""
        job = find(job_id)
        if not job.request_stop("interrupt"):
            raise ApiError(409, f"the job has already finished ({job.status})", "id")
        return {"id": job.id, "status": job.status}

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"])
    async def job_events(job_id: str) -> StreamingResponse:
        """Server-sent events: ``progress`` while the job waits or runs, then one ``end`` with the result."""
        job = find(job_id)

        async def stream():
            seen, beat = None, time.monotonic()
            while True:
                key = (job.version, state.queue.position(job))
                if key != seen:
                    seen, beat = key, time.monotonic()
                    done = job.done
                    data = json.dumps(state.job_status(job, result=done))
                    yield f"event: {'end' if done else 'progress'}\ndata: {data}\n\n"
                    if done:
                        return
                elif time.monotonic() - beat > 15:
                    beat = time.monotonic()
                    yield ": keep-alive\n\n"
                await asyncio.sleep(0.1)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
