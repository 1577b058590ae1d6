"""`item eval`: the installed head on stored features, per generator and overall, with
ROC / PR curves, and robustness sweeps (JPEG, blur, downscaling) that re-run the chain on
perturbed images into their own resumable feature stores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from itemrt.backends.ort import OrtSession, SessionOptions
from itemrt.bundle import Bundle
from itemrt.datasets.features import Features, extract, read_features
from itemrt.datasets.perturb import parse as parse_perturbation
from itemrt.errors import DatasetError
from itemrt.paths import writable_folder

from . import metrics

COLUMNS = (("acc_real", "acc real"), ("acc_fake", "acc fake"), ("acc_mean", "mean acc"), ("ap", "AP"), ("auc", "AUC"))


def head_p_fake(bundle: Bundle, f: Features, rows: np.ndarray) -> np.ndarray:
    """p(fake) of the bundle's installed head (its ONNX graph, as deployed) on stored rows."""
    x = f.matrix(bundle.manifest["head"]["recipe"], rows)
    if not len(x):
        return np.zeros(0)
    path, _ = bundle.component_path("head")
    return OrtSession(path, "head", SessionOptions()).run({"features": x})["p_fake"].reshape(-1).astype(np.float64)


def markdown_table(rows: dict[str, dict], first: str = "generator") -> str:
    out = [f"| {first} | " + " | ".join(h for _, h in COLUMNS) + " | n real | n fake |",
           "|---|" + "---:|" * (len(COLUMNS) + 2)]
    for name, r in rows.items():
        cells = [_pct(r.get(k)) for k, _ in COLUMNS]
        counts = [str(r.get("n_real", "")), str(r.get("n_fake", ""))]
        out.append(f"| {name} | " + " | ".join(cells + counts) + " |")
    return "\n".join(out)


def _pct(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _split_rows(f: Features, split: str) -> np.ndarray:
    if split == "all":
        return f.rows()
    rows = np.flatnonzero(f.columns["split"] == split)
    if not len(rows):
        raise DatasetError(f"the feature store has no {split!r} images (splits: {sorted(set(f.columns['split'].tolist()))})")
    return rows


def evaluate(
    features_dir: str | Path,
    bundle_dir: str | Path,
    out_dir: str | Path,
    *,
    split: str = "test",
    robustness: list[str] = (),
    batch_size: int = 1,
    progress=print,
) -> dict:
    for spec in robustness:
        parse_perturbation(spec)  # fail before any work
    out = writable_folder(Path(out_dir), "the report folder")
    bundle = Bundle.open(bundle_dir)
    f = read_features(features_dir, bundle.feature_fingerprint)
    rows = _split_rows(f, split)
    threshold = float(bundle.manifest["head"]["threshold"])
    y, gens = f.columns["label"][rows], f.columns["generator"][rows]
    p = head_p_fake(bundle, f, rows)
    report = {
        "bundle": bundle.name,
        "trained": bundle.trained,
        "recipe": bundle.manifest["head"]["recipe"],
        "threshold": threshold,
        "calibration": bundle.manifest["head"].get("calibration"),
        "features": str(Path(features_dir).resolve()),
        "split": split,
        "results": metrics.by_generator(y, p, gens, threshold),
        "robustness": {},
        "curves": _curves(y, p, gens, out),
    }
    progress(f"eval: {len(rows)} {split} images: " + _line(report["results"]["all"]))
    if robustness:
        from itemrt.runtime import Runtime

        samples = f.samples(rows)
        with Runtime(bundle.root, precision=f.meta["precision"]) as rt:
            for spec in robustness:
                store = Path(features_dir) / "perturbed" / spec.replace("=", "-")
                extract(rt, samples, store, perturbation=spec, batch_size=batch_size, dataset=f.meta.get("dataset", ""),
                        progress=progress)
                fp = read_features(store, bundle.feature_fingerprint)
                r = fp.rows()
                res = metrics.by_generator(fp.columns["label"], head_p_fake(bundle, fp, r), fp.columns["generator"], threshold)
                report["robustness"][spec] = {"mean": res.get("mean"), "all": res["all"], "missing": len(rows) - len(r)}
                progress(f"eval: {spec}: " + _line(res["all"]))
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "eval.md").write_text(eval_markdown(report))
    progress(f"eval: wrote {out / 'eval.md'}, {out / 'eval.json'}, {out / 'roc.png'}, {out / 'pr.png'}")
    return report


def _line(r: dict) -> str:
    return f"AP {r['ap']:.4f} AUC {r['auc']:.4f} acc real {r['acc_real']:.4f} fake {r['acc_fake']:.4f}"


def eval_markdown(report: dict) -> str:
    lines = [f"# Evaluation of bundle {report['bundle']} on the {report['split']} split", ""]
    if not report["trained"]:
        lines += ["**The head is untrained (seeded placeholder): these numbers mean nothing.**", ""]
    cal = report["calibration"]
    how = f"calibrated for FPR {cal['target_fpr']} on validation reals" if cal else "not calibrated"
    lines += [(f"Recipe `{report['recipe']}`, threshold {report['threshold']:.6f} ({how}). Accuracies at that "
               "threshold; AP and AUC threshold-free. Per generator: its fakes against its own reals where the "
               "dataset groups reals by generator, else against all reals; `mean` averages the generator rows."),
              "", markdown_table(report["results"])]
    if report["robustness"]:
        rows = {"clean": report["results"]["all"], **{k: v["all"] for k, v in report["robustness"].items()}}
        lines += ["", "## Robustness (all generators pooled)", "", markdown_table(rows, "perturbation")]
    lines += ["", "![ROC](roc.png) ![PR](pr.png)"]
    return "\n".join(lines) + "\n"


def _curves(y, p, gens, out: Path) -> dict:
    """roc.png and pr.png: pooled and per generator. Returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"all": np.ones(len(y), bool), **metrics.generator_groups(y, gens)}
    fig_roc, ax_roc = plt.subplots(figsize=(5, 5))
    fig_pr, ax_pr = plt.subplots(figsize=(5, 5))
    for name, m in groups.items():
        if len(set(y[m].tolist())) < 2:
            continue
        fpr, tpr, _ = metrics.roc_curve(y[m], p[m])
        prec, rec = metrics.pr_curve(y[m], p[m])
        ax_roc.plot(fpr, tpr, label=f"{name} (AUC {metrics.roc_auc(y[m], p[m]):.3f})")
        ax_pr.step(np.r_[0.0, rec], np.r_[prec[0], prec], where="pre",
                   label=f"{name} (AP {metrics.average_precision(y[m], p[m]):.3f})")
    ax_roc.plot([0, 1], [0, 1], ":", color="gray")
    for ax, (xl, yl, t) in ((ax_roc, ("false positive rate (reals called fake)", "true positive rate", "ROC")),
                            (ax_pr, ("recall", "precision", "precision-recall"))):
        ax.set(xlabel=xl, ylabel=yl, title=t, xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "lower left")
    fig_roc.tight_layout()
    fig_pr.tight_layout()
    fig_roc.savefig(out / "roc.png", dpi=110)
    fig_pr.savefig(out / "pr.png", dpi=110)
    plt.close(fig_roc)
    plt.close(fig_pr)
    return {"roc": "roc.png", "pr": "pr.png"}
