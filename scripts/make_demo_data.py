#!/usr/bin/env python3
"""Write the embedded demo data: project `demo` (specs, assets, images, catalogs) and shared records.

Deterministic: the same run always writes the same files, so the demo data in Git can be regenerated and
compared. Records go through lorakit's store, so they are validated like any other write.

Usage: python scripts/make_demo_data.py [--data-root DIR]
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorakit.store import Store  # noqa: E402

TS = "2026-01-01T00:00:00.000Z"
PROJECT = "demo"
CHECKPOINT = "tiny-sd15"
SIZE = 64
ASSET_TYPES = {
    "ui_icon": {"label": "UI icon", "requiresAlpha": True, "defaultTags": ["assetType:ui_icon"],
                "canonicalPrompts": ["ui icon of a shield, flat, centered", "ui icon of a potion bottle, centered",
                                     "ui icon of a gear, game menu", "ui icon of a star badge, glossy"]},
    "character": {"label": "Character", "requiresAlpha": True, "defaultTags": ["assetType:character"],
                  "canonicalPrompts": ["character sprite, front view, full body", "character sprite, side view, running",
                                       "character portrait, heroic pose"]},
    "vfx": {"label": "VFX", "requiresAlpha": True, "defaultTags": ["assetType:vfx"],
            "canonicalPrompts": ["vfx impact burst, additive glow", "vfx magic circle, top-down",
                                 "vfx smoke puff, soft edges"]},
    "texture": {"label": "Texture", "tileable": True, "defaultTags": ["assetType:texture"],
                "canonicalPrompts": ["seamless metal floor texture", "seamless grass texture, top-down",
                                     "seamless stone wall texture"]},
}
STYLES = {"cyberpunk": ["cyberpunk style", "neon lights"], "pixel": ["pixel art", "16-bit"],
          "painterly": ["painterly", "soft brush strokes"]}
SCENARIOS = {"space": ["space station"], "forest": ["forest"], "menu": ["game menu"]}
TAG_GROUPS = {
    "color": [("color:neon", "neon colors"), ("color:pastel", "pastel colors"), ("color:gold", "golden")],
    "quality": [("quality:high", None), ("quality:medium", None)],
    "issue": [("issue:blurry", None), ("issue:cropped", None)],
    "faction": [("faction:rebels", "rebel faction insignia"), ("faction:empire", "imperial faction insignia")],
    "character": [("character:astroduck", "astroduck, a duck astronaut")],
    "assetType": [(f"assetType:{t}", None) for t in ASSET_TYPES],
}
# (asset type, style, scenario, title, spec tags, checkpoint?) -- a few specs per type, some without a checkpoint.
SPECS = [
    ("ui_icon", "cyberpunk", "menu", "Shield icon", ["faction:rebels"], CHECKPOINT),
    ("ui_icon", "cyberpunk", "menu", "Potion icon", [], CHECKPOINT),
    ("ui_icon", "pixel", "menu", "Coin icon", ["color:gold"], None),
    ("character", "cyberpunk", "space", "Astroduck pilot", ["character:astroduck", "faction:rebels"], CHECKPOINT),
    ("character", "painterly", "forest", "Forest ranger", ["faction:empire"], CHECKPOINT),
    ("vfx", "cyberpunk", "space", "Plasma impact", [], CHECKPOINT),
    ("vfx", "painterly", "forest", "Leaf swirl", [], None),
    ("texture", "pixel", "forest", "Mossy stone", [], CHECKPOINT),
]


def catalog(key: str, entries: list[dict]) -> dict:
    return {"id": key if key != "groups" else "tags", "createdAt": TS, "updatedAt": TS, key: entries}


def draw_asset(kind: str, rnd: random.Random, alpha: bool) -> Image.Image:
    """A small picture that looks like its asset type, so trained LoRAs have something to learn."""
    hue = [rnd.randrange(40, 256) for _ in range(3)]
    bg = (0, 0, 0, 0) if alpha else (24, 24, 32, 255)
    img = Image.new("RGBA", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(img)
    c = SIZE // 2
    if kind == "ui_icon":
        r = rnd.randrange(18, 28)
        d.rounded_rectangle([c - r, c - r, c + r, c + r], radius=8, fill=(*hue, 255), outline=(255, 255, 255, 255), width=2)
        d.ellipse([c - 8, c - 8, c + 8, c + 8], fill=(255, 255, 255, 255))
    elif kind == "character":
        d.ellipse([c - 8, 8, c + 8, 24], fill=(*hue, 255))
        d.rectangle([c - 7, 24, c + 7, 44], fill=(*hue[::-1], 255))
        d.line([c - 5, 44, c - 10, 60], fill=(*hue, 255), width=4)
        d.line([c + 5, 44, c + 10, 60], fill=(*hue, 255), width=4)
    elif kind == "vfx":
        for i in range(12, 0, -1):
            a = int(255 * (1 - i / 12))
            d.ellipse([c - i * 2.5, c - i * 2.5, c + i * 2.5, c + i * 2.5], fill=(*hue, a))
        for k in range(8):
            ang = k * math.pi / 4 + rnd.random()
            d.line([c, c, c + 30 * math.cos(ang), c + 30 * math.sin(ang)], fill=(255, 255, 200, 200), width=2)
    else:
        for y in range(0, SIZE, 8):
            for x in range(0, SIZE, 8):
                shade = rnd.randrange(60, 120)
                d.rectangle([x, y, x + 7, y + 7], fill=(shade, shade + rnd.randrange(0, 60), shade, 255))
    return img if alpha else img.convert("RGB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parent.parent / "data"))
    args = ap.parse_args()
    store = Store(args.data_root)
    root = store.root
    rnd = random.Random(20260101)
    for folder in (root / "projects" / PROJECT, root / "files" / PROJECT):
        shutil.rmtree(folder, ignore_errors=True)

    store.write("project", {
        "id": PROJECT, "name": "Demo: Astroduck Tactics", "createdAt": TS, "updatedAt": TS,
        "defaults": {"style": "cyberpunk", "scenario": "space", "checkpointId": CHECKPOINT},
        "policies": {"loraSelection": {"mode": "baseline_then_project", "preferRecommended": True,
                                       "maxActiveLoras": 2, "releasePolicy": "active_or_latest_approved"}},
    })
    store.write_catalog("styles", catalog("styles", [
        {"id": s, "label": s.title(), "promptTokens": toks} for s, toks in STYLES.items()]), PROJECT)
    store.write_catalog("scenarios", catalog("scenarios", [
        {"id": s, "label": s.title(), "promptTokens": toks} for s, toks in SCENARIOS.items()]), PROJECT)
    store.write_catalog("tags", catalog("groups", [
        {"id": g, "label": g.title(), "exclusive": False,
         "tags": [{"id": t, "label": t.split(":")[1], **({"promptToken": tok} if tok else {})} for t, tok in tags]}
        for g, tags in TAG_GROUPS.items()]), PROJECT)
    # Shared asset types (with canonical eval prompts) and a project override of one entry.
    store.write_catalog("asset-types", catalog("assetTypes", [
        {"id": t, **info} for t, info in ASSET_TYPES.items()]), None)
    store.write_catalog("asset-types", catalog("assetTypes", [
        {"id": "ui_icon", **ASSET_TYPES["ui_icon"], "canonicalPrompts": [
            "ui icon of a rebel shield, neon, centered", "ui icon of a health potion, centered",
            "ui icon of a settings gear, game menu", "ui icon of an astroduck badge, glossy"]}]), PROJECT)
    # Checkpoint-specific tokens: on the tiny checkpoint the cyberpunk style and neon tag read differently.
    store.write_catalog("styles", catalog("styles", [
        {"id": "cyberpunk", "label": "Cyberpunk", "promptTokens": ["cyberpunk", "synthwave palette"]}]), PROJECT, CHECKPOINT)
    store.write_catalog("tags", catalog("groups", [{"id": "color", "label": "Color", "exclusive": False, "tags": [
        {"id": "color:neon", "label": "neon", "promptToken": "glowing neon edges"}]}]), PROJECT, CHECKPOINT)

    # The shared checkpoint records the demo trains on. Their weights are built by
    # `lorakit checkpoint make-tiny` (not in Git); the records say where to find them.
    for ckpt_id, family, name in ((CHECKPOINT, "sd15", "Tiny SD1.5 (random weights, for demos and tests)"),
                                  ("tiny-sdxl", "sdxl", "Tiny SDXL (random weights, for demos and tests)")):
        store.write("checkpoint", {
            "id": ckpt_id, "name": name, "createdAt": TS, "updatedAt": TS, "family": family,
            "supportedAssetTypes": list(ASSET_TYPES),
            "weights": {"kind": "config_relative", "base": "checkpointsRoot", "path": ckpt_id},
            "promptTemplates": {"basePositive": "game asset, clean background", "baseNegative": "blurry, watermark, text",
                                "perAssetType": {"ui_icon": {"positive": "flat ui icon, centered", "negative": "photo"},
                                                 "character": {"positive": "full body sprite"}}},
            "defaultGenerationParams": {"width": 64, "height": 64, "steps": 4, "cfg": 5.0},
        })

    variant_tags = ["color:neon", "color:pastel", "quality:high", "quality:medium", "issue:blurry"]
    statuses = ["approved"] * 6 + ["review", "draft", "rejected"]
    n_assets = 0
    for si, (kind, style, scenario, title, tags, ckpt) in enumerate(SPECS):
        spec_id = f"spec_{kind}_{si:02d}"
        spec = {"id": spec_id, "projectId": PROJECT, "createdAt": TS, "updatedAt": TS, "title": title,
                "assetType": kind, "style": style, "scenario": scenario,
                "prompt": {"positive": f"{title.lower()}, {kind.replace('_', ' ')}", "negative": "blurry, text"},
                "tags": [f"assetType:{kind}", *tags], "status": "approved"}
        if ckpt:
            spec["checkpointId"] = ckpt
        store.write("spec", spec, PROJECT)
        for ai in range(4 if si < 6 else 3):
            asset_id = f"asset_{kind}_{si:02d}_{ai}"
            versions = []
            for vi in range(1 + (ai % 2)):  # every other asset has a second version
                variants = []
                for ki in range(1 + (ai + vi) % 2):
                    var_id = f"{asset_id}_v{vi}_{ki}"
                    has_alpha = kind != "texture"
                    rel = f"files/{PROJECT}/{kind}/{var_id}.png"
                    draw_asset(kind, rnd, alpha=False).save(_mk(root / rel))
                    var = {"id": var_id, "originalPath": rel,
                           "tags": sorted(rnd.sample(variant_tags, rnd.randint(1, 2)))}
                    if has_alpha:
                        var["alphaPath"] = f"files/{PROJECT}/{kind}/{var_id}_alpha.png"
                        # One alpha file is left missing on purpose: the builder falls back to the original.
                        if var_id != "asset_ui_icon_01_0_v0_0":
                            draw_asset(kind, rnd, alpha=True).save(_mk(root / var["alphaPath"]))
                    if ki == 1:
                        var["status"] = "selected"
                    variants.append(var)
                versions.append({"id": f"{asset_id}_v{vi}", "createdAt": TS,
                                 "status": "approved" if vi == 1 else statuses[(si * 4 + ai) % len(statuses)],
                                 "generation": {"seed": si * 100 + ai}, "variants": variants})
            asset = {"id": asset_id, "projectId": PROJECT, "specId": spec_id, "createdAt": TS, "updatedAt": TS,
                     "versions": versions,
                     "provenance": {"source": "lorakit demo generator", "author": "lorakit", "license": "CC0-1.0"}}
            store.write("asset", asset, PROJECT)
            n_assets += 1
    print(f"wrote project {PROJECT!r}: {len(SPECS)} specs, {n_assets} assets under {root}")


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    main()
