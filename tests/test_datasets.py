"""Dataset builder: selection rules, captions, manifests, hash cache, errors, export and the CLI.

Every test runs on real files in a temporary data root: records written through the store, real PNGs
written with Pillow (with and without alpha), real subprocesses for the command line.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from lorakit.catalog import load_catalogs
from lorakit.cli import main
from lorakit.datasets import (
    EXCLUDED_TAG,
    FILTERED_BY_CHECKPOINT,
    FILTERED_BY_TAG,
    FILTERED_BY_TYPE,
    IMAGE_MISSING,
    NO_VARIANT,
    UNREADABLE_IMAGE,
    WRONG_STATUS,
    build_caption,
    build_manifest,
    dataset_summary,
    export_dataset,
    export_file_names,
    load_manifest,
    manifest_hash,
    manifest_items_frame,
    matches_tags,
    pick_image,
    pick_variant,
    pick_version,
    prompt_tokens,
)
from lorakit.errors import DatasetError, InvalidIdError, RecordError, RecordNotFoundError
from lorakit.store import Store, dump_json

TS = "2026-01-01T00:00:00.000Z"
OLD = 1_700_000_000  # an mtime well in the past, so the hash cache trusts the file


# ---- helpers -------------------------------------------------------------------------------------------
def write_png(root: Path, rel: str, color=(200, 30, 30), alpha: bool = False, size: int = 8) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "RGBA" if alpha else "RGB"
    Image.new(mode, (size, size), (*color, 128) if alpha else color).save(path, format="PNG")
    os.utime(path, (OLD, OLD))
    return rel


def variant(vid: str, tags=None, alpha: bool = True, status: str | None = None, **extra) -> dict:
    v = {"id": vid, "originalPath": f"files/p1/{vid}.png"}
    if alpha:
        v["alphaPath"] = f"files/p1/{vid}_alpha.png"
    if tags is not None:
        v["tags"] = list(tags)
    if status:
        v["status"] = status
    return {**v, **extra}


def version(vid: str, status: str, variants: list[dict], primary: str | None = None) -> dict:
    v = {"id": vid, "createdAt": TS, "status": status, "generation": {}, "variants": variants}
    if primary:
        v["primaryVariantId"] = primary
    return v


def spec(sid: str, asset_type: str, style: str = "cyber", scenario: str = "space", tags=(), checkpoint=None,
         title: str | None = None) -> dict:
    s = {"id": sid, "projectId": "p1", "createdAt": TS, "updatedAt": TS, "title": title or f"{asset_type} {sid}",
         "assetType": asset_type, "style": style, "scenario": scenario, "prompt": {"positive": "x", "negative": ""},
         "tags": list(tags)}
    if checkpoint:
        s["checkpointId"] = checkpoint
    return s


def add_asset(store: Store, asset_id: str, spec_id: str, versions: list[dict], images: bool = True) -> dict:
    """Write an asset record and (``images``) a PNG for every original and alpha path it names."""
    record = {"id": asset_id, "projectId": "p1", "specId": spec_id, "createdAt": TS, "updatedAt": TS,
              "versions": versions}
    store.write("asset", record, project="p1")
    if images:
        for ver in versions:
            for var in ver["variants"]:
                write_png(store.root, var["originalPath"], color=(len(var["id"]) * 10 % 256, 40, 90))
                if "alphaPath" in var:
                    write_png(store.root, var["alphaPath"], alpha=True, color=(10, len(var["id"]) * 7 % 256, 90))
    return record


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under the data root (the .lorakit cache and locks included) with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store(tmp_data_root: Path) -> Store:
    """Project p1 with catalogs (and overrides for checkpoint ckA) and two specs, no assets yet."""
    s = Store(tmp_data_root)
    s.write("project", {"id": "p1", "name": "P1", "createdAt": TS, "updatedAt": TS})
    s.write_catalog("styles", {"id": "styles", "createdAt": TS, "updatedAt": TS, "styles": [
        {"id": "cyber", "label": "Cyber", "promptTokens": ["cyberpunk style", "neon city"]}]}, "p1")
    s.write_catalog("scenarios", {"id": "scenarios", "createdAt": TS, "updatedAt": TS, "scenarios": [
        {"id": "space", "label": "Space", "promptTokens": ["outer space"]}]}, "p1")
    s.write_catalog("tags", {"id": "tags", "createdAt": TS, "updatedAt": TS, "groups": [
        {"id": "color", "label": "Color", "exclusive": False, "tags": [
            {"id": "color:neon", "label": "neon", "promptToken": "neon colors"},
            {"id": "color:pastel", "label": "pastel"}]},
        {"id": "assetType", "label": "Type", "exclusive": True, "tags": [
            {"id": "assetType:ui_icon", "label": "icon", "promptToken": "game icon", "aliases": ["icon"]}]}]}, "p1")
    s.write_catalog("styles", {"id": "styles", "createdAt": TS, "updatedAt": TS, "styles": [
        {"id": "cyber", "label": "Cyber", "promptTokens": ["score_9", "cyber screencap"]}]}, "p1", checkpoint="ckA")
    s.write_catalog("tags", {"id": "tags", "createdAt": TS, "updatedAt": TS, "groups": [
        {"id": "color", "label": "Color", "exclusive": False, "tags": [
            {"id": "color:neon", "label": "neon", "promptToken": "neon glow, vivid"}]}]}, "p1", checkpoint="ckA")
    s.write("spec", spec("s_icon", "ui_icon", tags=["assetType:ui_icon", "style:cyber"], checkpoint="ckA",
                         title="Shield icon"), project="p1")
    s.write("spec", spec("s_char", "character", tags=["assetType:character"], checkpoint="ckB"), project="p1")
    return s


def build(store: Store, **kw):
    return build_manifest(store.root, project="p1", **kw)


# ---- pure decisions ------------------------------------------------------------------------------------
def test_pick_version_takes_the_last_with_the_status() -> None:
    asset = {"versions": [version("v1", "approved", []), version("v2", "approved", []), version("v3", "draft", [])]}
    assert pick_version(asset)["id"] == "v2"
    assert pick_version(asset, "draft")["id"] == "v3"
    assert pick_version(asset, "rejected") is None


def test_pick_variant_primary_then_selected_then_first() -> None:
    a, b, c = variant("a"), variant("b", status="selected"), variant("c", status="selected")
    assert pick_variant(version("v", "approved", [a, b, c], primary="c"))["id"] == "c"
    assert pick_variant(version("v", "approved", [a, b, c]))["id"] == "b"
    assert pick_variant(version("v", "approved", [a, variant("d", status="rejected")]))["id"] == "a"
    assert pick_variant(version("v", "approved", [a, b], primary="gone"))["id"] == "b"  # unknown primary falls through
    assert pick_variant(version("v", "approved", [])) is None


def test_pick_image_prefers_an_existing_alpha() -> None:
    var = variant("x")
    assert pick_image(var, lambda p: True) == "files/p1/x_alpha.png"
    assert pick_image(var, lambda p: not p.endswith("_alpha.png")) == "files/p1/x.png"
    assert pick_image(variant("y", alpha=False), lambda p: True) == "files/p1/y.png"
    assert pick_image(var, lambda p: False) is None


def test_matches_tags_all_or_any() -> None:
    assert matches_tags(["a", "b"], ["a", "b"])
    assert not matches_tags(["a"], ["a", "b"])
    assert matches_tags(["a"], ["a", "b"], any_=True)
    assert not matches_tags(["c"], ["a", "b"], any_=True)
    assert matches_tags([], [])


def test_caption_strategies() -> None:
    sp = {"tags": ["style:cyber", "pose:front"], "title": "Shield icon"}
    assert build_caption(["pose:front", "color:neon"], sp, "tags") == "pose:front, color:neon"
    assert build_caption(["pose:front", "color:neon"], sp, "tags+spec") == "pose:front, color:neon, style:cyber"
    assert build_caption(["pose:front"], sp, "tags+spec+title") == "pose:front, style:cyber, Shield icon"
    assert build_caption(["pose:front"], sp, "tags+spec+title", no_spec_tags=True) == "pose:front, Shield icon"
    assert build_caption(["a"], sp, "tags", tokens=["tok", "a"]) == "a, tok"
    assert build_caption([], None, "tags+spec+title") is None
    assert build_caption(["issue:blurry", "a"], None, "tags", exclude=["issue:*"]) == "a"
    with pytest.raises(DatasetError, match="unknown caption strategy 'nope'"):
        build_caption([], None, "nope")


def test_checkpoint_catalog_entries_replace_project_entries(store: Store) -> None:
    sp = store.read("spec", "s_icon", "p1")
    project_cats = load_catalogs(store.root, "p1")
    ck_cats = load_catalogs(store.root, "p1", checkpoint="ckA")
    tags = ["color:neon", "icon", "color:pastel"]  # "icon" is an alias; pastel has no token
    assert prompt_tokens(sp, tags, project_cats) == [
        "cyberpunk style", "neon city", "outer space", "neon colors", "game icon"]
    assert prompt_tokens(sp, tags, ck_cats) == [
        "score_9", "cyber screencap", "outer space", "neon glow, vivid", "game icon"]
    assert prompt_tokens(None, ["color:neon"], ck_cats) == ["neon glow, vivid"]


def test_manifest_hash_covers_captions_and_image_hashes() -> None:
    items = [{"assetId": "a", "assetVersionId": "v", "variantId": "x", "path": "f.png", "caption": "c", "sha256": "0" * 64}]
    same = [dict(items[0], tags=["ignored"])]
    assert manifest_hash(items) == manifest_hash(same)
    assert manifest_hash(items) != manifest_hash([dict(items[0], caption="d")])
    assert manifest_hash(items) != manifest_hash([dict(items[0], sha256="1" * 64)])


def test_export_file_names_are_unique_and_deterministic() -> None:
    assert export_file_names(["a/x.png", "b/x.png", "c/X.PNG", "d/x_2.png"]) == ["x.png", "x_2.png", "X_3.PNG", "x_2_2.png"]


# ---- building ------------------------------------------------------------------------------------------
def test_build_picks_version_variant_and_image(store: Store) -> None:
    add_asset(store, "a1", "s_icon", [
        version("v1", "approved", [variant("a1_old", ["color:neon"])]),
        version("v2", "approved", [variant("a1_x", ["pose:side"]), variant("a1_y", ["pose:front"])], primary="a1_y"),
        version("v3", "draft", [variant("a1_draft")]),
    ])
    add_asset(store, "a2", "s_icon", [version("v1", "approved", [variant("a2_x"), variant("a2_sel", ["x"], status="selected")])])
    add_asset(store, "a3", "s_icon", [version("v1", "approved", [variant("a3_x", ["color:pastel"])])])
    (store.root / "files/p1/a3_x_alpha.png").unlink()  # alpha declared, file missing: fall back to the original
    add_asset(store, "a4", "s_icon", [version("v1", "approved", [variant("a4_x", alpha=False)])])

    result = build(store, dataset_id="ds1")
    items = {i["assetId"]: i for i in result.manifest["items"]}
    assert [i["assetId"] for i in result.manifest["items"]] == ["a1", "a2", "a3", "a4"]
    assert (items["a1"]["assetVersionId"], items["a1"]["variantId"]) == ("v2", "a1_y")
    assert items["a1"]["path"] == "files/p1/a1_y_alpha.png"
    assert items["a2"]["variantId"] == "a2_sel"
    assert items["a3"]["path"] == "files/p1/a3_x.png"
    assert items["a4"]["path"] == "files/p1/a4_x.png"
    assert items["a1"]["tags"] == ["pose:front"] and "tags" not in items["a4"]  # as stored
    assert "caption" not in items["a4"]  # no parts, no caption
    for item in items.values():
        assert item["sha256"] == sha(store.root / item["path"])
    assert any("alpha file is missing: a3" in w for w in result.warnings)
    assert result.path == store.root / "projects/p1/datasets/ds1.json"
    assert load_manifest(store.root, "ds1", "p1") == result.manifest


def test_tag_filters_all_any_and_spec_tags(store: Store) -> None:
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x", ["color:neon", "pose:front"])])])
    add_asset(store, "a2", "s_icon", [version("v1", "approved", [variant("a2_x", ["color:neon"])])])
    add_asset(store, "a3", "s_char", [version("v1", "approved", [variant("a3_x", ["pose:front"])])])

    def ids(**kw):
        return [i["assetId"] for i in build(store, dry_run=True, **kw).manifest["items"]]

    assert ids(tags=["color:neon", "pose:front"]) == ["a1"]
    assert ids(tags=["color:neon", "pose:front"], tag_any=True) == ["a1", "a2", "a3"]
    assert ids(tags=["style:cyber"]) == ["a1", "a2"]  # spec tags count...
    with pytest.raises(DatasetError, match="filtered by tag 3"):
        ids(tags=["style:cyber"], no_spec_tags=True)  # ...unless --no-spec-tags
    assert ids(asset_types=["character"]) == ["a3"]
    assert ids(checkpoints=["ckA"]) == ["a1", "a2"]


def test_exclude_tag_globs_on_variant_and_spec(store: Store) -> None:
    store.write("spec", spec("s_bad", "ui_icon", tags=["issue:offmodel"]), project="p1")
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x", ["issue:blurry", "color:neon"])])])
    add_asset(store, "a2", "s_bad", [version("v1", "approved", [variant("a2_x", ["color:neon"])])])
    add_asset(store, "a3", "s_icon", [version("v1", "approved", [variant("a3_x", ["issues:none", "color:neon"])])])
    result = build(store, exclude_tags=["issue:*"], caption="tags+spec", dry_run=True)
    assert [i["assetId"] for i in result.manifest["items"]] == ["a3"]
    assert result.counts == {EXCLUDED_TAG: 2}
    assert {e.asset_id: e.detail for e in result.left_out} == {"a1": "issue:blurry", "a2": "issue:offmodel"}
    assert "issue:" not in json.dumps(result.manifest["items"])


def test_caption_strategies_and_checkpoint_tokens_in_a_build(store: Store) -> None:
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x", ["color:neon", "color:neon"])])])
    add_asset(store, "a2", "s_char", [version("v1", "approved", [variant("a2_x", ["color:neon"])])])

    def captions(**kw):
        return {i["assetId"]: i.get("caption") for i in build(store, dry_run=True, **kw).manifest["items"]}

    assert captions() == {"a1": "color:neon", "a2": "color:neon"}
    assert captions(caption="tags+spec")["a1"] == "color:neon, assetType:ui_icon, style:cyber"
    assert captions(caption="tags+spec+title")["a1"] == "color:neon, assetType:ui_icon, style:cyber, Shield icon"
    assert captions(caption="tags+spec+title", no_spec_tags=True)["a1"] == "color:neon, Shield icon"
    tokens = captions(with_tokens=True)
    # a1's spec is for ckA: its style and tag tokens come from the ckA override; a2 (ckB) uses the project's
    assert tokens["a1"] == "color:neon, score_9, cyber screencap, outer space, neon glow, vivid, game icon"
    assert tokens["a2"] == "color:neon, cyberpunk style, neon city, outer space, neon colors"
    assert captions(with_tokens=True, no_spec_tags=True)["a1"] == \
        "color:neon, score_9, cyber screencap, outer space, neon glow, vivid"


def test_scope_paths_selection_and_provenance(store: Store) -> None:
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x", ["color:neon"])])])
    base = build(store, scope="baseline", dataset_id="base1",
                 provenance={"source": "studio", "license": "CC-BY-4.0", "author": None, "url": ""})
    assert base.path == store.root / "shared/datasets/base1.json" and base.path.is_file()
    assert base.manifest["scope"] == "baseline" and "projectId" not in base.manifest
    assert base.manifest["provenance"] == {"source": "studio", "license": "CC-BY-4.0"}
    proj = build(store, tags=["color:neon"], exclude_tags=["issue:*"], caption="tags+spec", with_tokens=True)
    assert proj.path == store.root / f"projects/p1/datasets/{proj.manifest['id']}.json"
    assert len(proj.manifest["id"]) == 26  # a ULID
    assert proj.manifest["projectId"] == "p1" and "provenance" not in proj.manifest
    assert proj.manifest["selection"] == {
        "project": "p1", "status": "approved", "assetTypes": [], "checkpoints": [], "tags": ["color:neon"],
        "tagAny": False, "excludeTags": ["issue:*"], "caption": "tags+spec", "noSpecTags": False, "withTokens": True}
    assert json.loads(proj.path.read_text(encoding="utf-8")) == proj.manifest
    assert proj.path.read_text(encoding="utf-8") == dump_json(proj.manifest)


def test_manifest_hash_is_stable_and_tracks_changes(store: Store) -> None:
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x", ["color:neon"])])])
    first = build(store, dataset_id="ds")
    again = build(store, dataset_id="ds")
    assert again.manifest["manifestHash"] == first.manifest["manifestHash"]
    assert again.manifest["createdAt"] == first.manifest["createdAt"]  # a re-build keeps the creation time
    assert again.images_hashed == 0  # warm: served from the hash cache
    assert build(store, caption="tags+spec").manifest["manifestHash"] != first.manifest["manifestHash"]
    # a changed image (same path) changes its sha256 and so the manifest hash
    path = store.root / "files/p1/a1_x_alpha.png"
    write_png(store.root, "files/p1/a1_x_alpha.png", color=(1, 2, 3), alpha=True)
    os.utime(path, (OLD + 5, OLD + 5))
    changed = build(store, dataset_id="ds")
    assert changed.images_hashed == 1
    assert changed.manifest["items"][0]["sha256"] == sha(path)
    assert changed.manifest["manifestHash"] != first.manifest["manifestHash"]


def test_hash_cache_tolerates_corruption_and_skips_racy_files(store: Store) -> None:
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x")])])
    cache = store.root / ".lorakit/cache/sha256.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json", encoding="utf-8")
    assert build(store).images_hashed == 1
    assert json.loads(cache.read_text(encoding="utf-8"))["version"] == 1
    assert build(store).images_hashed == 0
    os.utime(store.root / "files/p1/a1_x_alpha.png")  # modified just now: re-hashed, not cached yet
    assert build(store).images_hashed == 1
    assert build(store).images_hashed == 1


def test_left_out_reasons_are_counted(store: Store) -> None:
    add_asset(store, "ok", "s_icon", [version("v1", "approved", [variant("ok_x", ["color:neon"])])])
    add_asset(store, "draft", "s_icon", [version("v1", "draft", [variant("draft_x", ["color:neon"])])])
    add_asset(store, "char", "s_char", [version("v1", "approved", [variant("char_x", ["color:neon"])])])
    store.write("spec", spec("s_other", "ui_icon", tags=["assetType:ui_icon"], checkpoint="ckB"), project="p1")
    add_asset(store, "other_ck", "s_other", [version("v1", "approved", [variant("oc_x", ["color:neon"])])])
    add_asset(store, "empty", "s_icon", [version("v1", "approved", [])])
    add_asset(store, "excl", "s_icon", [version("v1", "approved", [variant("excl_x", ["color:neon", "issue:x"])])])
    add_asset(store, "untagged", "s_icon", [version("v1", "approved", [variant("ut_x", ["pose:side"])])])
    add_asset(store, "noimg", "s_icon", [version("v1", "approved", [variant("noimg_x", ["color:neon"])])], images=False)
    add_asset(store, "corrupt", "s_icon", [version("v1", "approved", [variant("cor_x", ["color:neon"])])])
    (store.root / "files/p1/cor_x_alpha.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    add_asset(store, "truncated", "s_icon", [version("v1", "approved", [variant("tr_x", ["color:neon"])])])
    tr = store.root / "files/p1/tr_x_alpha.png"
    tr.write_bytes(tr.read_bytes()[:-20])

    result = build(store, asset_types=["ui_icon"], checkpoints=["ckA"], tags=["color:neon"], exclude_tags=["issue:*"])
    assert [i["assetId"] for i in result.manifest["items"]] == ["ok"]
    assert result.counts == {WRONG_STATUS: 1, FILTERED_BY_TYPE: 1, FILTERED_BY_CHECKPOINT: 1, NO_VARIANT: 1,
                             EXCLUDED_TAG: 1, FILTERED_BY_TAG: 1, IMAGE_MISSING: 1, UNREADABLE_IMAGE: 2}
    reasons = {e.asset_id: (e.reason, e.detail) for e in result.left_out}
    assert reasons["corrupt"][0] == UNREADABLE_IMAGE and "files/p1/cor_x_alpha.png" in reasons["corrupt"][1]
    assert reasons["truncated"][0] == UNREADABLE_IMAGE
    assert reasons["noimg"] == (IMAGE_MISSING, "no file at files/p1/noimg_x_alpha.png nor files/p1/noimg_x.png")
    cached = json.loads((store.root / ".lorakit/cache/sha256.json").read_text(encoding="utf-8"))["entries"]
    assert set(cached) == {"files/p1/ok_x_alpha.png"}  # only verified images are cached


def test_missing_spec_warns_and_stays_eligible_without_type_filters(store: Store) -> None:
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x", ["color:neon"])])])
    add_asset(store, "orphan", "s_gone", [version("v1", "approved", [variant("or_x", ["color:neon"])])])
    result = build(store, caption="tags+spec+title", with_tokens=True, dry_run=True)
    items = {i["assetId"]: i for i in result.manifest["items"]}
    assert items["orphan"]["caption"] == "color:neon, neon colors"  # no spec tags, title, style or scenario
    assert any("missing spec" in w and "orphan -> s_gone" in w for w in result.warnings)
    filtered = build(store, asset_types=["ui_icon"], dry_run=True)
    assert [i["assetId"] for i in filtered.manifest["items"]] == ["a1"]
    assert filtered.counts == {FILTERED_BY_TYPE: 1}


def test_dry_run_computes_everything_and_writes_nothing(store: Store) -> None:
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x")])])
    before = snapshot(store.root)
    result = build(store, dataset_id="dry", dry_run=True)
    assert not result.written and result.manifest["items"][0]["sha256"]
    assert result.path == store.root / "projects/p1/datasets/dry.json"
    assert snapshot(store.root) == before


def test_empty_selection_is_an_error_with_counts(store: Store) -> None:
    add_asset(store, "a1", "s_icon", [version("v1", "draft", [variant("a1_x")])])
    add_asset(store, "a2", "s_icon", [version("v1", "approved", [variant("a2_x", ["pose:side"])])])
    before = snapshot(store.root)
    with pytest.raises(DatasetError, match=r"no items selected from 2 asset\(s\) of project 'p1'; "
                                           r"left out: wrong status 1, filtered by tag 1"):
        build(store, tags=["color:neon"])
    assert snapshot(store.root) == before


@pytest.mark.parametrize("case", ["malformed", "schema", "escape"])
def test_bad_asset_records_are_clear_errors_and_change_nothing(store: Store, case: str) -> None:
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x")])])
    bad = store.root / "projects/p1/assets/bad.json"
    if case == "malformed":
        bad.write_text('{"id": "bad",\n  "versions": [}\n', encoding="utf-8")
        expected = r"bad\.json: malformed JSON at line 2, column 16"
    elif case == "schema":
        record = {"id": "bad", "projectId": "p1", "specId": "s_icon", "createdAt": TS, "updatedAt": TS,
                  "versions": [version("v1", "approved", [{"id": "x"}])]}
        bad.write_text(dump_json(record), encoding="utf-8")
        expected = r"bad\.json: invalid asset record: at \$\.versions\[0\]\.variants\[0\]: 'originalPath' is a required"
    else:
        record = {"id": "bad", "projectId": "p1", "specId": "s_icon", "createdAt": TS, "updatedAt": TS,
                  "versions": [version("v1", "approved", [{"id": "x", "originalPath": "../../etc/passwd"}])]}
        bad.write_text(dump_json(record), encoding="utf-8")
        expected = r"bad\.json: at \$\.versions\[0\]\.variants\[0\]\.originalPath: image path '\.\./\.\./etc/passwd' leaves"
    before = snapshot(store.root)
    with pytest.raises(RecordError, match=expected):
        build(store, dataset_id="never")
    assert snapshot(store.root) == before


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"dataset_id": "a/b"}, InvalidIdError, "invalid dataset id 'a/b'"),
    ({"dataset_id": "..x"}, InvalidIdError, r"invalid dataset id '\.\.x'"),
    ({"project": "nope"}, RecordNotFoundError, "project 'nope' does not exist"),
    ({"project": "../p1"}, InvalidIdError, "invalid project id"),
    ({"caption": "words"}, DatasetError, "unknown caption strategy 'words'"),
    ({"status": "aproved"}, DatasetError, "unknown status 'aproved'"),
    ({"scope": "global"}, DatasetError, "unknown scope 'global'"),
    ({"provenance": {"licence": "x"}}, DatasetError, "unknown provenance field"),
])
def test_bad_options_are_clear_errors_and_change_nothing(store: Store, kwargs, error, message) -> None:
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x")])])
    before = snapshot(store.root)
    with pytest.raises(error, match=message):
        build_manifest(store.root, **{"project": "p1", **kwargs})
    assert snapshot(store.root) == before


# ---- reading and exporting -----------------------------------------------------------------------------
@pytest.fixture
def built(store: Store) -> Store:
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x", ["color:neon"])])])
    add_asset(store, "a2", "s_icon", [version("v1", "approved", [variant("a2_x", alpha=False)])])
    # a third item whose file name clashes with a1's alpha image, in another folder
    add_asset(store, "a3", "s_icon", [version("v1", "approved", [
        {"id": "a3_x", "originalPath": "files/other/a1_x_alpha.png", "tags": ["pose:side"]}])], images=False)
    write_png(store.root, "files/other/a1_x_alpha.png", alpha=True, color=(9, 9, 9))
    build(store, dataset_id="ds")
    return store


def test_summary_and_frame(built: Store) -> None:
    manifest = load_manifest(built.root, "ds", "p1")
    summary = dataset_summary(manifest)
    assert (summary["items"], summary["captioned"], summary["hashMatches"]) == (3, 2, True)
    frame = manifest_items_frame(manifest)
    assert list(frame["assetId"]) == ["a1", "a2", "a3"] and frame.loc[0, "tags"] == ["color:neon"]
    manifest["items"][0]["caption"] = "edited"
    assert dataset_summary(manifest)["hashMatches"] is False


def test_export_kohya(built: Store, tmp_path: Path) -> None:
    result = export_dataset(built.root, "ds", "p1", out_dir=tmp_path / "out", repeats=5, name="icons")
    folder = tmp_path / "out/5_icons"
    assert result.image_dir == folder
    assert sorted(p.name for p in folder.iterdir()) == ["a1_x_alpha.png", "a1_x_alpha.txt", "a1_x_alpha_2.png",
                                                        "a1_x_alpha_2.txt", "a2_x.png"]
    assert (folder / "a1_x_alpha.png").read_bytes() == (built.root / "files/p1/a1_x_alpha.png").read_bytes()
    assert Image.open(folder / "a1_x_alpha.png").mode == "RGBA"  # alpha kept as is
    assert (folder / "a1_x_alpha.txt").read_text(encoding="utf-8") == "color:neon\n"
    assert (folder / "a1_x_alpha_2.txt").read_text(encoding="utf-8") == "pose:side\n"
    with pytest.raises(DatasetError, match="is not empty"):
        export_dataset(built.root, "ds", "p1", out_dir=tmp_path / "out")
    export_dataset(built.root, "ds", "p1", out_dir=tmp_path / "out", repeats=2, overwrite=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["2_ds"]


def test_export_imagefolder_and_changed_image(built: Store, tmp_path: Path) -> None:
    export_dataset(built.root, "ds", "p1", fmt="imagefolder", out_dir=tmp_path / "hf")
    lines = [json.loads(line) for line in (tmp_path / "hf/metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines == [{"file_name": "a1_x_alpha.png", "text": "color:neon"},
                     {"file_name": "a2_x.png", "text": ""},
                     {"file_name": "a1_x_alpha_2.png", "text": "pose:side"}]
    assert all((tmp_path / "hf" / line["file_name"]).is_file() for line in lines)
    write_png(built.root, "files/p1/a2_x.png", color=(0, 0, 0))
    with pytest.raises(DatasetError, match=r"files/p1/a2_x\.png: changed since the manifest was built"):
        export_dataset(built.root, "ds", "p1", fmt="imagefolder", out_dir=tmp_path / "hf2")
    assert not (tmp_path / "hf2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf2")] == []  # no staging left behind


# ---- command line --------------------------------------------------------------------------------------
def test_cli_in_process(store: Store, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x", ["color:neon"])])])
    add_asset(store, "a2", "s_icon", [version("v1", "draft", [variant("a2_x")])])
    code = main(["dataset", "build", "--project", "p1", "--id", "cli", "--tag", "color:neon,style:cyber",
                 "--exclude-tag", "issue:*", "--caption", "tags+spec", "--with-tokens", "--explain",
                 "--provenance-source", "studio"])
    out = capsys.readouterr().out
    assert code == 0
    assert "dataset cli (project): 1 item(s) from 2 asset(s)" in out
    assert "left out: wrong status 1" in out and "- a2: wrong status" in out
    manifest = load_manifest(store.root, "cli", "p1")
    assert manifest["selection"]["tags"] == ["color:neon", "style:cyber"]
    assert manifest["provenance"] == {"source": "studio"}
    assert f"manifest hash {manifest['manifestHash']}" in out
    assert main(["dataset", "show", "cli", "--project", "p1"]) == 0
    assert "(matches items)" in capsys.readouterr().out
    assert main(["dataset", "export", "cli", "--project", "p1", "--format", "kohya", "--out", str(tmp_path / "k")]) == 0
    assert (tmp_path / "k/10_cli/a1_x_alpha.txt").is_file()
    before = snapshot(store.root)
    assert main(["dataset", "build", "--project", "p1", "--tag", "nothing"]) == 1
    assert "error: no items selected" in capsys.readouterr().err
    assert main(["dataset", "build", "--project", "p1", "--id", "../x"]) == 1
    assert "error: invalid dataset id '../x'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["dataset", "build", "--project", "p1", "--caption", "words"])
    assert exc.value.code == 2 and "invalid choice: 'words'" in capsys.readouterr().err
    assert main(["dataset", "show", "missing", "--project", "p1"]) == 1
    assert snapshot(store.root) == before


def test_cli_subprocess(store: Store) -> None:
    # One real process (CLI start-up imports the whole package, seconds); error exits are covered in process.
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x", ["color:neon"])])])
    ok = subprocess.run([sys.executable, "-m", "lorakit", "dataset", "build", "--project", "p1", "--scope", "baseline",
                         "--id", "sub", "--data-root", str(store.root), "--caption", "tags+spec"],
                        capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "dataset sub (baseline): 1 item(s)" in ok.stdout
    manifest = load_manifest(store.root, "sub")
    assert manifest["items"][0]["caption"] == "color:neon, assetType:ui_icon, style:cyber"


def test_a_warm_build_reads_no_image(store: Store) -> None:
    for n in range(30):
        add_asset(store, f"a{n:02d}", "s_icon", [version("v1", "approved", [variant(f"a{n:02d}_x", ["color:neon"])])])
    cold = build(store)
    t0 = time.perf_counter()
    warm = build(store)
    assert time.perf_counter() - t0 < 5
    assert (cold.images_hashed, warm.images_hashed) == (30, 0)
    assert warm.manifest["manifestHash"] == cold.manifest["manifestHash"]


# ---- parsed-record cache -------------------------------------------------------------------------------
RECORD_CACHES = ("records-p1-assets.json", "records-p1-specs.json")


def age_records(store: Store) -> None:
    """Give every asset and spec file an old mtime, so the record cache trusts them (fresh files wait 2 s)."""
    for kind in ("assets", "specs"):
        for path in (store.root / "projects/p1" / kind).glob("*.json"):
            os.utime(path, (OLD, OLD))


def record_cache(store: Store, kind: str = "assets") -> dict:
    return json.loads((store.root / f".lorakit/cache/records-p1-{kind}.json").read_text(encoding="utf-8"))["entries"]


def test_record_cache_serves_unchanged_files_and_rereads_changed_ones(store: Store) -> None:
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x", ["color:neon"])])])
    add_asset(store, "a2", "s_icon", [version("v1", "approved", [variant("a2_x", ["color:neon"])])])
    age_records(store)
    build(store)
    assert set(record_cache(store)) == {"a1.json", "a2.json"} and set(record_cache(store, "specs")) == {"s_icon.json"}
    # An entry is used while the file's size and mtime match: an edited cache entry shows through.
    cache_file = store.root / ".lorakit/cache/records-p1-assets.json"
    raw = json.loads(cache_file.read_text(encoding="utf-8"))
    raw["entries"]["a2.json"][2] = raw["entries"]["a2.json"][2].replace("color:neon", "color:cache")
    cache_file.write_text(json.dumps(raw), encoding="utf-8")
    os.utime(cache_file, (OLD, OLD))
    items = {i["assetId"]: i for i in build(store).manifest["items"]}
    assert items["a2"]["tags"] == ["color:cache"]
    assert cache_file.stat().st_mtime_ns == OLD * 10**9  # all hits: the cache is not rewritten
    # Same size, new content and mtime: read again.
    path = store.root / "projects/p1/assets/a1.json"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("color:neon", "color:teal"), encoding="utf-8")
    os.utime(path, (OLD + 5, OLD + 5))
    assert len(text) == path.stat().st_size
    items = {i["assetId"]: i for i in build(store).manifest["items"]}
    assert items["a1"]["tags"] == ["color:teal"]
    assert record_cache(store)["a1.json"][:2] == [path.stat().st_size, (OLD + 5) * 10**9]


def test_record_cache_skips_racy_files_and_keeps_error_messages(store: Store) -> None:
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x")])])
    add_asset(store, "a2", "s_icon", [version("v1", "approved", [variant("a2_x")])])
    age_records(store)
    os.utime(store.root / "projects/p1/assets/a2.json")  # modified just now: read, but not cached yet
    build(store)
    assert set(record_cache(store)) == {"a1.json"}
    bad = store.root / "projects/p1/assets/a1.json"  # cached, then broken: the usual error, cache untouched
    bad.write_text('{"id": "a1",\n  "versions": [}\n', encoding="utf-8")
    before = snapshot(store.root)
    with pytest.raises(RecordError, match=r"a1\.json: malformed JSON at line 2, column 16"):
        build(store)
    assert snapshot(store.root) == before


def test_corrupt_record_cache_is_ignored(store: Store) -> None:
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x", ["color:neon"])])])
    age_records(store)
    folder = store.root / ".lorakit/cache"
    folder.mkdir(parents=True)
    (folder / "records-p1-assets.json").write_text("{not json", encoding="utf-8")
    (folder / "records-p1-specs.json").write_text(json.dumps(
        {"version": 1, "entries": {"s_icon.json": "x", "s_char.json": [1, 2, "[not json"]}}), encoding="utf-8")
    result = build(store, caption="tags+spec")
    assert result.manifest["items"][0]["caption"] == "color:neon, assetType:ui_icon, style:cyber"
    assert set(record_cache(store)) == {"a1.json"}
    assert json.loads(record_cache(store, "specs")["s_icon.json"][2])["id"] == "s_icon"


def test_dry_run_writes_no_record_cache(store: Store) -> None:
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x")])])
    age_records(store)
    build(store, dry_run=True)
    assert not any((store.root / ".lorakit/cache" / name).exists() for name in RECORD_CACHES)
    build(store)
    assert all((store.root / ".lorakit/cache" / name).is_file() for name in RECORD_CACHES)
    add_asset(store, "a2", "s_icon", [version("v1", "approved", [variant("a2_x")])])
    age_records(store)
    before = snapshot(store.root)
    assert len(build(store, dry_run=True).manifest["items"]) == 2
    assert snapshot(store.root) == before


def test_deleted_asset_file_leaves_results_and_record_cache(store: Store) -> None:
    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x")])])
    add_asset(store, "a2", "s_icon", [version("v1", "approved", [variant("a2_x")])])
    age_records(store)
    assert [i["assetId"] for i in build(store).manifest["items"]] == ["a1", "a2"]
    (store.root / "projects/p1/assets/a2.json").unlink()
    result = build(store)
    assert [i["assetId"] for i in result.manifest["items"]] == ["a1"] and result.assets_seen == 1
    assert set(record_cache(store)) == {"a1.json"}


def test_iter_assets_and_load_specs_read_the_record_cache_but_never_write_it(store: Store) -> None:
    from lorakit.catalog import iter_assets, load_specs

    add_asset(store, "a1", "s_icon", [version("v1", "approved", [variant("a1_x")])])
    age_records(store)
    assert [a["id"] for a in iter_assets(store.root, "p1")] == ["a1"] and set(load_specs(store.root, "p1")) == {
        "s_char", "s_icon"}
    assert not (store.root / ".lorakit/cache/records-p1-assets.json").exists()
    build(store)
    before = snapshot(store.root)
    add_asset(store, "a2", "s_icon", [version("v1", "approved", [variant("a2_x")])])
    age_records(store)
    assert [a["id"] for a in iter_assets(store.root, "p1")] == ["a1", "a2"]
    assert load_specs(store.root, "p1")["s_icon"]["title"] == "Shield icon"
    assert record_cache(store) == json.loads(before[".lorakit/cache/records-p1-assets.json"])["entries"]
