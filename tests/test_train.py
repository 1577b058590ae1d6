"""Features, training, calibration and evaluation of the head, on generated datasets whose
classes differ in a learnable way (fakes: cooler colours and pixel noise), with the tiny bundle."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from itemrt import Runtime
from itemrt.bundle import Bundle
from itemrt.cli import main as item
from itemrt.datasets.dataset import load_dataset
from itemrt.datasets.features import BAD, LOG, FeatureStore, _pack, extract, read_features
from itemrt.errors import DatasetError, FeatureStoreError
from itemrt.stages.recipe import RECIPES
from PIL import Image, ImageDraw

SPLIT_SIZES = {"train": 24, "val": 10, "test": 10}  # per class


def make_image(rng: np.random.Generator, fake: bool, strength: float = 1.0) -> Image.Image:
    w, h = (int(v) for v in rng.integers(80, 140, 2))
    base = np.array([150, 100, 70]) + strength * (np.array([70, 110, 160]) - np.array([150, 100, 70])) * fake
    img = Image.new("RGB", (w, h), tuple(int(c) for c in base + rng.integers(-30, 30, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        d.ellipse([x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))],
                  fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    if fake:
        noise = rng.integers(-40, 41, (h, w, 3)) * strength
        img = Image.fromarray((np.asarray(img, np.float64) + noise).clip(0, 255).astype(np.uint8))
    return img


def make_dataset(root: Path, seed: int = 0) -> Path:
    """train/ val/ test/ x real/ fake/<generator>/, plus one corrupt file (listed bad, not fatal)."""
    rng = np.random.default_rng(seed)
    for split, n in SPLIT_SIZES.items():
        for i in range(n):
            (root / split / "real").mkdir(parents=True, exist_ok=True)
            make_image(rng, False).save(root / split / "real" / f"r{i:03d}.png")
            gen = "gan" if i % 2 else "diffusion"
            (root / split / "fake" / gen).mkdir(parents=True, exist_ok=True)
            make_image(rng, True).save(root / split / "fake" / gen / f"f{i:03d}.png")
    (root / "train" / "fake" / "gan" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "README.txt").write_text("not an image, not in a label folder")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("dataset"))


@pytest.fixture(scope="module")
def bundle(tiny_bundle, tmp_path_factory) -> Path:
    """A copy of the tiny bundle: training rewrites its head."""
    out = tmp_path_factory.mktemp("train") / "tiny"
    shutil.copytree(tiny_bundle, out)
    return out


@pytest.fixture(scope="module")
def features(dataset, bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features") / "store"
    assert item(["features", str(dataset), "--bundle", str(bundle), "--out", str(out), "--precision", "fp32"]) == 0
    return out


@pytest.fixture(scope="module")
def trained(features, bundle) -> dict:
    old_head = Bundle.open(bundle).head_files()
    rc = item(["train", str(features), "--bundle", str(bundle), "--hidden", "32", "--max-epochs", "80",
               "--patience", "15", "--seed", "1"])
    assert rc == 0
    m = Bundle.open(bundle).manifest
    return {"manifest": m, "old_head": old_head, "report": json.loads((bundle / m["head"]["report"]).read_text())}


# --- datasets -------------------------------------------------------------------------------


def test_folder_layouts(tmp_path):
    files = [
        "real/a.jpg", "fake/sd14/b.png",  # plain, generator folder
        "test/progan/0_real/c.png", "test/progan/1_fake/d.png",  # UniversalFakeDetect
        "sdv4/train/nature/e.jpg", "sdv4/val/ai/f.jpg",  # GenImage
        "notes/g.png", "real/h.txt",  # outside label folders / not an image: ignored
    ]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"x")
    got = {s.key: (s.label, s.generator, s.split) for s in load_dataset(tmp_path)}
    assert set(got) == set(files[:6])
    assert got["fake/sd14/b.png"][:2] == (1, "sd14")
    assert got["test/progan/0_real/c.png"] == (0, "progan", "test")
    assert got["test/progan/1_fake/d.png"] == (1, "progan", "test")
    assert got["sdv4/train/nature/e.jpg"] == (0, "sdv4", "train")
    assert got["sdv4/val/ai/f.jpg"] == (1, "sdv4", "val")
    # No split folder: a split from the path's hash, the same on every listing.
    assert got["real/a.jpg"][2] in ("train", "val", "test")
    assert load_dataset(tmp_path)[0] == load_dataset(tmp_path)[0]
    assert {s.split for s in load_dataset(tmp_path, (0.0, 0.0, 1.0)) if "train" not in s.key and "val" not in s.key} == {"test"}


def test_manifests_and_their_errors(tmp_path):
    (tmp_path / "d.csv").write_text("path,label,generator,split\nimgs/a.png,real,,train\nimgs/b.png,1,gan,val\n")
    a, b = load_dataset(tmp_path / "d.csv")
    assert (a.label, a.split, b.label, b.generator, b.split) == (0, "train", 1, "gan", "val")
    assert a.path == (tmp_path / "imgs" / "a.png").resolve()
    (tmp_path / "d.jsonl").write_text('{"path": "x.png", "label": "fake"}\n\n{"path": "y.png", "label": "real", "split": "test"}\n')
    assert [s.label for s in load_dataset(tmp_path / "d.jsonl")] == [1, 0]
    bad = {
        "label.csv": "path,label\na.png,maybe\n",
        "split.csv": "path,label,split\na.png,real,holdout\n",
        "cols.csv": "file,label\na.png,real\n",
        "dup.csv": "path,label\na.png,real\na.png,fake\n",
        "json.jsonl": '{"path": "a.png", "label": "real"}\n{oops\n',
        "empty.csv": "path,label\n",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DatasetError):
            load_dataset(tmp_path / name)
    # bytes that are not text, and a field past the csv module's limit: typed too
    for name, data, message in [("latin.csv", b"path,label\n\xe9t\xe9.png,real\n", "must be UTF-8"),
                                ("latin.jsonl", b'{"path": "\xe9.png", "label": "real"}\n', "must be UTF-8"),
                                ("long.csv", b'path,label\n"' + b"x" * 200_000 + b'",real\n', "not a readable CSV")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DatasetError, match=message):
            load_dataset(tmp_path / name)
    # a spreadsheet's CSV starts with a byte-order mark, which is not part of the first column's name
    (tmp_path / "excel.csv").write_bytes("path,label\r\nimgs/a.png,fake\r\n".encode("utf-8-sig"))
    assert [s.label for s in load_dataset(tmp_path / "excel.csv")] == [1]
    with pytest.raises(DatasetError, match="no dataset"):
        load_dataset(tmp_path / "nowhere")


# --- the feature store ------------------------------------------------------------------------


class Interrupted(Runtime):
    """The real runtime, with a Ctrl-C arriving after `after` images (and a count of the images it ran)."""

    def __init__(self, bundle, after: int | None = None):
        super().__init__(bundle, precision="fp32")
        self.after, self.ran = after, 0

    def analyze_batch(self, images, **kw):
        if self.after is not None and self.ran >= self.after:
            raise KeyboardInterrupt
        self.ran += len(images)
        return super().analyze_batch(images, **kw)


def test_resume_processes_no_image_twice(dataset, tiny_bundle, tmp_path):
    samples = load_dataset(dataset)
    out = tmp_path / "store"
    first = Interrupted(tiny_bundle, after=7)
    with pytest.raises(KeyboardInterrupt):
        extract(first, samples, out, shard_size=4)
    assert first.ran == 7
    part = read_features(out)
    assert len(part) == 7 and len(set(part.columns["key"].tolist())) == 7

    second = Interrupted(tiny_bundle)
    s = extract(second, samples, out, shard_size=4)
    good = len(samples) - 1  # broken.png
    assert second.ran == good - 7 == s.extracted
    assert s.bad == 1 and s.skipped == 7  # the test/ images sort first: broken.png came in the second run
    f = read_features(out)
    keys = f.columns["key"].tolist()
    assert len(keys) == len(set(keys)) == good
    assert [b["key"] for b in f.bad] == ["train/fake/gan/broken.png"] and f.bad[0]["error"] == "corrupt_image"

    third = Interrupted(tiny_bundle)
    s = extract(third, samples, out)
    assert third.ran == 0 and s.skipped == len(samples) and s.bad == 0  # bad files are not retried


def test_torn_log_tail_and_crash_between_shard_and_log(features, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(features, store)
    f = read_features(store)
    row = {k: v[0] for k, v in f.columns.items()}  # a record already in a shard
    rec = _pack(row)
    (store / LOG).write_bytes(rec + rec[: len(rec) // 2])  # duplicate (crash before log reset) + torn record
    again = read_features(store)
    assert again.columns["key"].tolist() == f.columns["key"].tolist()
    with FeatureStore(store, f.meta) as s:  # the writer cuts the torn tail on open
        assert (store / LOG).stat().st_size == len(rec)
        assert len(s.done) == len(f)
    assert (store / LOG).stat().st_size == 0  # compacted: the duplicate dropped
    assert read_features(store).columns["key"].tolist() == f.columns["key"].tolist()


def test_store_refuses_other_settings_and_stale_bundles(features, bundle, tiny_bundle, tmp_path):
    with Runtime(tiny_bundle, precision="int8") as rt, pytest.raises(FeatureStoreError, match="precision"):
        extract(rt, load_dataset(read_features(features).meta["dataset"])[:1], features)
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    m = json.loads((other / "manifest.json").read_text())
    m["detector"]["threshold"] = 0.2  # a different chain: features made with `bundle` are stale for it
    (other / "manifest.json").write_text(json.dumps(m))
    assert Bundle.open(other).feature_fingerprint != Bundle.open(tiny_bundle).feature_fingerprint
    with pytest.raises(FeatureStoreError, match="stale"):
        read_features(features, Bundle.open(other).feature_fingerprint)
    assert item(["train", str(features), "--bundle", str(other), "--max-epochs", "1"]) == 2
    with pytest.raises(FeatureStoreError, match="no feature store"):
        read_features(tmp_path / "nothing")


def test_a_damaged_store_names_the_damage(features, tmp_path):
    """Found by damaging stores: a shard with flipped or cut bytes raised zipfile's BadZipFile
    or EOFError, and a bad.jsonl holding bytes that are not text a UnicodeDecodeError."""
    store = tmp_path / "store"
    shutil.copytree(features, store)
    whole = read_features(store)
    (store / BAD).write_bytes(b"\xff\xfe not text\n[1]\nnull\n{\"key\": 3}\n" + (store / BAD).read_bytes())
    assert read_features(store).bad == whole.bad  # foreign lines skipped, the real entries kept
    shard = min(store.glob("part-*.npz"))
    data = shard.read_bytes()
    for damaged in (data[: len(data) // 2], data[:200] + bytes([data[200] ^ 0xFF]) + data[201:]):
        shard.write_bytes(damaged)
        with pytest.raises(FeatureStoreError, match=f"{shard.name} is unreadable.*rerun `item features`"):
            read_features(store)
        with pytest.raises(FeatureStoreError, match="unreadable"):
            FeatureStore(store, whole.meta)  # resuming reads the shards' keys: the same error
    shard.write_bytes(data)
    with FeatureStore(store, whole.meta) as s:  # the failed opens above left no lock behind
        assert len(s.done) == len(whole)
    meta = json.loads((store / "meta.json").read_text())
    del meta["fingerprint"]
    (store / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FeatureStoreError, match=r"lacks \['fingerprint'\]"):
        read_features(store)


# --- training ---------------------------------------------------------------------------------


def test_training_beats_chance_and_installs_the_head(trained, bundle, features):
    m, report = trained["manifest"], trained["report"]
    test = report["test"]["all"]
    assert test["auc"] >= 0.95 and test["ap"] >= 0.95, test
    assert test["acc_mean"] >= 0.85, test
    assert set(report["test"]) == {"diffusion", "gan", "mean", "all"}
    assert report["data"]["train"] == {"real": 24, "fake": 24, "by_generator": {"fake/diffusion": 12, "fake/gan": 12, "real/-": 24}}
    assert report["data"]["bad_images"] == 1
    assert 1 <= report["best_epoch"] <= report["epochs_run"] <= 80
    h = m["head"]
    assert h["trained"] and h["recipe"] == "item-v1" and h["hidden"] == [32] and h["threshold"] == 0.5
    assert m["components"]["head"]["parity"]["p_fake"]["passed"]
    # New files under new names, old ones gone, every hash verified on open.
    assert not (trained["old_head"] & set(m["files"]))
    assert not any((bundle / f).exists() for f in trained["old_head"])
    Bundle.open(bundle, verify=True)


def test_onnx_head_equals_the_pytorch_head(trained, bundle, features):
    import torch
    from itemrt.export.evaluate import head_p_fake
    from itemrt.export.head import load_head

    b = Bundle.open(bundle)
    f = read_features(features, b.feature_fingerprint)
    head = load_head(bundle / b.manifest["head"]["weights"], b.manifest["head"])
    with torch.no_grad():
        ref = head(torch.from_numpy(f.matrix("item-v1"))).numpy()
    got = head_p_fake(b, f, f.rows())
    assert np.abs(ref - got).max() <= 1e-6
    assert ref.std() > 0.1  # a trained head, not a constant


def test_runtime_uses_the_trained_head(trained, bundle, features):
    f = read_features(features)
    i = int(np.flatnonzero(f.columns["split"] == "test")[0])
    with Runtime(bundle, precision="fp32") as rt:
        r = rt.detect(str(f.columns["path"][i]))
        from itemrt.export.evaluate import head_p_fake

        assert r.trained and r.threshold == 0.5
        assert abs(r.p_fake - head_p_fake(rt.bundle, f, np.array([i]))[0]) <= 1e-5
        assert r.caption == str(f.columns["caption"][i])


def test_head_check_equals_a_full_rerun_with_the_trained_head(trained, bundle, samples, capsys):
    """The export's chain gates ran with the placeholder head; training re-checks every chain
    on the pairs kept at export. Re-running the reference chain and each runtime chain with
    the trained head must give the same p(fake) numbers."""
    from itemrt.export.parity import reference_cases
    from itemrt.export.pipeline import PROBE_WORDS
    from itemrt.export.reference import reference_for_bundle
    from itemrt.stages.images import load_image

    m = Bundle.open(bundle).manifest
    check = m["head"]["chain_check"]
    used = [p for p, q in m["precisions"].items() if q["used"]]
    assert used and set(check) == {"fp32", *used}
    assert all(c["threshold"] == m["head"]["threshold"] for c in check.values())
    reference = reference_for_bundle(bundle)  # loads the trained head from the manifest
    cases = reference_cases(reference, [load_image(p) for p in samples], list(PROBE_WORDS[: m["words"]["max_objects"]]))
    ref = np.array([c.ref.p_fake for c in cases])
    assert ref.std() > 0.01  # the trained head, not the placeholder's near-constant output
    for label, c in check.items():
        assert np.abs(np.array(c["p_fake_reference"]) - ref).max() <= 1e-5
        with Runtime(bundle, precision=label) as rt:
            got = np.array([rt.detect(k.image, words=k.words).p_fake for k in cases])
        assert np.abs(np.array(c["p_fake"]) - got).max() <= 1e-5, label
        assert c["decisions_equal"] == bool(np.all((got >= c["threshold"]) == (ref >= c["threshold"])))
    capsys.readouterr()
    assert item(["info", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "(at export, placeholder head)" in out
    assert all(f"head check {label} chain with this head" in out for label in check)


def test_head_check_moves_the_default_off_int8_when_decisions_differ(trained, bundle):
    from itemrt.export.train import _chain_check, _record_chain_check

    b = Bundle.open(bundle)
    m = copy.deepcopy(b.manifest)
    c = m["head"]["chain_check"]["int8"]
    ref, got = np.array(c["p_fake_reference"]), np.array(c["p_fake"])
    i = int(np.abs(got - ref).argmax())
    assert got[i] != ref[i]
    between = (got[i] + ref[i]) / 2  # a threshold that splits the two chains on one case
    msgs = []
    check = _chain_check(bundle, b.component_path("head")[0], m["head"]["recipe"], between, msgs.append)
    assert not check["int8"]["decisions_equal"] and not check["int8"]["passed"]
    _record_chain_check(m, check, msgs.append)
    assert m["default_precision"] == "fp32" and any("default precision int8 -> fp32" in s for s in msgs)
    _record_chain_check(m, b.manifest["head"]["chain_check"], msgs.append)
    assert m["default_precision"] == "int8"


def test_a_bundle_without_parity_pairs_says_the_head_is_unchecked(features, tiny_bundle, tmp_path, capsys):
    """Bundles exported before the pairs were kept: training works, and `item info` says
    plainly that the trained head was not checked against the chains."""
    from itemrt.bundle import write_manifest
    from itemrt.export.parity import CHAIN_PAIRS

    b = tmp_path / "old"
    shutil.copytree(tiny_bundle, b)
    (b / CHAIN_PAIRS).unlink()
    m = json.loads((b / "manifest.json").read_text())
    del m["files"][CHAIN_PAIRS]
    write_manifest(b, m)
    assert item(["train", str(features), "--bundle", str(b), "--hidden", "8", "--max-epochs", "3"]) == 0
    m = Bundle.open(b).manifest
    assert m["head"]["trained"] and m["head"]["chain_check"] is None
    assert m["default_precision"] == "int8"  # nothing measured, nothing changed
    capsys.readouterr()
    assert item(["info", str(b)]) == 0
    assert "head check NOT DONE" in capsys.readouterr().out


def test_recipe_ablations_train(features, tiny_bundle, tmp_path):
    for name in RECIPES:
        b = tmp_path / name
        shutil.copytree(tiny_bundle, b)
        assert item(["train", str(features), "--bundle", str(b), "--recipe", name, "--hidden", "8",
                     "--max-epochs", "3"]) == 0
        m = Bundle.open(b).manifest
        dim = m["clip"]["dim"]
        assert m["head"]["recipe"] == name and m["head"]["input_dim"] == RECIPES[name][1](dim)
        assert m["components"]["head"]["inputs"][0]["shape"] == ["batch", RECIPES[name][1](dim)]


def test_calibration_meets_the_target_fpr(trained, bundle, features):
    assert item(["calibrate", str(features), "--bundle", str(bundle), "--target-fpr", "0.1"]) == 0
    cal = Bundle.open(bundle).manifest["head"]["calibration"]
    assert cal["target_fpr"] == 0.1 and cal["n_real"] == 10 and cal["resolved"]
    assert cal["val_fpr"] <= 0.1
    from itemrt.export.evaluate import head_p_fake

    b = Bundle.open(bundle)
    f = read_features(features)
    val = np.flatnonzero((f.columns["split"] == "val") & (f.columns["label"] == 0))
    p = head_p_fake(b, f, val)
    assert np.mean(p >= cal["threshold"]) == cal["val_fpr"]
    assert b.manifest["head"]["threshold"] == cal["threshold"]


def test_eval_tables_curves_and_robustness(trained, bundle, features, tmp_path):
    out = tmp_path / "eval"
    assert item(["eval", str(features), "--bundle", str(bundle), "--out", str(out), "--robustness", "jpeg=60"]) == 0
    rep = json.loads((out / "eval.json").read_text())
    assert set(rep["results"]) == {"diffusion", "gan", "mean", "all"}
    assert rep["results"]["all"]["n_real"] == 10 and rep["results"]["all"]["n_fake"] == 10
    # Diffusion's row: its 5 fakes against all 10 reals (the reals are shared).
    assert (rep["results"]["diffusion"]["n_real"], rep["results"]["diffusion"]["n_fake"]) == (10, 5)
    assert rep["robustness"]["jpeg=60"]["missing"] == 0
    assert (features / "perturbed" / "jpeg-60" / "meta.json").is_file()
    md = (out / "eval.md").read_text()
    assert "| diffusion |" in md and "| jpeg=60 |" in md
    for png in ("roc.png", "pr.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The ONNX head (eval) and the PyTorch head (training report) agree on the test split,
    # at the threshold each run used.
    t = trained["report"]["test"]["all"]
    for k in ("ap", "auc"):
        assert abs(rep["results"]["all"][k] - t[k]) <= 1e-9


def test_ctrl_c_then_rerun_resumes(tiny_bundle, tmp_path):
    """A real `item features` process interrupted with SIGINT keeps what it finished; the same
    command then does only the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(3)
    for i in range(300):
        label = "fake" if i % 2 else "real"
        (tmp_path / "data" / label).mkdir(parents=True, exist_ok=True)
        make_image(rng, label == "fake").resize((48, 48)).save(tmp_path / "data" / label / f"{i:03d}.png")
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "itemrt.cli", "features", str(tmp_path / "data"), "--bundle", str(tiny_bundle),
           "--out", str(out), "--threads", "1"]
    # A shell's background job starts with SIGINT ignored, which Python and its children keep.
    # With a handler here, the child starts with the default however pytest was started.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, before)
    deadline = time.monotonic() + 120
    while not ((out / LOG).is_file() and (out / LOG).stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "rerun to resume" in err
    done = len(read_features(out))
    assert 0 < done < 300
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{300 - done} images extracted, {done} already done" in r.stderr
    keys = read_features(out).columns["key"].tolist()
    assert len(keys) == len(set(keys)) == 300


def test_output_paths_that_cannot_be_written_are_typed_errors_before_any_work(tiny_bundle, tmp_path):
    from itemrt.errors import PathError
    from itemrt.export.evaluate import evaluate

    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    with pytest.raises(PathError, match="cannot make the report folder"):  # checked before features are read
        evaluate(tmp_path / "no-features", tiny_bundle, blocker, robustness=["jpeg=75"])
    with pytest.raises(FeatureStoreError, match="cannot make or open the feature store"):
        FeatureStore(blocker, {})
    with pytest.raises(FeatureStoreError, match="no feature store"):
        read_features(blocker)  # a file, not a store


def test_ctrl_c_waits_until_a_record_is_whole():
    """Ctrl-C landing inside numpy's zip writer used to surface as its ValueError and a
    traceback: records are written with SIGINT/SIGTERM held, which then arrive as usual."""
    import os
    import signal
    import time

    from itemrt.interrupts import signals_held

    got = []
    before = signal.signal(signal.SIGINT, lambda *a: got.append("SIGINT"))
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert got == []  # held while the record is written
        time.sleep(0.05)
        assert got == ["SIGINT"]  # then delivered
    finally:
        signal.signal(signal.SIGINT, before)
