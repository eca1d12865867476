"""lorakit installs on any machine: registry-only pins, a wheel that carries its data files, and paths resolved
from where the user stands, not from where lorakit is installed."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from packaging.requirements import InvalidRequirement, Requirement

# name==version and nothing else: no URL, no local path, no editable, no index or find-links option.
PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?==[0-9][A-Za-z0-9.+!_-]*$")


def direct_references(lines: list[str], where: str) -> list[str]:
    """Every line of a pin list that is not ``name==version`` from the package registry, with its line number."""
    problems = []
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line and not PIN.match(line):
            problems.append(f"{where}:{number}: {raw.strip()}")
    return problems


def requirement_problems(specs: list[str], where: str) -> list[str]:
    """Every dependency range that names a URL or a path instead of a registry version range."""
    problems = []
    for spec in specs:
        try:
            req = Requirement(spec)
        except InvalidRequirement:
            problems.append(f"{where}: {spec!r} is not a requirement")
            continue
        if req.url or re.search(r"(file:|://|^[./~])", spec):
            problems.append(f"{where}: {spec!r} is a direct reference")
    return problems


def test_the_checker_catches_a_direct_reference() -> None:
    lines = ["torch==2.13.0", "orjson @ file:///tmp/oj/orjson-3.13.0-cp311-cp311-manylinux_2_17_x86_64.whl",
             "-e ./vendor/thing", "pkg @ https://example.org/pkg-1.0.tar.gz", "./local-wheel.whl",
             "--find-links /tmp/wheels", "numpy>=1.26", "# a comment", ""]
    assert direct_references(lines, "c.txt") == [
        "c.txt:2: " + lines[1], "c.txt:3: -e ./vendor/thing", "c.txt:4: " + lines[3], "c.txt:5: ./local-wheel.whl",
        "c.txt:6: --find-links /tmp/wheels", "c.txt:7: numpy>=1.26"]
    assert requirement_problems(["orjson @ file:///tmp/oj/x.whl", "x @ https://e.org/x.whl", "ok>=1"], "p") == [
        "p: 'orjson @ file:///tmp/oj/x.whl' is a direct reference", "p: 'x @ https://e.org/x.whl' is a direct reference"]


def test_every_pin_is_a_registry_version() -> None:
    lines = (REPO_ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
    assert direct_references(lines, "constraints.txt") == []
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = list(project["dependencies"]) + [s for group in project["optional-dependencies"].values() for s in group]
    assert requirement_problems(specs, "pyproject.toml") == []
    build = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]["requires"]
    assert requirement_problems(build, "pyproject.toml [build-system]") == []


def test_every_dependency_is_pinned_and_within_its_range() -> None:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name.split("[")[0])] = version
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} has a range in pyproject.toml but no pin in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {spec!r}"


def package_data_files() -> list[str]:
    """Every file of the package that Git tracks and that is not Python code, as a path inside the wheel."""
    tracked = subprocess.run(["git", "ls-files", "lorakit"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    return sorted(name for name in tracked if not name.endswith(".py"))


def test_the_checkout_schemas_and_notebooks_are_the_packaged_ones() -> None:
    for top, packaged, pattern in (("schemas", "lorakit/schemas", "*.schema.json"),
                                   ("notebooks", "lorakit/notebooks", "*.ipynb")):
        shown = sorted(p.name for p in (REPO_ROOT / top).glob(pattern))
        shipped = sorted(p.name for p in (REPO_ROOT / packaged).glob(pattern))
        assert shown and shown == shipped, f"{top}/ and {packaged}/ list different files"
        for name in shown:
            assert (REPO_ROOT / top / name).read_bytes() == (REPO_ROOT / packaged / name).read_bytes(), name


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """lorakit built as a wheel and installed (without dependencies, which this environment has) into a scratch
    folder outside the checkout: ``(wheel, site)``.

    The wheel is built from a copy of the files Git tracks, as a fresh clone has them: the checkout's own
    ``*.egg-info`` and ``build/`` (left by an editable install) would otherwise slip files into the wheel that
    ``[tool.setuptools.package-data]`` does not name."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (REPO_ROOT / name).is_file() and not (REPO_ROOT / name).is_symlink():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out / "dist"),
         str(source)], capture_output=True, text=True, cwd=out)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (out / "dist").glob("lorakit-*.whl")
    site = out / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, cwd=out)
    assert install.returncode == 0, install.stderr[-3000:]
    return wheel, site


def test_the_wheel_holds_every_data_file(installed_wheel: tuple[Path, Path]) -> None:
    wheel, site = installed_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = package_data_files()
    assert {"lorakit/schemas/asset.schema.json", "lorakit/notebooks/04_eval_report.ipynb",
            "lorakit/train/presets/tiny-demo.json", "lorakit/models/configs/sdxl/unet/config.json",
            "lorakit/models/data/bpe_simple_vocab_16e6.txt.gz"} <= set(expected)
    missing = [name for name in expected if name not in names]
    assert missing == [], f"the wheel lacks {missing}: add them to [tool.setuptools.package-data]"
    assert all((site / name).is_file() for name in expected)


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m lorakit ARGS`` importing lorakit from ``site`` only, started in ``cwd``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAKIT_")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONSAFEPATH="1")
    return subprocess.run([sys.executable, "-m", "lorakit", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_the_installed_wheel_works_from_a_studio_folder(installed_wheel: tuple[Path, Path], tmp_path: Path) -> None:
    _, site = installed_wheel
    studio = tmp_path / "studio"
    shutil.copytree(REPO_ROOT / "data", studio / "assets" / "data", ignore=shutil.ignore_patterns(".lorakit"))
    (studio / "config").mkdir()
    (studio / "config" / "local.json").write_text('{"paths": {"modelsRoot": "weights"}}\n', encoding="utf-8")
    work = studio / "assets"
    before = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "data").rglob("*"))

    where = subprocess.run([sys.executable, "-c", "import lorakit, lorakit.config as c; print(lorakit.__file__); "
                            "print(c.CHECKOUT_ROOT)"], cwd=work, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"})
    assert where.stdout.split() == [str(site / "lorakit" / "__init__.py"), "None"], where.stderr

    validate = run_installed(site, work, "validate", "--data-root", "data")
    assert validate.returncode == 0, validate.stderr
    assert f"all records valid under {work / 'data'}" in validate.stdout

    dry = run_installed(site, work, "dataset", "build", "--data-root", "./data", "--project", "demo",
                        "--asset-type", "ui_icon", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would write {work / 'data' / 'projects' / 'demo' / 'datasets'}" in dry.stdout, dry.stdout
    assert not (work / "data" / "projects" / "demo" / "datasets").exists()

    presets = run_installed(site, work, "lora", "presets")
    assert presets.returncode == 0 and "tiny-demo" in presets.stdout, presets.stderr
    notebooks = run_installed(site, work, "notebook", "list")
    assert notebooks.returncode == 0 and "04_eval_report" in notebooks.stdout, notebooks.stderr

    # The model configs and the tokenizer vocabulary ship too: build and verify a tiny checkpoint. Its weights go
    # under modelsRoot from ./config/local.json of the folder above, relative to that folder (studio/weights).
    tiny = run_installed(site, studio, "checkpoint", "make-tiny", "t", "--family", "sd15", "--data-root", "assets/data")
    assert tiny.returncode == 0, tiny.stderr
    assert (studio / "weights" / "checkpoints").is_dir()
    verify = run_installed(site, studio, "checkpoint", "verify", "t", "--data-root", "assets/data")
    assert verify.returncode == 0, verify.stderr

    missing = run_installed(site, work, "validate", "--data-root", "does-not-exist")
    assert missing.returncode == 1 and missing.stderr.startswith("error: data root "), missing.stderr
    assert sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "data").rglob("*")) == before


# Commands that never read a data root (listing what ships in the package, installing kohya's scripts), and
# ``init``, which makes one.
NO_DATA_ROOT = {("lora", "presets"), ("notebook", "list"), ("lora", "setup"), ("init",)}


def leaf_commands() -> list[tuple[list[str], argparse.ArgumentParser]]:
    """Every ``lorakit`` sub-command as (words, its parser), from the CLI's own parser."""
    from lorakit.cli import build_parser

    def walk(parser: argparse.ArgumentParser, words: list[str]):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield words, parser
            return
        for name, child in subs[0].choices.items():
            yield from walk(child, [*words, name])

    return list(walk(build_parser(), []))


def minimal_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """Values for a parser's required arguments: the first choice, else a word."""
    argv: list[str] = []
    for action in parser._actions:
        value = str(action.choices[0] if action.choices else "x") if action.choices else "x"
        if not action.option_strings:
            argv += [value] * (action.nargs if isinstance(action.nargs, int) else 1)
        elif action.required:
            argv += [action.option_strings[0], value]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            argv.append(group._group_actions[0].option_strings[0])
    return argv


def test_every_command_refuses_a_missing_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    from lorakit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORAKIT_CONFIG", raising=False)
    (tmp_path / "empty").mkdir()
    checked = []
    for words, parser in leaf_commands():
        if tuple(words) in NO_DATA_ROOT:
            continue
        assert any("--data-root" in a.option_strings for a in parser._actions), f"lorakit {' '.join(words)}"
        for root, problem in (("does-not-exist", "does not exist"), ("empty", "holds neither shared/ nor projects/")):
            code = main([*words, *minimal_arguments(parser), "--data-root", root])
            err = capsys.readouterr().err
            assert code == 1, f"lorakit {' '.join(words)} --data-root {root}: exit {code}\n{err}"
            assert err.startswith(f"error: data root {tmp_path / root} {problem} (from the --data-root argument)"), err
        checked.append(" ".join(words))
    assert len(checked) >= 28 and "validate" in checked
    assert main(["init", "--data-root", "does-not-exist"]) == 0
    assert (tmp_path / "does-not-exist" / "shared").is_dir()


def test_cli_paths_are_relative_to_the_current_folder(tmp_path: Path) -> None:
    """The checkout's lorakit, started in a studio folder outside it: every typed path lands there."""
    work = tmp_path / "studio"
    shutil.copytree(REPO_ROOT / "data", work / "data", ignore=shutil.ignore_patterns(".lorakit"))
    (work / "config").mkdir()
    (work / "config" / "local.json").write_text('{"paths": {"modelsRoot": "weights"}}\n', encoding="utf-8")
    (work / "art").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 30)).save(work / "art" / "hero.png")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAKIT_")}

    def lorakit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lorakit", *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)

    built = lorakit("dataset", "build", "--data-root", "data", "--project", "demo", "--asset-type", "ui_icon",
                    "--id", "rel")
    assert built.returncode == 0, built.stderr
    assert (work / "data" / "projects" / "demo" / "datasets" / "rel.json").is_file()
    exported = lorakit("dataset", "export", "rel", "--project", "demo", "--out", "exported", "--data-root", "data")
    assert exported.returncode == 0, exported.stderr
    assert sorted(p.suffix for p in (work / "exported").rglob("*.*")) .count(".txt") == 10
    imported = lorakit("assets", "import", "--project", "game", "--dir", "art", "--data-root", "data")
    assert imported.returncode == 0, imported.stderr
    assert list((work / "data" / "files" / "game").rglob("hero*.png"))
    created = lorakit("lora", "create", "--lora", "x", "--name", "X", "--scope", "project", "--project", "demo",
                      "--checkpoint", "tiny-sd15", "--asset-types", "ui_icon", "--data-root", "data")
    assert created.returncode == 0, created.stderr
    settings = lorakit("lora", "train", "--lora", "x", "--dataset", "rel", "--project", "demo", "--dry-run",
                       "--config-file", "missing.json", "--data-root", "data")
    assert settings.returncode == 1 and str(work / "missing.json") in settings.stderr, settings.stderr
    shown = lorakit("validate")  # ./config/local.json and ./data of the current folder, no flag needed
    assert shown.returncode == 0 and f"all records valid under {work / 'data'}" in shown.stdout, shown.stderr
