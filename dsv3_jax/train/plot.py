"""The end-of-run PNG: loss parts (and the held-out loss) and per-layer expert load (max /
mean) against the step."""

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
    held_out = [r for r in history if r.get("eval_loss") is not None]
    if held_out:
        top.plot([r["step"] for r in held_out], [r["eval_loss"] for r in held_out], "o-",
                 label="held-out CE", linewidth=1, markersize=3)
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
