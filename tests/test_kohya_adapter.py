"""The kohya_ss adapter against a stand-in for sd-scripts (``tests/fixtures/kohya_standin``).

The stand-in is made a real Git repository (tags ``v1`` and ``v2``, a branch ``broken`` whose requirements
cannot install) and installed through a ``file://`` URL: real clone, real venv, real ``pip install -r
requirements.txt`` (its ``-e .`` builds offline with an in-tree backend), real training subprocesses that
record the arguments they got and write a real kohya-format LoRA file. One install is shared by the module;
the test that changes its ref runs last.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_manual_adapter import CAPTIONS, Studio, build_studio

from lorakit.cli import main
from lorakit.errors import ConfigError, DatasetError
from lorakit.train.kohya import (
    MARKER_NAME,
    KohyaInstall,
    KohyaSetupError,
    adapter_arg_value,
    dump_toml,
    kohya_command,
    parse_adapter_args,
    plan_kohya_run,
    read_install,
    setup_kohya,
    train_kohya,
)
from lorakit.train.manual import read_safetensors_metadata

STANDIN = Path(__file__).parent / "fixtures" / "kohya_standin"
GIT = ["git", "-c", "user.name=lorakit tests", "-c", "user.email=tests@lorakit.invalid", "-c", "commit.gpgsign=false"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def standin_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in as a Git repository: ``v1``, ``v2`` (one more commit) and ``broken`` (bad requirements)."""
    repo = tmp_path_factory.mktemp("standin") / "sd-scripts"
    shutil.copytree(STANDIN, repo, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "stand-in for sd-scripts")
    git(repo, "tag", "v1")
    git(repo, "checkout", "-q", "-b", "broken")
    (repo / "requirements.txt").write_text("-e .\n./no-such-package-dir\n", encoding="utf-8")
    git(repo, "commit", "-q", "-am", "requirements that cannot install")
    git(repo, "checkout", "-q", "main")
    (repo / "CHANGES.md").write_text("v2: a second release\n", encoding="utf-8")
    git(repo, "add", "CHANGES.md")
    git(repo, "commit", "-q", "-m", "v2")
    git(repo, "tag", "v2")
    return repo


@pytest.fixture(scope="module")
def offline() -> Iterator[pytest.MonkeyPatch]:
    # pip must never reach an index here: the stand-in needs nothing from one.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIP_NO_INDEX", "1")
        mp.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield mp


@pytest.fixture(scope="module")
def installed(standin_repo: Path, offline, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, str]:
    """One real setup of the stand-in at ``v1``: (tools root, its SetupResult, the setup output)."""
    root = tmp_path_factory.mktemp("tools")
    out = io.StringIO()
    result = setup_kohya(f"file://{standin_repo}", "v1", root=root, torch_packages=(), echo=out)
    return root, result, out.getvalue()


@pytest.fixture
def studio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, installed) -> Studio:
    monkeypatch.setenv("LORAKIT_TOOLS_ROOT", str(installed[0]))
    return build_studio(tmp_path, monkeypatch)


KOHYA = ["lora", "train", "--adapter", "kohya_ss", "--lora", "hero", "--dataset", "hero_v1", "--project", "demo"]


def received(run_dir: Path) -> dict:
    return json.loads((run_dir / "standin-received.json").read_text(encoding="utf-8"))


# ---- setup ----------------------------------------------------------------------------------------------
def test_setup_installs_a_pinned_clone_with_its_own_venv(installed, standin_repo: Path) -> None:
    root, result, output = installed
    install = result.install
    assert result.changed
    assert install.commit == git(standin_repo, "rev-parse", "v1^{commit}")
    assert install.ref == "v1" and install.repo == f"file://{standin_repo}"
    assert install.slot.parent == root / "kohya_ss"
    assert git(install.repo_dir, "rev-parse", "HEAD") == install.commit
    marker = json.loads((root / "kohya_ss" / MARKER_NAME).read_text(encoding="utf-8"))
    assert marker["commit"] == install.commit and marker["slot"] == install.slot.name
    assert marker["python"] == str(install.python) and marker["packages"] == []
    # A real venv (its own prefix), where `-e .` installed the scripts' package and the `accelerate` command.
    probe = subprocess.run([str(install.python), "-c", "import sys, library.standin; "
                            "print(sys.prefix != sys.base_prefix, library.standin.__file__)"],
                           cwd=root, capture_output=True, text=True, check=True).stdout.split()
    assert probe[0] == "True" and Path(probe[1]).is_relative_to(install.repo_dir)
    assert install.accelerate.is_file()
    assert "==> install requirements" in output and result.log.is_file()
    assert "Successfully installed kohya-standin" in result.log.read_text(encoding="utf-8")


def test_a_second_setup_changes_nothing(installed, standin_repo: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    root, first, _ = installed
    marker = root / "kohya_ss" / MARKER_NAME
    before = marker.stat().st_mtime_ns
    # What a setup killed half-way leaves: a slot no marker names. It never counts, and the next setup removes it.
    (root / "kohya_ss" / "slot-killed" / "venv").mkdir(parents=True)
    monkeypatch.setenv("LORAKIT_TOOLS_ROOT", str(root))
    assert main(["lora", "setup", "--repo", f"file://{standin_repo}", "--ref", "v1", "--torch", ""]) == 0
    assert "already installed" in capsys.readouterr().out
    again = setup_kohya(f"file://{standin_repo}", "v1", root=root, torch_packages=(), echo=io.StringIO())
    assert not again.changed and again.install == first.install
    assert marker.stat().st_mtime_ns == before
    assert sorted(p.name for p in (root / "kohya_ss").iterdir() if p.name.startswith("slot-")) == [first.install.slot.name]


def test_failed_setups_name_the_step_and_leave_nothing_that_looks_installed(standin_repo: Path, offline,
                                                                           tmp_path: Path) -> None:
    root = tmp_path / "tools"
    with pytest.raises(KohyaSetupError, match=r"step 1/4 \(clone\).*nothing was installed; log: "):
        setup_kohya(f"file://{tmp_path}/no-such-repo", "v1", root=root, torch_packages=(), echo=io.StringIO())
    with pytest.raises(KohyaSetupError, match=r"step 2/4 \(check out\): ref 'v9' is not a tag, branch or commit"):
        setup_kohya(f"file://{standin_repo}", "v9", root=root, torch_packages=(), echo=io.StringIO())
    home = root / "kohya_ss"
    assert read_install(root) is None and not (home / MARKER_NAME).exists()
    assert not [p for p in home.iterdir() if p.name.startswith("slot-")]
    assert len(list((home / "logs").glob("setup-*.log"))) == 2


def test_a_failed_update_keeps_the_previous_install(installed, standin_repo: Path) -> None:
    root, first, _ = installed
    marker_before = (root / "kohya_ss" / MARKER_NAME).read_text(encoding="utf-8")
    with pytest.raises(KohyaSetupError) as failure:
        setup_kohya(f"file://{standin_repo}", "broken", root=root, torch_packages=(), echo=io.StringIO())
    message = str(failure.value)
    assert "step 4/4 (install requirements)" in message
    assert "the previous install (v1," in message and "is still in place" in message
    log = Path(message.rsplit("log: ", 1)[1])
    assert "no-such-package-dir" in log.read_text(encoding="utf-8")
    assert (root / "kohya_ss" / MARKER_NAME).read_text(encoding="utf-8") == marker_before
    assert read_install(root) == first.install
    assert [p.name for p in (root / "kohya_ss").iterdir() if p.name.startswith("slot-")] == [first.install.slot.name]


def test_lora_train_needs_an_install(studio: Studio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("LORAKIT_TOOLS_ROOT", str(tmp_path / "empty-tools"))
    assert main(KOHYA + ["--run"]) == 1
    err = capsys.readouterr().err
    assert "not installed" in err and "run `lorakit lora setup`" in err
    # A dry run still shows the plan, with placeholders for the paths of the missing install.
    assert main(KOHYA + ["--dry-run"]) == 0
    assert "not installed yet" in capsys.readouterr().out


# ---- the run ---------------------------------------------------------------------------------------------
def test_dry_run_shows_the_command_the_tomls_and_the_dataset_folder(studio: Studio, installed,
                                                                   capsys: pytest.CaptureFixture) -> None:
    install = installed[1].install
    assert main(KOHYA + ["--dry-run", "--release", "r0", "--rank", "8",
                         "--adapter-args", '["--output_name", "my_lora"]']) == 0
    out = capsys.readouterr().out
    run_dir = studio.loras_root / "hero" / "r0"
    command = f"{install.python} {install.repo_dir / 'train_network.py'} --config_file {run_dir / 'kohya-args.toml'} " \
              "--output_name my_lora"
    assert command in out
    assert f"dataset folder: {run_dir / 'dataset' / '10_hero_v1'}" in out
    assert 'caption_extension = ".txt"' in out and "network_dim = 8" in out
    assert f"pretrained_model_name_or_path = \"{studio.ws.config.checkpoints_root / 'ckpt15'}\"" in out
    assert not run_dir.exists()
    assert studio.lora()["releases"] == []


def test_kohya_run_trains_and_records_the_release(studio: Studio, installed, tmp_path: Path,
                                                  capfd: pytest.CaptureFixture) -> None:
    install = installed[1].install
    kohya_toml = tmp_path / "kohya.toml"
    kohya_toml.write_text('[training]\noutput_name = "from_config"\nlearning_rate = 0.0005\nseed = 7\n'
                          '[network]\nnetwork_alpha = 4.0\n[lorakit]\nnum_repeats = 3\n', encoding="utf-8")
    code = main(KOHYA + ["--run", "--release", "r1", "--set-active", "--config-file", str(kohya_toml), "--rank", "8",
                         "--adapter-args", '["--output_name", "my_lora"]'])
    out, err = capfd.readouterr()
    assert code == 0, err
    run_dir = studio.loras_root / "hero" / "r1"
    assert "steps: 3/3" in out  # the script's output, streamed live ...
    assert "steps: 3/3" in (run_dir / "train.log").read_text(encoding="utf-8")  # ... and logged

    got = received(run_dir)
    assert got["script"] == "train_network.py" and not got["sdxl"]
    assert got["launcher"] == {"launcher": "python"}
    assert Path(got["prefix"]) == install.venv and Path(got["cwd"]) == install.repo_dir
    assert got["argv"] == ["--config_file", str(run_dir / "kohya-args.toml"), "--output_name", "my_lora"]
    args = got["args"]
    assert args["pretrained_model_name_or_path"] == str(studio.ws.config.checkpoints_root / "ckpt15")
    assert args["output_dir"] == str(run_dir) and args["output_name"] == "my_lora"  # --adapter-args win
    assert args["network_module"] == "networks.lora" and args["network_dim"] == 8 and args["network_alpha"] == 4.0
    assert args["learning_rate"] == 0.0005 and args["seed"] == 7 and args["save_model_as"] == "safetensors"

    # The exported dataset: <repeats>_<name>/ with a .txt per captioned image, read as .txt by the script.
    image_dir = run_dir / "dataset" / "3_hero_v1"
    assert sorted(p.name for p in image_dir.iterdir()) == ["hero_0.png", "hero_0.txt", "hero_1.png", "hero_1.txt",
                                                          "hero_2.png"]
    dataset_toml = tomllib.loads((run_dir / "kohya-dataset.toml").read_text(encoding="utf-8"))
    (subset,) = dataset_toml["datasets"][0]["subsets"]
    assert subset == {"image_dir": str(image_dir), "num_repeats": 3, "class_tokens": "hero_v1",
                      "caption_extension": ".txt"}
    (seen,) = got["dataset"]["subsets"]
    assert seen["caption_extension"] == ".txt" and seen["caption_files_read"] == 2
    assert seen["captions"] == {"hero_0.png": CAPTIONS[0], "hero_1.png": CAPTIONS[1], "hero_2.png": "hero_v1"}

    # The release, from the file the script produced.
    weights = run_dir / "my_lora.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    lora = studio.lora()
    assert lora["activeReleaseId"] == "r1"
    (release,) = lora["releases"]
    assert release["status"] == "candidate" and release["evaluation"] == {"status": "pending"}
    assert release["sha256"] == sha
    assert release["weights"] == {"kind": "config_relative", "base": "lorasRoot", "path": "hero/r1/my_lora.safetensors",
                                  "sha256": sha}
    training = release["training"]
    assert training["adapter"] == {"kind": "kohya_ss", "repo": install.repo, "ref": "v1", "commit": install.commit,
                                   "script": "train_network.py", "adapterArgs": ["--output_name", "my_lora"]}
    assert training["datasetId"] == "hero_v1" and training["manifestHash"] == studio.manifest["manifestHash"]
    assert training["selection"] == studio.manifest["selection"]
    assert training["checkpointId"] == "ckpt15" and training["checkpointFamily"] == "sd15"
    assert training["config"] == tomllib.loads((run_dir / "kohya-args.toml").read_text(encoding="utf-8"))
    assert training["config"]["dataset_config"] == str(run_dir / "kohya-dataset.toml")
    assert training["weightsMetadata"] == {"rank": 8, "alpha": 4.0, "networkModule": "networks.lora",
                                           "baseModel": "ckpt15", "baseModelVersion": "sd_v1"}
    assert training["log"] == "hero/r1/train.log"
    assert read_safetensors_metadata(weights)["ss_output_name"] == "my_lora"


def test_sdxl_with_accelerate_config(studio: Studio, installed, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    install = installed[1].install
    accelerate_yaml = tmp_path / "accelerate.yaml"
    accelerate_yaml.write_text("compute_environment: LOCAL_MACHINE\nnum_processes: 1\n", encoding="utf-8")
    code = main(["lora", "train", "--adapter", "kohya_ss", "--run", "--lora", "hero_xl", "--dataset", "hero_v1",
                 "--project", "demo", "--release", "x1", "--accelerate-config", str(accelerate_yaml)])
    out, err = capfd.readouterr()
    assert code == 0, err
    run_dir = studio.loras_root / "hero_xl" / "x1"
    got = received(run_dir)
    assert got["script"] == "sdxl_train_network.py" and got["sdxl"]
    launcher = got["launcher"]
    assert launcher["launcher"] == "accelerate"
    assert launcher["argv"] == ["launch", "--config_file", str(accelerate_yaml),
                                str(install.repo_dir / "sdxl_train_network.py"),
                                "--config_file", str(run_dir / "kohya-args.toml")]
    assert launcher["config_text"].startswith("compute_environment")
    assert f"{install.accelerate} launch --config_file {accelerate_yaml}" in out
    (release,) = studio.lora("hero_xl")["releases"]
    assert release["weights"]["path"] == "hero_xl/x1/hero_xl.safetensors"
    assert release["training"]["adapter"]["accelerateConfig"] == str(accelerate_yaml)
    assert release["training"]["weightsMetadata"]["baseModelVersion"] == "sdxl_base_v1-0"


def test_a_failing_run_records_nothing_and_names_the_log(studio: Studio, capfd: pytest.CaptureFixture) -> None:
    code = main(KOHYA + ["--run", "--release", "bad", "--adapter-args", '["--standin_fail"]'])
    out, err = capfd.readouterr()
    run_dir = studio.loras_root / "hero" / "bad"
    assert code == 1
    assert f"exited with status 3; nothing was recorded; log: {run_dir / 'train.log'}" in err
    assert "simulated failure" in (run_dir / "train.log").read_text(encoding="utf-8")
    assert (run_dir / "hero-000001.safetensors").exists()  # an epoch file the failed run left is not a release
    assert studio.lora()["releases"] == []
    # The same release id again is refused while its folder exists, rather than mixing two runs.
    assert main(KOHYA + ["--run", "--release", "bad"]) == 1
    assert "already exists" in capfd.readouterr().err


def test_a_lycoris_network_type_needs_lycoris_in_kohyas_environment(studio: Studio, installed,
                                                                    capfd: pytest.CaptureFixture) -> None:
    """The stand-in's venv has no lycoris-lora: the run is refused before its folder is written."""
    code = main(KOHYA + ["--run", "--release", "loha1", "--network-type", "loha"])
    err = capfd.readouterr().err
    assert code == 1
    assert "error: network module lycoris.kohya (for the LyCORIS network types) is not installed" in err
    assert "-m pip install lycoris-lora==4.1.3" in err and "Traceback" not in err
    assert not (studio.loras_root / "hero" / "loha1").exists()
    assert studio.lora()["releases"] == []


@pytest.mark.parametrize("value, message", [
    ('{"output_name": "x"}', "must be a JSON array of strings"),
    ('["--seed", 3]', "must be a JSON array of strings"),
    ("--output_name x", "not valid JSON"),
])
def test_adapter_args_must_be_a_json_array_of_strings(studio: Studio, capsys: pytest.CaptureFixture, value, message) -> None:
    assert main(KOHYA + ["--run", "--adapter-args", value]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("config, message", [
    ({"dataset_config": "/x.toml"}, "dataset_config is set by lorakit"),
    ({"save_model_as": "ckpt"}, "save_model_as must be safetensors"),
    ({"caption_extension": ".caption"}, "caption_extension must be '.txt'"),
    ({"sdxl": "yes"}, "sdxl must be true or false"),
    ({"output_dir": "out"}, "output_dir must be an absolute path"),
])
def test_configs_lorakit_cannot_honour_are_refused(studio: Studio, config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train_kohya(studio.ws, "hero", "hero_v1", project="demo", config=config, dry_run=True)


def test_dataset_for_another_checkpoint_and_a_base_model_of_ones_own(studio: Studio) -> None:
    studio.ws.store.update("dataset", "hero_v1", lambda m: {**m, "selection": {**m["selection"], "checkpoints": ["ckptxl"]}},
                           project="demo")
    with pytest.raises(DatasetError, match="was built for checkpoint"):
        train_kohya(studio.ws, "hero", "hero_v1", project="demo", dry_run=True)
    shutil.rmtree(studio.ws.config.checkpoints_root / "ckpt15")  # not needed when the config names the base model
    result = train_kohya(studio.ws, "hero", "hero_v1", project="demo", force=True, dry_run=True,
                         config={"pretrained_model_name_or_path": "org/some-model"})
    assert result.plan.args["pretrained_model_name_or_path"] == "org/some-model"


def test_kohya_needs_run_or_dry_run_and_a_dataset_id(studio: Studio, capsys: pytest.CaptureFixture) -> None:
    assert main(KOHYA) == 1
    assert "trains only with --run" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs a dataset id"):
        train_kohya(studio.ws, "hero", "some/manifest.json", project="demo", dry_run=True)
    with pytest.raises(ConfigError, match="kohya's mixed_precision is one of no, fp16, bf16"):
        train_kohya(studio.ws, "hero", "hero_v1", project="demo", config={"mixed_precision": "fp16"},
                    overrides={"mixed_precision": "auto"}, dry_run=True)


# ---- the pure parts --------------------------------------------------------------------------------------
def test_command_lines_with_and_without_accelerate(tmp_path: Path) -> None:
    install = KohyaInstall(home=tmp_path, slot=tmp_path / "slot-a", repo="r", ref="v1", commit="c")
    plan = plan_kohya_run({"sdxl": True, "network_dim": 4}, ["--max_train_steps", "10"], family="sd15",
                          model_path=tmp_path / "model", run_dir=tmp_path / "run", lora_id="hero", dataset_name="d")
    bin_dir = "Scripts" if os.name == "nt" else "bin"
    assert plan.script == "sdxl_train_network.py" and "sdxl" not in plan.args
    assert kohya_command(plan, install) == [
        str(tmp_path / "slot-a" / "venv" / bin_dir / ("python.exe" if os.name == "nt" else "python")),
        str(tmp_path / "slot-a" / "sd-scripts" / "sdxl_train_network.py"),
        "--config_file", str(tmp_path / "run" / "kohya-args.toml"), "--max_train_steps", "10"]
    accelerated = kohya_command(plan, install, tmp_path / "acc.yaml")
    assert accelerated[1:4] == ["launch", "--config_file", str(tmp_path / "acc.yaml")]
    assert accelerated[4:] == kohya_command(plan, install)[1:]
    assert plan.args["output_dir"] == str(tmp_path / "run") and plan.args["output_name"] == "hero"


def test_toml_and_adapter_arg_helpers() -> None:
    text = dump_toml({"a": 'say "hi"\n', "n": [1, 2.5, True], "t": {"x": 1}, "arr": [{"y": "z"}]}, "head")
    assert text.startswith("# head\n")
    assert tomllib.loads(text) == {"a": 'say "hi"\n', "n": [1, 2.5, True], "t": {"x": 1}, "arr": [{"y": "z"}]}
    with pytest.raises(ConfigError):
        dump_toml({"bad": float("nan")})
    assert parse_adapter_args(None) == [] and parse_adapter_args(["--a"]) == ["--a"]
    assert adapter_arg_value(["--output_name"], "output_name") is None


# ---- last: a ref change replaces the shared install --------------------------------------------------------
def test_a_new_ref_installs_beside_and_replaces_the_old_one(installed, standin_repo: Path) -> None:
    root, first, _ = installed
    result = setup_kohya(f"file://{standin_repo}", "v2", root=root, torch_packages=(), echo=io.StringIO())
    assert result.changed and result.replaced == first.install
    assert result.install.commit == git(standin_repo, "rev-parse", "v2^{commit}") != first.install.commit
    assert result.install.slot != first.install.slot and not first.install.slot.exists()
    assert read_install(root) == result.install
    assert (result.install.repo_dir / "CHANGES.md").is_file()
