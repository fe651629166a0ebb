"""The ``terabrain data`` sub-commands (pack, stats); cli.py only registers them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(commands) -> None:
    data = commands.add_parser("data", help="pack image folders into tar shards; inspect collections")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    pack = sub.add_parser(
        "pack", help="write an image folder as tar shards with an index and SHA-256 checksums",
        description="terabrain data pack photos/ shards/ --shard-size 1GB",
    )
    pack.add_argument("source", type=Path, metavar="SRC", help="a folder of images (recursive)")
    pack.add_argument("dest", type=Path, metavar="DEST", help="a new directory for the shards")
    pack.add_argument("--shard-size", default="1GB", metavar="SIZE", help="bytes of members per shard (default 1GB; tar's end padding adds <= 10 KiB)")
    pack.add_argument("--workers", type=int, default=4, help="threads decoding images to check them")
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


def run_pack(args: argparse.Namespace) -> int:
    from terabrain.data.pack import pack
    from terabrain.plan import parse_memory

    pack(args.source, args.dest, parse_memory(args.shard_size, "--shard-size"), args.workers)
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from terabrain.data.pack import format_stats, stats

    result = stats(args.dest, verify=not args.no_verify, decode=not args.no_decode, workers=args.workers)
    print(json.dumps(result, indent=2) if args.json else format_stats(result))
    return 1 if result.get("checksums", {}).get("mismatched") else 0
