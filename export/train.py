"""`item train` and `item calibrate`: the MLP head on stored misalignment features.

Training: AdamW, BCE weighted for class balance, early stopping on validation AP, seeded.
The head is exported to ONNX, checked against PyTorch, and written into the bundle under
fresh names; the manifest is swapped atomically, then the old head's files are removed,
so a crash at any point leaves a bundle that opens (the old head or the new).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from itemrt.backends.ort import OrtSession, SessionOptions
from itemrt.bundle import TRAINING_DIR, Bundle, sha256_file, write_manifest
from itemrt.datasets.dataset import SPLITS
from itemrt.datasets.features import Features, read_features
from itemrt.errors import DatasetError, ParityError
from itemrt.stages.recipe import recipe
from torch import nn

from . import metrics
from .choice import default_precision
from .evaluate import head_p_fake, markdown_table
from .head import MLPHead, save_head
from .onnx_io import export_onnx
from .parity import CHAIN_PAIRS, FP32, compare, head_check, load_chain_pairs


@dataclass
class TrainConfig:
    recipe: str = "item-v1"
    hidden: list[int] = field(default_factory=lambda: [512, 128])
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 64
    max_epochs: int = 200
    patience: int = 20  # epochs without a better validation AP before stopping
    seed: int = 0
    target_fpr: float | None = None  # calibrate the threshold for this FPR on validation reals


def split_rows(f: Features, purpose: str) -> dict[str, np.ndarray]:
    """Row indices per split; training and calibration need both classes where they look."""
    split, y = f.columns["split"], f.columns["label"]
    rows = {s: np.flatnonzero(split == s) for s in SPLITS}
    for s in ("train", "val") if purpose == "train" else ("val",):
        classes = set(y[rows[s]].tolist())
        if classes != {0, 1}:
            raise DatasetError(
                f"{purpose} needs real and fake images in the {s} split; it has "
                f"{len(rows[s])} images of classes {sorted(classes)} (set splits in the dataset, "
                f"or let `item features` assign them with --split-ratios)"
            )
    return rows


def train(
    features_dir: str | Path,
    bundle_dir: str | Path,
    cfg: TrainConfig,
    *,
    command: str = "",
    progress=print,
) -> dict:
    """Train, calibrate, export and install the head; returns the training report."""
    t0 = time.perf_counter()
    recipe(cfg.recipe)  # an unknown name raises the typed error listing the known ones, before any work
    bundle = Bundle.open(bundle_dir)
    f = read_features(features_dir, bundle.feature_fingerprint)
    rows = split_rows(f, "train")
    y = f.columns["label"].astype(np.float32)
    progress(f"train: {len(f)} images ({', '.join(f'{s} {len(r)}' for s, r in rows.items())}), recipe {cfg.recipe}")
    x = f.matrix(cfg.recipe)

    torch.manual_seed(cfg.seed)
    head = MLPHead(x.shape[1], cfg.hidden, cfg.dropout)
    xt = torch.from_numpy(x[rows["train"]])
    head.mean.copy_(xt.mean(0))
    head.std.copy_(xt.std(0).clamp(min=1e-6))
    history, best_epoch = _fit(head, x, y, rows, cfg, progress)
    head.eval()

    with torch.no_grad():
        p = head(torch.from_numpy(x)).numpy().astype(np.float64)
    val, test = rows["val"], rows["test"]
    threshold, calibration = 0.5, None
    if cfg.target_fpr is not None:
        threshold, calibration = calibrate_threshold(p[val], y[val], cfg.target_fpr)
        progress(f"train: {calibration_line(calibration)}")
    gens = f.columns["generator"]
    report = {
        "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": asdict(cfg),
        "features": {"path": str(Path(features_dir).resolve()), **{k: f.meta[k] for k in ("bundle", "fingerprint", "precision", "dataset")}},
        "data": _counts(f, rows),
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "history": history,
        "threshold": threshold,
        "calibration": calibration,
        "val": metrics.by_generator(y[val], p[val], gens[val], threshold),
        "test": metrics.by_generator(y[test], p[test], gens[test], threshold) if len(test) else None,
    }
    if calibration and report["test"]:
        calibration["test_fpr"], calibration["test_tpr"] = report["test"]["all"]["fpr"], report["test"]["all"]["tpr"]
    _install(bundle, head, x, p, cfg, report, progress)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    summary = report["test"]["all"] if report["test"] else report["val"]["all"]
    which = "test" if report["test"] else "val"
    progress(f"train: done in {report['seconds']}s; {which} AP {summary['ap']:.4f} AUC {summary['auc']:.4f} "
             f"mean acc {summary['acc_mean']:.4f} at threshold {threshold:.4f}")
    return report


def _fit(head: MLPHead, x, y, rows, cfg: TrainConfig, progress) -> tuple[list[dict], int]:
    tr, val = rows["train"], rows["val"]
    xt, yt = torch.from_numpy(x[tr]), torch.from_numpy(y[tr])
    xv = torch.from_numpy(x[val])
    n_pos = float(yt.sum())
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(yt) - n_pos) / max(n_pos, 1.0)))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    best, best_state, best_epoch, waited = (-1.0, -np.inf), None, 0, 0
    for epoch in range(1, cfg.max_epochs + 1):
        head.train()
        total = 0.0
        for idx in torch.randperm(len(yt), generator=gen).split(cfg.batch_size):
            opt.zero_grad()
            loss = loss_fn(head.logits(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        head.eval()
        with torch.no_grad():
            logits_v = head.logits(xv)
            val_loss = float(loss_fn(logits_v, torch.from_numpy(y[val])))
            pv = torch.sigmoid(logits_v).numpy()
        ap, auc = metrics.average_precision(y[val], pv), metrics.roc_auc(y[val], pv)
        history.append({"epoch": epoch, "loss": total / len(yt), "val_loss": val_loss, "val_ap": ap, "val_auc": auc})
        key = (ap, -val_loss)  # equal AP: the better-calibrated epoch
        if key > best:
            best, best_state, best_epoch, waited = key, copy.deepcopy(head.state_dict()), epoch, 0
        else:
            waited += 1
        if epoch == 1 or epoch % 10 == 0 or waited >= cfg.patience or epoch == cfg.max_epochs:
            progress(f"train: epoch {epoch}/{cfg.max_epochs} loss {total / len(yt):.4f} val loss {val_loss:.4f} "
                     f"val AP {ap:.4f} AUC {auc:.4f} (best AP {best[0]:.4f} at epoch {best_epoch})")
        if waited >= cfg.patience:
            break
    head.load_state_dict(best_state)
    return history, best_epoch


def calibrate_threshold(p_val: np.ndarray, y_val: np.ndarray, target_fpr: float) -> tuple[float, dict]:
    reals, fakes = p_val[y_val == 0], p_val[y_val == 1]
    thr = metrics.threshold_for_fpr(reals, target_fpr)
    return thr, {
        # Below 1/target reals, the threshold only clears the highest one: the FPR is not resolved.
        "resolved": bool(len(reals) * target_fpr >= 1.0),
        "target_fpr": target_fpr,
        "threshold": thr,
        "split": "val",
        "n_real": len(reals),
        "n_fake": len(fakes),
        "val_fpr": float(np.mean(reals >= thr)),
        "val_tpr": float(np.mean(fakes >= thr)) if len(fakes) else None,
    }


def calibration_line(cal: dict) -> str:
    line = (f"threshold {cal['threshold']:.6g} for FPR {cal['target_fpr']} on {cal['n_real']} validation reals: "
            f"FPR {cal['val_fpr']:.4f}, TPR {cal['val_tpr']:.4f}")
    if not cal["resolved"]:
        line += f" (too few reals to resolve that FPR: want {int(np.ceil(1 / max(cal['target_fpr'], 1e-12)))}+)"
    return line


def _counts(f: Features, rows: dict[str, np.ndarray]) -> dict:
    c = f.columns
    out = {}
    for s, r in rows.items():
        gens: dict[str, int] = {}
        for g, lab in zip(c["generator"][r], c["label"][r]):
            name = f"{'fake' if lab else 'real'}/{g or '-'}"
            gens[name] = gens.get(name, 0) + 1
        out[s] = {"real": int((c["label"][r] == 0).sum()), "fake": int((c["label"][r] == 1).sum()), "by_generator": gens}
    out["bad_images"] = len(f.bad)
    return out


def _install(bundle: Bundle, head: MLPHead, x: np.ndarray, p: np.ndarray, cfg: TrainConfig, report: dict, progress) -> None:
    root, m = bundle.root, bundle.manifest
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d%H%M%S")
    stem = f"head-{stamp}"
    with tempfile.TemporaryDirectory(prefix=".train-", dir=root) as tmp:
        tmp = Path(tmp)
        entry = export_onnx(head, (torch.from_numpy(x[:2]),), tmp / f"{stem}.onnx", ["features"], ["p_fake"],
                            {"features": {0: "batch"}, "p_fake": {0: "batch"}})
        got = OrtSession(tmp / entry["file"], "head", SessionOptions()).run({"features": x})["p_fake"]
        entry["parity"] = {"p_fake": compare(p, got, FP32), "reference": "PyTorch head on every stored feature row"}
        report["parity"] = entry["parity"]["p_fake"]
        if not entry["parity"]["p_fake"]["passed"]:
            raise ParityError(f"trained head: ONNX differs from PyTorch: {entry['parity']['p_fake']}")
        report["chain_check"] = _chain_check(root, tmp / entry["file"], cfg.recipe, report["threshold"], progress)
        save_head(head, tmp / f"{stem}.safetensors")
        (tmp / TRAINING_DIR).mkdir()
        report_rel = f"{TRAINING_DIR}/{stem}.json"
        (tmp / report_rel).write_text(json.dumps(report, indent=1, default=float) + "\n")
        (tmp / f"{TRAINING_DIR}/{stem}.md").write_text(training_markdown(report))
        new_files = [f"{stem}.onnx", f"{stem}.safetensors", report_rel, f"{TRAINING_DIR}/{stem}.md"]
        (root / TRAINING_DIR).mkdir(exist_ok=True)
        for rel in new_files:
            shutil.move(str(tmp / rel), root / rel)

    old = bundle.head_files()
    files = {k: v for k, v in m["files"].items() if k not in old}
    files.update({rel: sha256_file(root / rel) for rel in new_files})
    manifest = copy.deepcopy(m)
    manifest["components"]["head"] = entry
    manifest["head"] = {
        "trained": True,
        "recipe": cfg.recipe,
        "threshold": report["threshold"],
        "calibration": report["calibration"],
        "weights": f"{stem}.safetensors",
        "report": report_rel,
        "seed": cfg.seed,
        "trained_at": report["trained_at"],
        "features": report["features"],
        **head.spec,
    }
    _record_chain_check(manifest, report["chain_check"], progress)
    manifest["files"] = files
    write_manifest(root, manifest)
    for rel in old - set(files):
        (root / rel).unlink(missing_ok=True)
    progress(f"train: head installed in {root} ({stem}.onnx, report {report_rel})")


def calibrate(features_dir: str | Path, bundle_dir: str | Path, target_fpr: float, progress=print) -> dict:
    """Re-pick the installed head's threshold for `target_fpr` on the validation reals."""
    bundle = Bundle.open(bundle_dir)
    f = read_features(features_dir, bundle.feature_fingerprint)
    val = split_rows(f, "calibrate")["val"]
    p = head_p_fake(bundle, f, val)
    y = f.columns["label"][val]
    threshold, cal = calibrate_threshold(p, y, target_fpr)
    progress(f"calibrate: {calibration_line(cal)}")
    manifest = copy.deepcopy(bundle.manifest)
    manifest["head"].update(threshold=threshold, calibration=cal)
    check = _chain_check(bundle.root, bundle.component_path("head")[0], manifest["head"]["recipe"], threshold, progress)
    _record_chain_check(manifest, check, progress)
    write_manifest(bundle.root, manifest)
    return cal


def _chain_check(root: Path, head_onnx: Path, recipe_name: str, threshold: float, progress) -> dict | None:
    """The head, as deployed, on the pairs each chain's head read at export (parity.head_check):
    the export's chain gates ran with the placeholder head, so their decisions say nothing
    about this one. None for a bundle exported before the pairs were kept."""
    path = root / CHAIN_PAIRS
    if not path.is_file():
        return None
    features, _ = recipe(recipe_name)
    sess = OrtSession(head_onnx, "head", SessionOptions())

    def p_fake(pairs) -> np.ndarray:
        return sess.run({"features": np.stack([features(q) for q in pairs])})["p_fake"].reshape(-1)

    check = head_check(load_chain_pairs(path), p_fake, threshold)
    for label, c in check.items():
        progress(f"check: {label} chain vs reference on the export's parity cases with this head: decisions "
                 f"{'equal' if c['decisions_equal'] else 'DIFFER'}, |dp| max {c['p_fake_abs_diff_max']:.1e}"
                 + ("" if c["passed"] else " (FAILED)"))
    return check


def _record_chain_check(manifest: dict, check: dict | None, progress) -> None:
    """Keep the check in the manifest; the default precision follows it (`default_precision`)."""
    manifest["head"]["chain_check"] = check  # None: `item info` says it could not be checked
    before, after = manifest.get("default_precision"), default_precision(manifest)
    manifest["default_precision"] = after
    if before != after:
        why = ("the INT8 chain changes this head's decisions on the parity cases; --precision int8 still runs it"
               if after == "fp32" else "the INT8 chain keeps this head's decisions again")
        progress(f"check: default precision {before} -> {after} ({why})")


def training_markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"# Head training report ({report['trained_at']})",
        "",
        (f"Recipe `{cfg['recipe']}`, MLP {cfg['hidden']} dropout {cfg['dropout']}, AdamW lr {cfg['lr']} "
         f"wd {cfg['weight_decay']}, batch {cfg['batch_size']}, seed {cfg['seed']}."),
        (f"Features: `{report['features']['path']}` (bundle {report['features']['bundle']}, "
         f"{report['features']['precision']}). Epochs run {report['epochs_run']}, best epoch {report['best_epoch']}."),
        f"Threshold {report['threshold']:.6f}"
        + (f" (calibrated for FPR {report['calibration']['target_fpr']} on validation reals)" if report["calibration"] else " (default)"),
        "",
        "## Validation",
        "",
        markdown_table(report["val"]),
    ]
    if report["test"]:
        lines += ["", "## Test", "", markdown_table(report["test"])]
    cal = report["calibration"]
    if cal and cal.get("test_fpr") is not None:
        lines += ["", f"Calibrated threshold on test: FPR {cal['test_fpr']:.4f}, TPR {cal['test_tpr']:.4f}."]
    return "\n".join(lines) + "\n"
