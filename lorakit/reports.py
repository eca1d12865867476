"""Batch runs of the notebooks (papermill) and their standalone HTML (nbconvert); the facts of a release report.

``run_notebook`` executes one of the notebooks shipped in the package (``lorakit/notebooks/``; the checkout's
top-level ``notebooks/`` links there) headless with parameters and writes two files under ``./reports/`` (or
``out_dir``): the executed ``.ipynb`` and a standalone ``.html``, named by notebook,
LoRA/release and time. The HTML embeds every image and plot and loads no script from the network, so it opens offline. A
failing cell still leaves both files (the HTML shows the error) and raises :class:`NotebookError`.

The kernel imports only installed code: it runs in an empty folder of its own, with neither that folder nor the
current one on ``sys.path`` (a studio's repository, shared through Git, may hold a ``pandas.py`` or a
``lorakit/``). Everything it needs from the current folder is given to it instead: the data root and the config
file, resolved, and the parameters that name files (:data:`PATH_PARAMETERS`), made absolute.

``make_report`` runs ``04_eval_report`` for one release and records the report's path on the release's
``evaluation.report``; :func:`release_report` gathers what that report shows, so the notebook only displays.

>>> run = run_notebook("01_build_dataset", {"asset_types": ["ui_icon"]})   # doctest: +SKIP
>>> run.html                                                                # doctest: +SKIP
PosixPath('.../reports/01_build_dataset__20260101T120000Z.html')
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .errors import LorakitError, NotebookError, RecordNotFoundError
from .notebook_helpers import BATCH_ENV
from .roots import Root
from .workspace import Workspace, as_workspace

NOTEBOOKS_DIR = Path(__file__).resolve().parent / "notebooks"
REPORTS_DIR = Path("reports")  # relative: the current folder's reports/ at the time of the run
REPORT_NOTEBOOK = "04_eval_report"
KERNEL_NAME = "python3"
_NAME_PART = re.compile(r"[^A-Za-z0-9._-]+")
# Notebook parameters that name a file or folder. A relative one is relative to the folder the command was typed
# in; the kernel runs elsewhere, so it is made absolute before the kernel starts. ``dataset`` is an id unless it
# looks like a manifest path, and a relative manifest path is first looked up under the data root.
PATH_PARAMETERS = ("data_root", "dataset", "contact_sheet_out")


@dataclass
class NotebookRun:
    """One executed notebook: where its files are and, when a cell failed, which and why."""

    notebook: str
    parameters: dict
    executed: Path
    html: Path | None
    ok: bool = True
    duration_s: float = 0.0
    failed_cell: int | None = None  # execution count of the failing cell ("In [n]")
    failed_source: str | None = None
    error: str | None = None  # "ename: evalue"
    traceback: list[str] = field(default_factory=list)

    def describe_failure(self) -> str:
        if self.ok:
            return f"{self.notebook} ran without errors"
        where = f"cell In [{self.failed_cell}]" if self.failed_cell is not None else "a cell"
        return (f"notebook {self.notebook} failed in {where}: {self.error}\n"
                f"--- cell source ---\n{(self.failed_source or '').rstrip()}\n--- end of cell ---\n"
                f"executed notebook: {self.executed}" + (f"\nHTML: {self.html}" if self.html else ""))


# ---- notebooks and names (pure) --------------------------------------------------------------------------------
def list_notebooks(folder: Path = NOTEBOOKS_DIR) -> list[str]:
    """The notebooks a batch run can execute, by name (``00_wizard``, ``01_build_dataset``, ...)."""
    return sorted(p.stem for p in folder.glob("*.ipynb"))


def find_notebook(name: str | Path, folder: Path = NOTEBOOKS_DIR) -> Path:
    """A notebook by name (``01_build_dataset``), unique prefix (``01``), file name, or path.

    >>> find_notebook("01").name                # doctest: +SKIP
    '01_build_dataset.ipynb'
    """
    path = Path(name)
    if path.suffix == ".ipynb" and path.is_file():
        return path.resolve()
    stem = path.name.removesuffix(".ipynb")
    names = list_notebooks(folder)
    if stem in names:
        return folder / f"{stem}.ipynb"
    matches = [n for n in names if n.startswith(stem)]
    if len(matches) == 1:
        return folder / f"{matches[0]}.ipynb"
    known = ", ".join(names) or "none"
    what = "is ambiguous" if matches else "does not exist"
    raise RecordNotFoundError(f"notebook {str(name)!r} {what} (notebooks: {known})")


def report_stem(notebook: str, parameters: Mapping, when: datetime) -> str:
    """The file name (without suffix) of a batch run: notebook, LoRA and release when given, UTC time.

    >>> report_stem("02_train_lora", {"lora": "icons", "release": "r1"}, datetime(2026, 1, 2, 3, 4, 5))
    '02_train_lora__icons__r1__20260102T030405Z'
    """
    parts = [notebook]
    for key in ("lora", "release"):
        value = parameters.get(key)
        if value:
            parts.append(_NAME_PART.sub("_", str(value)))
    parts.append(when.strftime("%Y%m%dT%H%M%SZ"))
    return "__".join(parts)


def parse_parameter(value: str):
    """A ``-p key value`` value: JSON when it parses (numbers, true/false/null, lists, objects), else text.
    Python's ``True``/``False``/``None`` are accepted too.

    >>> parse_parameter("3"), parse_parameter("[1, 2]"), parse_parameter("True"), parse_parameter("ui_icon")
    (3, [1, 2], True, 'ui_icon')
    """
    import json

    python_words = {"True": True, "False": False, "None": None}
    if value in python_words:
        return python_words[value]
    try:
        return json.loads(value)
    except ValueError:
        return value


# ---- running -----------------------------------------------------------------------------------------------------
def absolute_parameters(parameters: Mapping, data_root: str | Path | None = None) -> dict:
    """``parameters`` with every relative path of :data:`PATH_PARAMETERS` made absolute against the current
    folder (a manifest path that exists under ``data_root`` is kept: the notebook looks there first).

    >>> absolute_parameters({"contact_sheet_out": "/tmp/sheet.png", "dataset": "icons", "seeds": [1]})
    {'contact_sheet_out': '/tmp/sheet.png', 'dataset': 'icons', 'seeds': [1]}
    """
    from .train.inputs import is_manifest_path

    params = dict(parameters)
    for name in PATH_PARAMETERS:
        value = params.get(name)
        if not isinstance(value, str | os.PathLike) or not os.fspath(value) or Path(value).is_absolute():
            continue
        if name == "dataset" and (not is_manifest_path(os.fspath(value))
                                  or (data_root is not None and (Path(data_root) / value).exists())):
            continue
        params[name] = os.path.abspath(value)
    return params


def kernel_environment(changes: Mapping[str, str]) -> dict[str, str]:
    """The environment of a batch kernel: this process's, with ``changes``, and ``PYTHONPATH`` without the
    entries that mean "the current folder" to the kernel (an empty entry), its relative entries made absolute
    here, where the user typed them."""
    env = {**os.environ, **changes}
    entries = [os.path.abspath(e) for e in env.get("PYTHONPATH", "").split(os.pathsep) if e]
    if entries:
        env["PYTHONPATH"] = os.pathsep.join(entries)
    else:
        env.pop("PYTHONPATH", None)
    return env


def _kernel_manager_class(working_dir: str, env: Mapping[str, str]):
    """A kernel manager that always starts ``python3`` as *this* interpreter's ipykernel, in ``working_dir``
    with ``env``, and puts no working folder on the kernel's ``sys.path``.

    The ``python3`` spec in ``<venv>/share/jupyter/kernels`` already says "python" (which jupyter_client maps
    to ``sys.executable``), but a ``python3`` spec installed with ``--user`` for another interpreter would
    win over it; looking in no kernel folder leaves ipykernel's own spec for the running interpreter.
    ``python -m`` puts the working folder first on ``sys.path`` (``-P`` leaves it out, so not even
    ``ipykernel_launcher`` is looked up there), and IPython adds it again unless told not to.
    """
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class ThisPythonKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _default_kernel_spec_manager(self):
            return KernelSpecManager(parent=self, kernel_dirs=[])

        @default("transport")
        def _default_transport(self):
            # Local sockets: nothing listens on TCP ports (and ipykernel has no plain-text TCP to warn about).
            return "tcp" if os.name == "nt" else "ipc"

        @default("ip")
        def _default_ip(self):
            # An ipc "address" is a file name, relative to each side's working folder unless absolute.
            return os.path.join(working_dir, "kernel-ipc") if self.transport == "ipc" else super()._ip_default()

        def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
            python, *rest = super().format_kernel_cmd(extra_arguments)
            return [python, "-P", *rest, "--IPKernelApp.ignore_cwd=True"]

        async def start_kernel(self, **kw: object) -> None:  # type: ignore[override]  # jupyter_client's is untyped
            await super().start_kernel(**{**kw, "cwd": working_dir, "env": dict(env)})

    return ThisPythonKernelManager


def run_notebook(
    name: str | Path,
    parameters: Mapping | None = None,
    *,
    out_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    config: str | Path | None = None,
    html: bool = True,
    timeout: float | None = None,
    check: bool = True,
    log_output: bool = False,
) -> NotebookRun:
    """Execute a notebook with papermill and write ``<stem>.ipynb`` and ``<stem>.html`` under ``out_dir``
    (default ``reports/``); ``lorakit notebook run NAME -p key value ... [--out DIR]``.

    ``data_root`` (also passed as the ``data_root`` parameter) and ``config`` are given to the kernel as
    ``LORAKIT_DATA_ROOT`` / ``LORAKIT_CONFIG``, resolved here (by default, the ones lorakit finds from the current
    folder); the kernel also gets ``LORAKIT_BATCH=1`` (text progress bars, no one to click) and runs in an empty
    folder of its own, so relative paths among the parameters are made absolute first
    (:func:`absolute_parameters`). ``timeout`` limits each cell (seconds). A failing cell raises :class:`NotebookError`
    (``check=False``: returns the run with ``ok=False``) after both files are written.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from .config import config_path, load_config

    source = find_notebook(name)
    notebook = source.stem
    if config is None:
        config = config_path()
    if data_root is None:
        data_root = load_config().data_root
    data_root = Path(data_root).resolve()
    params = absolute_parameters({**(parameters or {}), "data_root": str(data_root)}, data_root)
    out = (Path(out_dir) if out_dir is not None else REPORTS_DIR).absolute()
    out.mkdir(parents=True, exist_ok=True)
    stem = report_stem(notebook, {**_default_parameters(source), **params}, datetime.now(UTC))
    executed = out / f"{stem}.ipynb"
    n = 1
    while executed.exists() or executed.with_suffix(".html").exists():
        n += 1
        executed = out / f"{stem}_{n}.ipynb"
    changes = {BATCH_ENV: "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
               "LORAKIT_DATA_ROOT": str(data_root)}
    if config is not None:
        changes["LORAKIT_CONFIG"] = str(Path(config).resolve())

    run = NotebookRun(notebook=notebook, parameters=params, executed=executed, html=None)
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="lorakit-kernel-") as working_dir:
            papermill.execute_notebook(
                str(source), str(executed), parameters=params, kernel_name=KERNEL_NAME, progress_bar=False,
                log_output=log_output, execution_timeout=timeout,
                kernel_manager_class=_kernel_manager_class(working_dir, kernel_environment(changes)),
            )
    except PapermillExecutionError as exc:
        run.ok = False
        run.failed_cell = exc.exec_count
        run.failed_source = exc.source
        run.error = f"{exc.ename}: {exc.evalue}"
        run.traceback = list(exc.traceback or [])
    except RuntimeError as exc:  # jupyter_client's and nbclient's words for a kernel that died or never answered
        run.ok = False
        run.error = f"the kernel stopped ({exc}); run `{sys.executable} -m ipykernel_launcher --help` to see why"
    run.duration_s = time.perf_counter() - start
    if html and executed.exists():
        run.html = export_html(executed, hide_code=_hides_code(source))
    if not run.ok and check:
        raise NotebookError(run)
    return run


def _default_parameters(notebook: Path) -> dict:
    """The literal defaults of a notebook's ``parameters`` cell (for naming a run by its LoRA when not given)."""
    import ast

    import papermill

    defaults = {}
    for name, info in papermill.inspect_notebook(str(notebook)).items():
        with contextlib.suppress(ValueError, SyntaxError, TypeError):
            defaults[name] = ast.literal_eval(info.get("default") or "")
    return defaults


def _hides_code(notebook: Path) -> bool:
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    return bool(nb.metadata.get("lorakit", {}).get("hide_code"))


# The lab template with every script from the network left out: the page is static (plots and images are
# embedded), and a blocked CDN must not stall opening it.
_OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
"""


def export_html(notebook: str | Path, out: str | Path | None = None, *, hide_code: bool = False) -> Path:
    """Write an executed notebook as one standalone HTML file (images inline, no network scripts).

    Stream outputs are coalesced and ``\\r`` redraws folded, so a text progress bar shows its final state.
    ``hide_code`` leaves the code cells' input out (a report for readers, not programmers).
    """
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    path = Path(notebook)
    target = Path(out) if out is not None else path.with_suffix(".html")
    config = Config({"CoalesceStreamsPreprocessor": {"enabled": True}})
    exporter = HTMLExporter(
        config=config, template_name="lab", template_file="lorakit_offline.html.j2", embed_images=True,
        exclude_input=hide_code, exclude_input_prompt=hide_code, exclude_output_prompt=hide_code,
        extra_loaders=[jinja2.DictLoader({"lorakit_offline.html.j2": _OFFLINE_TEMPLATE})],
    )
    nb = nbformat.read(path, as_version=4)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": path.stem}})
    # Replaced whole, and never through a link planted at the report's name (reports are shared with others).
    Root(target.parent, "the report folder").write_atomic(target, body.encode("utf-8"))
    return target


# ---- the release report -------------------------------------------------------------------------------------------
@dataclass
class ReleaseReport:
    """Everything ``04_eval_report`` shows about one release, read from the records (no decisions added)."""

    lora: dict
    release: dict
    lora_project: str | None  # where the LoRA record lives (None: a baseline LoRA)
    checkpoint: dict | None
    manifest: dict | None
    manifest_problem: str | None
    loss_log: Path | None
    samples: list[Path]
    evals: list[dict]  # of this release, newest first
    grid_eval: dict | None  # the eval to show: the newest complete grid, else the newest eval
    status: dict

    @property
    def reviews(self) -> list[dict]:
        from .gate import reviews_of

        return reviews_of(self.release)

    @property
    def validation(self) -> dict | None:
        """The release's ``training.validation`` block as recorded (None: trained without validation)."""
        from .loras import release_validation

        return release_validation(self.release)

    @property
    def validation_text(self) -> str:
        """The release's validation drop in one line, as every display shows it."""
        from .loras import validation_summary

        return validation_summary(self.validation)

    @property
    def validation_details(self) -> dict:
        """The validation block without its curve (which the loss chart draws), for a key-value table; empty when
        the release has none."""
        return {k: v for k, v in (self.validation or {}).items() if k != "curve"}

    @property
    def has_validation_curve(self) -> bool:
        """Whether the release's validation block holds a curve with at least one usable point."""
        from .loras import validation_facts

        facts = validation_facts(self.validation)
        return bool(facts and facts["curve"])


def pick_release_id(lora: dict, release_id: str | None = None) -> str:
    """The release a report is about: the one asked for, else the active one, else the newest."""
    if release_id:
        return release_id
    if lora.get("activeReleaseId"):
        return lora["activeReleaseId"]
    releases = lora.get("releases") or []
    if not releases:
        raise RecordNotFoundError(f"LoRA {lora.get('id')!r} has no releases yet (train one first)")
    return releases[-1]["id"]


def release_report(ws: Workspace | str | Path | None, lora_id: str, release_id: str | None = None,
                   project: str | None = None) -> ReleaseReport:
    """Read what a release report shows: checkpoint, dataset manifest, training files, validation drop, evals,
    review state."""
    from .config import resolve_root_path, resolve_weights
    from .datasets import load_manifest
    from .errors import ConfigError
    from .gate import eval_scopes, eval_state, evals_of_release, locate_lora, recommendation_problems
    from .gate import review_state as gate_review_state
    from .loras import get_release
    from .models import get_checkpoint

    ws = as_workspace(ws)
    location = locate_lora(ws.store, lora_id, project)
    lora = ws.store.read("lora", lora_id, location.project)
    release = get_release(lora, pick_release_id(lora, release_id))
    training = release.get("training") or {}

    checkpoint = None
    with contextlib.suppress(LorakitError):
        checkpoint = get_checkpoint(ws, training.get("checkpointId") or lora["checkpointId"])

    manifest, manifest_problem = None, None
    dataset_id = training.get("datasetId")
    if dataset_id:
        dataset_project = training.get("datasetProjectId") if training.get("datasetScope", "project") == "project" else None
        try:
            manifest = load_manifest(ws, dataset_id, dataset_project)
            if training.get("manifestHash") and manifest.get("manifestHash") != training["manifestHash"]:
                manifest_problem = (f"dataset {dataset_id!r} changed since training (manifest hash "
                                    f"{manifest.get('manifestHash', '?')[:12]} != {training['manifestHash'][:12]})")
        except LorakitError as exc:
            manifest_problem = f"dataset {dataset_id!r}: {exc}"
    else:
        manifest_problem = "the release names no dataset"

    loss_log = None
    if training.get("lossLog"):
        candidate = resolve_root_path("lorasRoot", training["lossLog"], ws.config,
                                      f"LoRA {lora_id} release {release['id']}: training.lossLog")
        loss_log = candidate if candidate.is_file() else None
    samples: list[Path] = []
    if release.get("weights"):
        with contextlib.suppress(ConfigError):
            weights = resolve_weights(release["weights"], ws.config, must_exist=False)
            samples = _samples_beside(weights)

    scopes = eval_scopes(location, project)
    evals = sorted(evals_of_release(ws.store, lora_id, release, scopes), key=lambda e: e.get("createdAt", ""),
                   reverse=True)
    complete_grids = [e for e in evals if e.get("status") == "complete" and isinstance(e.get("grid"), dict)]
    grid_eval = complete_grids[0] if complete_grids else evals[0] if evals else None
    active_evals = evals if lora.get("activeReleaseId") == release["id"] else []
    status = {
        "release status": release.get("status"), "review": gate_review_state(release),
        "active release of the LoRA": lora.get("activeReleaseId") == release["id"],
        "LoRA recommended": bool(lora.get("recommended")), "evals": eval_state(evals),
        "can be recommended": not recommendation_problems(lora, active_evals) if active_evals else False,
    }
    return ReleaseReport(lora, release, location.project, checkpoint, manifest, manifest_problem, loss_log, samples,
                         evals, grid_eval, status)


def _samples_beside(weights: Path) -> list[Path]:
    """The sample images in the ``samples/`` folder beside a release's weights, leaving out any that a symbolic
    link (the folder or the image) leads out of the weights' folder: the report embeds what it shows."""
    folder = os.path.realpath(weights.parent)
    return [p for p in sorted((weights.parent / "samples").glob("*.png"))
            if os.path.realpath(p).startswith(folder.rstrip(os.sep) + os.sep)]


def _report_path_text(path: Path, repo_root: Path) -> str:
    """A report path as recorded: relative to the folder holding the data root when inside it (POSIX), else
    absolute."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(repo_root.resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def make_report(
    ws: Workspace | str | Path | None,
    lora_id: str,
    release_id: str | None = None,
    *,
    project: str | None = None,
    out_dir: str | Path | None = None,
    parameters: Mapping | None = None,
    timeout: float | None = None,
) -> NotebookRun:
    """Run ``04_eval_report`` for one release (``lorakit report --lora L --release R``) and record the report's
    path on the release: ``evaluation.report = {html, notebook, createdAt}``.

    ``release_id`` defaults to the active release, else the newest. A failing report records nothing.
    """
    from .loras import update_release
    from .store import now_iso

    ws = as_workspace(ws)
    report = release_report(ws, lora_id, release_id, project)
    release_id = report.release["id"]
    params = {**(parameters or {}), "project": project or report.lora_project, "lora": lora_id, "release": release_id}
    config = os.environ.get("LORAKIT_CONFIG")
    run = run_notebook(REPORT_NOTEBOOK, params, out_dir=out_dir, data_root=ws.data_root, config=config,
                       timeout=timeout)

    def record(release: dict) -> None:
        evaluation = release.get("evaluation")
        if not isinstance(evaluation, dict):
            evaluation = {}
        repo = ws.config.repo_folder
        evaluation["report"] = {"html": _report_path_text(run.html, repo) if run.html else None,
                                "notebook": _report_path_text(run.executed, repo), "createdAt": now_iso()}
        release["evaluation"] = evaluation

    update_release(ws, lora_id, release_id, record, project=report.lora_project)
    return run


__all__ = [
    "NOTEBOOKS_DIR", "REPORTS_DIR", "NotebookError", "NotebookRun", "ReleaseReport", "export_html", "find_notebook",
    "list_notebooks", "make_report", "parse_parameter", "pick_release_id", "release_report", "report_stem",
    "run_notebook",
]
