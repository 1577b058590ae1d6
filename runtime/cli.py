"""The `item` command: export, build, detect, info, serve, watch, features, train, calibrate, eval, demo, doctor."""

from __future__ import annotations

import argparse
import codecs
import json
import os
import shutil
import signal
import sys
import textwrap
import threading
from pathlib import Path

from .argtypes import COUNT, FRACTION, PORT, SECONDS, THREADS, integer, number
from .backends import BACKENDS
from .bundle import PRECISIONS
from .datasets.dataset import DEFAULT_RATIOS, IMAGE_SUFFIXES
from .datasets.perturb import argument as perturbation_argument
from .errors import (
    BundleError,
    BundleIntegrityError,
    BundleNotFoundError,
    ImageError,
    ItemError,
    PathError,
    UnsupportedImageError,
)
from .gateways.watch import SETTLE_S
from .samples import images as sample_images

BACKEND_HELP = ("onnxruntime (CPU), ort-cuda / ort-tensorrt (ONNX Runtime's GPU providers), "
                "tensorrt (plans from `item build`)")


def build_parser() -> argparse.ArgumentParser:
    """The `item` command line (the README's commands are checked against it)."""
    p = argparse.ArgumentParser(prog="item", description="ITEM-RT: fake-image detection by image-text misalignment")
    sub = p.add_subparsers(dest="cmd", required=True)

    from itemrt.export import cli as export_cli  # torch is imported only when one of these runs

    e = sub.add_parser("export", help="export frozen models to a bundle (needs the [export] extra)")
    export_cli.add_arguments(e)
    e.set_defaults(func=export_cli.run)

    d = sub.add_parser("detect", help="p(fake), caption and object words for images")
    d.add_argument("paths", nargs="+", type=Path,
                   help="image files, folders (the images directly in them), or - for an image on stdin")
    d.add_argument("--bundle", "-b", default=os.environ.get("ITEM_BUNDLE"), help="bundle folder (or $ITEM_BUNDLE)")
    d.add_argument("--json", action="store_true", help="one JSON object per line")
    d.add_argument("--explain", type=Path, default=None,
                   help="PNG with boxes, words, distances and the verdict (a folder when several images)")
    d.add_argument("--threads", type=THREADS, default=0)
    d.add_argument("--batch-size", type=COUNT, default=1,
                   help="images per detect_batch call (more images/s, more memory; timings are then per batch)")
    d.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="graphs to run (default: the bundle's; a variant only where its gate passed at export)")
    d.add_argument("--backend", choices=BACKENDS, default="onnxruntime", help=BACKEND_HELP)
    _provenance_arguments(d)
    d.set_defaults(func=_detect)

    wd = sub.add_parser("words", help="which object words a caption yields, and why (docs/words.md)")
    wd.add_argument("captions", nargs="+", metavar="CAPTION",
                    help='a caption in quotes; "-" reads captions from stdin, one a line')
    wd.add_argument("--bundle", help="use this bundle's vocabulary and cap (default: the shipped vocabulary, cap 4)")
    wd.add_argument("--max-objects", type=COUNT, help="words a caption at most (default: the bundle's, else 4)")
    wd.add_argument("--json", action="store_true", help="one JSON object a caption")
    wd.set_defaults(func=_words)

    i = sub.add_parser("info", help="what a bundle holds and where it came from")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true", help="print the whole manifest")
    i.set_defaults(func=_info)

    s = sub.add_parser("serve", help="HTTP service for upload gateways (needs the [serve] extra)")
    s.add_argument("bundle")
    s.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1; 0.0.0.0 to listen on every interface")
    s.add_argument("--port", type=PORT, default=8080)
    s.add_argument("--token-file", default=None,
                   help="bearer token file (default: $ITEM_SERVE_TOKEN; neither: no auth)")
    s.add_argument("--precision", choices=PRECISIONS, default=None)
    s.add_argument("--backend", choices=BACKENDS, default="onnxruntime", help=BACKEND_HELP)
    s.add_argument("--threads", type=THREADS, default=0)
    s.add_argument("--max-batch", type=COUNT, default=4, help="images per batch; 1 turns micro-batching off")
    s.add_argument("--max-wait-ms", type=number(0), default=10.0)
    s.add_argument("--max-in-flight", type=COUNT, default=32, help="images admitted at once; beyond: 429")
    s.add_argument("--decode-budget-mp", type=number(1), default=128,
                   help="megapixels being decoded at once, all requests together (bounds decoding memory); "
                        "a pixel of a format that costs more to decode (WebP, AVIF) weighs more")
    s.add_argument("--timeout-s", type=SECONDS, default=60.0)
    s.add_argument("--max-upload-mb", type=number(0, low_open=True), default=20.0)
    s.add_argument("--max-uploads", type=COUNT, default=32,
                   help="request bodies received at once (bounds their memory); beyond: 429")
    s.add_argument("--upload-timeout-s", type=SECONDS, default=30.0, help="to receive one body; beyond: 408")
    s.add_argument("--header-timeout-s", type=SECONDS, default=20.0,
                   help="to receive a request's line and headers; beyond: 408 and the connection closed")
    s.add_argument("--log-level", default="info")
    _provenance_arguments(s)
    s.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process, under uvicorn; ray: Ray Serve replicas (the [ray] extra; docs/ray.md)")
    r = _ray_arguments(s, "Detector replica")
    r.add_argument("--replicas", type=COUNT, default=1, help="Detector replicas, one Runtime each")
    r.add_argument("--min-replicas", type=COUNT, default=None, help="with --max-replicas: autoscale between them")
    r.add_argument("--max-replicas", type=COUNT, default=None)
    r.add_argument("--ingress-replicas", type=COUNT, default=1, help="gateways in front of the replicas")
    r.add_argument("--ingress-num-cpus", type=number(0), default=0.25)
    r.add_argument("--retries", type=integer(0), default=2,
                   help="sends of an image to another replica when its replica dies mid-request")
    r.add_argument("--app-name", default="itemrt")
    r.add_argument("--detach", action="store_true", help="deploy and return, the app stays up (needs --address)")
    r.add_argument("--write-config", type=Path, default=None, metavar="FILE",
                   help="write the Serve config YAML (serve deploy FILE, KubeRay) and exit")
    s.set_defaults(func=_serve)

    w = sub.add_parser("watch", help="process every new image dropped into a folder, once",
                       description="A file is read once it is complete: its size and mtime unchanged for --settle "
                                   "seconds. Hidden files and *.part, *.tmp, *.partial, *.crdownload files are never "
                                   "read: write under such a name and rename when done. A link is followed only to a "
                                   "regular file inside FOLDER unless --follow-links.")
    w.add_argument("folder", type=Path)
    w.add_argument("--bundle", "-b", default=os.environ.get("ITEM_BUNDLE"), help="bundle folder (or $ITEM_BUNDLE)")
    w.add_argument("--out", type=Path, required=True, help="results, one JSON line per image (also the ledger)")
    w.add_argument("--quarantine", type=Path, default=None, help="default: FOLDER/quarantine")
    w.add_argument("--interval", type=SECONDS, default=1.0, help="seconds between looks")
    w.add_argument("--settle", type=number(0), default=SETTLE_S, metavar="SECONDS",
                   help="a file is read once its size and mtime stayed the same this long (default 5; "
                        "longer than the longest pause of a writer between chunks)")
    w.add_argument("--follow-links", action="store_true",
                   help="also follow links to files outside FOLDER (default: only to regular files inside it; "
                        "others are skipped and reported once)")
    w.add_argument("--recursive", "-r", action="store_true",
                   help="also the images in subfolders (not the quarantine folder, hidden or linked ones)")
    w.add_argument("--once", action="store_true", help="stop when nothing new is left")
    w.add_argument("--precision", choices=PRECISIONS, default=None)
    w.add_argument("--backend", choices=BACKENDS, default="onnxruntime", help=BACKEND_HELP)
    _provenance_arguments(w)
    w.set_defaults(func=_watch)

    f = sub.add_parser("features", help="run the chain over a labelled dataset and store what the head learns from",
                       description="Datasets: a folder tree (real/ and fake/ folders, optional generator and "
                                   "train/val/test folders) or a CSV / JSONL manifest with path,label[,generator][,split]. "
                                   "Resumable: a rerun skips finished images and those listed in bad.jsonl.")
    f.add_argument("dataset", type=Path)
    f.add_argument("--bundle", "-b", default=os.environ.get("ITEM_BUNDLE"), help="bundle folder (or $ITEM_BUNDLE)")
    f.add_argument("--out", type=Path, required=True, help="feature store folder (created, or resumed)")
    f.add_argument("--precision", choices=PRECISIONS, default=None)
    f.add_argument("--backend", choices=BACKENDS, default="onnxruntime", help=BACKEND_HELP)
    f.add_argument("--threads", type=THREADS, default=0)
    f.add_argument("--batch-size", type=COUNT, default=1)
    f.add_argument("--split-ratios", type=FRACTION, nargs=3, default=list(DEFAULT_RATIOS), metavar=("TRAIN", "VAL", "TEST"),
                   help="for images without a split: assigned by a hash of the path (stable across runs)")
    f.add_argument("--perturb", type=perturbation_argument, default=None, metavar="SPEC", help="jpeg=Q, blur=SIGMA or scale=F applied before the chain")
    f.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: one Runtime here; ray: a Ray Data actor pool of runtimes (the [ray] extra; docs/ray.md)")
    r = _ray_arguments(f, "actor")
    r.add_argument("--actors", type=COUNT, default=None,
                   help="runtimes in the pool (default: Ray Data scales it to what the cluster holds)")
    f.set_defaults(func=_features)

    t = sub.add_parser("train", help="train the MLP head on stored features and install it (needs [export])")
    export_cli.add_train_arguments(t)
    t.set_defaults(func=export_cli.run_train)

    bd = sub.add_parser("build", help="TensorRT engines for this GPU from the bundle's graphs (needs TensorRT)")
    bd.add_argument("bundle")
    bd.add_argument("--precision", choices=["fp16", "fp32"], default="fp16",
                    help="fp16: each part's gated FP16 graph (FP32 where its gate failed); fp32: the exported graphs")
    bd.add_argument("--max-batch", type=COUNT, default=4, help="images per detect_batch call the engines accept")
    bd.add_argument("--opt-batch", type=COUNT, default=1, help="the batch TensorRT tunes kernels for")
    bd.add_argument("--workspace-gb", type=number(0, low_open=True), default=4.0)
    bd.set_defaults(func=_build)

    c = sub.add_parser("calibrate", help="re-pick the head's threshold for a target FPR on validation reals (needs [export])")
    export_cli.add_calibrate_arguments(c)
    c.set_defaults(func=export_cli.run_calibrate)

    v = sub.add_parser("eval", help="accuracy, AP, AUC per generator; ROC/PR curves; robustness sweeps (needs [export])")
    export_cli.add_eval_arguments(v)
    v.set_defaults(func=export_cli.run_eval)

    m = sub.add_parser("demo", help="export a tiny random-weight bundle (once) and detect on the sample images")
    m.add_argument("--bundle", default="engines/demo")
    m.add_argument("--explain-dir", type=Path, default=Path("engines/demo-explain"))
    m.set_defaults(func=_demo)

    from . import doctor

    dr = sub.add_parser("doctor", help="what this machine can run and why not: CPU features, ONNX Runtime, CUDA, "
                                       "cuDNN, TensorRT, JetPack; with a bundle, each graph's precision per backend")
    doctor.add_arguments(dr)
    dr.set_defaults(func=doctor.run)

    return p


def _ray_arguments(p: argparse.ArgumentParser, unit: str) -> argparse._ArgumentGroup:
    r = p.add_argument_group("with --engine ray (docs/ray.md)")
    r.add_argument("--address", default=None,
                   help="the Ray cluster: auto (the one `ray start` runs here) or HEAD:PORT; "
                        "default: a new one on this machine, on loopback, for this command only")
    r.add_argument("--num-cpus", type=number(0), default=1.0, help=f"Ray CPUs per {unit}")
    r.add_argument("--num-gpus", type=number(0), default=0.0, help=f"GPUs per {unit}; a fraction shares one")
    return r


def _provenance_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-anchors", type=Path, default=None, metavar="PEM",
                   help="C2PA signers' root certificates to trust (default: none, so a valid manifest is "
                        "reported untrusted; docs/provenance.md)")
    p.add_argument("--no-provenance", dest="provenance", action="store_false",
                   help="do not read what each file declares about its origin (C2PA, XMP, generators' marks)")


def _provenance_options(args) -> dict:
    return {"provenance": args.provenance, "trust_anchors": args.trust_anchors}


def _name_bytes(err: UnicodeError) -> tuple[str, int]:
    """An encoding error handler: a file name's bytes that are not UTF-8 (surrogate escapes) as
    \\xNN, the byte itself, like the watcher's progress; anything else as backslashreplace does."""
    if isinstance(err, UnicodeEncodeError):
        bad = err.object[err.start : err.end]
        if all(0xDC80 <= ord(c) <= 0xDCFF for c in bad):
            return "".join(f"\\x{ord(c) - 0xDC00:02x}" for c in bad), err.end
    return codecs.backslashreplace_errors(err)


NAME_BYTES = "itemrt.name_bytes"
codecs.register_error(NAME_BYTES, _name_bytes)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # the Ctrl-C path: work kept, temporary files removed


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    # SIGTERM (systemd, docker stop, kill) takes the Ctrl-C path. Not for `item serve`: uvicorn
    # drains requests on it, then re-raises it so a supervisor sees a signalled, clean stop.
    on_main = threading.current_thread() is threading.main_thread() and args.cmd != "serve"
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main else None
    # File names need not be UTF-8 (their odd bytes come as surrogate escapes): on a strict UTF-8
    # stream printing one raised UnicodeEncodeError; they are shown as \xff instead.
    streams = {s: s.errors for s in (sys.stdout, sys.stderr) if hasattr(s, "reconfigure")}
    for s in streams:
        s.reconfigure(errors=NAME_BYTES)
    try:
        rc = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return rc
    except KeyboardInterrupt:
        print(f"item {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except ItemError as err:
        print(f"item: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `item info B | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    finally:
        for s, errors in streams.items():
            try:
                s.reconfigure(errors=errors)  # flushes first: a reader gone is no news here
            except (OSError, ValueError):
                pass
        if on_main:
            signal.signal(signal.SIGTERM, previous)  # main() called from Python leaves no trace


def _detect(args) -> int:
    from .runtime import Runtime
    from .stages.explain import render

    if not args.bundle:
        print("item detect: give --bundle or set ITEM_BUNDLE", file=sys.stderr)
        return 2
    paths = _expand(args.paths)
    many = len(paths) > 1
    if args.explain:
        _check_explain(args.explain, folder=many or args.explain.suffix.lower() != ".png" or args.explain.is_dir())
    failures, written = 0, set()
    step = args.batch_size
    with Runtime(args.bundle, threads=args.threads, precision=args.precision, backend=args.backend,
                 max_batch=step, **_provenance_options(args)) as rt:  # a batch is one pass
        for start in range(0, len(paths), step):
            # decoded once, for the chain and the picture; a bad image is reported in its place
            loaded = [_load_for_detect(p, rt.image_limits) for p in paths[start : start + step]]
            good = [img for _, img in loaded if not isinstance(img, ImageError)]
            results = iter(rt.detect_batch(good) if good else [])
            for path, img in loaded:
                if isinstance(img, ImageError):
                    failures += 1
                    if args.json:
                        print(json.dumps({"path": str(path), "error": img.code, "message": str(img)}))
                    else:
                        print(f"{path}: error ({img.code}): {img}", file=sys.stderr)
                    continue
                r = next(results)
                if args.json:
                    print(json.dumps({"path": str(path), **r.to_dict()}))
                else:
                    _print_result(path, r)
                if args.explain:
                    target = _explain_target(args.explain, path, written)
                    render(img.image, r).save(target)
                    if not args.json:
                        print(f"  explain: {target}")
    return 1 if failures else 0


def _load_for_detect(path: Path, limits):
    """(path, LoadedImage: the RGB image and the file's bytes), or (path, the ImageError to report)."""
    from .stages.images import read_image

    try:
        if str(path) == "-":
            return path, read_image(sys.stdin.buffer, limits)
        if path.is_dir():  # a folder with no images in it
            raise UnsupportedImageError(f"{path} is a folder with no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return path, read_image(path, limits)
    except ImageError as err:
        return path, err


def _check_explain(explain: Path, folder: bool) -> None:
    """Before any image runs: the folder for the pictures, or the picture's folder."""
    from .paths import writable_folder

    try:
        writable_folder(explain if folder else explain.parent)
    except PathError as e:
        raise PathError(f"--explain: {e}") from None


def _explain_target(explain: Path, path: Path, written: set[Path]) -> Path:
    """The picture's file: `explain` itself, or STEM.explain.png in that folder; two inputs
    with one stem (a/x.jpg, b/x.png) get STEM-2, ... instead of overwriting each other."""
    from .gateways.watch import free_name

    if not explain.is_dir():
        return explain
    target = free_name(explain, path.stem, ".explain.png", written.__contains__)
    written.add(target)
    return target


def _expand(paths: list[Path]) -> list[Path]:
    """Folders stand for the images directly in them, in name order (an empty one stays, to
    be reported); files stand for themselves, whatever their name."""
    out = []
    for p in paths:
        found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else []
        out += found or [p]
    return out


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _build(args) -> int:
    from .backends.trt_plan import BuildSettings
    from .export.build import build_engines

    settings = BuildSettings(max_batch=args.max_batch, workspace_gb=args.workspace_gb, opt_batch=args.opt_batch)
    build_engines(args.bundle, settings, precision=args.precision, progress=_stderr)
    return 0


def _features(args) -> int:
    from .datasets.dataset import load_dataset
    from .datasets.features import extract
    from .runtime import Runtime

    if not args.bundle:
        print("item features: give --bundle or set ITEM_BUNDLE", file=sys.stderr)
        return 2
    samples = load_dataset(args.dataset, tuple(args.split_ratios))
    if args.engine == "ray":
        return _features_on_ray(args, samples)
    # a batch is one pass; the feature store keeps no provenance, so none is read
    with Runtime(args.bundle, threads=args.threads, precision=args.precision, backend=args.backend,
                 max_batch=args.batch_size, provenance=False) as rt:
        try:
            s = extract(rt, samples, args.out, perturbation=args.perturb or "", batch_size=args.batch_size,
                        dataset=str(args.dataset.resolve()), progress=_stderr)
        except KeyboardInterrupt:
            _stderr(f"item features: interrupted; finished images are kept in {args.out}, rerun to resume")
            return 130
    _features_done(s, args.out)
    return 0


def _features_on_ray(args, samples) -> int:
    from .ray_cluster import Cluster

    cluster = Cluster(args.address)  # before ray is imported
    try:
        from .datasets.ray_features import ChainSettings, RayFeatureOptions, features_command
    except ImportError as e:
        print(f"item features --engine ray needs the ray extra: pip install 'itemrt[ray]' ({e})", file=sys.stderr)
        return 2
    settings = ChainSettings(args.bundle, args.precision, args.backend, args.threads, args.batch_size,
                             args.perturb or "")
    options = RayFeatureOptions(args.actors, args.num_cpus, args.num_gpus)
    try:
        s = features_command(settings, samples, args.out, cluster=cluster, options=options,
                             dataset=str(args.dataset.resolve()), progress=_stderr)
    except KeyboardInterrupt:
        _stderr(f"item features: interrupted; finished images are kept in {args.out}, rerun to resume")
        return 130
    _features_done(s, args.out, " (on Ray)")
    return 0


def _features_done(s, out: Path, where: str = "") -> None:
    bad = f" (listed in {out / 'bad.jsonl'})" if s.bad else ""
    _stderr(f"item features: {s.extracted} images extracted, {s.skipped} already done, {s.bad} unreadable{bad}; "
            f"store {out}{where}")


def _print_result(path: Path, r) -> None:
    note = "" if r.trained else "  [untrained head: p(fake) is meaningless]"
    print(f"{path}: {r.label.upper()} p(fake)={r.p_fake:.4f} threshold={r.threshold:.2f}{note}")
    print(f'  caption: "{r.caption}"  global distance {r.global_distance:.4f}')
    for o in r.objects:
        if o.found:
            box = ", ".join(f"{v:.0f}" for v in o.box)
            print(f"  {o.word:>16}: box [{box}] score {o.score:.3f} distance {o.distance:.4f}")
        else:
            print(f"  {o.word:>16}: not found (no box labelled with it above threshold; best score {o.score:.3f})")
    if r.provenance is not None:
        print(f"  provenance: {r.provenance.summary}")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in r.timings_ms.items())
    print(f"  ms: {stages}")


def _words(args) -> int:
    from .stages.words import words_command

    return words_command(args)


def _info(args) -> int:
    from .bundle import Bundle

    b = Bundle.open(args.bundle, verify="full")  # info re-reads every byte, whatever the hash cache says
    m = b.manifest
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    try:
        _print_info(b)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
        # Open checked what the runtime reads; the provenance and parity records shown here
        # are the export's notes, which a hand edit may have broken.
        raise BundleIntegrityError(
            f"{b.root / 'manifest.json'}: a record item info shows is missing or malformed ({type(e).__name__}: {e}); "
            f"`item info --json {b.root}` prints the manifest as it is") from None
    return 0


def _print_info(b) -> None:
    m = b.manifest
    size = sum((b.root / f).stat().st_size for f in m["files"])
    print(f"bundle     {b.root}  ({m['name']}, format {m['format_version']}, {size / 1e6:.1f} MB, hashes verified)")
    print(f"created    {m['created']} by itemrt {m['itemrt_version']}")
    if m.get("random_init"):
        print(f"weights    RANDOM-INIT ({m['random_init']}): same architectures, random weights; results are noise")
    for kind, s in m["sources"].items():
        rev = f"@{s['revision']}" if s.get("revision") else ""
        fmt = f" [{s['format']}, converted]" if s.get("format") in ("open_clip", "openai") else ""
        print(f"source     {kind:<10} {s['model_id']}{rev}{fmt}  ({s['path']})")
    v = m["versions"]
    print("versions   " + ", ".join(f"{k} {v[k]}" for k in v))
    h = m["head"]
    state = f"trained {h['trained_at']}" if h["trained"] else "UNTRAINED (seeded random placeholder)"
    print(f"head       {state}; recipe {h['recipe']}, {h['input_dim']} -> {h['hidden']} -> 1, threshold {h['threshold']:.6g}")
    cal = h.get("calibration")
    if cal:
        res = "" if cal["resolved"] else " (too few reals to resolve it)"
        print(f"threshold  calibrated for FPR {cal['target_fpr']} on {cal['n_real']} validation reals: "
              f"FPR {cal['val_fpr']:.4f}, TPR {cal['val_tpr']:.4f}{res}")
    if h.get("report"):
        print(f"training   report {h['report']} (features {h['features']['path']}, {h['features']['precision']})")
    d = m["captioner"]["decoding"]
    print(f"decoding   greedy, up to {d['max_new_tokens']} tokens; objects: up to {m['words']['max_objects']} words, "
          f"detector threshold {m['detector']['threshold']}")
    print("components (precision, parity: worst cosine / relative error vs PyTorch)")
    for name, c in m["components"].items():
        worst = [x for x in c["parity"].values() if isinstance(x, dict)]
        cos = min(x["cos_min"] for x in worst)
        rel = max(x["rel"] for x in worst)
        ins = ", ".join(_grouped_inputs(c["inputs"]))
        print(f"  {name:<20} {c['precision']}  cos {cos:.6f}  rel {rel:.1e}  {c['file']}  in: {ins}")
        for prec, v in c.get("variants", {}).items():
            state = "used" if v["used"] else f"not used: {v.get('reason', '')}"
            if "error" in v:  # the variant did not load or run: there is no cosine to show
                print(f"  {'':<20} {prec}  {state}: {v['error'][:160]}")
                continue
            cos = min(x["cos_min"] for x in v["parity"].values())
            kept = f"  ({len(v['kept_fp32'])} output projections kept fp32)" if v.get("kept_fp32") else ""
            print(f"  {'':<20} {prec}  cos {cos:.6f}  {state}{kept}")
    at = " (at export, placeholder head)" if h["trained"] else ""
    _print_chain("chain fp32", m["parity"]["chain"], at)
    for prec, q in m.get("precisions", {}).items():
        print(f"{prec:<10} {len(q['used'])} graphs {q['used']}; gates {q['gates']}")
        if q["chain"]:
            _print_chain(f"chain {prec}", q["chain"], at)
    if h["trained"] or "chain_check" in h:
        _print_chain_check(h.get("chain_check"))
    print(f"default    precision {b.default_precision}; available {b.precisions()}")


def _print_chain_check(check: dict | None) -> None:
    """The chain lines above were measured at export with the placeholder head; this is the
    installed head on the same cases' pairs."""
    if check is None:
        print("head check NOT DONE: the bundle keeps no parity pairs (exported by an older itemrt); re-export to check")
        return
    for label, c in check.items():
        print(f"head check {label} chain with this head: decisions equal {c['decisions_equal']}, "
              f"|dp| max {c['p_fake_abs_diff_max']:.1e} at threshold {c['threshold']:.6g}"
              + ("" if c["passed"] else "  FAILED"))


def _grouped_inputs(inputs: list[dict]) -> list[str]:
    """NAME[shape] per input; a run of NAME.0, NAME.1, ... of one shape (the decoder's 24
    per-layer K/V inputs) as NAME.0-11[shape]."""
    runs = []  # [name or stem, first index, last index, shape]; index None: not numbered
    for i in inputs:
        stem, _, index = i["name"].rpartition(".")
        n = int(index) if stem and index.isdigit() else None
        last = runs[-1] if runs else None
        if n is not None and last and last[0] == stem and last[2] == n - 1 and last[3] == i["shape"]:
            last[2] = n
        else:
            runs.append([stem, n, n, i["shape"]] if n is not None else [i["name"], None, None, i["shape"]])
    return [f"{name}{'' if a is None else f'.{a}' if a == b else f'.{a}-{b}'}{shape}" for name, a, b, shape in runs]


def _print_chain(label: str, chain: dict, note: str = "") -> None:
    ch = chain["summary"]
    print(
        f"{label} vs PyTorch reference on {ch['images']} runs: tokens equal {ch['tokens_equal']}, "
        f"words equal {ch['words_equal']}, box IoU min {ch['box_iou_min']:.4f}, embedding cos min "
        f"{ch['embed_cos_min']:.6f}, |dp| max {ch['p_fake_abs_diff_max']:.1e}, decisions equal {ch['decisions_equal']}{note}"
    )


def _serve(args) -> int:
    from .gateways.config import ServeConfig, read_token, require

    try:
        require()
    except ImportError as e:
        print(f"item serve needs the serve extra: pip install 'itemrt[serve]' ({e})", file=sys.stderr)
        return 2
    from .bundle import Bundle
    from .gateways.server import serve

    Bundle.open(args.bundle)  # a bad bundle is a one-line error here, not a traceback from the server's startup
    cfg = ServeConfig(
        bundle=args.bundle, precision=args.precision, backend=args.backend, threads=args.threads, max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms, max_in_flight=args.max_in_flight, timeout_s=args.timeout_s,
        max_upload_bytes=int(args.max_upload_mb * 2**20), max_uploads=args.max_uploads,
        upload_timeout_s=args.upload_timeout_s, header_timeout_s=args.header_timeout_s,
        decode_budget_pixels=int(args.decode_budget_mp * 1e6), token=read_token(args.token_file),
        provenance=args.provenance, trust_anchors=str(args.trust_anchors) if args.trust_anchors else None,
    )
    if args.engine == "ray":
        return _serve_on_ray(args, cfg)
    serve(cfg, args.host, args.port, args.log_level)
    return 0


def _serve_on_ray(args, cfg) -> int:
    from dataclasses import replace

    from .ray_cluster import Cluster

    if args.detach and args.address is None:
        print("item serve: --detach needs --address (a cluster that outlives this command)", file=sys.stderr)
        return 2
    cluster = Cluster(args.address)  # before ray is imported
    try:
        from .gateways.ray_serve import RayOptions, config_yaml, serve_command
    except ImportError as e:
        print(f"item serve --engine ray needs the ray extra: pip install 'itemrt[ray]' ({e})", file=sys.stderr)
        return 2
    try:
        opts = RayOptions(args.replicas, args.min_replicas, args.max_replicas, args.num_cpus, args.num_gpus,
                          args.ingress_replicas, args.ingress_num_cpus, args.retries,
                          str(Path(args.token_file).resolve()) if args.token_file else None)
    except ValueError as e:
        print(f"item serve: {e}", file=sys.stderr)
        return 2
    # The token is read where the gateway runs (token_file or $ITEM_SERVE_TOKEN there), never
    # shipped in the deployment's arguments; read_token above only checked the file.
    cfg = replace(cfg, bundle=str(Path(cfg.bundle).resolve()), token=None)
    if args.write_config:
        args.write_config.write_text(config_yaml(cfg, opts, args.host, args.port, args.app_name))
        _stderr(f"item serve: wrote {args.write_config}; deploy it with `serve deploy {args.write_config}`")
        return 0
    return serve_command(cfg, opts, cluster=cluster, host=args.host, port=args.port, name=args.app_name,
                         detach=args.detach, log_level=args.log_level, emit=_stderr)


def _watch(args) -> int:
    from .gateways.watch import Watcher
    from .runtime import Runtime

    if not args.bundle:
        print("item watch: give --bundle or set ITEM_BUNDLE", file=sys.stderr)
        return 2
    with Runtime(args.bundle, precision=args.precision, backend=args.backend, **_provenance_options(args)) as rt:
        w = Watcher(rt, args.folder, args.out, quarantine=args.quarantine, recursive=args.recursive,
                    interval_s=args.interval, settle_s=args.settle, follow_links=args.follow_links,
                    progress=lambda msg: print(msg, flush=True))
        try:
            n = w.run(once=args.once)
        except KeyboardInterrupt:
            return 0
    print(f"item watch: {n} files processed", file=sys.stderr)
    return 0


def _demo(args) -> int:
    from .bundle import Bundle
    from .runtime import Runtime
    from .stages.explain import render
    from .stages.images import read_image

    bundle = Path(args.bundle)
    try:
        Bundle.open(bundle)
    except BundleError as e:  # none yet, or one that an older itemrt wrote: the demo makes its own
        if not isinstance(e, BundleNotFoundError):
            print(f"item demo: exporting the demo bundle again ({e})", file=sys.stderr)
        rc = main(["export", "--random-init", "tiny", "--out", str(bundle)])
        if rc:
            return rc
    main(["info", str(bundle)])
    _check_explain(args.explain_dir, folder=True)
    paths, written = sample_images(), set()
    print(f"\nthe {len(paths)} sample images in {paths[0].parent}:" if paths else "\nno sample images shipped")
    with Runtime(bundle) as rt:
        for path in paths:
            img = read_image(path, rt.image_limits)  # decoded once, for the chain and the picture
            r = rt.detect(img)
            target = _explain_target(args.explain_dir, path, written)
            render(img.image, r).save(target)
            print()
            for line in _demo_table(path.name, r, target):
                print(line)
    return 0


DEMO_WIDTH = 100  # the demo's tables fit a terminal this wide (narrower ones: captions wrap shorter)


def _demo_table(name: str, r, explain: Path) -> list[str]:
    """One image's result as the demo shows it: the verdict, the caption (wrapped, cut after two
    lines), each object word with found or not, its distance and box, and the picture's file."""
    width = max(60, min(DEMO_WIDTH, shutil.get_terminal_size((DEMO_WIDTH, 24)).columns))
    note = "" if r.trained else "  [untrained head: p(fake) means nothing]"
    label = "  {:<12}".format  # the longest label, "provenance", and two spaces
    pad = " " * len(label(""))
    lines = [f"{name}: {r.label.upper()}  p(fake) {r.p_fake:.4f}  threshold {r.threshold:.2f}{note}"]
    caption = textwrap.wrap(r.caption, width - len(pad), max_lines=2, placeholder=" ...") or ["(empty)"]
    lines += [(label("caption") if i == 0 else pad) + text for i, text in enumerate(caption)]
    lines.append(label("distance") + f"{r.global_distance:.4f} image to caption; objects: crop to word (1 - CLIP cosine)")
    rows = [("word", "found", "distance", "box (x0, y0, x1, y1)")] + [
        (o.word, "found", f"{o.distance:.4f}", ", ".join(f"{v:.0f}" for v in o.box)) if o.found
        else (o.word, "not found", "-", "-")
        for o in r.objects
    ]
    w = max(len(row[0]) for row in rows)
    for i, (word, found, distance, box) in enumerate(rows if r.objects else []):
        lines.append((label("objects") if i == 0 else pad) + f"{word:<{w}}  {found:<9}  {distance:>8}  {box}")
    if not r.objects:
        lines.append(label("objects") + "none: no object word in the caption")
    if r.provenance is not None:
        lines += [(label("provenance") if i == 0 else pad) + text
                  for i, text in enumerate(textwrap.wrap(r.provenance.summary, width - len(pad), max_lines=2,
                                                         placeholder=" ..."))]
    lines.append(label("explain") + str(explain))
    return lines


if __name__ == "__main__":
    sys.exit(main())
