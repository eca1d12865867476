"""Validation loss: the decisions behind the number a reviewer reads beside the eval grid.

A score is the mean plain MSE of the model's prediction on FIXED draws: for image ``i`` and draw ``k`` the noise
comes from a generator seeded by ``(validation_seed, sha256 of the image, k)`` and the timestep lies in stratum
``k`` of ``validation_draws`` equal slices of the schedule. So an image gets the same draws in every epoch, run
and release of a LoRA, and two scores differ only because the weights do.

Everything here is pure (no torch): which assets are held out, the draws' timesteps, when to score, how pairs
are batched, early stopping and the record the release keeps. The recipe does the forward passes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import TrainingError
from .data import TrainItem, step_seed

# The default schedule scores every epoch, but a run gets at most this many scores (every k-th epoch): a curve
# needs a few points, not hundreds.
MAX_DEFAULT_SCORES = 10
# ... and its scores cost at most this fraction of its training compute (see default_max_scores).
SCORE_BUDGET = 0.10
# A training step costs about three forward passes per image (the forward, and a backward of about twice that).
FORWARDS_PER_TRAINED_IMAGE = 3
# Pairs (image, draw) per forward pass, as a multiple of the training batch size: no gradients are kept, so a
# larger batch fits, and fewer, fuller forward passes are what makes scoring cheap.
BATCH_FACTOR = 8


# ---- the held-out split ------------------------------------------------------------------------------------
def held_out_assets(asset_ids: Sequence[str], fraction: float, seed: int) -> frozenset[str]:
    """The assets a ``fraction`` split holds out: ``round(fraction * assets)``, at least one, chosen by a hash of
    ``(seed, asset id)``. Ranking by hash (not shuffling a list) keeps an asset on its side when other assets
    are added to or removed from the dataset.

    >>> sorted(held_out_assets(["a", "b", "c", "d", "e"], 0.4, 0))
    ['b', 'c']
    """
    assets = sorted(set(asset_ids))
    count = max(1, round(fraction * len(assets)))
    ranked = sorted(assets, key=lambda a: (step_seed(seed, "held-out", a), a))
    return frozenset(ranked[:count])


def split_items(items: Sequence[TrainItem], fraction: float, seed: int,
                dataset: str) -> tuple[list[TrainItem], list[TrainItem]]:
    """``(training items, held-out items)``: every item of a held-out asset is held out. ``fraction`` 0 holds out
    nothing. A split that leaves either side without an asset is a :class:`TrainingError`."""
    if not fraction:
        return list(items), []
    assets = sorted({it.asset_id for it in items})
    if len(assets) < 2:
        raise TrainingError(f"validation_split {fraction:g} needs at least 2 assets in dataset {dataset!r}, which has "
                            f"{len(assets)}: add assets, or set validation_split 0 to score the training images")
    held = held_out_assets(assets, fraction, seed)
    if len(held) == len(assets):
        raise TrainingError(f"validation_split {fraction:g} holds out all {len(assets)} assets of dataset {dataset!r} "
                            f"and leaves none to train on: use at most {(len(assets) - 1) / len(assets):.2f}, or set "
                            "validation_split 0 to score the training images")
    return [it for it in items if it.asset_id not in held], [it for it in items if it.asset_id in held]


# ---- the fixed draws ---------------------------------------------------------------------------------------
def noise_seed(seed: int, image_sha256: str, draw: int) -> int:
    """The seed of the noise of one (image, draw) pair."""
    return step_seed(seed, image_sha256, draw)


def draw_timesteps(seed: int, image_sha256: str, draws: int, num_train_timesteps: int) -> list[int]:
    """One timestep per draw, draw ``k`` at a seeded point of stratum ``k`` of ``draws`` equal slices of
    ``[0, num_train_timesteps)``: every score covers the schedule evenly, low noise to high.

    >>> draw_timesteps(0, "ab", 4, 1000)
    [214, 435, 640, 996]
    """
    steps = []
    for k in range(draws):
        low = k * num_train_timesteps // draws
        high = max(low + 1, (k + 1) * num_train_timesteps // draws)
        steps.append(low + int(random.Random(step_seed(seed, image_sha256, k, "timestep")).random() * (high - low)))
    return steps


def score_batches(buckets: Sequence[tuple[int, int]], draws: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """The (position, draw) pairs of a validation set in forward-pass batches of up to ``batch_size``; a batch
    holds one bucket shape (so its latents stack), in a fixed order.

    >>> score_batches([(64, 64), (64, 96), (64, 64)], 2, 3)
    [[(0, 0), (0, 1), (2, 0)], [(2, 1)], [(1, 0), (1, 1)]]
    """
    by_bucket: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for position, bucket in enumerate(buckets):
        by_bucket.setdefault(bucket, []).extend((position, k) for k in range(draws))
    batches = []
    for bucket in sorted(by_bucket):
        pairs = by_bucket[bucket]
        batches += [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
    return batches


# ---- when to score -----------------------------------------------------------------------------------------
def default_max_scores(total_steps: int, images_per_step: int, scored_pairs: int,
                       budget: float = SCORE_BUDGET) -> int:
    """How many scores a run gets by default: as many as fit in ``budget`` of its training compute (a score is
    one forward pass per (image, draw) pair, both sets with a held-out split), between 1 and
    :data:`MAX_DEFAULT_SCORES`. On a GPU, where a forward pass costs the same batched or not, this is what
    keeps validation near 10 % of the run; a small dataset without repeats gets few scores.

    >>> default_max_scores(300, 2, 40), default_max_scores(3000, 2, 40), default_max_scores(20, 2, 400)
    (4, 10, 1)
    """
    trained = total_steps * images_per_step * FORWARDS_PER_TRAINED_IMAGE
    return max(1, min(MAX_DEFAULT_SCORES, math.floor(budget * trained / max(1, scored_pairs))))


def score_interval(every: int | None, steps_per_epoch: int, num_epochs: int,
                   max_scores: int = MAX_DEFAULT_SCORES) -> int:
    """Optimizer steps between scores: ``every`` when set, else every epoch, or every k-th epoch when there are
    more than ``max_scores`` epochs.

    >>> score_interval(None, 6, 50), score_interval(None, 6, 10), score_interval(15, 6, 50)
    (30, 6, 15)
    """
    if every:
        return every
    return steps_per_epoch * max(1, math.ceil(num_epochs / max_scores))


def is_score_step(step: int, total_steps: int, interval: int) -> bool:
    """Whether the LoRA is scored after optimizer step ``step``: every ``interval`` steps and at the last step
    (the start, step 0, is scored before the loop)."""
    return step > 0 and (step % interval == 0 or step == total_steps)


def score_steps(total_steps: int, interval: int) -> list[int]:
    """Every step the LoRA is scored at, the start included.

    >>> score_steps(10, 4)
    [0, 4, 8, 10]
    """
    return [0] + [s for s in range(1, total_steps + 1) if is_score_step(s, total_steps, interval)]


# ---- the scores of a run, early stopping and the record -------------------------------------------------
def round_loss(value: float) -> float:
    """A loss as recorded: 6 significant digits.

    >>> round_loss(0.123456789), round_loss(12345.6789)
    (0.123457, 12345.7)
    """
    return float(f"{value:.6g}")


def loss_drop(base: float, final: float) -> float:
    """How much of the base model's loss the LoRA removed: ``(base - final) / base``."""
    return (base - final) / base if base else 0.0


@dataclass
class ValidationScores:
    """The scores of one run so far, the best one and the early-stop count. :meth:`to_state` and
    :meth:`from_state` carry it through a saved state as plain numbers, lists and dicts (``weights_only``)."""

    base: float | None = None                 # the base model on the headline set
    base_training: float | None = None        # ... and on the training images, with a held-out split
    curve: list[dict] = field(default_factory=list)   # {"step", "epoch", "loss", "trainingLoss"?}, raw floats
    best_step: int = 0
    best_loss: float = math.inf
    since_best: int = 0
    stopped_early: bool = False
    seconds: float = 0.0                      # wall time of the LoRA scores so far
    timed: int = 0                            # how many of them

    def add(self, step: int, epoch: int, loss: float, training_loss: float | None, seconds: float,
            patience: int | None) -> bool:
        """Record a LoRA score; returns True when it is the best so far. With ``patience``, ``stopped_early``
        turns true once ``patience`` scores in a row have not gone below the best."""
        point: dict[str, Any] = {"step": step, "epoch": epoch, "loss": loss}
        if training_loss is not None:
            point["trainingLoss"] = training_loss
        self.curve.append(point)
        self.seconds += seconds
        self.timed += 1
        if loss < self.best_loss:
            self.best_step, self.best_loss, self.since_best = step, loss, 0
            return True
        self.since_best += 1
        if patience is not None and self.since_best >= patience:
            self.stopped_early = True
        return False

    def to_state(self) -> dict:
        return {"base": self.base, "baseTraining": self.base_training, "curve": [dict(p) for p in self.curve],
                "bestStep": self.best_step, "bestLoss": self.best_loss, "sinceBest": self.since_best,
                "stoppedEarly": self.stopped_early, "seconds": self.seconds, "timed": self.timed}

    @classmethod
    def from_state(cls, state: Any, last_step: int | None = None) -> ValidationScores:
        """The scores a saved state holds; ``ValueError`` (saying which value) when it is not what :meth:`to_state`
        wrote: every loss a finite number, every count a non-negative integer, the curve in step order up to
        ``last_step`` (the state's step), and the best score one of its points."""
        if not isinstance(state, dict) or not isinstance(state.get("curve"), list):
            raise ValueError("no validation scores")
        curve: list[dict] = []
        for i, point in enumerate(state["curve"]):
            where = f"curve point {i}"
            if not isinstance(point, dict) or not {"step", "epoch", "loss"} <= set(point) or \
                    not set(point) <= {"step", "epoch", "loss", "trainingLoss"}:
                raise ValueError(f"{where} is not {{step, epoch, loss, trainingLoss?}}")
            step = _count(point["step"], f"{where} step")
            if curve and step < curve[-1]["step"] or last_step is not None and step > last_step:
                raise ValueError(f"{where} step {step} is out of order (the state is at step {last_step})")
            checked = {"step": step, "epoch": _count(point["epoch"], f"{where} epoch"),
                       "loss": _finite_number(point["loss"], f"{where} loss")}
            if "trainingLoss" in point:
                checked["trainingLoss"] = _finite_number(point["trainingLoss"], f"{where} trainingLoss")
            curve.append(checked)
        best_step = _count(state.get("bestStep", 0), "bestStep")
        best_loss = state.get("bestLoss")
        if curve:
            best_loss = _finite_number(best_loss, "bestLoss")
            if not any(p["step"] == best_step and p["loss"] == best_loss for p in curve):
                raise ValueError(f"bestStep {best_step} with bestLoss {best_loss} is no point of the curve")
        elif best_loss != math.inf:
            raise ValueError(f"bestLoss {best_loss!r} without a curve")
        base = {key: None if state.get(key) is None else _finite_number(state[key], key)
                for key in ("base", "baseTraining")}
        seconds = _finite_number(state.get("seconds"), "seconds")
        if seconds < 0:
            raise ValueError(f"seconds {seconds} is negative")
        stopped = state.get("stoppedEarly", False)
        if not isinstance(stopped, bool):
            raise ValueError(f"stoppedEarly {stopped!r} is not true or false")
        return cls(base=base["base"], base_training=base["baseTraining"], curve=curve, best_step=best_step,
                   best_loss=float(best_loss), since_best=_count(state.get("sinceBest", 0), "sinceBest"),
                   stopped_early=stopped, seconds=float(seconds), timed=_count(state.get("timed", 0), "timed"))

    def released(self, keeps_best: bool) -> dict:
        """The curve point of the weights the release holds: the best score's with early stopping, else the
        last one."""
        if keeps_best:
            return next(p for p in self.curve if p["step"] == self.best_step)
        return self.curve[-1]


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} {value!r} is not a non-negative integer")
    return value


def _finite_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} {value!r} is not a finite number")
    return float(value)


def validation_record(scores: ValidationScores, *, held_out: bool, split: float, seed: int, draws: int, every: int,
                      images: int, training_images: int, keeps_best: bool) -> dict:
    """``training.validation`` of a release (see docs/data-model.md): the headline numbers are for the held-out
    images with a split, else for the training images; losses rounded to 6 significant digits."""
    final = scores.released(keeps_best)
    base = scores.base if scores.base is not None else math.nan
    record: dict[str, Any] = {
        "set": "heldOut" if held_out else "training", "split": split, "seed": seed, "draws": draws, "every": every,
        "images": images, "baseLoss": round_loss(base), "finalLoss": round_loss(final["loss"]),
        "drop": round_loss(loss_drop(base, final["loss"])), "bestStep": scores.best_step,
        "bestLoss": round_loss(scores.best_loss), "stoppedEarly": scores.stopped_early,
    }
    if held_out:
        base_training = scores.base_training if scores.base_training is not None else math.nan
        record["training"] = {"images": training_images, "baseLoss": round_loss(base_training),
                              "finalLoss": round_loss(final["trainingLoss"]),
                              "drop": round_loss(loss_drop(base_training, final["trainingLoss"]))}
    record["curve"] = [{k: round_loss(v) if k in ("loss", "trainingLoss") else v for k, v in p.items()}
                       for p in scores.curve]
    record["secondsPerScore"] = round(scores.seconds / scores.timed, 3) if scores.timed else 0.0
    return record
