"""C2PA Content Credentials through c2pa-python (the itemrt[provenance] extra), when it is
installed and loads: the manifest store's validation, its signer, and what its actions declare.

c2pa-python is told never to reach the network: a file can name a remote manifest (XMP
dcterms:provenance) or an OCSP responder, and by default the library would fetch them, letting
an upload make the server send requests where the uploader chooses."""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterator

from .evidence import DIGITAL_SOURCE_TYPES, C2paAction, ContentCredentials, ProvenanceLimits, Signal, clip, source_type_code
from .generators import generator_name

INSTALL_HINT = "not checked (install itemrt[provenance])"

SETTINGS = {
    "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False, "verify_trust": True},
    "core": {"allowed_network_hosts": []},
}

_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "TIFF": "image/tiff"}
_UNTRUSTED = "signingCredential.untrusted"
_MAX_MANIFESTS = 64  # manifests of a store looked at (ingredients': their own manifests)
_MAX_ACTIONS = 64  # actions of one manifest


def _load_c2pa() -> tuple[object | None, str | None]:
    try:
        import c2pa
    except ImportError:
        return None, INSTALL_HINT
    except Exception as e:  # noqa: BLE001 - installed, but its native library did not load (an older glibc):
        # c2pa-python raises RuntimeError naming the library and ctypes' OSError
        return None, f"not checked (c2pa-python did not load: {_load_error(str(e))})"
    return c2pa, None


def _load_error(message: str) -> str:
    """The loader's own words out of c2pa-python's several lines (Found ... but failed to load:
    - <path>: <what ld.so said>); for an old glibc: version `GLIBC_2.34' not found ..."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith("- ")), lines[0] if lines else message)
    return clip(detail.rsplit(": ", 1)[-1] if ": " in detail else detail, 200)


class C2paVerifier:
    """Verifies embedded manifest stores. One per trust configuration; safe to share between
    threads (each call opens its own reader on one shared c2pa Context)."""

    def __init__(self, trust_anchors: bytes | None = None):
        self.trust_anchors = trust_anchors
        self.c2pa, self.unavailable = _load_c2pa()
        self._lock = threading.Lock()
        self._context = None
        self._pid = None
        if self.c2pa is not None and trust_anchors:
            try:
                self._get_context()  # a bad anchor bundle is the caller's error, said now
            except self.c2pa.C2paError as e:
                raise ValueError(f"the trust anchors were refused by c2pa-python: {e}") from None

    @property
    def version(self) -> str | None:
        return getattr(self.c2pa, "__version__", None) if self.c2pa else None

    def _get_context(self):
        # c2pa-python refuses a Context made in another process (after fork): one per process
        with self._lock:
            if self._context is None or self._pid != os.getpid():
                settings = SETTINGS
                if self.trust_anchors:
                    settings = {**SETTINGS, "trust": {"trust_anchors": self.trust_anchors.decode()}}
                self._context = self.c2pa.Context(settings=self.c2pa.Settings.from_dict(settings))
                self._pid = os.getpid()
            return self._context

    def verify(self, data: bytes, fmt: str | None, store_bytes: int | None,
               limits: ProvenanceLimits) -> tuple[ContentCredentials, list[Signal]]:
        """The embedded store (the caller found its marker) of the file `data`."""
        if not limits.c2pa:
            return ContentCredentials(True, "not_checked", "C2PA verification is turned off (ProvenanceLimits.c2pa)"), []
        if self.c2pa is None:
            return ContentCredentials(True, "not_checked", self.unavailable), []
        if store_bytes is not None and store_bytes > limits.max_c2pa_bytes:
            reason = f"a manifest store of {store_bytes} bytes, over the limit of {limits.max_c2pa_bytes}: not verified"
            return ContentCredentials(True, "invalid", reason), []
        try:
            reader = self.c2pa.Reader(_MIME.get(fmt or ""), io.BytesIO(data), context=self._get_context())
            try:
                store = json.loads(reader.json())
            finally:
                reader.close()
        except self.c2pa.C2paError as e:
            return ContentCredentials(True, "invalid", clip(str(e) or type(e).__name__, 400)), []
        except Exception as e:  # noqa: BLE001 - the wrapper's own slips: evidence unavailable, not a crash
            return ContentCredentials(True, "invalid", clip(f"c2pa-python failed: {type(e).__name__}: {e}", 400)), []
        if not isinstance(store, dict):
            return ContentCredentials(True, "invalid", "c2pa-python returned no manifest store"), []
        return self._report(store)

    def _report(self, store: dict) -> tuple[ContentCredentials, list[Signal]]:
        manifests = store.get("manifests") if isinstance(store.get("manifests"), dict) else {}
        active = manifests.get(store.get("active_manifest"))
        failures = _failures(store)
        state = {"Trusted": "trusted", "Valid": "untrusted", "Invalid": "invalid"}.get(store.get("validation_state"))
        if state is None:  # no validation_state (older libraries): from the failure codes
            state = "invalid" if any(c != _UNTRUSTED for c, _ in failures) else "untrusted"
        if not isinstance(active, dict):
            state, failures = "invalid", [*failures, ("manifest.missing", "no active manifest")]
        if state == "invalid":
            reason = "; ".join(f"{c} ({e})" if e else c for c, e in failures if c != _UNTRUSTED) or "validation failed"
        elif state == "untrusted":
            reason = ("valid signature, but the signing certificate does not chain to a trust anchor "
                      + ("given" if self.trust_anchors else "(none given)"))
        else:
            reason = None
        active = active if isinstance(active, dict) else {}
        sig = active.get("signature_info") if isinstance(active.get("signature_info"), dict) else {}
        actions = tuple(_actions(active))[:_MAX_ACTIONS]
        all_types = [a.digital_source_type for m in list(manifests.values())[:_MAX_MANIFESTS] if isinstance(m, dict)
                     for a in _actions(m) if a.digital_source_type]
        claim_generator = _claim_generator(active)
        report = ContentCredentials(
            present=True, state=state, reason=clip(reason, 400) if reason else None,
            claim_generator=claim_generator, signer=_str(sig.get("common_name")), issuer=_str(sig.get("issuer")),
            signed_at=_str(sig.get("time")), actions=actions,
            digital_source_types=tuple(dict.fromkeys(all_types)), failures=tuple(c for c, _ in failures)[:16],
        )
        return report, _signals(report, actions)


def _signals(report: ContentCredentials, actions: tuple[C2paAction, ...]) -> list[Signal]:
    signed = report.state
    out, seen = [], set()
    for a in actions:
        if a.digital_source_type and a.digital_source_type not in seen:
            seen.add(a.digital_source_type)
            tool = a.software_agent or report.claim_generator
            out.append(Signal("c2pa", f"{a.action} digitalSourceType", a.digital_source_type,
                              DIGITAL_SOURCE_TYPES.get(a.digital_source_type), signed,
                              generator_name(tool) or (clip(tool, 80) if tool else None)))
    for code in report.digital_source_types:  # an ingredient's: part of what the active claim signs
        if code not in seen:
            seen.add(code)
            out.append(Signal("c2pa", "ingredient digitalSourceType", code, DIGITAL_SOURCE_TYPES.get(code), signed))
    if report.claim_generator:
        gen = generator_name(report.claim_generator)
        out.append(Signal("c2pa", "claim_generator", report.claim_generator, True if gen else None, signed, gen))
    return out


def _failures(store: dict) -> list[tuple[str, str]]:
    results = store.get("validation_results")
    entries: list = []
    if isinstance(results, dict):
        active = results.get("activeManifest")
        if isinstance(active, dict) and isinstance(active.get("failure"), list):
            entries += active["failure"]
        for delta in results.get("ingredientDeltas") or []:
            inner = delta.get("validationDeltas") if isinstance(delta, dict) else None
            if isinstance(inner, dict) and isinstance(inner.get("failure"), list):
                entries += inner["failure"]
    elif isinstance(store.get("validation_status"), list):
        entries = store["validation_status"]
    out = []
    for e in entries[:64]:
        if isinstance(e, dict) and isinstance(e.get("code"), str):
            out.append((clip(e["code"], 80), clip(str(e.get("explanation") or ""), 160)))
    return list(dict.fromkeys(out))


def _actions(manifest: dict) -> Iterator[C2paAction]:
    assertions = manifest.get("assertions")
    for a in assertions[:256] if isinstance(assertions, list) else ():
        if not (isinstance(a, dict) and str(a.get("label", "")).startswith("c2pa.actions")):
            continue
        data = a.get("data")
        listed = data.get("actions") if isinstance(data, dict) else None
        for act in listed[:_MAX_ACTIONS] if isinstance(listed, list) else ():
            if not isinstance(act, dict):
                continue
            dst = act.get("digitalSourceType")
            agent = act.get("softwareAgent")
            if isinstance(agent, dict):  # claims v2: {"name": ..., "version": ...}
                agent = " ".join(str(agent[k]) for k in ("name", "version") if agent.get(k))
            yield C2paAction(clip(str(act.get("action", "")), 80),
                             source_type_code(dst) if isinstance(dst, str) and dst else None,
                             clip(agent, 120) if isinstance(agent, str) and agent else None)


def _claim_generator(manifest: dict) -> str | None:
    info = manifest.get("claim_generator_info")
    if isinstance(info, list):
        names = [" ".join(str(i[k]) for k in ("name", "version") if i.get(k)) for i in info[:8] if isinstance(i, dict)]
        if any(names):
            return clip(", ".join(n for n in names if n), 200)
    return _str(manifest.get("claim_generator"))


def _str(value: object) -> str | None:
    return clip(value, 200) if isinstance(value, str) and value else None
