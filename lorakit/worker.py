"""``lorakit worker``: render queued eval-grid jobs with warm pipelines.

One worker process loops: claim a job and the free jobs of its planned batch, render the batch in one pipeline
call, write the PNGs, add the outputs to the eval, mark the jobs succeeded. Several workers
(``torchrun``/``accelerate launch`` ranks, plain processes, other machines on one shared data folder) can work
on one queue because the claim is a read-decide-write under the job record's file lock: exactly one of them
flips a job from ``queued`` to ``running``.

A running job carries a lease ``{owner, expiresAt}`` that a heartbeat thread renews while the job renders.
When a worker dies, its lease runs out (or, on the same host, its pid is gone) and the job goes back to the
queue, up to ``maxAttempts`` claims; after that it ends ``failed``. A job whose rendering raises ends
``failed`` with the error text at once (a missing LoRA file will not reappear on retry) and the worker goes
on with the rest of the queue.

Pipelines are cached per checkpoint and each LoRA release is loaded once per pipeline under its own adapter
name. Switching release or strength is ``set_adapters``; strength 0 is ``disable_lora``. LoRAs are never
fused: unfusing is not exact and unloading after fusing leaves the weights baked into the shared pipeline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .config import release_weights_path
from .errors import LeaseLost, LorakitError, RecordError, RecordNotFoundError
from .evals import (
    JOB_TYPE,
    EvalError,
    cell_image_path,
    cleanup_eval,
    record_failure,
    record_failures,
    record_outputs,
)
from .families import Objective
from .families.objectives import DEFAULT_GUIDANCE_RESCALE
from .hashing import file_sha256
from .locks import pid_alive
from .loras import adapter_name
from .roots import Root
from .store import now_iso
from .workspace import Workspace, as_workspace

DEFAULT_LEASE_S = 120.0
DEFAULT_POLL_S = 2.0


# ---- identity and leases (pure) ------------------------------------------------------------------------
def worker_identity() -> str:
    """``host:pid`` (plus the rank under torchrun/accelerate), the owner written into a job's lease."""
    rank = os.environ.get("LOCAL_RANK")
    return f"{socket.gethostname()}:{os.getpid()}" + (f":rank{rank}" if rank is not None else "")


def parse_time(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
    except (AttributeError, ValueError):
        return None


def owner_is_dead(owner: str | None, host: str, alive: Callable[[int], bool] = pid_alive) -> bool:
    """Whether a lease owner is a process on this host that no longer exists (its lease need not be waited out).

    >>> owner_is_dead("h1:123", "h1", alive=lambda pid: False), owner_is_dead("h2:123", "h1", alive=lambda pid: False)
    (True, False)
    """
    parts = (owner or "").split(":")
    if len(parts) < 2 or parts[0] != host or not parts[1].isdigit():
        return False
    return not alive(int(parts[1]))


def lease_state(job: dict, now: datetime, host: str, alive: Callable[[int], bool] = pid_alive) -> str:
    """What a worker may do with ``job``: ``claimable``, ``busy`` (another worker holds a live lease),
    ``exhausted`` (its lease ran out on the last allowed attempt: fail it) or ``done``.

    >>> t = datetime(2026, 1, 1, tzinfo=UTC)
    >>> lease_state({"status": "queued"}, t, "h")
    'claimable'
    >>> job = {"status": "running", "attempt": 1, "maxAttempts": 3, "lease": {"owner": "x:1", "expiresAt": "2025-12-31T23:59:00.000Z"}}
    >>> lease_state(job, t, "h"), lease_state({**job, "attempt": 3}, t, "h")
    ('claimable', 'exhausted')
    """
    status = job.get("status")
    if status == "queued":
        return "claimable"
    if status != "running":
        return "done"
    lease = job.get("lease") or {}
    expires = parse_time(lease.get("expiresAt"))
    expired = expires is None or now >= expires or owner_is_dead(lease.get("owner"), host, alive)
    if not expired:
        return "busy"
    return "exhausted" if int(job.get("attempt") or 0) >= int(job.get("maxAttempts") or 1) else "claimable"


# ---- claiming ------------------------------------------------------------------------------------------
@dataclass
class Claim:
    job: dict
    project: str


def _job_projects(ws: Workspace, project: str | None) -> list[str]:
    return [project] if project else ws.store.list_projects()


def claim_job(ws: Workspace, project: str, job_id: str, owner: str, lease_s: float,
              on_exhausted: Callable[[dict, str], None] | None = None,
              accept: Callable[[dict], bool] | None = None) -> Claim | None:
    """Claim one ``eval_render`` job if it is claimable (and ``accept``-ed), else None.

    The unlocked read only filters; the decision is re-made on a fresh read under the job's lock, so two
    workers never both flip one job to running. A job whose lease ran out on its last attempt is failed here.
    """
    store = ws.store
    host = socket.gethostname()
    try:
        job = store.read("job", job_id, project, validate=False)
    except LorakitError:
        return None  # removed since the listing (cleanup), or not ours to judge
    if job.get("type") != JOB_TYPE or lease_state(job, datetime.now(UTC), host) in ("busy", "done"):
        return None
    if accept is not None and not accept(job):
        return None
    with store.claim("job", job_id, project) as path:
        if not path.exists():
            return None
        job = store.read_path(path, "job")
        now = datetime.now(UTC)
        state = lease_state(job, now, host)
        if state == "claimable" and (accept is None or accept(job)):
            job.update(status="running", attempt=int(job.get("attempt") or 0) + 1, updatedAt=now_iso(now),
                       startedAt=now_iso(now),
                       lease={"owner": owner, "claimedAt": now_iso(now), "expiresAt": now_iso(now + timedelta(seconds=lease_s))})
            job.pop("error", None)
            store.write_locked("job", job, path)
            return Claim(job, project)
        if state != "exhausted":
            return None
        owner_before = (job.get("lease") or {}).get("owner")
        job.update(status="failed", updatedAt=now_iso(now), finishedAt=now_iso(now),
                   error=f"lease of worker {owner_before} ran out on attempt {job.get('attempt')} of "
                         f"{job.get('maxAttempts')} (the worker died or hung); not retried")
        job.pop("lease", None)
        store.write_locked("job", job, path)
    if on_exhausted is not None:
        on_exhausted(job, project)
    return None


def claim_next_job(ws: Workspace, projects: list[str], owner: str, lease_s: float,
                   on_exhausted: Callable[[dict, str], None] | None = None,
                   on_invalid: Callable[[str], None] | None = None) -> Claim | None:
    """Claim the oldest claimable ``eval_render`` job of ``projects``, or None when there is none.

    A job record that is broken or invalid (a hand edit, a bad merge) is passed over, with ``on_invalid`` told
    why, so one bad file does not stop the queue behind it; ``lorakit validate`` names it too."""
    for project in projects:
        for job_id in ws.store.list_ids("job", project):
            try:
                claim = claim_job(ws, project, job_id, owner, lease_s, on_exhausted)
            except RecordError as exc:
                if on_invalid is not None:
                    on_invalid(str(exc))
                continue
            if claim is not None:
                return claim
    return None


def batch_of(job: dict) -> dict:
    """The planned batch of a job: ``{"id", "cells": [{cellKey, jobId, seed, positivePrompt, negativePrompt}]}``.
    A job planned without one (an older grid) is a batch of itself.

    >>> job = {"id": "j1", "input": {"cellKey": "base__p00__s1", "settings": {"seed": 1, "positivePrompt": "a"}}}
    >>> batch_of(job)["cells"]
    [{'cellKey': 'base__p00__s1', 'jobId': 'j1', 'seed': 1, 'positivePrompt': 'a', 'negativePrompt': ''}]
    """
    data = job["input"]
    batch = data.get("batch")
    if isinstance(batch, dict) and batch.get("cells"):
        return batch
    settings = data["settings"]
    return {"id": data["cellKey"], "cells": [{"cellKey": data["cellKey"], "jobId": job.get("id"),
                                              "seed": settings["seed"], "positivePrompt": settings["positivePrompt"],
                                              "negativePrompt": settings.get("negativePrompt") or ""}]}


def claim_batch(ws: Workspace, first: Claim, owner: str, lease_s: float, limit: int,
                on_exhausted: Callable[[dict, str], None] | None = None) -> list[Claim]:
    """``first`` and whichever other jobs of its planned batch this worker can claim, at most ``limit`` in all.

    Jobs of the batch that another worker holds, or that are done, stay where they are: the batch is rendered
    whole anyway (a cell's pixels depend on its batch) and only the claimed cells are written.
    """
    batch = batch_of(first.job)

    def same_batch(job: dict) -> bool:
        data = job.get("input") or {}
        return data.get("evalId") == first.job["input"]["evalId"] and (data.get("batch") or {}).get("id") == batch["id"]

    claims = [first]
    for member in batch["cells"]:
        if len(claims) >= limit:
            break
        job_id = member.get("jobId")
        if not job_id or job_id == first.job["id"]:
            continue
        try:
            claim = claim_job(ws, first.project, job_id, owner, lease_s, on_exhausted, accept=same_batch)
        except RecordError:
            continue  # a broken member stays where it is; claim_next_job reports it
        if claim is not None:
            claims.append(claim)
    return claims


def _own(job: dict, owner: str) -> bool:
    return job.get("status") == "running" and (job.get("lease") or {}).get("owner") == owner


def finish_job(ws: Workspace, claim: Claim, owner: str, change: Callable[[dict], None]) -> bool:
    """Apply ``change`` to the claimed job if this worker still owns it; False when it was taken over or removed."""
    with ws.store.claim("job", claim.job["id"], claim.project) as path:
        if not path.exists():
            return False
        job = ws.store.read_path(path, "job")
        if not _own(job, owner):
            return False
        change(job)
        job.pop("lease", None)
        job["updatedAt"] = now_iso()
        if job["status"] in ("succeeded", "failed"):
            job["finishedAt"] = job["updatedAt"]
        ws.store.write_locked("job", job, path)
        return True


class LeaseKeeper:
    """Renews the leases of the claimed jobs from a background thread while their batch renders."""

    def __init__(self, ws: Workspace, claims: list[Claim], owner: str, lease_s: float):
        self._ws, self._claims, self._owner, self._lease_s = ws, list(claims), owner, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lease-keeper")

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(max(0.5, self._lease_s / 3)):
            def renew(job: dict) -> None:
                if not _own(job, self._owner):
                    raise LeaseLost(f"job {job.get('id')} is no longer held by {self._owner}")
                job["lease"]["expiresAt"] = now_iso(datetime.now(UTC) + timedelta(seconds=self._lease_s))

            for claim in list(self._claims):
                try:
                    self._ws.store.update("job", claim.job["id"], renew, claim.project)
                except (LeaseLost, RecordNotFoundError):
                    self._claims.remove(claim)  # taken over or removed: finish_job will find it is not ours
                except Exception:  # noqa: BLE001 - a failed renewal is retried at the next beat
                    continue


# ---- pipelines -----------------------------------------------------------------------------------------
def default_device() -> str:
    """``cuda:<LOCAL_RANK>`` under torchrun/accelerate on GPUs, ``cuda`` alone, else ``cpu``."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


def share_cpu_threads(device: str) -> None:
    """Under torchrun/accelerate on CPU, give each of the local processes its share of the cores: every
    process using all of them oversubscribes the CPU and rendering slows down several times over."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if device.startswith("cpu") and local > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


@dataclass
class WarmPipeline:
    """A loaded pipeline and the LoRA releases loaded into it, by adapter name."""

    checkpoint_id: str
    pipe: Any  # a diffusers pipeline with its LoRA mixins; the class depends on the checkpoint's family
    weights_hash: str | None
    default_scheduler: Any  # the diffusers scheduler the checkpoint ships
    adapters: dict[str, str] = field(default_factory=dict)   # adapter name -> weights path
    # (scheduler class name, objective) -> the scheduler built for it from the checkpoint's own config
    schedulers: dict[tuple[str, Objective], object] = field(default_factory=dict)


class PipelineCache:
    """One warm pipeline per checkpoint (the least recently used is dropped beyond ``max_pipelines``)."""

    def __init__(self, ws: Workspace, device: str | None = None, dtype: str | None = None, max_pipelines: int = 2):
        import torch

        self.ws = ws
        self.device = device or default_device()
        share_cpu_threads(self.device)
        names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        chosen = dtype or ("float16" if self.device.startswith("cuda") else "float32")
        if chosen not in names:
            raise EvalError(f"unknown dtype {chosen!r} (expected one of {', '.join(names)})")
        self.dtype = names[chosen]
        self.max_pipelines = max(1, max_pipelines)
        self._warm: OrderedDict[str, WarmPipeline] = OrderedDict()
        self._verified: dict[str, str] = {}   # weights path -> sha256 checked once per process
        self.loads = 0
        self.load_seconds = 0.0  # spent loading pipelines and LoRA releases

    def get(self, checkpoint_id: str) -> WarmPipeline:
        if checkpoint_id in self._warm:
            self._warm.move_to_end(checkpoint_id)
            return self._warm[checkpoint_id]
        from .models.loading import load_pipeline
        from .models.registry import checkpoint_weights_hash, get_checkpoint

        started = time.perf_counter()
        record = get_checkpoint(self.ws, checkpoint_id)
        pipe = load_pipeline(self.ws, record, torch_dtype=self.dtype, device=self.device)
        pipe.set_progress_bar_config(disable=True)
        self.loads += 1
        warm = WarmPipeline(checkpoint_id, pipe, checkpoint_weights_hash(self.ws, record, record=False, missing_ok=True),
                             pipe.scheduler)
        self._warm[checkpoint_id] = warm
        self.load_seconds += time.perf_counter() - started
        while len(self._warm) > self.max_pipelines:
            self._warm.popitem(last=False)
            _free_memory()
        return warm

    def put(self, checkpoint_id: str, pipe: Any) -> WarmPipeline:
        """Use ``pipe``, already built (a notebook's, a benchmark's random-weight full-size one), as the warm
        pipeline of ``checkpoint_id``; it is not loaded again."""
        from .models.registry import checkpoint_weights_hash, get_checkpoint

        record = get_checkpoint(self.ws, checkpoint_id)
        pipe.set_progress_bar_config(disable=True)
        warm = WarmPipeline(checkpoint_id, pipe, checkpoint_weights_hash(self.ws, record, record=False, missing_ok=True),
                            pipe.scheduler)
        self._warm[checkpoint_id] = warm
        return warm

    def adapter(self, warm: WarmPipeline, lora: dict, sha256: str | None) -> str:
        """The adapter name of a release in ``warm``, loading its weights (checked against ``sha256``) once."""
        name = adapter_name(lora["id"], lora["releaseId"], sha256)
        if name in warm.adapters:
            return name
        started = time.perf_counter()
        path = lora_weights_path(self.ws, lora)
        if sha256 and self._verified.get(str(path)) != sha256:
            actual = file_sha256(path)
            if actual.lower() != sha256.lower():
                raise EvalError(f"LoRA {lora['id']} release {lora['releaseId']}: weights file {path} has sha256 "
                                f"{actual}, the grid was planned with {sha256} (file replaced since?)")
            self._verified[str(path)] = sha256
        from .models.loading import load_lora_file, needs_unload_before

        if needs_unload_before(warm.pipe, path):
            warm.pipe.unload_lora_weights()
            warm.adapters.clear()
        try:
            with warnings.catch_warnings(), _quiet_logger("diffusers.loaders.lora_base"):
                # peft warns whenever a model gets a second adapter; several adapters is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                # and diffusers warns for every UNet-only LoRA that it has no text-encoder keys
                load_lora_file(warm.pipe, path, name)
        except Exception:
            with contextlib.suppress(Exception):
                warm.pipe.delete_adapters(name)
            raise
        warm.adapters[name] = str(path)
        self.load_seconds += time.perf_counter() - started
        return name


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Only errors from logger ``name`` while the block runs."""
    import logging

    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def lora_weights_path(ws: Workspace, lora: dict) -> Path:
    """The weights file of a job's ``input.lora``, by the same rules as the release's own record."""
    release = {"id": lora.get("releaseId"), "weights": lora.get("weights"), "localPath": lora.get("localPath")}
    return release_weights_path(release, ws.config, f"LoRA {lora.get('id')} release {release.get('id')}")


def use_scheduler(warm: WarmPipeline, name: str | None, objective: Objective | None = None) -> str:
    """Put scheduler class ``name`` on the pipeline, built once from the checkpoint's own config and set up to
    sample ``objective``'s checkpoints (``Objective.render_scheduler``: v-prediction, zero terminal SNR); no
    objective is epsilon's, which keeps the shipped scheduler as it is."""
    objective = objective or Objective()
    default_name = type(warm.default_scheduler).__name__
    name = default_name if not name or name == "default" else name
    key = (name, objective)
    if key not in warm.schedulers:
        if name == default_name:
            base = warm.default_scheduler
        else:
            import diffusers

            cls = getattr(diffusers, name, None)
            if cls is None or not name.endswith("Scheduler"):
                raise EvalError(f"unknown scheduler {name!r} (a diffusers scheduler class name, e.g. "
                                "EulerDiscreteScheduler)")
            base = cls.from_config(warm.default_scheduler.config)
        try:
            warm.schedulers[key] = objective.render_scheduler(base)
        except ValueError as exc:
            raise EvalError(f"checkpoint {warm.checkpoint_id}: {exc}") from None
    warm.pipe.scheduler = warm.schedulers[key]
    return name


def job_objective(settings: dict) -> Objective:
    """The objective a job's settings render for (``objective``, written by the grid); a job from before
    grids recorded it is an epsilon checkpoint's."""
    if "objective" not in settings:
        return Objective()
    try:
        return Objective.from_record(settings["objective"])
    except ValueError as exc:
        raise EvalError(f"settings.objective: {exc}") from None


def job_guidance_rescale(settings: dict) -> float:
    """The guidance rescale of a job's settings: a number from 0 to 1, else the default."""
    value = settings.get("guidanceRescale", DEFAULT_GUIDANCE_RESCALE)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise EvalError(f"settings.guidanceRescale must be a number from 0 to 1, got {value!r}")
    return float(value)


def render_batch(cache: PipelineCache, job: dict):
    """Render the planned batch of ``job`` in one pipeline call; returns ``({cellKey: PIL image}, scheduler name)``.

    Every cell gets its own seeded generator, so its starting noise is the one a single render of that seed has.
    """
    import torch

    settings = job["input"]["settings"]
    cells = batch_of(job)["cells"]
    warm = cache.get(settings["checkpointId"])
    planned = settings.get("checkpointWeightsHash")
    if planned and warm.weights_hash and planned != warm.weights_hash:
        raise EvalError(f"checkpoint {settings['checkpointId']}: weights changed since the grid was planned "
                        f"(now {warm.weights_hash[:12]}, planned {planned[:12]})")
    strength = float(settings.get("strength") or 0)
    if strength == 0:
        if warm.adapters:
            warm.pipe.disable_lora()
    else:
        name = cache.adapter(warm, job["input"]["lora"], settings.get("releaseSha256"))
        warm.pipe.enable_lora()
        warm.pipe.set_adapters([name], adapter_weights=[strength])
    objective = job_objective(settings)
    scheduler = use_scheduler(warm, settings.get("scheduler"), objective)
    negatives = [c.get("negativePrompt") or "" for c in cells]
    generators = [torch.Generator("cpu").manual_seed(int(c["seed"])) for c in cells]
    with torch.inference_mode():
        result = warm.pipe(
            prompt=[c["positivePrompt"] for c in cells],
            # None, not empty strings: SDXL renders an absent negative prompt as zeros (plan_batches keeps
            # cells with and without one apart)
            negative_prompt=negatives if any(negatives) else None,
            width=int(settings["width"]), height=int(settings["height"]),
            num_inference_steps=int(settings["steps"]), guidance_scale=float(settings["cfg"]), generator=generators,
            **objective.render_kwargs(job_guidance_rescale(settings)),
        )
    return {c["cellKey"]: image for c, image in zip(cells, result.images, strict=True)}, scheduler


def render_cell(cache: PipelineCache, job: dict):
    """Render one job's cell (with the rest of its planned batch); returns ``(PIL image, scheduler name)``."""
    images, scheduler = render_batch(cache, job)
    return images[job["input"]["cellKey"]], scheduler


# ---- images --------------------------------------------------------------------------------------------
def a1111_parameters(settings: dict) -> str:
    """The settings in the ``parameters`` text other tools (A1111, ComfyUI loaders) read from a PNG.

    >>> print(a1111_parameters({"positivePrompt": "a shield", "steps": 4, "scheduler": "PNDMScheduler", "cfg": 5.0,
    ...                         "seed": 1, "width": 64, "height": 64, "checkpointId": "tiny", "batchSize": 3,
    ...                         "batchPos": 1, "strength": 0.0}))
    a shield
    Steps: 4, Sampler: PNDMScheduler, CFG scale: 5.0, Seed: 1, Size: 64x64, Model: tiny, Model hash: , Batch size: 3, Batch pos: 1
    """
    lines = [settings.get("positivePrompt", "")]
    if settings.get("negativePrompt"):
        lines.append(f"Negative prompt: {settings['negativePrompt']}")
    parts = [f"Steps: {settings.get('steps')}", f"Sampler: {settings.get('scheduler')}",
             f"CFG scale: {settings.get('cfg')}", f"Seed: {settings.get('seed')}",
             f"Size: {settings.get('width')}x{settings.get('height')}",
             f"Model: {settings.get('checkpointId')}", f"Model hash: {(settings.get('checkpointWeightsHash') or '')[:10]}"]
    given = settings.get("objective")
    objective = given if isinstance(given, dict) else {}
    if objective.get("prediction") == "v":
        parts.append("Prediction: v" + (", Zero terminal SNR: True" if objective.get("zeroTerminalSnr") else ""))
    if "guidanceRescale" in settings:
        parts.append(f"Guidance rescale: {settings['guidanceRescale']}")
    if int(settings.get("batchSize") or 1) > 1:
        parts.append(f"Batch size: {settings['batchSize']}, Batch pos: {settings.get('batchPos', 0)}")
    if float(settings.get("strength") or 0):
        parts.append(f"Lora hashes: \"{settings.get('loraId')}: {(settings.get('releaseSha256') or '')[:12]}\"")
        parts.append(f"Lora strength: {settings.get('strength')}")
    lines.append(", ".join(parts))
    return "\n".join(lines)


def write_png(image, path: Path, settings: dict, root: Root) -> None:
    """Write ``image`` with its settings in PNG text chunks, atomically (temp file, fsync, rename), inside
    ``root`` (the data root): an eval folder that is, or becomes, a link is refused, never written through.

    Temp files of this cell left by a killed worker are removed first: whoever holds the job's lease is
    the only writer of its cell.
    """
    from PIL.PngImagePlugin import PngInfo

    folder = root.make_folder(path.parent)
    for stale in folder.glob(f".{path.name}.*.tmp"):  # left by a worker killed mid-write
        root.remove(stale)
    info = PngInfo()
    info.add_text("lorakit", json.dumps(settings, sort_keys=True, ensure_ascii=False))
    info.add_text("parameters", a1111_parameters(settings))
    with root.atomic(path) as handle:
        image.save(handle, format="PNG", pnginfo=info)


def read_png_settings(path: str | Path) -> dict:
    """The settings a worker wrote into a PNG's ``lorakit`` text chunk."""
    from PIL import Image
    from PIL.PngImagePlugin import PngImageFile

    with Image.open(path) as image:
        if not isinstance(image, PngImageFile):
            raise EvalError(f"{path}: not a PNG ({image.format}); lorakit writes its settings only into PNG images")
        return json.loads(image.text["lorakit"])


# ---- the loop ------------------------------------------------------------------------------------------
@dataclass
class WorkerStats:
    owner: str
    rendered: list[str] = field(default_factory=list)   # job ids
    failed: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)    # failed because their lease ran out too often
    seconds: float = 0.0
    pipeline_loads: int = 0
    load_seconds: float = 0.0  # of ``seconds``: loading pipelines and LoRA releases

    @property
    def processed(self) -> int:
        return len(self.rendered) + len(self.failed)


def process_batch(ws: Workspace, cache: PipelineCache, claims: list[Claim], owner: str, lease_s: float,
                  log: Callable[[str], None], recorded: dict[str, dict] | None = None) -> tuple[list[str], list[str]]:
    """Render the batch of the claimed jobs (one planned batch, one eval) and record each result; returns the
    ids of the jobs that succeeded and of those that failed.

    ``recorded`` gets each job's ``output`` as soon as its image is on the eval, so that a worker stopped
    between that and marking the job succeeded finishes the job instead of queueing it again.
    """
    recorded = {} if recorded is None else recorded
    first = claims[0].job["input"]
    eval_id, eval_project = first["evalId"], first.get("evalProjectId")
    started = time.perf_counter()
    try:
        with LeaseKeeper(ws, claims, owner, lease_s):
            targets = [cell_image_path(ws, claim.job["input"]) for claim in claims]  # checked before rendering
            images, scheduler = render_batch(cache, claims[0].job)
            seconds = round(time.perf_counter() - started, 3)
            # cleanup-eval removes an eval's jobs and images under the eval's lock; under the same lock, only
            # the cells whose jobs this worker still holds are written, so a batch whose jobs were removed (or
            # taken over) while it rendered leaves no image and no output behind the cleanup.
            with ws.store.claim("eval", eval_id, eval_project):
                held = [(c, t) for c, t in zip(claims, targets, strict=True) if _still_held(ws, c, owner)]
                outputs = []
                for claim, target in held:
                    data = claim.job["input"]
                    settings = {**data["settings"], "scheduler": scheduler}
                    write_png(images[data["cellKey"]], target, settings, ws.store.fs)
                    outputs.append({**settings, "images": [data["imagePath"]], "cellKey": data["cellKey"],
                                    "jobId": claim.job["id"], "worker": owner, "renderedAt": now_iso(),
                                    "renderSeconds": seconds})
                eval_record = record_outputs(ws, eval_id, eval_project, outputs) if outputs else None
        recorded.update({c.job["id"]: {"image": c.job["input"]["imagePath"], "evalId": eval_id, "scheduler": scheduler}
                         for c, _ in held})
    except Exception as exc:  # noqa: BLE001 - any failure of one batch is recorded on its jobs; the queue goes on
        return [], _record_batch_failure(ws, claims, owner, eval_id, eval_project, exc, log)
    elapsed = time.perf_counter() - started
    for claim in claims:
        if claim.job["id"] not in recorded:
            log(f"[{owner}] job {claim.job['id']} cell {claim.job['input']['cellKey']} was removed (cleanup-eval) or "
                "taken over while it rendered; its image is not written")
    claims = [c for c, _ in held]
    for claim in claims:
        data = claim.job["input"]
        _succeed(ws, claim, owner, recorded[claim.job["id"]])
        log(f"[{owner}] job {claim.job['id']} cell {data['cellKey']} rendered in {elapsed:.2f}s "
            f"(batch of {len(images)}) -> {data['imagePath']}")
    if eval_record is not None and eval_record["status"] == "complete" and eval_record.get("autoCleanup"):
        report = cleanup_eval(ws, claims[0].project, eval_id)
        log(f"[{owner}] eval {eval_id} complete: auto-cleanup removed {len(report.jobs)} job(s)")
    return [c.job["id"] for c in claims], []


def _record_batch_failure(ws: Workspace, claims: list[Claim], owner: str, eval_id: str, eval_project: str | None,
                          exc: Exception, log: Callable[[str], None]) -> list[str]:
    """Put a failed batch's jobs where they belong; returns their ids.

    An error of the machine (``OSError``: a full or read-only disk) is not the job's fault: the job goes back in
    the queue while it has attempts left, and only then fails. Any other error fails the job at once and is noted
    on the eval. When even that cannot be written, the job keeps its lease, which expires, and another worker
    (or this one) retries it; ``normalize-evals`` later notes failures an eval missed.
    """
    error = f"{type(exc).__name__}: {exc}"
    retry = isinstance(exc, OSError)
    failures = []
    for claim in claims:
        cell = claim.job["input"].get("cellKey")
        attempts_left = int(claim.job.get("attempt") or 1) < int(claim.job.get("maxAttempts") or 1)
        try:
            if retry and attempts_left:
                if finish_job(ws, claim, owner, lambda j: j.update(status="queued", error=error)):
                    log(f"[{owner}] job {claim.job['id']} cell {cell} back in the queue after: {error}")
                continue
            if finish_job(ws, claim, owner, lambda j: j.update(status="failed", error=error)):
                failures.append({"cellKey": cell, "jobId": claim.job["id"], "error": error, "at": now_iso()})
            log(f"[{owner}] job {claim.job['id']} cell {cell} failed: {error}")
        except (LorakitError, OSError) as write_error:
            log(f"[{owner}] job {claim.job['id']} cell {cell} failed ({error}) and the job could not be updated "
                f"({write_error}); its lease will expire and it will be retried")
    if failures:
        try:
            # Under the eval's lock, as outputs are: a job cleanup-eval removed meanwhile is not noted.
            with ws.store.claim("eval", eval_id, eval_project):
                failures = [f for f in failures if ws.store.exists("job", f["jobId"], claims[0].project)]
                if failures:
                    record_failures(ws, eval_id, eval_project, failures)
        except (LorakitError, OSError) as write_error:
            log(f"[{owner}] eval {eval_id}: the failures could not be noted ({write_error}); "
                "run `lorakit lora normalize-evals` once the disk has room")
    return [c.job["id"] for c in claims]


def _still_held(ws: Workspace, claim: Claim, owner: str) -> bool:
    """Whether this worker still holds ``claim``'s job (it exists, is running and the lease is ours)."""
    try:
        return _own(ws.store.read("job", claim.job["id"], claim.project, validate=False), owner)
    except LorakitError:
        return False


def _succeed(ws: Workspace, claim: Claim, owner: str, output: dict) -> None:
    finish_job(ws, claim, owner, lambda j: j.update(status="succeeded", output=output))


def _requeue(ws: Workspace, claim: Claim, owner: str) -> None:
    finish_job(ws, claim, owner, lambda j: j.update(status="queued", attempt=max(0, int(j.get("attempt", 1)) - 1)))


def run_worker(
    ws: Workspace | str | Path | None = None,
    project: str | None = None,
    *,
    once: bool = False,
    max_jobs: int | None = None,
    lease_seconds: float = DEFAULT_LEASE_S,
    poll_seconds: float = DEFAULT_POLL_S,
    device: str | None = None,
    dtype: str | None = None,
    cache: PipelineCache | None = None,
    log: Callable[[str], None] = print,
) -> WorkerStats:
    """Claim and render ``eval_render`` jobs (of ``project``, or of every project) until stopped.

    A worker claims a job and the other jobs of its planned batch that are free, and renders them in one
    pipeline call. ``once``: stop when no job is claimable; ``max_jobs``: stop after that many jobs. Without
    either, poll every ``poll_seconds`` forever. Ctrl-C or SIGTERM puts the jobs in hand back in the queue
    (those whose images are already on the eval are marked succeeded instead).

    >>> run_worker("data", "demo", once=True)        # doctest: +SKIP
    """
    ws = as_workspace(ws)
    owner = worker_identity()
    cache = cache or PipelineCache(ws, device=device, dtype=dtype)
    stats = WorkerStats(owner)
    start = time.perf_counter()

    reported: set[str] = set()

    def note_invalid(message: str) -> None:
        if message not in reported:  # polled again and again: once per run is enough
            reported.add(message)
            log(f"[{owner}] skipping a job record: {message}")

    def note_expired(job: dict, job_project: str) -> None:
        stats.expired.append(job["id"])
        log(f"[{owner}] job {job['id']} failed: {job.get('error')}")
        data = job.get("input") or {}
        with contextlib.suppress(LorakitError, KeyError):
            record_failure(ws, data["evalId"], data.get("evalProjectId"),
                           {"cellKey": data.get("cellKey"), "jobId": job["id"], "error": job.get("error", ""),
                            "at": now_iso()})

    log(f"[{owner}] worker started: jobs of {('project ' + project) if project else 'every project'}, "
        f"device {cache.device}")
    restore = _sigterm_as_interrupt()
    try:
        while max_jobs is None or stats.processed < max_jobs:
            claim = claim_next_job(ws, _job_projects(ws, project), owner, lease_seconds, note_expired, note_invalid)
            if claim is None:
                if once:
                    break
                time.sleep(poll_seconds)
                continue
            limit = (max_jobs - stats.processed) if max_jobs is not None else len(batch_of(claim.job)["cells"])
            claims = claim_batch(ws, claim, owner, lease_seconds, limit, note_expired)
            recorded: dict[str, dict] = {}
            try:
                rendered, failed = process_batch(ws, cache, claims, owner, lease_seconds, log, recorded)
            except KeyboardInterrupt:
                for each in claims:
                    with contextlib.suppress(Exception):
                        if each.job["id"] in recorded:
                            _succeed(ws, each, owner, recorded[each.job["id"]])
                        else:
                            _requeue(ws, each, owner)
                raise
            stats.rendered.extend(rendered)
            stats.failed.extend(failed)
    finally:
        restore()
        stats.seconds = time.perf_counter() - start
        stats.pipeline_loads = cache.loads
        stats.load_seconds = cache.load_seconds
    return stats


def _sigterm_as_interrupt() -> Callable[[], None]:
    """torchrun stops its workers with SIGTERM; treat it like Ctrl-C so the job in hand is requeued."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore
