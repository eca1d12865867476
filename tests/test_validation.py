"""Validation loss: the pure decisions (hold-out, draws, schedule of scores, early stopping, the record) and the
native trainer's scores on the tiny checkpoint (record, determinism, no effect on the weights, early stop, resume).
"""

from __future__ import annotations

import json

import pytest
from test_train import FAST, new_lora, same_tensors, tensors_of, write_dataset
from test_train import ws as ws  # noqa: F401  (the module-scoped workspace fixture, one thread)

import lorakit
from lorakit.train import TrainingError, train_lora
from lorakit.train.data import TrainItem
from lorakit.train.kohya_format import read_lora_file
from lorakit.train.recipe import plan_training
from lorakit.train.validation import (
    MAX_DEFAULT_SCORES,
    ValidationScores,
    default_max_scores,
    draw_timesteps,
    held_out_assets,
    is_score_step,
    loss_drop,
    round_loss,
    score_batches,
    score_interval,
    score_steps,
    split_items,
    validation_record,
)


def item(index: int, asset: str) -> TrainItem:
    return TrainItem(index, None, f"files/{index}.png", f"{index:064x}", "icon", 64, 64, asset)  # type: ignore[arg-type]


# ---- the held-out split ------------------------------------------------------------------------------------
def test_split_holds_out_whole_assets_seeded_and_stable_when_assets_are_added():
    items = [item(i, f"a{i // 3}") for i in range(30)]   # 10 assets of 3 items
    train, held = split_items(items, 0.2, 0, "gems")
    assert len(held) == 6 and len(train) == 24                               # round(0.2 * 10) = 2 assets
    assert {it.asset_id for it in train}.isdisjoint({it.asset_id for it in held})
    assert sorted(it.index for it in train + held) == list(range(30))       # nothing lost, nothing twice
    assert split_items(items, 0.2, 0, "gems") == (train, held)               # seeded
    seeds = {frozenset(held_out_assets([f"a{i}" for i in range(10)], 0.2, seed)) for seed in range(6)}
    assert len(seeds) > 1                                                    # ... and the seed matters
    # An asset added to the dataset does not move the others across the split (ranked by hash, not shuffled).
    before = held_out_assets([f"a{i}" for i in range(40)], 0.25, 3)
    after = held_out_assets([f"a{i}" for i in range(41)], 0.25, 3)
    assert len(before & after) >= len(before) - 1


def test_split_zero_keeps_everything_and_a_tiny_fraction_still_holds_one_asset_out():
    items = [item(i, f"a{i}") for i in range(5)]
    assert split_items(items, 0.0, 0, "gems") == (items, [])
    train, held = split_items(items, 0.01, 0, "gems")
    assert len(held) == 1 and len(train) == 4


def test_split_that_leaves_a_side_empty_is_a_clear_error():
    with pytest.raises(TrainingError, match=r"needs at least 2 assets in dataset 'gems', which has 1.*validation_split 0"):
        split_items([item(0, "a"), item(1, "a")], 0.5, 0, "gems")
    with pytest.raises(TrainingError, match=r"holds out all 3 assets of dataset 'gems'.*at most 0\.67"):
        split_items([item(i, f"a{i}") for i in range(3)], 0.9, 0, "gems")


# ---- the fixed draws ---------------------------------------------------------------------------------------
def test_draw_timesteps_cover_the_schedule_one_per_stratum_and_are_fixed_per_image():
    for sha in ("00", "ff", "abc"):
        steps = draw_timesteps(0, sha, 4, 1000)
        assert [t // 250 for t in steps] == [0, 1, 2, 3]
        assert draw_timesteps(0, sha, 4, 1000) == steps
    assert draw_timesteps(0, "00", 4, 1000) != draw_timesteps(0, "ff", 4, 1000)
    assert draw_timesteps(0, "00", 4, 1000) != draw_timesteps(1, "00", 4, 1000)
    assert all(0 <= t < 10 for t in draw_timesteps(5, "x", 10, 10))          # strata of width 1
    assert draw_timesteps(5, "x", 10, 10) == list(range(10))


def test_score_batches_hold_one_bucket_each_and_every_pair_once():
    buckets = [(64, 64), (64, 96), (64, 64), (96, 64), (64, 64)]
    batches = score_batches(buckets, 3, 4)
    pairs = [p for b in batches for p in b]
    assert sorted(pairs) == [(i, k) for i in range(5) for k in range(3)]
    assert all(len(b) <= 4 and len({buckets[i] for i, _ in b}) == 1 for b in batches)
    assert score_batches(buckets, 3, 4) == batches


# ---- when to score -----------------------------------------------------------------------------------------
def test_default_schedule_scores_every_epoch_but_at_most_max_scores_times():
    assert score_interval(None, 3, 4) == 3
    assert score_steps(12, score_interval(None, 3, 4)) == [0, 3, 6, 9, 12]
    for epochs in (19, 20, 21, 39, 40, 41, 50, 333):
        steps = score_steps(epochs * 7, score_interval(None, 7, epochs))
        assert len(steps) - 1 <= MAX_DEFAULT_SCORES and steps[-1] == epochs * 7
        assert all(s % 7 == 0 for s in steps)                                 # always at an epoch's end
    # A run of a set step count that ends mid-epoch is still scored at its last step.
    assert score_steps(10, score_interval(None, 4, 3)) == [0, 4, 8, 10]
    assert score_interval(5, 4, 100) == 5 and score_steps(12, 5) == [0, 5, 10, 12]
    assert not is_score_step(0, 12, 5) and is_score_step(12, 12, 5) and not is_score_step(11, 12, 5)


def test_the_default_number_of_scores_fits_a_tenth_of_the_training_compute():
    # (steps, images per step, scored (image, draw) pairs): a score is one forward pass per pair, a trained
    # image about three.
    for steps, per_step, pairs in [(300, 2, 40), (300, 2, 80), (1500, 4, 400), (20, 1, 24), (10_000, 8, 64)]:
        scores = default_max_scores(steps, per_step, pairs)
        assert 1 <= scores <= MAX_DEFAULT_SCORES
        assert scores == 1 or scores * pairs <= 0.10 * 3 * steps * per_step
        assert scores == MAX_DEFAULT_SCORES or (scores + 1) * pairs > 0.10 * 3 * steps * per_step
    # The demo benchmark's run: 300 steps of 2 images, 10 images x 4 draws, 5 steps an epoch.
    assert score_steps(300, score_interval(None, 5, 60, default_max_scores(300, 2, 40))) == [0, 75, 150, 225, 300]


# ---- scores, early stopping, the record ----------------------------------------------------------------------
def test_scores_track_the_best_and_stop_after_patience_scores_without_a_lower_loss():
    scores = ValidationScores(base=1.0)
    assert scores.add(0, 0, 1.0, None, 0.1, 2)
    assert scores.add(3, 1, 0.8, None, 0.1, 2)
    assert not scores.add(6, 2, 0.8, None, 0.1, 2) and not scores.stopped_early   # equal is not lower
    assert scores.add(9, 3, 0.7, None, 0.1, 2) and scores.since_best == 0
    assert not scores.add(12, 4, 0.9, None, 0.1, 2) and not scores.stopped_early
    assert not scores.add(15, 5, 0.75, None, 0.1, 2) and scores.stopped_early
    assert (scores.best_step, scores.best_loss) == (9, 0.7)
    assert ValidationScores.from_state(scores.to_state()) == scores
    never = ValidationScores(base=1.0)
    for step, loss in enumerate([1.0, 1.1, 1.2, 1.3]):
        never.add(step, step, loss, None, 0.0, None)
    assert not never.stopped_early and never.best_step == 0                  # no patience: never stops


@pytest.mark.parametrize("junk", [None, [], {"curve": "x"}, {"curve": [{"step": "0"}], "bestLoss": 1.0, "seconds": 0},
                                  {"curve": [], "bestLoss": "low", "seconds": 0}])
def test_saved_scores_that_are_not_lorakits_are_refused(junk):
    with pytest.raises(ValueError):
        ValidationScores.from_state(junk)


def test_record_has_the_headline_set_rounded_losses_and_the_training_block_only_with_a_split():
    scores = ValidationScores(base=0.123456789, base_training=0.2)
    scores.add(0, 0, 0.123456789, 0.2, 0.4, None)
    scores.add(5, 1, 0.08000001234, 0.1, 0.2, None)
    rec = validation_record(scores, held_out=True, split=0.2, seed=0, draws=4, every=5, images=2, training_images=8,
                            keeps_best=False)
    assert rec["set"] == "heldOut" and rec["images"] == 2 and rec["baseLoss"] == 0.123457
    assert rec["finalLoss"] == 0.08 and rec["drop"] == round_loss(loss_drop(0.123456789, 0.08000001234))
    assert rec["training"] == {"images": 8, "baseLoss": 0.2, "finalLoss": 0.1, "drop": 0.5}
    assert rec["curve"] == [{"step": 0, "epoch": 0, "loss": 0.123457, "trainingLoss": 0.2},
                            {"step": 5, "epoch": 1, "loss": 0.08, "trainingLoss": 0.1}]
    assert rec["secondsPerScore"] == 0.3
    plain = validation_record(scores, held_out=False, split=0.0, seed=0, draws=4, every=5, images=8,
                              training_images=8, keeps_best=False)
    assert plain["set"] == "training" and "training" not in plain
    # With early stopping the release holds the best score's weights, so its numbers are the final ones.
    scores.add(10, 2, 0.09, 0.11, 0.2, 3)
    best = validation_record(scores, held_out=False, split=0.0, seed=0, draws=4, every=5, images=8,
                             training_images=8, keeps_best=True)
    assert best["finalLoss"] == best["bestLoss"] == 0.08 and best["bestStep"] == 5


# ---- the plan -----------------------------------------------------------------------------------------------
def _multi_item_assets(ws, dataset_id: str, n: int = 8, per_asset: int = 2) -> None:
    """A dataset whose assets have several items each (variants of one asset)."""
    manifest = write_dataset(ws, dataset_id, n=n, seed=11)
    for i, it in enumerate(manifest["items"]):
        it["assetId"] = f"asset{i // per_asset}"
    ws.store.write("dataset", manifest, project="demo")


def test_plan_holds_out_by_asset_and_counts_steps_on_the_training_items_only(ws):
    new_lora(ws, "split")
    _multi_item_assets(ws, "split_gems")
    config = {**FAST, "epochs": 1, "batch_size": 1, "validation_split": 0.25}
    plan = plan_training(ws, "split", "split_gems", project="demo", config=config)
    train_assets, held_assets = {it.asset_id for it in plan.items}, {it.asset_id for it in plan.held_out}
    assert len(held_assets) == 1 and len(plan.held_out) == 2 and len(plan.items) == 6
    assert train_assets.isdisjoint(held_assets)
    assert plan.steps_per_epoch == 6 and len(plan.held_out_buckets) == 2
    described = plan.describe()
    assert described["images"] == 6 and described["heldOut"] == 2 and described["validationEvery"] == 6
    again = plan_training(ws, "split", "split_gems", project="demo", config=config)
    assert [it.index for it in again.held_out] == [it.index for it in plan.held_out]
    off = plan_training(ws, "split", "split_gems", project="demo", config={**config, "validation_split": 0.0})
    assert off.held_out == () and len(off.items) == 8
    none = plan_training(ws, "split", "split_gems", project="demo", config={**FAST, "validation": False})
    assert none.describe()["validationEvery"] is None


def test_a_split_of_a_one_asset_dataset_is_refused_before_training(ws):
    new_lora(ws, "one")
    _multi_item_assets(ws, "one_gems", n=3, per_asset=3)
    with pytest.raises(TrainingError, match="needs at least 2 assets in dataset 'one_gems'"):
        train_lora(ws, "one", "one_gems", project="demo", config={**FAST, "validation_split": 0.5}, dry_run=True)


# ---- the trainer -------------------------------------------------------------------------------------------
def _validation(result) -> dict:
    return result.release["training"]["validation"]


def _without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "secondsPerScore"}


@pytest.mark.slow
def test_a_run_records_its_validation_identically_and_leaves_the_weights_as_they_were(ws):
    new_lora(ws, "val")
    write_dataset(ws, "val_gems", seed=12)
    # The hardest case for "no effect on training": trained text encoders (scored through their adapters),
    # LoRA dropout (eval mode must switch it off) and shuffled captions (the scores use the manifest's).
    config = {**FAST, "steps": 12, "lr": 3e-3, "train_text_encoder": True, "lora_dropout": 0.1, "shuffle_tags": True,
              "validation_every": 3}
    first = train_lora(ws, "val", "val_gems", project="demo", config=config, progress=False)
    record = _validation(first)
    assert record["set"] == "training" and record["images"] == 6 and record["draws"] == 4 and record["every"] == 3
    assert [p["step"] for p in record["curve"]] == [0, 3, 6, 9, 12]          # start + every 3 steps (an epoch)
    assert [p["epoch"] for p in record["curve"]] == [0, 1, 2, 3, 4]
    assert "trainingLoss" not in record["curve"][0] and "training" not in record
    # The adapters start as a no-op, so the LoRA's first score is the base model's.
    assert record["curve"][0]["loss"] == record["baseLoss"]
    assert record["drop"] > 0 and record["finalLoss"] == record["curve"][-1]["loss"] < record["baseLoss"]
    assert record["bestLoss"] == min(p["loss"] for p in record["curve"]) and record["stoppedEarly"] is False
    assert record["secondsPerScore"] > 0
    assert lorakit.validate_records(ws) == []
    meta = read_lora_file(first.weights_path)[1]
    assert float(meta["lorakit.validation_drop"]) == record["drop"] and meta["lorakit.validation_set"] == "training"

    second = train_lora(ws, "val", "val_gems", project="demo", config=config, progress=False)
    assert _without_timing(_validation(second)) == _without_timing(record)
    off = train_lora(ws, "val", "val_gems", project="demo", config={**config, "validation": False}, progress=False)
    assert "validation" not in off.release["training"]
    assert same_tensors(tensors_of(first.weights_path), tensors_of(off.weights_path))
    assert not any(k.startswith("lorakit.validation") for k in read_lora_file(off.weights_path)[1])


@pytest.mark.slow
def test_a_held_out_split_scores_both_sets(ws):
    new_lora(ws, "held")
    _multi_item_assets(ws, "held_gems")
    result = train_lora(ws, "held", "held_gems", project="demo", progress=False,
                        config={**FAST, "steps": 6, "lr": 3e-3, "validation_split": 0.25, "validation_draws": 2,
                                "validation_every": 3})
    record = _validation(result)
    assert record["set"] == "heldOut" and record["images"] == 2 and record["split"] == 0.25
    assert record["training"]["images"] == 6 and result.release["training"]["images"] == 6
    assert all("trainingLoss" in p for p in record["curve"]) and [p["step"] for p in record["curve"]] == [0, 3, 6]
    assert record["training"]["finalLoss"] == record["curve"][-1]["trainingLoss"]
    assert record["training"]["drop"] > 0
    assert read_lora_file(result.weights_path)[1]["ss_num_train_images"] == "6"


@pytest.mark.slow
def test_early_stop_keeps_the_best_scores_weights(ws):
    new_lora(ws, "stop")
    write_dataset(ws, "stop_gems", seed=13)
    # A learning rate far too high makes the loss climb after a few steps, so patience runs out early.
    config = {**FAST, "steps": 60, "lr": 0.05, "validation_every": 2, "early_stop_patience": 2}
    stopped = train_lora(ws, "stop", "stop_gems", project="demo", config=config, progress=False)
    record = _validation(stopped)
    assert record["stoppedEarly"] is True and stopped.steps < 60
    last = record["curve"][-1]["step"]
    assert stopped.steps == last and record["bestStep"] == last - 4       # two scores without a lower loss
    assert record["finalLoss"] == record["bestLoss"] == min(p["loss"] for p in record["curve"])
    assert stopped.release["training"]["steps"] == last
    # The file holds the weights of the best step: the same as a run trained to exactly that step (a constant
    # learning rate, so the two runs take the same steps).
    to_best = train_lora(ws, "stop", "stop_gems", project="demo", progress=False,
                         config={**config, "steps": record["bestStep"], "early_stop_patience": None})
    assert same_tensors(tensors_of(stopped.weights_path), tensors_of(to_best.weights_path))
    assert not same_tensors(tensors_of(stopped.weights_path), tensors_of(
        train_lora(ws, "stop", "stop_gems", project="demo", progress=False,
                   config={**config, "steps": last, "early_stop_patience": None}).weights_path))


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_validation_record(ws):
    new_lora(ws, "res")
    _multi_item_assets(ws, "res_gems")
    config = {**FAST, "steps": 12, "lr": 3e-3, "save_state_every": 4, "validation_split": 0.25,
              "validation_every": 2, "early_stop_patience": 50}
    whole = train_lora(ws, "res", "res_gems", project="demo", config=config, progress=False)

    def interrupt(report) -> None:
        if report.step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_lora(ws, "res", "res_gems", project="demo", config=config, release_id="cut", progress=False,
                   on_step=interrupt)
    run = json.loads((ws.config.loras_root / "res" / "cut" / "run.json").read_text())
    assert run["status"] == "interrupted" and run["step"] == 4
    resumed = train_lora(ws, "res", project="demo", resume="cut", progress=False)
    assert _without_timing(_validation(resumed)) == _without_timing(_validation(whole))
    assert same_tensors(tensors_of(resumed.weights_path), tensors_of(whole.weights_path))

