"""benchmarks/serve_load.py --smoke: three server processes under one load, the table written."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_long_context_bench import tables

SCRIPT = ROOT / "benchmarks" / "serve_load.py"


@pytest.mark.slow
def test_smoke_run_writes_the_table(tmp_path):
    """A few minutes on 2 cores: three servers, each compiling its buckets (the later ones load
    most from the shared cache), a warm-up pass and the timed load."""
    out = tmp_path / "bench.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    text = out.read_text()
    assert re.search(r"^## \d{4}-\d\d-\d\d \d\d:\d\d Serving under load", text, re.M)
    assert "Greedy tokens identical across the configurations: yes" in text
    (rows,) = tables(text)
    assert [r[0] for r in rows] == ["(a) no prefix caching, whole prompts",
                                    "(b) prefix caching, whole prompts",
                                    "(c) prefix caching + chunked prefill"]
    for r in rows:
        assert float(r[1]) > 0 and float(r[2]) > 0 and float(r[3]) > 0, r  # req/s, tok/s, TTFT
    assert float(rows[0][8]) == 0 and float(rows[1][8]) > 0 and float(rows[2][8]) > 0  # hit rate
