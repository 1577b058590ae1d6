"""The manifest fields that the runtime and `item info` read, checked when a bundle opens.

The files are hashed, but the manifest holds the hashes and is rewritten by `item train`,
`item calibrate` and `item build`, so nothing guards it but this. A manifest edited by hand or
written by a broken tool fails closed at open, naming the field, instead of as a KeyError
halfway through loading or an ONNX Runtime shape error in the middle of `detect()`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from .errors import BundleIntegrityError

# Fields outside the spec dataclasses, with their types. Thresholds are probabilities.
FIELDS: dict[str, Any] = {
    "name": str,
    "created": str,
    "itemrt_version": str,
    "sources": dict,
    "versions": dict,
    "parity": dict,
    "words.vocabulary": str,
    "words.bank": str,
    "words.max_objects": int,
    "detector.threshold": "probability",
    "clip.dim": int,
    "head.recipe": str,
    "head.threshold": "probability",
    "head.trained": bool,
    "head.weights": str,
}


def _spec_sections() -> dict[str, type]:
    # Imported here: the spec modules import the sessions, which need nothing from bundles.
    from .stages.captioner import DecodingSpec
    from .stages.preprocess import ImageSpec
    from .stages.text import TokenizerSpec

    return {
        "captioner.preprocess": ImageSpec,
        "detector.preprocess": ImageSpec,
        "clip.preprocess": ImageSpec,
        "captioner.tokenizer": TokenizerSpec,
        "clip.tokenizer": TokenizerSpec,
        "captioner.decoding": DecodingSpec,
    }


def check_manifest(m: Any, redo: str) -> None:
    """Raise BundleIntegrityError naming the first field that is missing or of the wrong type
    or range. `redo` says how to make the bundle again."""
    problem = _problem(m)
    if problem:
        raise BundleIntegrityError(f"manifest.json: {problem}; {redo}")


def _problem(m: Any) -> str | None:
    if not isinstance(m, dict):
        return f"must hold a JSON object, not {type(m).__name__}"
    files = m.get("files")
    if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
        return "files must map each file to its sha256"
    comps = m.get("components")
    if not isinstance(comps, dict):
        return "components must be an object"
    for name, comp in comps.items():
        where = f"components.{name}"
        if not isinstance(comp, dict) or not isinstance(comp.get("file"), str):
            return f"{where} must be an object with its graph's file"
        variants = comp.get("variants", {})
        if not isinstance(variants, dict):
            return f"{where}.variants must be an object"
        for prec, v in variants.items():
            if not isinstance(v, dict) or not isinstance(v.get("used"), bool) or (v["used"] and not isinstance(v.get("file"), str)):
                return f"{where}.variants.{prec} must be an object with `used` (and its file when used)"
    precisions = m.get("precisions", {})
    mixed = precisions.get("mixed", {}) if isinstance(precisions, dict) else None
    used = mixed.get("used", {}) if isinstance(mixed, dict) else None
    if not isinstance(used, dict) or not all(isinstance(p, str) for p in used.values()):
        return "precisions.mixed.used must map components to precisions"
    for path, kind in FIELDS.items():
        if problem := _field(m, path, kind):
            return problem
    for path, cls in _spec_sections().items():
        section = _get(m, path)
        if not isinstance(section, dict):
            return f"{path} must be an object"
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if unknown := sorted(set(section) - set(fields)):
            return f"{path} has unknown fields {unknown}"
        hints = typing.get_type_hints(cls)
        for name, f in fields.items():
            required = f.default is dataclasses.MISSING
            if (name in section or required) and (problem := _field(m, f"{path}.{name}", hints[name])):
                return problem
    return None


def _get(m: dict, path: str) -> Any:
    node: Any = m
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


_MISSING = object()


def _field(m: dict, path: str, kind: Any) -> str | None:
    v = _get(m, path)
    if v is _MISSING:
        return f"{path} is missing"
    ok, what = _is(v, kind)
    return None if ok else f"{path} must be {what}, got {v!r:.60}"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is(v: Any, kind: Any) -> tuple[bool, str]:
    if kind is int:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number >= 0"
    if kind is float:
        return _number(v), "a finite number"
    if kind == "probability":
        return _number(v) and 0 <= v <= 1, "a number from 0 to 1"
    if kind is str:
        return isinstance(v, str) and v != "", "a non-empty string"
    if kind is bool:
        return isinstance(v, bool), "true or false"
    if kind is dict:
        return isinstance(v, dict), "an object"
    if typing.get_origin(kind) is tuple:  # mean / std: a fixed number of numbers
        n = len(typing.get_args(kind))
        return isinstance(v, list) and len(v) == n and all(map(_number, v)), f"a list of {n} numbers"
    raise TypeError(f"no check for {kind!r}")
