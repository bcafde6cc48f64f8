"""The ``tvmlayers`` command line: ``targets``, ``cache ls``, ``cache clear``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .cache import KernelCache
from .targets import PRESETS, resolve_target, target_json, target_key


def _targets(args: argparse.Namespace) -> int:
    for name, (description, _) in PRESETS.items():
        target = resolve_target(name)
        print(f"{name:8} {target_key(target)}")
        print(f"         {description}")
        if args.verbose:
            print(f"         {json.dumps(target_json(target))}")
    print("\nAlso accepted: any TVM target tag (e.g. raspberry-pi/4b-aarch64), a target dict, or a tvm.target.Target.")
    return 0


def _cache_ls(args: argparse.Namespace) -> int:
    cache = KernelCache(args.cache_dir)
    entries = cache.entries()
    print(f"{cache.kernels_dir}: {len(entries)} kernel(s)")
    for entry in entries:
        m = entry.manifest
        spec, provenance = m["spec"], m["provenance"]
        shape = "x".join(str(d) for d in spec["input_shape"])
        source = provenance.get("rule", "") if provenance["source"] == "default" else provenance["source"]
        print(
            f"{entry.key[:12]}  {spec['op']:10} {shape:18} {spec['dtype']:8} {source:22} {m['so_size'] / 1024:7.1f} KiB"
        )
    return 0


def _cache_clear(args: argparse.Namespace) -> int:
    cache = KernelCache(args.cache_dir)
    print(f"removed {cache.clear()} kernel(s) from {cache.kernels_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tvmlayers", description="torch layers compiled by Apache TVM")
    commands = parser.add_subparsers(dest="command", required=True)
    targets = commands.add_parser("targets", help="list the named target presets")
    targets.add_argument("-v", "--verbose", action="store_true", help="print each target's full JSON")
    targets.set_defaults(run=_targets)
    cache = commands.add_parser("cache", help="inspect or clear the compiled-kernel cache")
    cache.add_argument("--cache-dir", default=None, help="default: $TVMLAYERS_CACHE_DIR or ~/.cache/tvmlayers")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    cache_commands.add_parser("ls", help="list cached kernels").set_defaults(run=_cache_ls)
    cache_commands.add_parser("clear", help="remove every cached kernel").set_defaults(run=_cache_clear)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
