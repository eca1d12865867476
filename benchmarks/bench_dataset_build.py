#!/usr/bin/env python3
"""Benchmark ``build_manifest`` on a synthetic 10,000-asset library: a cold build, then a warm re-build.

    python benchmarks/bench_dataset_build.py [--assets 10000] [--root DIR] [--gen PATH] [--keep]

The library comes from the shared generator (``--gen``, default ``../shared/tools/gen_assets.py`` next to the
repository). Without ``--root`` it is generated into a temporary folder and removed afterwards; with
``--root`` an existing library there is reused (generated first if it has no ``data/`` folder).

Each measurement runs in a fresh Python process, so its peak RSS is that build's own and nothing is warm in
the interpreter. "Cold" is a first build: lorakit's caches (image hashes, parsed records) are removed, so
every record is read and every selected image is read, verified and hashed (the target applies here).
"Cold disk" also asks the kernel to drop the library's files from the page cache
(``/proc/sys/vm/drop_caches`` when writable, else ``posix_fadvise(DONTNEED)`` on every file): that measures
the disk as much as lorakit, so it is reported without a target. "Warm" re-runs with the caches the cold
build left. Build time is measured around the ``build_manifest`` call (imports and interpreter start-up are
reported separately) and includes the manifest write.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_GEN = REPO.parent / "shared" / "tools" / "gen_assets.py"
PROJECT = "bench"
TARGETS = {"warm_s": 1.0, "cold_s": 3.0, "rss_mb": 300.0}
BUILD_OPTIONS = {"caption": "tags+spec", "with_tokens": True, "exclude_tags": ["issue:*"]}
CLI_EQUIVALENT = "lorakit dataset build --project bench --caption tags+spec --with-tokens --exclude-tag 'issue:*'"


def child(data_root: str) -> None:
    """One measured build, in this fresh process; prints a JSON line of figures."""
    import resource

    t_start = time.perf_counter()
    from lorakit.datasets import build_manifest
    from lorakit.workspace import open_workspace

    ws = open_workspace(data_root)
    ws.store.check("dataset", {"id": "warmup", "scope": "baseline", "createdAt": "t", "updatedAt": "t",
                               "selection": {}, "items": [{"assetId": "a", "assetVersionId": "v", "variantId": "x",
                                                           "path": "p"}]}, "warm-up")
    t_imported = time.perf_counter()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    result = build_manifest(ws, project=PROJECT, dataset_id="bench", **BUILD_OPTIONS)
    build_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # How much of the build was the store's JSON Schema check of the manifest (store.write runs it once)
    t1 = time.perf_counter()
    ws.store.check("dataset", result.manifest, result.path)
    validate_s = time.perf_counter() - t1
    print(json.dumps({
        "build_s": build_s, "cpu_s": cpu_s, "import_s": t_imported - t_start, "validate_s": validate_s,
        "assets": result.assets_seen, "items": len(result.manifest["items"]), "hashed": result.images_hashed,
        "rss_before_mb": rss_before / 1024, "rss_peak_mb": rss_peak / 1024, "left_out": result.counts,
    }))


def drop_page_cache(data_root: Path) -> str:
    """Evict the library's files from the page cache as far as an unprivileged process can; says how."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    if not hasattr(os, "posix_fadvise"):
        return "none (no posix_fadvise here)"
    for folder, _dirs, files in os.walk(data_root):
        for name in files:
            try:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "posix_fadvise(DONTNEED) per file"


def measure(data_root: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(data_root)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"benchmark build failed:\n{proc.stderr}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    figures["process_s"] = wall
    return figures


def generate(gen: Path, root: Path, n: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(gen), str(root), str(n)], check=True)
    return time.perf_counter() - t0


def report(label: str, f: dict, target_s: float | None) -> bool:
    ok_time = target_s is None or f["build_s"] < target_s
    ok_mem = f["rss_peak_mb"] < TARGETS["rss_mb"]
    verdict = "no target" if target_s is None else f"target < {target_s} s: {'ok' if ok_time else 'MISSED'}"
    print(f"{label:9s} build {f['build_s']:.3f} s ({f['assets'] / f['build_s']:,.0f} assets/s; {verdict}); CPU {f['cpu_s']:.3f} s; manifest schema check alone ~{f['validate_s']:.3f} s")
    print(f"          {f['items']} items, {f['hashed']} images hashed+verified; peak RSS {f['rss_peak_mb']:.0f} MB "
          f"(after imports {f['rss_before_mb']:.0f} MB; target < {TARGETS['rss_mb']:.0f} MB: {'ok' if ok_mem else 'MISSED'}); "
          f"process {f['process_s']:.2f} s incl. imports {f['import_s']:.2f} s")
    return ok_time and ok_mem


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=int, default=10_000, help="library size (default: 10000)")
    ap.add_argument("--root", type=Path, help="library folder to reuse (generated there if it has no data/)")
    ap.add_argument("--gen", type=Path, default=DEFAULT_GEN, help=f"gen_assets.py (default: {DEFAULT_GEN})")
    ap.add_argument("--keep", action="store_true", help="keep a generated temporary library")
    ap.add_argument("--child", metavar="DATA_ROOT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return 0

    root = args.root.resolve() if args.root else Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    data_root = root / "data"
    try:
        if not (data_root / "projects" / PROJECT / "project.json").is_file():
            if not args.gen.is_file():
                sys.exit(f"error: asset generator not found at {args.gen}; pass --gen PATH/TO/gen_assets.py")
            print(f"generating {args.assets} assets into {root} ...", flush=True)
            print(f"  generated in {generate(args.gen, root, args.assets):.1f} s")
        n_assets = len(os.listdir(data_root / "projects" / PROJECT / "assets"))
        print(f"library: {data_root} ({n_assets} assets); build options: {CLI_EQUIVALENT}")
        print(f"machine: {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.2f}, Python {sys.version.split()[0]}")

        shutil.rmtree(data_root / ".lorakit" / "cache", ignore_errors=True)
        how = drop_page_cache(data_root)
        print(f"cold disk: lorakit caches (image hashes, parsed records) removed; page cache dropped with {how} (no target: disk-bound)")
        cold_disk = measure(data_root)
        shutil.rmtree(data_root / ".lorakit" / "cache", ignore_errors=True)
        print("cold: lorakit caches (image hashes, parsed records) removed; files in the page cache")
        cold = measure(data_root)
        warm = measure(data_root)
        report("cold disk", cold_disk, None)
        ok = report("cold", cold, TARGETS["cold_s"])
        ok = report("warm", warm, TARGETS["warm_s"]) and ok
        print("all targets met" if ok else "some targets missed")
        return 0 if ok else 1
    finally:
        if not args.root and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif not args.root:
            print(f"library kept at {root}")


if __name__ == "__main__":
    raise SystemExit(main())
