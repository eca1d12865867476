"""Hostile data roots: every file path a record schema marks (``x-lorakit-path``), planted with escapes, run
through every command that reads it.

A data root is untrusted input shared through Git, so no path in a record may make lorakit read, write or delete
anything outside its root. Each case copies the demo data (plus a tiny checkpoint, a LoRA release, a dataset, a
rendered eval grid and a queued one), plants one escape into one real record -- an absolute path or a ``..`` climb
to a canary outside the data root, or a path inside it that is a symbolic link (a file link, or a folder link
under ``files/``) to the canary; for weights references ``config_relative`` and ``repo_relative`` climbs and links
-- and runs one command. The folder the canaries live in must come out untouched: same bytes, same times (access
times are armed first, so a read shows too), nothing added, nothing removed. The command must refuse with an
``error: ...`` line (never a traceback); a report command (``lora list``, ``checkpoint list``,
``assets duplicates``) may instead name the path it passed over, and the worker may instead fail the job with an
error naming the path, or pass over a job record its schema refuses, naming the path. ``lorakit validate`` must name the record file and the JSON path of the escape.

The fields come from the schemas, not from a list kept here: :func:`marked_fields` walks them, and a field marked
later fails ``test_every_marked_field_has_hostile_cases`` until it gets its cases in ``FIELDS``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_demo_data
from PIL import Image

from lorakit.schemas import PATH_KEYWORD, SCHEMA_NAMES, _schemas, path_fields

PROJECT = "demo"
ASSET = "asset_ui_icon_00_0"      # an approved ui_icon asset of the demo: dataset build picks it
DATASET = "icons-ds"
LORA = "icons"
RELEASE = "r1"
CHECKPOINT = "tiny-sd15"
DONE_EVAL = "done"                # rendered: outputs and images, its jobs cleaned up
QUEUED_EVAL = "queued"            # two queued jobs: the base cell and r1 at strength 1
PROMPT = "ui icon of a shield"


# ---- the path fields, from the schemas -------------------------------------------------------------------------
# Schemas that are themselves a path (data-path, repo-path, weights-ref) are what record fields point at.
RECORD_SCHEMAS = tuple(name for name in SCHEMA_NAMES if PATH_KEYWORD not in _schemas()[name])


def marked_fields() -> dict[tuple[str, str], str]:
    """Every field a record schema marks with ``x-lorakit-path``, directly or through ``$ref``/``allOf``:
    ``{(schema name, JSON path pattern): root}``, e.g. ``("asset", "versions[].variants[].originalPath")``
    (``[]``: each item of a list, ``*``: each value of a map)."""
    schemas = _schemas()
    by_id = {s["$id"]: s for s in schemas.values()}
    found: dict[tuple[str, str], str] = {}

    def walk(name: str, schema: object, where: str, refs: frozenset[str]) -> None:
        if not isinstance(schema, dict):
            return
        if PATH_KEYWORD in schema:
            found[(name, where)] = schema[PATH_KEYWORD]
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref not in refs:
            walk(name, by_id[ref], where, refs | {ref})
        for key in ("allOf", "anyOf", "oneOf"):
            for part in schema.get(key) or []:
                walk(name, part, where, refs)
        for key in ("if", "then", "else"):
            walk(name, schema.get(key), where, refs)
        for key, sub in (schema.get("properties") or {}).items():
            walk(name, sub, f"{where}.{key}" if where else key, refs)
        items = schema.get("items")
        for sub in items if isinstance(items, list) else [items]:
            walk(name, sub, f"{where}[]", refs)
        for sub in [schema.get("additionalProperties"), *(schema.get("patternProperties") or {}).values()]:
            walk(name, sub, f"{where}.*" if where else "*", refs)

    for name in RECORD_SCHEMAS:
        walk(name, schemas[name], "", frozenset())
    return found


MARKED = marked_fields()

# What the schemas mark today; the walker must find at least these.
REQUIRED = {
    ("asset", "versions[].variants[].originalPath"), ("asset", "versions[].variants[].alphaPath"),
    ("asset", "versions[].variants[].previewPath"), ("dataset-manifest", "items[].path"),
    ("eval", "outputs[].images[]"), ("eval", "grid.imagesDir"), ("job", "input.imagePath"),
    ("lora", "releases[].localPath"), ("lora", "releases[].weights"),
    ("checkpoint", "weights"), ("checkpoint", "vaeWeights"), ("lora", "releases[].training.lossLog"),
}


# ---- JSON paths ------------------------------------------------------------------------------------------------
_STEP = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]")


def _steps(where: str) -> list[str | int]:
    assert where.startswith("$"), where
    return [int(index) if index else key for key, index in _STEP.findall(where[1:])]


def get_at(record: dict, where: str) -> object:
    value: object = record
    for step in _steps(where):
        try:
            value = value[step]  # type: ignore[index]
        except (KeyError, IndexError):
            return None
    return value


def set_at(record: dict, where: str, value: object) -> None:
    *parents, last = _steps(where)
    target: object = record
    for step in parents:
        target = target[step]  # type: ignore[index]
    target[last] = value  # type: ignore[index]


def pattern_of(where: str) -> str:
    """``$.versions[0].variants[0].originalPath`` -> ``versions[].variants[].originalPath``."""
    return re.sub(r"\[\d+\]", "[]", where[2:])


# ---- the outside folder: canaries, armed so that reads, writes and deletes all show ------------------------------
ARMED_AGE_NS = 1000 * 10**9  # access times are set this far before the modification time


def atime_shows_reads(folder: Path) -> bool:
    """Whether reading a file (or listing a folder) here moves its access time once it is older than its
    modification time (relatime does; noatime does not). Without it, reads show only where their effect does."""
    probe, sub = folder / "probe", folder / "probe-dir"
    probe.write_bytes(b"probe")
    sub.mkdir()
    for path in (probe, sub):
        st = os.lstat(path)
        os.utime(path, ns=(st.st_mtime_ns - ARMED_AGE_NS, st.st_mtime_ns))
    before = [os.lstat(p).st_atime_ns for p in (probe, sub)]
    probe.read_bytes()
    os.listdir(sub)
    after = [os.lstat(p).st_atime_ns for p in (probe, sub)]
    return all(b != a for b, a in zip(before, after, strict=True))


def _tree(folder: Path) -> list[Path]:
    paths = [folder]
    for top, dirs, files in os.walk(folder):
        paths += [Path(top) / name for name in sorted(dirs) + sorted(files)]
    return paths


class OutsideWatch:
    """Everything under the outside folder, armed: their bytes, sizes and times, with access times set back so
    that the first read or listing moves them."""

    def __init__(self, folder: Path, detects_reads: bool):
        self.folder, self.detects_reads = folder, detects_reads
        self.digests = {p: hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in _tree(folder) if p.is_file() and not p.is_symlink()}
        for path in _tree(folder):
            st = os.lstat(path)
            os.utime(path, ns=(st.st_mtime_ns - ARMED_AGE_NS, st.st_mtime_ns), follow_symlinks=False)
        self.stats = {p: os.lstat(p) for p in _tree(folder)}

    def problems(self) -> list[str]:
        """What happened outside since arming, one line per path; empty when nothing did."""
        problems = []
        for path, before in self.stats.items():  # lstat only: nothing here reads a file or lists a folder
            try:
                now = os.lstat(path)
            except FileNotFoundError:
                problems.append(f"{path}: deleted")
                continue
            if (stat.S_IFMT(now.st_mode), now.st_size, now.st_mtime_ns, now.st_ctime_ns) != (
                    stat.S_IFMT(before.st_mode), before.st_size, before.st_mtime_ns, before.st_ctime_ns):
                problems.append(f"{path}: changed (size, modification or change time)")
            elif self.detects_reads and now.st_atime_ns != before.st_atime_ns:
                problems.append(f"{path}: {'listed' if stat.S_ISDIR(now.st_mode) else 'read'} (its access time moved)")
        problems += [f"{path}: created" for path in _tree(self.folder) if path not in self.stats]
        for path, digest in self.digests.items():
            if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                problems.append(f"{path}: its bytes changed")
        return problems


def unique_png(path: Path) -> Path:
    """A PNG no demo image equals (so a hash of it found anywhere means it was read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(20260101).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# ---- running commands ----------------------------------------------------------------------------------------
# Lines a command may print on stderr before its error line: progress bars, library notices, lorakit warnings.
NOISE = re.compile(r"it/s\]|s/it\]|^Loading |^Writing model shards|^\[transformers\]|^warning: |^\s*$")
REFUSAL_WORDS = ("leads out", "leaves the data root", "is absolute", "climbs out")


@dataclass
class Result:
    argv: list[str]
    rc: int
    out: str
    err: str
    how: str

    @property
    def message(self) -> str:
        """The first stderr line that is not progress or a warning."""
        return next((line for line in self.err.splitlines() if not NOISE.search(line)), "")

    def __str__(self) -> str:
        return (f"$ lorakit {' '.join(self.argv)}   ({self.how})\nexit status {self.rc}\n"
                f"--- stdout\n{self.out[-4000:]}\n--- stderr\n{self.err[-4000:]}")


def run_in_process(argv: list[str]) -> Result:
    """``lorakit.cli.main`` in this process (torch is loaded once); an exception it lets out is printed as the
    interpreter would, so it reads as the traceback a subprocess would show."""
    from lorakit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # noqa: BLE001 - the point is to report it
            traceback.print_exc(file=err)
            rc = 99
    return Result(argv, rc, out.getvalue(), err.getvalue(), "in process")


@dataclass(frozen=True)
class Template:
    root: Path
    jobs: dict[str, str]     # "base" / "lora" -> job id of the queued grid
    detects_reads: bool


@dataclass
class Studio:
    """One test's copy: ``root/data`` (the data root), ``root/models/checkpoints``, ``root/loras``,
    ``root/local.json``; ``outside`` is beside ``root``, outside every root lorakit knows."""

    root: Path
    data: Path
    config: Path
    outside: Path
    tmp: Path
    jobs: dict[str, str]
    detects_reads: bool

    @property
    def roots(self) -> dict[str, Path]:
        return {"modelsRoot": self.root / "models", "checkpointsRoot": self.root / "models" / "checkpoints",
                "lorasRoot": self.root / "loras"}

    def env(self) -> dict[str, str]:
        return {"LORAKIT_DATA_ROOT": str(self.data), "LORAKIT_CONFIG": str(self.config), "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def record_file(self, record: tuple[str, str, str | None]) -> Path:
        from lorakit.store import Store

        kind, record_id, project = record
        if record_id.startswith("job:"):
            record_id = self.jobs[record_id[4:]]
        return Store(self.data).path(kind, record_id, project)

    def job_file(self, which: str) -> Path:
        return self.record_file(("job", f"job:{which}", PROJECT))

    def drop(self) -> Path:
        """A folder holding one new image, with the bytes of the ``image`` canary."""
        unique_png(self.tmp / "drop" / "new.png")
        return self.tmp / "drop"

    def watch(self) -> OutsideWatch:
        return OutsideWatch(self.outside, self.detects_reads)

    def cli(self, argv: list[str], *, inproc: bool = False) -> Result:
        if inproc:
            return run_in_process(argv)
        proc = subprocess.run([sys.executable, "-m", "lorakit", *argv], cwd=self.tmp, capture_output=True,
                              text=True, timeout=600, env={**os.environ, **self.env()})
        return Result(argv, proc.returncode, proc.stdout, proc.stderr, "subprocess")


def write_random_lora(path: Path) -> None:
    """A non-zero peft LoRA on the tiny UNet's attention projections, saved as diffusers' LoRA file."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from lorakit.models.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline("sd15").unet
    torch.manual_seed(7)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=get_peft_model_state_dict(unet))
    (path.parent / "pytorch_lora_weights.safetensors").rename(path)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Iterator[Template]:
    """The demo data with everything a command needs, built once: the tiny sd15 checkpoint, LoRA ``icons`` with
    release ``r1`` (a real LoRA file), dataset ``icons-ds``, eval grid ``done`` (rendered) and ``queued`` (2 jobs)."""
    import torch

    import lorakit
    from lorakit.evals import cleanup_eval
    from lorakit.loras import make_release

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in test_train.py: tiny models gain nothing from more threads
    root = tmp_path_factory.mktemp("hostile-template")
    data, config = copy_demo_data(root, root / "models")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"LORAKIT_DATA_ROOT": str(data), "LORAKIT_CONFIG": str(config), "HF_HUB_OFFLINE": "1",
                           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}.items():
            mp.setenv(key, value)
        ws = lorakit.open_workspace()
        lorakit.make_tiny_checkpoint(ws, CHECKPOINT, "sd15")
        weights = root / "loras" / LORA / RELEASE / f"{LORA}.safetensors"
        weights.parent.mkdir(parents=True)
        write_random_lora(weights)
        lorakit.create_lora(ws, LORA, name="Icons", scope="project", project=PROJECT, checkpoint=CHECKPOINT,
                            asset_types=["ui_icon"])
        sha = hashlib.sha256(weights.read_bytes()).hexdigest()
        lorakit.add_release(ws, LORA, make_release(RELEASE, weights={
            "kind": "config_relative", "base": "lorasRoot", "path": f"{LORA}/{RELEASE}/{LORA}.safetensors"},
            sha256=sha, training={}), project=PROJECT)
        lorakit.build_manifest(ws, project=PROJECT, asset_types=["ui_icon"], dataset_id=DATASET)
        grid = {"prompts": [PROMPT], "seeds": [1], "strengths": [1.0], "batch_size": 1}
        lorakit.create_eval_grid(ws, PROJECT, LORA, RELEASE, eval_id=DONE_EVAL, **grid)
        stats = lorakit.run_worker(ws, PROJECT, once=True, log=lambda _: None)
        assert len(stats.rendered) == 2 and not stats.failed
        cleanup_eval(ws, PROJECT, DONE_EVAL)  # its jobs; its outputs and images stay
        plan = lorakit.create_eval_grid(ws, PROJECT, LORA, RELEASE, eval_id=QUEUED_EVAL, **grid)
        jobs = {("base" if job["input"]["settings"]["strength"] == 0 else "lora"): job["id"] for job in plan.jobs}
        assert lorakit.validate_records(ws) == []
    probe = tmp_path_factory.mktemp("atime-probe")
    yield Template(root, jobs, atime_shows_reads(probe))
    torch.set_num_threads(threads)


def new_studio(template: Template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Studio:
    """A fresh copy of the template under ``tmp_path`` (the demo data again, then everything the template added)
    and an empty ``outside`` folder; the environment points lorakit at the copy, here and in subprocesses."""
    root = tmp_path / "studio"
    data, config = copy_demo_data(root, root / "models")
    shutil.copytree(template.root / "data", data, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lorakit"))
    shutil.copytree(template.root / "models", root / "models", ignore=shutil.ignore_patterns("*.lock"))
    shutil.copytree(template.root / "loras", root / "loras")
    outside = tmp_path / "outside"
    outside.mkdir()
    made = Studio(root, data, config, outside, tmp_path, dict(template.jobs), template.detects_reads)
    for key, value in made.env().items():
        monkeypatch.setenv(key, value)
    return made


@pytest.fixture
def studio(template: Template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Studio:
    return new_studio(template, tmp_path, monkeypatch)


# ---- planting escapes ------------------------------------------------------------------------------------------
PATH_VARIANTS = ("absolute", "climb", "link", "dir-link")
WEIGHTS_VARIANTS = ("config-climb", "config-link", "config-dir-link", "repo-climb", "repo-link", "repo-dir-link")


def make_canary(studio: Studio, name: str) -> Path:
    """The file (or folder) an escape points at, under ``outside``: a copy of what the field names today where
    there is one, so following the escape would even pass a sha256 check."""
    data, out = studio.data, studio.outside
    if name == "image":
        return unique_png(out / "canary.png")
    if name == "item":
        manifest = json.loads(studio.record_file(("dataset", DATASET, PROJECT)).read_text(encoding="utf-8"))
        return Path(shutil.copy2(data / manifest["items"][0]["path"], out / "item.png"))
    done = data / "files" / "evals" / PROJECT / DONE_EVAL
    if name == "cell":
        return Path(shutil.copy2(sorted(done.glob("*.png"))[0], out / "cell.png"))
    if name == "grid":
        return Path(shutil.copytree(done, out / "grid"))
    if name == "cells":
        (out / "cells").mkdir()
        return Path(shutil.copy2(sorted(done.glob("*.png"))[0], out / "cells" / "cell.png"))
    if name == "lora":
        return Path(shutil.copy2(studio.roots["lorasRoot"] / LORA / RELEASE / f"{LORA}.safetensors",
                                 out / "lora.safetensors"))
    if name == "csv":  # well-formed, so a report that followed the escape would plot it
        (out / "loss.csv").write_text("step,epoch,loss,lr\n1,0,0.5,0.001\n2,0,0.25,0.001\n", encoding="utf-8")
        return out / "loss.csv"
    if name in ("checkpoint", "vae"):
        folder = Path(shutil.copytree(studio.roots["checkpointsRoot"] / CHECKPOINT, out / "ckpt"))
        return folder if name == "checkpoint" else folder / "vae"
    raise KeyError(name)


def place_link(link: Path, target: Path) -> None:
    """Make ``link`` a symbolic link to ``target``, replacing what is there."""
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)


def _posix_rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def path_escape(studio: Studio, field: Field, root: str, variant: str, canary: Path, current: object) -> str:
    """An escaping value for a path field relative to the data root (``dataRoot``), to the folder holding it
    (``repoRoot``) or to a model root (``lorasRoot``), with the links it needs made."""
    base = {"dataRoot": studio.data, "repoRoot": studio.root}.get(root) or studio.roots[root]
    first = {"dataRoot": "files", "repoRoot": "data"}.get(root, LORA)  # each climb starts inside, then climbs out
    if variant == "absolute":
        return str(canary)
    if variant == "climb":
        return f"{first}/{_posix_rel(canary, base / first)}"
    if variant == "link":
        if field.own_link:  # the field's own file (or folder) is the link
            place_link(base / str(current), canary)
            return str(current)
        rel = ("files/" if root == "dataRoot" else "") + f"hostile-link{canary.suffix}"
        place_link(base / rel, canary)
        return rel
    if variant == "dir-link":
        if field.own_folder_link:  # the folder the field's file is in is the link
            place_link(base / Path(str(current)).parent, canary.parent)
            return str(current)
        if root not in ("dataRoot", "repoRoot"):
            place_link(base / "hostile", studio.outside)
            return "hostile/" + canary.relative_to(studio.outside).as_posix()
        place_link(studio.data / "files" / "hostile", studio.outside)
        rel = "files/hostile/" + canary.relative_to(studio.outside).as_posix()
        return rel if root == "dataRoot" else f"data/{rel}"
    raise KeyError(variant)


def weights_escape(studio: Studio, base_name: str, variant: str, canary: Path, current: object) -> dict:
    """An escaping weights reference (``config_relative`` to ``base_name``, or ``repo_relative``), with the links
    it needs made. The recorded sha256 is kept: the canary is a copy of the real weights."""
    ref = {k: v for k, v in (current if isinstance(current, dict) else {}).items() if k == "sha256"}
    kind, how = variant.split("-", 1)
    if kind == "config":
        base = studio.roots[base_name]
        ref.update(kind="config_relative", base=base_name)
        folder_link, folder_rel = base / "hostile-dir", "hostile-dir"
    else:
        base = studio.root
        ref["kind"] = "repo_relative"
        folder_link, folder_rel = studio.data / "files" / "hostile", "data/files/hostile"
    if how == "climb":
        ref["path"] = _posix_rel(canary, base)
    elif how == "link":
        place_link(base / f"hostile{canary.suffix}", canary)
        ref["path"] = f"hostile{canary.suffix}"
    else:
        place_link(folder_link, studio.outside)
        ref["path"] = f"{folder_rel}/{canary.relative_to(studio.outside).as_posix()}"
    return ref


def _drop_alpha(record: dict) -> None:
    """originalPath cases: without alphaPath the original is the image every command uses."""
    record["versions"][0]["variants"][0].pop("alphaPath", None)


def _drop_job_weights(record: dict) -> None:
    record["input"]["lora"]["weights"] = None  # so the job's localPath is what the worker follows


def _drop_weights(record: dict) -> None:
    """localPath cases: a release's localPath is read only when it has no weights reference."""
    record["releases"][0].pop("weights", None)


@dataclass(frozen=True)
class Field:
    """One marked field, the real record it is planted in and the commands that read it, each with what it must
    do: ``refuse`` (exit 1, ``error: ...`` naming the path), ``report`` (name the path it passed over, or refuse)
    or ``ignore`` (the command does not use the field: it must not follow it either). ``validate`` and the worker
    have their own checks."""

    schema: str
    record: tuple[str, str, str | None]   # (store kind, record id, project); "job:base" is the queued base job
    where: str                            # the concrete JSON path planted
    canary: str                           # see make_canary
    commands: tuple[tuple[str, str], ...]
    own_link: bool = False                # variant "link": the field's current file/folder becomes the link
    own_folder_link: bool = False         # variant "dir-link": the folder of the field's current file is the link
    adjust: Callable[[dict], None] | None = None
    job_copy: str | None = None           # the queued LoRA job carries a copy of this release field
    worker_job: str = "base"              # the job whose outcome shows the worker's handling
    weights_base: str = "lorasRoot"

    @property
    def key(self) -> tuple[str, str]:
        return (self.schema, pattern_of(self.where))

    @property
    def label(self) -> str:
        return f"{self.schema}.{pattern_of(self.where).replace('[]', '')}"


ASSET_RECORD = ("asset", ASSET, PROJECT)
LORA_RECORD = ("lora", LORA, PROJECT)
CHECKPOINT_RECORD = ("checkpoint", CHECKPOINT, None)
VALIDATE = ("validate", "validate")
WORKER = ("worker --once", "worker")
FIELD_LIST = [
    Field("asset", ASSET_RECORD, "$.versions[0].variants[0].originalPath", "image",
          (VALIDATE, ("dataset build", "refuse"), ("assets duplicates", "report"), ("assets import", "ignore")),
          adjust=_drop_alpha),
    Field("asset", ASSET_RECORD, "$.versions[0].variants[0].alphaPath", "image",
          (VALIDATE, ("dataset build", "refuse"), ("assets duplicates", "ignore"))),
    Field("asset", ASSET_RECORD, "$.versions[0].variants[0].previewPath", "image",
          (VALIDATE, ("dataset build", "ignore"), ("assets duplicates", "ignore"))),
    Field("dataset-manifest", ("dataset", DATASET, PROJECT), "$.items[0].path", "item",
          (VALIDATE, ("dataset export", "refuse"), ("lora train --dry-run", "refuse"), ("lora train", "refuse"))),
    Field("eval", ("eval", DONE_EVAL, PROJECT), "$.outputs[0].images[0]", "cell",
          (VALIDATE, ("eval grid-image", "refuse"))),
    Field("eval", ("eval", DONE_EVAL, PROJECT), "$.grid.imagesDir", "grid",
          (VALIDATE, ("lora cleanup-eval --images", "refuse")), own_link=True),
    Field("job", ("job", "job:base", PROJECT), "$.input.imagePath", "cells",
          (VALIDATE, WORKER), own_link=True, own_folder_link=True),
    Field("job", ("job", "job:lora", PROJECT), "$.input.lora.weights", "lora", (VALIDATE, WORKER),
          worker_job="lora"),
    Field("job", ("job", "job:lora", PROJECT), "$.input.lora.localPath", "lora", (VALIDATE, WORKER),
          adjust=_drop_job_weights, worker_job="lora"),
    Field("lora", LORA_RECORD, "$.releases[0].localPath", "lora",
          (VALIDATE, ("lora list", "report"), ("lora eval-grid", "refuse"), WORKER),
          adjust=_drop_weights, job_copy="localPath", worker_job="lora"),
    Field("lora", LORA_RECORD, "$.releases[0].weights", "lora",
          (VALIDATE, ("lora list", "report"), ("lora eval-grid", "refuse"), WORKER),
          job_copy="weights", worker_job="lora"),
    Field("lora", LORA_RECORD, "$.releases[0].training.lossLog", "csv", (VALIDATE, ("report", "refuse"))),
    Field("lora", LORA_RECORD, "$.releases[0].training.log", "csv", (VALIDATE, ("report", "ignore"))),
    Field("checkpoint", CHECKPOINT_RECORD, "$.weights", "checkpoint",
          (VALIDATE, ("checkpoint verify", "refuse"), ("checkpoint list", "report"), ("lora train", "refuse"), WORKER,
           ("lora eval-grid", "ignore")), weights_base="checkpointsRoot"),
    Field("checkpoint", CHECKPOINT_RECORD, "$.vaeWeights", "vae",
          (VALIDATE, ("checkpoint verify", "refuse"), ("lora train", "refuse"), WORKER),
          weights_base="checkpointsRoot"),
]
FIELDS = {f.key: f for f in FIELD_LIST}


@dataclass(frozen=True)
class Planted:
    field: Field
    variant: str
    value: object
    record: Path
    names: tuple[str, ...]   # what a refusal must name

    def __str__(self) -> str:
        return f"{self.field.where} = {self.value!r} in {self.record} ({self.variant})"


def plant(studio: Studio, field: Field, variant: str) -> Planted:
    """Put one escape into the field's record (and the links and canary it needs); returns what was planted."""
    root = MARKED[field.key]
    record_file = studio.record_file(field.record)
    record = json.loads(record_file.read_text(encoding="utf-8"))
    current = get_at(record, field.where)
    canary = make_canary(studio, field.canary)
    if root == "weights":
        value: object = weights_escape(studio, field.weights_base, variant, canary, current)
        names = (value["path"],)  # type: ignore[index]
    else:
        value = path_escape(studio, field, root, variant, canary, current)
        names = (str(value),)
    set_at(record, field.where, value)
    if field.adjust:
        field.adjust(record)
    record_file.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if field.job_copy:
        job_file = studio.job_file("lora")
        job = json.loads(job_file.read_text(encoding="utf-8"))
        if field.job_copy == "localPath":
            job["input"]["lora"].update(weights=None, localPath=value)
        else:
            job["input"]["lora"]["weights"] = value
        job_file.write_text(json.dumps(job, indent=2) + "\n", encoding="utf-8")
    return Planted(field, variant, value, record_file, names)


# ---- the commands ------------------------------------------------------------------------------------------------
def _lora_list_check(studio: Studio, result: Result) -> None:
    rows = json.loads(result.out)
    assert not [r for r in rows if r["release_id"] == RELEASE and r["picked"]], f"release picked anyway:\n{result}"


def _checkpoint_list_check(studio: Studio, result: Result) -> None:
    line = next(line for line in result.out.splitlines() if line.startswith(CHECKPOINT + " "))
    assert " ok " not in line, f"the escaping checkpoint is listed as present:\n{result}"


@dataclass(frozen=True)
class Command:
    argv: Callable[[Studio], list[str]]
    heavy: bool = False    # loads torch (and models): its control runs in process
    slow: bool = False     # trains or renders with the tiny checkpoint
    report_check: Callable[[Studio, Result], None] | None = None
    control: Callable[[Studio, Result], None] | None = None


def _control_worker(studio: Studio, result: Result) -> None:
    for which in ("base", "lora"):
        job = json.loads(studio.job_file(which).read_text(encoding="utf-8"))
        assert job["status"] == "succeeded", f"{which} job: {job.get('error')}\n{result}"


def _control_cleanup(studio: Studio, result: Result) -> None:
    folder = studio.data / "files" / "evals" / PROJECT / DONE_EVAL
    assert not folder.exists() or not any(folder.glob("*.png")), result


def _control_lora_list(studio: Studio, result: Result) -> None:
    rows = json.loads(result.out)
    assert [r["picked"] for r in rows if r["release_id"] == RELEASE] == [True], result


def _control_checkpoint_list(studio: Studio, result: Result) -> None:
    assert any(line.startswith(CHECKPOINT + " ") and " ok " in line for line in result.out.splitlines()), result


def _control_export(studio: Studio, result: Result) -> None:
    assert list((studio.tmp / "export").rglob("*.png")), result


def _control_report(studio: Studio, result: Result) -> None:
    assert list((studio.tmp / "reports").glob(f"04_eval_report__{LORA}__{RELEASE}__*.html")), result


TRAIN = ["lora", "train", "--lora", LORA, "--dataset", DATASET, "--project", PROJECT, "--preset", "tiny-demo"]
COMMANDS = {
    "validate": Command(lambda s: ["validate"],
                        control=lambda s, r: None if "all records valid" in r.out else pytest.fail(str(r))),
    "dataset build": Command(lambda s: ["dataset", "build", "--project", PROJECT, "--asset-type", "ui_icon",
                                        "--id", "rebuilt"]),
    "assets duplicates": Command(lambda s: ["assets", "duplicates", "--project", PROJECT]),
    "assets import": Command(lambda s: ["assets", "import", "--project", PROJECT, "--dir", str(s.drop()), "--dry-run"],
                             control=lambda s, r: None if re.search(r"import 1 image", r.out, re.I)
                             else pytest.fail(str(r))),
    "dataset export": Command(lambda s: ["dataset", "export", DATASET, "--project", PROJECT,
                                         "--out", str(s.tmp / "export")], control=_control_export),
    "lora train --dry-run": Command(lambda s: [*TRAIN, "--dry-run"]),
    "lora train": Command(lambda s: [*TRAIN, "--steps", "1", "--resolution", "64", "--cpu", "--no-progress",
                                     "--release", "hostile"], heavy=True, slow=True),
    "eval grid-image": Command(lambda s: ["eval", "grid-image", DONE_EVAL, "--project", PROJECT,
                                          "--out", str(s.tmp / "sheet.png")]),
    "lora cleanup-eval --images": Command(lambda s: ["lora", "cleanup-eval", "--project", PROJECT, "--eval", DONE_EVAL,
                                                     "--images"], control=_control_cleanup),
    "worker --once": Command(lambda s: ["worker", "--project", PROJECT, "--once"], heavy=True, slow=True,
                             control=_control_worker),
    "lora list": Command(lambda s: ["lora", "list", "--project", PROJECT, "--checkpoint", CHECKPOINT, "--asset-type",
                                    "ui_icon", "--pick", f"{LORA}@{RELEASE}", "--json"],
                         report_check=_lora_list_check, control=_control_lora_list),
    "lora eval-grid": Command(lambda s: ["lora", "eval-grid", "--project", PROJECT, "--lora", LORA, "--release",
                                         RELEASE, "--prompts", PROMPT, "--seeds", "1", "--strengths", "1",
                                         "--eval", "hostile"]),
    "checkpoint verify": Command(lambda s: ["checkpoint", "verify", CHECKPOINT], heavy=True),
    "checkpoint list": Command(lambda s: ["checkpoint", "list"], report_check=_checkpoint_list_check,
                               control=_control_checkpoint_list),
    # Refusals come before the kernel starts; the control and the fields it does not read run 04_eval_report.
    "report": Command(lambda s: ["report", "--lora", LORA, "--project", PROJECT, "--out", str(s.tmp / "reports")],
                      slow=True, control=_control_report),
}
# The cases run ``lorakit.cli.main`` in this process: a subprocess pays ~2 s for importing jsonschema (which lorakit
# does to word every schema error) and ~5 s more for torch, which this many cases cannot afford. The first case
# of each command with a link variant, and these, also run as real ``python -m lorakit`` subprocesses.
AS_SUBPROCESS = {
    (("asset", "versions[].variants[].originalPath"), "validate"): "absolute",
    (("lora", "releases[].weights"), "worker --once"): "repo-link",
    (("dataset-manifest", "items[].path"), "lora train"): "dir-link",
}
LINK_VARIANTS = ("link", "config-link")


# ---- the checks ------------------------------------------------------------------------------------------------
def check_no_traceback(result: Result) -> None:
    assert "Traceback" not in result.out + result.err, f"a Python traceback instead of an error line:\n{result}"


def check_refused(result: Result, names: tuple[str, ...]) -> None:
    check_no_traceback(result)
    assert result.rc == 1, f"expected a refusal (exit status 1):\n{result}"
    assert result.message.startswith("error: "), f"stderr does not start with 'error: ':\n{result}"
    assert any(name in result.err for name in names), f"the error does not name {names}:\n{result}"


def check_reported(studio: Studio, command: str, result: Result, names: tuple[str, ...]) -> None:
    check_no_traceback(result)
    if result.rc != 0:
        check_refused(result, names)
        return
    lines = (result.out + "\n" + result.err).splitlines()
    assert any(any(n in line for n in names) and any(w in line for w in REFUSAL_WORDS) for line in lines), (
        f"the escaping path {names} is neither refused nor reported:\n{result}")
    if COMMANDS[command].report_check:
        COMMANDS[command].report_check(studio, result)


def check_validate(result: Result, planted: Planted) -> None:
    check_no_traceback(result)
    assert result.rc == 1, f"validate passed a record with an escaping path ({planted}):\n{result}"
    lines = (result.out + "\n" + result.err).splitlines()
    assert any(str(planted.record) in line and f"at {planted.field.where}:" in line for line in lines), (
        f"validate does not name {planted.record} and {planted.field.where}:\n{result}")


def check_worker(studio: Studio, result: Result, planted: Planted) -> None:
    check_no_traceback(result)
    if result.rc != 0:
        check_refused(result, planted.names)
        return
    job = json.loads(studio.job_file(planted.field.worker_job).read_text(encoding="utf-8"))
    if job["status"] == "queued":  # a job record the schema refuses is passed over, named, and left as it is
        skipped = [line for line in result.out.splitlines() if "skipping a job record" in line]
        assert skipped and any(n in line for n in planted.names for line in skipped), (
            f"the {planted.field.worker_job} job was neither failed nor reported as skipped ({planted}):\n{result}")
        return
    assert job["status"] == "failed", f"the {planted.field.worker_job} job is {job['status']!r} ({planted}):\n{result}"
    assert any(n in job.get("error", "") for n in planted.names), (
        f"the job's error does not name {planted.names}: {job.get('error')!r}")


def check_outside(watch: OutsideWatch, what: object, result: Result) -> None:
    problems = watch.problems()
    assert not problems, (f"{what}: lorakit touched files outside the data root:\n  " + "\n  ".join(problems)
                          + f"\n{result}")


def _cases() -> Iterator:
    in_subprocess: set[str] = set()
    for f in FIELD_LIST:
        variants = WEIGHTS_VARIANTS if MARKED.get(f.key) == "weights" else PATH_VARIANTS
        for variant in variants:
            for command, expect in f.commands:
                marks = [pytest.mark.slow] if COMMANDS[command].slow else []
                name = f"{f.label}-{variant}-{command.replace(' ', '_')}"
                yield pytest.param(f.key, variant, command, expect, True, id=name, marks=marks)
                first_link = variant in LINK_VARIANTS and command not in in_subprocess
                if first_link or AS_SUBPROCESS.get((f.key, command)) == variant:
                    in_subprocess.add(command)
                    heavy = [pytest.mark.slow] if COMMANDS[command].heavy else []
                    yield pytest.param(f.key, variant, command, expect, False, id=f"{name}-subprocess",
                                       marks=marks or heavy)


# ---- the tests: the schemas' path fields -------------------------------------------------------------------------
def test_the_walker_finds_every_known_path_field() -> None:
    assert REQUIRED <= set(MARKED), f"not found by the walker: {sorted(REQUIRED - set(MARKED))}"
    assert {root for key, root in MARKED.items() if key in REQUIRED} == {"dataRoot", "repoRoot", "lorasRoot", "weights"}
    assert MARKED[("lora", "releases[].localPath")] == "repoRoot"
    assert MARKED[("checkpoint", "vaeWeights")] == MARKED[("lora", "releases[].weights")] == "weights"


def test_every_marked_field_has_hostile_cases() -> None:
    untested = sorted(set(MARKED) - set(FIELDS))
    assert not untested, f"path fields marked in the schemas with no hostile case in FIELDS: {untested}"
    stale = sorted(set(FIELDS) - set(MARKED))
    assert not stale, f"FIELDS has cases for fields no schema marks (any more): {stale}"
    for f in FIELD_LIST:
        assert f.commands[0] == VALIDATE and len(f.commands) > 1, f"{f.label}: validate and a reader at least"
        assert all(command in COMMANDS for command, _ in f.commands), f.label


@pytest.mark.parametrize("key", list(FIELDS), ids=[f.label for f in FIELD_LIST])
def test_lorakit_finds_the_same_field_in_the_planted_record(template: Template, key) -> None:
    """lorakit's own ``path_fields`` (what validate checks) sees the planted JSON path with the walker's root."""
    field = FIELDS[key]
    kind, record_id, project = field.record
    record_id = template.jobs[record_id[4:]] if record_id.startswith("job:") else record_id
    from lorakit.store import Store

    record = json.loads(Store(template.root / "data").path(kind, record_id, project).read_text(encoding="utf-8"))
    value: object = {"kind": "repo_relative", "path": "x"} if MARKED[key] == "weights" else "files/x.png"
    set_at(record, field.where, value)
    assert (field.where, MARKED[key], value) in path_fields(field.schema, record)


@pytest.mark.parametrize(("key", "variant", "command", "expect", "inproc"), list(_cases()))
def test_an_escaping_path_is_refused_and_nothing_outside_is_touched(studio: Studio, key, variant: str, command: str,
                                                                   expect: str, inproc: bool) -> None:
    planted = plant(studio, FIELDS[key], variant)
    watch = studio.watch()
    result = studio.cli(COMMANDS[command].argv(studio), inproc=inproc)
    check_outside(watch, planted, result)
    if expect == "validate":
        check_validate(result, planted)
    elif expect == "worker":
        check_worker(studio, result, planted)
    elif expect == "refuse":
        check_refused(result, planted.names)
    elif expect == "report":
        check_reported(studio, command, result, planted.names)
    else:  # the command does not use this field: it may succeed, but must not follow it
        check_no_traceback(result)
        if command == "assets import" and result.rc == 0:
            assert re.search(r"import 1 image", result.out, re.I), (
                f"the new image was taken for a copy of the escaping asset's file, which means it was read:\n{result}")


@pytest.mark.parametrize("command", [pytest.param(c, marks=[pytest.mark.slow] if spec.slow else [])
                                     for c, spec in COMMANDS.items()])
def test_each_command_works_on_the_untouched_studio(studio: Studio, command: str) -> None:
    """The controls: without an escape every command succeeds, so the refusals above come from the escapes."""
    spec = COMMANDS[command]
    result = studio.cli(spec.argv(studio), inproc=spec.heavy)
    check_no_traceback(result)
    assert result.rc == 0, str(result)
    if spec.control:
        spec.control(studio, result)


# ---- the tests: cases of their own -------------------------------------------------------------------------------
def _manual(studio: Studio, ref: dict) -> Result:
    flags = ["--weights-kind", ref["kind"], "--weights-path", ref["path"]]
    if "base" in ref:
        flags += ["--weights-base", ref["base"]]
    return studio.cli(["lora", "train", "--adapter", "manual", "--lora", LORA, "--dataset", DATASET,
                       "--project", PROJECT, "--release", "manual", *flags])


@pytest.mark.parametrize("variant", [*WEIGHTS_VARIANTS, "absolute-etc-passwd"])
def test_the_manual_adapter_records_no_weights_outside_their_root(studio: Studio, variant: str) -> None:
    """``lora train --adapter manual`` writes releases[].weights from flags: an escape is refused before it is
    recorded, and an absolute path to a file that is not a safetensors file (``/etc/passwd``) is refused too."""
    record = studio.record_file(LORA_RECORD)
    before = record.read_bytes()
    if variant == "absolute-etc-passwd":
        ref = {"kind": "absolute", "path": "/etc/passwd"}
    else:
        ref = weights_escape(studio, "lorasRoot", variant, make_canary(studio, "lora"), {})
    watch = studio.watch()
    result = _manual(studio, ref)
    check_outside(watch, ref, result)
    check_refused(result, (ref["path"],))
    if variant == "absolute-etc-passwd":
        assert "not a safetensors file" in result.err, str(result)
    assert record.read_bytes() == before, "the LoRA record changed"


def test_the_manual_adapter_records_weights_inside_their_root(studio: Studio) -> None:
    result = _manual(studio, {"kind": "config_relative", "base": "lorasRoot",
                              "path": f"{LORA}/{RELEASE}/{LORA}.safetensors"})
    check_no_traceback(result)
    assert result.rc == 0, str(result)
    assert "manual" in [r["id"] for r in json.loads(studio.record_file(LORA_RECORD).read_text())["releases"]]


def test_cleanup_removes_a_linked_image_but_not_the_file_it_points_at(studio: Studio) -> None:
    """An image in an eval's own folder that is a link to a file outside: ``cleanup-eval --images`` may remove
    the link, never its target."""
    canary = make_canary(studio, "cell")
    place_link(studio.data / "files" / "evals" / PROJECT / DONE_EVAL / "zz_hostile.png", canary)
    watch = studio.watch()
    result = studio.cli(["lora", "cleanup-eval", "--project", PROJECT, "--eval", DONE_EVAL, "--images"])
    check_outside(watch, "a linked image in the eval folder", result)
    check_no_traceback(result)
    assert result.rc in (0, 1), str(result)


# Beyond the fields records hold: the data root's own folders are in the shared folder too, so one that is a
# symbolic link must not lead lorakit's record writes, deletes or caches outside either.
FOLDER_CASES = {
    "jobs-folder-eval-grid": (f"projects/{PROJECT}/jobs", COMMANDS["lora eval-grid"].argv),
    "jobs-folder-cleanup-eval": (f"projects/{PROJECT}/jobs",
                                 lambda s: ["lora", "cleanup-eval", "--project", PROJECT, "--eval", QUEUED_EVAL]),
    "datasets-folder-dataset-build": (f"projects/{PROJECT}/datasets", COMMANDS["dataset build"].argv),
    "lorakit-cache-folder-dataset-build": (".lorakit", COMMANDS["dataset build"].argv),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_a_data_root_folder_linked_outside_is_not_written_through(studio: Studio, case: str) -> None:
    rel, argv = FOLDER_CASES[case]
    folder = studio.data / rel
    target = studio.outside / rel.replace("/", "_")
    if folder.is_dir():
        shutil.copytree(folder, target)
    else:
        target.mkdir()
    place_link(folder, target)
    watch = studio.watch()
    result = studio.cli(argv(studio))
    check_outside(watch, f"{rel} -> {target}", result)
    check_no_traceback(result)


# ---- the tests: every path a command writes, planted with links -----------------------------------------------
# The write side: each writing command is run once on an untouched studio, and every file it wrote (records, lock
# files, caches, images, a run's files) and every folder it wrote into is found by comparing the studio's trees
# before and after. Each of those places is then planted, in a fresh studio, with a link to a file or folder
# outside (a symbolic link to a copy, a dangling symbolic link, a hard link), and the command runs again. It may
# succeed or refuse with an ``error:`` line, but it must not read, write, create or delete anything outside.
WRITERS = {
    "dataset build": COMMANDS["dataset build"].argv,
    "assets import": lambda s: ["assets", "import", "--project", PROJECT, "--dir", str(s.drop())],
    "assets tag": lambda s: ["assets", "tag", "--project", PROJECT, "--asset", ASSET, "--add", "hostile"],
    "lora eval-grid": COMMANDS["lora eval-grid"].argv,
    "lora cleanup-eval --images": COMMANDS["lora cleanup-eval --images"].argv,
    "worker --once": COMMANDS["worker --once"].argv,
    "lora train": COMMANDS["lora train"].argv,
}
SLOW_WRITERS = {"worker --once", "lora train"}
FILE_LINKS = ("file-link", "dangling-link", "hard-link")


def _snapshot(root: Path) -> dict[Path, tuple]:
    """Every entry under ``root``: its type, inode, size and modification time (no file is read)."""
    found = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(top) / name
            st = os.lstat(path)
            found[path.relative_to(root)] = (stat.S_IFMT(st.st_mode), st.st_ino, st.st_size, st.st_mtime_ns)
    return found


def written_places(before: dict[Path, tuple], after: dict[Path, tuple]) -> tuple[list[Path], list[Path]]:
    """The regular files a command created or rewrote, and the folders it wrote into (each file's folders up to
    the studio's top folders), relative to the studio root."""
    files = sorted(p for p, facts in after.items() if stat.S_ISREG(facts[0]) and before.get(p) != facts)
    folders = sorted({parent for p in files for parent in p.parents if len(parent.parts) >= 2})
    return files, folders


def plant_write_link(studio: Studio, rel: Path, variant: str, n: int) -> str:
    """Put a link of ``variant`` at ``rel`` (a file or folder a command writes), to a canary under outside."""
    place, canary = studio.root / rel, studio.outside / f"canary-{n}"
    if variant == "dir-link":
        if place.is_dir():
            shutil.copytree(place, canary, symlinks=True)
        else:
            canary.mkdir()
        place_link(place, canary)
        return f"{rel} -> {canary}/"
    if variant == "dangling-link":
        place_link(place, studio.outside / f"missing-{n}")
        return f"{rel} -> a dangling link into outside"
    if place.is_file():
        shutil.copy2(place, canary)
    else:
        canary.write_text("outside file\n")
    if variant == "file-link":
        place_link(place, canary)
    else:
        if place.exists() or place.is_symlink():
            place.unlink()
        place.parent.mkdir(parents=True, exist_ok=True)
        os.link(canary, place)
    return f"{rel} -> {canary} ({variant})"


def check_hostile_write(result: Result, what: str) -> None:
    check_no_traceback(result)
    if result.rc != 0:
        assert result.rc == 1 and result.message.startswith("error: "), f"{what}: not an error line:\n{result}"


@pytest.mark.parametrize("command", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW_WRITERS else [])
                                     for c in WRITERS])
def test_no_write_follows_a_link_out_of_its_root(template: Template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 command: str) -> None:
    argv = WRITERS[command]
    clean = new_studio(template, tmp_path / "clean", monkeypatch)
    before = _snapshot(clean.root)
    result = clean.cli(argv(clean), inproc=True)
    check_no_traceback(result)
    assert result.rc == 0, str(result)
    files, folders = written_places(before, _snapshot(clean.root))
    assert files, f"{command} wrote nothing the test can find"
    places = [(rel, v) for rel in files for v in FILE_LINKS] + [(rel, "dir-link") for rel in folders]
    if command in SLOW_WRITERS:  # each run loads the model: the places a shared folder can carry, not every cache
        places = [(rel, v) for rel, v in places if v in ("file-link", "hard-link", "dir-link")]
    failures = []
    for n, (rel, variant) in enumerate(places):
        case = new_studio(template, tmp_path / f"case-{n}", monkeypatch)
        planted = plant_write_link(case, rel, variant, n)
        watch = case.watch()
        result = case.cli(argv(case), inproc=True)
        problems = watch.problems()
        if problems:
            failures.append(f"{planted}: " + "; ".join(problems) + f"\n{result}")
        try:
            check_hostile_write(result, planted)
        except AssertionError as exc:
            failures.append(str(exc))
        shutil.rmtree(tmp_path / f"case-{n}", ignore_errors=True)
    assert not failures, (f"{len(failures)} of {len(places)} planted links went wrong:\n"
                          + "\n".join(f.splitlines()[0][:300] for f in failures) + "\n\n" + "\n".join(failures[:3]))



# ---- special files where weights belong ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fifo", "dev-zero", "link-to-dev-zero", "checkpoint-fifo"])
def test_weights_that_are_a_fifo_or_a_device_fail_the_job_instead_of_hanging(studio: Studio, variant: str) -> None:
    """A release (or checkpoint) whose weights are a FIFO, ``/dev/zero`` (an ``absolute`` reference may name
    another place for reading), or a link to it: the worker fails the job with an error naming the file."""
    weights = studio.roots["lorasRoot"] / LORA / RELEASE / f"{LORA}.safetensors"
    if variant == "fifo":
        weights.unlink()
        os.mkfifo(weights)
    elif variant == "link-to-dev-zero":
        weights.unlink()
        weights.symlink_to("/dev/zero")
    elif variant == "checkpoint-fifo":
        unet = next((studio.roots["checkpointsRoot"] / CHECKPOINT / "unet").glob("*.safetensors"))
        unet.unlink()
        os.mkfifo(unet)
    else:  # the queued job names the weights it renders with
        job = json.loads(studio.job_file("lora").read_text(encoding="utf-8"))
        job["input"]["lora"]["weights"] = {"kind": "absolute", "path": "/dev/zero"}
        studio.job_file("lora").write_text(json.dumps(job, indent=2), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "lorakit", "worker", "--project", PROJECT, "--once"], cwd=studio.tmp,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **studio.env()})
    result = Result(["worker", "--once"], proc.returncode, proc.stdout, proc.stderr, "subprocess")
    check_no_traceback(result)
    words = ("FIFO", "character device", "leads out")
    job = json.loads(studio.job_file("lora").read_text(encoding="utf-8"))
    if result.rc == 0:
        assert job["status"] == "failed" and any(w in job.get("error", "") for w in words), (job, str(result))
    else:
        assert result.message.startswith("error: ") and any(w in result.err for w in words), str(result)
