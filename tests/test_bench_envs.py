"""Smoke test of benchmarks/bench_envs.py: --quick on two env ids, in a subprocess, JSON checked."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_envs.py")

pytestmark = pytest.mark.timeout(300)


def run_bench(*flags, cwd):
    return subprocess.run([sys.executable, SCRIPT, *flags], cwd=cwd, capture_output=True, text=True, timeout=280)


def test_quick_benchmark_writes_json_and_table(tmp_path):
    out = tmp_path / "results"
    proc = run_bench("--quick", "--env-ids", "RepeatFirstEasy", "CartPoleHard", "--out-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench_envs_quick.json").read_text())
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["jax"] and machine["popgym"]
    assert report["args"]["quick"] and report["args"]["num_envs"] == [1, 8]
    # Aliases resolve to canonical ids, in the order given.
    assert [r["env_id"] for r in report["results"]] == ["RepeatFirstEasy", "PositionOnlyCartPoleHard"]
    for r in report["results"]:
        assert set(r["jax_steps_per_s"]) == {"1", "8"}  # make_vec at each width
        assert set(r["gymnax_steps_per_s"]) == {"8"}  # the old path, vmap(env.step), at the widest
        assert all(v > 0 for v in [*r["jax_steps_per_s"].values(), *r["gymnax_steps_per_s"].values()])
        assert r["popgym_steps_per_s"] > 0 and r["load_average"] >= 0
        assert r["speedup_widest_vs_popgym"] == pytest.approx(r["jax_steps_per_s"]["8"] / r["popgym_steps_per_s"])
        assert r["speedup_vs_gymnax"]["8"] == pytest.approx(r["jax_steps_per_s"]["8"] / r["gymnax_steps_per_s"]["8"])
    table = (out / "bench_envs_quick.md").read_text()
    assert "| RepeatFirstEasy |" in table and "| PositionOnlyCartPoleHard |" in table
    assert "make_vec x8" in table and "gymnax x8" in table
    assert machine["cpu"] in table and machine["jax"] in table
    assert "| RepeatFirstEasy |" in proc.stdout  # the table is printed too


def test_unknown_env_id_fails_before_compiling(tmp_path):
    proc = run_bench("--quick", "--env-ids", "RepeatFirstEasyy", "--out-dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode != 0 and "RepeatFirstEasy" in proc.stderr
    assert not any(tmp_path.iterdir())
