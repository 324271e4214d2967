"""PPO + LSTM/GRU on POPGym: resets, step-by-step acting, seeds, the script end to end, bad inputs."""

import glob
import json
import os
import subprocess
import sys
from dataclasses import fields

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_lstm_popgym as lstm

pytestmark = pytest.mark.timeout(600)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "ppo_lstm_popgym.py")
TINY = dict(num_envs=4, num_steps=8, update_epochs=1, num_minibatches=2, hidden_size=16)
TINY_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
CELLS = ["lstm", "gru"]
RESET_PATTERNS = {  # columns of resets[T, B]: B = 4 sequences of T = 10 steps
    "reset_at_t0": [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "consecutive_and_last": [0, 0, 1, 1, 0, 0, 0, 1, 0, 1],
    "no_resets": [0] * 10,
    "all_resets": [1] * 10,
}


def random_inputs(cell, batch, T=10, H=8, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(T, batch, H)), jnp.float32)
    # a non-zero starting carry, so that a reset that fails to clear it shows
    carry = jax.tree.map(lambda c: c + jnp.asarray(rng.normal(size=c.shape), c.dtype),
                         lstm.RNNMemory.initialize_carry(batch, H, cell))  # fmt: skip
    return x, carry


def assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **tol)


@pytest.mark.parametrize("cell", CELLS)
def test_initial_carry_is_zeros_of_flax_shape(cell):
    carry = lstm.RNNMemory.initialize_carry(3, 8, cell)
    shapes = [(3, 8), (3, 8)] if cell == "lstm" else [(3, 8)]
    assert [c.shape for c in jax.tree.leaves(carry)] == shapes
    assert all(not np.asarray(c).any() for c in jax.tree.leaves(carry))


@pytest.mark.parametrize("cell", CELLS)
def test_resets_equal_fresh_carry_per_episode_segment(cell):
    """Each reset replaces the carry by the initial one *before* its input: the outputs equal
    running every episode segment on its own, the first one from the given carry."""
    resets = np.array(list(RESET_PATTERNS.values()), bool).T  # [T, B]
    T, B = resets.shape
    x, carry = random_inputs(cell, B)
    memory = lstm.RNNMemory(hidden_size=8, cell=cell)
    params = memory.init(jax.random.key(0), carry, x, jnp.asarray(resets))
    apply = jax.jit(memory.apply)
    new_carry, y = apply(params, carry, x, jnp.asarray(resets))
    for b in range(B):
        starts = [0] + [t for t in range(1, T) if resets[t, b]]
        seg_carry = jax.tree.map(lambda c: c[b : b + 1], carry)
        for start, end in zip(starts, starts[1:] + [T]):
            if resets[start, b]:
                seg_carry = lstm.RNNMemory.initialize_carry(1, 8, cell)
            no_resets = jnp.zeros((end - start, 1), bool)
            seg_carry, seg_y = apply(params, seg_carry, x[start:end, b : b + 1], no_resets)
            np.testing.assert_allclose(y[start:end, b], seg_y[:, 0], rtol=1e-5, atol=1e-6)
        assert_trees_close(jax.tree.map(lambda c: c[b : b + 1], new_carry), seg_carry, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_acting_step_by_step_equals_the_whole_sequence(cell):
    """The rollout feeds one step at a time (T = 1); the update replays the whole sequence."""
    resets = jnp.asarray(np.array(list(RESET_PATTERNS.values()), bool).T)
    T, B = resets.shape
    obs, _ = random_inputs(cell, B, H=5, seed=1)
    network = lstm.ActorCritic(action_dim=3, continuous=False, memory=lstm.RNNMemory(hidden_size=8, cell=cell))
    carry = jax.tree.map(lambda c: c + 0.5, lstm.RNNMemory.initialize_carry(B, 8, cell))
    params = network.init(jax.random.key(0), carry, obs, resets)
    full_carry, full_logits, full_value = network.apply(params, carry, obs, resets)
    step = jax.jit(network.apply)
    logits, values = [], []
    for t in range(T):
        carry, logit, value = step(params, carry, obs[t : t + 1], resets[t : t + 1])
        logits.append(logit[0])
        values.append(value[0])
    np.testing.assert_allclose(np.stack(logits), full_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack(values), full_value, rtol=1e-5, atol=1e-6)
    assert_trees_close(carry, full_carry, rtol=1e-5, atol=1e-6)


def python_loop_gae(rewards, values, dones, last_value, last_done, gamma, lam):
    T = len(rewards)
    advantages, last_gae = np.zeros_like(rewards), 0.0
    for t in reversed(range(T)):
        next_non_terminal = 1.0 - (last_done if t == T - 1 else dones[t + 1])
        next_value = last_value if t == T - 1 else values[t + 1]
        delta = rewards[t] + gamma * next_value * next_non_terminal - values[t]
        advantages[t] = last_gae = delta + gamma * lam * next_non_terminal * last_gae
    return advantages


def test_gae_equals_python_loop():
    rng = np.random.default_rng(0)
    T, E = 20, 5
    rewards, values = rng.normal(size=(T, E)), rng.normal(size=(T, E))
    dones = rng.random((T, E)) < 0.2
    last_value, last_done = rng.normal(size=E), rng.random(E) < 0.5
    with jax.enable_x64(True):
        adv, ret = lstm.compute_gae(*map(jnp.asarray, (rewards, values, dones, last_value, last_done)), 0.99, 0.95)
    expected = np.stack([python_loop_gae(rewards[:, e], values[:, e], dones[:, e].astype(float), last_value[e],
                                         float(last_done[e]), 0.99, 0.95) for e in range(E)], 1)  # fmt: skip
    np.testing.assert_allclose(np.asarray(adv), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ret), expected + values, rtol=1e-12, atol=1e-12)


def start_script(*flags):  # the persistent compilation cache off: tests write nothing to ~
    return subprocess.Popen([sys.executable, SCRIPT, *flags], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "JAX_COMPILATION_CACHE_DIR": ""})


def finish(proc, timeout=420):
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def load_model(run_dir):
    (path,) = glob.glob(os.path.join(run_dir, "*.cleanrl_model"))
    with open(path, "rb") as f:
        return flax.serialization.msgpack_restore(f.read())


def test_cli_run_equals_single_seed_runs_and_its_model_evaluates(tmp_path):
    """One CLI run (2 seeds, GRU, one chunk of 2 updates, --save-model) checked for everything a run writes: a
    TensorBoard run per seed with every CleanRL tag at each update's global step, the hyperparameter table, the MMER a
    running maximum, summary.json, the model file. Its seed 2 equals `--seed 2 --num-seeds 1` run in this process in
    chunks of 1 update (seed vmapping and chunking change nothing); --eval-model from the CLI evaluates the model."""
    common = dict(env_id="CartPoleEasy", total_timesteps=64, cell="gru", save_model=True, **TINY)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in common.items() if k != "save_model"]
    two_proc = start_script(*flags, "--save-model", "--num-seeds=2", "--seed=1", "--updates-per-chunk=2",
                            f"--log-dir={tmp_path / 'two'}")
    one = lstm.main(lstm.Args(seed=2, num_seeds=1, updates_per_chunk=1, log_dir=str(tmp_path / "one"), **common))
    result = finish(two_proc)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled in" in result.stdout and "MMER over 2 seed(s)" in result.stdout
    (run_dir,) = glob.glob(str(tmp_path / "two" / "CartPoleEasy__ppo_lstm_popgym__1__*"))
    assert sorted(os.listdir(run_dir)) == ["checkpoints", "ppo_lstm_popgym.cleanrl_model", "seed_1", "seed_2",
                                           "summary.json"]
    for seed in (1, 2):
        acc = EventAccumulator(os.path.join(run_dir, f"seed_{seed}"))
        acc.Reload()
        scalars = set(acc.Tags()["scalars"])
        for tag in ("charts/episodic_return", "charts/episodic_length", "charts/mmer", "charts/SPS",
                    "charts/learning_rate", "losses/value_loss", "losses/policy_loss", "losses/entropy",
                    "losses/approx_kl", "losses/old_approx_kl", "losses/clipfrac", "losses/explained_variance"):
            assert tag in scalars, tag
        assert [e.step for e in acc.Scalars("losses/value_loss")] == [32, 64]
        (text,) = [t for t in acc.Tags()["tensors"] if "hyperparameters" in t]
        table = acc.Tensors(text)[0].tensor_proto.string_val[0].decode()
        assert "|hidden_size|16|" in table and "|cell|gru|" in table
        mmer = [e.value for e in acc.Scalars("charts/mmer")]
        assert mmer == sorted(mmer)  # a running maximum
    with open(os.path.join(run_dir, "summary.json")) as f:
        two = json.load(f)
    assert two["updates"] == one["updates"] == 2 and two["global_step"] == 64 and set(two["per_seed"]) == {"1", "2"}
    assert two["args"]["env_id"] == "CartPoleEasy" and two["compile_seconds"] > 0
    for r in two["per_seed"].values():
        assert 0 < r["mmer"] <= 1  # CartPole returns lie in (0, 1]
    assert two["mmer"]["mean"] == pytest.approx(np.mean([r["mmer"] for r in two["per_seed"].values()]))
    assert two["per_seed"]["2"]["mmer"] == pytest.approx(one["per_seed"]["2"]["mmer"], rel=1e-5)
    model_two, model_one = load_model(run_dir), load_model(glob.glob(str(tmp_path / "one" / "*"))[0])
    assert model_two["0"]["cell"] == "gru" and model_two["0"]["hidden_size"] == 16
    assert model_two["1"]["params"]["memory"]["GRUCell_0"]["hn"]["kernel"].shape == (2, 16, 16)  # seed axis
    # atol 1e-6, no rtol: float32 round-off (measured 3e-8), while the 2 updates move half the parameters by more
    # than 1e-5 (median 1.5e-5): a seed trained on other rollouts fails
    assert_trees_close(jax.tree.map(lambda x: x[1], model_two["1"]), jax.tree.map(lambda x: x[0], model_one["1"]),
                       rtol=0, atol=1e-6)
    assert not np.allclose(*jax.tree.leaves(model_two["1"])[0])  # different seeds really differ
    # --eval-model from the command line: the model's Args, its seeds, eval.json beside it (strict JSON)
    result = finish(start_script(f"--eval-model={run_dir}/ppo_lstm_popgym.cleanrl_model", "--eval-episodes=4",
                                 "--eval-greedy"))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(run_dir, "eval.json")) as f:
        evaluation = json.loads(f.read(), parse_constant=lambda c: pytest.fail(c))
    assert evaluation["greedy"] and evaluation["episodes_per_seed"] == 4 and set(evaluation["per_seed"]) == {"1", "2"}
    assert all(0 < r["mean"] <= 1 for r in evaluation["per_seed"].values()) and "return over 2 seed(s)" in result.stdout


def test_seed_keys_equal_vmapped_keys():
    keys = lstm.seed_keys([3, 4, 5, 6], lstm.seed_sharding(4))
    expected = jax.vmap(jax.random.key)(jnp.arange(3, 7))
    np.testing.assert_array_equal(jax.random.key_data(keys), jax.random.key_data(expected))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(total_timesteps=100), "--total-timesteps 100 gives zero updates"),
        (dict(num_envs=6, num_minibatches=4), "--num-envs 6 must be divisible by --num-minibatches 4"),
        (dict(num_processes=2), "--coordinator-address, --num-processes and --process-id are for multi-process"),
        (dict(process_id=0), "add --distributed"),
        (dict(distributed=True, eval_model="runs/x"), "--eval-model runs in one process; drop --distributed"),
    ],
)
def test_check_args_says_what_to_change(changes, message):
    """The cross-flag checks (each flag's own domain: tests/test_arg_domains.py); the CLI prints them below."""
    error = lstm.check_args(lstm.Args(**changes))
    assert error is not None and message in error and "\n" not in error


@pytest.fixture(scope="module")
def cli_results():
    """The CLI calls of the tests below, started at once (each only imports and parses or checks its flags)."""
    cases = {"help": ["--help"], "env": ["--env-id=RepeatPreviusEasy"], "cell": ["--cell=rnn"]}
    return {name: finish(proc, 300) for name, proc in {n: start_script(*f) for n, f in cases.items()}.items()}


def test_help_documents_every_flag(cli_results):
    out = cli_results["help"].stdout
    for field in fields(lstm.Args):
        assert f"--{field.name.replace('_', '-')}" in out, field.name
    assert "{lstm,gru}" in out


def test_bad_input_fails_fast_with_one_line(cli_results):
    result = cli_results["env"]
    assert result.returncode != 0 and "Traceback" not in result.stderr and "compiled" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --env-id") and "RepeatPreviousEasy" in lines[0], lines


def test_unknown_cell_is_rejected_by_the_cli(cli_results):
    result = cli_results["cell"]
    assert result.returncode != 0 and "Traceback" not in result.stderr and "compiled" not in result.stdout
