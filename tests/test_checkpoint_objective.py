"""What a checkpoint's denoiser predicts (epsilon, v, v with zero terminal SNR) and which family it is, as
``lorakit checkpoint add`` records them: told by flags, else read from the files (a single file's ``v_pred`` /
``ztsnr`` keys, a folder's scheduler config and ``model_index.json`` class, a single file's tensor names).
Real tiny checkpoints, real files, the real command line in this process."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_checkpoints import ws as ws  # noqa: F401  (a workspace on an empty data root, its own config)

from lorakit.cli import main
from lorakit.errors import ConfigError, LorakitError
from lorakit.families import get
from lorakit.hashing import check_safetensors
from lorakit.models import (
    add_checkpoint,
    build_tiny_pipeline,
    export_single_file,
    get_checkpoint,
    load_pipeline,
    make_tiny_checkpoint,
)
from lorakit.models.registry import detect_family, detect_objective


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def list_rows(capsys) -> dict[str, list[str]]:
    code, out, _ = run(capsys, "checkpoint", "list")
    assert code == 0
    return {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}


def list_json(capsys) -> dict[str, dict]:
    code, out, _ = run(capsys, "checkpoint", "list", "--json")
    assert code == 0
    return {entry["id"]: entry for entry in json.loads(out)}


# ---- the objective: flags, single-file keys, a folder's scheduler config --------------------------------------
def test_flags_set_the_objective_and_files_that_say_nothing_mean_epsilon(ws, capsys):
    build_tiny_pipeline("sdxl", 0).save_pretrained(ws.config.checkpoints_root / "xl")

    assert run(capsys, "checkpoint", "add", "plain", "--path", "xl")[0] == 0
    record = get_checkpoint(ws, "plain")
    assert record["family"] == "sdxl" and record["prediction"] == "epsilon" and "zeroTerminalSnr" not in record

    code, out, err = run(capsys, "checkpoint", "add", "told", "--path", "xl", "--prediction", "v",
                         "--zero-terminal-snr")
    assert code == 0, err
    assert "v+ztsnr" in out
    record = get_checkpoint(ws, "told")
    assert record["prediction"] == "v" and record["zeroTerminalSnr"] is True

    # Added again without flags: the same files keep what the user told, though their scheduler says epsilon.
    add_checkpoint(ws, "told", None, "xl", name="renamed")
    record = get_checkpoint(ws, "told")
    assert record["prediction"] == "v" and record["zeroTerminalSnr"] is True and record["name"] == "renamed"
    # A flag changes it, and no zero terminal SNR removes the field.
    add_checkpoint(ws, "told", "sdxl", "xl", zero_terminal_snr=False)
    record = get_checkpoint(ws, "told")
    assert record["prediction"] == "v" and "zeroTerminalSnr" not in record

    assert list_rows(capsys)["plain"][2] == "epsilon" and list_rows(capsys)["told"][2] == "v"
    assert list_json(capsys)["told"]["objective"] == "v"


def test_zero_terminal_snr_with_epsilon_is_refused(ws, capsys):
    build_tiny_pipeline("sdxl", 0).save_pretrained(ws.config.checkpoints_root / "xl")
    for argv in (["--prediction", "epsilon", "--zero-terminal-snr"], ["--zero-terminal-snr"]):
        code, _, err = run(capsys, "checkpoint", "add", "bad", "--path", "xl", *argv)
        assert code == 1 and "Traceback" not in err
        assert err.startswith("error: checkpoint 'bad': zero terminal SNR needs v-prediction"), err
        assert "--prediction v" in err
    assert not ws.store.exists("checkpoint", "bad")
    with pytest.raises(ConfigError, match="zero terminal SNR needs v-prediction"):
        make_tiny_checkpoint(ws, "bad", "sdxl", zero_terminal_snr=True)
    code, _, err = run(capsys, "checkpoint", "make-tiny", "bad", "--family", "sdxl", "--prediction", "epsilon",
                       "--zero-terminal-snr")
    assert code == 1 and "zero terminal SNR needs v-prediction" in err
    # The tiny SD1.5 builder has SD1.5's epsilon scheduler only: a clear refusal, no half-built folder.
    code, _, err = run(capsys, "checkpoint", "make-tiny", "v15", "--family", "sd15", "--prediction", "v")
    assert code == 1 and "Traceback" not in err
    assert err.startswith("error: the tiny SD1.5 checkpoint is built for epsilon prediction only"), err
    assert not ws.store.exists("checkpoint", "bad") and not ws.store.exists("checkpoint", "v15")
    assert not (ws.config.checkpoints_root / "v15").exists()


@pytest.mark.parametrize("zero_terminal_snr", [True, False])
def test_single_file_keys_give_the_objective(ws, capsys, zero_terminal_snr):
    reference = build_tiny_pipeline("sdxl", 4)
    file = export_single_file(reference, ws.config.checkpoints_root / "noob-vpred.safetensors", prediction="v",
                              zero_terminal_snr=zero_terminal_snr)
    header = check_safetensors(file, "the test file")
    # What ComfyUI's checkpoint saver writes: empty tensors named v_pred (and ztsnr).
    assert header["v_pred"]["shape"] == [0] and ("ztsnr" in header) is zero_terminal_snr
    assert header["__metadata__"]["modelspec.predict_key"] == "v"

    code, out, err = run(capsys, "checkpoint", "add", "noob", "--path", "noob-vpred.safetensors")
    assert code == 0, err
    record = get_checkpoint(ws, "noob")
    label = "v+ztsnr" if zero_terminal_snr else "v"
    assert record["family"] == "sdxl" and record["prediction"] == "v"
    assert record.get("zeroTerminalSnr", False) is zero_terminal_snr
    assert list_rows(capsys)["noob"][1:3] == ["sdxl", label]
    assert list_json(capsys)["noob"]["objective"] == label

    # The marker keys are no weights: the file loads as the pipeline it was exported from.
    pipe = load_pipeline(ws, "noob")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected, loaded = getattr(reference, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(expected[k], loaded[k]) for k in expected if not k.endswith("position_ids")), name
    code, out, err = run(capsys, "checkpoint", "verify", "noob")
    assert code == 0, err
    assert f"objective {label}" in out
    code, out, _ = run(capsys, "checkpoint", "verify", "noob", "--json")
    report = json.loads(out)
    assert report["objective"] == label and report["prediction"] == "v"
    assert report["zeroTerminalSnr"] is zero_terminal_snr

    # The flags win over the file's keys.
    add_checkpoint(ws, "noob", None, "noob-vpred.safetensors", prediction="epsilon", zero_terminal_snr=False)
    assert get_checkpoint(ws, "noob")["prediction"] == "epsilon"


def test_a_lone_ztsnr_key_says_nothing(ws):
    file = export_single_file(build_tiny_pipeline("sdxl", 0), ws.config.checkpoints_root / "odd.safetensors")
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(file)) | {"ztsnr": torch.tensor([])}, str(file))
    assert detect_objective(file) is None  # ComfyUI reads ztsnr only beside v_pred
    assert add_checkpoint(ws, "odd", None, "odd.safetensors")["prediction"] == "epsilon"


def test_a_folder_scheduler_config_gives_the_objective_and_make_tiny_records_it(ws, capsys):
    code, out, err = run(capsys, "checkpoint", "make-tiny", "vxl", "--family", "sdxl", "--prediction", "v",
                         "--zero-terminal-snr")
    assert code == 0, err
    assert "v+ztsnr" in out
    record = get_checkpoint(ws, "vxl")
    assert record["prediction"] == "v" and record["zeroTerminalSnr"] is True
    folder = ws.config.checkpoints_root / "vxl"
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] is True
    assert scheduler["timestep_spacing"] == "trailing"
    assert json.loads((folder / "lorakit-tiny.json").read_text())["prediction"] == "v"
    v_weights = {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}

    # The same folder added under another id, without flags: its scheduler config says v + zero terminal SNR.
    assert run(capsys, "checkpoint", "add", "copy", "--path", "vxl")[0] == 0
    copy = get_checkpoint(ws, "copy")
    assert copy["family"] == "sdxl" and copy["prediction"] == "v" and copy["zeroTerminalSnr"] is True
    assert list_rows(capsys)["copy"][2] == "v+ztsnr"

    # The cached folder is another objective's: it is rebuilt, with the same weights and an epsilon scheduler.
    record = make_tiny_checkpoint(ws, "vxl", "sdxl")
    assert record["prediction"] == "epsilon" and "zeroTerminalSnr" not in record
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler.get("prediction_type", "epsilon") == "epsilon"
    assert {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))} == v_weights
    assert detect_objective(folder).prediction == "epsilon"


# ---- the family, from the files -----------------------------------------------------------------------------
def test_add_without_family_reads_it_from_the_files(ws, capsys):
    root = ws.config.checkpoints_root
    build_tiny_pipeline("sd15", 0).save_pretrained(root / "f15")
    build_tiny_pipeline("sdxl", 0).save_pretrained(root / "fxl")
    export_single_file(build_tiny_pipeline("sd15", 1), root / "s15.safetensors")
    export_single_file(build_tiny_pipeline("sdxl", 1), root / "sxl.safetensors")
    for checkpoint_id, path, family in (("f15", "f15", "sd15"), ("fxl", "fxl", "sdxl"),
                                        ("s15", "s15.safetensors", "sd15"), ("sxl", "sxl.safetensors", "sdxl")):
        code, out, err = run(capsys, "checkpoint", "add", checkpoint_id, "--path", path)
        assert code == 0, err
        assert f"({family}, epsilon)" in out
        assert get_checkpoint(ws, checkpoint_id)["family"] == family
        assert detect_family(root / path) is get(family)


@pytest.mark.parametrize("index_class", ["StableDiffusion3Pipeline", "FluxPipeline", "StableDiffusionXLImg2ImgPipeline",
                                         None])
def test_a_folder_no_family_claims_is_not_called_sd15(ws, capsys, index_class):
    folder = ws.config.checkpoints_root / "other"
    build_tiny_pipeline("sd15", 0).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = index_class
    (folder / "model_index.json").write_text(json.dumps(index))
    assert detect_family(folder) is None

    code, _, err = run(capsys, "checkpoint", "add", "other", "--path", "other")
    assert code == 1 and "Traceback" not in err
    assert err.startswith("error: checkpoint 'other': cannot tell the model family of ")
    assert str(folder) in err and "give --family sd15|sdxl" in err
    assert not ws.store.exists("checkpoint", "other")


def test_files_that_do_not_say_their_family_need_family(ws, capsys):
    root = ws.config.checkpoints_root
    torch.save({"state_dict": {}}, root / "old.ckpt")   # a pickle: its keys are not read before it is trusted
    # An SD2-style file: OpenCLIP under cond_stage_model.model., which SD1.5's CLIP marker must not match.
    from safetensors.torch import save_file

    save_file({"cond_stage_model.model.ln_final.weight": torch.zeros(4),
               "model.diffusion_model.out.2.weight": torch.zeros(4)}, str(root / "sd2.safetensors"))
    assert detect_family(root / "sd2.safetensors") is None
    for path, extra in (("old.ckpt", ["--allow-pickle"]), ("sd2.safetensors", [])):
        code, _, err = run(capsys, "checkpoint", "add", "x", "--path", path, *extra)
        assert code == 1 and f"cannot tell the model family of {root / path}: give --family sd15|sdxl" in err, err
    assert run(capsys, "checkpoint", "add", "x", "--path", "old.ckpt", "--allow-pickle", "--family", "sd15")[0] == 0


def test_a_pipeline_is_named_by_its_class_not_its_components():
    from lorakit.models.loading import pipeline_family, pipeline_module_names

    pipe = build_tiny_pipeline("sdxl", 0)
    assert pipeline_family(pipe) is get("sdxl")
    told = pipeline_module_names(pipe, family="sdxl")
    assert told == pipeline_module_names(pipe)
    assert any(name.startswith("lora_te2_") for name in told)

    class StableDiffusion3Pipeline:   # no family claims this class, whatever components it holds
        text_encoder_2 = pipe.text_encoder_2

    with pytest.raises(LorakitError, match="StableDiffusion3Pipeline is not the pipeline of any model family"):
        pipeline_family(StableDiffusion3Pipeline())


def test_a_missing_tiny_checkpoint_is_rebuilt_with_its_objective(ws):
    from lorakit.notebook_helpers import ensure_demo_checkpoint

    make_tiny_checkpoint(ws, "vxl", "sdxl", prediction="v", zero_terminal_snr=True)
    folder = ws.config.checkpoints_root / "vxl"
    shutil.rmtree(folder)   # a fresh clone: the record is shared, the weights are not
    assert "built the tiny random-weight pipeline" in ensure_demo_checkpoint(ws, "vxl")
    assert detect_objective(folder) == get("sdxl").objective("v", zero_terminal_snr=True)
    record = get_checkpoint(ws, "vxl")
    assert record["prediction"] == "v" and record["zeroTerminalSnr"] is True
