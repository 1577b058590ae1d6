"""`item export`: arguments -> export_bundle (reached through the `item` command)."""

from __future__ import annotations

import argparse
import shlex
import sys

from .models import DEFAULT_SOURCES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="bundle folder to write, e.g. engines/item-base")
    for kind, default in DEFAULT_SOURCES.items():
        p.add_argument(f"--{kind}", default=None, help=f"local model folder or cached repo id (default {default})")
    p.add_argument("--random-init", choices=["tiny", "full"], default=None,
                   help="build the same architectures with seeded random weights instead (tests, benchmarks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--max-objects", type=int, default=4)
    p.add_argument("--det-threshold", type=float, default=0.1)
    p.add_argument("--precisions", nargs="*", choices=["int8", "fp16"], default=["int8"],
                   help="reduced-precision variants to make and gate (default: int8; fp16 is for GPUs; "
                        "none: give the flag alone)")
    p.add_argument("--parity-images", nargs="+", default=None, help="images for the parity checks (default: samples)")


def run(args: argparse.Namespace) -> int:
    try:
        from .pipeline import export_bundle
    except ImportError as e:  # the lean runtime install has no torch
        print(f"item export needs the export extra: pip install 'itemrt[export]' ({e})", file=sys.stderr)
        return 2

    sources = {k: getattr(args, k) for k in DEFAULT_SOURCES if getattr(args, k)}
    if args.random_init and sources:
        raise SystemExit("--random-init builds its own models; drop the model folder arguments")
    export_bundle(
        args.out,
        sources=sources,
        random_init=args.random_init,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        max_objects=args.max_objects,
        det_threshold=args.det_threshold,
        precisions=tuple(args.precisions),
        parity_images=args.parity_images,
        command="item " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        progress=lambda msg: print(f"[export] {msg}", file=sys.stderr, flush=True),
    )
    return 0
