"""One factory decides which engine runs each graph; the chain sees only sessions."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from itemrt import Runtime
from itemrt.backends import BACKENDS, CpuBackend
from itemrt.backends.base import HostSession

STAGES = Path(__file__).resolve().parents[1] / "runtime" / "stages"


class Counting(HostSession):
    """A session on another session: counts the calls the chain makes."""

    def __init__(self, inner, calls):
        self.inner, self.calls = inner, calls
        self.name, self.inputs, self.outputs = inner.name, inner.inputs, inner.outputs

    def run(self, feeds, outputs=None):
        self.calls[self.name] = self.calls.get(self.name, 0) + 1
        return self.inner.run(feeds, outputs)


def test_a_new_backend_is_one_class_and_one_entry(tiny_bundle, samples, monkeypatch):
    calls: dict[str, int] = {}

    class CountingBackend(CpuBackend):
        def open(self, graph):
            session, precision = super().open(graph)
            return Counting(session, calls), precision

    monkeypatch.setitem(BACKENDS, "counting", CountingBackend)
    with Runtime(tiny_bundle, precision="fp32") as plain, Runtime(tiny_bundle, precision="fp32", backend="counting") as rt:
        want, got = plain.detect(samples[0]), rt.detect(samples[0])
        assert rt.precisions == plain.precisions
    assert got.caption_tokens == want.caption_tokens
    assert np.isclose(got.p_fake, want.p_fake, rtol=0, atol=1e-6)
    # every graph ran through the new backend's sessions, the decoder once a token
    assert set(calls) == set(plain.sessions)
    assert calls["captioner_decoder"] == len(want.caption_tokens)


def test_an_unknown_backend_fails_before_the_bundle_is_read(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        Runtime(tmp_path / "no-such-bundle", backend="cuda")


@pytest.mark.parametrize("module", sorted(p.name for p in STAGES.glob("*.py")))
def test_no_stage_imports_a_concrete_backend(module):
    tree = ast.parse((STAGES / module).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    backends = {m for m in imported if m.startswith("backends") or "backends." in m}
    assert backends <= {"backends.base"}, f"{module} imports {backends}"
