"""The batch plan on a Ray cluster, with Ray Data.

Workers are a fixed pool of actors (``ActorPoolStrategy(size=workers)``), each loading the model once and generating
one job per call; they send back raw pixels and the infotexts, and the driver writes the files and
the manifest as results arrive (in any order), exactly as a local run does. Workers therefore need
no shared filesystem, only sfumato and the model file at the same path.

With no address a local cluster is started (and stopped afterwards); a session already started
with ``ray.init`` is used as it is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .batch import Job, Manifest, Rendered, record, render
from .errors import SfumatoError


class JobRenderer:
    """A Ray Data callable class: loads the model once per worker, then renders a batch of jobs."""

    def __init__(self, model: str, vae: str | None, prediction: str | None, dtype: str, threads: int,
                 watermark: bool, device: str = "auto"):
        import torch

        from .api import load

        torch.set_num_threads(threads)
        self.pipe = load(model, vae=vae, prediction=prediction, dtype=dtype, device=device)
        self.watermark = watermark

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [render(self.pipe, Job.from_json(str(text)), self.watermark).to_row() for text in batch["job"]]
        return {key: np.array([row[key] for row in rows], dtype=object) for key in ("meta", "pixels")}


def run_ray(todo: list[Job], out: str | Path, manifest: Manifest, *, model: str | Path,
            address: str | None = None, workers: int | None = None, threads: int | None = None,
            vae: str | None = None, prediction: str | None = None, dtype: str = "auto",
            watermark: bool = True, bar=None, device: str = "auto") -> None:
    """Generate ``todo`` on Ray: ``workers`` actors (default: one per GPU, else one), each with
    ``threads`` torch threads (default: the cluster's CPUs shared out among the workers) and one
    GPU if the cluster has any. ``address`` None starts a local cluster of this machine's CPUs."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address or None, num_cpus=None if address else os.cpu_count(),
                 include_dashboard=False, logging_level=logging.WARNING)
    try:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        workers = workers or max(gpus, 1)
        threads = threads or max(1, cpus // workers)
        _check_fits(workers, threads, gpus, cpus)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        renderer = dict(model=_absolute(model), vae=vae and _absolute(vae), prediction=prediction, dtype=dtype,
                        threads=threads, watermark=watermark, device=device)
        items = [{"job": job.to_json()} for job in todo]
        results = ray.data.from_items(items, override_num_blocks=len(items))
        results = results.map_batches(
            JobRenderer, fn_constructor_kwargs=renderer, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads, num_gpus=1 if gpus else 0,
        )
        by_index = {job.index: job for job in todo}
        for row in results.iter_rows():
            rendered = Rendered.from_row(row)
            record(out, manifest, by_index[rendered.index], rendered)
            if bar is not None:
                bar.update(1)
    finally:
        if started:
            ray.shutdown()


def _check_fits(workers: int, threads: int, gpus: int, cpus: int) -> None:
    """Refuse pools the cluster cannot schedule (Ray would wait for them for ever)."""
    if gpus and workers > gpus:
        raise SfumatoError(f"--workers: {workers} workers need a GPU each; the cluster has {gpus}")
    if workers * threads > cpus:
        raise SfumatoError(f"--workers: {workers} workers × {threads} threads need more than "
                           f"the cluster's {cpus} CPUs")



def _absolute(path: str | Path) -> str:
    """A path as workers must see it (their working folder is not the driver's)."""
    return str(Path(path).resolve()) if Path(path).exists() else str(path)
