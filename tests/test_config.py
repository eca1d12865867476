"""Local config, data-root overrides and weights-reference resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.config import REPO_ROOT, Config, load_config, resolve_weights
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
    monkeypatch.setattr("lorakit.config.REPO_ROOT", tmp_path)  # a repo without config/local.json
    cfg = load_config()
    assert cfg.data_root == (tmp_path / "data").resolve()
    assert cfg.loras_root == tmp_path / "models" / "loras"
    assert cfg.checkpoints_root == tmp_path / "models" / "checkpoints"


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
    assert cfg.loras_root == REPO_ROOT / "relative" / "loras"  # relative to the repository root


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
