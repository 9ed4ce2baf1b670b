"""benchmarks/long_context.py --smoke: every part runs its code path on CPU and writes its tables."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "long_context.py"


def tables(text: str) -> list[list[list[str]]]:
    """The markdown tables in `text`, each its data rows (header and separator dropped)."""
    found, rows = [], None
    for ln in text.splitlines() + [""]:
        if ln.startswith("|"):
            rows = [] if rows is None else rows
            rows.append([c.strip() for c in ln.strip("|").split("|")])
        elif rows is not None:
            found.append(rows[2:])
            rows = None
    return found


@pytest.mark.slow
def test_smoke_run_writes_every_table(tmp_path):
    """33-37 s on 2 lightly loaded cores: 5 processes (one per configuration), each compiling."""
    out = tmp_path / "bench.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    text = out.read_text()
    assert re.search(r"^## \d{4}-\d\d-\d\d \d\d:\d\d Long context: blockwise vs dense", text, re.M)
    assert "- Command: `python benchmarks/long_context.py --smoke --out " in text
    train, serve, layer = tables(text)
    assert [r[0] for r in train] == ["512"], train  # seq 512: both attentions ran a step
    assert float(train[0][1]) > 0 and float(train[0][2]) > 0, train
    assert "whole vs chunked prefill: **identical**" in text
    assert [r[1] for r in serve] == ["whole (1 prefill steps)", "256 (2 prefill steps)"], serve
    assert {r[1] for r in layer} == {"default: blockwise", "dense"}, layer
    for r in layer:
        assert r[0] == "cpu (cpu)" and all(float(v) > 0 for v in r[2:4]), r
