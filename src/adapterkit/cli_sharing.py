"""``adapterkit push / pull / ls / cache``: publishing adapters and the local cache of fetched ones
(the library side is ``adapterkit.sharing``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .errors import AdapterError
from .sharing import cache, is_remote, ls, pull, push

LOCATIONS = "a folder, file://, s3://BUCKET/PREFIX, http(s)://... (read only) or hf://OWNER/REPO[@REV][/SUBFOLDER]"


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("push", help="publish an adapter (with a manifest and a model card) to a location",
                       description=f"Publish DIR (an adapter folder or a run folder) at LOCATION: {LOCATIONS}.")
    p.add_argument("dir", help="adapter folder (adapterkit, PEFT or AdapterHub) or run folder (--out of train)")
    p.add_argument("location", help=LOCATIONS)
    p.add_argument("--overwrite", action="store_true", help="replace an adapter published there before")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("pull", help="fetch a published adapter into the local cache and print its folder")
    p.add_argument("location", help=LOCATIONS)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("ls", help="list the published adapters at a location (base, method, size, date)")
    p.add_argument("location", help=LOCATIONS)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("cache", help="the local cache of fetched adapters ($ADAPTERKIT_CACHE, ~/.cache/adapterkit)")
    csub = p.add_subparsers(dest="cache_command", metavar="ACTION", parser_class=sub._parser_class)
    csub.required = True
    q = csub.add_parser("ls", help="list the cached adapters")
    q.add_argument("--json", action="store_true")
    q = csub.add_parser("rm", help="remove a cached adapter by key (prefix) or location")
    q.add_argument("what", help="a key from adapterkit cache ls (6+ characters), or the location it was fetched from")
    q = csub.add_parser("prune", help="remove interrupted downloads, damaged entries and (--older-than) old ones")
    q.add_argument("--older-than", type=float, metavar="DAYS", help="also remove adapters not fetched for DAYS days")


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def cmd_push(args: argparse.Namespace) -> int:
    info = push(args.dir, args.location, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"published {info.get('name') or args.dir} ({info.get('method')}, {info.get('format')}, "
              f"{info['files']} files, {_size(info['size'])}) to {args.location}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    if not is_remote(args.location):
        raise AdapterError(f"{args.location} is local already; pull fetches s3://, http(s):// and hf:// locations.")
    fetched = pull(args.location)
    if args.json:
        print(json.dumps({"location": args.location, "path": str(fetched.folder), "key": fetched.key,
                          "cached": fetched.hit}))
    else:
        print(fetched.folder)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    rows = ls(args.location)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no published adapters at {args.location}")
        return 0
    for r in rows:
        print(f"{r['location']}\t{r['name']}\tbase={r['base']}\t{r['method']}\t{_size(r['size'])}\t{r['created']}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    if args.cache_command == "ls":
        rows = cache.entries()
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print(f"the cache ({cache.cache_root()}) is empty")
        for r in rows if not args.json else []:
            print(f"{r['key'][:12]}\t{_size(r['size'])}\t{r['fetched']}\t{', '.join(r['locations']) or '-'}")
        return 0
    if args.cache_command == "rm":
        for key in cache.remove(args.what):
            print(f"removed {key}")
        return 0
    removed = cache.prune(older_than_days=args.older_than)
    print(f"removed {removed['partial']} interrupted downloads, {removed['damaged']} damaged and {removed['old']} old "
          "adapters")
    return 0


COMMANDS = {"push": cmd_push, "pull": cmd_pull, "ls": cmd_ls, "cache": cmd_cache}
