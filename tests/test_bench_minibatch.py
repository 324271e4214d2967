"""Smoke test of benchmarks/bench_minibatch.py: --quick in a subprocess, JSON and FLOP counts checked."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_minibatch.py")

pytestmark = pytest.mark.timeout(400)


def test_quick_minibatch_benchmark(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out-dir", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=380)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench_minibatch_quick.json").read_text())
    rows = {r["model"]: r for r in report["models"]}
    assert list(rows) == ["s5 sequential", "s5 parallel", "s5 no scan", "s5 2 layers", "lstm"]
    for r in rows.values():
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["compile_s"] > 0
        assert r["gflop"] == pytest.approx(6 * r["matrix_params"] * 32 * 2 / 1e9)  # quick: 2 sequences x 32 steps
    w = report["settings"]["width"]
    # Two S5 layers hold B (w/2 complex x w), C (w x w/2 complex) and the GLU's two w x w kernels: 4 w^2
    # matrix elements each; an LSTM of width w holds 8 w^2 (four gates, input and hidden kernels).
    assert rows["s5 sequential"]["matrix_params"] - rows["s5 2 layers"]["matrix_params"] == 8 * w * w
    assert rows["lstm"]["matrix_params"] == rows["s5 2 layers"]["matrix_params"]  # the equal-FLOP pair
    assert rows["s5 parallel"]["matrix_params"] == rows["s5 no scan"]["matrix_params"] == rows["s5 sequential"]["matrix_params"]
    assert "| s5 sequential |" in (out / "bench_minibatch_quick.md").read_text()
