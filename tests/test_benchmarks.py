"""Smoke tests of benchmarks/bench_memory_layers.py, bench_end_to_end.py, bench_seed_batching.py and bench_learning.py:
each script's --quick mode in a subprocess into a temporary results folder; JSON fields, tables and
PNGs checked. Numbers are not asserted beyond being positive (speed is reported, never tested)."""

import importlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.timeout(300)


def run_bench(name, *flags, cwd):
    script = os.path.join(ROOT, "benchmarks", f"{name}.py")
    return subprocess.run([sys.executable, script, *flags], cwd=cwd, capture_output=True, text=True, timeout=280)


def benchmark_module(name: str):
    """A module of benchmarks/, imported with that folder on sys.path (the drivers import bench_common beside them)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))


def check_machine(machine):
    assert machine["cores"] >= 1 and machine["cpu"] and machine["jax"] and machine["jax_devices"]
    assert len(machine["load_average_at_start"]) == 3 and len(machine["load_average_at_end"]) == 3


def test_memory_layers_quick(tmp_path):
    out = tmp_path / "results"
    proc = run_bench("bench_memory_layers", "--quick", "--out-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench_memory_layers_quick.json").read_text())
    check_machine(report["machine"])
    assert report["args"]["quick"] and report["args"]["d_model"] == 16
    assert report["memory_source"] in ("compiled_bytes.total", "device_peak_bytes")
    assert set(report["results"]) == {"s5_parallel", "s5_sequential", "lstm", "attention"}
    for name, points in report["results"].items():
        assert [p["length"] for p in points] == [64, 128], name
        for p in points:
            assert p["status"] == "ok" and p["time_s"] > 0 and p["peak_bytes"] > 0 and p["n_params"] > 0
            assert p["compiled_bytes"]["total"] > 0
    # the two S5 series are one module with two scans: same parameters
    assert report["results"]["s5_parallel"][0]["n_params"] == report["results"]["s5_sequential"][0]["n_params"]
    table = (out / "bench_memory_layers_quick.md").read_text()
    assert "| 64 |" in table and "| 128 |" in table and "s5_parallel time" in table and "attention memory" in table
    assert (out / "bench_memory_layers_quick.png").stat().st_size > 1000


def test_end_to_end_quick(tmp_path):
    out = tmp_path / "results"
    proc = run_bench("bench_end_to_end", "--quick", "--out-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench_end_to_end_smoke.json").read_text())
    check_machine(report["machine"])
    assert report["settings"]["preset"] == "smoke" and report["settings"]["env_id"] == "RepeatPreviousEasy"
    assert [(r["round"], r["model"]) for r in report["runs"]] == [(1, "S5"), (1, "LSTM")]  # alternating
    for r in report["runs"]:
        assert r["compile_s"] > 0 and r["sps"] > 0 and r["first_update_ready_s"] >= r["compile_s"]
        assert len(r["update_times_s"]) == report["settings"]["warmup_updates"] + report["settings"]["updates"]
        assert len(r["load_average_before"]) == 3 and len(r["load_average_after"]) == 3
    # both scripts got the same PPO settings
    s5, lstm = report["script_args"]["S5"], report["script_args"]["LSTM"]
    for key in ("num_envs", "num_steps", "update_epochs", "num_minibatches", "learning_rate", "env_id", "seed"):
        assert s5[key] == lstm[key], key
    summary = report["summary"]
    assert summary["ratio_sps"] == pytest.approx(summary["S5"]["sps"] / summary["LSTM"]["sps"])
    table = (out / "bench_end_to_end_smoke.md").read_text()
    assert "| 1 | S5 |" in table and "| 1 | LSTM |" in table and "S5/LSTM" in table


def test_seed_batching_quick(tmp_path):
    out = tmp_path / "results"
    proc = run_bench("bench_seed_batching", "--quick", "--out-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench_seed_batching_smoke.json").read_text())
    check_machine(report["machine"])
    runs = report["runs"]
    assert [(r["model"], r["num_seeds"], r["seed_batching"]) for r in runs] == [("GRU", 2, "vmap"), ("GRU", 2, "loop")]
    assert all(r["sps"] > 0 and r["compile_s"] > 0 for r in runs)
    (cell,) = report["cells"]
    assert cell["loop_over_vmap"] == pytest.approx(cell["loop"]["sps"] / cell["vmap"]["sps"])
    assert "| 2 | GRU |" in (out / "bench_seed_batching_smoke.md").read_text()


def test_learning_quick(tmp_path):
    out = tmp_path / "results"
    proc = run_bench("bench_learning", "--quick", "--out-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench_learning_quick.json").read_text())
    check_machine(report["machine"])
    assert report["settings"]["seeds"] == [1, 2]
    assert list(report["results"]) == ["RepeatPreviousEasy"]
    for model in ("S5", "LSTM"):
        r = report["results"]["RepeatPreviousEasy"][model]
        assert set(r["per_seed"]) == {"1", "2"} and r["global_step"] == report["settings"]["total_timesteps"]
        mmers = [v["mmer"] for v in r["per_seed"].values()]
        assert r["mmer"]["mean"] == pytest.approx(sum(mmers) / 2)
        # the curves read back from TensorBoard agree with the summary's MMER
        for seed, (steps, returns) in r["curves"].items():
            assert steps and max(returns) == pytest.approx(r["per_seed"][seed]["mmer"], abs=1e-6)
        assert len(r["curve_mean"]["steps"]) == len(r["curve_mean"]["mean"]) and not math.isnan(r["curve_mean"]["mean"][-1])
        assert os.path.isdir(r["run_dir"])
    table = (out / "bench_learning_quick.md").read_text()
    assert "| RepeatPreviousEasy |" in table and "S5 MMER" in table and "LSTM MMER" in table
    assert (out / "bench_learning_quick.png").stat().st_size > 1000


def test_bad_inputs_fail_before_compiling(tmp_path):
    proc = run_bench("bench_learning", "--quick", "--env-ids", "RepeatPreviousEasyy", "--out-dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode != 0 and "RepeatPreviousEasy" in proc.stderr
    proc = run_bench("bench_memory_layers", "--quick", "--series", "lstm", "mamba", "--out-dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode != 0 and "mamba" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_attention_resets_are_episode_masks():
    """The benchmark's attention with resets equals running each episode on its own."""
    import jax
    import numpy as np

    AttentionMemory = benchmark_module("bench_memory_layers").AttentionMemory
    module = AttentionMemory(n_layers=2, n_heads=2)
    x = jax.random.normal(jax.random.key(0), (12, 2, 8))  # [T, B, H]
    resets = np.zeros((12, 2), bool)
    resets[[0, 5, 9], 0] = True  # env 0: episodes [0, 5), [5, 9), [9, 12)
    resets[0, 1] = True  # env 1: one episode
    params = module.init(jax.random.key(1), None, x, resets)
    _, y = module.apply(params, None, x, resets)
    for start, stop in ((0, 5), (5, 9), (9, 12)):
        _, alone = module.apply(params, None, x[start:stop, :1], resets[start:stop, :1])
        np.testing.assert_allclose(y[start:stop, :1], alone, rtol=1e-5, atol=1e-5)
    _, causal = module.apply(params, None, x[:7, 1:], resets[:7, 1:])  # no position sees the future
    np.testing.assert_allclose(y[:7, 1:], causal, rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(600)  # two runs of the driver (the second reads the cells back)
def test_popgym_table_quick_and_resume(tmp_path):
    out = tmp_path / "results"
    models = ("--models", "S5", "LSTM", "GRU")
    proc = run_bench("bench_popgym_table", "--quick", *models, "--out-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench_popgym_table_quick.json").read_text())
    check_machine(report["machine"])
    assert report["settings"]["seeds"] == [1, 2] and report["settings"]["env_ids"] == ["RepeatPreviousEasy"]
    assert set(report["results"]) == {"RepeatPreviousEasy/S5", "RepeatPreviousEasy/LSTM", "RepeatPreviousEasy/GRU"}
    # the GRU column is ppo_lstm_popgym with cell=gru at the LSTM's width, everything else the same
    lstm, gru = (report["results"][f"RepeatPreviousEasy/{m}"]["script_args"] for m in ("LSTM", "GRU"))
    assert (lstm["cell"], gru["cell"]) == ("lstm", "gru") and report["settings"]["gru"] == {"hidden_size": 16, "cell": "gru"}
    assert {k: v for k, v in gru.items() if k not in ("cell", "log_dir")} == {k: v for k, v in lstm.items() if k not in ("cell", "log_dir")}
    for key, r in report["results"].items():
        assert r["source"] == "run here" and r["wall_seconds"] > 0 and r["global_step"] == 4 * 64
        assert r["mmer"]["mean"] == pytest.approx(sum(v["mmer"] for v in r["per_seed"].values()) / 2)
        assert os.path.isfile(os.path.join(r["run_dir"], "summary.json")), key
        curve = r["curve_mean"]  # from the seeds' TensorBoard runs: episodes (52 steps) first end in the 4th update
        assert curve["steps"] == [4 * 64] and len(curve["mean"]) == len(curve["std"]) == 1, curve
        assert curve["mean"][-1] == pytest.approx(r["final_episodic_return"]["mean"], abs=1e-4)
        assert sorted(r["curves"]) == ["1", "2"] and all(xs == [4 * 64] for xs, _ in r["curves"].values())
        assert np.mean([ys[-1] for _, ys in r["curves"].values()]) == pytest.approx(curve["mean"][-1], abs=1e-4)
    assert list(report["tally"]) == ["S5 vs LSTM", "S5 vs GRU"]  # one tally per baseline
    for pair, t in report["tally"].items():
        assert t["wins"] + t["ties"] + t["losses"] == t["cells"] == 1, pair
        assert report["verdicts"]["RepeatPreviousEasy"][pair] in ("S5", "tie", pair.split(" vs ")[1])
    table = (out / "bench_popgym_table_quick.md").read_text()
    header = "| env | S5 MMER | LSTM MMER | GRU MMER | S5 vs LSTM | S5 vs GRU | S5 final | LSTM final | GRU final |"
    assert header in table and "| RepeatPreviousEasy |" in table and "GRU hidden 16" in table
    row = next(line for line in table.splitlines() if line.startswith("| RepeatPreviousEasy |"))
    assert len(row.split("|")) == len(header.split("|")) + 3  # + the three wall-time columns
    for pair, t in report["tally"].items():
        assert f"{pair}: {t['wins']} wins, {t['ties']} ties, {t['losses']} losses over 1 envs" in table
    assert (out / "bench_popgym_table_quick.png").stat().st_size > 1000
    assert (out / "bench_popgym_table_quick_curves.png").stat().st_size > 1000
    # a second run reads the finished cells back instead of training again
    proc = run_bench("bench_popgym_table", "--quick", *models, "--out-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / "bench_popgym_table_quick.json").read_text())
    assert set(again["results"]) == set(report["results"])
    for key, r in again["results"].items():
        assert r["source"] == "read back" and r["per_seed"] == report["results"][key]["per_seed"]
        assert r["wall_seconds"] == pytest.approx(report["results"][key]["wall_seconds"])
        assert r["curve_mean"] == report["results"][key]["curve_mean"]


def test_popgym_table_verdict():
    module = benchmark_module("bench_popgym_table")
    best, early_mmer, tallies, verdict = (module.best, module.early_mmer, module.tallies, module.verdict)
    cell = lambda s5, lstm: {"S5": {"mmer": s5}, "LSTM": {"mmer": lstm}}  # noqa: E731
    assert verdict(cell({"mean": 0.9, "std": 0.1}, {"mean": 0.5, "std": 0.2})) == "S5"
    assert verdict(cell({"mean": 0.5, "std": 0.1}, {"mean": 0.9, "std": 0.3})) == "LSTM"
    assert verdict(cell({"mean": 0.9, "std": 0.1}, {"mean": 0.7, "std": 0.25})) == "tie"  # gap under one std
    assert verdict({"S5": {"mmer": {"mean": 1.0, "std": 0.0}}}) is None
    # three memories: S5 against each baseline, tallied per baseline; bold (best) only ahead of every other one
    m = lambda mean, std: {"mmer": {"mean": mean, "std": std}}  # noqa: E731
    env_a = {"S5": m(0.9, 0.1), "LSTM": m(0.5, 0.1), "GRU": m(0.85, 0.1)}  # S5 beats the LSTM, ties the GRU
    env_b = {"S5": m(0.2, 0.05), "LSTM": m(0.3, 0.05), "GRU": m(0.6, 0.1)}  # S5 loses to both, the GRU ahead
    env_c = {"S5": m(0.5, 0.0), "LSTM": m(0.4, 0.01)}  # the GRU not run yet
    assert verdict(env_a, "S5", "GRU") == "tie" and verdict(env_b, "S5", "GRU") == "GRU" and verdict(env_c, "S5", "GRU") is None
    models = ("S5", "LSTM", "GRU")
    assert best(env_a, models) is None and best(env_b, models) == "GRU" and best(env_c, models) == "S5"
    assert best(env_a, ("S5", "LSTM")) == "S5" and best({"S5": m(1.0, 0.0)}, models) is None
    assert tallies({"a": env_a, "b": env_b, "c": env_c}, models) == {
        "S5 vs LSTM": {"wins": 2, "ties": 0, "losses": 1, "cells": 3},
        "S5 vs GRU": {"wins": 0, "ties": 1, "losses": 1, "cells": 2},
    }
    assert list(tallies({"a": env_a}, ("LSTM", "S5"))) == ["S5 vs LSTM"]  # S5 is the reference wherever it runs
    # MMER flagged when the seeds' mean return peaks in the first 5% of training (LabyrinthEscape: early exits only)
    curve = lambda mean: {"curve_mean": {"steps": [100, 200, 2000, 4000], "mean": mean}}  # noqa: E731
    assert early_mmer(curve([0.9, 0.5, -1.0, -1.0]), total_timesteps=4000)
    assert early_mmer(curve([0.2, 0.9, -1.0, -1.0]), total_timesteps=4000)  # step 200 is 5% of 4000
    assert not early_mmer(curve([0.9, 0.5, -1.0, 0.95]), total_timesteps=4000)
    assert not early_mmer({}, total_timesteps=4000) and not early_mmer(curve([float("nan"), 0.0, 0.0, 0.5]), 4000)


def test_popgym_table_reads_committed_report_back(tmp_path, monkeypatch):
    """`--models S5 LSTM GRU --previous benchmarks/figures/bench_popgym_table_cpu.json` takes all 32 S5 and LSTM
    cells of the committed report (their saved Args are the ones the driver builds now), and the 16 GRU cells where
    the report has them (the S5/LSTM report of 2^20 steps has not); the tallies are recomputed from the cells. No
    training: the cells are only looked up."""
    table = benchmark_module("bench_popgym_table")
    from_previous = benchmark_module("bench_common").from_previous
    committed = json.loads((table.Path(ROOT) / "benchmarks/figures/bench_popgym_table_cpu.json").read_text())
    args = table.Args(models=("S5", "LSTM", "GRU"))
    cells = table.cell_args(args)
    assert len(cells) == 48 and cells["RepeatFirstEasy", "GRU"].cell == "gru"
    assert cells["RepeatFirstEasy", "GRU"].hidden_size == cells["RepeatFirstEasy", "LSTM"].hidden_size == 64
    found = {k: from_previous([committed], f"{k[0]}/{k[1]}", a, table.complete_for(a)) for k, a in cells.items()}
    has_gru = "GRU" in committed["args"]["models"]
    assert sorted(k for k, r in found.items() if r) == sorted(k for k in cells if has_gru or k[1] != "GRU")  # 32 (48)
    assert all(r["source"] == "previous report" and r["script_args"]["env_id"] == k[0] for k, r in found.items() if r)
    # the cells read back make the committed table again (the GRU column empty where the report has no GRU)
    monkeypatch.chdir(tmp_path)  # the committed run_dir paths are relative: nothing under them here
    report = {"machine": committed["machine"], "args": table.dataclasses.asdict(args),
              "settings": table.report_settings(args, cells), "results": {f"{e}/{m}": r for (e, m), r in found.items() if r}}  # fmt: skip
    assert report["settings"]["gru"] == {"hidden_size": 64, "cell": "gru"}
    assert {k: report["settings"][k] for k in committed["settings"]} == committed["settings"]
    table.finish(report, str(tmp_path), "t")
    old = committed["tally"]  # the S5/LSTM report's: {"S5": wins, "tie": ties, "LSTM": losses, "cells": n}
    old = old if has_gru else {"S5 vs LSTM": {"wins": old["S5"], "ties": old["tie"], "losses": old["LSTM"], "cells": 16},
                               "S5 vs GRU": {"wins": 0, "ties": 0, "losses": 0, "cells": 0}}  # fmt: skip
    assert report["tally"] == old and report["tally"]["S5 vs LSTM"]["cells"] == 16
    md = (tmp_path / "t.md").read_text()
    assert "| RepeatPreviousEasy | " + ("" if has_gru else "**1.000 ± 0.001** | 0.997 ± 0.002 | - | S5 | - |") in md
    t = old["S5 vs LSTM"]
    assert f"S5 vs LSTM: {t['wins']} wins, {t['ties']} ties, {t['losses']} losses over 16 envs" in md
    assert (tmp_path / "t.png").stat().st_size > 1000 and (tmp_path / "t_curves.png").stat().st_size > 1000


@pytest.mark.timeout(600)
def test_memory_length_quick(tmp_path):
    out = tmp_path / "results"
    proc = run_bench("bench_memory_length", "--quick", "--out-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench_memory_length_quick.json").read_text())
    check_machine(report["machine"])
    assert list(report["results"]) == ["3"] and report["settings"]["seeds"] == [1, 2]
    for length, row in report["results"].items():
        s5, lstm = row["S5"], row["LSTM"]
        # the same rollout, PPO settings, width, seeds and budget for both memories
        assert lstm["script_args"]["num_steps"] == row["rollout"] and lstm["script_args"]["env_id"] == f"MemoryChain-{length}"
        for key in ("learning_rate", "num_envs", "update_epochs", "num_minibatches", "gae_lambda", "ent_coef", "seed",
                    "num_seeds", "total_timesteps"):
            assert lstm["script_args"][key] == s5["script_args"][key], key
        assert lstm["script_args"]["hidden_size"] == s5["script_args"]["d_model"]
        for r in (s5, lstm):
            assert len(r["success"]) == len(r["solved"]) == 2 and r["sps"] > 0 and r["wall_seconds"] > 0
            assert all(0 <= x <= 1 for x in r["success"])
    table = (out / "bench_memory_length_quick.md").read_text()
    assert "| 3 |" in table and "Largest length solved" in table
    assert (out / "bench_memory_length_quick.png").stat().st_size > 1000


def test_cells_resume_only_with_the_same_args():
    import dataclasses

    args_match = benchmark_module("bench_common").args_match

    @dataclasses.dataclass
    class A:
        lr: float = 1e-3
        lengths: tuple = (1, 2)
        scan: str = "auto"
        new_field: int = 0  # added to the script after the run was saved
        log_dir: str = "runs"
        resume: str = ""

    saved = {"lr": 1e-3, "lengths": [1, 2], "scan": "sequential", "log_dir": "elsewhere"}
    assert args_match(saved, A())  # "auto" resolved by the script, log_dir and the new default field ignored
    assert args_match({**saved, "resume": "runs/x"}, A())  # a cell continued with --resume (to more steps) counts
    assert not args_match(saved, A(lr=3e-4)) and not args_match(saved, A(lengths=(1,)))
    assert not args_match(saved, A(new_field=1)) and not args_match(saved, A(scan="parallel"))


def test_a_cell_continued_with_resume_reports_its_time_over_all_sessions(tmp_path):
    """The driver's bench_cell.json holds the wall time of the session it ran; once the run is continued with
    --resume (summary.json newer), the cell's time is the summary's run time over all sessions plus compile."""
    import dataclasses

    finished_run = benchmark_module("bench_common").finished_run

    @dataclasses.dataclass
    class A:
        lr: float = 1e-3

    run = tmp_path / "run_1"
    run.mkdir()
    summary = {"args": {"lr": 1e-3}, "compile_seconds": 50.0, "run_seconds": 2800.0}
    cell = {"wall_seconds": 1500.0, "load_average_before": [1, 1, 1], "load_average_after": [2, 2, 2]}
    (run / "bench_cell.json").write_text(json.dumps(cell))
    (run / "summary.json").write_text(json.dumps(summary))
    os.utime(run / "bench_cell.json", (1000, 1000))  # the driver's session, then the summary of a later one
    found = finished_run(tmp_path, A(), lambda s: True)[1]
    assert found["wall_seconds"] == 2850.0 and found["continued_with_resume"] and "load_average_after" not in found
    os.utime(run / "summary.json", (900, 900))  # the summary the driver's session wrote: its own wall time
    found = finished_run(tmp_path, A(), lambda s: True)[1]
    assert found["wall_seconds"] == 1500.0 and "continued_with_resume" not in found


def test_metarl_in_context_stats_and_table(tmp_path):
    """bench_metarl's reading of a summary (no training: the run path is bench_common's, tested above): curves
    averaged over a split's envs per seed, the gain episode K - 1, the in-context criterion and the S5/LSTM verdict."""
    bench_metarl = benchmark_module("bench_metarl")
    from_previous = benchmark_module("bench_common").from_previous

    def summary(gain_seed_1, gain_seed_2, level=0.0):
        def record(update, gains):  # seed s: train env a rises by its gain, env b is flat; held-out flat
            per_seed = {str(s): {"train/a": [level, level + g, level + 2 * g], "train/b": [level] * 3,
                                 "heldout/c": [1.0, 1.0, 1.0]} for s, g in zip((1, 2), gains)}  # fmt: skip
            return {"update": update, "per_seed": per_seed}

        return {"evals": [record(0, (0.0, 0.0)), record(9, (gain_seed_1, gain_seed_2))]}

    stats = bench_metarl.split_stats(summary(0.2, 0.4))
    train, heldout = stats["train"], stats["heldout"]
    # env-averaged: (2g + 0) / 2 = g at episode 3, so the gains are 0.2 and 0.4
    assert np.allclose(train["gain"]["per_seed"], [0.2, 0.4]) and np.isclose(train["gain"]["mean"], 0.3)
    assert np.isclose(train["gain"]["std"], 0.1) and train["in_context"]  # 0.3 > max(0, 0.1)
    assert np.allclose(train["curve"]["mean"], [0.0, 0.15, 0.3]) and np.allclose(train["curve_before"]["mean"], 0)
    assert not heldout["in_context"] and heldout["gain"]["mean"] == 0 and heldout["envs"] == {"c": [1.0, 1.0, 1.0]}
    assert not bench_metarl.split_stats(summary(-0.2, 0.6))["train"]["in_context"]  # mean 0.2 under std 0.4
    cells = {"s5": {"splits": stats}, "lstm": {"splits": bench_metarl.split_stats(summary(0.2, 0.4, level=-1.0))}}
    assert bench_metarl.better(cells, "train") == "s5" and bench_metarl.better(cells, "heldout") == "tie"
    report = {"settings": {"train_envs": ["a", "b"], "heldout_envs": ["c"], "total_timesteps": 10, "seeds": [1, 2],
                           "episodes_per_trial": 3, "episode_length": 5, "obs_size": 4, "action_size": 2,
                           "eval_trials": 8}, "results": cells, "wall_seconds_total": 60, "load_range": None,
              "machine": {"cpu": "x", "cores": 2, "cores_usable": 2, "jax": "0", "jax_devices": ["cpu"],
                          "load_average_at_start": None}}  # fmt: skip
    table = bench_metarl.markdown(report)
    assert "| s5 | train | +0.000 ± 0.000 | +0.300 ± 0.100 | +0.300 ± 0.100 | yes |" in table
    assert "train: s5, heldout: tie" in table
    bench_metarl.plot(report, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    # a finished cell's record is taken again from --previous (the report keeps the final evaluation's update)
    a = bench_metarl.ppo_s5_metarl.Args(total_timesteps=9 * 64 * 120)  # 9 updates of the default 64 x 120 steps
    finished = {**summary(0.2, 0.4), "updates": 9, "final_eval": {"update": 9}, "args": json.loads(json.dumps(vars(a))),
                "source": "run here"}  # fmt: skip
    assert bench_metarl.complete_for(a)(finished)
    record = json.loads(json.dumps(bench_metarl.cell_record(finished, tmp_path)))
    assert "evals" not in record and record["splits"] == json.loads(json.dumps(stats))
    again = from_previous([{"results": {"s5": record}}], "s5", a, bench_metarl.complete_for(a))
    assert again and again["source"] == "previous report"
    assert bench_metarl.cell_record(again, None)["splits"] == record["splits"]
    assert not bench_metarl.complete_for(a)({**finished, "final_eval": {"update": 4}})  # stopped early


def test_incontext_statistics_and_verdict():
    """bench_incontext's numbers from per-seed curves: the gain (episodes 2..K minus episode 1), the verdict (trained
    interval above 0 and the memory-reset control's not), the memory benefit (trained minus control on episodes 2..K,
    paired per seed)."""
    bi = benchmark_module("bench_incontext")
    rising = np.array([[0.1, 0.2, 0.3], [0.1, 0.25, 0.35], [0.2, 0.3, 0.3]])  # 3 seeds x 3 episodes
    flat = np.array([[0.1, 0.1, 0.1], [0.1, 0.12, 0.08], [0.2, 0.2, 0.2]])
    trained, control = (bi.condition_stats(c, [1, 2, 3], 2000) for c in (rising, flat))
    assert trained["gain_per_seed"] == pytest.approx([0.15, 0.2, 0.1]) and trained["gain_mean"] == pytest.approx(0.15)
    assert 0.1 - 1e-9 <= trained["gain_ci95"][0] < 0.15 < trained["gain_ci95"][1] <= 0.2 + 1e-9  # within the seeds
    assert bi.verdict({"trained": trained, "memory_reset": control}) == "yes"
    assert bi.verdict({"trained": trained, "memory_reset": trained}) == "no"  # the control rises too
    assert bi.verdict({"trained": control, "memory_reset": control}) == "no"
    benefit = bi.memory_benefit({"trained": {"all": rising}, "memory_reset": {"all": flat}}, "all", 2000)
    assert benefit["per_seed"] == pytest.approx([0.15, 0.2, 0.1]) and benefit["mean"] == pytest.approx(0.15)


@pytest.mark.timeout(600)  # two runs of the driver (the second reads everything back)
def test_incontext_quick_and_read_back(tmp_path):
    out = tmp_path / "results"
    proc = run_bench("bench_incontext", "--quick", "--out-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench_incontext_metacartpole_quick.json").read_text())
    check_machine(report["machine"])
    assert set(report["results"]) == {"S5", "LSTM"}
    for model, r in report["results"].items():
        assert r["source"] == "run here" and r["verdict"]["all"] in ("yes", "no")
        conditions = r["splits"]["all"]
        assert set(conditions) == {"trained", "memory_reset", "untrained"}
        for c in conditions.values():  # 16 trials per curve, 2 seeds; the gain is the curve's
            curves = np.array(list(c["curve_per_seed"].values()))
            assert curves.shape == (2, 16) and ((0 <= curves) & (curves <= 1)).all()
            np.testing.assert_allclose(c["gain_per_seed"], curves[:, 1:].mean(1) - curves[:, 0], atol=2e-5)
        per_seed = {k: np.array(list(conditions[k]["curve_per_seed"].values())) for k in ("trained", "memory_reset")}
        np.testing.assert_allclose(r["memory_benefit"]["all"]["per_seed"],
                                   per_seed["trained"][:, 1:].mean(1) - per_seed["memory_reset"][:, 1:].mean(1),
                                   atol=2e-5)  # fmt: skip
        # each seed's curve of the trained weights is the one the run's own --eval-model wrote
        written = json.loads((Path(r["run_dir"]) / "eval.json").read_text())["in_context"]["per_seed"]
        for seed, curve in conditions["trained"]["curve_per_seed"].items():
            np.testing.assert_allclose(curve, written[seed]["trial_returns"], atol=1e-5)
    table = (out / "bench_incontext_metacartpole_quick.md").read_text()
    assert "| S5 | all | memory reset |" in table and "Memory benefit" in table
    assert (out / "bench_incontext_metacartpole_quick.png").stat().st_size > 1000
    again = run_bench("bench_incontext", "--quick", "--out-dir", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    report2 = json.loads((out / "bench_incontext_metacartpole_quick.json").read_text())
    assert all(r["source"] == "read back" for r in report2["results"].values())
    for model in ("S5", "LSTM"):
        assert report2["results"][model]["splits"] == report["results"][model]["splits"]


def test_repeat_previous_hard_paper_reads_runs_back(tmp_path):
    """The paper-settings reader on two tiny runs (S5 and the GRU on CartPoleEasy, whose episodes end; 3 updates
    each, the GRU's killed after its checkpoint at update 2 with its TensorBoard row 3 left behind): steps done from
    the checkpoint, the curve up to it, the MMER the maximum of that curve, the memory named from the saved Args; read
    again where the S5 folder is gone, the S5 run keeps the earlier report's numbers."""
    import ppo_lstm_popgym
    import ppo_s5_popgym

    module = benchmark_module("bench_repeat_previous_hard_paper")
    runs = tmp_path / "runs"
    tiny = dict(env_id="CartPoleEasy", num_envs=4, num_steps=16, update_epochs=1, num_minibatches=2,
                total_timesteps=3 * 64, log_dir=str(runs), updates_per_chunk=1)  # fmt: skip
    ppo_s5_popgym.main(ppo_s5_popgym.Args(exp_name="S5", d_model=8, ssm_size=8, n_layers=1, checkpoint_every=1, **tiny))
    ppo_lstm_popgym.main(ppo_lstm_popgym.Args(exp_name="GRU", cell="gru", hidden_size=8, checkpoint_every=2, **tiny))
    (gru_dir,) = runs.glob("*__GRU__*")
    (gru_dir / "summary.json").unlink()  # as if killed after update 3's logs: its last checkpoint is update 2
    shutil.rmtree(gru_dir / "checkpoints" / "3")
    report = module.main(module.Args(runs_dir=str(runs), out_dir=str(tmp_path / "out"), earlier_report=""))
    by_memory = {r["memory"]: r for r in report["runs"].values()}
    s5, gru = by_memory["S5 1x8"], by_memory["GRU 8"]
    assert (s5["updates_done"], s5["steps_done"], s5["finished"]) == (3, 192, True)
    assert (gru["updates_done"], gru["steps_done"], gru["finished"]) == (2, 128, False)
    assert s5["curve"][0] == [64, 128, 192] and gru["curve"][0] == [64, 128]
    for r in (s5, gru):
        finite = [x for x in r["curve"][1] if np.isfinite(x)]
        assert r["mmer"] == (max(finite) if finite else None)
    assert (s5["script"], gru["script"]) == ("ppo_s5_popgym.py", "ppo_lstm_popgym.py")
    assert (tmp_path / "out" / "bench_repeat_previous_hard_paper.png").stat().st_size > 0
    curve = [[64, 128, 192, 256], [float("nan"), 0.95, 0.5, 0.99]]
    assert (module.first_step_at(curve, 0.9), module.first_step_at(curve, 0.999)) == (128, None)
    # a later machine without the S5 folder: the S5 run keeps the earlier report's numbers, the GRU is read again
    earlier = tmp_path / "earlier.json"
    shutil.copyfile(tmp_path / "out" / "bench_repeat_previous_hard_paper.json", earlier)
    (s5_dir,) = runs.glob("*__S5__*")
    shutil.rmtree(s5_dir)
    again = module.main(module.Args(runs_dir=str(runs), out_dir=str(tmp_path / "out2"), earlier_report=str(earlier)))
    assert json.dumps(again["runs"], sort_keys=True) == json.dumps(json.loads(earlier.read_text())["runs"],
                                                                    sort_keys=True)  # fmt: skip (NaN: no ==)
    assert module.main(module.Args(runs_dir=str(runs), out_dir=str(tmp_path / "out3"), earlier_report=""))[
        "runs"].keys() == {gru_dir.name}
