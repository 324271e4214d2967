"""PPO + S5 on POPGym: GAE, seeds (vmap, determinism, devices), the script end to end, bad inputs."""

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_s5_popgym as s5

pytestmark = pytest.mark.timeout(600)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "ppo_s5_popgym.py")
TINY = dict(num_envs=4, num_steps=8, update_epochs=2, num_minibatches=2, d_model=16, ssm_size=8, n_layers=1)
TINY_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]


def python_loop_gae(rewards, values, dones, last_value, last_done, gamma, lam):
    T = len(rewards)
    advantages = np.zeros_like(rewards)
    last_gae = 0.0
    for t in reversed(range(T)):
        next_non_terminal = 1.0 - (last_done if t == T - 1 else dones[t + 1])
        next_value = last_value if t == T - 1 else values[t + 1]
        delta = rewards[t] + gamma * next_value * next_non_terminal - values[t]
        advantages[t] = last_gae = delta + gamma * lam * next_non_terminal * last_gae
    return advantages


@pytest.mark.parametrize("lam", [1.0, 0.95])
def test_gae_equals_python_loop(lam):
    rng = np.random.default_rng(0)
    T, E = 20, 5
    rewards, values = rng.normal(size=(T, E)), rng.normal(size=(T, E))
    dones = rng.random((T, E)) < 0.2
    last_value, last_done = rng.normal(size=E), rng.random(E) < 0.5
    with jax.enable_x64(True):
        adv, ret = s5.compute_gae(*map(jnp.asarray, (rewards, values, dones, last_value, last_done)), 0.99, lam)
    expected = np.stack([python_loop_gae(rewards[:, e], values[:, e], dones[:, e].astype(float), last_value[e],
                                         float(last_done[e]), 0.99, lam) for e in range(E)], 1)  # fmt: skip
    np.testing.assert_allclose(np.asarray(adv), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ret), expected + values, rtol=1e-12, atol=1e-12)


class Trainer:
    """The jitted init and update chunks of one configuration, compiled once per chunk length."""

    def __init__(self, args):
        init, self.update_chunk = s5.make_train(args)
        self.init, self.chunks = jax.jit(jax.vmap(init)), {}

    def __call__(self, seeds, chunks):
        runner = self.init(jax.vmap(jax.random.key)(jnp.array(seeds)))
        for n in chunks:
            if n not in self.chunks:
                self.chunks[n] = jax.jit(jax.vmap(partial(self.update_chunk, num_updates=n)))
            runner, metrics = self.chunks[n](runner)
        return jax.device_get((runner.train_state.params, metrics))


def assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **tol)


@pytest.fixture(scope="module")
def four_seeds():
    """Seeds 5-8 of the tiny CartPoleEasy run (3 updates in 3 chunks of 1, as the CLI runs it), on one device."""
    trainer = Trainer(s5.derive_sizes(s5.Args(env_id="CartPoleEasy", total_timesteps=3 * 32, **TINY)))
    return trainer, trainer([5, 6, 7, 8], chunks=(1, 1, 1))


def test_seeds_vmapped_single_chunked_and_repeated_runs_agree(four_seeds):
    trainer, (params4, metrics4) = four_seeds
    assert np.isfinite(metrics4["value_loss"]).all()
    assert not np.allclose(jax.tree.leaves(params4)[0][0], jax.tree.leaves(params4)[0][1])  # seeds differ
    # seed 7 of the 4-seed run is the 1-seed run with seed 7, and 1 + 2 updates equal 3 in chunks of 1
    params1, metrics1 = trainer([7], chunks=(1, 2))
    # atol 1e-6, no rtol: the runs differ by float32 round-off (measured 3e-8), while these 3 tiny updates move half
    # the parameters by more than 1e-5 (median 1.3e-5, max 6e-4): a run that trained on other rollouts fails
    assert_trees_close(jax.tree.map(lambda x: x[2], params4), jax.tree.map(lambda x: x[0], params1),
                       rtol=0, atol=1e-6)  # fmt: skip
    # two runs with one seed are identical, bit for bit
    again = trainer([7], chunks=(1, 2))
    for x, y in zip(jax.tree.leaves((params1, metrics1)), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(x, y)


def run_script(*flags, env=None, timeout=600):  # the persistent compilation cache off: tests write nothing to ~
    return subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "JAX_COMPILATION_CACHE_DIR": "", **(env or {})}, cwd=ROOT)  # fmt: skip


def test_smoke_run_on_two_forced_host_devices_writes_everything_and_equals_one_device(tmp_path, four_seeds):
    """The CLI end to end (2 seeds sharded over 2 forced host devices): TensorBoard runs, strict summary.json, the
    model file, a checkpoint; its parameters equal the same seeds trained on one device in-process."""
    two_devices = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"  # conftest's flags too
    result = run_script(*TINY_FLAGS, "--total-timesteps=96", "--num-seeds=2", "--seed=5", "--save-model",
                        "--env-id=CartPoleEasy", f"--log-dir={tmp_path}", env={"XLA_FLAGS": two_devices})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 cpu device(s)" in result.stdout and "compiled in" in result.stdout
    assert "MMER over 2 seed(s)" in result.stdout
    (run_dir,) = glob.glob(str(tmp_path / "CartPoleEasy__ppo_s5_popgym__5__*"))
    assert sorted(os.listdir(run_dir)) == ["checkpoints", "ppo_s5_popgym.cleanrl_model", "seed_5", "seed_6",
                                           "summary.json"]  # fmt: skip
    for seed in (5, 6):
        acc = EventAccumulator(os.path.join(run_dir, f"seed_{seed}"))
        acc.Reload()
        scalars = set(acc.Tags()["scalars"])
        for tag in ("charts/episodic_return", "charts/episodic_length", "charts/mmer", "charts/SPS",
                    "charts/learning_rate", "losses/value_loss", "losses/policy_loss", "losses/entropy",
                    "losses/approx_kl", "losses/old_approx_kl", "losses/clipfrac", "losses/explained_variance"):  # fmt: skip
            assert tag in scalars, tag
        assert [e.step for e in acc.Scalars("losses/value_loss")] == [32, 64, 96]
        assert any("hyperparameters" in t for t in acc.Tags()["tensors"])
        mmer = [e.value for e in acc.Scalars("charts/mmer")]
        assert mmer == sorted(mmer)  # a running maximum
    with open(os.path.join(run_dir, "summary.json")) as f:  # strict JSON: NaN or Infinity would fail here
        summary = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert summary["updates"] == 3 and summary["global_step"] == 96
    assert set(summary["per_seed"]) == {"5", "6"}
    assert summary["args"]["env_id"] == "CartPoleEasy" and summary["compile_seconds"] > 0
    for r in summary["per_seed"].values():
        assert 0 < r["mmer"] <= 1  # CartPole returns lie in (0, 1]
    model_args, params = s5.load_model(os.path.join(run_dir, "ppo_s5_popgym.cleanrl_model"))
    assert model_args.env_id == "CartPoleEasy"
    assert jax.tree.leaves(params)[0].shape[0] == 2  # leading seed axis
    one_device = jax.tree.map(lambda x: x[:2], four_seeds[1][0])  # seeds 5 and 6
    assert_trees_close(params, one_device, rtol=0, atol=1e-6)  # round-off (measured 3e-8) but no other rollouts


def test_ctrl_c_keeps_what_was_logged(tmp_path):
    proc = subprocess.Popen([sys.executable, SCRIPT, *TINY_FLAGS, "--total-timesteps=100000000",
                             "--updates-per-chunk=1", f"--log-dir={tmp_path}"], cwd=ROOT,  # fmt: skip
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_COMPILATION_CACHE_DIR": ""})
    deadline = time.time() + 300
    for line in proc.stdout:
        if line.startswith("step") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "interrupted after" in err
    (summary_path,) = glob.glob(str(tmp_path / "*" / "summary.json"))
    with open(summary_path) as f:
        updates = json.load(f)["updates"]
    assert updates >= 1
    # and a checkpoint of the last completed chunk (at most the updates logged), for --resume
    (checkpoint,) = glob.glob(str(tmp_path / "*" / "checkpoints" / "*"))
    assert 1 <= int(os.path.basename(checkpoint)) <= updates


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        tyro.cli(s5.Args, args=["--help"])
    out = capsys.readouterr().out
    for field in fields(s5.Args):
        assert f"--{field.name.replace('_', '-')}" in out, field.name
    assert out.count("(default") >= len(fields(s5.Args)) - 1


def test_bad_input_fails_fast_with_one_line():
    """The CLI path once (one line on stderr, no traceback, nothing compiled); the messages of the other refusals
    come from the same check_args, called below."""
    result = run_script("--env-id=RepeatPreviusEasy", timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "RepeatPreviousEasy" in lines[0], result.stderr
    assert "compiled" not in result.stdout


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(total_timesteps=100), "zero updates"),
        (dict(num_envs=6, num_minibatches=4), "divisible"),
        (dict(num_envs=0), "--num-envs must be positive"),
        (dict(learning_rate=-1), "--learning-rate must be positive"),
        (dict(ssm_size=12, s5_blocks=4), "--s5-blocks"),
        (dict(num_processes=2), "add --distributed"),
        (dict(distributed=True, eval_model="runs/x"), "drop --distributed"),
    ],
)
def test_bad_inputs_are_refused_with_one_line(changes, message):
    error = s5.check_args(dataclasses.replace(s5.Args(), **changes))
    assert error is not None and message in error and "\n" not in error


def test_load_model_and_evaluation_reproduce_the_trained_policy(tmp_path):
    """`load_model` reads the `--save-model` file and the final checkpoint to the same parameters, bit for bit;
    `--eval-model` (sampling, as in training) plays 200 fresh episodes per seed and gets the return that training
    logged for its last rollout. Tolerance: 4 standard errors of the difference of the two means (eval episodes
    and the rollout's completed episodes, both with the eval's per-episode std); the rollout was played by the
    parameters one update older, which at lr 1e-3 moves CartPole's return far less than that."""
    args = s5.Args(env_id="CartPoleEasy", total_timesteps=4 * 1024, num_seeds=2, save_model=True, log_dir=str(tmp_path),
                   **{**TINY, "num_envs": 16, "num_steps": 64, "learning_rate": 1e-3})  # fmt: skip
    summary = s5.main(args)
    (run_dir,) = glob.glob(str(tmp_path / "*"))
    model_path = os.path.join(run_dir, "ppo_s5_popgym.cleanrl_model")
    (file_args, file_params), (ckpt_args, ckpt_params) = s5.load_model(model_path), s5.load_model(run_dir)
    assert file_args == ckpt_args and file_args.env_id == "CartPoleEasy" and file_args.num_updates == 4
    for x, y in zip(jax.tree.leaves(file_params), jax.tree.leaves(ckpt_params), strict=True):
        assert x.shape[0] == 2  # leading seed axis
        np.testing.assert_array_equal(x, y)
    result = s5.evaluate_model(s5.Args(**{**vars(file_args), "eval_model": model_path, "eval_episodes": 200}))
    with open(os.path.join(run_dir, "eval.json")) as f:
        assert json.loads(f.read(), parse_constant=lambda c: pytest.fail(c)) == result
    last_rollout_episodes = s5.restore_checkpoint(run_dir, meta_only=True)[1]["history"][-1]["episodes"]
    for i, seed in enumerate(["1", "2"]):
        trained, evaluated = summary["per_seed"][seed]["final_episodic_return"], result["per_seed"][seed]
        tolerance = 4 * evaluated["std"] * np.sqrt(1 / 200 + 1 / last_rollout_episodes[i])
        assert abs(evaluated["mean"] - trained) < tolerance, (seed, evaluated, trained, tolerance)
    greedy = s5.evaluate_model(s5.Args(**{**vars(file_args), "eval_model": run_dir, "eval_episodes": 8, "eval_greedy": True}))
    assert all(0 < r["mean"] <= 1 for r in greedy["per_seed"].values())  # CartPole returns lie in (0, 1]
