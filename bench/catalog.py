#!/usr/bin/env python
"""The YFCC100M catalog: the memory-mapped index (``terabrain data index``) against today's
list-of-strings ``YFCCCatalog``, on a synthetic metadata file, in the same run.

The file: N lines in the 25-column layout with the field lengths of the real one (Thomee et
al. 2016; Ni et al. 2015, seed 000: 76% of images have titles, 3.08 words on average; 32% a
description of 22.52 words; 69% have tags, 7.07 on average, here drawn from the seed's top-60
list; about half geotagged; 0.8% videos). Written under /tmp and deleted at the end.

Measured, each in a fresh process so that the resident memory is the catalog's alone:
- the list catalog: parse time (= its time to the first batch), resident bytes per image;
- the index: build time with 1 and 2 workers (and that both give the same bytes), index
  bytes, the filter's throughput (records/s evaluating a tag filter on the index, against
  the list catalog's parse, which is how it filters), open time and time to the first batch
  of 192 image paths, resident bytes per image after opening on 1 and on 2 ranks (RSS
  and PSS: the ranks of a node share the mapped pages);
and extrapolated linearly to the 99.2M images of YFCC100M.

``--folder N`` measures instead the image-folder catalog's listing: N synthetic ImageNet-like
relative paths held as a list of ``str`` (how ``FolderCatalog`` kept them before) against
``FolderCatalog.from_paths`` (one packed UTF-8 blob and an offset per image), each built in a
fresh process: resident bytes per image after building, and the pickle a worker process
receives (bytes, and seconds to dump and load it).

    python bench/catalog.py --lines 1000000
    python bench/catalog.py --lines 2000000 --json
    python bench/catalog.py --folder 2000000
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from _common import OtherLoad  # bench/ is on sys.path: scripts run as bench/NAME.py

FULL = 99_206_564  # images in YFCC100M (Ni et al. 2015)
TOP60 = ("square", "iphoneography", "square format", "instagram app", "california", "travel", "nikon",
         "usa", "canon", "london", "japan", "france", "nature", "art", "music", "europe", "beach",
         "united states", "england", "wedding", "italy", "new york", "canada", "city", "vacation",
         "germany", "party", "park", "water", "people", "uk", "spain", "architecture", "summer",
         "festival", "nyc", "taiwan", "paris", "san francisco", "australia", "winter", "sky", "snow",
         "concert", "night", "family", "china", "museum", "food", "street", "live", "washington",
         "landscape", "flower", "sunset", "photo", "flowers", "holiday", "trip", "photography")
WORDS = ("the", "a", "of", "and", "in", "my", "at", "with", "on", "day", "view", "old", "house", "river",
         "morning", "light", "walk", "garden", "church", "bridge", "road", "lake", "friends", "trip",
         "dsc", "img", "photo", "summer", "winter", "street", "market", "station", "tower", "harbour")
DEVICES = ("Canon+EOS+5D+Mark+II", "NIKON+D90", "Apple+iPhone+4S", "Canon+PowerShot+SD1000",
           "SONY+DSC-W55", "NIKON+D700", "Panasonic+DMC-FZ8", "")
LICENCES = (("Attribution-NonCommercial-ShareAlike License", "http://creativecommons.org/licenses/by-nc-sa/2.0/"),
            ("Attribution License", "http://creativecommons.org/licenses/by/2.0/"),
            ("Attribution-NonCommercial-NoDerivs License", "http://creativecommons.org/licenses/by-nc-nd/2.0/"))
FILTER = {"media": "photo"}  # what the catalogs are opened with: 99.2% of the lines
TAG_FILTER = {"media": "photo", "tags_any": ("nature", "beach", "landscape"), "tags_none": ("wedding",)}
BATCH = 192


def generate(path: Path, lines: int, seed: int = 0) -> None:
    """N synthetic lines of the 25-column layout."""
    rng = random.Random(seed)
    encode = {tag: tag.replace(" ", "+") for tag in TOP60}
    with open(path, "w", buffering=1 << 22) as out:
        for number in range(lines):
            photo = 1_000_000_000 + rng.getrandbits(33)
            user = f"{rng.randrange(10**8):08d}@N0{rng.randrange(8)}"
            video = rng.random() < 0.008
            title = "+".join(rng.choices(WORDS, k=rng.randint(1, 5))) if rng.random() < 0.76 else ""
            description = "+".join(rng.choices(WORDS, k=rng.randint(10, 35))) if rng.random() < 0.32 else ""
            tags = ",".join(encode[t] for t in rng.sample(TOP60, min(60, max(1, int(rng.expovariate(1 / 7.07))))))\
                if rng.random() < 0.69 else ""
            geo = rng.random() < 0.48
            licence = rng.choice(LICENCES)
            server, secret = rng.randrange(1, 9999), f"{rng.getrandbits(40):010x}"
            fields = (
                str(number), str(photo), f"{rng.getrandbits(128):032x}", user, f"user{rng.randrange(10**6)}",
                (f"20{rng.randrange(4, 14):02d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
                f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}.0"),
                str(1_100_000_000 + rng.getrandbits(28)), rng.choice(DEVICES), title, description, tags, "",
                f"{rng.uniform(-180, 180):.6f}" if geo else "", f"{rng.uniform(-90, 90):.6f}" if geo else "",
                str(rng.randint(1, 16)) if geo else "", f"http://www.flickr.com/photos/{user}/{photo}/",
                f"http://farm{rng.randint(1, 9)}.staticflickr.com/{server}/{photo}_{secret}.jpg",
                licence[0], licence[1], str(server), str(rng.randint(1, 9)), secret,
                f"{rng.getrandbits(40):010x}", "mp4" if video else "jpg", "1" if video else "0",
            )
            out.write("\t".join(fields) + "\n")


# --- measurements in a fresh process --------------------------------------------------------------

def _memory() -> tuple[int, int]:
    """(RSS, PSS) of this process in bytes."""
    rss = pss = 0
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
    return rss, pss


def _mapped(pattern: str) -> tuple[int, int, int]:
    """(RSS, PSS of the mappings of files whose name contains ``pattern``; this process's
    private anonymous memory) in bytes."""
    rss = pss = 0
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            inside = pattern in line
        elif inside and fields[0] == "Rss:":
            rss += int(fields[1]) * 1024
        elif inside and fields[0] == "Pss:":
            pss += int(fields[1]) * 1024
    anonymous = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                     if line.startswith("RssAnon:"))
    return rss, pss, anonymous


def child(kind: str, metadata: Path, index_dir: Path, start_at: float) -> dict:
    import multiprocessing  # noqa: F401 (imported before measuring: modules are not the catalog)

    import numpy as np

    from terabrain.data.catalogs import IndexedYFCCCatalog, YFCCCatalog
    from terabrain.data.yfcc import YFCCFilter
    from terabrain.data.yfcc_index_build import prepare_selection

    keep = YFCCFilter(**FILTER)
    while time.time() < start_at:  # the two "ranks" open at the same moment
        time.sleep(0.001)
    before = _memory()
    anonymous_before = _mapped(".tbindex")[2]
    began = time.perf_counter()
    if kind == "list":
        catalog = YFCCCatalog(metadata, Path("/nonexistent"), keep, "hash")
    else:
        index, selection = prepare_selection(metadata, index_dir, keep, "hash", builder=False)
        catalog = IndexedYFCCCatalog(index, selection, Path("/nonexistent"), "hash", str(metadata))
    opened = time.perf_counter() - began
    after = _memory()
    rng = np.random.default_rng(0)
    first = [catalog.name(int(i)) for i in rng.integers(0, len(catalog), BATCH)]
    first_batch = time.perf_counter() - began
    touched = _memory()
    result = {"images": len(catalog), "open_s": opened, "first_batch_s": first_batch,
              "rss_bytes": after[0] - before[0], "pss_bytes": after[1] - before[1],
              "first_batch_rss_bytes": touched[0] - after[0], "example": first[0]}
    if kind == "index":  # an epoch later every page of the columns a reader needs is mapped
        for i in range(len(catalog)):
            catalog.name(i)
        rss, pss, anonymous = _mapped(".tbindex")  # the index and its saved selection
        result.update(epoch_rss_bytes=rss, epoch_pss_bytes=pss, epoch_anonymous_bytes=anonymous - anonymous_before)
    return result


def folder_paths(count: int) -> list[str]:
    """ImageNet-like relative paths, ``nXXXXXXXX/nXXXXXXXX_NNNNNNN.JPEG`` (32 bytes), sorted
    as FolderCatalog sorts them."""
    return sorted(f"n{(i * 7919) % 1000:08d}/n{(i * 7919) % 1000:08d}_{i:07d}.JPEG" for i in range(count))


def folder_child(kind: str, count: int) -> dict:
    import gc
    import pickle

    from terabrain.data.catalogs import FolderCatalog

    before = _memory()[0]
    if kind == "list":
        held = folder_paths(count)
        name = held[count // 2]
    else:
        held = FolderCatalog.from_paths(Path("/data"), folder_paths(count))
        name = held.paths[count // 2]
    gc.collect()
    after = _memory()[0]
    began = time.perf_counter()
    blob = pickle.dumps(held, protocol=pickle.HIGHEST_PROTOCOL)
    dumped = time.perf_counter() - began
    began = time.perf_counter()
    pickle.loads(blob)
    loaded = time.perf_counter() - began
    return {"images": count, "rss_bytes": after - before, "pickle_bytes": len(blob),
            "dump_s": dumped, "load_s": loaded, "example": name}


def folder_report(count: int) -> str:
    load = OtherLoad()
    results = {}
    for kind in ("list", "packed"):
        command = [sys.executable, __file__, "--child", f"folder-{kind}", "--folder", str(count)]
        results[kind] = json.loads(subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout)
    lst, packed = results["list"], results["packed"]
    assert lst["example"] == packed["example"], "both hold the same paths"
    rows = [f"image-folder catalog listing: {count:,} synthetic relative paths of 32 bytes",
            f"{'':34}{'list of str':>14}{'packed':>14}{'ratio':>9}   at 99.2M images (packed | list)"]
    for label, key, scale in (("resident bytes per image (RSS)", "rss_bytes", count),
                              ("pickle for a worker, bytes/image", "pickle_bytes", count),
                              ("pickle dump (s)", "dump_s", 1), ("pickle load (s)", "load_s", 1)):
        a, b = lst[key] / scale, packed[key] / scale
        extra = f"   {b * FULL / 1e9:.1f} GB | {a * FULL / 1e9:.1f} GB" if scale != 1 else ""
        rows.append(f"{label:34}{a:14.3f}{b:14.3f}{a / max(b, 1e-9):9.1f}{extra}")
    cores = load.cores()
    if cores is not None:
        rows.append(f"other processes used {cores:.1f} cores meanwhile (the machine is shared; timings are noisy)")
    return "\n".join(rows)


def run_children(kind: str, metadata: Path, index_dir: Path, ranks: int) -> list[dict]:
    start_at = time.time() + 1.5
    command = [sys.executable, __file__, "--child", kind, "--metadata", str(metadata),
               "--index-dir", str(index_dir), "--start-at", str(start_at)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(ranks)]
    results = []
    for process in processes:
        out, _ = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"child {kind} failed ({process.returncode})")
        results.append(json.loads(out))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp"), help="where the synthetic file goes")
    parser.add_argument("--keep", action="store_true", help="keep the generated file and index")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--folder", type=int, metavar="N",
                        help="measure the image-folder catalog's listing of N paths instead")
    parser.add_argument("--child", choices=["list", "index", "folder-list", "folder-packed"], help=argparse.SUPPRESS)
    parser.add_argument("--metadata", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--index-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.child.startswith("folder-"):
        print(json.dumps(folder_child(args.child[len("folder-"):], args.folder)))
        return
    if args.folder:
        print(folder_report(args.folder))
        return
    if args.child:
        print(json.dumps(child(args.child, args.metadata, args.index_dir, args.start_at)))
        return

    from terabrain.data.yfcc import YFCCFilter
    from terabrain.data.yfcc_index import YFCCIndex, write_selection
    from terabrain.data.yfcc_index_build import build_index, default_index_path

    load = OtherLoad()
    work = args.dir / f"terabrain-bench-catalog-{args.lines}"
    work.mkdir(parents=True, exist_ok=True)
    metadata = work / "yfcc100m_dataset"
    report: dict = {"lines": args.lines}
    try:
        began = time.perf_counter()
        generate(metadata, args.lines)
        report["generate_s"] = time.perf_counter() - began
        report["metadata_bytes"] = metadata.stat().st_size

        # Today's catalog: a list of path strings parsed from the whole file by every rank.
        listed = run_children("list", metadata, work, 1)[0]
        report["list"] = listed

        # The index: built with 1 and with 2 workers (the same bytes either way).
        builds = {}
        for workers in (1, 2):
            target = work / f"w{workers}" / default_index_path(metadata).name
            target.parent.mkdir(exist_ok=True)
            began = time.perf_counter()
            build_index(metadata, target, workers)
            builds[workers] = time.perf_counter() - began
        one, two = (work / f"w{w}" / default_index_path(metadata).name for w in (1, 2))
        identical = one.read_bytes() == two.read_bytes()
        index_dir = one.parent
        index = YFCCIndex(one)
        began = time.perf_counter()
        write_selection(index, YFCCFilter(**TAG_FILTER), "hash")
        filter_s = time.perf_counter() - began
        write_selection(index, YFCCFilter(**FILTER), "hash")
        index.close()
        began = time.perf_counter()  # the list catalog filters while it parses: time it the same way
        from terabrain.data.yfcc import select
        tag_list = len(select(metadata, YFCCFilter(**TAG_FILTER), "hash")[0])
        report["list_tag_filter_s"] = time.perf_counter() - began
        report["tag_filter_images"] = tag_list
        report["index"] = {
            "build_s": {str(w): s for w, s in builds.items()}, "identical_1_vs_2_workers": identical,
            "bytes": one.stat().st_size, "filter_s": filter_s, "filter_records_per_s": args.lines / filter_s,
            "open_1_rank": run_children("index", metadata, index_dir, 1)[0],
            "open_2_ranks": run_children("index", metadata, index_dir, 2),
        }
        report["other_load_cores"] = load.cores()
    finally:
        if not args.keep:
            for path in sorted(work.rglob("*"), reverse=True):
                path.unlink() if path.is_file() else path.rmdir()
            work.rmdir()
    print(json.dumps(report, indent=2) if args.json else describe(report))


def describe(r: dict) -> str:
    n, lst, idx = r["lines"], r["list"], r["index"]
    scale = FULL / n
    one, two = idx["open_1_rank"], idx["open_2_ranks"]
    def per(value, images):
        return value / max(1, images)

    rows = [
        (f"synthetic YFCC100M metadata: {n:,} lines, {r['metadata_bytes'] / 1e6:.0f} MB "
        f"(generated in {r['generate_s']:.1f} s); opened with {FILTER}: {idx['open_1_rank']['images']:,} images"),
        "",
        f"{'':38}{'list catalog':>16}{'index':>16}{'ratio':>9}   at 99.2M images (index | list)",
        (f"{'build / parse, 1 worker (s)':38}{lst['open_s']:16.2f}{idx['build_s']['1']:16.2f}"
        f"{lst['open_s'] / idx['build_s']['1']:9.2f}   {idx['build_s']['1'] * scale / 60:.1f} min | "
        f"{lst['open_s'] * scale / 60:.1f} min per rank"),
        (f"{'build, 2 workers (s)':38}{'':16}{idx['build_s']['2']:16.2f}{'':9}   "
        f"{idx['build_s']['2'] * scale / 60:.1f} min (byte-identical to 1 worker: {idx['identical_1_vs_2_workers']})"),
        f"{'index bytes (per line)':38}{'':16}{per(idx['bytes'], n):16.1f}{'':9}   {idx['bytes'] * scale / 1e9:.1f} GB",
        (f"{'tag filter throughput (records/s)':38}{n / r['list_tag_filter_s']:16,.0f}"
        f"{idx['filter_records_per_s']:16,.0f}"
        f"{idx['filter_records_per_s'] / (n / r['list_tag_filter_s']):9.1f}   {FULL / idx['filter_records_per_s']:.1f} s | "
        f"{FULL * r['list_tag_filter_s'] / n / 60:.1f} min  ({r['tag_filter_images']:,} images kept)"),
        f"{'open (s)':38}{lst['open_s']:16.3f}{one['open_s']:16.4f}{lst['open_s'] / one['open_s']:9.0f}",
        (f"{'time to first batch of 192 paths (s)':38}{lst['first_batch_s']:16.3f}{one['first_batch_s']:16.4f}"
        f"{lst['first_batch_s'] / one['first_batch_s']:9.0f}   (the index's first batch maps "
        f"{one['first_batch_rss_bytes'] / 1e6:.1f} MB of pages: a few kernel fault-around windows per path, bounded by the batch, not by N)"),
        (f"{'resident bytes per image, 1 rank (RSS)':38}{per(lst['rss_bytes'], lst['images']):16.1f}"
        f"{per(one['rss_bytes'], one['images']):16.2f}"
        f"{per(lst['rss_bytes'], lst['images']) / max(per(one['rss_bytes'], one['images']), 1e-9):9.0f}   "
        f"{per(one['rss_bytes'], one['images']) * FULL / 1e9:.2f} GB | "
        f"{per(lst['rss_bytes'], lst['images']) * FULL / 1e9:.1f} GB per rank"),
    ]
    for rank, result in enumerate(two):
        rows.append(f"{f'resident per image, rank {rank} of 2 (RSS/PSS)':38}{'':16}"
                    f"{per(result['rss_bytes'], result['images']):8.2f}/{per(result['pss_bytes'], result['images']):<7.2f}")
    rows.append("after reading every image's path once (an epoch): the index's mapped pages (shared,")
    rows.append("clean, evictable page cache; RSS/PSS) and the rank's private memory, per image")
    for name, result in [("1 rank", one)] + [(f"rank {r} of 2", x) for r, x in enumerate(two)]:
        rows.append(f"{f'  {name}':38}{'':16}"
                    f"{per(result['epoch_rss_bytes'], result['images']):8.2f}/"
                    f"{per(result['epoch_pss_bytes'], result['images']):<7.2f} private "
                    f"{per(result['epoch_anonymous_bytes'], result['images']):.2f}")
    load = r.get("other_load_cores")
    rows += ["", f"other processes used {load:.1f} cores meanwhile (the machine is shared; timings are noisy)"
             if load is not None else ""]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
