"""Scale-out of ``cellclf infer`` over Ray: one worker per GPU on one machine, or many machines.

Sits beside :func:`cellclf.pipeline.batch.run_batch`, which stays the driver: it expands the slides,
skips finished ones, alone writes ``manifest.csv`` and shows progress. This module only replaces the
local loop: each slide's work (:func:`~cellclf.pipeline.slide_job.process_slide`: run_slide →
results → review store) runs in a Ray actor. An actor is one long-lived worker process that loads
the engine once and opens its own :class:`~cellclf.review.store.ReviewStore` on the same URL. Actors
reserve ``num_gpus=1`` when CUDA GPUs are used (so one machine with N GPUs gets N workers, Ray
pinning each to its GPU through ``CUDA_VISIBLE_DEVICES``), else ``max(1, workers)`` CPUs each.
Slides go to whichever actor is free; the driver collects outcomes with ``ray.wait`` and records
each as it comes back, so a failed slide (or a crashed worker) becomes a failed row with its reason
and the batch goes on.

Ray is an optional extra (``pip install 'cellclf[ray]'``), imported only here and only when used.
Many machines need: cellclf installed on every node, slide, model and output paths that are the same
on every node (a shared file system), and a PostgreSQL review store (``--review-db
postgresql+psycopg://…``); the default SQLite store suits one machine only (SQLite's locking is not
safe over network file systems).
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellclf.errors import CellclfError
from cellclf.model.engine import load_engine
from cellclf.pipeline.slide_job import SlideJob, SlideOutcome, open_store, process_slide
from cellclf.versions import software_versions

MAX_RESTARTS = 2  # a worker that dies (segfault, out of memory) is restarted this often


def import_ray() -> Any:
    """Ray, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise CellclfError("--ray and --gpus need Ray, which is not installed: "
                           "pip install 'cellclf[ray]'") from exc
    return ray


class SlideWorker:
    """One Ray actor: the engine and the review store, loaded once, then slides one at a time."""

    def __init__(self, job: SlideJob, review_url: str, device: str):
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        self.job = job
        self.engine = load_engine(job.model, backend=job.backend, device=device, batch=job.batch,
                                  precision=job.precision)
        self.store = open_store(review_url, self.engine.card)
        self.versions = software_versions()
        self.where = f"{socket.gethostname()} pid {os.getpid()} {self.engine.backend} on {device}"

    def ready(self) -> str:
        return self.where

    def run(self, path: str, slide_id: str, index: int) -> SlideOutcome:

        return process_slide(self.job, Path(path), slide_id, index, self.engine, self.store,
                             self.versions)


def connect(ray: Any, address: str | None, gpus: int) -> bool:
    """Join (or start) a Ray cluster; True when this call started it (and must shut it down).

    ``address``: ``local`` starts a private instance on this machine, ``auto`` joins the cluster
    started here with ``ray start``, ``host:port`` or ``ray://host:port`` joins a remote one. No
    address (``--gpus`` alone) starts a local instance. A process already connected to Ray (a
    notebook, a test) keeps its connection and the address is not used."""
    if ray.is_initialized():
        return False
    address = address or "local"
    kwargs: dict[str, Any] = {"log_to_driver": False}
    if address == "local":
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise CellclfError(f"cannot connect to Ray at {address!r}: {exc}. Start a cluster with "
                           "`ray start --head`, or use --ray local") from exc
    return True


def plan_workers(resources: dict[str, float], n_slides: int, gpus: int, device: str,
                 workers: int) -> tuple[int, dict[str, float], str]:
    """How many actors, what each reserves, and the device they run on (pure: tested by hand).

    ``gpus`` > 0 asks for that many GPU workers (an error when the cluster has fewer GPUs);
    otherwise every GPU of the cluster gets a worker unless ``device`` is cpu; without GPUs each
    worker reserves ``max(1, workers)`` CPUs."""
    n_gpu = int(resources.get("GPU", 0))
    if gpus > n_gpu:
        raise CellclfError(f"--gpus {gpus} asks for more GPUs than Ray sees ({n_gpu}): check "
                           "nvidia-smi and CUDA_VISIBLE_DEVICES, or lower --gpus")
    if gpus > 0 or (n_gpu > 0 and device != "cpu"):
        n = gpus or n_gpu
        worker_device = "cuda" if device == "auto" or device.startswith("cuda") else device
        return max(1, min(n, n_slides)), {"num_gpus": 1, "num_cpus": 1}, worker_device
    per_worker = max(1, workers)
    n = max(1, int(resources.get("CPU", 1) // per_worker))
    return max(1, min(n, n_slides)), {"num_cpus": per_worker}, device


def run_on_ray(job: SlideJob, todo: list[tuple[int, Path, str]], review_url: str,
               record: Callable[[SlideOutcome, Path], None], *, console: Any = None,
               address: str | None = None, gpus: int = 0) -> int:
    """Run ``todo`` = [(index, path, slide_id)] on Ray actors; ``record(outcome, path)`` is called
    in the driver as each slide comes back. Returns the number of workers used."""
    if not todo:
        return 0
    ray = import_ray()
    started = connect(ray, address, gpus)
    try:
        n, resources, device = plan_workers(ray.cluster_resources(), len(todo), gpus, job.device,
                                            job.workers)
        if "num_gpus" not in resources:  # CPU workers: reader threads = the CPUs they reserve
            job = SlideJob(**{**job.__dict__, "workers": int(resources["num_cpus"])})
        actor_cls = ray.remote(SlideWorker).options(max_restarts=MAX_RESTARTS, **resources)
        actors = [actor_cls.remote(job, review_url, device) for _ in range(n)]
        try:
            where = ray.get([a.ready.remote() for a in actors])
        except ray.exceptions.RayError as exc:
            raise CellclfError(f"Ray workers could not start: {_short(exc)}") from exc
        if console is not None:
            console.print(f"{n} Ray worker(s): " + "; ".join(where))
        _dispatch(ray, actors, todo, record)
        return n
    finally:
        if started:
            ray.shutdown()


def _dispatch(ray: Any, actors: list, todo: list[tuple[int, Path, str]],
              record: Callable[[SlideOutcome, Path], None]) -> None:
    """Keep every actor busy with one slide; record outcomes in completion order."""
    queue = deque(todo)
    pending: dict[Any, tuple[Any, Path, str]] = {}

    def submit(actor: Any) -> None:
        _index, path, slide_id = queue.popleft()
        ref = actor.run.remote(str(Path(path).resolve()), slide_id, _index)
        pending[ref] = (actor, path, slide_id)

    for actor in actors:
        if queue:
            submit(actor)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ref = ready[0]
        actor, path, slide_id = pending.pop(ref)
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the worker process died (crash, out of memory)
            outcome = SlideOutcome.failed(slide_id, str(path), f"Ray worker failed: {_short(exc)}")
        record(outcome, path)
        if queue:
            submit(actor)


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
