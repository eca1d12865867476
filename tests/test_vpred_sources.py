"""A v-prediction SDXL checkpoint is trained, recorded and rendered as one, whichever way lorakit learned it is one.

Three sources, each the real way a user meets it, on the tiny SDXL weights:
- ``flags``: an epsilon diffusers folder registered with ``checkpoint add --prediction v --zero-terminal-snr``;
- ``single-file keys``: one ``.safetensors`` file carrying the ``v_pred`` and ``ztsnr`` keys, registered with no
  flags at all (not even ``--family``);
- ``scheduler config``: a diffusers folder whose scheduler config says ``v_prediction`` with zero-SNR betas,
  registered with no flags.

For each: what ``checkpoint add`` recorded, the training schedule (its terminal ``alphas_cumprod`` is 0) and the
file and release a run writes, the eval grid's jobs and the worker's scheduler, and the kohya_ss adapter's flags.
"""

from __future__ import annotations

import pytest
from test_vpred import CONFIG, V_ZTSNR, vpred_workspace

import lorakit
from lorakit.cli import main
from lorakit.families import Objective
from lorakit.models.registry import checkpoint_objective, get_checkpoint
from lorakit.models.single_file import export_single_file
from lorakit.models.tiny import build_tiny_pipeline

SOURCES = ("flags", "single-file keys", "scheduler config")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        ws = vpred_workspace(tmp_path_factory.mktemp("vpred-sources"), mp)
        ck = ws.config.checkpoints_root
        build_tiny_pipeline("sdxl", 0).save_pretrained(ck / "plain", safe_serialization=True)
        export_single_file(build_tiny_pipeline("sdxl", 0), ck / "noob-vpred.safetensors", prediction="v",
                           zero_terminal_snr=True)
        v_folder = build_tiny_pipeline("sdxl", 0, prediction="v", zero_terminal_snr=True)
        v_folder.save_pretrained(ck / "vfolder", safe_serialization=True)
        adds = {"flags": ["vp_flags", "--path", "plain", "--family", "sdxl", "--prediction", "v",
                          "--zero-terminal-snr"],
                "single-file keys": ["vp_file", "--path", "noob-vpred.safetensors"],
                "scheduler config": ["vp_folder", "--path", "vfolder"]}
        for argv in adds.values():
            assert main(["checkpoint", "add", *argv, "--asset-types", "icon"]) == 0
        yield ws


CHECKPOINT = {"flags": "vp_flags", "single-file keys": "vp_file", "scheduler config": "vp_folder"}


@pytest.mark.parametrize("source", SOURCES)
def test_checkpoint_add_records_the_objective(ws, source: str, capsys) -> None:
    record = get_checkpoint(ws, CHECKPOINT[source])
    assert (record["family"], record["prediction"], record["zeroTerminalSnr"]) == ("sdxl", "v", True)
    assert checkpoint_objective(ws, record) == Objective("v", zero_terminal_snr=True)
    capsys.readouterr()
    assert main(["checkpoint", "list"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(CHECKPOINT[source] + " "))
    assert "v+ztsnr" in line


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
def test_a_run_trains_records_and_renders_with_the_v_objective(ws, source: str) -> None:
    from lorakit.models import load_pipeline
    from lorakit.train.kohya import train_kohya
    from lorakit.train.kohya_format import read_lora_file
    from lorakit.worker import PipelineCache, job_objective, use_scheduler

    checkpoint = CHECKPOINT[source]
    record = get_checkpoint(ws, checkpoint)
    # The schedule the trainer builds for it: v-prediction on betas rescaled to zero terminal SNR.
    scheduler = checkpoint_objective(ws, record).noise_scheduler(load_pipeline(ws, record).scheduler.config)
    assert scheduler.config.prediction_type == "v_prediction" and float(scheduler.alphas_cumprod[-1]) == 0.0

    lora = f"gem_{checkpoint}"
    lorakit.create_lora(ws, lora, name=lora, scope="project", project="demo", checkpoint=checkpoint,
                        asset_types=["icon"])
    result = lorakit.train_lora(ws, lora, "gems", project="demo", config=CONFIG, release_id="r1", progress=False)
    meta = read_lora_file(result.weights_path)[1]
    assert (meta["modelspec.prediction_type"], meta["ss_v_parameterization"], meta["ss_zero_terminal_snr"]) == \
        ("v", "True", "True")
    assert result.release["training"]["objective"] == V_ZTSNR

    plan = lorakit.create_eval_grid(ws, "demo", lora, "r1", prompts=["a red gem"], seeds=[1], strengths=[1.0],
                                    steps=2, width=64, height=64, eval_id=f"ev_{checkpoint}")
    settings = plan.jobs[0]["input"]["settings"]
    assert settings["objective"] == V_ZTSNR and settings["guidanceRescale"] == 0.7
    warm = PipelineCache(ws, device="cpu", dtype="float32").get(checkpoint)
    use_scheduler(warm, settings["scheduler"], job_objective(settings))
    config = warm.pipe.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == \
        ("v_prediction", True, "trailing")

    dry = train_kohya(ws, lora, "gems", project="demo", release_id="k1", dry_run=True)
    assert (dry.plan.args["v_parameterization"], dry.plan.args["zero_terminal_snr"]) == (True, True)
