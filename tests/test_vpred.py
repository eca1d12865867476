"""SDXL v-prediction checkpoints (the NoobAI-XL v-pred kind) trained and rendered right, on the tiny SDXL.

A checkpoint record saying ``prediction: v, zeroTerminalSnr: true`` on the tiny SDXL weights (whose shipped
scheduler is epsilon's, so every override below comes from the record): the training target is the velocity
on betas rescaled to zero terminal SNR, the LoRA file and the release say so, the eval grid renders with a
v-prediction, zero-SNR, trailing scheduler and a guidance rescale, and the kohya_ss adapter passes kohya's
flags. Epsilon checkpoints keep what they had (``test_golden_runs.py`` pins their weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_train import write_dataset

import lorakit
from lorakit.errors import EvalError
from lorakit.families import Objective, get
from lorakit.models import make_tiny_checkpoint
from lorakit.models.registry import checkpoint_objective, get_checkpoint, register_checkpoint
from lorakit.store import now_iso

V_ZTSNR = {"prediction": "v", "zeroTerminalSnr": True}
CONFIG = {"resolution": 64, "rank": 4, "alpha": 2, "lr": 1e-3, "batch_size": 2, "lr_scheduler": "constant",
          "steps": 2, "seed": 7, "validation": False, "min_snr_gamma": 5.0}


def vpred_workspace(root: Path, mp: pytest.MonkeyPatch):
    """A data root with project ``demo`` and dataset ``gems``, its models under ``root/models``; no checkpoint yet."""
    config = root / "local.json"
    models = root / "models"
    config.write_text(json.dumps({"paths": {"modelsRoot": str(models), "checkpointsRoot": str(models / "ck"),
                                            "lorasRoot": str(models / "loras")}}))
    mp.setenv("LORAKIT_DATA_ROOT", str(root / "data"))
    mp.setenv("LORAKIT_CONFIG", str(config))
    mp.setenv("HF_HUB_OFFLINE", "1")
    ws = lorakit.init_data_root()
    now = now_iso()
    ws.store.write("project", {"id": "demo", "name": "Demo", "createdAt": now, "updatedAt": now})
    write_dataset(ws, "gems", n=4, seed=3)
    return ws


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        ws = vpred_workspace(tmp_path_factory.mktemp("vpred"), mp)
        make_tiny_checkpoint(ws, "tiny_xl", "sdxl", asset_types=["icon"])
        make_tiny_checkpoint(ws, "tiny_xl_v", "sdxl", asset_types=["icon"])
        register_checkpoint(ws, "tiny_xl_v", V_ZTSNR)
        yield ws


@pytest.fixture(scope="module")
def trained(ws):
    """One short run on each checkpoint: ``{checkpoint id: TrainResult}``."""
    results = {}
    for checkpoint in ("tiny_xl", "tiny_xl_v"):
        lora = f"gem_{checkpoint}"
        lorakit.create_lora(ws, lora, name=lora, scope="project", project="demo", checkpoint=checkpoint,
                            asset_types=["icon"])
        results[checkpoint] = lorakit.train_lora(ws, lora, "gems", project="demo", config=CONFIG, release_id="r1",
                                                 progress=False)
    return results


# ---- the objective of a checkpoint -----------------------------------------------------------------------------
def test_the_record_and_a_vpred_folder_give_the_objective(ws, tmp_path: Path) -> None:
    from lorakit.models.tiny import build_tiny_pipeline

    assert checkpoint_objective(ws, get_checkpoint(ws, "tiny_xl_v")) == Objective("v", zero_terminal_snr=True)
    assert checkpoint_objective(ws, get_checkpoint(ws, "tiny_xl")) == Objective()
    folder = ws.config.checkpoints_root / "noob_like"
    build_tiny_pipeline("sdxl", 0, prediction="v", zero_terminal_snr=True).save_pretrained(folder, safe_serialization=True)
    lorakit.add_checkpoint(ws, "noob_like", "sdxl", folder)
    assert checkpoint_objective(ws, get_checkpoint(ws, "noob_like")) == Objective("v", zero_terminal_snr=True)


# ---- training ------------------------------------------------------------------------------------------------
def test_loss_step_is_the_velocity_mse_on_zero_snr_betas_with_the_v_form_of_min_snr() -> None:
    import torch
    import torch.nn.functional as F

    from lorakit.models.tiny import build_tiny_pipeline
    from lorakit.train.recipe import loss_step

    pipe = build_tiny_pipeline("sdxl", 0)   # an epsilon scheduler config: the objective alone makes it v and zero-SNR
    objective = Objective("v", zero_terminal_snr=True)
    scheduler = objective.noise_scheduler(pipe.scheduler.config)
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
    assert scheduler.alphas_cumprod[-1] == 0   # the last timestep is pure noise
    unet = pipe.unet.eval()
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    text = {"encoder_hidden_states": torch.randn((2, 77, 64), generator=torch.Generator().manual_seed(2)),
            "text_embeds": torch.randn((2, 32), generator=torch.Generator().manual_seed(3))}
    conditioning = get("sdxl").denoiser_kwargs(text, [[64, 64, 0, 0, 64, 64]] * 2, torch.float32, "cpu")

    def by_hand(seed: int, gamma: float | None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (2,), generator=generator)
        a = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        pred = unet(a * latents + s * noise, t, **conditioning).sample
        loss = F.mse_loss(pred, a * noise - s * latents, reduction="none").mean(dim=(1, 2, 3))
        if gamma:
            snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
            loss = loss * torch.clamp(snr, max=gamma) / (snr + 1)
        return loss.mean()

    with torch.no_grad():
        for seed, gamma in ((0, None), (5, 5.0)):
            got = loss_step(unet, objective, scheduler, latents, conditioning, torch.Generator().manual_seed(seed),
                            min_snr_gamma=gamma)
            assert torch.allclose(got, by_hand(seed, gamma), rtol=1e-5, atol=1e-6)
        # At the zero-SNR step the v form of min-SNR weighs 0 / 1, where the epsilon form would divide by zero.
        last = torch.tensor([999])
        assert objective.min_snr_weight(scheduler, last, 5.0).item() == 0.0
        assert torch.isfinite(objective.min_snr_weight(scheduler, last, 5.0)).all()


@pytest.mark.slow
def test_a_vpred_run_says_so_in_its_file_and_release(trained) -> None:
    from lorakit.train.kohya_format import read_lora_file

    v, eps = trained["tiny_xl_v"], trained["tiny_xl"]
    meta = read_lora_file(v.weights_path)[1]
    assert (meta["modelspec.prediction_type"], meta["ss_v_parameterization"], meta["ss_zero_terminal_snr"]) == \
        ("v", "True", "True")
    assert v.release["training"]["objective"] == V_ZTSNR
    assert v.plan["objective"] == V_ZTSNR
    meta = read_lora_file(eps.weights_path)[1]
    assert (meta["modelspec.prediction_type"], meta["ss_v_parameterization"], meta["ss_zero_terminal_snr"]) == \
        ("epsilon", "False", "False")
    assert eps.release["training"]["objective"] == {"prediction": "epsilon", "zeroTerminalSnr": False}


# ---- eval grids and the worker ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_eval_grid_renders_with_a_vpred_zero_snr_trailing_scheduler_and_a_guidance_rescale(ws, trained) -> None:

    from lorakit.worker import PipelineCache, job_objective, render_cell, use_scheduler

    plan = lorakit.create_eval_grid(ws, "demo", "gem_tiny_xl_v", "r1", prompts=["a red gem"], seeds=[1],
                                    strengths=[1.0], steps=2, cfg=5.0, width=64, height=64, eval_id="ev_v")
    assert plan.eval["grid"]["objective"] == V_ZTSNR and plan.eval["grid"]["guidanceRescale"] == 0.7
    settings = plan.jobs[0]["input"]["settings"]
    assert settings["objective"] == V_ZTSNR and settings["guidanceRescale"] == 0.7
    assert settings["scheduler"] == "EulerDiscreteScheduler"

    cache = PipelineCache(ws, device="cpu", dtype="float32")
    warm = cache.get("tiny_xl_v")
    use_scheduler(warm, settings["scheduler"], job_objective(settings))
    config = warm.pipe.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == \
        ("v_prediction", True, "trailing")
    assert warm.default_scheduler.config.prediction_type == "epsilon"   # the shipped one is left as it was

    job = plan.jobs[0]
    image, _ = render_cell(cache, job)
    unscaled = {**job, "input": {**job["input"], "settings": {**settings, "guidanceRescale": 0.0}}}
    assert not np.array_equal(np.asarray(image), np.asarray(render_cell(cache, unscaled)[0]))

    other = lorakit.create_eval_grid(ws, "demo", "gem_tiny_xl_v", "r1", prompts=["a red gem"], seeds=[1],
                                     strengths=[1.0], guidance_rescale=0.5, dry_run=True)
    assert other.jobs[0]["input"]["settings"]["guidanceRescale"] == 0.5


@pytest.mark.slow
def test_an_epsilon_grid_renders_as_before(ws, trained) -> None:
    from lorakit.evals import grid_params
    from lorakit.worker import PipelineCache, a1111_parameters, job_objective, use_scheduler

    plan = lorakit.create_eval_grid(ws, "demo", "gem_tiny_xl", "r1", prompts=["a red gem"], seeds=[1],
                                    strengths=[1.0], dry_run=True)
    settings = plan.jobs[0]["input"]["settings"]
    assert settings["objective"] == {"prediction": "epsilon", "zeroTerminalSnr": False}
    assert "guidanceRescale" not in settings and "Guidance rescale" not in a1111_parameters(settings)
    params = grid_params({}, "sdxl", {})   # a checkpoint without defaultGenerationParams: the family's size
    assert (params["width"], params["height"]) == get("sdxl").eval_size
    warm = PipelineCache(ws, device="cpu", dtype="float32").get("tiny_xl")
    use_scheduler(warm, settings["scheduler"], job_objective(settings))
    assert warm.pipe.scheduler is warm.default_scheduler
    with pytest.raises(EvalError, match="guidance rescale is for zero-terminal-SNR checkpoints"):
        lorakit.create_eval_grid(ws, "demo", "gem_tiny_xl", "r1", prompts=["a"], guidance_rescale=0.5, dry_run=True)


def test_png_parameters_name_the_objective_and_the_rescale() -> None:
    from lorakit.worker import a1111_parameters

    text = a1111_parameters({"positivePrompt": "a gem", "steps": 2, "cfg": 5.0, "seed": 1, "width": 64,
                             "height": 64, "objective": V_ZTSNR, "guidanceRescale": 0.7})
    assert "Prediction: v, Zero terminal SNR: True" in text and "Guidance rescale: 0.7" in text


def test_a_job_with_a_damaged_objective_is_an_eval_error() -> None:
    from lorakit.worker import job_guidance_rescale, job_objective

    with pytest.raises(EvalError, match="settings.objective"):
        job_objective({"objective": {"prediction": "x0"}})
    with pytest.raises(EvalError, match="guidanceRescale"):
        job_guidance_rescale({"guidanceRescale": 3})


def test_the_picker_renders_with_the_objectives_scheduler(ws) -> None:
    from lorakit.models.tiny import build_tiny_pipeline
    from lorakit.select import render_setup

    pipe = build_tiny_pipeline("sdxl", 0)
    assert render_setup(ws, "tiny_xl_v", pipe, guidance_rescale=0.6) == {"guidance_rescale": 0.6}
    assert (pipe.scheduler.config.prediction_type, pipe.scheduler.config.timestep_spacing) == \
        ("v_prediction", "trailing")
    plain = build_tiny_pipeline("sdxl", 0)
    shipped = plain.scheduler
    assert render_setup(ws, "tiny_xl", plain) == {} and plain.scheduler is shipped


# ---- kohya_ss ------------------------------------------------------------------------------------------------
def test_the_kohya_adapter_passes_the_v_flags(ws, tmp_path: Path) -> None:
    from lorakit.train.kohya import dump_toml, plan_kohya_run, train_kohya

    def plan(objective: Objective, adapter_args: list[str] | None = None):
        return plan_kohya_run({}, adapter_args or [], family="sdxl", objective=objective, model_path=tmp_path / "m",
                              run_dir=tmp_path / "run", lora_id="hero", dataset_name="d")

    v = plan(Objective("v", zero_terminal_snr=True))
    assert v.script == "sdxl_train_network.py"
    assert (v.args["v_parameterization"], v.args["zero_terminal_snr"]) == (True, True)
    toml = dump_toml(v.args)
    assert "v_parameterization = true" in toml and "zero_terminal_snr = true" in toml
    only_v = plan(Objective("v"))
    assert only_v.args["v_parameterization"] is True and "zero_terminal_snr" not in only_v.args
    eps = plan(Objective())
    assert "v_parameterization" not in eps.args and "zero_terminal_snr" not in eps.args
    given = plan(Objective("v", zero_terminal_snr=True), ["--v_parameterization"])
    assert "v_parameterization" not in given.args and given.args["zero_terminal_snr"] is True

    lorakit.create_lora(ws, "kohya_v", name="kohya_v", scope="project", project="demo", checkpoint="tiny_xl_v",
                        asset_types=["icon"])
    dry = train_kohya(ws, "kohya_v", "gems", project="demo", release_id="k1", dry_run=True)
    assert (dry.plan.args["v_parameterization"], dry.plan.args["zero_terminal_snr"]) == (True, True)
