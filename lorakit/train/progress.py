"""What a run shows and leaves behind about its progress.

The recipe reports each optimizer step once, as a :class:`StepReport`, to every :class:`StepCallback` it was
given. The CSV log (:class:`LossLog`), the terminal's progress bar (:class:`ProgressBar`) and the wizard's
progress bar are such callbacks; none of them reads another's output.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from ..errors import RecordError, TrainingError
from ..roots import Root, open_regular

LOG_NAME = "train_log.csv"
LOG_COLUMNS = ("step", "epoch", "loss", "lr", "elapsed_s")
MAX_LOG_BYTES = 128 * 2**20  # rows are under 64 bytes: room for more steps than the steps setting allows
_MAX_COUNT = 2**53  # steps and epochs: beyond this a float no longer holds them exactly


@dataclass(frozen=True)
class StepReport:
    """One finished optimizer step: ``step`` counts from 1 up to ``total``; ``epoch`` from 1."""

    step: int
    total: int
    epoch: int
    loss: float
    lr: float
    elapsed_s: float


class StepCallback(Protocol):
    """Anything called with each :class:`StepReport` of a run (a function will do)."""

    def __call__(self, report: StepReport) -> None: ...


class ProgressBar:
    """The terminal's progress bar (tqdm) as a step callback."""

    def __init__(self, total: int, initial: int, description: str, enabled: bool = True):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=initial, desc=description, unit="step", disable=not enabled,
                         dynamic_ncols=True)

    def __call__(self, report: StepReport) -> None:
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{report.loss:.4f}", lr=f"{report.lr:.2e}", refresh=False)

    def close(self) -> None:
        self._bar.close()


class LossLog:
    """``train_log.csv`` next to the weights: one row per optimizer step, flushed as it is written, so a
    killed run leaves a readable log. Reopening for a resumed run drops the rows after the resumed step.
    As a step callback it writes the report's row."""

    def __init__(self, path: str | Path, resume_from_step: int = 0, root: Root | None = None):
        self.path = Path(path)
        # Opened through ``root`` (the run folder's lorasRoot) before anything is read: a log that is a link or a
        # name for a file elsewhere is refused, never read, truncated or appended to.
        if root is None:  # a log the caller placed: its folder is the root
            self.path.parent.mkdir(parents=True, exist_ok=True)
            root = Root(self.path.parent, "the log's folder")
        else:
            root.make_folder(self.path.parent)
        self._handle = root.open_file(self.path)
        try:
            rows = loss_log_rows(self._handle, self.path) if resume_from_step else []
            self._handle.seek(0)
            self._handle.truncate()
        except BaseException:
            self._handle.close()
            raise
        kept = [r for r in rows if r["step"] <= resume_from_step]
        self._handle.write(",".join(LOG_COLUMNS) + "\n")
        for r in kept:
            self.write(r["step"], r["epoch"], r["loss"], r["lr"], r["elapsed_s"])

    def __call__(self, report: StepReport) -> None:
        self.write(report.step, report.epoch, report.loss, report.lr, report.elapsed_s)

    def write(self, step: int, epoch: int, loss: float, lr: float, elapsed_s: float) -> None:
        self._handle.write(f"{step},{epoch},{loss:.8g},{lr:.8g},{elapsed_s:.4f}\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_loss_log(path: str | Path) -> list[dict]:
    """The rows of a loss log as dicts with numbers.

    A run folder may come from someone else, so the log is checked as it is read: its header is
    :data:`LOG_COLUMNS`, every cell a finite number >= 0 (step and epoch positive integers, steps rising), and the
    file at most :data:`MAX_LOG_BYTES`; anything else is a :class:`TrainingError` naming the file and line.
    A last line cut short (a run killed mid-write, a full disk) is left out.
    """
    path = Path(path)
    try:
        # Non-blocking and checked on the handle, so a FIFO planted in its place is refused, not waited on.
        with open_regular(path, "loss log") as handle:
            return loss_log_rows(handle, path)
    except RecordError as exc:
        raise TrainingError(f"{exc}; {_LOG_FIX}") from None
    except OSError as exc:
        raise TrainingError(f"loss log {path} cannot be read: {exc.strerror or exc}") from None


_LOG_FIX = "it is only the run's loss history: delete it, or replace it with the log the run wrote"


def loss_log_rows(handle: IO[bytes] | IO[str], path: str | Path) -> list[dict]:
    """The checked rows of an open loss log (``path`` names it in errors), read up to :data:`MAX_LOG_BYTES`."""
    path, fix = Path(path), _LOG_FIX
    raw = handle.read(MAX_LOG_BYTES + 1)
    if len(raw) > MAX_LOG_BYTES:
        raise TrainingError(f"loss log {path} is larger than {MAX_LOG_BYTES // 2**20} MiB, more than any run "
                            f"writes; {fix}")
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TrainingError(f"loss log {path}: not UTF-8 text (byte {exc.start}); {fix}") from None
    lines = text.splitlines()
    if lines and not text.endswith(("\n", "\r")):
        try:
            _log_row(next(csv.reader([lines[-1]])), len(lines), path, 0, fix)
        except (TrainingError, csv.Error, StopIteration):
            lines = lines[:-1]
    try:
        rows = list(csv.reader(lines))
    except csv.Error as exc:
        raise TrainingError(f"loss log {path}: not CSV ({exc}); {fix}") from None
    if not rows:
        return []
    if tuple(rows[0]) != LOG_COLUMNS:
        header = ",".join(rows[0])
        raise TrainingError(f"loss log {path}: line 1 has the columns {_clip(header)!r}, not "
                            f"{','.join(LOG_COLUMNS)!r}; {fix}")
    out: list[dict] = []
    for number, cells in enumerate(rows[1:], 2):
        out.append(_log_row(cells, number, path, out[-1]["step"] if out else 0, fix))
    return out


def _log_row(cells: list[str], number: int, path: Path, previous_step: int, fix: str) -> dict:
    """One checked row of a loss log (``number`` is its line, for the message)."""
    where = f"loss log {path}: line {number}"
    if len(cells) != len(LOG_COLUMNS):
        raise TrainingError(f"{where} has {len(cells)} cells, not {len(LOG_COLUMNS)} ({', '.join(LOG_COLUMNS)}); {fix}")
    row: dict = {}
    for name, cell in zip(LOG_COLUMNS, cells, strict=True):
        try:
            value: float = int(cell) if name in ("step", "epoch") else float(cell)
        except ValueError:
            value = math.nan
        low_ok = 0 < value <= _MAX_COUNT if name in ("step", "epoch") else value >= 0
        if not low_ok or not math.isfinite(value):
            kind = "a positive integer" if name in ("step", "epoch") else "a finite number >= 0"
            raise TrainingError(f"{where}: {name} is {_clip(cell)!r}, not {kind}; {fix}")
        row[name] = value
    if row["step"] <= previous_step:
        raise TrainingError(f"{where}: step {row['step']} does not follow step {previous_step}; {fix}")
    return row


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average (TensorBoard's smoothing), bias-corrected so the first points are not pulled to 0.

    >>> [round(v, 3) for v in smooth([1.0, 0.0, 0.0], 0.5)]
    [1.0, 0.333, 0.143]
    """
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


VALIDATION_SET_LABELS = {"heldOut": "held-out images", "training": "training images"}


def short_id(record_id: str, keep: int = 8) -> str:
    """A long id cut to its last ``keep`` characters after a "…" (a ULID's last characters are its random part,
    the ones that tell two releases of the same minute apart); a short id as it is.

    >>> short_id("01M8T5S2T2CF3WAEK317TK1MG2"), short_id("r1")
    ('…17TK1MG2', 'r1')
    """
    return record_id if len(record_id) <= keep + 1 else "…" + record_id[-keep:]


def release_label(release: Mapping | str, lora: Mapping | None = None) -> str:
    """A release as a person reads it: its number among the LoRA's releases, its status and when it was
    trained, with the id shortened.

    >>> release_label({"id": "01M8T5S2T2CF3WAEK317TK1MG2", "status": "candidate", "createdAt": "2026-12-02T01:26:56.000Z"},
    ...               {"releases": [{"id": "r0"}, {"id": "01M8T5S2T2CF3WAEK317TK1MG2"}]})
    'release 2 of 2 (…17TK1MG2), candidate, trained 2026-12-02 01:26 UTC'
    """
    record = release if isinstance(release, Mapping) else {"id": release}
    release_id = str(record.get("id"))
    ids = [r.get("id") for r in (lora or {}).get("releases") or [] if isinstance(r, Mapping)]
    label = f"release {ids.index(release_id) + 1} of {len(ids)} ({short_id(release_id)})" if release_id in ids \
        else f"release {short_id(release_id)}"
    if record.get("status"):
        label += f", {record['status']}"
    created = record.get("createdAt")
    if isinstance(created, str) and len(created) >= 16 and created[10] == "T":
        label += f", trained {created[:10]} {created[11:16]} UTC"
    return label


def loss_title(log_path: Path | None, lora: Mapping | str | None, release: Mapping | str | None) -> str:
    """The loss chart's title: the LoRA (name and id) and a readable release label. Without records it reads
    them from the run folder, which is ``<lorasRoot>/<LoRA id>/<release id>/``.

    >>> loss_title(Path("loras/icons/01M8T5S2T2CF3WAEK317TK1MG2/train_log.csv"), None, None)
    'LoRA icons - release …17TK1MG2'
    """
    if isinstance(lora, Mapping):
        name, lora_id = lora.get("name"), lora.get("id")
        who = f"{name} ({lora_id})" if name and name != lora_id else str(lora_id or name)
    else:
        who = lora or (log_path.parent.parent.name if log_path is not None else "")
    if release is None and log_path is not None:
        release = log_path.parent.name
    parts = [f"LoRA {who}" if who else "", release_label(release, lora if isinstance(lora, Mapping) else None)
             if release else ""]
    return " - ".join(p for p in parts if p)


def constant_rate(rates: list[float]) -> float | None:
    """The learning rate when every step used the same one (a constant schedule), else None.

    >>> constant_rate([1e-3, 1e-3]), constant_rate([1e-3, 5e-4]), constant_rate([])
    (0.001, None, None)
    """
    if not rates:
        return None
    first = rates[0]
    return first if all(abs(r - first) <= 1e-12 * max(abs(first), 1e-30) for r in rates) else None


def plot_loss(log: str | Path | None, out: str | Path | None = None, smoothing: float = 0.9,
              validation: dict | None = None, *, lora: Mapping | str | None = None,
              release: Mapping | str | None = None):
    """Plot a run's loss (raw and smoothed) and learning rate from its ``train_log.csv`` and, given the release's
    ``training.validation``, its validation curve on a second axis below, on the same steps.

    ``log`` is the CSV or the folder holding it (None: the validation curve alone, for a release whose log is on
    another machine). The title names the LoRA and the release (:func:`loss_title`): give ``lora`` (its record,
    or a name) and ``release`` (its record, or id) for the name, number, status and date; without them the run
    folder's names are used. A constant learning rate is labelled with its one value instead of an axis. The validation axis shows the headline loss at each score, the training images' loss
    beside a held-out one, and the base model's loss as a dashed line: the curve falling away from it is the
    drop. Returns the matplotlib ``Figure`` (shown inline in a notebook); ``out`` also saves it as an image.

    >>> release = lorakit.get_lora(ws, "hero")["releases"][-1]                           # doctest: +SKIP
    >>> fig = plot_loss("models/loras/hero/01J.../train_log.csv", "loss.png",
    ...                 validation=release["training"].get("validation"))                # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    from ..loras import validation_facts, validation_summary

    facts = validation_facts(validation)
    curve = facts["curve"] if facts else []
    if log is None and not curve:
        raise TrainingError("nothing to plot: no loss log given and the release has no validation curve")
    fig = Figure(figsize=(8, 7.5 if log is not None and curve else 4.5), layout="constrained")
    axes = fig.subplots(2 if log is not None and curve else 1, 1, sharex=True, squeeze=False)[:, 0]
    path = None
    if log is not None:
        path = Path(log)
        path = path / LOG_NAME if path.is_dir() else path
        _plot_training_loss(axes[0], read_loss_log(path), smoothing)
    title = loss_title(path, lora, release)
    if facts is not None and curve:
        _plot_validation(axes[-1], facts)
    if facts is not None:
        title = f"{title}\n{validation_summary(validation)}" if title else validation_summary(validation)
    fig.suptitle(title)
    axes[-1].set_xlabel("step")
    if out is not None:
        fig.savefig(out, dpi=100)
    return fig


def _plot_training_loss(ax, rows: list[dict], smoothing: float) -> None:
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    if rows:
        ax.plot(steps, smooth(losses, smoothing), color="tab:blue", linewidth=2, label=f"loss (EMA {smoothing})")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    rates = [r["lr"] for r in rows]
    constant = constant_rate(rates)
    handles = ax.get_legend_handles_labels()[0]
    if constant is not None:
        # One value: an axis would only show ticks around it (1e-3 +/- 1e-12); the legend says it instead.
        handles += [ax.plot([], [], " ", label=f"lr {constant:g} (constant)")[0]]
    else:
        lr_ax = ax.twinx()
        lr_ax.plot(steps, rates, color="tab:orange", linewidth=1, label="learning rate")
        lr_ax.set_ylabel("learning rate")
        handles += lr_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right")


def _plot_validation(ax, facts: dict) -> None:
    """The validation axis: the headline set's loss per score, the training images' beside a held-out set, and
    the base model's loss as the reference the drop is measured from."""
    curve = facts["curve"]
    label = VALIDATION_SET_LABELS.get(facts["set"] or "", "validation images")
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], color="tab:green", marker="o", linewidth=2,
            label=f"validation loss ({label})")
    beside = [p for p in curve if p["trainingLoss"] is not None]
    if beside:
        ax.plot([p["step"] for p in beside], [p["trainingLoss"] for p in beside], color="tab:purple", marker=".",
                linewidth=1, label="validation loss (training images)")
    if facts["baseLoss"] is not None:
        ax.axhline(facts["baseLoss"], color="gray", linestyle="--", linewidth=1, label="base model")
    if facts["stoppedAt"] is not None:
        ax.axvline(facts["stoppedAt"], color="tab:red", linestyle=":", linewidth=1, label="stopped early")
        if facts["bestStep"] is not None:  # an early stop keeps the best score's weights, not the last step's
            ax.axvline(facts["bestStep"], color="tab:green", linestyle=":", linewidth=1, label="weights kept")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
