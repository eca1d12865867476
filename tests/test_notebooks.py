"""The notebooks, executed headless with papermill on a temporary copy of the demo data and the tiny checkpoint.

The chain runs once (01 build dataset -> 02 train -> 03 eval grid + review -> 04 report) with small parameters,
through ``lorakit.reports.run_notebook`` (what ``lorakit notebook run`` calls); the tests then check what each
notebook produced: records written and valid, images on disk, the executed notebooks free of errors, and the
standalone HTML holding the images inline (the report's holds the eval grid). The eval grid's contact sheet is
also saved to ``test-artifacts/eval-grid.png`` for the README.
"""

from __future__ import annotations

import base64
import html as html_module
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import copy_demo_data
from PIL import Image

import lorakit
from lorakit.cli import main
from lorakit.loras import release_validation, validation_summary
from lorakit.reports import NotebookError, export_html, find_notebook, report_stem, run_notebook
from lorakit.workspace import open_workspace

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
PROJECT, LORA, DATASET, RELEASE = "demo", "nb_icons", "nb_icons", "r1"
DATA_URI = re.compile(r'data:image/png;base64,([A-Za-z0-9+/=]+)')


def html_images(path: Path) -> list[Image.Image]:
    """Every PNG embedded in an HTML file, decoded."""
    text = path.read_text(encoding="utf-8")
    return [Image.open(io.BytesIO(base64.b64decode(m))) for m in DATA_URI.findall(text)]


def errors_in(notebook: Path) -> list[str]:
    nb = nbformat.read(notebook, as_version=4)
    return [f"{o.get('ename')}: {o.get('evalue')}" for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


def outputs_of(notebook: Path, source_part: str) -> list[dict]:
    nb = nbformat.read(notebook, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" and source_part in c.source for o in c.outputs]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A temporary copy of the demo data, a config with model roots under the temp folder, the env set."""
    root = tmp_path_factory.mktemp("notebooks")
    models = root / "models"
    data, config = copy_demo_data(root, models)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"LORAKIT_DATA_ROOT": str(data), "LORAKIT_CONFIG": str(config), "HF_HUB_OFFLINE": "1",
                           "TRANSFORMERS_OFFLINE": "1", "LORAKIT_USER": "tester"}.items():
            mp.setenv(key, value)
        yield {"root": root, "data": data, "config": config, "reports": root / "reports"}


@pytest.fixture(scope="module")
def chain(demo):
    """01 -> 02 -> 03 -> 04 with small parameters, as batch runs; returns the runs by notebook."""
    ARTIFACTS.mkdir(exist_ok=True)
    common = {"project": PROJECT}
    plan = [
        ("01_build_dataset", {"dataset_id": DATASET, "asset_types": ["ui_icon"], "caption": "tags+spec",
                              "with_tokens": True, "sample_size": 4}),
        ("02_train_lora", {"lora": LORA, "lora_name": "Notebook icons", "checkpoint": "tiny-sd15",
                           "asset_types": ["ui_icon"], "dataset": DATASET, "release": RELEASE,
                           "config": {"steps": 4}, "sample_steps": 2}),
        ("03_eval_grid", {"lora": LORA, "release": RELEASE, "prompts": ["ui icon of a shield", "ui icon of a gear"],
                          "seeds": [1], "strengths": [1.0], "steps": 2, "review": "approve", "reviewer": "tester",
                          "notes": "batch approval in the notebook test", "activate": True, "recommend": True,
                          "contact_sheet_out": str(ARTIFACTS / "eval-grid.png")}),
        ("04_eval_report", {"lora": LORA, "release": RELEASE}),
    ]
    runs = {}
    for name, params in plan:
        runs[name] = run_notebook(name, {**common, **params}, out_dir=demo["reports"], data_root=demo["data"],
                                  config=demo["config"], timeout=600)
    return runs


# ---- the notebooks as files ----------------------------------------------------------------------------------------
def test_notebooks_are_generated_clean_with_one_parameters_cell():
    check = subprocess.run([sys.executable, str(REPO / "scripts" / "make_notebooks.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    names = sorted(p.stem for p in (REPO / "notebooks").glob("*.ipynb"))
    assert names == ["00_wizard", "01_build_dataset", "02_train_lora", "03_eval_grid", "04_eval_report"]
    for name in names:
        nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        assert "data_root = None" in tagged[0].source
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
        assert nb.metadata.kernelspec.name == "python3"


def test_names_and_parameters():
    from datetime import datetime

    from lorakit.reports import parse_parameter

    assert find_notebook("02").name == "02_train_lora.ipynb"
    with pytest.raises(lorakit.RecordNotFoundError, match="ambiguous"):
        find_notebook("0")
    with pytest.raises(lorakit.RecordNotFoundError, match="does not exist"):
        find_notebook("99_nope")
    assert report_stem("03_eval_grid", {"lora": "a/b", "release": None}, datetime(2026, 5, 6, 7, 8, 9)) \
        == "03_eval_grid__a_b__20260506T070809Z"
    assert [parse_parameter(v) for v in ("4", "1.5", "false", "None", '{"steps": 4}', "tags+spec")] \
        == [4, 1.5, False, None, {"steps": 4}, "tags+spec"]


def test_batch_kernel_is_this_interpreter(tmp_path, monkeypatch):
    # A "python3" kernel spec installed --user for another interpreter must not be picked up (outside a venv, or
    # with JUPYTER_PREFER_ENV_PATH=0, plain papermill would start it and fail).
    user_spec = tmp_path / "jupyter-data" / "kernels" / "python3"
    user_spec.mkdir(parents=True)
    (user_spec / "kernel.json").write_text(json.dumps({"argv": ["/nonexistent/python3", "-m", "ipykernel_launcher",
                                                                 "-f", "{connection_file}"],
                                                        "display_name": "other", "language": "python"}))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter-data"))
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "0")
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.environ.get('LORAKIT_BATCH'))")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "which.ipynb"
    nbformat.write(nb, path)
    run = run_notebook(path, out_dir=tmp_path / "out", html=False)
    text = "".join(o.get("text", "") for o in outputs_of(run.executed, "sys.executable"))
    assert text.split() == [sys.executable, "1"]


# ---- what the chain produced -----------------------------------------------------------------------------------------
def test_01_build_dataset(chain, demo):
    run = chain["01_build_dataset"]
    assert run.ok and not errors_in(run.executed)
    ws = open_workspace(demo["data"])
    manifest = lorakit.load_manifest(ws, DATASET, PROJECT)  # read back validated
    assert manifest["selection"]["assetTypes"] == ["ui_icon"] and manifest["selection"]["caption"] == "tags+spec"
    assert manifest["items"] and all(ws.store.file_path(i["path"]).is_file() for i in manifest["items"])
    shown = "".join(str(o.get("data", {}).get("text/html", "")) for o in outputs_of(run.executed, "left_out_table"))
    assert "left out: wrong status" in shown and "selected" in shown
    images = html_images(run.html)
    assert sum(1 for im in images if im.size == (64, 64)) >= 4  # the sample thumbnails
    assert any(im.width > 300 for im in images)  # the tag chart
    assert run.html.name.startswith("01_build_dataset__") and run.executed.suffix == ".ipynb"


def test_02_train_lora(chain, demo):
    run = chain["02_train_lora"]
    assert run.ok and not errors_in(run.executed)
    assert run.executed.name.startswith(f"02_train_lora__{LORA}__{RELEASE}__")
    ws = open_workspace(demo["data"])
    lora = lorakit.get_lora(ws, LORA, project=PROJECT)
    release = next(r for r in lora["releases"] if r["id"] == RELEASE)
    assert release["training"]["steps"] == 4 and release["training"]["datasetId"] == DATASET
    folder = ws.config.loras_root / LORA / RELEASE
    assert (folder / f"{LORA}.safetensors").is_file() and (folder / "train_log.csv").is_file()
    assert sorted(p.name for p in (folder / "samples").glob("*.png"))
    # The progress bar of a batch run is text (a widget would be blank in the HTML), in its final state.
    train_out = outputs_of(run.executed, "result = lorakit.train_lora")
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in train_out)
    assert "4/4" in "".join(o.get("text", "") for o in train_out)
    html = run.html.read_text(encoding="utf-8")
    assert "4/4" in html and "<script src=" not in html  # nothing fetched from the network
    images = html_images(run.html)
    assert any(im.width > 500 for im in images)  # the loss curve
    assert sum(1 for im in images if im.size == (64, 64)) >= 1  # the sample images
    # The trainer scored validation (on by default): the chart has the validation axis below the training loss,
    # and the drop is printed above it, as every display words it.
    validation = release_validation(release)
    assert validation is not None and len(validation["curve"]) >= 2
    chart_cell = "".join(o.get("text", "") for o in outputs_of(run.executed, "lorakit.plot_loss(result.output_dir"))
    assert chart_cell.strip() == validation_summary(validation)
    assert any(im.width > 500 and im.height > 0.8 * im.width for im in images)  # two axes, stacked


def test_03_eval_grid(chain, demo):
    run = chain["03_eval_grid"]
    assert run.ok and not errors_in(run.executed)
    ws = open_workspace(demo["data"])
    lora = lorakit.get_lora(ws, LORA, project=PROJECT)
    release = next(r for r in lora["releases"] if r["id"] == RELEASE)
    assert release["status"] == "approved" and lora["activeReleaseId"] == RELEASE and lora["recommended"] is True
    (eval_id,) = release["evaluation"]["evalIds"]
    record = ws.store.read("eval", eval_id, PROJECT)
    assert record["status"] == "complete" and len(record["outputs"]) == 4  # 2 prompts x 1 seed x (base + 1.0)
    assert all(ws.store.file_path(img).is_file() for o in record["outputs"] for img in o["images"])
    assert release["evaluation"]["reviews"][-1]["reviewer"] == "tester"
    assert record["validation"]["drop"] == release["training"]["validation"]["drop"]  # the drop beside the grid
    shown = "".join(o.get("text", "") for o in outputs_of(run.executed, "show_eval_grid"))
    assert validation_summary(release_validation(release)) in shown
    sheet = Image.open(ARTIFACTS / "eval-grid.png")
    assert sheet.size == lorakit.contact_sheet(ws, eval_id, PROJECT, cell_size=128).size
    assert any(im.size == sheet.size for im in html_images(run.html))
    assert not lorakit.validate_records(ws)


def test_04_report_html_holds_the_grid(chain, demo):
    run = chain["04_eval_report"]
    assert run.ok and not errors_in(run.executed)
    ws = open_workspace(demo["data"])
    lora = lorakit.get_lora(ws, LORA, project=PROJECT)
    (eval_id,) = next(r for r in lora["releases"] if r["id"] == RELEASE)["evaluation"]["evalIds"]
    html = run.html.read_text(encoding="utf-8")
    for heading in ("Checkpoint", "Dataset", "Provenance", "Training config and loss curve", "Validation drop",
                    "Eval grid", "Review history", "Current status"):
        assert heading in html
    release = next(r for r in lora["releases"] if r["id"] == RELEASE)
    assert validation_summary(release_validation(release)) in html_module.unescape(html)
    assert "secondsPerScore" in html  # the full validation block
    assert "batch approval in the notebook test" in html and eval_id in html
    assert "lorakit.reports import release_report" not in html  # the report hides its code
    sheet = lorakit.contact_sheet(ws, eval_id, PROJECT, cell_size=128)
    grids = [im for im in html_images(run.html) if im.size == sheet.size]
    assert grids and grids[0].convert("RGB").tobytes() == sheet.convert("RGB").tobytes()


def test_lorakit_report_records_the_path(chain, demo, tmp_path, capsys):
    out = tmp_path / "reports"
    assert main(["report", "--lora", LORA, "--release", RELEASE, "--project", PROJECT, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    (html,) = out.glob(f"04_eval_report__{LORA}__{RELEASE}__*.html")
    assert str(html) in printed
    lora = lorakit.get_lora(demo["data"], LORA, project=PROJECT)
    report = next(r for r in lora["releases"] if r["id"] == RELEASE)["evaluation"]["report"]
    assert Path(report["html"]).resolve() == html.resolve() and report["notebook"].endswith(".ipynb")
    assert not lorakit.validate_records(demo["data"])


def test_wizard_notebook_runs_headless(chain, demo):
    run = run_notebook("00_wizard", {"project": PROJECT}, out_dir=demo["reports"], data_root=demo["data"],
                       config=demo["config"])
    assert run.ok and run.html.is_file()
    shown = outputs_of(run.executed, "Wizard(ws")
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in shown)
    assert "Wizard(" in "".join(o.get("data", {}).get("text/plain", "") for o in shown)


def test_failing_cell_exits_nonzero_and_keeps_the_notebook(demo, tmp_path, capsys):
    out = tmp_path / "failed"
    code = main(["notebook", "run", "01", "-p", "asset_types", '["no_such_type"]', "-p", "dataset_id", "broken",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "DatasetError" in err and "result = lorakit.build_manifest(" in err  # the error and the cell
    (executed,) = out.glob("01_build_dataset__*.ipynb")
    assert any("DatasetError" in e for e in errors_in(executed))
    assert executed.with_suffix(".html").is_file()
    with pytest.raises(NotebookError) as info:
        run_notebook("01", {"asset_types": ["no_such_type"]}, out_dir=out)
    assert info.value.run.failed_cell is not None and not info.value.run.ok


def test_export_html_folds_text_progress_bars(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("pass")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="train 1/3\rtrain 2/3\rtrain 3/3\n")]
    path = tmp_path / "bar.ipynb"
    nbformat.write(nb, path)
    html = export_html(path).read_text(encoding="utf-8")
    assert "train 3/3" in html and "train 1/3" not in html
