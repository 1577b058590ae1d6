"""Feature recipes: how matched image-text pairs become the head's input (the paper's Σ).

The paper does not publish its distance formula, so each recipe is a declared, versioned
choice. A head records the recipe it was trained with; the runtime computes exactly that
recipe and refuses one it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BundleVersionError


@dataclass(frozen=True)
class Pairs:
    """One image's matched pairs in CLIP space (raw, unnormalized tower outputs)."""

    global_image: np.ndarray  # (D,)   I0
    global_text: np.ndarray  # (D,)   T0
    local_image: np.ndarray  # (n, D) crops I1..In of the found words
    local_text: np.ndarray  # (n, D) the found words T1..Tn
    scores: np.ndarray  # (k,)   detector score of every word, found or not
    max_objects: int


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-12)


def distances(p: Pairs) -> tuple[float, np.ndarray]:
    """Cosine distances (1 - cos): global (I0, T0) and one per found word (Ii, Ti)."""
    g = 1.0 - float(normalize(p.global_image) @ normalize(p.global_text))
    loc = 1.0 - np.sum(normalize(p.local_image) * normalize(p.local_text), axis=-1)
    return g, loc


def item_v1(p: Pairs) -> np.ndarray:
    """[global diff (D), mean local diff (D), global cos, local cos mean/min/max,
    mean detector score, found fraction, word fraction] -> 2D + 7 float32."""
    gi, gt = normalize(p.global_image), normalize(p.global_text)
    dim = gi.shape[-1]
    cos_g = float(gi @ gt)
    if len(p.local_image):
        li, lt = normalize(p.local_image), normalize(p.local_text)
        cos_l = np.sum(li * lt, axis=-1)
        local_diff = (li - lt).mean(0)
        stats = [cos_l.mean(), cos_l.min(), cos_l.max()]
    else:
        local_diff, stats = np.zeros(dim, np.float32), [0.0, 0.0, 0.0]
    det = float(p.scores.mean()) if len(p.scores) else 0.0
    tail = [cos_g, *stats, det, len(p.local_image) / p.max_objects, len(p.scores) / p.max_objects]
    return np.concatenate([gi - gt, local_diff, np.asarray(tail, np.float32)]).astype(np.float32)


RECIPES = {"item-v1": (item_v1, lambda dim: 2 * dim + 7)}


def recipe(name: str):
    """-> (features(Pairs) -> vector, feature_dim(clip_dim) -> int); unknown names fail closed."""
    if name not in RECIPES:
        raise BundleVersionError(
            f"the head was trained with feature recipe {name!r}, which this itemrt does not know "
            f"(known: {sorted(RECIPES)}); upgrade itemrt or retrain the head"
        )
    return RECIPES[name]
