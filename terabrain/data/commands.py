"""The ``terabrain data`` sub-commands (pack, stats, index); cli.py only registers them."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def register(commands) -> None:
    data = commands.add_parser("data", help="pack image folders into tar shards; inspect collections")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    pack = sub.add_parser(
        "pack", help="write an image folder as tar shards with an index and SHA-256 checksums",
        description="terabrain data pack photos/ shards/ --shard-size 1GB\n"
                    "terabrain data pack photos/ shards-300-grey/ --decode --crop-size 300 --grey",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pack.add_argument("source", type=Path, metavar="SRC", help="a folder of images (recursive)")
    pack.add_argument("dest", type=Path, metavar="DEST", help="a new directory for the shards")
    pack.add_argument("--shard-size", default="1GB", metavar="SIZE", help="bytes of members per shard (default 1GB; tar's end padding adds <= 10 KiB)")
    pack.add_argument("--workers", type=int, default=4, help="threads decoding images to check them")
    decoded = pack.add_argument_group(
        "pre-decoded shards", "store each image decoded and preprocessed (uint8 .npy members),\n"
        "as data.crop_size / data.image_size / data.color would: training then reads pixels\n"
        "and decodes no JPEG; it must ask for the same colour mode and at most the same side")
    decoded.add_argument("--decode", action="store_true", help="write pre-decoded members")
    decoded.add_argument("--crop-size", type=int, default=None, metavar="N",
                         help="as data.crop_size: smaller side scaled to N, centre N x N kept (default 300)")
    decoded.add_argument("--image-size", type=int, default=None, metavar="N",
                         help="as data.image_size: the crop resized to N x N (default: none)")
    mode = decoded.add_mutually_exclusive_group()
    mode.add_argument("--grey", "--gray", dest="color", action="store_false", default=None,
                      help="as data.color false (the default)")
    mode.add_argument("--colour", "--color", dest="color", action="store_true",
                      help="as data.color true: RGB")
    pack.set_defaults(handler=run_pack)
    stats = sub.add_parser(
        "stats", help="counts, sizes, image dimensions, unreadable files and checksums",
        description="terabrain data stats shards/   (exit 1 when a checksum differs)",
    )
    stats.add_argument("dest", type=Path, metavar="DEST", help="shards (packed or not), one .tar, or a folder")
    stats.add_argument("--no-verify", action="store_true", help="skip checking shard checksums")
    stats.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    stats.add_argument("--workers", type=int, default=4)
    stats.add_argument("--json", action="store_true", help="print the report as JSON")
    stats.set_defaults(handler=run_stats)
    index = sub.add_parser(
        "index", help="build the catalog index of a YFCC100M metadata file (training maps it)",
        description="terabrain data index /data/yfcc100m_dataset.bz2 --workers 8\n"
                    "terabrain data index /data/yfcc100m_dataset --out /local/nvme/$USER\n\n"
                    "Writes <file>.tbindex beside the file (or in --out). Training with\n"
                    "data.metadata set to the file uses it (data.index_dir names --out).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    index.add_argument("metadata", type=Path, metavar="METADATA",
                       help="a YFCC100M metadata file (23 or 25 columns; plain, .bz2 or .gz)")
    index.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help="directory for the index (default: beside the file)")
    index.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="parsing processes (default: the CPU count); the index is the same for any")
    index.add_argument("--force", action="store_true", help="rebuild even if a matching index exists")
    index.set_defaults(handler=run_index)


def run_pack(args: argparse.Namespace) -> int:
    from terabrain.data.pack import pack
    from terabrain.units import parse_memory

    pack(args.source, args.dest, parse_memory(args.shard_size, "--shard-size"), args.workers,
         decode=_decode_spec(args))
    return 0


def _decode_spec(args: argparse.Namespace):
    from terabrain.data.decode import ImageSpec
    from terabrain.errors import ConfigError

    given = [flag for flag, value in (("--crop-size", args.crop_size), ("--image-size", args.image_size),
                                      ("--grey/--colour", args.color)) if value is not None]
    if not args.decode:
        if given:
            raise ConfigError(f"{given[0]}: only with --decode (it sets how images are pre-decoded)")
        return None
    for flag, value in (("--crop-size", args.crop_size), ("--image-size", args.image_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: got {value}; allowed: a positive number of pixels")
    return ImageSpec(args.crop_size or 300, args.image_size, bool(args.color))


def run_stats(args: argparse.Namespace) -> int:
    from terabrain.data.pack import format_stats, stats

    result = stats(args.dest, verify=not args.no_verify, decode=not args.no_decode, workers=args.workers)
    print(json.dumps(result, indent=2) if args.json else format_stats(result))
    return 1 if result.get("checksums", {}).get("mismatched") else 0


def run_index(args: argparse.Namespace) -> int:
    from terabrain.data.yfcc_index import YFCCIndex, matches
    from terabrain.data.yfcc_index_build import build_index, default_index_path
    from terabrain.errors import ConfigError

    if not args.metadata.is_file():
        raise ConfigError(f"METADATA: not a file: {args.metadata} (a YFCC100M metadata file; "
                          "image folders and shard packs are not indexed)")
    if args.workers < 1:
        raise ConfigError(f"--workers: got {args.workers}; allowed: 1 or more")
    if args.out is not None and not args.out.is_dir():
        raise ConfigError(f"--out: not a directory: {args.out}")
    target = default_index_path(args.metadata, args.out)
    reused = False
    if target.exists() and not args.force:
        try:
            existing = YFCCIndex(target)
            reused = matches(existing, args.metadata)
            existing.close()
        except ValueError:
            pass
    began = time.monotonic()
    if not reused:
        try:
            build_index(args.metadata, target, args.workers)
        except OSError as error:
            raise ConfigError(f"--out: cannot write {target}: {error}") from None
    index = YFCCIndex(target)
    sections = index.header["sections"]
    print(f"{target}: {'up to date, reused' if reused else f'built in {time.monotonic() - began:.1f} s'}\n"
          f"  {index.records} records (lines of 23 or 25 columns), "
          f"{sections['bad_lines']['shape'][0]} lines with another column count\n"
          f"  {index.header['tags']} distinct tags, {target.stat().st_size} bytes "
          f"({target.stat().st_size / max(1, index.records):.1f} per record)\n"
          f"  source checksum {index.checksum}")
    index.close()
    return 0
