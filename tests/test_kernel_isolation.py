"""The batch kernel imports only installed code, never a module from the folders a studio shares.

``lorakit notebook run`` and ``lorakit report`` are typed in a studio's repository, whose files (and those of the
data root and the output folder) come from anyone with push rights. A ``pandas.py``, a ``lorakit/`` or an
``ipykernel_launcher.py`` there must not run inside the kernel, and relative paths typed on the command line must
still mean what they meant in the folder they were typed in.

Each test plants modules that leave a canary file when imported, runs the real command in a subprocess (papermill,
a real kernel), and checks that no canary appeared and that the command did its work.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import REPO_ROOT

import lorakit
from lorakit.loras import make_release
from lorakit.reports import PATH_PARAMETERS, list_notebooks

# Modules a kernel imports on its way up or in the notebooks' first cell, stdlib and third party, and the files
# Python's site module runs when it finds them on sys.path.
PLANTED = ("pandas", "json", "ipykernel_launcher", "sitecustomize", "usercustomize", "lorakit")
PROJECT = "demo"


def plant(folder: Path, canaries: Path) -> None:
    """Modules in ``folder`` that each create ``canaries/<module>@<folder name>`` when imported."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in PLANTED:
        code = f"open({str(canaries / f'{name}@{folder.name}')!r}, 'w').close()\n"
        if name == "lorakit":
            (folder / name).mkdir(exist_ok=True)
            (folder / name / "__init__.py").write_text(code, encoding="utf-8")
        else:
            (folder / f"{name}.py").write_text(code, encoding="utf-8")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A studio repository: the demo data in ``data/``, its config in ``config/local.json`` (found from the current
    folder, as for a studio), model roots inside it, and planted modules in it, in the data root and in
    ``reports/``."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "data", repo / "data", ignore=shutil.ignore_patterns(".lorakit"))
    (repo / "config").mkdir()
    (repo / "config" / "local.json").write_text(json.dumps({"paths": {
        "modelsRoot": "models", "checkpointsRoot": "models/checkpoints", "lorasRoot": "loras"}}), encoding="utf-8")
    canaries = tmp_path / "canaries"
    canaries.mkdir()
    for folder in (repo, repo / "data", repo / "reports"):
        plant(folder, canaries)
    return repo


def canaries_of(repo: Path) -> list[str]:
    return sorted(p.name for p in (repo.parent / "canaries").iterdir())


def lorakit_cli(repo: Path, *argv: str) -> subprocess.CompletedProcess:
    """``lorakit ARGV`` typed in ``repo``. ``-P`` keeps the repository off the command's own ``sys.path``, as for
    the installed ``lorakit`` script (whose ``sys.path`` starts with its own folder): only the kernel is under test."""
    env = {k: v for k, v in os.environ.items() if k not in ("LORAKIT_DATA_ROOT", "LORAKIT_CONFIG")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-P", "-m", "lorakit", *argv], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)


def check_ran_clean(repo: Path, done: subprocess.CompletedProcess) -> None:
    where = f"\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    assert not canaries_of(repo), f"planted modules ran: {canaries_of(repo)}{where}"
    assert "Traceback" not in done.stderr and done.returncode == 0, where


def test_notebook_run_imports_nothing_from_the_working_folders(repo: Path) -> None:
    done = lorakit_cli(repo, "notebook", "run", "01", "-p", "dataset_id", "isolated", "-p", "sample_size", "2",
                       "--out", "reports", "--data-root", "data")
    check_ran_clean(repo, done)
    assert list((repo / "reports").glob("01_build_dataset__*.html"))
    assert (repo / "data" / "projects" / PROJECT / "datasets" / "isolated.json").is_file()


def test_report_imports_nothing_from_the_working_folders(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo)
    ws = lorakit.open_workspace(repo / "data")
    lorakit.create_lora(ws, "icons", name="Icons", scope="project", project=PROJECT, checkpoint="tiny-sd15",
                        asset_types=["ui_icon"])
    lorakit.add_release(ws, "icons", make_release("r1", weights={
        "kind": "config_relative", "base": "lorasRoot", "path": "icons/r1/icons.safetensors"}, sha256="0" * 64,
        training={}), project=PROJECT)
    done = lorakit_cli(repo, "report", "--lora", "icons", "--project", PROJECT, "--out", "reports")
    check_ran_clean(repo, done)
    (html,) = (repo / "reports").glob("04_eval_report__icons__r1__*.html")
    assert "LoRA" in html.read_text(encoding="utf-8")


PROBE = '''import json, os, sys
import lorakit
from lorakit.loras import make_release
from lorakit.config import load_config

print("PROBE " + json.dumps({"cwd": os.getcwd(), "path": sys.path, "lorakit": lorakit.__file__,
                             "config": str(load_config().source), "data_root": str(load_config().data_root),
                             "contact_sheet_out": contact_sheet_out, "dataset": dataset}))
'''


def test_the_kernel_gets_absolute_paths_and_no_working_folder(repo: Path) -> None:
    """What the kernel sees: not the repository as its working folder or on ``sys.path``, the same lorakit as the
    command, the config and data root found from the repository, and relative path parameters made absolute."""
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("contact_sheet_out = None\ndataset = None", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(PROBE)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, repo / "probe.ipynb")
    (repo / "manifests").mkdir()
    done = lorakit_cli(repo, "notebook", "run", "probe.ipynb", "--out", "reports", "--no-html",
                       "-p", "contact_sheet_out", "sheets/grid.png", "-p", "dataset", "manifests/m.json")
    check_ran_clean(repo, done)
    (executed,) = (repo / "reports").glob("probe__*.ipynb")
    text = "".join(o.get("text", "") for c in nbformat.read(executed, as_version=4).cells if c.cell_type == "code"
                   for o in c.outputs)
    seen = json.loads(re.search(r"^PROBE (.*)$", text, re.M).group(1))
    real = repo.resolve()
    assert not Path(seen["cwd"]).resolve().is_relative_to(real), seen["cwd"]
    on_path = [p for p in seen["path"] if p in ("", ".") or Path(p).resolve().is_relative_to(real)
               or Path(p).resolve() == Path(seen["cwd"]).resolve()]
    assert not on_path, f"working folders on the kernel's sys.path: {on_path}"
    assert Path(seen["lorakit"]).resolve() == Path(lorakit.__file__).resolve()
    assert Path(seen["config"]) == real / "config" / "local.json"
    assert Path(seen["data_root"]) == real / "data"
    assert seen["contact_sheet_out"] == str(real / "sheets" / "grid.png")
    assert seen["dataset"] == str(real / "manifests" / "m.json")


def test_every_path_parameter_of_the_notebooks_is_made_absolute() -> None:
    """A parameter whose name or comment says it is a file or folder is in ``PATH_PARAMETERS``; the kernel
    runs in a folder of its own, so a relative one left as typed would point there."""
    words = re.compile(r"_(root|dir|path|file|folder|out)$|\b(path|paths|file|folder|directory)\b", re.I)
    missing = []
    for name in list_notebooks():
        nb = nbformat.read(REPO_ROOT / "lorakit" / "notebooks" / f"{name}.ipynb", as_version=4)
        (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        for line in cell.source.splitlines():
            code, _, comment = line.partition("#")
            targets = ast.parse(code).body if code.strip() else []
            for statement in targets:
                param = statement.targets[0].id  # type: ignore[attr-defined]
                if (words.search(param) or words.search(comment)) and param not in PATH_PARAMETERS:
                    missing.append(f"{name}: {param}")
    assert not missing, f"notebook parameters that name files but are passed to the kernel as typed: {missing}"
