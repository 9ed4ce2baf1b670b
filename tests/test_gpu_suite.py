"""benchmarks/gpu_suite.py --smoke: every section runs its code path on CPU and writes its rows."""

import os
import re
import subprocess
import sys
from pathlib import Path

from dsv3_jax.layers import platform_gmm

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
# rows per section at the --smoke shapes: 2 GEMMs x 3 implementations; fwd and fwd+bwd x (ours,
# the platform's choice (ours on CPU), ragged_dot, tokamax where installed); one training step;
# decode at batch 1 and 4
EXPECTED = {"gemm": 6, "grouped": 2 * (3 + platform_gmm.have_tokamax()), "train": 1, "decode": 2}
RATE = re.compile(r"^[\d,]+(\.\d+)? (TFLOP/s|tok/s)$")


def run_suite(*args: str) -> subprocess.CompletedProcess:
    """The script in a fresh process on one CPU device (not the tests' 8 fake devices)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def table_rows(text: str) -> list[list[str]]:
    """Data rows of the markdown table in `text` (header and separator dropped)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def test_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "bench.md"
    proc = run_suite("--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    text = out.read_text()
    assert re.search(r"^## \d{4}-\d\d-\d\d \d\d:\d\d GPU suite on cpu, jax \S+$", text, re.M), text
    assert "- Command: `python benchmarks/gpu_suite.py --smoke --out " in text
    rows = table_rows(text)
    counts = {s: sum(r[0] == s for r in rows) for s in EXPECTED}
    assert counts == EXPECTED, rows
    for section, case, impl, ms, rate, speedup, note in rows:
        assert not note.startswith(("ERROR", "not run", "failed")), (case, impl, note)
        assert float(ms) > 0, (case, impl, ms)
        assert RATE.match(rate), (case, impl, rate)
        if section in ("gemm", "grouped"):
            assert re.match(r"^\d+\.\d\dx$", speedup), (case, impl, speedup)
    for section in EXPECTED:  # per-section times on stderr
        assert re.search(rf"\[{section}\] done in [\d.]+s", proc.stderr), proc.stderr[-3000:]


def test_failing_section_is_an_error_row_and_the_rest_runs():
    proc = run_suite("--only", "train,gemm", "--config", "configs/no-such-config.json",
                     "--no-write")
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    train = [r for r in rows if r[0] == "train"]
    assert len(train) == 1 and train[0][-1].startswith("ERROR FileNotFoundError"), rows
    assert sum(r[0] == "gemm" for r in rows) == EXPECTED["gemm"], rows
    assert "appended" not in proc.stdout


def test_gpu_without_fp8_runs_bf16_only(monkeypatch, capsys):
    """A GPU below compute capability 8.9 (fp8_supported() False): FP8 rows say why, no error."""
    import importlib.util

    from dsv3_jax.layers import linear

    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    monkeypatch.setattr(linear, "fp8_supported", lambda: False)
    assert suite.main(["--smoke", "--only", "gemm", "--no-write"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [r[2] for r in rows] == ["bf16 jnp.dot", "fp8_matmul"] * 2, rows
    assert all(float(r[3]) > 0 for r in rows[::2])
    assert all(r[-1].startswith("not run: compute capability") for r in rows[1::2])
