"""python -m lora_ext {demo,inspect,...}: the headless front door. Thin: parses arguments and calls the
library; bad input exits with code 2 and a message, never a traceback."""
from __future__ import annotations

import argparse
import json
import sys


class UsageError(Exception):
    """Bad input from the command line; printed without a traceback, exit code 2."""


def cmd_inspect(args) -> int:
    from .describe import describe

    arch = _arch_of(args.model) if args.model else None
    print(json.dumps(describe(args.file, arch), indent=2, sort_keys=False))
    return 0


def _arch_of(name: str):
    from . import naming

    if name in naming.STANDARD:
        return naming.STANDARD[name]
    if name.startswith("tiny-"):
        from .testing import tiny
        return naming.arch_from_model(tiny.build(name.removeprefix("tiny-")))
    raise UsageError(f"--model {name!r}: give sd1, sd2, sdxl, or tiny-sd1/tiny-sd2/tiny-sdxl")


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_ext", description="Train, apply and merge LoRA networks.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="build a tiny model, make a LoRA for it and inspect it")
    d.add_argument("--out", default="demo_out", help="folder for the demo's files (default: demo_out)")
    d.set_defaults(func=cmd_demo)
    i = sub.add_parser("inspect", help="print what a LoRA file holds, as JSON")
    i.add_argument("file")
    i.add_argument("--model", help="architecture the file is for: sd1, sd2, sdxl (default: detected)")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv=None) -> int:
    from .files import LoraFileError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, LoraFileError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
