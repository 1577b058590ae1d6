"""`item export`, `item train`, `item calibrate`, `item eval`: arguments -> the export-side
functions (reached through the `item` command; torch is imported only when one runs)."""

from __future__ import annotations

import argparse
import shlex
import sys

from itemrt.argtypes import COUNT, FRACTION, number
from itemrt.datasets.perturb import argument as perturbation_argument

from .models import DEFAULT_SOURCES

TARGET_FPR = number(0, 1, high_open=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="bundle folder to write, e.g. engines/item-base")
    for kind, default in DEFAULT_SOURCES.items():
        also = "; an open_clip folder works too" if kind == "clip" else ""
        p.add_argument(f"--{kind}", default=None, help=f"local model folder, or cached repo id [@revision] (default {default}){also}")
    p.add_argument("--random-init", choices=["tiny", "full"], default=None,
                   help="build the same architectures with seeded random weights instead (tests, benchmarks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=COUNT, default=20)
    p.add_argument("--max-objects", type=COUNT, default=4)
    p.add_argument("--det-threshold", type=FRACTION, default=0.1)
    p.add_argument("--precisions", nargs="*", choices=["int8", "fp16", "bf16"], default=["int8"],
                   help="reduced-precision variants to make and gate (default: int8; fp16 is for GPUs; bf16 "
                        "for CPUs with AMX or AVX512-BF16, run by OpenVINO; int8 and bf16 together also gate precision "
                        "mixed; none: give the flag alone)")
    p.add_argument("--parity-images", nargs="+", default=None, help="images for the parity checks (default: samples)")


def _need_extra(cmd: str, e: ImportError) -> int:
    # The lean runtime install has no torch / matplotlib.
    print(f"item {cmd} needs the export extra: pip install 'itemrt[export]' ({e})", file=sys.stderr)
    return 2


def _command() -> str:
    return "item " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _log(prefix: str):
    """Progress to stderr, tagged with the command unless the line already names it."""
    return lambda msg: print(msg if msg.startswith(f"{prefix}:") else f"[{prefix}] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        from .pipeline import export_bundle
    except ImportError as e:
        return _need_extra("export", e)

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
        command=_command(),
        progress=_log("export"),
    )
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from itemrt.stages.recipe import RECIPES

    p.add_argument("features", help="feature store made by `item features` with this bundle")
    p.add_argument("--bundle", "-b", required=True, help="bundle to install the trained head into")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="item-v1",
                   help="item-v1: global and local by concatenation; -sum: by sum; -global / -local: ablations")
    p.add_argument("--hidden", type=COUNT, nargs="*", default=[512, 128], help="hidden widths (none: logistic regression)")
    p.add_argument("--dropout", type=number(0, 1, high_open=True), default=0.1)
    p.add_argument("--lr", type=number(0, low_open=True), default=1e-3)
    p.add_argument("--weight-decay", type=number(0), default=1e-2)
    p.add_argument("--batch-size", type=COUNT, default=64)
    p.add_argument("--max-epochs", type=COUNT, default=200)
    p.add_argument("--patience", type=COUNT, default=20, help="epochs without a better validation AP before stopping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-fpr", type=TARGET_FPR, default=None,
                   help="pick the threshold for this false positive rate on validation reals (default: 0.5)")


def run_train(args: argparse.Namespace) -> int:
    try:
        from .train import TrainConfig, train
    except ImportError as e:
        return _need_extra("train", e)
    cfg = TrainConfig(recipe=args.recipe, hidden=list(args.hidden), dropout=args.dropout, lr=args.lr,
                      weight_decay=args.weight_decay, batch_size=args.batch_size, max_epochs=args.max_epochs,
                      patience=args.patience, seed=args.seed, target_fpr=args.target_fpr)
    train(args.features, args.bundle, cfg, command=_command(), progress=_log("train"))
    return 0


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("features", help="feature store made by `item features` with this bundle (its val split is used)")
    p.add_argument("--bundle", "-b", required=True)
    p.add_argument("--target-fpr", type=TARGET_FPR, required=True, help="false positive rate on real images, e.g. 0.01")


def run_calibrate(args: argparse.Namespace) -> int:
    try:
        from .train import calibrate
    except ImportError as e:
        return _need_extra("calibrate", e)
    calibrate(args.features, args.bundle, args.target_fpr, progress=_log("calibrate"))
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("features", help="feature store made by `item features` with this bundle")
    p.add_argument("--bundle", "-b", required=True)
    p.add_argument("--out", required=True, help="folder for eval.md, eval.json, roc.png, pr.png")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--robustness", nargs="*", type=perturbation_argument, default=[], metavar="SPEC",
                   help="re-run the chain on perturbed images: jpeg=QUALITY, blur=SIGMA, scale=FACTOR")
    p.add_argument("--batch-size", type=COUNT, default=1)


def run_eval(args: argparse.Namespace) -> int:
    try:
        from .evaluate import evaluate
    except ImportError as e:
        return _need_extra("eval", e)
    evaluate(args.features, args.bundle, args.out, split=args.split, robustness=args.robustness,
             batch_size=args.batch_size, progress=_log("eval"))
    return 0
