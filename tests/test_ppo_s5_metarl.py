"""PPO + S5 meta-RL: GAE over trials, memory resets at trial boundaries only, deterministic evaluation, the script end
to end (TensorBoard eval tags, summary JSON, kill and resume bit for bit, --eval-model), bad inputs."""

import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, fields

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import envs_popjax
import ppo_s5_metarl as metarl

pytestmark = pytest.mark.timeout(600)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "ppo_s5_metarl.py")
TINY = dict(num_envs=4, num_steps=12, update_epochs=1, num_minibatches=2, d_model=16, ssm_size=8, n_layers=1,
            episode_length=3, episodes_per_trial=2, eval_trials=3)  # fmt: skip
TINY_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
ENVS = dict(train_envs=("Pendulum-v1", "Reacher-misc"), heldout_envs=("Swimmer-misc",))
ENV_FLAGS = ["--train-envs", *ENVS["train_envs"], "--heldout-envs", *ENVS["heldout_envs"]]


def tiny_args(**kw) -> metarl.Args:
    return metarl.derive_sizes(metarl.Args(**{"total_timesteps": 3 * 48, **TINY, **ENVS, **kw}))


def test_gae_bootstraps_across_inner_episodes_and_masks_trial_ends():
    rng = np.random.default_rng(0)
    T = 12
    rewards, values = rng.normal(size=(T, 1)), rng.normal(size=(T, 1))
    dones = np.zeros((T, 1), bool)
    dones[6] = True  # a trial starts at t = 6; inner episode ends are not dones
    with jax.enable_x64(True):
        adv, _ = metarl.compute_gae(*map(jnp.asarray, (rewards, values, dones, np.zeros(1), np.zeros(1, bool))), 0.9, 1.0)
    expected, gae = np.zeros(T), 0.0
    for t in reversed(range(T)):
        not_end = 0.0 if t == 5 else 1.0
        next_value = values[t + 1, 0] if t < T - 1 else 0.0
        gae = rewards[t, 0] + 0.9 * next_value * not_end - values[t, 0] + 0.9 * not_end * gae
        expected[t] = gae
    np.testing.assert_allclose(np.asarray(adv)[:, 0], expected, rtol=1e-12)


@pytest.mark.parametrize("memory", ["s5", "lstm"])
def test_memory_resets_at_trial_boundaries_only(memory):
    """Acting on a real rollout with the env's dones equals running each trial from a zero memory,
    and differs from also resetting at the inner episode boundaries (the memory spans a trial)."""
    args = tiny_args(memory=memory, hidden_size=16)
    env = envs_popjax.MetaEnv("Pendulum-v1", episodes_per_trial=2, episode_length=3)
    obs, state = env.reset(jax.random.key(0))
    obs_seq, done_seq, done = [], [], True
    for t in range(14):
        obs_seq.append(obs)
        done_seq.append(done)
        obs, state, _, done, _ = env.step(jax.random.key(t + 1), state, jnp.array([0.5, -0.5]) * (t % 3 - 1))
    obs_seq, done_seq = jnp.stack(obs_seq)[:, None], jnp.array(done_seq)[:, None]
    np.testing.assert_array_equal(np.flatnonzero(done_seq[:, 0]), [0, 6, 12])  # trials of 2 x 3 steps
    np.testing.assert_array_equal(np.flatnonzero(obs_seq[:, 0, -1]), [0, 3, 6, 9, 12])  # episode starts

    network, new_carry = metarl.build_network(args)
    carry0 = new_carry(1)
    params = network.init(jax.random.key(1), carry0, obs_seq, done_seq)
    apply = jax.jit(network.apply)
    _, (mean, _), value = apply(params, carry0, obs_seq, done_seq)
    for start, stop in ((0, 6), (6, 12), (12, 14)):
        _, (seg_mean, _), seg_value = apply(params, carry0, obs_seq[start:stop], jnp.zeros((stop - start, 1), bool))
        np.testing.assert_allclose(seg_mean, mean[start:stop], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(seg_value, value[start:stop], rtol=1e-5, atol=1e-6)
    # resetting at inner episode starts too would give other outputs in the second episode of a trial
    _, (mean_ep, _), _ = apply(params, carry0, obs_seq, obs_seq[..., -1] > 0)
    assert not np.allclose(mean_ep[3:6], mean[3:6], atol=1e-6)


def test_lstm_network_is_ppo_lstm_popgym_s():
    """--memory lstm builds ppo_lstm_popgym's actor-critic (continuous): the same parameters from the same key, the
    same outputs, the same zero carry (what a trial start puts back)."""
    import ppo_lstm_popgym

    network, new_carry = metarl.build_network(tiny_args(memory="lstm", hidden_size=16))
    theirs = ppo_lstm_popgym.ActorCritic(2, True, ppo_lstm_popgym.RNNMemory(16))
    jax.tree.map(np.testing.assert_array_equal, new_carry(3), ppo_lstm_popgym.RNNMemory.initialize_carry(3, 16))
    obs, resets = jax.random.normal(jax.random.key(0), (4, 3, 16)), jax.random.bernoulli(jax.random.key(1), 0.3, (4, 3))
    params = network.init(jax.random.key(2), new_carry(3), obs, resets)
    jax.tree.map(np.testing.assert_array_equal, params, theirs.init(jax.random.key(2), new_carry(3), obs, resets))
    outputs = network.apply(params, new_carry(3), obs, resets), theirs.apply(params, new_carry(3), obs, resets)
    jax.tree.map(np.testing.assert_array_equal, *outputs)


def test_evaluation_is_jitted_deterministic_and_independent_of_the_env_set():
    init, _ = metarl.make_train(tiny_args())
    params = jax.jit(init)(jax.random.key(4)).train_state.params
    key = jax.random.key(7)
    evaluate = jax.jit(metarl.make_evaluate(tiny_args()))
    results = evaluate(params, key)
    assert sorted(results) == ["heldout/gymnax/Swimmer-misc", "train/gymnax/Pendulum-v1", "train/gymnax/Reacher-misc"]
    for curve in results.values():
        assert curve.shape == (2,) and np.isfinite(curve).all()
    again = evaluate(params, key)
    for k in results:
        np.testing.assert_array_equal(results[k], again[k])
    # an env's trials depend on the key and the env only, not on which other envs are evaluated
    other = jax.jit(metarl.make_evaluate(tiny_args(heldout_envs=())))(params, key)
    np.testing.assert_array_equal(other["train/gymnax/Pendulum-v1"], results["train/gymnax/Pendulum-v1"])
    # a Pendulum episode's scaled return lies in [-1, 0]
    assert (-1 <= results["train/gymnax/Pendulum-v1"]).all() and (results["train/gymnax/Pendulum-v1"] <= 0).all()


@pytest.fixture(autouse=True, scope="module")
def compile_cache(tmp_path_factory):
    """The scripts' persistent compilation cache in a temporary folder shared by this module's runs
    (the same tiny programs compile once), never in the user's home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
        yield


def run_script(*flags, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_bad_inputs_are_caught_before_compiling():
    cases = [
        (dict(heldout_envs=("gymnax/Reacher-misc",)), "in both sets: gymnax/Reacher-misc"),
        (dict(train_envs=("Pendulum-v2",)), "Pendulum-v1"),
        (dict(num_envs=6, num_minibatches=4, train_envs=("Pendulum-v1", "Reacher-misc", "PointRobot-misc"),
              heldout_envs=()), "--num-minibatches"),  # fmt: skip
        (dict(num_envs=5, num_minibatches=5), "divisible by the 2 --train-envs"),
        (dict(eval_every=3, updates_per_chunk=2), "--eval-every 3 must be a multiple"),
        (dict(episodes_per_trial=0), "--episodes-per-trial must be positive"),
        (dict(memory="lstm", hidden_size=0), "--hidden-size must be positive"),
        (dict(distributed=True, eval_model="model.cleanrl_model"), "--eval-model runs in one process"),
        (dict(num_processes=2), "add --distributed"),
        (dict(process_id=0), "add --distributed"),
    ]
    for overrides, message in cases:
        error = metarl.check_args(tiny_args(**overrides))
        assert error and message in error, (overrides, error)
    assert metarl.check_args(tiny_args()) is None
    result = run_script("--train-envs", "Pendulum-v1", "--heldout-envs", "Pendulum-v1", timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "gymnax/Pendulum-v1" in lines[0] and "compiled" not in result.stdout


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        tyro.cli(metarl.Args, args=["--help"])
    out = capsys.readouterr().out
    for field in fields(metarl.Args):
        assert f"--{field.name.replace('_', '-')}" in out, field.name


def scalars(run_dir: str) -> dict:
    """{(seed folder, tag): [(step, value), ...]} of every TensorBoard scalar but SPS (EventAccumulator honours
    purge_step)."""
    out = {}
    for folder in sorted(glob.glob(os.path.join(run_dir, "seed_*"))):
        events = EventAccumulator(folder)
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag != "charts/SPS":
                out[os.path.basename(folder), tag] = [(e.step, e.value) for e in events.Scalars(tag)]
    return out


EVAL_TAGS = ["eval/train/gymnax/Pendulum-v1/episode_1", "eval/train/gymnax/Reacher-misc/episode_2",
             "eval/heldout/gymnax/Swimmer-misc/episode_1", "eval/heldout/gymnax/Swimmer-misc/episode_2",
             "eval/train/first_episode", "eval/train/last_episode", "eval/heldout/first_episode",
             "eval/heldout/last_episode"]  # fmt: skip
TRAIN_TAGS = ["charts/episodic_return", "charts/first_episode_return", "charts/last_episode_return",
              "losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/approx_kl"]  # fmt: skip


def check_one_go_run(run_dir: str, stdout: str):
    """The tags, evaluation steps and summary.json of the uninterrupted 29-update run (seeds 5 and 6, default chunk)."""
    assert "compiled in" in stdout and "final eval over 2 seed(s): train envs: episode 1" in stdout
    assert "heldout envs: episode 1" in stdout
    assert sorted(os.listdir(run_dir)) == ["checkpoints", "ppo_s5_metarl.cleanrl_model", "seed_5", "seed_6",
                                           "summary.json"]  # fmt: skip
    logged = scalars(run_dir)
    for seed in ("seed_5", "seed_6"):
        assert [step for step, _ in logged[seed, "losses/value_loss"]] == [48 * (u + 1) for u in range(29)]
        assert all((seed, tag) in logged for tag in TRAIN_TAGS), sorted(logged)
        for tag in EVAL_TAGS:  # before training, every 10 updates, and at the end (update 29)
            assert [step for step, _ in logged[seed, tag]] == [0, 480, 960, 1392], tag
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["updates"] == 29 and summary["global_step"] == 1392
    assert [e["update"] for e in summary["evals"]] == [0, 10, 20, 29]
    final = summary["final_eval"]
    assert set(final["per_seed"]) == {"5", "6"}
    assert len(final["per_seed"]["5"]["heldout/gymnax/Swimmer-misc"]) == 2  # one return per episode index
    for split in ("train", "heldout"):
        assert set(final[split]) == {"episode_returns", "first_episode", "last_episode", "improvement"}
        assert set(final[split]["first_episode"]) == {"mean", "std"}
    assert set(final["train"]["episode_returns"]) == {"gymnax/Pendulum-v1", "gymnax/Reacher-misc"}
    return summary


def test_one_run_kill_and_resume_bit_identical_and_eval_model(tmp_path):
    """29 updates in one go (checked for its tags, evaluation steps and summary), versus a run killed with SIGKILL
    after its first checkpoint and resumed: the same parameters bit for bit, the same logged scalars and evaluations.
    The one-go run's saved model loads (file = final checkpoint) and --eval-model, with the run's trial count,
    reproduces its final evaluation."""
    flags = [*TINY_FLAGS, *ENV_FLAGS, "--total-timesteps=1392", "--num-seeds=2", "--seed=5", "--eval-every=10",
             "--checkpoint-every=2", "--save-model"]  # fmt: skip
    result = run_script(*flags, f"--log-dir={tmp_path / 'one'}")
    assert result.returncode == 0, result.stderr[-3000:]
    (one,) = glob.glob(str(tmp_path / "one" / "metarl__ppo_s5_metarl__5__*"))
    summary_one = check_one_go_run(one, result.stdout)
    process = subprocess.Popen([sys.executable, SCRIPT, *flags, f"--log-dir={tmp_path / 'two'}"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    # committed checkpoints only, read without orbax while the run writes (orbax renames a finished temporary folder)
    committed = lambda: [os.path.basename(p) for p in glob.glob(str(tmp_path / "two" / "*" / "checkpoints" / "*"))]  # noqa: E731
    while process.poll() is None and not any(name.isdigit() for name in committed()):
        time.sleep(0.01)
    process.kill()
    process.wait()
    (two,) = glob.glob(str(tmp_path / "two" / "*"))
    step = metarl.restore_checkpoint(two, meta_only=True)[0]
    assert step < 29 and not os.path.exists(os.path.join(two, "summary.json")), "not killed"
    result = run_script("--resume", two)
    assert result.returncode == 0, result.stderr[-3000:]
    (args_a, a), (args_b, b) = (metarl.load_model(os.path.join(run, "ppo_s5_metarl.cleanrl_model")) for run in (one, two))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert scalars(one) == scalars(two)
    summary_two = json.load(open(os.path.join(two, "summary.json")))
    assert summary_one["evals"] == summary_two["evals"] and summary_two["updates"] == 29
    assert summary_one["final_episodic_return"] == summary_two["final_episodic_return"]

    args_ckpt, from_checkpoint = metarl.load_model(one)
    assert args_a == args_ckpt and args_a.num_seeds == 2 and args_a.train_envs == ENVS["train_envs"]
    jax.tree.map(np.testing.assert_array_equal, a, from_checkpoint)
    model = os.path.join(one, "ppo_s5_metarl.cleanrl_model")
    result = run_script("--eval-model", model, f"--eval-episodes={TINY['eval_trials']}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(open(os.path.join(one, "eval.json")).read(), parse_constant=pytest.fail)
    # the same trials (keys), the same parameters, the same stochastic policy: the final evaluation again
    assert report["trials_per_env"] == TINY["eval_trials"] and not report["greedy"]
    final = summary_one["final_eval"]
    assert report["per_seed"] == final["per_seed"] and report["heldout"] == final["heldout"]


def test_lstm_run_resume_and_eval_model(tmp_path):
    """--memory lstm end to end (one train env, none held out: a small program): 2 updates with checkpoints, --resume
    to 3 (the LSTM carry restored), finite evaluations in a strict summary.json, and --eval-model of the saved model
    reproduces the final evaluation in another process (deterministic evaluation)."""
    flags = [*TINY_FLAGS, "--train-envs=Pendulum-v1", "--heldout-envs", "--memory=lstm", "--hidden-size=16"]
    flags += ["--total-timesteps=96", "--eval-every=1", "--checkpoint-every=1", "--save-model", f"--log-dir={tmp_path}"]
    assert (result := run_script(*flags)).returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "*"))
    assert (result := run_script("--resume", run_dir, "--total-timesteps=144")).returncode == 0, result.stderr[-3000:]
    assert ", from update 2;" in result.stdout
    summary = json.loads(open(os.path.join(run_dir, "summary.json")).read(), parse_constant=pytest.fail)
    assert summary["args"]["memory"] == "lstm" and [e["update"] for e in summary["evals"]] == [0, 1, 2, 3]
    assert np.isfinite(summary["final_eval"]["per_seed"]["1"]["train/gymnax/Pendulum-v1"]).all()
    model = os.path.join(run_dir, "ppo_s5_metarl.cleanrl_model")
    args, params = metarl.load_model(model)  # one seed: [1, ...] parameters
    cell = params["params"]["memory"]["OptimizedLSTMCell_0"]
    assert args.memory == "lstm" and cell["hi"]["kernel"].shape == (1, 16, 16)
    result = run_script("--eval-model", model, f"--eval-episodes={TINY['eval_trials']}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(open(os.path.join(run_dir, "eval.json")).read(), parse_constant=pytest.fail)
    assert report["per_seed"] == summary["final_eval"]["per_seed"]


def test_non_finite_loss_stops_the_run_and_summary_is_strict_json(tmp_path):
    """A learning rate of 1e30 makes the parameters ~1e30 after one update (one minibatch) and the loss
    non-finite in the next: the run stops with one line naming the update and the seed, keeps the last good
    checkpoint, and writes summary.json, strict: 12-step rollouts finish no 20-step episode, so the last
    update's episodic return is null, not NaN."""
    flags = {**TINY, "num_minibatches": 1, "episode_length": 20}
    result = run_script(*[f"--{k.replace('_', '-')}={v}" for k, v in flags.items()], *ENV_FLAGS, "--total-timesteps=192",
                        "--learning-rate=1e30", "--checkpoint-every=1", "--updates-per-chunk=1", f"--log-dir={tmp_path}")  # fmt: skip
    assert result.returncode == 1
    (run_dir,) = glob.glob(str(tmp_path / "*"))
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: non-finite loss/parameters at update 2 (seed 1); last good checkpoint: update 1 in {run_dir}/checkpoints"
    assert metarl.restore_checkpoint(run_dir, meta_only=True)[0] == 1
    summary = json.loads(open(os.path.join(run_dir, "summary.json")).read(), parse_constant=pytest.fail)
    assert summary["updates"] == 1 and summary["final_episodic_return"] == {"1": None}


def test_resume_refuses_flags_that_change_the_run(monkeypatch):
    """parse_args on --resume of tiny_args()'s run checkpointed at update 2 (96 steps): the running flags and a longer
    run (no annealing) are accepted, a flag that changes the math is refused with what may change."""
    saved = [tiny_args()]
    checkpoint = lambda path, meta_only: (2, {"args": asdict(saved[0])}, None)  # noqa: E731
    monkeypatch.setattr(metarl, "restore_checkpoint", checkpoint)

    def parse(*argv):
        monkeypatch.setattr(sys, "argv", ["ppo_s5_metarl.py", "--resume=run", *argv])
        return metarl.parse_args()[1]

    assert parse("--checkpoint-every=5", "--updates-per-chunk=1", "--log-dir=elsewhere") is None
    assert parse("--total-timesteps=480") is None  # longer, no annealing
    error = parse("--memory=lstm")
    assert error.startswith("--resume: --memory lstm differs from the checkpoint's s5; it would change the run "
                            "(allowed to change: --total-timesteps, --log-dir")  # fmt: skip
    assert parse("--hidden-size=32").startswith("--resume: --hidden-size 32 differs")
    error = parse("--learning-rate=0.1")
    assert error.startswith("--resume: --learning-rate 0.1 differs from the checkpoint's 0.001; it would change")
    error = parse("--total-timesteps=48")
    assert error == "--resume: --total-timesteps 48 is below the 96 steps the checkpoint has done"
    saved[0] = tiny_args(anneal_lr=True)
    assert parse("--total-timesteps=480") == ("--resume: --total-timesteps 480 differs from the checkpoint's 144; it "
                                              "would change the learning-rate schedule (--anneal-lr)")  # fmt: skip
    assert metarl.strict_json({"a": [float("nan"), np.float32("inf"), 1.5]}) == {"a": [None, None, 1.5]}
