"""Local config, data-root overrides and weights-reference resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.config import Config, load_config, resolve_weights
from lorakit.errors import ConfigError


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "local.json"
    monkeypatch.setenv("LORAKIT_CONFIG", str(path))
    monkeypatch.delenv("LORAKIT_DATA_ROOT", raising=False)
    return path


def test_defaults_without_a_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAKIT_CONFIG", raising=False)
    monkeypatch.delenv("LORAKIT_DATA_ROOT", raising=False)
    monkeypatch.setattr("lorakit.config.CHECKOUT_ROOT", None)  # an installed lorakit: no checkout to fall back on
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg.source is None
    assert cfg.data_root == (tmp_path / "data").resolve()
    assert cfg.loras_root == tmp_path.resolve() / "models" / "loras"
    assert cfg.checkpoints_root == tmp_path.resolve() / "models" / "checkpoints"


def test_the_checkout_demo_data_is_the_last_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAKIT_CONFIG", raising=False)
    monkeypatch.delenv("LORAKIT_DATA_ROOT", raising=False)
    checkout = tmp_path / "checkout"
    (checkout / "data" / "shared").mkdir(parents=True)
    monkeypatch.setattr("lorakit.config.CHECKOUT_ROOT", checkout)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config().data_root == checkout / "data"
    (elsewhere / "data").mkdir()  # a data folder where the user stands wins over the demo data
    assert load_config().data_root == elsewhere / "data"


def test_config_file_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAKIT_CONFIG", raising=False)
    monkeypatch.delenv("LORAKIT_DATA_ROOT", raising=False)
    checkout, here = tmp_path / "checkout", tmp_path / "studio"
    for folder, name in ((checkout, "demo"), (here, "assets")):
        (folder / "config").mkdir(parents=True)
        (folder / "config" / "local.json").write_text(json.dumps({"dataRoot": name}))
    monkeypatch.setattr("lorakit.config.CHECKOUT_ROOT", checkout)
    monkeypatch.chdir(here)
    assert load_config().source == here / "config" / "local.json"
    assert load_config().data_root == here / "assets"  # relative to the folder the config file configures
    (here / "config" / "local.json").unlink()
    assert load_config().source == checkout / "config" / "local.json"
    assert load_config().data_root == checkout / "demo"
    other = tmp_path / "lk.json"
    other.write_text(json.dumps({"dataRoot": "d", "paths": {"lorasRoot": "w/loras"}}))
    monkeypatch.setenv("LORAKIT_CONFIG", "../lk.json")  # relative to the current folder
    cfg = load_config()
    assert cfg.source == other
    assert cfg.data_root == tmp_path / "d"  # relative to the file's own folder
    assert cfg.loras_root == tmp_path / "w" / "loras"


def test_paths_the_user_types_are_relative_to_the_current_folder(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAKIT_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_config("data").data_root == tmp_path / "data"
    monkeypatch.setenv("LORAKIT_DATA_ROOT", "from-env")
    assert load_config().data_root == tmp_path / "from-env"
    assert load_config().models_root == tmp_path / "models"  # beside the data root


def test_precedence_flag_over_env_over_file(config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file.write_text(json.dumps({"dataRoot": str(tmp_path / "from-file"),
                                       "paths": {"modelsRoot": str(tmp_path / "m"), "lorasRoot": "relative/loras"}}))
    assert load_config().data_root == tmp_path / "from-file"
    monkeypatch.setenv("LORAKIT_DATA_ROOT", str(tmp_path / "from-env"))
    assert load_config().data_root == tmp_path / "from-env"
    assert load_config(tmp_path / "from-flag").data_root == tmp_path / "from-flag"
    cfg = load_config()
    assert cfg.models_root == tmp_path / "m"
    assert cfg.checkpoints_root == tmp_path / "m" / "checkpoints"
    assert cfg.loras_root == tmp_path / "relative" / "loras"  # relative to the config file's folder


def test_a_missing_or_empty_data_root_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.workspace import init_data_root, open_workspace

    monkeypatch.delenv("LORAKIT_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"data root .*nope does not exist \(from the --data-root argument\); "
                                          r"pass --data-root"):
        open_workspace("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds neither shared/ nor projects/"):
        open_workspace("empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a folder"):
        open_workspace("file")
    ws = init_data_root("empty")
    assert (tmp_path / "empty" / "shared").is_dir() and (tmp_path / "empty" / "projects").is_dir()
    assert open_workspace("empty").data_root == ws.data_root


def test_bad_config_files_are_named(config_file: Path) -> None:
    config_file.write_text("{oops")
    with pytest.raises(ConfigError, match=r"local\.json: not valid JSON \(line 1"):
        load_config()
    config_file.write_text(json.dumps({"paths": {"lorasRoot": 5}}))
    with pytest.raises(ConfigError, match=r"local\.json: at \$\.paths\.lorasRoot: 5 is not of type 'string'"):
        load_config()
    config_file.unlink()
    with pytest.raises(ConfigError, match="LORAKIT_CONFIG"):
        load_config()


def test_resolve_each_weights_kind(tmp_path: Path) -> None:
    loras = tmp_path / "loras"
    (loras / "hero").mkdir(parents=True)
    (loras / "hero" / "w.safetensors").write_bytes(b"x")
    cfg = Config(data_root=tmp_path / "data", roots={"lorasRoot": loras, "modelsRoot": tmp_path / "models"},
                 repo_root=tmp_path)
    assert resolve_weights({"kind": "config_relative", "base": "lorasRoot", "path": "hero/w.safetensors"}, cfg) \
        == loras / "hero" / "w.safetensors"
    assert resolve_weights({"kind": "absolute", "path": str(loras / "hero/w.safetensors")}, cfg).exists()
    assert resolve_weights({"kind": "repo_relative", "path": "loras/hero/w.safetensors"}, cfg).exists()


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ({"kind": "config_relative", "base": "lorasRoot", "path": "missing.safetensors"},
         r"lora hero: weights file not found: .*missing\.safetensors \(under lorasRoot = "),
        ({"kind": "config_relative", "base": "modelsRoot", "path": "x"}, r"modelsRoot folder .* does not exist"),
        ({"kind": "config_relative", "path": "x"}, r"need 'base' set to one of modelsRoot, checkpointsRoot, lorasRoot"),
        ({"kind": "config_relative", "base": "checkpointsRoot", "path": "x"}, r"checkpointsRoot is not set"),
        ({"kind": "external", "uri": "https://example.org/w.safetensors"}, r"weights are external"),
        ({"kind": "absolute", "path": "rel/path"}, r"needs an absolute path"),
        ({"kind": "ftp", "path": "x"}, r"unknown weights kind 'ftp'"),
    ],
)
def test_resolution_errors_name_the_root_or_file(tmp_path: Path, ref: dict, message: str) -> None:
    (tmp_path / "loras").mkdir()
    cfg = Config(data_root=tmp_path, roots={"lorasRoot": tmp_path / "loras", "modelsRoot": tmp_path / "nope"})
    with pytest.raises(ConfigError, match=message):
        resolve_weights(ref, cfg, what="lora hero")
