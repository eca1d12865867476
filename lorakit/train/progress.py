"""What a run shows and leaves behind about its progress.

The recipe reports each optimizer step once, as a :class:`StepReport`, to every :class:`StepCallback` it was
given. The CSV log (:class:`LossLog`), the terminal's progress bar (:class:`ProgressBar`) and the wizard's
progress bar are such callbacks; none of them reads another's output.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

LOG_NAME = "train_log.csv"
LOG_COLUMNS = ("step", "epoch", "loss", "lr", "elapsed_s")


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

    def __init__(self, path: str | Path, resume_from_step: int = 0):
        self.path = Path(path)
        rows = read_loss_log(self.path) if resume_from_step and self.path.exists() else []
        kept = [r for r in rows if r["step"] <= resume_from_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "w", encoding="utf-8", newline="")
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
    """The rows of a loss log as dicts with numbers."""
    with open(path, encoding="utf-8", newline="") as handle:
        return [
            {"step": int(r["step"]), "epoch": int(r["epoch"]), "loss": float(r["loss"]), "lr": float(r["lr"]),
             "elapsed_s": float(r["elapsed_s"])}
            for r in csv.DictReader(handle)
        ]


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


def plot_loss(log: str | Path, out: str | Path | None = None, smoothing: float = 0.9):
    """Plot a run's loss (raw and smoothed) and learning rate from its ``train_log.csv``.

    ``log`` is the CSV or the folder holding it. Returns the matplotlib ``Figure`` (shown inline in a
    notebook); ``out`` also saves it as an image.

    >>> fig = plot_loss("models/loras/hero/01J.../train_log.csv", "loss.png")   # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    path = Path(log)
    if path.is_dir():
        path = path / LOG_NAME
    rows = read_loss_log(path)
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    if rows:
        ax.plot(steps, smooth(losses, smoothing), color="tab:blue", linewidth=2, label=f"loss (EMA {smoothing})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in rows], color="tab:orange", linewidth=1, label="learning rate")
    lr_ax.set_ylabel("learning rate")
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right")
    ax.set_title(path.parent.name)
    if out is not None:
        fig.savefig(out, dpi=100)
    return fig
