"""PNG charts of a report: stacked per-stage bars per backend, and latency against batch size."""

from __future__ import annotations

from pathlib import Path

from .report import GROUPS


def write(rep: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    ok = {k: b for k, b in rep["backends"].items() if b["status"] == "ok"}
    names = list(ok)
    machine = f"{rep['machine']['cpu']}, {rep['machine']['cores']} cores"
    paths = []

    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.7 * len(names)))
    left = [0.0] * len(names)
    for g in GROUPS:
        widths = [ok[n]["groups_ms"][g] for n in names]
        ax.barh(names, widths, left=left, label=g)
        left = [a + b for a, b in zip(left, widths)]
    for i, n in enumerate(names):
        ax.text(left[i], i, f" {ok[n]['stages_ms']['total']['p50']:.0f} ms", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("p50 latency per image, ms (batch 1)")
    ax.set_title(f"ITEM chain by stage: {machine}", fontsize=10)
    ax.set_xlim(0, max(left) * 1.2)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "stages.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for n in names:
        batch = ok[n].get("throughput", {}).get("batch", {})
        if batch:
            sizes = sorted(int(k) for k in batch)
            ax.plot(sizes, [batch[str(s)]["batch_ms"] / s for s in sizes], marker="o", label=n)
    ax.set_xlabel("batch size (detect_batch)")
    ax.set_ylabel("ms per image")
    ax.set_title(f"Latency per image against batch size: {machine}", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "batch.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
