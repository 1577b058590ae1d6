"""The bundle manifest, typed: one definition that the export writes and `Bundle.open` checks.

Each section is a dataclass. `to_dict()` gives what manifest.json holds; `from_dict()` reads it
back and checks it on the way. The files are hashed, but the manifest holds the hashes and is
rewritten by `item train`, `item calibrate` and `item build`, so nothing guards it but this.
A manifest edited by hand or written by a broken tool fails closed at open, naming the field,
instead of as a KeyError halfway through loading or an ONNX Runtime shape error in `detect()`.

What is checked is what the runtime reads. Fields typed `Note[...]` are the export's records
(parity numbers, provenance, timings, training notes) that `item info` shows: they are kept as
written and not checked, so a hand edit there breaks `item info` alone, with its own error.
A section read from a file writes back the keys it read, in their order, and keeps the keys
this itemrt does not know in `extra`: reading and writing a manifest changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, TypeVar, Union

from .errors import BundleIntegrityError

if TYPE_CHECKING:
    from .stages.captioner import DecodingSpec
    from .stages.preprocess import ImageSpec
    from .stages.text import TokenizerSpec

T = TypeVar("T")
R = TypeVar("R", bound="Record")

_NOTE, _PROBABILITY = "note", "probability"
Note = Annotated[T, _NOTE]  # kept as written, not checked at open
Probability = Annotated[float, _PROBABILITY]  # a threshold: a number from 0 to 1


def nullable() -> Any:
    """An optional field whose None is a value: a section built in code writes it as null
    (a section read from a file writes it only if the file had it)."""
    return field(default=None, metadata={"null": True})


class _Invalid(Exception):
    """The first problem found, worded as `check_manifest` reports it."""


@dataclass(kw_only=True)
class Record:
    """A manifest section: typed fields, plus the keys this itemrt does not know."""

    extra: dict[str, Any] = field(default_factory=dict)
    # The keys a section read from a file had, in order (None: built in code). An instance
    # attribute; ClassVar keeps it out of the fields, the constructor and comparisons.
    _read: ClassVar[tuple[str, ...] | None] = None

    @classmethod
    def problem(cls, d: Any, path: str) -> str | None:
        """A check with its own message, run before the fields' (None: nothing wrong)."""
        return None

    @classmethod
    def from_dict(cls: type[R], d: Any, path: str = "") -> R:
        """Read and check a section; raises _Invalid naming the first bad field."""
        if problem := cls.problem(d, path):
            raise _Invalid(problem)
        if not isinstance(d, dict):
            raise _Invalid(f"{path} must be an object")
        hints = _hints(cls)
        known = {f.name: f for f in _fields(cls)}
        values = {}
        for name, f in known.items():
            where = f"{path}.{name}" if path else name
            if name in d:
                values[name] = _parse(hints[name], d[name], where)
            elif _required(f):
                raise _Invalid(f"{where} is missing")
        record = cls(**values, extra={k: _plain(v) for k, v in d.items() if k not in known})
        record._read = tuple(d)
        return record

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: _plain(getattr(self, f.name)) for f in _fields(type(self)) if self._writes(f)}
        out.update(_plain(self.extra))
        if self._read is not None:  # as read: the file's key order, new keys after
            rank = {k: i for i, k in enumerate(self._read)}
            out = dict(sorted(out.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        return out

    def _writes(self, f: dataclasses.Field) -> bool:
        if _required(f) or (self._read is not None and f.name in self._read):
            return True
        if self._read is None and f.metadata.get("null"):
            return True
        return getattr(self, f.name) != _default(f)


# --- the sections -----------------------------------------------------------------------


@dataclass(kw_only=True)
class Variant(Record):
    """A reduced-precision variant of one graph, with its own gate (export/choice.py)."""

    file: Note[str] | None = None  # checked when used; a bf16 variant is the FP32 graph's file
    precision: Note[str] | None = None
    kept_fp32: Note[list[str]] | None = None  # matmul nodes left in FP32 inside the variant
    parity: Note[dict] | None = None
    passed: Note[bool] | None = None
    used: bool  # decided by the chain gate
    seconds: Note[float] | None = None
    error: Note[str] | None = None  # the variant did not convert, load or run
    attempts: Note[list[dict]] | None = None  # when INT8 was tried again
    reason: Note[str] | None = None  # why it is not used

    @classmethod
    def problem(cls, d: Any, path: str) -> str | None:
        if isinstance(d, dict) and isinstance(d.get("used"), bool) and (not d["used"] or isinstance(d.get("file"), str)):
            return None
        return f"{path} must be an object with `used` (and its file when used)"


@dataclass(kw_only=True)
class Component(Record):
    """One ONNX graph: its file, its I/O and its parity against PyTorch."""

    file: str
    opset: Note[int] | None = None
    precision: Note[str] | None = None
    inputs: Note[list[dict]] | None = None  # name, dtype, shape (dynamic axes by name)
    outputs: Note[list[dict]] | None = None
    parity: Note[dict] | None = None
    seconds: Note[float] | None = None
    variants: dict[str, Variant] = field(default_factory=dict)

    @classmethod
    def problem(cls, d: Any, path: str) -> str | None:
        if isinstance(d, dict) and isinstance(d.get("file"), str):
            return None
        return f"{path} must be an object with its graph's file"


@dataclass(kw_only=True)
class Captioner(Record):
    preprocess: ImageSpec
    tokenizer: TokenizerSpec
    decoding: DecodingSpec


@dataclass(kw_only=True)
class Detector(Record):
    preprocess: ImageSpec
    tokenizer: TokenizerSpec | None = None  # the word bank's, at export; the runtime reads the bank
    threshold: Probability
    query_template: Note[str] | None = None


@dataclass(kw_only=True)
class Clip(Record):
    preprocess: ImageSpec
    tokenizer: TokenizerSpec
    word_template: Note[str] | None = None
    dim: int


@dataclass(kw_only=True)
class Words(Record):
    vocabulary: str
    bank: str
    max_objects: int


@dataclass(kw_only=True)
class Head(Record):
    """The MLP head: the export's seeded placeholder until `item train` replaces it."""

    trained: bool
    note: Note[str] | None = None
    recipe: str
    threshold: Probability
    seed: Note[int] | None = None
    weights: str
    input_dim: Note[int] | None = None
    hidden: Note[list[int]] | None = None
    dropout: Note[float] | None = None
    # written by `item train` and `item calibrate` (export/train.py)
    calibration: Note[dict | None] = None
    report: Note[str] | None = None
    trained_at: Note[str] | None = None
    features: Note[dict] | None = None
    chain_check: Note[dict | None] = None  # null: the bundle keeps no parity pairs to check with


@dataclass(kw_only=True)
class Parity(Record):
    word_bank: Note[dict] | None = None
    chain: Note[dict] | None = None  # the FP32 runtime chain against the reference chain


@dataclass(kw_only=True)
class PrecisionRecord(Record):
    """The chain gate of one precision (or of "mixed"), with every attempt."""

    method: Note[dict] | None = None
    gates: Note[dict] | None = None
    used: Note[list[str] | dict[str, str]] | None = None  # "mixed": graph -> precision (checked)
    chain: Note[dict | None] = nullable()  # null: no graph passed
    attempts: Note[list[dict]] | None = None


@dataclass(kw_only=True)
class Manifest(Record):
    """manifest.json."""

    format: str
    format_version: int
    itemrt_version: str
    created: str
    versions: dict[str, Any]
    platform: Note[dict] | None = None
    components: dict[str, Component]
    captioner: Captioner
    detector: Detector
    clip: Clip
    words: Words
    head: Head
    parity: Parity
    name: str
    random_init: Note[str | None] = nullable()  # the random-init size; null: real weights
    export_command: Note[str] | None = None
    sources: dict[str, Any]  # per model, export.models.Source.to_dict()
    precisions: dict[str, PrecisionRecord] = field(default_factory=dict)
    default_precision: Note[str] | None = None
    export_seconds: Note[float] | None = None
    tensorrt: Note[dict] | None = None  # `item build`'s plans, per target
    files: dict[str, str]  # every other file of the bundle -> its sha256

    @classmethod
    def problem(cls, m: Any, path: str) -> str | None:
        if not isinstance(m, dict):
            return f"must hold a JSON object, not {type(m).__name__}"
        files = m.get("files")
        if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
            return "files must map each file to its sha256"
        if not isinstance(m.get("components"), dict):
            return "components must be an object"
        precisions = m.get("precisions", {})
        mixed = precisions.get("mixed", {}) if isinstance(precisions, dict) else None
        used = mixed.get("used", {}) if isinstance(mixed, dict) else None
        if not isinstance(used, dict) or not all(isinstance(p, str) for p in used.values()):
            return "precisions.mixed.used must map components to precisions"
        return None


def check_manifest(m: Any, redo: str) -> Manifest:
    """The manifest, typed; raises BundleIntegrityError naming the first field that is missing
    or of the wrong type or range. `redo` says how to make the bundle again."""
    try:
        return Manifest.from_dict(m)
    except _Invalid as e:
        raise BundleIntegrityError(f"manifest.json: {e}; {redo}") from None


# --- reading and writing values -----------------------------------------------------------


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name != "extra"]


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@cache
def _hints(cls: type) -> dict[str, Any]:
    # The stage specs are imported here, not at the top: their modules import the backends,
    # which import bundle.py, which imports this module.
    from .stages.captioner import DecodingSpec
    from .stages.preprocess import ImageSpec
    from .stages.text import TokenizerSpec

    specs = {"DecodingSpec": DecodingSpec, "ImageSpec": ImageSpec, "TokenizerSpec": TokenizerSpec}
    return typing.get_type_hints(cls, localns=specs, include_extras=True)


def _parse(kind: Any, v: Any, path: str) -> Any:
    """`v` as a value of `kind`, or _Invalid naming `path`."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return _plain(v)
    if origin is Annotated:
        base, *marks = typing.get_args(kind)
        if _NOTE in marks:
            return _plain(v)
        if _PROBABILITY in marks:
            return _checked(v, "probability", path)
        return _parse(base, v, path)
    if origin in (Union, types.UnionType):
        alternatives = [a for a in typing.get_args(kind) if a is not type(None)]
        if v is None and len(alternatives) < len(typing.get_args(kind)):
            return None
        (one,) = alternatives  # the schema only declares `X | None`
        return _parse(one, v, path)
    if isinstance(kind, type) and issubclass(kind, Record):
        return kind.from_dict(v, path)
    if dataclasses.is_dataclass(kind):
        return _spec(kind, v, path)
    if origin is dict:
        _checked(v, dict, path)
        _, of = typing.get_args(kind)
        return {k: _parse(of, x, f"{path}.{k}") for k, x in v.items()}
    if origin is tuple:
        return tuple(_checked(v, kind, path))
    return _checked(v, kind, path)


def _spec(cls: type, d: Any, path: str) -> Any:
    """A stage's own spec (ImageSpec, TokenizerSpec, DecodingSpec): no field beyond its own."""
    if not isinstance(d, dict):
        raise _Invalid(f"{path} must be an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if unknown := sorted(set(d) - set(fields)):
        raise _Invalid(f"{path} has unknown fields {unknown}")
    hints = _hints(cls)
    values = {}
    for name, f in fields.items():
        if name in d:
            values[name] = _parse(hints[name], d[name], f"{path}.{name}")
        elif _required(f):
            raise _Invalid(f"{path}.{name} is missing")
    return cls(**values)  # not from_dict: DecodingSpec's refuses other strategies when the chain opens


def _plain(v: Any) -> Any:
    """JSON's own types: sections to objects, tuples to lists; containers copied."""
    if isinstance(v, Record):
        return v.to_dict()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _checked(v: Any, kind: Any, path: str) -> Any:
    ok, what = _is(v, kind)
    if not ok:
        raise _Invalid(f"{path} must be {what}, got {v!r:.60}")
    return v


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is(v: Any, kind: Any) -> tuple[bool, str]:
    if kind is int:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number >= 0"
    if kind is float:
        return _number(v), "a finite number"
    if kind == _PROBABILITY:
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
