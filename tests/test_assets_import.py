"""``lorakit assets import``: real folders of real images, imported into a temporary data root."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

import lorakit
from lorakit.assets import (
    AssetError,
    group_tags,
    group_title,
    import_assets,
    inspect_image,
    kohya_folder,
    parse_caption,
)
from lorakit.cli import main
from lorakit.errors import RecordError
from lorakit.validate import validate_records
from lorakit.workspace import open_workspace


# ---- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture
def ws(tmp_data_root):
    """A workspace on an empty temporary data root with its own config (see conftest.py)."""
    return open_workspace()


def picture(seed: int, size: int = 48, mode: str = "RGB") -> Image.Image:
    """A smooth random picture (random 6x6 colours blown up), so re-encoding changes its look little."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 4), dtype=np.uint8), "RGBA").resize((size, size), Image.BICUBIC)
    if mode == "RGBA":
        alpha = np.zeros((size, size), dtype=np.uint8)
        alpha[size // 4: -size // 4, size // 4: -size // 4] = 255
        small.putalpha(Image.fromarray(alpha, "L"))
        return small
    return small.convert(mode)


@pytest.fixture
def art(tmp_path) -> Path:
    """A drop folder with every case the importer must handle."""
    root = tmp_path / "art"
    (root / "10_astroduck").mkdir(parents=True)
    (root / "icons" / "small").mkdir(parents=True)
    picture(1, mode="RGBA").save(root / "hero.png")
    (root / "hero.txt").write_text("hero, front view\n", encoding="utf-8")
    picture(2).save(root / "bg.jpg", quality=90)
    (root / "bg.caption").write_text("background\nforest, night, forest", encoding="utf-8")
    picture(3).save(root / "10_astroduck" / "duck1.webp", quality=90)
    picture(4).save(root / "10_astroduck" / "duck2.png")
    (root / "10_astroduck" / "duck2.txt").write_text("astroduck, side view", encoding="utf-8")
    picture(5, mode="RGBA").save(root / "icons" / "small" / "gem.webp", lossless=True)
    picture(6).save(root / "icons" / "coin.png")
    (root / "icons" / "coin.TXT").write_text("coin,  gold ", encoding="utf-8")
    (root / "broken.png").write_bytes(b"this is not a png at all")
    whole = (root / "icons" / "coin.png").read_bytes()
    (root / "icons" / "cut.png").write_bytes(whole[: len(whole) // 2])
    (root / "notes.md").write_text("where these came from", encoding="utf-8")
    (root / "lonely.caption").write_text("no image for me", encoding="utf-8")
    picture(7).save(root / ".hidden.png")
    return root


def assets_of(ws, project: str) -> list[dict]:
    return [record for _path, record in ws.store.iter_records("asset", project)]  # validates every record


def variant_of(asset: dict) -> dict:
    (version,) = asset["versions"]
    (variant,) = version["variants"]
    return variant


def referenced_files(ws, project: str) -> set[Path]:
    return {ws.store.file_path(variant_of(a)["originalPath"]) for a in assets_of(ws, project)}


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


# ---- pure decisions -----------------------------------------------------------------------------------
def test_folder_names_give_titles_and_tags():
    assert kohya_folder("10_astroduck") == (10, "astroduck")
    assert kohya_folder("10_sks dog") == (10, "sks dog")
    assert kohya_folder("icons") is None and kohya_folder("10_") is None and kohya_folder("v2_icons") is None
    assert group_title(["art"]) == "art"
    assert group_title(["art", "10_astroduck"]) == "astroduck"
    assert group_title(["3_ui"]) == "ui"
    assert group_title(["art", "icons", "small"]) == "icons / small"
    assert group_tags(["art", "10_astroduck"], folder_tags=False) == ["astroduck"]
    assert group_tags(["art", "icons", "small"], folder_tags=False) == []
    assert group_tags(["art", "icons", "small"], folder_tags=True) == ["icons", "small"]
    assert group_tags(["5_ui", "icons"], folder_tags=True) == ["ui", "icons"]


def test_caption_parsing():
    assert parse_caption("a, b ,\n c,, a\r\n") == ["a", "b", "c"]
    assert parse_caption("") == []


def test_inspect_image_tells_whole_images_from_broken_ones(art):
    facts = inspect_image((art / "hero.png").read_bytes())
    assert facts.has_alpha and facts.format == "PNG" and (facts.width, facts.height) == (48, 48)
    assert len(facts.sha256) == 64 and len(facts.dhash) == 16
    assert not inspect_image((art / "bg.jpg").read_bytes()).has_alpha
    with pytest.raises(lorakit.assets.BadImage, match="truncated"):
        inspect_image((art / "icons" / "cut.png").read_bytes())
    with pytest.raises(lorakit.assets.BadImage, match="not an image"):
        inspect_image((art / "broken.png").read_bytes())


# ---- import -------------------------------------------------------------------------------------------
def test_import_writes_valid_records_files_tags_and_provenance(ws, art):
    report = import_assets(
        ws, "game", art, asset_type="character", status="review", tags=["pixel art", "hero"], checkpoint="sdxl_base",
        source="studio drive", author="Ada", license="CC-BY-4.0", url="https://example.com/art", notes="batch 1",
        recursive=True, folder_tags=True,
    )
    assert report.project_created
    assert sorted(r["path"] for r in report.imported) == [
        "art/10_astroduck/duck1.webp", "art/10_astroduck/duck2.png", "art/bg.jpg", "art/hero.png",
        "art/icons/coin.png", "art/icons/small/gem.webp",
    ]
    skipped = {r["path"]: r["reason"] for r in report.skipped}
    assert set(skipped) == {"art/broken.png", "art/icons/cut.png", "art/notes.md", "art/lonely.caption"}
    assert "truncated" in skipped["art/icons/cut.png"] and "not an image" in skipped["art/broken.png"]
    assert any("sdxl_base" in w for w in report.warnings)  # imported for a checkpoint not registered yet
    assert validate_records(ws, project="game") == []

    project = ws.store.read("project", "game")
    assert project["policies"]["loraSelection"]["mode"] == "baseline_then_project"
    specs = {s["import"]["folder"]: s for _p, s in ws.store.iter_records("spec", "game")}
    assert set(specs) == {"art", "art/10_astroduck", "art/icons", "art/icons/small"}
    assert {f: s["title"] for f, s in specs.items()} == {
        "art": "art", "art/10_astroduck": "astroduck", "art/icons": "icons", "art/icons/small": "icons / small"}
    assert specs["art/10_astroduck"]["tags"] == ["astroduck"]
    assert specs["art/10_astroduck"]["import"]["kohyaRepeats"] == 10
    assert specs["art/icons/small"]["tags"] == ["icons", "small"]
    assert all(s["assetType"] == "character" and s["checkpointId"] == "sdxl_base" for s in specs.values())
    assert all(s["style"] == "" and s["scenario"] == "" for s in specs.values())

    by_name = {Path(a["provenance"]["importedFrom"]).name: a for a in assets_of(ws, "game")}
    assert len(by_name) == 6
    for name, asset in by_name.items():
        variant = variant_of(asset)
        source = next(art.rglob(name))
        copied = ws.store.file_path(variant["originalPath"])
        assert variant["originalPath"].startswith("files/game/art/")
        assert copied.read_bytes() == source.read_bytes()
        assert asset["versions"][0]["status"] == "review"
        assert asset["versions"][0]["primaryVariantId"] == variant["id"]
        assert asset["provenance"] | {"importedFrom": ""} == {
            "source": "studio drive", "author": "Ada", "license": "CC-BY-4.0", "url": "https://example.com/art",
            "notes": "batch 1", "importedFrom": ""}
        assert variant["tags"][:2] == ["pixel art", "hero"]
        assert ("alphaPath" in variant) == (name in ("hero.png", "gem.webp"))
        assert variant.get("alphaPath", variant["originalPath"]) == variant["originalPath"]
        assert asset["specId"] in {s["id"] for s in specs.values()}
    assert variant_of(by_name["hero.png"])["tags"] == ["pixel art", "hero", "front view"]
    assert variant_of(by_name["bg.jpg"])["tags"] == ["pixel art", "hero", "background", "forest", "night"]
    assert variant_of(by_name["duck2.png"])["tags"] == ["pixel art", "hero", "astroduck", "side view"]
    assert variant_of(by_name["coin.png"])["tags"] == ["pixel art", "hero", "coin", "gold"]
    assert variant_of(by_name["gem.webp"])["tags"] == ["pixel art", "hero"]
    assert by_name["duck1.webp"]["specId"] == specs["art/10_astroduck"]["id"]


def test_reimport_imports_nothing_new_then_only_what_is_new(ws, art):
    first = import_assets(ws, "game", art, recursive=True)
    records, files = sorted(ws.store.list_ids("asset", "game")), files_under(ws.data_root / "files")
    again = import_assets(ws, "game", art, recursive=True)
    assert again.imported == [] and len(again.duplicates) == len(first.imported) == 6
    assert "nothing new to import" in again.summary()
    assert {d["asset_id"] for d in again.duplicates} == {r["asset_id"] for r in first.imported}
    assert sorted(ws.store.list_ids("asset", "game")) == records and files_under(ws.data_root / "files") == files

    picture(40).save(art / "10_astroduck" / "duck3.png")
    (art / "10_astroduck" / "duck3_copy.png").write_bytes((art / "hero.png").read_bytes())
    third = import_assets(ws, "game", art, recursive=True, folder_tags=True)
    assert [r["path"] for r in third.imported] == ["art/10_astroduck/duck3.png"]
    assert {d["path"] for d in third.duplicates} >= {"art/10_astroduck/duck3_copy.png"}
    assert third.specs_created == []  # the group's spec from the first run is found again
    assert third.imported[0]["spec_id"] == first.imported[[r["path"] for r in first.imported].index(
        "art/10_astroduck/duck1.webp")]["spec_id"]
    assert validate_records(ws, project="game") == []


def test_same_image_twice_in_one_folder_is_imported_once(ws, art):
    (art / "hero_again.png").write_bytes((art / "hero.png").read_bytes())
    report = import_assets(ws, "game", art)
    names = [r["path"] for r in report.imported]
    assert ("art/hero.png" in names) != ("art/hero_again.png" in names)
    assert len(report.duplicates) == 1


def test_existing_files_are_never_overwritten(ws, art):
    taken = ws.data_root / "files" / "game" / "art" / "hero.png"
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"someone else's file")
    report = import_assets(ws, "game", art)
    hero = next(r for r in report.imported if r["path"] == "art/hero.png")
    assert hero["file"] == "files/game/art/hero-1.png"
    assert taken.read_bytes() == b"someone else's file"
    assert not [p for p in files_under(ws.data_root / "files") if p.name.startswith(".")]  # no temporaries left


def test_without_recursive_only_the_top_folder_is_imported(ws, art):
    report = import_assets(ws, "game", art)
    assert sorted(r["path"] for r in report.imported) == ["art/bg.jpg", "art/hero.png"]
    assert any("--recursive" in w and "art/10_astroduck" in w for w in report.warnings)


def test_dry_run_writes_nothing(ws, art):
    report = import_assets(ws, "game", art, recursive=True, dry_run=True)
    assert len(report.imported) == 6 and len(report.specs_created) == 4 and report.dry_run
    assert "would import 6" in report.summary()
    assert not (ws.data_root / "projects").exists() and not (ws.data_root / "files").exists()


def test_in_place_references_the_images_where_they_are(ws, art):
    inside = ws.data_root / "files" / "game" / "art"
    shutil.copytree(art, inside)
    import_assets(ws, "game", inside, in_place=True)
    paths = {variant_of(a)["originalPath"] for a in assets_of(ws, "game")}
    assert paths == {"files/game/art/hero.png", "files/game/art/bg.jpg"}  # relative: they stay valid elsewhere
    assert sorted(p.name for p in inside.iterdir()) == sorted(p.name for p in art.iterdir())  # nothing copied


def test_in_place_from_outside_the_data_root_is_refused_at_import(ws, art):
    with pytest.raises(AssetError, match=r"--in-place needs the images inside the data root .*import without "
                                         r"--in-place \(copies\)"):
        import_assets(ws, "game", art, in_place=True)
    assert not (ws.data_root / "projects").exists() and not (ws.data_root / "files").exists()


def test_project_defaults_and_bad_options(ws, art):
    now = "2026-01-01T00:00:00.000Z"
    ws.store.write("project", {"id": "game", "name": "Game", "createdAt": now, "updatedAt": now,
                               "defaults": {"assetType": "ui_icon", "style": "pixel", "scenario": "menu"}})
    report = import_assets(ws, "game", art)
    spec = ws.store.read("spec", report.imported[0]["spec_id"], "game")
    assert (spec["assetType"], spec["style"], spec["scenario"]) == ("ui_icon", "pixel", "menu")
    assert not report.project_created
    with pytest.raises(AssetError, match="unknown status"):
        import_assets(ws, "game", art, status="done")
    with pytest.raises(AssetError, match="not a folder"):
        import_assets(ws, "game", art / "missing")
    with pytest.raises(lorakit.InvalidIdError):
        import_assets(ws, "../escape", art)
    with pytest.raises(AssetError, match="non-empty string"):
        import_assets(ws, "game", art, tags="one,two")


def test_an_item_that_fails_half_way_is_rolled_back(ws, art):
    # A real failure after the spec and the image file are written: the asset folder is a plain file.
    blocker = ws.data_root / "projects" / "game" / "assets"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way", encoding="utf-8")
    with pytest.raises(RecordError, match="assets is a regular file where a folder belongs"):
        import_assets(ws, "game", art)
    assert files_under(ws.data_root / "files") == set()  # neither the copy nor its temporary file
    assert ws.store.list_ids("spec", "game") == []
    blocker.unlink()
    report = import_assets(ws, "game", art)
    assert len(report.imported) == 2 and validate_records(ws, project="game") == []
    assert files_under(ws.data_root / "files") == referenced_files(ws, "game")


# ---- the command line, and interruption -----------------------------------------------------------------
def test_cli_import_twice(ws, art, capsys):
    # The command line in-process (the interrupt test below runs it as a real subprocess).
    args = ["assets", "import", "--project", "game", "--dir", str(art), "--recursive"]
    assert main([*args, "--tag", "pixel art,hero", "--tag", "cute", "--license", "CC0", "--status", "approved"]) == 0
    out, err = capsys.readouterr()
    assert "imported 6 image(s) into project 'game'" in out
    assert "skipped art/broken.png" in err and "truncated" in err
    assert main(args) == 0
    out, _err = capsys.readouterr()
    assert "nothing new to import" in out and "6 already there" in out
    assets = assets_of(ws, "game")
    assert len(assets) == 6 and all(a["versions"][0]["status"] == "approved" for a in assets)
    assert all(variant_of(a)["tags"][:3] == ["pixel art", "hero", "cute"] for a in assets)
    assert all(a["provenance"]["license"] == "CC0" for a in assets)
    assert main(["assets", "import", "--project", "game", "--dir", str(art / "nope")]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["assets", "import", "--project", "game", "--dir", str(art), "--dry-run", "--list"]) == 0
    out, _err = capsys.readouterr()
    assert "duplicate" in out and "would import 0" in out


def test_interrupted_import_leaves_only_whole_items_and_a_rerun_finishes(ws, tmp_path):
    drop = tmp_path / "drop"
    count, per_group = 300, 100
    for i in range(count):
        folder = drop / f"{1 + i // per_group}_set{i // per_group}"  # a new group, and spec, every 100 images
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), (i % 256, i // 256, 7), dtype=np.uint8)).save(folder / f"{i}.png")
    # SIGINT set back to its default in the child: a suite started in the background (``cmd &`` without job
    # control) inherits it ignored, and a Python that starts with SIGINT ignored keeps ignoring it.
    process = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "assets", "import", "--project", "game", "--dir", str(drop), "--recursive"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assets_dir = ws.data_root / "projects" / "game" / "assets"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        done = [n for n in os.listdir(assets_dir) if n.endswith(".json")] if assets_dir.is_dir() else []
        if len(done) >= per_group + 10:  # past the first group's end, so a second spec exists
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 130, f"the import was not interrupted (rc {process.returncode}): {err}"
    assert "interrupted after" in err

    assert validate_records(ws, project="game") == []
    assets = assets_of(ws, "game")
    assert per_group + 10 <= len(assets) < count
    referenced = referenced_files(ws, "game")
    assert all(p.is_file() for p in referenced)
    assert files_under(ws.data_root / "files") == referenced  # no orphan copy, no temporary file
    used_specs = {a["specId"] for a in assets}
    assert set(ws.store.list_ids("spec", "game")) == used_specs  # no spec without assets

    rerun = import_assets(ws, "game", drop, recursive=True)
    assert len(rerun.imported) + len(rerun.duplicates) == count and len(rerun.duplicates) == len(assets)
    assert len(assets_of(ws, "game")) == count
    assert len(ws.store.list_ids("spec", "game")) == count // per_group
    assert validate_records(ws, project="game") == []


@pytest.mark.slow
def test_an_imported_folder_builds_a_dataset_and_trains_on_the_tiny_checkpoint(ws, art):
    """Bring your own images, end to end: import → dataset → a trained candidate release whose file exists."""
    from lorakit.datasets import build_manifest
    from lorakit.loras import create_lora, get_lora
    from lorakit.models import make_tiny_checkpoint
    from lorakit.train import train_lora

    make_tiny_checkpoint(ws, "tiny-sd15", "sd15")
    report = import_assets(ws, "studio", art, recursive=True, asset_type="character", status="approved",
                           checkpoint="tiny-sd15", license="CC0-1.0")
    assert len(report.imported) == 6  # every whole image; the broken, truncated and hidden files are skipped
    result = build_manifest(ws, project="studio", asset_types=["character"], checkpoints=["tiny-sd15"],
                            caption="tags+spec", dataset_id="imported")
    items = result.manifest["items"]
    assert len(items) == 6
    assert any("astroduck" in (item.get("caption") or "") for item in items)  # kohya folder name -> tag -> caption
    create_lora(ws, "studio_chars", name="Studio characters", scope="project", project="studio",
                checkpoint="tiny-sd15", asset_types=["character"])
    trained = train_lora(ws, "studio_chars", "imported", project="studio", preset="tiny-demo",
                         overrides={"steps": 2}, progress=False)
    assert trained.weights_path.is_file()
    release = get_lora(ws, "studio_chars", "studio")["releases"][-1]
    assert release["status"] == "candidate"
    assert release["training"]["manifestHash"] == result.manifest["manifestHash"]
    assert validate_records(ws) == []


def test_two_imports_into_one_project_at_once_import_each_image_once(ws, tmp_path):
    drop = tmp_path / "many"
    for i in range(80):
        folder = drop / f"set{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), (i, 255 - i, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    command = [sys.executable, "-m", "lorakit", "assets", "import", "--project", "game", "--dir", str(drop),
               "--recursive"]
    for _round in range(2):  # the second round finds everything known
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
    assets = assets_of(ws, "game")
    assert len(assets) == 80
    assert len({a["specId"] for a in assets}) == 4 == len(ws.store.list_ids("spec", "game"))
    assert len({variant_of(a)["processing"]["sha256"] for a in assets}) == 80
    assert validate_records(ws) == []
