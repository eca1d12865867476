"""The loss chart (``lorakit.plot_loss``): the training loss from a run's ``train_log.csv`` and, given the
release's ``training.validation``, the validation curve on a second axis with the base model's loss as the
reference line. The figures are real matplotlib figures; the tests read back what was drawn."""

from __future__ import annotations

import pytest

from lorakit.errors import TrainingError
from lorakit.train.progress import LOG_NAME, LossLog, plot_loss

HELD_OUT = {
    "set": "heldOut", "split": 0.25, "seed": 0, "draws": 4, "every": 4, "images": 2, "baseLoss": 0.2,
    "finalLoss": 0.12, "drop": 0.4, "bestStep": 8, "bestLoss": 0.12, "stoppedEarly": False,
    "training": {"images": 6, "baseLoss": 0.21, "finalLoss": 0.1, "drop": 0.52381},
    "curve": [{"step": 0, "epoch": 0, "loss": 0.2, "trainingLoss": 0.21},
              {"step": 4, "epoch": 1, "loss": 0.15, "trainingLoss": 0.14},
              {"step": 8, "epoch": 2, "loss": 0.12, "trainingLoss": 0.1}],
    "secondsPerScore": 0.05,
}


@pytest.fixture
def run_folder(tmp_path):
    """A run folder with an 8-step loss log, written by the trainer's own LossLog."""
    log = LossLog(tmp_path / LOG_NAME)
    for step in range(1, 9):
        log.write(step, 1 + (step - 1) // 4, 0.3 - 0.02 * step, 1e-4, 0.1 * step)
    log.close()
    return tmp_path


def lines_of(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_validation_curve_is_drawn_below_the_training_loss(run_folder, tmp_path):
    fig = plot_loss(run_folder, tmp_path / "loss.png", validation=HELD_OUT)
    assert (tmp_path / "loss.png").stat().st_size > 0
    loss_ax, validation_ax = (ax for ax in fig.axes if ax.get_ylabel() in ("training loss", "validation loss"))
    assert loss_ax.get_shared_x_axes().joined(loss_ax, validation_ax)  # the same steps on both
    assert lines_of(loss_ax)["loss"][0] == list(range(1, 9))
    drawn = lines_of(validation_ax)
    assert drawn["validation loss (held-out images)"] == ([0, 4, 8], [0.2, 0.15, 0.12])
    assert drawn["validation loss (training images)"] == ([0, 4, 8], [0.21, 0.14, 0.1])
    assert set(drawn["base model"][1]) == {0.2}  # a horizontal line at the base loss
    assert "stopped early" not in drawn
    assert fig._suptitle.get_text().splitlines()[-1] == "validation loss 0.2 → 0.12 (−40.0%) on 2 held-out images"


def test_training_set_curve_and_an_early_stop(run_folder):
    on_training = {**HELD_OUT, "set": "training", "images": 8, "stoppedEarly": True, "bestStep": 4,
                   "curve": [{k: v for k, v in p.items() if k != "trainingLoss"} for p in HELD_OUT["curve"]]}
    on_training.pop("training")
    fig = plot_loss(run_folder, validation=on_training)
    (validation_ax,) = (ax for ax in fig.axes if ax.get_ylabel() == "validation loss")
    drawn = lines_of(validation_ax)
    assert "validation loss (training images)" in drawn and len(drawn["validation loss (training images)"][0]) == 3
    assert set(drawn["stopped early"][0]) == {8} and set(drawn["weights kept"][0]) == {4}
    assert "(stopped early at step 8)" in fig._suptitle.get_text()


def test_without_validation_the_chart_is_the_training_loss_alone(run_folder):
    fig = plot_loss(run_folder)
    (loss_ax,) = fig.axes  # a constant learning rate gets no axis of its own
    assert loss_ax.get_ylabel() == "training loss"
    # Without records, the run folder (<lorasRoot>/<LoRA>/<release>) names both, the release id shortened.
    run = run_folder / "icons" / "01M8T5S2T2CF3WAEK317TK1MG2"
    run.mkdir(parents=True)
    (run / LOG_NAME).write_bytes((run_folder / LOG_NAME).read_bytes())
    assert plot_loss(run)._suptitle.get_text() == "LoRA icons - release …17TK1MG2"


def test_the_title_names_the_lora_and_a_readable_release(run_folder):
    release_id = "01M8T5S2T2CF3WAEK317TK1MG2"
    lora = {"id": "demo_icons", "name": "Demo icons",
            "releases": [{"id": "01M8SZ66031TM61WKAERQGTG0H"}, {"id": release_id}]}
    release = {"id": release_id, "status": "candidate", "createdAt": "2026-12-02T01:26:56.000Z"}
    fig = plot_loss(run_folder, lora=lora, release=release)
    assert fig._suptitle.get_text() == ("LoRA Demo icons (demo_icons) - release 2 of 2 (…17TK1MG2), candidate, "
                                        "trained 2026-12-02 01:26 UTC")
    assert release_id not in fig._suptitle.get_text()  # the raw id is not the label


def test_a_constant_learning_rate_is_labelled_with_its_value(run_folder, tmp_path):
    fig = plot_loss(run_folder)
    (loss_ax,) = fig.axes
    assert "lr 0.0001 (constant)" in [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert "learning rate" not in [ax.get_ylabel() for ax in fig.axes]
    # A schedule that changes the rate keeps its own axis, drawn step by step.
    log = LossLog(tmp_path / "warmup" / LOG_NAME)
    for step in range(1, 5):
        log.write(step, 1, 0.3, 1e-4 * step, 0.1 * step)
    log.close()
    fig = plot_loss(tmp_path / "warmup")
    (lr_ax,) = (ax for ax in fig.axes if ax.get_ylabel() == "learning rate")
    assert lines_of(lr_ax)["learning rate"][1] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4])
    assert not any("(constant)" in t.get_text() for ax in fig.axes if ax.get_legend()
                   for t in ax.get_legend().get_texts())


def test_broken_curve_points_are_left_out_and_an_unplottable_block_draws_no_axis(run_folder):
    broken = {**HELD_OUT, "baseLoss": "0.2", "curve": [{"step": 0, "loss": 0.2}, {"step": "4", "loss": 0.15}, 3,
                                                        {"step": 8, "loss": None}, {"step": 12, "loss": 0.1}]}
    fig = plot_loss(run_folder, validation=broken)
    (validation_ax,) = (ax for ax in fig.axes if ax.get_ylabel() == "validation loss")
    drawn = lines_of(validation_ax)
    assert drawn["validation loss (held-out images)"] == ([0, 12], [0.2, 0.1])
    assert "base model" not in drawn  # the base loss is unknown: no reference line rather than a wrong one
    fig = plot_loss(run_folder, validation={"set": "training", "curve": "none"})
    assert "validation loss" not in [ax.get_ylabel() for ax in fig.axes]
    assert fig._suptitle.get_text().endswith("validation loss ? → ? (?) on the ? training images")


def test_a_release_whose_log_is_elsewhere_plots_its_validation_curve_alone():
    fig = plot_loss(None, validation=HELD_OUT)
    assert [ax.get_ylabel() for ax in fig.axes] == ["validation loss"]
    with pytest.raises(TrainingError, match="no loss log given and the release has no validation curve"):
        plot_loss(None, validation={"curve": []})
