"""Batch generation: one txt2img request per line of a JSONL or CSV file, resumable.

A job file holds one request per line: JSONL objects, or CSV rows under a header naming the
columns. ``prompt`` is required; any other :data:`FIELDS` entry overrides the run's settings
for that line (empty CSV cells and JSON ``null`` mean "not given"). Every line is validated
before any work, and a bad one is reported as ``line N: field: message``.

Seeds: a line without a seed (or with ``-1``) gets ``base_seed + index``, ``index`` being its
0-based position among the jobs; image k of a job with ``batch_size`` > 1 uses ``seed + k`` as
everywhere in sfumato. So a rerun, a resumed run and the Ray path make the same images (on the
same hardware and the same number of torch threads: CPU reductions depend on it).

Outputs: ``OUT/{index:05d}-{k}.png`` (infotext inside), written atomically, then one line per
finished job appended to ``OUT/manifest.jsonl``: index, line, files, seed, seeds, sha256 of each
file, the request as run and the model. A restart skips jobs whose entry exists and whose files
are present with those hashes; anything else (a job killed between its images and its entry, a
file deleted since) is generated again. An entry made with other settings or another model is an
error: the folder belongs to another run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .checkpoint.io import sha256_file
from .errors import SfumatoError
from .pipeline.images import save_image
from .pipeline.params import MAX_SEED, GenerationParams, ParamError

MANIFEST = "manifest.jsonl"
# img2img / inpainting settings and the refiner have no meaning in a txt2img batch
_NOT_IN_BATCH = {"init_image", "mask", "strength", "mask_blur", "only_masked", "only_masked_padding",
                 "masked_content", "refiner", "refiner_switch"}
_KINDS: dict[str, type] = {"str": str, "str | None": str, "int": int, "float": float}
# per-line settings → their type (GenerationParams fields, in its order)
FIELDS: dict[str, type] = {
    f.name: _KINDS[f.type] for f in dataclasses.fields(GenerationParams)
    if f.name not in _NOT_IN_BATCH and f.type in _KINDS
}
_SIZE_PLACEHOLDER = 512   # validation stand-in for a width/height left to the model's native size


@dataclass(frozen=True)
class Job:
    """One line's request. ``settings`` holds every :data:`FIELDS` entry, validated and with a
    concrete seed; ``width``/``height`` are None where the model's native size applies."""

    index: int
    line: int
    settings: dict[str, Any]

    @property
    def files(self) -> list[str]:
        return [f"{self.index:05d}-{k}.png" for k in range(self.settings["batch_size"])]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Job":
        return cls(**json.loads(text))


# -- reading and planning ----------------------------------------------------------------------


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """The raw settings of each line, with its 1-based line number: ``.jsonl``/``.ndjson`` or ``.csv``.
    Blank lines are skipped. Raises SfumatoError (``line N: …``) on syntax errors."""
    path = Path(path)
    if not path.is_file():
        raise SfumatoError(f"jobs: {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".csv":
        return _read_csv(path)
    raise SfumatoError(f"jobs: unsupported file type {suffix!r} (use .jsonl or .csv)")


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8-sig") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise SfumatoError(f"line {number}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict):
                raise SfumatoError(f"line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, {k: v for k, v in row.items() if v is not None}))
    return rows


def _read_csv(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return []
        header = [name.strip() for name in header]
        for name in header:
            if name not in FIELDS:
                raise SfumatoError(f"line 1: {name or '(empty)'}: unknown column; valid: {', '.join(FIELDS)}")
        if "prompt" not in header:
            raise SfumatoError("line 1: prompt: missing column")
        number = reader.line_num + 1
        for cells in reader:
            if any(cell.strip() for cell in cells):
                if len(cells) != len(header):
                    raise SfumatoError(f"line {number}: expected {len(header)} fields, got {len(cells)}")
                row = {}
                for name, cell in zip(header, cells):
                    if cell.strip():
                        row[name] = _convert(number, name, cell)
                rows.append((number, row))
            number = reader.line_num + 1
    return rows


def _convert(number: int, name: str, cell: str) -> Any:
    kind = FIELDS[name]
    if kind is str:
        return cell
    try:
        return kind(cell.strip())
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise SfumatoError(f"line {number}: {name}: must be {what}, got {cell!r}") from None


def plan_jobs(rows: Iterable[tuple[int, dict[str, Any]]], overrides: dict[str, Any] | None = None,
              base_seed: int = 0) -> list[Job]:
    """Validate every row over the run's ``overrides`` (a row's own values win) and give each a
    concrete seed. Raises SfumatoError naming the first bad line (and how many more there are)."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ParamError(unknown[0], f"not a batch setting; valid: {', '.join(FIELDS)}")
    if not isinstance(base_seed, int) or not 0 <= base_seed <= MAX_SEED:
        raise ParamError("seed", f"the base seed must be in [0, {MAX_SEED}], got {base_seed!r}")
    _validate({"prompt": "", **overrides})
    jobs: list[Job] = []
    errors: list[str] = []
    for number, row in rows:
        try:
            jobs.append(_plan_one(len(jobs), number, row, overrides, base_seed))
        except ParamError as e:
            errors.append(f"line {number}: {e}")
    if errors:
        more = len(errors) - 1
        raise SfumatoError(errors[0] + (f" (and {more} more bad line{'s' * (more > 1)})" if more else ""))
    if not jobs:
        raise SfumatoError("jobs: the file holds no jobs")
    return jobs


def _plan_one(index: int, number: int, row: dict[str, Any], overrides: dict[str, Any], base_seed: int) -> Job:
    for name in row:
        if name not in FIELDS:
            raise ParamError(name, f"unknown field; valid: {', '.join(FIELDS)}")
    if "prompt" not in row:
        raise ParamError("prompt", "missing")
    settings = {**overrides, **row}
    if settings.get("seed", -1) == -1:
        settings["seed"] = base_seed + index
    p = _validate(settings)
    if p.subseed_strength > 0 and settings.get("subseed", -1) == -1:
        raise ParamError("subseed", "give a subseed with subseed_strength > 0 (a batch is reproducible)")
    planned = {name: getattr(p, name) for name in FIELDS}
    for name, kind in FIELDS.items():
        if kind is float:
            planned[name] = float(planned[name])
    for name in ("width", "height"):
        if name not in settings:
            planned[name] = None
    return Job(index, number, planned)


def _validate(settings: dict[str, Any]) -> GenerationParams:
    s = {**settings}
    for name in ("width", "height"):
        s.setdefault(name, _SIZE_PLACEHOLDER)
    return GenerationParams(**s).validated()


def load_jobs(path: str | Path, overrides: dict[str, Any] | None = None, base_seed: int = 0) -> list[Job]:
    """:func:`read_rows` then :func:`plan_jobs`."""
    return plan_jobs(read_rows(path), overrides, base_seed)


# -- generating one job ------------------------------------------------------------------------


@dataclass
class Rendered:
    """One job's images as raw RGB bytes, with what the manifest records (plain data, so that it
    travels from a Ray worker to the driver)."""

    index: int
    params: dict[str, Any]    # the request as run (native size filled in)
    seeds: list[int]
    infotexts: list[str]
    size: tuple[int, int]
    pixels: list[bytes]
    model: str
    model_hash: str | None

    def images(self) -> list[Image.Image]:
        return [Image.frombytes("RGB", tuple(self.size), data) for data in self.pixels]

    def to_row(self) -> dict[str, Any]:
        meta = dataclasses.asdict(self)
        del meta["pixels"]
        return {"meta": json.dumps(meta), "pixels": b"".join(self.pixels)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Rendered":
        meta = json.loads(row["meta"])
        w, h = meta["size"]
        data, n = bytes(row["pixels"]), w * h * 3
        return cls(**meta, pixels=[data[i:i + n] for i in range(0, len(data), n)])


def render(pipe, job: Job, watermark: bool = True) -> Rendered:
    """Generate ``job`` with a loaded :class:`sfumato.api.Pipeline`."""
    settings = dict(job.settings)
    for name in ("width", "height"):
        if settings[name] is None:
            settings[name] = pipe.model.spec.resolution
    result = pipe.run(pipe.params(**settings), watermark=watermark)
    images = [item.image.convert("RGB") for item in result.items]
    return Rendered(
        index=job.index,
        params={name: getattr(result.params, name) for name in FIELDS},
        seeds=[item.seed for item in result.items],
        infotexts=[item.infotext for item in result.items],
        size=images[0].size,
        pixels=[image.tobytes() for image in images],
        model=pipe.model_name,
        model_hash=pipe.model_hash,
    )


# -- the output folder and its manifest --------------------------------------------------------


class Manifest:
    """``manifest.jsonl``: one JSON line per finished job, each appended in one write and synced.
    A last line without its newline is a torn write (a crash mid-append) and does not count."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        """The entries, and whether the file ends in a torn line (dropped here; :meth:`rewrite` repairs)."""
        if not self.path.exists():
            return [], False
        *lines, tail = self.path.read_text(encoding="utf-8").split("\n")
        entries = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                int(entry["index"]), list(entry["files"]), list(entry["sha256"]), dict(entry["params"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise SfumatoError(f"{self.path}: line {number} is not a manifest entry") from None
            entries.append(entry)
        return entries, tail != ""

    def append(self, entry: dict[str, Any]) -> None:
        data = (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def rewrite(self, entries: list[dict[str, Any]]) -> None:
        """Replace the file atomically with ``entries``."""
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in entries)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def model_label(model: str | Path) -> str:
    """The model name a run records (as :attr:`Pipeline.model_name` has it)."""
    path = Path(model)
    return path.stem if path.is_file() else path.name


def open_run(jobs: list[Job], out: str | Path, model: str) -> tuple[Manifest, list[Job]]:
    """Prepare ``out`` for ``jobs`` made with the model named ``model``: keep the manifest entries
    whose files are intact (the file is rewritten, atomically, if any is dropped), remove leftover
    temporary files, and return the manifest and the jobs still to do."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SfumatoError(f"--out: {out} is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out / MANIFEST)
    entries, torn = manifest.read()
    latest = {entry["index"]: entry for entry in entries}
    done = {}
    for index, entry in sorted(latest.items()):
        if not 0 <= index < len(jobs):
            raise SfumatoError(f"{manifest.path}: item {index} is not in this job file "
                               f"({len(jobs)} jobs); use another --out")
        _check_same_request(jobs[index], entry, model, manifest.path)
        if _files_intact(out, entry):
            done[index] = entry
    if torn or len(done) != len(entries):
        manifest.rewrite(list(done.values()))
    for pattern in (".[0-9][0-9][0-9][0-9][0-9]-*.png.*.tmp", f".{MANIFEST}.*.tmp"):
        for leftover in out.glob(pattern):   # temporary files of writes cut short
            leftover.unlink(missing_ok=True)
    return manifest, [job for job in jobs if job.index not in done]


def _check_same_request(job: Job, entry: dict[str, Any], model: str, where: Path) -> None:
    differ = [name for name, value in job.settings.items()
              if value is not None and entry["params"].get(name) != value]
    if entry.get("model") != model:
        differ.append(f"model {entry.get('model')!r}")
    if differ:
        raise SfumatoError(f"{where}: item {job.index} (line {job.line}) was made with other settings "
                           f"({', '.join(differ)}); use another --out")


def _files_intact(out: Path, entry: dict[str, Any]) -> bool:
    return len(entry["files"]) == len(entry["sha256"]) and all(
        (out / name).is_file() and sha256_file(out / name) == digest
        for name, digest in zip(entry["files"], entry["sha256"])
    )


def record(out: str | Path, manifest: Manifest, job: Job, rendered: Rendered) -> dict[str, Any]:
    """Write a job's images atomically, then append its manifest entry; returns the entry."""
    out = Path(out)
    digests = []
    for name, image, text in zip(job.files, rendered.images(), rendered.infotexts, strict=True):
        digests.append(sha256_file(save_image(image, out / name, text)))
    entry = {
        "index": job.index, "line": job.line, "files": job.files, "seed": job.settings["seed"],
        "seeds": rendered.seeds, "sha256": digests, "params": rendered.params,
        "model": rendered.model, "model_hash": rendered.model_hash,
    }
    manifest.append(entry)
    return entry


def run_local(todo: list[Job], out: str | Path, manifest: Manifest, pipe, *, watermark: bool = True,
              bar=None) -> None:
    """Generate ``todo`` in this process, one job at a time, recording each as it finishes."""
    for job in todo:
        record(out, manifest, job, render(pipe, job, watermark))
        if bar is not None:
            bar.update(1)
