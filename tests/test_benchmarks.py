"""Smoke tests of benchmarks/bench_memory_layers.py, bench_end_to_end.py and bench_learning.py:
each script's --quick mode in a subprocess into a temporary results folder; JSON fields, tables and
PNGs checked. Numbers are not asserted beyond being positive (speed is reported, never tested)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.timeout(300)


def run_bench(name, *flags, cwd):
    script = os.path.join(ROOT, "benchmarks", f"{name}.py")
    return subprocess.run([sys.executable, script, *flags], cwd=cwd, capture_output=True, text=True, timeout=280)


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

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from bench_memory_layers import AttentionMemory
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
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
    proc = run_bench("bench_popgym_table", "--quick", "--out-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench_popgym_table_quick.json").read_text())
    check_machine(report["machine"])
    assert report["settings"]["seeds"] == [1, 2] and report["settings"]["env_ids"] == ["RepeatPreviousEasy"]
    assert set(report["results"]) == {"RepeatPreviousEasy/S5", "RepeatPreviousEasy/LSTM"}
    for key, r in report["results"].items():
        assert r["source"] == "run here" and r["wall_seconds"] > 0 and r["global_step"] == 4 * 64
        assert r["mmer"]["mean"] == pytest.approx(sum(v["mmer"] for v in r["per_seed"].values()) / 2)
        assert os.path.isfile(os.path.join(r["run_dir"], "summary.json")), key
        curve = r["curve_mean"]  # from the seeds' TensorBoard runs: episodes (52 steps) first end in the 4th update
        assert curve["steps"] == [4 * 64] and len(curve["mean"]) == len(curve["std"]) == 1, curve
        assert curve["mean"][-1] == pytest.approx(r["final_episodic_return"]["mean"], abs=1e-4)
        assert sorted(r["curves"]) == ["1", "2"] and all(xs == [4 * 64] for xs, _ in r["curves"].values())
        assert np.mean([ys[-1] for _, ys in r["curves"].values()]) == pytest.approx(curve["mean"][-1], abs=1e-4)
    assert sum(report["tally"][k] for k in ("S5", "tie", "LSTM")) == report["tally"]["cells"] == 1
    table = (out / "bench_popgym_table_quick.md").read_text()
    assert "| RepeatPreviousEasy |" in table and "S5 MMER" in table and "LSTM MMER" in table and "wins" in table
    assert (out / "bench_popgym_table_quick.png").stat().st_size > 1000
    assert (out / "bench_popgym_table_quick_curves.png").stat().st_size > 1000
    # a second run reads the finished cells back instead of training again
    proc = run_bench("bench_popgym_table", "--quick", "--out-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / "bench_popgym_table_quick.json").read_text())
    for key, r in again["results"].items():
        assert r["source"] == "read back" and r["per_seed"] == report["results"][key]["per_seed"]
        assert r["wall_seconds"] == pytest.approx(report["results"][key]["wall_seconds"])
        assert r["curve_mean"] == report["results"][key]["curve_mean"]


def test_popgym_table_verdict():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from bench_popgym_table import early_mmer, verdict
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    cell = lambda s5, lstm: {"S5": {"mmer": s5}, "LSTM": {"mmer": lstm}}  # noqa: E731
    assert verdict(cell({"mean": 0.9, "std": 0.1}, {"mean": 0.5, "std": 0.2})) == "S5"
    assert verdict(cell({"mean": 0.5, "std": 0.1}, {"mean": 0.9, "std": 0.3})) == "LSTM"
    assert verdict(cell({"mean": 0.9, "std": 0.1}, {"mean": 0.7, "std": 0.25})) == "tie"  # gap under one std
    assert verdict({"S5": {"mmer": {"mean": 1.0, "std": 0.0}}}) is None
    # MMER flagged when the seeds' mean return peaks in the first 5% of training (LabyrinthEscape: early exits only)
    curve = lambda mean: {"curve_mean": {"steps": [100, 200, 2000, 4000], "mean": mean}}  # noqa: E731
    assert early_mmer(curve([0.9, 0.5, -1.0, -1.0]), total_timesteps=4000)
    assert early_mmer(curve([0.2, 0.9, -1.0, -1.0]), total_timesteps=4000)  # step 200 is 5% of 4000
    assert not early_mmer(curve([0.9, 0.5, -1.0, 0.95]), total_timesteps=4000)
    assert not early_mmer({}, total_timesteps=4000) and not early_mmer(curve([float("nan"), 0.0, 0.0, 0.5]), 4000)


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

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from bench_common import args_match
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))

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


def test_metarl_in_context_stats_and_table(tmp_path):
    """bench_metarl's reading of a summary (no training: the run path is bench_common's, tested above): curves
    averaged over a split's envs per seed, the gain episode K - 1, the in-context criterion and the S5/LSTM verdict."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_metarl
        from bench_common import from_previous
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))

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
