"""Parity numbers: exported graph vs PyTorch module, runtime chain vs reference chain."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from itemrt.stages.recipe import Pairs
from PIL import Image


@dataclass(frozen=True)
class Gates:
    """What an exported graph, and the chain built from it, must keep (docs/design.md §6)."""

    cos_min: float  # worst row cosine of any embedding or output
    rel_max: float | None  # max error over the reference's scale (None: not gated)
    iou_min: float  # boxes
    p_fake_max: float | None  # |Δp(fake)| (None: only the decision must agree)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


FP32 = Gates(cos_min=0.9999, rel_max=1e-4, iou_min=0.99, p_fake_max=1e-4)
# Reduced precision (INT8, FP16) keeps tokens, words and decisions; embeddings to cosine
# 0.999. Boxes may move a little: IoU 0.9 still crops the same object.
REDUCED = Gates(cos_min=0.999, rel_max=None, iou_min=0.9, p_fake_max=None)


def compare(ref: np.ndarray, got: np.ndarray, gates: Gates = FP32) -> dict:
    """Max error, relative to the reference's scale, and the worst row cosine."""
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    if ref.shape != got.shape:
        return {"passed": False, "error": f"shape {got.shape} != reference {ref.shape}"}
    if ref.size == 0:
        return {"passed": True, "max_abs": 0.0, "rel": 0.0, "cos_min": 1.0}
    max_abs = float(np.abs(ref - got).max())
    rel = max_abs / max(1.0, float(np.abs(ref).max()))
    r, g = ref.reshape(ref.shape[0], -1), got.reshape(got.shape[0], -1)
    denom = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
    cos = np.where(denom > 0, np.sum(r * g, axis=1) / np.maximum(denom, 1e-30), 1.0)
    cos_min = float(cos.min())
    passed = cos_min >= gates.cos_min and (gates.rel_max is None or rel <= gates.rel_max)
    return {"passed": bool(passed), "max_abs": max_abs, "rel": rel, "cos_min": cos_min}


def compare_boxes(ref: np.ndarray, got: np.ndarray, gates: Gates = FP32) -> dict:
    """cxcywh boxes (..., 4) in [0, 1]: gated by IoU, as boxes are used (docs/design.md §6).

    Raw coordinates can differ by more than FP32 noise when random weights push the box
    head into the steep part of its sigmoid; what matters is the box the user gets."""
    r = _xyxy(np.asarray(ref, np.float64).reshape(-1, 4))
    g = _xyxy(np.asarray(got, np.float64).reshape(-1, 4))
    ious = np.array([iou(a, b, eps=1e-6, tol=1e-4) for a, b in zip(r, g)])
    out = compare(ref, got, gates)
    out.update(iou_min=float(ious.min()), iou_mean=float(ious.mean()), passed=bool(ious.min() >= gates.iou_min))
    return out


def _xyxy(b: np.ndarray) -> np.ndarray:
    cx, cy, w, h = b.T
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def iou(a, b, eps: float = 1e-3, tol: float = 1e-2) -> float:
    """IoU of xyxy boxes; boxes thinner than `eps` (random weights make such) are
    compared by their coordinates instead (within `tol`), where IoU is undefined."""
    if min(a[2] - a[0], a[3] - a[1], b[2] - b[0], b[3] - b[1]) < eps:
        return float(max(abs(x - y) for x, y in zip(a, b)) <= tol)
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _cos_min(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return 1.0
    return compare(a, b)["cos_min"] if a.shape == b.shape else -1.0


def image_parity(rt_result, ref) -> dict:
    """One image: runtime DetectionResult vs ReferenceResult."""
    objs = rt_result.objects
    both = [(o.box, b) for o, b in zip(objs, ref.boxes) if o.box is not None and b is not None]
    return {
        "tokens_equal": rt_result.caption_tokens == ref.tokens,
        "caption_equal": rt_result.caption == ref.caption,
        "words_equal": [o.word for o in objs] == ref.words,
        "found_equal": [o.found for o in objs] == ref.found,
        "tokens": len(ref.tokens),
        "words": len(ref.words),
        "found": int(sum(ref.found)),
        "box_iou_min": min((iou(a, b) for a, b in both), default=1.0),
        "p_fake_abs_diff": abs(rt_result.p_fake - ref.p_fake),
        "decision_equal": (rt_result.p_fake >= rt_result.threshold) == (ref.p_fake >= rt_result.threshold),
    }


@dataclass
class Case:
    """One image, the words to look for (None: the caption's), and the reference's answer."""

    image: Image.Image
    words: list[str] | None
    ref: object  # ReferenceResult


def reference_cases(reference, images: list[Image.Image], probe_words: list[str] | None = None) -> list[Case]:
    """Each image with its caption's words and, given probe words, again with those, so the
    detector and the crops are exercised even when random weights caption no objects."""
    cases = []
    for img in images:
        for words in (None, probe_words) if probe_words else (None,):
            cases.append(Case(img, words, reference.run(img, words=words)))
    return cases


@dataclass
class ChainParity:
    """A chain's parity report (JSON, for the manifest) and, per case, the pairs its head read."""

    report: dict
    pairs: list[Pairs]

    @property
    def passed(self) -> bool:
        return self.report["passed"]


def chain_parity(runtime, cases: list[Case], gates: Gates = FP32) -> ChainParity:
    """The runtime on every case; embeddings compared through the runtime's own stages."""
    rows, pairs = [], []
    for c in cases:
        a = runtime.analyze_batch([c.image], words=c.words)[0]
        res = a.result
        pairs.append(a.pairs)
        row = image_parity(res, c.ref)
        row["embed_cos_min"] = min(_embed_cos(runtime, c.image, res, c.ref))
        rows.append(row)
    summary = {
        "images": len(rows),
        "tokens_equal": all(r["tokens_equal"] for r in rows),
        "captions_equal": all(r["caption_equal"] for r in rows),
        "words_equal": all(r["words_equal"] and r["found_equal"] for r in rows),
        "box_iou_min": min(r["box_iou_min"] for r in rows),
        "embed_cos_min": min(r["embed_cos_min"] for r in rows),
        "p_fake_abs_diff_max": max(r["p_fake_abs_diff"] for r in rows),
        "decisions_equal": all(r["decision_equal"] for r in rows),
        "tokens_total": sum(r["tokens"] for r in rows),
        "words_total": sum(r["words"] for r in rows),
        "found_total": sum(r["found"] for r in rows),
    }
    passed = (
        summary["tokens_equal"] and summary["words_equal"] and summary["decisions_equal"]
        and summary["box_iou_min"] >= gates.iou_min and summary["embed_cos_min"] >= gates.cos_min
        and (gates.p_fake_max is None or summary["p_fake_abs_diff_max"] <= gates.p_fake_max)
    )
    return ChainParity({"passed": bool(passed), "summary": summary, "gates": gates.to_dict(), "images": rows}, pairs)


_CAPTIONER = ("captioner_vision", "captioner_cross_kv", "captioner_decoder")
_ALL = (*_CAPTIONER, "detector_image", "clip_image", "clip_text")


def suspects(summary: dict, gates: Gates) -> tuple[str, ...]:
    """The graphs that can break the first check a chain failed, in chain order. Tokens come
    from the captioner alone; words and found flags also from the detector; boxes from the
    detector; embeddings from CLIP and the crops the boxes make; a decision from anything."""
    if not summary["tokens_equal"]:
        return _CAPTIONER
    if not summary["words_equal"]:
        return (*_CAPTIONER, "detector_image")
    if summary["box_iou_min"] < gates.iou_min:
        return ("detector_image",)
    if summary["embed_cos_min"] < gates.cos_min:
        return ("detector_image", "clip_image", "clip_text")
    return _ALL


# The pairs each chain's head read on the parity cases, kept in the bundle so that a head
# trained later is checked on exactly the inputs the chain gates saw (`head_check`).
CHAIN_PAIRS = "parity/chain_pairs.npz"
REFERENCE = "reference"


def save_chain_pairs(path: Path, chains: dict[str, list[Pairs]]) -> None:
    """`chains`: label ("reference", "fp32", "int8", ...) -> one Pairs per parity case."""
    arrays = {
        f"{label}.{i}.{f.name}": np.asarray(getattr(p, f.name))
        for label, ps in chains.items()
        for i, p in enumerate(ps)
        for f in fields(Pairs)
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def load_chain_pairs(path: Path) -> dict[str, list[Pairs]]:
    grouped: dict[str, dict[int, dict]] = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            label, i, name = key.rsplit(".", 2)
            grouped.setdefault(label, {}).setdefault(int(i), {})[name] = z[key]
    return {
        label: [Pairs(**{**cases[i], "max_objects": int(cases[i]["max_objects"])}) for i in sorted(cases)]
        for label, cases in grouped.items()
    }


def head_check(chains: dict[str, list[Pairs]], p_fake, threshold: float) -> dict:
    """A head on every chain's stored pairs against the reference's: decisions, |Δp(fake)|,
    gated as the chain was at export (FP32: |Δp| too; reduced precisions: decisions).

    `p_fake(list[Pairs]) -> (n,) array` is the head as deployed."""
    ref = np.asarray(p_fake(chains[REFERENCE]), np.float64)
    out = {}
    for label, pairs in chains.items():
        if label == REFERENCE:
            continue
        got = np.asarray(p_fake(pairs), np.float64)
        diff = float(np.abs(got - ref).max())
        decisions = bool(np.all((got >= threshold) == (ref >= threshold)))
        g = FP32 if label == "fp32" else REDUCED
        out[label] = {
            "passed": decisions and (g.p_fake_max is None or diff <= g.p_fake_max),
            "decisions_equal": decisions,
            "p_fake_abs_diff_max": diff,
            "threshold": threshold,
            "p_fake_reference": ref.tolist(),
            "p_fake": got.tolist(),
        }
    return out


def _embed_cos(runtime, img, res, ref) -> list[float]:
    """CLIP embeddings of the runtime for the reference's own crops and texts."""
    from itemrt.stages.images import crop_box
    from itemrt.stages.preprocess import preprocess

    crops = [img, *(crop_box(img, b) for b in ref.boxes if b is not None)]
    img_emb = runtime.clip.encode_image(preprocess([(crops, runtime.specs["clip"])])[0])
    found_words = [w for w, f in zip(ref.words, ref.found) if f]
    txt_emb = np.concatenate(
        [runtime.clip.encode_text([ref.caption]), runtime.bank.clip[runtime.bank.rows(found_words)]]
    )
    return [_cos_min(ref.image_embeds, img_emb), _cos_min(ref.text_embeds, txt_emb)]
