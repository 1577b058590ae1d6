"""Which precision each graph runs in: its own gate, then the chain gates.

A variant (`precision.py` makes it) first faces its graph's PyTorch outputs; the variants that
pass are then tried as one runtime chain against the reference chain, and only those the chain
keeps are used. The manifest records every attempt, and `default_precision` says what a bundle
runs in when the caller does not ask.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from itemrt.backends import open_cpu
from itemrt.bundle import seal
from itemrt.runtime import Runtime
from itemrt.schema import Manifest, PrecisionRecord, Variant

from .parity import REDUCED, ChainParity, chain_parity, compare, compare_boxes, suspects
from .precision import (
    METHODS,
    MIXED,
    MIXED_ORDER,
    convert,
    output_projections,
    variant_file,
)


def gate_variant(root: Path, name: str, precision: str, ins, outs, check_inputs, ref) -> Variant:
    """Convert one graph and gate it against the same PyTorch outputs as its FP32 graph.
    An INT8 graph that fails is tried once more with its output projections kept FP32."""
    t0 = time.perf_counter()
    rel = variant_file(precision, name)
    attempts = []

    def attempt(keep: tuple[str, ...]) -> dict:
        try:
            convert(precision, root / f"{name}.onnx", root / rel, keep_fp32=keep)
            sess = open_cpu(root / rel, name, precision)
            got = sess.run({k: v.numpy() for k, v in zip(ins, check_inputs)})
        except Exception as e:  # noqa: BLE001 - a converter or runtime bug fails this variant's gate, not the export
            attempts.append({"kept_fp32": list(keep), "parity": {}, "passed": False, "error": f"{type(e).__name__}: {e}"})
            return attempts[-1]
        parity = {
            o: (compare_boxes if o == "pred_boxes" else compare)(r.numpy(), got[o], REDUCED) for o, r in zip(outs, ref)
        }
        attempts.append({"kept_fp32": list(keep), "parity": parity, "passed": all(p["passed"] for p in parity.values())})
        return attempts[-1]

    last = attempt(())
    retry = not last["passed"] and "error" not in last and precision == "int8"
    if retry and (keep := output_projections(root / f"{name}.onnx")):
        last = attempt(keep)
    return Variant(
        file=rel,
        precision=precision,
        kept_fp32=last["kept_fp32"],
        parity=last["parity"],
        passed=last["passed"],
        used=False,  # decided by the chain gate in `choose`
        seconds=round(time.perf_counter() - t0, 1),
        error=last.get("error"),
        attempts=attempts if len(attempts) > 1 else None,
    )


def choose(root: Path, manifest: Manifest, precision: str, cases, progress: Callable[[str], None]) -> ChainParity | None:
    """Use the `precision` graphs whose chain keeps tokens, words, boxes and decisions.

    All graphs that passed their own gate are tried together; if the chain fails, each is
    tried alone, and the set of those that pass alone is shrunk until the chain passes. Each
    step drops the graph with the worst own-gate cosine among those that can break the check
    that failed (`parity.suspects`): changed tokens never cost the CLIP graphs. The bundle
    records every attempt; unused files are deleted. Returns the passing chain's parity (None
    when no graph is used).
    """
    comps = manifest.components
    variants = {n: c.variants[precision] for n, c in comps.items() if precision in c.variants}
    attempts = []

    def attempt(names: list[str]) -> ChainParity:
        for n, v in variants.items():
            v.used = n in names
        seal(root, manifest)  # the runtime reads which variants are used from the manifest
        with Runtime(root, precision=precision, verify=False) as rt:
            chain = chain_parity(rt, cases, REDUCED)
        attempts.append({"components": names, "passed": chain.passed, "summary": chain.report["summary"]})
        progress(f"{precision} chain with {names or 'none'}: " + ("ok" if chain.passed else "FAILED"))
        return chain

    def worst_cos(n: str) -> float:
        return min(p["cos_min"] for p in variants[n].parity.values())

    chosen = [n for n, v in variants.items() if v.passed]
    chain = attempt(chosen) if chosen else None
    if chain is not None and not chain.passed:
        together = chosen
        alone = {n: attempt([n]) for n in chosen}
        chosen = [n for n in chosen if alone[n].passed]
        if chosen != together:  # all passing alone: the failed first attempt already says so
            chain = alone[chosen[0]] if len(chosen) == 1 else attempt(chosen) if chosen else None
        while chain is not None and not chain.passed:
            blamed = [n for n in chosen if n in suspects(chain.report["summary"], REDUCED)] or chosen
            chosen.remove(min(blamed, key=worst_cos))
            chain = attempt(chosen) if chosen else None
    for n, v in variants.items():
        v.used = n in chosen
        if not v.used:
            v.reason = "own gate failed" if not v.passed else "chain gate failed with it"
            if v.file != comps[n].file:  # a bf16 variant is the FP32 graph itself
                (root / v.file).unlink(missing_ok=True)
    manifest.precisions[precision] = PrecisionRecord(
        method=METHODS[precision],
        gates=REDUCED.to_dict(),
        used=chosen,
        chain=chain.report if chain else None,
        attempts=attempts,
    )
    return chain


def choose_mixed(root: Path, manifest: Manifest, cases, progress: Callable[[str], None]) -> ChainParity | None:
    """Precision "mixed": each graph in INT8 where INT8's chain gate took it, else in BF16 where
    BF16's took it, else FP32 (`precision.MIXED_ORDER`), gated again as one chain. Made only
    when both were exported and the mix differs from each. If the mixed chain fails, the
    BF16 graphs it added are dropped one at a time (worst own-gate cosine among the suspects
    first), as in `choose`. Returns the passing chain's parity, or None."""
    q = manifest.precisions
    if not all(p in q for p in MIXED_ORDER):
        return None
    mix: dict[str, str] = {}
    for p in MIXED_ORDER:
        mix.update({n: p for n in q[p].used if n not in mix})
    added = [n for n, p in mix.items() if p != MIXED_ORDER[0]]
    if not added or len(added) == len(mix):  # the same graphs as BF16 or as INT8 alone
        return None
    attempts = []

    def attempt() -> ChainParity:
        q["mixed"] = PrecisionRecord(used=dict(mix))
        seal(root, manifest)
        with Runtime(root, precision="mixed", verify=False) as rt:
            chain = chain_parity(rt, cases, REDUCED)
        attempts.append({"components": dict(mix), "passed": chain.passed, "summary": chain.report["summary"]})
        progress(f"mixed chain with {mix}: " + ("ok" if chain.passed else "FAILED"))
        return chain

    def cos(n: str) -> float:
        return min(p["cos_min"] for p in manifest.components[n].variants[mix[n]].parity.values())

    chain = attempt()
    while not chain.passed:
        blamed = [n for n in added if n in suspects(chain.report["summary"], REDUCED)] or added
        drop = min(blamed, key=cos)
        added.remove(drop)
        del mix[drop]
        if not added:  # back to INT8 alone: no mix of its own
            break
        chain = attempt()
    passed = chain.passed
    q["mixed"] = PrecisionRecord(
        method=MIXED,
        gates=REDUCED.to_dict(),
        used=dict(mix) if passed else {},
        chain=chain.report if passed else None,
        attempts=attempts,
    )
    seal(root, manifest)
    return chain if passed else None


def default_precision(manifest: dict) -> str:
    """INT8 where the chain gate let any INT8 graph through and, once a head is trained, that
    head still makes the reference's decisions on the INT8 chain; FP16 is for GPUs, never
    the CPU default. Reads the manifest as JSON: `item train` and `item calibrate` hold it so."""
    used = manifest.get("precisions", {}).get("int8", {}).get("used")
    check = (manifest["head"].get("chain_check") or {}).get("int8", {})
    return "int8" if used and check.get("decisions_equal", True) else "fp32"
