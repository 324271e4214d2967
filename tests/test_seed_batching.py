"""--seed-batching: with `loop`, seed i of N is computed by the very program of a one-seed run, so it equals that run
bit for bit (parameters, every TensorBoard scalar but SPS, the in-context evaluation of a meta-env); `vmap` (one
batched program) agrees to float round-off; `loop` on several devices is refused before anything compiles."""

import glob
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_lstm_popgym
import ppo_s5_memory
import ppo_s5_metarl
import ppo_s5_popgym

pytestmark = pytest.mark.timeout(600)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# MetaCartPole (short trials): training, then the final in-context evaluation, both per seed
TINY = dict(env_id="MetaCartPole", num_envs=4, num_steps=16, update_epochs=2, num_minibatches=2, total_timesteps=3 * 64,
            updates_per_chunk=1, checkpoint_every=0, save_model=True, eval_episodes=2, compile_cache="")  # fmt: skip
MEMORY = {ppo_s5_popgym: dict(d_model=8, ssm_size=8, n_layers=1), ppo_lstm_popgym: dict(hidden_size=8, cell="gru")}


def run(module, tmp_path, name, **kw):
    """main() of a tiny run; returns (saved parameters with a seed axis, {seed: {tag: [(step, value)]}})."""
    log_dir = tmp_path / name
    module.main(module.Args(log_dir=str(log_dir), **TINY, **MEMORY[module], **kw))
    (run_dir,) = glob.glob(str(log_dir / "*"))
    params = module.load_model(os.path.join(run_dir, f"{module.Args.exp_name}.cleanrl_model"))[1]
    scalars = {}
    for folder in sorted(glob.glob(os.path.join(run_dir, "seed_*"))):
        events = EventAccumulator(folder)
        events.Reload()
        scalars[os.path.basename(folder)] = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
                                             for tag in events.Tags()["scalars"] if tag != "charts/SPS"}  # fmt: skip
    return params, scalars


@pytest.mark.parametrize("module", [ppo_s5_popgym, ppo_lstm_popgym], ids=["s5", "gru"])
def test_loop_seed_equals_its_one_seed_run_bit_for_bit(module, tmp_path):
    three, three_scalars = run(module, tmp_path, "three", seed=1, num_seeds=3, seed_batching="loop")
    one, one_scalars = run(module, tmp_path, "one", seed=2, num_seeds=1, seed_batching="loop")
    for a, b in zip(jax.tree.leaves(three), jax.tree.leaves(one), strict=True):
        np.testing.assert_array_equal(a[1], b[0])
    assert "eval/trial_16_return" in one_scalars["seed_2"] and len(one_scalars["seed_2"]["losses/value_loss"]) == 3
    assert three_scalars["seed_2"] == one_scalars["seed_2"]  # every tag, step and value
    assert three_scalars["seed_1"] != three_scalars["seed_2"]  # the seeds really differ
    # vmap trains the same seeds in one batched program: the same to float round-off (measured ~6e-8)
    vmapped, _ = run(module, tmp_path, "vmap", seed=1, num_seeds=3, seed_batching="vmap")
    for a, b in zip(jax.tree.leaves(three), jax.tree.leaves(vmapped), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_memory_loop_pair_equals_its_one_pair_run_bit_for_bit(tmp_path):
    """ppo_s5_memory: lengths 2 and 3 share 36-step rollouts, so one group trains their 4 (length, seed) pairs; with
    loop, pair (L = 3, seed 2) is the run of that length and seed alone, bit for bit, also in --eval-model."""
    tiny = dict(num_envs=4, num_minibatches=2, update_epochs=1, d_model=8, ssm_size=8, n_layers=1, num_steps=36,
                total_timesteps=3 * 144, updates_per_chunk=1, checkpoint_every=0, save_model=True, compile_cache="",
                seed_batching="loop")  # fmt: skip
    runs = {}
    for name, kw in {"four": dict(memory_lengths=(2, 3), seed=1, num_seeds=2),
                     "one": dict(memory_lengths=(3,), seed=2, num_seeds=1)}.items():  # fmt: skip
        ppo_s5_memory.main(ppo_s5_memory.Args(log_dir=str(tmp_path / name), **tiny, **kw))
        (run_dir,) = glob.glob(str(tmp_path / name / "*"))
        model = os.path.join(run_dir, "ppo_s5_memory.cleanrl_model")
        models = ppo_s5_memory.load_model(model)[1]
        events = EventAccumulator(os.path.join(run_dir, "len_3_seed_2"))
        events.Reload()
        scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
                   if tag != "charts/SPS"}  # fmt: skip
        evaluation = ppo_s5_memory.evaluate_model(ppo_s5_memory.Args(eval_model=model, eval_episodes=8, **tiny, **kw))
        runs[name] = models, scalars, evaluation["per_run"]["len_3_seed_2"]
    (models4, scalars4, eval4), (models1, scalars1, eval1) = runs["four"], runs["one"]
    assert len(models4) == 4 and len(scalars1["losses/value_loss"]) == 3
    for a, b in zip(jax.tree.leaves(models4["len_3_seed_2"]), jax.tree.leaves(models1["len_3_seed_2"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert scalars4 == scalars1 and eval4 == eval1


def test_metarl_loop_seed_equals_its_one_seed_run_bit_for_bit(tmp_path):
    """ppo_s5_metarl: training and the periodic evaluations on training and held-out envs, per seed."""
    tiny = dict(train_envs=("Pendulum-v1",), heldout_envs=("Swimmer-misc",), num_envs=4, num_steps=12,
                num_minibatches=2, update_epochs=1, d_model=16, ssm_size=8, n_layers=1, episode_length=3,
                episodes_per_trial=2, eval_trials=3, eval_every=2, total_timesteps=4 * 48, updates_per_chunk=1,
                checkpoint_every=0, save_model=True, compile_cache="", seed_batching="loop")  # fmt: skip
    runs = {}
    for name, kw in {"three": dict(seed=1, num_seeds=3), "one": dict(seed=2, num_seeds=1)}.items():
        summary = ppo_s5_metarl.main(ppo_s5_metarl.Args(log_dir=str(tmp_path / name), **tiny, **kw))
        (run_dir,) = glob.glob(str(tmp_path / name / "*"))
        params = ppo_s5_metarl.load_model(os.path.join(run_dir, "ppo_s5_metarl.cleanrl_model"))[1]
        events = EventAccumulator(os.path.join(run_dir, "seed_2"))
        events.Reload()
        scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
                   if tag != "charts/SPS"}  # fmt: skip
        runs[name] = params, scalars, [e["per_seed"]["2"] for e in summary["evals"]]
    (params3, scalars3, evals3), (params1, scalars1, evals1) = runs["three"], runs["one"]
    for a, b in zip(jax.tree.leaves(params3), jax.tree.leaves(params1), strict=True):
        np.testing.assert_array_equal(a[1], b[0])
    assert any(tag.startswith("eval/") for tag in scalars1) and len(evals1) == 3  # updates 0, 2, 4
    assert scalars3 == scalars1 and evals3 == evals1


def test_loop_refused_on_several_devices(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, "ppo_s5_popgym.py", "--seed-batching=loop", "--num-seeds=2",
                             f"--log-dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 2 and result.stderr.strip().endswith(
        "error: --seed-batching loop runs every seed on one device, and this run has 2 devices: use vmap"
    ), result.stderr[-2000:]
    assert not os.listdir(tmp_path)


@pytest.mark.skipif(jax.default_backend() != "cpu" or jax.device_count() != 1, reason="auto's rule for one CPU device")
def test_auto_takes_what_measured_faster_and_old_runs_keep_vmap():
    """auto (the default) resolves before compiling, so the logged hyperparameters say which ran: loop for one seed of
    the LSTM/GRU at width >= 256 on a CPU (1.46x / 1.05x in benchmarks/bench_seed_batching.py), vmap otherwise."""
    resolved = lambda module, **kw: module.derive_sizes(module.Args(**kw)).seed_batching  # noqa: E731
    assert resolved(ppo_lstm_popgym) == "loop" and resolved(ppo_lstm_popgym, cell="gru") == "loop"
    assert resolved(ppo_lstm_popgym, num_seeds=2) == resolved(ppo_lstm_popgym, hidden_size=64) == "vmap"
    assert resolved(ppo_s5_metarl, memory="lstm", hidden_size=256) == "loop"
    assert resolved(ppo_s5_metarl, memory="lstm") == resolved(ppo_s5_metarl) == "vmap"  # width 64; S5
    assert resolved(ppo_s5_popgym) == resolved(ppo_s5_popgym, num_seeds=4) == "vmap"
    assert ppo_s5_memory.resolve_auto(ppo_s5_memory.Args()).seed_batching == "vmap"
    assert resolved(ppo_lstm_popgym, seed_batching="vmap") == "vmap"  # an explicit choice stays
    # a run saved before --seed-batching existed ran vmap, and resumes or evaluates so
    for module in (ppo_s5_popgym, ppo_lstm_popgym, ppo_s5_metarl, ppo_s5_memory):
        assert module.args_from({"seed": 3}).seed_batching == "vmap"
