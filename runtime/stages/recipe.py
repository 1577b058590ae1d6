"""Feature recipes: how matched image-text pairs become the head's input (the paper's Σ).

The paper does not publish its distance formula, so each recipe is a declared, versioned
choice. A head records the recipe it was trained with; the runtime computes exactly that
recipe and refuses one it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BundleVersionError


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


def _global(p: Pairs) -> tuple[np.ndarray, float]:
    gi, gt = normalize(p.global_image), normalize(p.global_text)
    return gi - gt, float(gi @ gt)


def _local(p: Pairs, dim: int) -> tuple[np.ndarray, list[float]]:
    """Mean local difference, and [local cos mean/min/max, mean detector score, found
    fraction, word fraction]."""
    if len(p.local_image):
        li, lt = normalize(p.local_image), normalize(p.local_text)
        cos_l = np.sum(li * lt, axis=-1)
        diff, stats = (li - lt).mean(0), [cos_l.mean(), cos_l.min(), cos_l.max()]
    else:
        diff, stats = np.zeros(dim, np.float32), [0.0, 0.0, 0.0]
    det = float(p.scores.mean()) if len(p.scores) else 0.0
    return diff, [*stats, det, len(p.local_image) / p.max_objects, len(p.scores) / p.max_objects]


def _vector(*parts) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float32).reshape(-1) for x in parts]).astype(np.float32)


def item_v1(p: Pairs) -> np.ndarray:
    """Global and local combined by concatenation: [global diff (D), mean local diff (D),
    global cos, local cos mean/min/max, mean detector score, found fraction, word fraction]."""
    g, cos_g = _global(p)
    loc, stats = _local(p, g.shape[-1])
    return _vector(g, loc, [cos_g, *stats])


def item_v1_sum(p: Pairs) -> np.ndarray:
    """Global and local combined by sum (the paper's Σ): [global diff + mean local diff (D),
    global cos, the six local statistics]."""
    g, cos_g = _global(p)
    loc, stats = _local(p, g.shape[-1])
    return _vector(g + loc, [cos_g, *stats])


def item_v1_global(p: Pairs) -> np.ndarray:
    """Ablation, global pair only: [global diff (D), global cos]."""
    g, cos_g = _global(p)
    return _vector(g, [cos_g])


def item_v1_local(p: Pairs) -> np.ndarray:
    """Ablation, local pairs only: [mean local diff (D), the six local statistics]."""
    dim = p.global_image.shape[-1]
    loc, stats = _local(p, dim)
    return _vector(loc, stats)


# name -> (features(Pairs) -> vector, feature_dim(clip_dim) -> int)
RECIPES = {
    "item-v1": (item_v1, lambda dim: 2 * dim + 7),
    "item-v1-sum": (item_v1_sum, lambda dim: dim + 7),
    "item-v1-global": (item_v1_global, lambda dim: dim + 1),
    "item-v1-local": (item_v1_local, lambda dim: dim + 6),
}


def recipe(name: str):
    """-> (features(Pairs) -> vector, feature_dim(clip_dim) -> int); unknown names fail closed."""
    if name not in RECIPES:
        raise BundleVersionError(
            f"the head was trained with feature recipe {name!r}, which this itemrt does not know "
            f"(known: {sorted(RECIPES)}); upgrade itemrt or retrain the head"
        )
    return RECIPES[name]
