"""Values from an untrusted data root that lorakit must keep exactly or refuse by name: numbers a double cannot
hold, Unicode spellings of one tag, lying training states and safetensors headers, and settings that must pass
to kohya_ss as LyCORIS reads them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_assets_curation import picture

from lorakit.assets import import_assets
from lorakit.cli import main
from lorakit.store import dump_json, loads_json
from lorakit.workspace import open_workspace


@pytest.fixture
def ws(tmp_data_root):
    return open_workspace()


def imported_asset(ws, tmp_path: Path, tags: list[str] | None = None, seed: int = 0) -> str:
    drop = tmp_path / f"drop{seed}"
    drop.mkdir()
    picture(seed).save(drop / "a.png")
    report = import_assets(ws, "game", drop, tags=tags or ["style:pixel"], status="approved")
    return report.imported[0]["asset_id"]


def plant_raw(path: Path, key: str, raw: str) -> None:
    """Add ``key`` to the JSON object in ``path`` with ``raw`` as its literal JSON text."""
    record = json.loads(path.read_text(encoding="utf-8"))
    record[key] = "@@raw@@"
    path.write_text(json.dumps(record, indent=2).replace('"@@raw@@"', raw), encoding="utf-8")


# ---- 1. numbers a double cannot hold ------------------------------------------------------------------------------
INEXACT = ["1.0000000000000001", "1e-400", "-2.50000000000000000001E+3", "0.1000000000000000055511151231257827"]


def test_assets_tag_keeps_unowned_numbers_a_double_cannot_hold(ws, tmp_path):
    asset_id = imported_asset(ws, tmp_path)
    path = ws.store.path("asset", asset_id, "game")
    raw = "{" + ", ".join(f'"n{i}": {text}' for i, text in enumerate(INEXACT)) + ', "big": 123456789012345678901234567890}'
    plant_raw(path, "x-studio", raw)
    assert main(["assets", "tag", "--project", "game", "--asset", asset_id, "--add", "pose:front"]) == 0
    text = path.read_text(encoding="utf-8")
    for number in INEXACT:
        assert number in text, f"{number} was rewritten"
    assert "123456789012345678901234567890" in text
    assert "pose:front" in ws.store.read("asset", asset_id, "game")["versions"][-1]["variants"][0]["tags"]


def test_every_read_then_write_keeps_inexact_numbers(ws, tmp_path):
    asset_id = imported_asset(ws, tmp_path)
    path = ws.store.path("asset", asset_id, "game")
    plant_raw(path, "x-ratio", "[1.0000000000000001, 0.30000000000000004, 1e-5, 1.50]")
    ws.store.update("asset", asset_id, lambda record: None, "game")
    with ws.store.claim("asset", asset_id, "game") as claimed:
        record = ws.store.read_path(claimed, "asset")
        ws.store.write_locked("asset", record, claimed)
    ws.store.write("asset", ws.store.read("asset", asset_id, "game"), "game")
    kept = json.loads(path.read_text(encoding="utf-8"), parse_float=str)["x-ratio"]
    # The same value in another spelling is fine; a changed value is not.
    assert kept[0] == "1.0000000000000001"
    assert [float(v) for v in kept[1:]] == [0.30000000000000004, 1e-5, 1.5]


def test_exact_numbers_read_as_plain_floats():
    value = loads_json(b'{"a": [0.30000000000000004, 1e-05, 1.50, 12345678901234567890123, 1.0000000000000001]}', "f")
    assert [type(v) for v in value["a"]] == [float, float, float, int, type(value["a"][4])]
    assert type(value["a"][4]) is not float and value["a"][4] == 1.0
    assert dump_json(value).split() == ["{", '"a":', "[", "0.30000000000000004,", "1e-05,", "1.5,",
                                        "12345678901234567890123,", "1.0000000000000001", "]", "}"]


# ---- 2. network settings reach kohya/LyCORIS as network_args -------------------------------------------------------
KOHYA_DRY = ["lora", "train", "--adapter", "kohya_ss", "--lora", "hero", "--dataset", "hero_v1", "--project", "demo",
             "--dry-run", "--release", "r0"]


def kohya_args_toml(out: str) -> dict:
    """The ``kohya-args.toml`` a dry run prints."""
    import tomllib

    text = out.split("kohya-args.toml:\n", 1)[1].split("\nlog: ", 1)[0]
    return tomllib.loads(text)


@pytest.fixture
def studio(tmp_path, monkeypatch):
    from test_manual_adapter import build_studio

    monkeypatch.setenv("LORAKIT_TOOLS_ROOT", str(tmp_path / "no-tools"))
    return build_studio(tmp_path, monkeypatch)


@pytest.mark.parametrize("config, network_args, top", [
    ({"network_type": "lokr", "lokr_factor": 4}, ["algo=lokr", "factor=4"], {}),
    ({"network_type": "lokr", "factor": 8}, ["algo=lokr", "factor=8"], {}),
    ({"network_type": "loha", "conv_dim": 8, "conv_alpha": 2.0}, ["algo=loha", "conv_dim=8", "conv_alpha=2.0"], {}),
    ({"network_type": "dora", "train_conv": False},
     ["algo=locon", "dora_wd=True", "wd_on_output=True", "preset=attn-mlp"], {}),
    ({"network_type": "locon", "conv_rank": 4}, ["algo=locon", "conv_dim=4"], {}),
    ({"network_dim": 8, "network_alpha": 4.0, "train_conv": True}, ["conv_dim=8", "conv_alpha=4.0"], {}),
    ({"rank": 8, "conv_rank": 2, "train_text_encoder": False}, ["conv_dim=2"],
     {"network_dim": 8, "network_train_unet_only": True}),
])
def test_kohya_gets_network_settings_as_network_args(studio, capsys, config, network_args, top):
    assert main(KOHYA_DRY + ["--config", json.dumps(config)]) == 0, capsys.readouterr().err
    args = kohya_args_toml(capsys.readouterr().out)
    assert args.get("network_args") == network_args
    lorakit_names = {"lokr_factor", "factor", "conv_dim", "conv_rank", "conv_alpha", "train_conv", "rank",
                     "train_text_encoder", "network_type"}
    assert not lorakit_names & set(args), "a lorakit setting landed where sd-scripts drops it"
    for key, value in top.items():
        assert args[key] == value


@pytest.mark.parametrize("config, message", [
    ({"network_type": "loha", "lokr_factor": 4}, "lokr_factor is for network_type lokr"),
    ({"unet_target_modules": "attention"}, "unet_target_modules is a setting of lorakit's native trainer"),
    ({"network_type": "lokr", "lokr_factor": 4, "network_args": ["factor=2"]}, "factor=2 contradict"),
    ({"network_type": "loha", "conv_dim": 4, "train_conv": False}, "train_conv is false"),
    ({"network_type": "lokr", "lokr_factor": 0}, "lokr_factor must be a positive integer"),
])
def test_kohya_refuses_network_settings_it_would_drop_or_contradict(studio, capsys, config, message):
    assert main(KOHYA_DRY + ["--config", json.dumps(config)]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err


# ---- 3. one tag, two Unicode spellings ------------------------------------------------------------------------------
NFC = "mood:caf\u00e9"          # é as one code point, as a keyboard types it
NFD = "mood:cafe\u0301"         # e + combining accent, as a macOS folder name or another tool writes it


@pytest.fixture
def spelled(ws, tmp_path):
    """Two approved assets of project ``game``: one tagged in NFD, one not."""
    return imported_asset(ws, tmp_path, tags=[NFD, "pose:front"], seed=1), imported_asset(ws, tmp_path, seed=2)


def variant_tags(ws, asset_id: str) -> list[str]:
    return ws.store.read("asset", asset_id, "game")["versions"][-1]["variants"][0]["tags"]


def test_dataset_rules_compare_tags_in_one_normal_form(ws, spelled, capsys):
    from lorakit.datasets import build_manifest

    tagged, plain = spelled
    kept = build_manifest(ws, project="game", exclude_tags=[NFC], dry_run=True).manifest["items"]
    assert [i["assetId"] for i in kept] == [plain]
    kept = build_manifest(ws, project="game", exclude_tags=["mood:caf\u00e9*"], dry_run=True).manifest["items"]
    assert [i["assetId"] for i in kept] == [plain]
    kept = build_manifest(ws, project="game", tags=[NFC], dry_run=True).manifest["items"]
    assert [i["assetId"] for i in kept] == [tagged]
    kept = build_manifest(ws, project="game", tags=[NFC, "nope"], tag_any=True, dry_run=True).manifest["items"]
    assert [i["assetId"] for i in kept] == [tagged]
    assert main(["dataset", "build", "--project", "game", "--id", "ds", "--exclude-tag", NFC]) == 0
    assert [i["assetId"] for i in ws.store.read("dataset", "ds", "game")["items"]] == [plain]


def test_tag_queries_count_two_spellings_as_one_tag(ws, spelled):
    from lorakit.assets import tag_frequencies

    tagged, _ = spelled
    ws.store.update("asset", tagged, lambda a: a["versions"][-1]["variants"][0]["tags"].append(NFC) and None, "game")
    frame = tag_frequencies(ws, "game", exclude_tags=[NFC])
    rows = frame[frame["tag"].map(lambda t: t in (NFC, NFD))]
    assert len(rows) == 1 and int(rows["count"].iloc[0]) == 1 and bool(rows["excluded"].iloc[0])


def test_assets_tag_removes_and_adds_by_normal_form(ws, spelled):
    tagged, _ = spelled
    assert main(["assets", "tag", "--project", "game", "--asset", tagged, "--add", NFC]) == 0
    assert variant_tags(ws, tagged).count(NFD) == 1 and NFC not in variant_tags(ws, tagged)
    assert main(["assets", "tag", "--project", "game", "--asset", tagged, "--remove", NFC]) == 0
    assert NFD not in variant_tags(ws, tagged) and "pose:front" in variant_tags(ws, tagged)


def test_required_tags_and_catalog_tokens_match_either_spelling(ws, spelled):
    from lorakit.catalog import load_catalogs
    from lorakit.store import now_iso
    from lorakit.widgets.steps import add_required_tag

    assert add_required_tag([], NFC, [NFD, "pose:front"]) == (NFD,)
    assert add_required_tag([NFD], NFC, [NFD]) == (NFD,)
    now = now_iso()
    ws.store.write_catalog("tags", {"id": "tags", "projectId": "game", "createdAt": now, "updatedAt": now, "groups": [
        {"id": "mood", "label": "Mood", "tags": [{"id": NFD, "label": "cafe", "promptToken": "cozy cafe"}]}]}, "game")
    assert load_catalogs(ws, "game").tag_token(NFC) == "cozy cafe"


# ---- 4. resume compares only what is asked for now ------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_ws(tmp_path_factory):
    """A workspace with the tiny checkpoints, trained on with one intra-op thread (as test_train's)."""
    import torch
    from test_train import _workspace

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield _workspace(tmp_path_factory.mktemp("train"), mp)
    torch.set_num_threads(threads)


def interrupted_run(ws, lora_id: str, config: dict, at_step: int = 3) -> Path:
    """A run of ``lora_id`` (release ``cut``) interrupted after ``at_step``, with a saved state to resume."""
    from test_train import new_lora, write_dataset

    from lorakit.train import train_lora

    new_lora(ws, lora_id)
    write_dataset(ws, f"{lora_id}_gems", n=4, seed=5)

    def interrupt(report) -> None:
        if report.step == at_step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_lora(ws, lora_id, f"{lora_id}_gems", project="demo", config=config, release_id="cut", progress=False,
                   on_step=interrupt)
    run_dir = ws.config.loras_root / lora_id / "cut"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    return run_dir


def test_resume_may_change_resume_safe_settings_and_blames_only_what_was_asked(train_ws, capsys):
    from test_train import FAST

    import lorakit

    # The run's own settings differ from every preset and default (rank, lr, resolution, ...).
    interrupted_run(train_ws, "rsm", {**FAST, "steps": 4, "save_state_every": 2, "validation_every": 2})
    resume = ["lora", "train", "--lora", "rsm", "--project", "demo", "--resume", "cut", "--no-progress"]
    assert main(resume + ["--config", json.dumps({"validation_every": 3, "lr": 0.5})]) == 1
    err = capsys.readouterr().err
    assert "error: cannot resume cut with different settings (lr)" in err
    # Asking for the run's own value is no change; a resume-safe setting takes effect.
    assert main(resume + ["--config", json.dumps({"validation_every": 4, "sample_steps": 3}), "--rank", "4"]) == 0, \
        capsys.readouterr().err
    (release,) = lorakit.get_lora(train_ws, "rsm", project="demo")["releases"]
    config = release["training"]["config"]
    assert config["validation_every"] == 4 and config["sample_steps"] == 3 and config["rank"] == 4


# ---- 5. a saved training state is checked when it loads -------------------------------------------------------------
def _first_tensor(models: list) -> str:
    return sorted(models[0])[0]


def _nan_loss(state):
    state["validation"]["scores"]["curve"][0]["loss"] = float("nan")


def _inf_best_loss(state):
    state["validation"]["scores"]["bestLoss"] = float("inf")


def _best_step_elsewhere(state):
    state["validation"]["scores"]["bestStep"] = 99


def _negative_step(state):
    state["step"] = -1


def _step_past_the_run(state):
    state["step"] = 10**6


def _float_step(state):
    state["step"] = 2.5


def _nan_weight(state):
    state["models"][0][_first_tensor(state["models"])][0] = float("nan")


def _wrong_shape(state):
    import torch

    state["models"][0][_first_tensor(state["models"])] = torch.zeros(1)  # broadcast silently into any shape


def _nan_optimizer_moment(state):
    moments = next(iter(state["optimizer"]["state"].values()))
    moments["exp_avg"].fill_(float("nan"))


@pytest.mark.parametrize("plant", [_nan_loss, _inf_best_loss, _best_step_elsewhere, _negative_step,
                                   _step_past_the_run, _float_step, _nan_weight, _wrong_shape, _nan_optimizer_moment])
def test_a_damaged_training_state_is_refused_when_it_loads(train_ws, capsys, plant):
    import torch
    from test_train import FAST

    import lorakit

    lora_id = f"st{plant.__name__.replace('_', '')[:20].lower()}"
    run_dir = interrupted_run(train_ws, lora_id, {**FAST, "steps": 6, "save_state_every": 2, "validation_every": 1})
    state_path = run_dir / "state" / "state.pt"
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    assert state["validation"]["scores"]["curve"], "the run saved no validation scores to damage"
    plant(state)
    torch.save(state, state_path)
    code = main(["lora", "train", "--lora", lora_id, "--project", "demo", "--resume", "cut", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"error: saved training state {state_path}" in err or f"error: saved state {state_path}" in err, err
    assert "without --resume" in err and "Traceback" not in err
    assert lorakit.get_lora(train_ws, lora_id, project="demo")["releases"] == []


# ---- 6. a safetensors header that lies about its file ---------------------------------------------------------------
def raw_safetensors(path: Path, header: object, data: bytes = b"\0" * 8, length: int | None = None) -> Path:
    """A file in the safetensors layout written by hand: 8-byte length, ``header`` as JSON, then ``data``."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)
    return path


LIES = {
    "offsets past the end": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8000]}}, "outside the 8 bytes"),
    "shape larger than its bytes": ({"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 8]}},
                                    "but its data_offsets span 8"),
    "unknown dtype": ({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 8]}}, "unknown dtype 'F128'"),
    "metadata not str to str": ({"__metadata__": {"ss_network_dim": 16},
                                 "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "__metadata__"),
    "negative dimension": ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "non-negative integers"),
    "overlapping tensors": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "overlap or leave a gap"),
    "data left over": ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "file holds 8 bytes of data"),
    "header length past the file": (None, "larger than the file"),
    "not JSON": (b"{NaN}", "not JSON"),
}


def lying_file(path: Path, lie: str) -> Path:
    header, _ = LIES[lie]
    if header is None:
        return raw_safetensors(path, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, length=10**6)
    return raw_safetensors(path, header)


@pytest.mark.parametrize("lie", sorted(LIES))
def test_checkpoint_add_refuses_a_lying_safetensors_header(ws, capsys, lie):
    path = lying_file(ws.config.checkpoints_root / "liar.safetensors", lie)
    assert main(["checkpoint", "add", "liar", "--family", "sd15", "--path", "liar.safetensors"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint 'liar': ") and str(path) in err and LIES[lie][1] in err, err
    assert "Traceback" not in err and not ws.store.exists("checkpoint", "liar")


@pytest.mark.parametrize("lie", sorted(LIES))
def test_the_manual_adapter_refuses_a_lying_safetensors_header(studio, capsys, lie):
    path = lying_file(studio.loras_root / "hero" / "ext" / "hero.safetensors", lie)
    code = main(["lora", "train", "--adapter", "manual", "--lora", "hero", "--dataset", "hero_v1", "--project", "demo",
                 "--weights-kind", "absolute", "--weights-path", str(path)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and str(path) in err and LIES[lie][1] in err, err
    assert studio.lora()["releases"] == []


def test_the_lora_loader_refuses_a_lying_file_before_reading_tensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    from lorakit.errors import ConfigError
    from lorakit.hashing import read_safetensors_header
    from lorakit.models.loading import lora_file_network

    good = tmp_path / "good.safetensors"
    save_file({"lora_unet_a.hada_w1_a": torch.zeros(2, 3), "lora_unet_a.alpha": torch.tensor(1.0),
               "empty": torch.zeros(0, 4, dtype=torch.bfloat16)}, str(good), metadata={"ss_network_dim": "2"})
    assert set(read_safetensors_header(good)) == {"__metadata__", "lora_unet_a.hada_w1_a", "lora_unet_a.alpha", "empty"}
    assert lora_file_network(good) == "loha"
    with pytest.raises(ConfigError, match="LoRA weights: .*liar.safetensors.*unknown dtype"):
        lora_file_network(lying_file(tmp_path / "liar.safetensors", "unknown dtype"))
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)  # opened plainly, it would block the reader for ever
    with pytest.raises(ConfigError, match="not a regular file"):
        lora_file_network(fifo)
