"""The server's defences: one ASGI middleware for the checks every request passes (Host, HTTP
Basic auth, CSRF, body size), request limits, safe image decoding, and the catalog that resolves
model / VAE / LoRA / embedding names only inside their folders.

Order of the checks, cheapest and most fundamental first: a loopback-only server answers only
loopback ``Host`` names (no DNS rebinding); with credentials every request must carry them; a
state-changing request must not come from another site (``Origin``, ``Sec-Fetch-Site``) and must
send JSON; its body is counted while it streams in and refused past the limit before any parsing.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..checkpoint.folders import FolderEntry, ModelFolder, plain_name, strip_title_hash
from ..errors import NameNotFoundError

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


class ApiError(Exception):
    """An error answered as JSON ``{"error", "field", "detail"}`` with an HTTP status."""

    def __init__(self, status: int, detail: str, field: str | None = None, error: str | None = None):
        super().__init__(f"{field}: {detail}" if field else detail)
        self.status, self.detail, self.field = status, detail, field
        self.error = error or _REASONS.get(status, "error")

    def body(self) -> dict[str, Any]:
        detail = f"{self.field}: {self.detail}" if self.field else self.detail
        # a message may quote what the client sent: no lone surrogates in a JSON body (UTF-8)
        return {"error": self.error, "field": _printable(self.field), "detail": _printable(detail)}


def _printable(text: str | None) -> str | None:
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


_REASONS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict",
            413: "too_large", 415: "unsupported_media_type", 421: "misdirected_request", 422: "invalid_parameter",
            429: "queue_full", 500: "internal_error", 503: "unavailable"}


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for. Image sizes are pixels; bodies are bytes."""

    max_body: int = 64 << 20
    max_image_pixels: int = 4096 * 4096      # of a decoded input image
    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_batch_size: int = 8
    max_n_iter: int = 32
    max_total_pixels: int = 1 << 24          # width·height·(hires scale)²·batch_size·n_iter
    max_prompt_length: int = 16384           # characters of a prompt or negative prompt
    max_prompt_workload: int = 262144        # characters over its schedule and AND-parts (prompt_workload)


# GenerationParams fields → the A1111 field a client sent (errors name what the client knows)
A1111_FIELDS = {
    "refiner": "refiner_checkpoint", "refiner_switch": "refiner_switch_at", "hires_checkpoint": "hr_checkpoint_name",
    "eta_noise_seed_delta": "override_settings.eta_noise_seed_delta",
    "sampler": "sampler_name", "strength": "denoising_strength", "hires_scale": "hr_scale",
    "hires_steps": "hr_second_pass_steps", "hires_denoise": "denoising_strength", "hires_upscaler": "hr_upscaler",
    "hires_sampler": "hr_sampler_name", "hires_scheduler": "hr_scheduler", "hires_prompt": "hr_prompt",
    "hires_negative_prompt": "hr_negative_prompt",
    "masked_content": "inpainting_fill", "only_masked": "inpaint_full_res",
    "only_masked_padding": "inpaint_full_res_padding", "init_image": "init_images",
    "clip_skip": "override_settings.CLIP_stop_at_last_layers", "rng": "override_settings.randn_source",
}

# -- the request guard ------------------------------------------------------------------------

class Guard:
    """Pure ASGI middleware: Host, auth, CSRF and body-size checks for every HTTP request."""

    def __init__(self, app, *, credentials: tuple[str, str] | None, loopback_only: bool, max_body: int,
                 allowed_hosts: Iterable[str] | None = None):
        self.app = app
        self.credentials = (credentials[0].encode(), credentials[1].encode()) if credentials else None
        self.loopback_only = loopback_only
        self.max_body = max_body
        # ``Host`` names answered (DNS rebinding): loopback only, the given ones, or None for any
        self.allowed_hosts = LOOPBACK_HOSTS if loopback_only else \
            frozenset(h.lower() for h in allowed_hosts) if allowed_hosts is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self._check_host(headers)
            self._check_auth(headers)
            if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
                self._check_csrf(scope, headers)
            if scope["type"] == "http" and _has_body(headers):
                receive = await self._buffer_body(headers, receive)
        except ApiError as e:
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            extra = {"www-authenticate": 'Basic realm="sfumato"'} if e.status == 401 else {}
            return await send_json(send, e.status, e.body(), extra)
        await self.app(scope, receive, _with_headers(send))

    def _check_host(self, headers: dict[str, str]) -> None:
        if self.allowed_hosts is None or host_name(headers.get("host", "")) in self.allowed_hosts:
            return
        if self.loopback_only:
            raise ApiError(421, "this server answers loopback host names only (start it with --listen)", "host")
        raise ApiError(421, "this server does not answer that host name (see --allowed-hosts)", "host")

    def _check_auth(self, headers: dict[str, str]) -> None:
        if self.credentials is None:
            return
        user, password = b"", b""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(token.strip(), validate=True).partition(b":")
            except (binascii.Error, ValueError):
                pass
        ok_user = hmac.compare_digest(user, self.credentials[0])
        ok_password = hmac.compare_digest(password, self.credentials[1])
        if not (ok_user & ok_password):
            raise ApiError(401, "authentication required")

    def _check_csrf(self, scope, headers: dict[str, str]) -> None:
        fetch_site = headers.get("sec-fetch-site", "").lower()
        if fetch_site and fetch_site not in ("same-origin", "none"):
            raise ApiError(403, f"cross-site request refused (Sec-Fetch-Site: {fetch_site})", "origin")
        origin = headers.get("origin")
        if origin is not None:
            own = _normal_origin(f"{scope.get('scheme', 'http')}://{headers.get('host', '')}")
            if origin.strip().lower() == "null" or _normal_origin(origin) != own:
                raise ApiError(403, f"cross-origin request refused (Origin: {origin})", "origin")
        content_type = headers.get("content-type")
        if content_type is not None or _has_body(headers):
            media = (content_type or "").split(";")[0].strip().lower()
            if media != "application/json":
                raise ApiError(415, f"expected application/json, got {content_type or 'no content type'}",
                               "content-type")

    async def _buffer_body(self, headers: dict[str, str], receive):
        """Reads the whole body, refusing it (413) as soon as it passes the limit."""
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "invalid Content-Length", "content-length")
            if int(declared) > self.max_body:
                raise ApiError(413, f"body of {declared} bytes exceeds the limit of {self.max_body}", "body")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(413, f"body exceeds the limit of {self.max_body} bytes", "body")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


# on every response: no framing by other sites (clickjacking the UI), no MIME sniffing, no referrer
SECURITY_HEADERS = [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'"),
                    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"same-origin")]


def _with_headers(send):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
        await send(message)

    return wrapped


def _has_body(headers: dict[str, str]) -> bool:
    return headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers


def machine_hosts(*extra: str) -> frozenset[str]:
    """This machine's names and addresses as clients may write them in ``Host``: loopback, the host
    name, its fully qualified name, the addresses they resolve to, and ``extra`` (the bound address)."""
    names = set(LOOPBACK_HOSTS) | {h.lower() for h in extra if h and h not in ("0.0.0.0", "::")}
    for name in {socket.gethostname(), socket.getfqdn()}:
        names.add(name.lower())
        try:
            names.update(info[4][0].lower() for info in socket.getaddrinfo(name, None))
        except OSError:
            pass
    return frozenset(names)


def host_name(host: str) -> str:
    """``Host`` header → lower-case name without port (``[::1]:7860`` → ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _normal_origin(origin: str) -> str:
    scheme, _, rest = origin.strip().lower().partition("://")
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if default and rest.endswith(default):
        rest = rest[: -len(default)]
    return f"{scheme}://{rest.rstrip('/')}"


async def send_json(send, status: int, body: Any, extra_headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra_headers or {}).items()] + SECURITY_HEADERS
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def parse_credentials(text: str) -> tuple[str, str]:
    """``user:pass`` → (user, pass); both must be non-empty."""
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--api-auth: expected USER:PASSWORD with both parts non-empty")
    return user, password


# -- images ---------------------------------------------------------------------------------

def decode_image(data: str, field: str, limits: Limits) -> Image.Image:
    """A base64 image (optionally a ``data:`` URL) → a loaded PIL image.

    The encoded size is checked before decoding and the pixel count from the header before PIL
    decodes any pixel, so neither a huge string nor a decompression bomb costs memory.
    """
    if not isinstance(data, str) or not data:
        raise ApiError(422, "expected a base64-encoded image", field)
    data = _DATA_URL.sub("", data.strip(), count=1)
    if len(data) > limits.max_body:
        raise ApiError(413, f"encoded image of {len(data)} bytes exceeds the limit of {limits.max_body}", field)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "not valid base64", field) from None
    try:
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise ApiError(413, f"image has too many pixels (limit {limits.max_image_pixels})", field) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ApiError(422, f"not a PNG, JPEG or WebP image ({e})", field) from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise ApiError(413, f"image of {width}x{height} pixels exceeds the limit of {limits.max_image_pixels}",
                       field)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ApiError(422, f"cannot decode image ({e})", field) from None
    return image


# -- names resolved inside their folders -------------------------------------------------------

KINDS = ("checkpoint", "vae", "lora", "embedding", "hypernetwork", "controlnet", "upscaler", "clip_vision", "sam",
         "annotator", "adetailer", "motion")
SUBFOLDERS = {"vae": "VAE", "lora": "Lora", "embedding": "embeddings", "hypernetwork": "hypernetworks",
              "controlnet": "ControlNet", "upscaler": "upscalers", "clip_vision": "clip_vision", "sam": "sam",
              "annotator": "annotators", "adetailer": "adetailer", "motion": "animatediff"}
SUFFIXES = {
    "checkpoint": (".safetensors", ".ckpt"),
    "vae": (".safetensors", ".ckpt", ".pt"),
    "lora": (".safetensors", ".pt", ".ckpt"),
    "embedding": (".safetensors", ".pt", ".bin"),
    "hypernetwork": (".pt",),
    "controlnet": (".safetensors", ".pth", ".ckpt", ".pt"),
    "upscaler": (".safetensors", ".ckpt"),
    "clip_vision": (".safetensors", ".pth", ".bin"),
    "sam": (".pth", ".safetensors"),
    "annotator": (".pth", ".pt", ".safetensors"),
    "adetailer": (".onnx",),
    "motion": (".ckpt", ".safetensors", ".pth", ".pt"),
}
LABELS = {"checkpoint": "models folder", "vae": "VAE folder", "lora": "Lora folder", "embedding": "embeddings folder",
          "hypernetwork": "hypernetworks folder", "controlnet": "ControlNet folder", "upscaler": "upscalers folder",
          "clip_vision": "clip_vision folder", "sam": "sam folder", "annotator": "annotators folder",
          "adetailer": "adetailer folder", "motion": "animatediff folder"}
Entry = FolderEntry


def check_name(name: object, field: str) -> str:
    """A name as clients send it: relative, ``/``-separated, no ``..``, no NUL, no drive."""
    if plain_name(name) is None:
        if not isinstance(name, str) or not name.strip():
            raise ApiError(422, "expected a non-empty name", field)
        raise ApiError(422, f"{name[:200]!r} is not a name inside the models folder", field)
    return name


class Catalog:
    """The models a server may load: its default model, and files inside ``models_dir``.

    Checkpoints (files, and diffusers folders holding ``model_index.json``) live in the folder
    itself; VAEs, LoRAs, embeddings, hypernetworks, ControlNets (and IP-Adapters), CLIP image
    encoders, x4 upscalers, Segment Anything models and the ControlNet annotators' networks in its
    ``VAE``, ``Lora``, ``embeddings``, ``hypernetworks``, ``ControlNet``, ``clip_vision``,
    ``upscalers``, ``sam`` and ``annotators`` subfolders, ADetailer's ONNX detectors in
    ``adetailer`` and AnimateDiff's motion modules in ``animatediff``. Each
    kind is a ``checkpoint.folders.ModelFolder``: the one resolver
    the pipeline uses too, so a name the catalog answers is the file that loads.
    """

    def __init__(self, default: Path, models_dir: Path | None = None):
        self.models_dir = models_dir.resolve() if models_dir is not None else None
        self.folders: dict[str, ModelFolder] = {}
        self._styles: dict = {}
        self._styles_stamp: int | None = None
        if self.models_dir is not None:
            for kind in KINDS:
                root = self.models_dir / SUBFOLDERS[kind] if kind in SUBFOLDERS else self.models_dir
                self.folders[kind] = ModelFolder(kind, root, SUFFIXES[kind], label=LABELS[kind],
                                                 skip=SUBFOLDERS.values() if kind == "checkpoint" else (),
                                                 diffusers=kind == "checkpoint")
        default = Path(default)
        inside = self.folders.get("checkpoint")
        listed = [e for e in inside.entries() if e.path.resolve() == default.resolve()] if inside else []
        # the operator's own choice may lie anywhere; listed under its folder name when it lies there
        self.default = listed[0] if listed else FolderEntry("checkpoint", default.name, default.resolve(),
                                                            default.is_dir())
        # listed beside the folders' files: the default checkpoint, and with the bundled model its unCLIP
        # variant (a checkpoint) and its motion module
        from ..data import BUNDLED_MOTION_PATH, BUNDLED_PATH, BUNDLED_UNCLIP_PATH

        self.builtins = [self.default]
        self.motion_builtins: list[FolderEntry] = []
        if default.resolve() == BUNDLED_PATH and BUNDLED_UNCLIP_PATH.is_file():
            self.builtins.append(FolderEntry("checkpoint", BUNDLED_UNCLIP_PATH.name, BUNDLED_UNCLIP_PATH, False))
        if default.resolve() == BUNDLED_PATH and BUNDLED_MOTION_PATH.is_file():
            self.motion_builtins.append(FolderEntry("motion", BUNDLED_MOTION_PATH.name, BUNDLED_MOTION_PATH, False))

    def styles(self) -> dict:
        """A1111's prompt styles from ``models_dir/styles.csv`` (read again when it changes)."""
        from ..text.styles import read_styles

        path = self.models_dir / "styles.csv" if self.models_dir is not None else None
        if path is None or not path.is_file():
            return {}
        stamp = path.stat().st_mtime_ns
        if self._styles_stamp != stamp:
            self._styles, self._styles_stamp = read_styles(path), stamp
        return self._styles

    def folder(self, kind: str) -> ModelFolder | None:
        return self.folders.get(kind)

    def refresh(self) -> None:
        for folder in self.folders.values():
            folder.entries(refresh=True)

    def entries(self, kind: str) -> list[Entry]:
        folder = self.folders.get(kind)
        found = folder.entries() if folder is not None else []
        if kind in ("checkpoint", "motion"):
            builtins = self.builtins if kind == "checkpoint" else self.motion_builtins
            paths = {e.path.resolve() for e in found}
            found = [e for e in builtins if e.path.resolve() not in paths] + found
        return found

    def find(self, kind: str, name: object, field: str) -> Entry:
        """The entry called ``name`` (its relative name, with or without extension, A1111's
        model name, or a title ``name [hash]``); 422 naming ``field`` if there is none."""
        check_name(name, field)
        folder = self.folders.get(kind)
        if kind in ("checkpoint", "motion"):
            listed = folder.entries() if folder is not None else []
            key = strip_title_hash(name)
            for entry in self.builtins if kind == "checkpoint" else self.motion_builtins:
                if entry not in listed and key in (entry.name, entry.base, entry.model_name):
                    return entry
        if folder is None:
            raise ApiError(422, f"unknown {kind} {name!r}: the server has no models folder (--models-dir)", field)
        try:
            return folder.find(name)
        except NameNotFoundError as e:
            raise ApiError(422, str(e), field) from None
