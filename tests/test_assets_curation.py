"""Curation helpers: tag frequencies, exact and near duplicates, bulk status and tag edits."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from lorakit.assets import (
    AssetError,
    find_duplicates,
    import_assets,
    set_asset_status,
    tag_assets,
    tag_frequencies,
)
from lorakit.cli import main
from lorakit.errors import RecordNotFoundError
from lorakit.imagehash import dhash, hamming
from lorakit.store import now_iso
from lorakit.validate import validate_records
from lorakit.workspace import open_workspace


@pytest.fixture
def ws(tmp_data_root):
    """A workspace on an empty temporary data root with its own config (see conftest.py)."""
    return open_workspace()


def picture(seed: int, size: int = 64) -> Image.Image:
    """A smooth random picture: random 6x6 colours blown up, like a simple sprite."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB").resize((size, size), Image.BICUBIC)


@pytest.fixture
def library(ws, tmp_path):
    """Imported assets by file name: four distinct pictures, one near duplicate (re-encoded, resized),
    plus an asset added by hand whose file is a byte copy of another (an exact duplicate)."""
    drop = tmp_path / "drop"
    (drop / "10_duck").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        picture(i).save(drop / name)
    (drop / "a.txt").write_text("pose:front, issue:blurry", encoding="utf-8")
    (drop / "b.txt").write_text("pose:front, color:neon", encoding="utf-8")
    picture(3).save(drop / "10_duck" / "d.png")
    picture(0).resize((60, 60), Image.LANCZOS).save(drop / "10_duck" / "a_near.jpg", quality=80)
    report = import_assets(ws, "game", drop, recursive=True, tags=["style:pixel"])
    ids = {r["path"].rsplit("/", 1)[1]: r["asset_id"] for r in report.imported}
    assert len(ids) == 5

    # Another tool's asset: no processing block, so duplicates must hash its file.
    source = ws.store.read("asset", ids["b.png"], "game")
    copy = ws.data_root / "files" / "game" / "other" / "b_copy.png"
    copy.parent.mkdir(parents=True)
    shutil.copyfile(ws.store.file_path(source["versions"][0]["variants"][0]["originalPath"]), copy)
    now = now_iso()
    ws.store.write("asset", {
        "id": "zz_legacy", "projectId": "game", "specId": source["specId"], "createdAt": now, "updatedAt": now,
        "versions": [{"id": "v1", "createdAt": now, "status": "approved", "generation": {},
                      "variants": [{"id": "x", "originalPath": "files/game/other/b_copy.png", "tags": ["legacy"]}]}],
    }, "game", create=True)
    ids["b_copy.png"] = "zz_legacy"
    return ids


def status_of(ws, asset_id: str) -> str:
    return ws.store.read("asset", asset_id, "game")["versions"][-1]["status"]


def tags_of(ws, asset_id: str) -> list[str]:
    return ws.store.read("asset", asset_id, "game")["versions"][-1]["variants"][0].get("tags", [])


def test_perceptual_hash_sees_re_encoding_but_not_other_pictures():
    original = dhash(picture(0))
    assert hamming(original, dhash(picture(0).resize((60, 60)).convert("L"))) <= 6
    assert min(hamming(original, dhash(picture(seed))) for seed in range(1, 20)) > 10


def test_duplicates_finds_planted_exact_and_near_pairs(ws, library):
    frame = find_duplicates(ws, "game")
    pairs = {(row.kind, frozenset((row.asset_a, row.asset_b))): row for row in frame.itertuples()}
    exact = pairs.pop(("exact", frozenset((library["b.png"], library["b_copy.png"]))))
    near = pairs.pop(("near", frozenset((library["a.png"], library["a_near.jpg"]))))
    assert pairs == {}, f"unexpected pairs: {list(pairs)}"
    assert exact.distance == 0 and exact.group != near.group
    assert 0 < near.distance <= 6
    assert {near.path_a, near.path_b} == {"files/game/drop/a.png", "files/game/drop/10_duck/a_near.jpg"}

    tighter = find_duplicates(ws, "game", threshold=near.distance - 1)
    assert list(tighter["kind"]) == ["exact"]
    assert len(find_duplicates(ws, "game", threshold=64)) == 6 * 5 // 2  # at 64 bits every pair is a duplicate
    with pytest.raises(AssetError, match="threshold"):
        find_duplicates(ws, "game", threshold=65)


def test_tag_frequencies_follow_the_dataset_rules(ws, library):
    assert list(tag_frequencies(ws, "game")["tag"]) == ["legacy"]  # only the hand-made asset is approved so far
    set_asset_status(ws, "game", [library["a.png"], library["b.png"], library["d.png"]], "approved")

    frame = tag_frequencies(ws, "game").set_index("tag")
    assert frame.loc["style:pixel", "count"] == 3 and frame.loc["style:pixel", "in_variant"] == 3
    assert frame.loc["pose:front", "count"] == 2 and frame.loc["legacy", "count"] == 1
    assert frame.loc["duck", "in_spec"] == 1 and frame.loc["duck", "in_variant"] == 0
    assert not frame.loc["duck", "caption"]  # default caption strategy "tags": spec tags stay out
    assert frame.loc["style:pixel", "captions"] == 3

    with_spec = tag_frequencies(ws, "game", caption="tags+spec").set_index("tag")
    assert with_spec.loc["duck", "caption"] and with_spec.loc["duck", "captions"] == 1
    assert not tag_frequencies(ws, "game", caption="tags+spec", no_spec_tags=True).set_index("tag").loc["duck", "caption"]

    excluding = tag_frequencies(ws, "game", exclude_tags=["issue:*"]).set_index("tag")
    assert excluding.loc["issue:blurry", "excluded"] and not excluding.loc["issue:blurry", "caption"]
    assert excluding.loc["style:pixel", "captions"] == 2  # a.png (blurry) is left out of the dataset

    everything = tag_frequencies(ws, "game", status=None).set_index("tag")
    assert everything.loc["style:pixel", "count"] == 5
    assert list(everything.columns) == ["count", "in_variant", "in_spec", "captions", "caption", "excluded"]


def test_set_status_is_validated_all_or_nothing(ws, library):
    a, b = library["a.png"], library["b.png"]
    frame = set_asset_status(ws, "game", [a, b], "approved")
    assert list(frame["old_status"]) == ["draft", "draft"] and list(frame["status"]) == ["approved", "approved"]
    assert status_of(ws, a) == status_of(ws, b) == "approved"

    with pytest.raises(AssetError, match="nothing changed.*'nope'"):
        set_asset_status(ws, "game", [library["c.png"], "nope"], "rejected")
    assert status_of(ws, library["c.png"]) == "draft"
    with pytest.raises(AssetError, match="unknown status"):
        set_asset_status(ws, "game", [a], "done")
    with pytest.raises(AssetError, match="no version 'v9'"):
        set_asset_status(ws, "game", ["zz_legacy"], "rejected", version="v9")
    set_asset_status(ws, "game", ["zz_legacy"], "deprecated", version="v1")
    assert status_of(ws, "zz_legacy") == "deprecated"
    with pytest.raises(RecordNotFoundError):
        set_asset_status(ws, "elsewhere", [a], "approved")
    assert validate_records(ws, project="game") == []


def test_tag_edits_change_the_chosen_variant_only(ws, library):
    a, b = library["a.png"], library["b.png"]
    spec_before = ws.store.read("spec", ws.store.read("asset", a, "game")["specId"], "game")
    frame = tag_assets(ws, "game", [a, b], add=["quality:high", "pose:front"], remove=["issue:blurry", "style:pixel"])
    assert tags_of(ws, a) == ["pose:front", "quality:high"]
    assert tags_of(ws, b) == ["pose:front", "color:neon", "quality:high"]
    assert list(frame["old_tags"])[0] == ["style:pixel", "pose:front", "issue:blurry"]
    assert ws.store.read("spec", spec_before["id"], "game")["tags"] == spec_before["tags"]

    with pytest.raises(AssetError, match="nothing changed.*'missing'"):
        tag_assets(ws, "game", [library["c.png"], "missing"], add=["new"])
    assert "new" not in tags_of(ws, library["c.png"])
    with pytest.raises(AssetError, match="add or remove"):
        tag_assets(ws, "game", [a])
    assert validate_records(ws, project="game") == []


def test_command_line(ws, library, capsys):
    a, b, c = library["a.png"], library["b.png"], library["c.png"]
    assert main(["assets", "set-status", "--project", "game", "--asset", f"{a},{b}", "--asset", c,
                 "--status", "approved"]) == 0
    assert all(status_of(ws, i) == "approved" for i in (a, b, c))
    assert main(["assets", "tag", "--project", "game", "--asset", a, "--add", "mood:happy,pose:side",
                 "--remove", "issue:blurry"]) == 0
    assert tags_of(ws, a) == ["style:pixel", "pose:front", "mood:happy", "pose:side"]
    capsys.readouterr()

    assert main(["assets", "tags", "--project", "game", "--caption", "tags+spec"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["tag", "count", "in_variant", "in_spec", "captions", "caption", "excluded"]
    assert "mood:happy" in out and "issue:blurry" not in out

    assert main(["assets", "duplicates", "--project", "game"]) == 0
    out = capsys.readouterr().out
    assert "exact" in out and "near" in out and "zz_legacy" in out
    assert main(["assets", "duplicates", "--project", "game", "--threshold", "0", "--status", "approved"]) == 0
    assert "near" not in capsys.readouterr().out

    assert main(["assets", "set-status", "--project", "game", "--asset", "nope", "--status", "rejected"]) == 1
    assert "nothing changed" in capsys.readouterr().err
