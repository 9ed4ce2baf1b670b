"""The end-of-run PNG: loss parts and per-layer expert load (max / mean) against the step."""

from __future__ import annotations

from pathlib import Path


def write_plot(history: list[dict], path: str | Path) -> Path:
    """Plot `metrics.jsonl` records (as dicts) to `path` (PNG) and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for key, label in (("loss", "total loss"), ("ce", "next-token CE"), ("mtp", "MTP CE")):
        top.plot(steps, [r[key] for r in history], label=label, linewidth=1)
    top.set_ylabel("loss")
    top.legend()
    top.grid(alpha=0.3)
    layers = len(history[0]["imbalance"]) if history else 0
    for i in range(layers):
        bottom.plot(steps, [r["imbalance"][i] for r in history], label=f"MoE layer {i}", linewidth=1)
    bottom.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    bottom.set_ylabel("expert load max / mean")
    bottom.set_xlabel("step")
    if layers:
        bottom.legend(fontsize="small")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
