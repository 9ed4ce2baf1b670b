"""A supervised fine-tuning run on CPU: loss curve and tokens/s (all and trained).

    .venv/bin/python benchmarks/sft_run.py [--steps 300] [--conversations 2000] [--out runs/bench-sft]

Writes a chat file like the issue's acceptance run (user turns of random letters, which cannot
be learned, and always the same short assistant reply), fine-tunes configs/tiny.json on it
with `train.py --sft` (the exact command is printed and recorded; 2% of the conversations are
held out for evaluation by default) and reads the run's metrics.jsonl: the loss on the
assistant tokens at a few steps, the held-out loss at each evaluation, the median tokens/s
over all tokens and over the trained (assistant) tokens, and the plot's path. Only a correct
loss mask drives the loss towards 0 here. Appends to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, append_section, table  # noqa: E402

REPLY = "OK, done."


def write_chat_file(path: Path, n: int, seed: int = 0) -> Path:
    """`n` conversations: a user turn of 3-7 random five-letter words, the fixed reply."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(n):
            user = " ".join("".join(rng.choice(letters, 5)) for _ in range(rng.integers(3, 8)))
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": REPLY}]}) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--conversations", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", default="runs/bench-sft")
    p.add_argument("--no-append", action="store_true", help="print the table only")
    args = p.parse_args()

    out = ROOT / args.out
    chat = write_chat_file(out.with_name(out.name + "-chat.jsonl"), args.conversations)
    cmd = [sys.executable, "train.py", "--sft", str(chat.relative_to(ROOT)), "--steps",
           str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--warmup-steps", "20", "--checkpoint-every", str(max(args.steps // 4, 1)),
           "--out", args.out]
    shown = " ".join(["python", *map(shlex.quote, cmd[1:])])
    print(shown, flush=True)
    if (out / "checkpoints").exists():
        raise SystemExit(f"{out} holds an earlier run; remove it or pass another --out")
    t0, load = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    load = max(load, os.getloadavg()[0])  # other processes on the cores slow tokens/s down
    if proc.returncode:
        raise SystemExit(f"train.py failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-3000:]}")
    start = next((ln for ln in proc.stdout.splitlines() if ln.startswith("fine-tuning on")), "")
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]

    by_step = {r["step"]: r for r in records}
    marks = sorted({s for s in (1, 5, 10, 15, 20, 25, 50, 100, 200, 300, 500, args.steps)
                    if s <= args.steps} | {s for s, r in by_step.items() if "eval_loss" in r})
    rows = [[s, f"{by_step[s]['ce']:.3g}",
             f"{by_step[s]['eval_loss']:.3g}" if "eval_loss" in by_step[s] else ""] for s in marks]
    steady = records[10:] or records  # leave the compile (step 1) and the warm-up out
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    trained_tps = statistics.median(r["trained_tokens_per_s"] for r in steady)
    trained = records[-1]["trained_tokens_total"]
    total = args.batch_size * args.seq_len * len(records)
    body = "\n".join([
        f"configs/tiny.json, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, fp32, "
        f"on a generated chat file of {args.conversations} conversations (user turns of random "
        f"letters, always the reply {REPLY!r}), made by the script, then `{shown}`. "
        f"train.py says: {start}",
        "",
        table(["step", "CE on the assistant tokens", "held-out CE"], rows),
        "",
        f"Median over steps 11-{args.steps}: {tps:,.0f} tokens/s over all tokens, "
        f"{trained_tps:,.0f} trained (assistant) tokens/s; {trained:,} of the {total:,} tokens "
        f"processed were trained on ({trained / total:.1%}; the rest are the unlearnable user "
        f"turns, template markup and padding). Mean CE of the last 10 steps "
        f"{statistics.mean(r['ce'] for r in records[-10:]):.3g}. {wall:.0f} s wall for "
        f"train.py (tokenizer cached; 1-minute load average up to {load:.1f} at its start and "
        f"end, on {os.cpu_count()} cores). Plot: `{args.out}/metrics.png`.",
    ])
    late = [r for r in records if r["step"] > 25]
    if late:  # loss spikes of the tiny model at lr 3e-3 come with routing shifts
        spike = max(late, key=lambda r: r["ce"])
        before = by_step.get(spike["step"] - 2, spike)
        body += (f" Largest CE after step 25: {spike['ce']:.3g} at step {spike['step']} (max/mean "
                 f"expert load of the most loaded MoE layer {max(spike['imbalance']):.2f} there, "
                 f"{max(before['imbalance']):.2f} two steps before); {sum(r['skipped'] for r in records)} "
                 f"steps skipped.")
    print(body)
    if not args.no_append:
        append_section("Supervised fine-tuning on CPU (train.py --sft)", body)


if __name__ == "__main__":
    main()
