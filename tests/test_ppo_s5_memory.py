"""bsuite's MemoryChain in envs_popjax, and ppo_s5_memory.py end to end.

The env is checked step by step against bsuite's definition (bsuite/environments/memory_chain.py,
restated below in plain Python): observation layout, the context only at the start, the query at
t = L - 1, reward only on step L + 1, episodes of L + 1 steps, terminated and never truncated,
auto-reset. Then the id forms of `make`, the rollout and chunk rules, the summary verdicts, the input checks, and one
sweep over two lengths (shared by the tests of its outputs, --save-model/load_model/--eval-model, --resume refusal
and kill-and-resume bit-identity); a non-finite loss stops the run. --distributed: tests/test_distributed.py.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import envs_popjax as ep
import ppo_s5_memory as mem

pytestmark = pytest.mark.timeout(600)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BsuiteMemoryChain:
    """bsuite's MemoryChain in plain Python, for a given context and query."""

    def __init__(self, memory_length: int, context, query: int):
        self.memory_length, self.context, self.query, self.t = memory_length, np.asarray(context), int(query), 0

    def observation(self) -> np.ndarray:
        obs = np.zeros(len(self.context) + 2, np.float32)
        obs[0] = 1 - self.t / self.memory_length
        if self.t == self.memory_length - 1:
            obs[1] = self.query
        if self.t == 0:
            obs[2:] = 2 * self.context - 1
        return obs

    def step(self, action: int):
        obs = self.observation()  # bsuite returns the observation of the pre-step time
        self.t += 1
        if self.t - 1 < self.memory_length:
            return obs, 0.0, False
        return obs, 1.0 if action == self.context[self.query] else -1.0, True


_ROLLOUTS = {}


def rollout(env, params, key, actions):
    """Reset, then step through `actions` in one jitted scan (memory_length stays a traced param)."""
    if env.num_bits not in _ROLLOUTS:  # one compile per observation shape

        def run(params, key, actions):
            obs0, state0 = env.reset(key, params)

            def body(state, inputs):
                step_key, action = inputs
                obs, state, reward, terminated, truncated, info = env.step(step_key, state, action, params)
                out = (info["final_observation"], obs, reward, terminated, truncated, state.context, state.query, state.time)
                return state, out

            _, outs = jax.lax.scan(body, state0, (jax.random.split(key, actions.shape[0]), actions))
            return obs0, state0, outs

        _ROLLOUTS[env.num_bits] = jax.jit(run)
    obs0, state0, outs = _ROLLOUTS[env.num_bits](params, key, actions)
    return np.asarray(obs0), state0, [np.asarray(x) for x in outs]


@pytest.mark.parametrize("num_bits", [1, 3])
@pytest.mark.parametrize("memory_length", [1, 2, 3, 10])
def test_steps_match_bsuite_definition(memory_length, num_bits):
    env, params = ep.make("MemoryChain", memory_length=memory_length, num_bits=num_bits)
    episodes = 5
    actions = jnp.asarray(np.random.default_rng(memory_length).integers(0, 2, episodes * (memory_length + 1)), jnp.int32)
    obs0, state0, (final_obs, obs, reward, terminated, truncated, context, query, time) = rollout(
        env, params, jax.random.key(num_bits), actions
    )
    ref = BsuiteMemoryChain(memory_length, np.asarray(state0.context), int(state0.query))
    np.testing.assert_allclose(obs0, ref.observation())
    assert not truncated.any()
    for t in range(len(actions)):
        ref_obs, ref_reward, ref_done = ref.step(int(actions[t]))
        np.testing.assert_allclose(final_obs[t], ref_obs, rtol=1e-6, err_msg=f"step {t + 1}")
        assert reward[t] == ref_reward and terminated[t] == ref_done, f"step {t + 1}"
        if ref_done:  # auto-reset: the returned observation starts the next episode
            ref = BsuiteMemoryChain(memory_length, context[t], query[t])
            assert time[t] == 0
            ref_obs = ref.observation()
        np.testing.assert_allclose(obs[t], ref_obs, rtol=1e-6, err_msg=f"step {t + 1}")
    assert terminated.sum() == episodes and (np.flatnonzero(terminated) + 1 == (memory_length + 1) * np.arange(1, 6)).all()


def test_observation_layout_and_context_only_at_start():
    L = 6
    env, params = ep.make("MemoryChain", memory_length=L, num_bits=3)
    obs0, state0, (final_obs, obs, reward, terminated, *_) = rollout(env, params, jax.random.key(3), jnp.zeros(L + 1, jnp.int32))
    seen = np.concatenate([obs0[None], final_obs[:L]])  # what the agent sees before each of its L + 1 actions
    assert seen.shape == (L + 1, 5) and seen.dtype == np.float32
    np.testing.assert_allclose(seen[:, 0], [1, 1] + [1 - t / L for t in range(1, L)], rtol=1e-6)
    context = 2 * np.asarray(state0.context) - 1
    np.testing.assert_array_equal(seen[0, 2:], context)
    np.testing.assert_array_equal(seen[1, 2:], context)  # the first step returns the t = 0 observation again
    assert not seen[2:, 2:].any()
    assert (seen[:, 1] != 0).sum() <= 1 and seen[L, 1] == state0.query  # the query, shown before the answer
    assert not reward[:L].any() and abs(reward[L]) == 1 and terminated[L] and not terminated[:L].any()


def test_oracle_scores_one_and_lengths_vmap_without_truncation():
    """The answer context[query] always earns +1 (its opposite -1), for lengths vmapped as a traced
    param; L = 1500 is not cut at gymnax's max_steps_in_episode = 1000."""
    env = ep.EpisodeStatsWrapper(ep.PreviousActionWrapper(ep.make("MemoryChain")[0]))
    lengths = jnp.array([1, 7, 1500])

    def run(length, flip, key):
        params = ep.make("MemoryChain", memory_length=length)[1]
        obs, state = env.reset(key, params)

        def body(state, step_key):
            inner = state.env_state.env_state
            action = inner.context[inner.query] ^ flip
            obs, state, reward, terminated, truncated, info = env.step(step_key, state, action, params)
            return state, (reward, terminated, truncated, info["returned_episode"], info["returned_episode_length"])

        return jax.lax.scan(body, state, jax.random.split(key, 3002))[1]

    for flip, expected in ((0, 1.0), (1, -1.0)):
        reward, terminated, truncated, ended, length = jax.jit(jax.vmap(run, (0, None, None)))(lengths, flip, jax.random.key(0))
        assert not truncated.any() and (terminated == ended).all()
        for i, L in enumerate(np.asarray(lengths)):
            assert int(terminated[i].sum()) == 3002 // (L + 1)
            np.testing.assert_array_equal(reward[i][terminated[i]], expected)
            assert not reward[i][~terminated[i]].any()
            assert (length[i][terminated[i]] == L + 1).all()


def test_make_ids_overrides_and_errors():
    assert ep.canonical_id("MemoryChain-bsuite") == "MemoryChain" and ep.canonical_id("MemoryChain-30") == "MemoryChain-30"
    assert not any(i.startswith("MemoryChain") for i in ep.ENV_IDS)  # ENV_IDS stays POPGym's
    assert ep.make("MemoryChain")[1].memory_length == 5  # gymnax's default
    assert ep.make("MemoryChain-bsuite", memory_length=12)[1].memory_length == 12
    env, params = ep.make("MemoryChain-30")
    assert params.memory_length == 30 and params.max_steps_in_episode == 31 and env.num_bits == 1
    env, params = ep.make("MemoryChain", memory_length=4, num_bits=3)
    assert env.observation_space(params).shape == (5,) and env.action_space(params).n == 2
    wrapped = ep.PreviousActionWrapper(env)
    assert wrapped.observation_space(params).shape == (5 + 2 + 1,)
    with pytest.raises(ValueError, match="did you mean MemoryChain"):
        ep.make("MemoryChian")
    with pytest.raises(ValueError, match="did you mean RepeatPreviousEasy"):
        ep.make("RepeatPreviousEasi")
    with pytest.raises(ValueError, match="memory_length must be >= 1"):
        ep.make("MemoryChain", memory_length=0)
    with pytest.raises(ValueError, match="memory_length must be >= 1"):
        ep.make("MemoryChain-0")
    with pytest.raises(ValueError, match="already sets the memory length"):
        ep.make("MemoryChain-3", memory_length=4)
    with pytest.raises(ValueError, match="valid: memory_length, num_bits"):
        ep.make("MemoryChain", k=3)


def test_rollout_lengths_and_chunks():
    args = mem.Args()
    assert [mem.rollout_length(args, L) for L in (1, 2, 4, 30, 31, 32, 63, 100, 4096)] == [32, 33, 35, 62, 32, 33, 64, 101, 4097]
    for L in (*mem.BSUITE_MEMORY_LENGTHS, 128, 255, 256, 512, 1000):  # whole episodes: the smallest multiple >= 32
        steps = mem.rollout_length(args, L)
        assert steps % (L + 1) == 0 and steps >= 32 and steps - (L + 1) < 32
    assert mem.rollout_length(mem.Args(num_steps=16), 100) == 16
    # the largest divisor of the updates up to 1/25 of them: one compiled chunk length
    assert mem.default_chunk(390) == 15 and mem.default_chunk(3) == 1 and mem.default_chunk(101) == 1
    assert mem.default_chunk(400) == 16 and mem.default_chunk(96) == 3


def test_summary_verdicts():
    """Final success over the last 10% of updates; no verdict from fewer than MIN_VERDICT_EPISODES."""
    args = mem.Args(memory_lengths=(4, 8), num_seeds=2, success_window=0.1)
    learned = [(i, 20, 10) for i in range(1, 91)] + [(i, 20, 20) for i in range(91, 101)]  # 50% then 100%
    history = {(4, 1): learned, (4, 2): learned, (8, 1): learned, (8, 2): [(i, 1, 1) for i in range(1, 101)]}
    clock = {"compile_seconds": 1.0, "run_seconds": 2.0, "env_steps": 4}
    summary = mem.summarize(args, history, clock)
    run = summary["per_run"]["len_4_seed_1"]
    assert run["final_success_rate"] == 1.0 and run["final_episodes"] == 200 and run["solved"]
    assert run["training_success_rate"] == 0.55 and abs(run["bsuite_regret_ratio"] - 0.9) < 1e-12 and not run["bsuite_learned"]
    few = summary["per_run"]["len_8_seed_2"]
    assert few["final_success_rate"] == 1.0 and few["final_episodes"] == 10 and not few["solved"]
    assert summary["per_length"]["8"]["solved_seeds"] == 1 and summary["largest_length_solved_by_all_seeds"] == 4
    json.dumps(summary)
    assert "| 4 | 35 | 1.000 1.000 | 1.000 +- 0.000 | 2/2 | 0/2 |" in mem.summary_table(args, summary)


def test_every_rollout_starts_episodes():
    """With the default rollout every env is at an episode's first step when a rollout (one training sequence per env)
    starts: the done flag is set and the env's clock is 0, update after update. L = 2 and L = 10 share 33-step
    rollouts (11 and 3 episodes per env): one vmapped program, as in the script."""
    args = mem.Args(num_envs=2, num_minibatches=1, update_epochs=1, hidden_size=4, d_model=4, ssm_size=4, n_layers=1,
                    s5_scan="sequential")
    lengths = jnp.array([2, 10], jnp.int32)
    num_steps = mem.rollout_length(args, 2)
    assert num_steps == mem.rollout_length(args, 10) == 33
    init, update_chunk, _ = mem.make_train(args, num_steps)
    runner = jax.jit(jax.vmap(init))(jax.vmap(jax.random.key)(jnp.arange(2)), lengths)
    update = jax.jit(jax.vmap(lambda runner: update_chunk(runner, 1)))
    for _ in range(3):
        assert runner.done.all() and (runner.env_state.env_state.env_state.time == 0).all()
        runner, metrics = update(runner)
        np.testing.assert_array_equal(metrics["episodes"][:, 0], args.num_envs * num_steps // (np.asarray(lengths) + 1))


@pytest.fixture(autouse=True, scope="module")
def compile_cache(tmp_path_factory):
    """The scripts' persistent compilation cache in a temporary folder shared by this module's runs
    (the same tiny programs compile once), never in the user's home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
        yield


def run_script(*flags, **kwargs):
    return subprocess.run([sys.executable, "ppo_s5_memory.py", *flags], cwd=ROOT, capture_output=True, text=True, **kwargs)


def test_bad_inputs_fail_before_compiling(tmp_path):
    """The CLI stops with one line on stderr, no traceback and nothing written; check_args names what to change."""
    result = run_script("--memory-lengths", "4", "0", "--log-dir", str(tmp_path), timeout=120)
    assert result.returncode == 2 and not any(tmp_path.iterdir())
    assert result.stderr.strip() == "error: --memory-lengths must all be >= 1 (an episode lasts L + 1 steps), got 0"
    for changes, message in [
        (dict(memory_lengths=()), "--memory-lengths is empty"),
        (dict(num_envs=6, num_minibatches=4), "must be divisible by --num-minibatches"),
        (dict(memory_lengths=(100,), total_timesteps=1000), "gives zero updates"),
        (dict(distributed=True, eval_model="b"), "--eval-model runs in one process; drop --distributed"),
        (dict(process_id=0), "add --distributed"),
        (dict(coordinator_address="127.0.0.1:1234"), "add --distributed"),
    ]:
        error = mem.check_args(mem.Args(**changes))
        assert error is not None and message in error and "\n" not in error, (changes, error)


def test_eval_model_refuses_what_it_would_not_play_before_compiling(tmp_path):
    """--eval-model takes the saved run's flags as its defaults: a flag that differs from them is refused (exit 2, one
    line naming it, as in ppo_s5_popgym) rather than ignored, and so is --distributed (the evaluation runs in one
    process: it must not try to join a multi-process run first); --resume with --eval-model is refused too."""
    model = tmp_path / "ppo_s5_memory.cleanrl_model"  # the default Args and no parameters: only the Args are read
    model.write_bytes(flax.serialization.to_bytes([dataclasses.asdict(mem.Args()), {}]))
    allowed = ("--total-timesteps, --log-dir, --updates-per-chunk, --checkpoint-every, --keep-checkpoints, "
               "--compile-cache, --track, --wandb-project-name, --wandb-entity, --save-model")
    for flags, message in [
        (["--gamma", "0.9"], f"--eval-model: --gamma 0.9 differs from the model's 0.99; it would change the run "
                             f"(allowed to change: {allowed})"),
        (["--memory-lengths", "4"], "--eval-model: --memory-lengths (4,) differs from the model's (1, 2, 3, 4, 5, "),
        (["--distributed"], "--eval-model runs in one process; drop --distributed"),
        (["--resume", str(tmp_path)], "--resume: --resume and --eval-model exclude each other"),
    ]:
        result = run_script("--eval-model", str(model), *flags, timeout=120)
        assert result.returncode == 2 and result.stderr.startswith(f"error: {message}"), (flags, result.stderr[-2000:])
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]


TINY = ["--num-envs", "4", "--num-minibatches", "2", "--update-epochs", "1", "--d-model", "8", "--ssm-size", "8",
        "--hidden-size", "8", "--n-layers", "1", "--updates-per-chunk", "1"]  # fmt: skip
# two groups (L = 3: 32 updates of 32 steps, L = 40: 24 updates of 41 steps), 2 seeds; checkpoints every 4 updates
SWEEP = ["--memory-lengths", "40", "3", "--num-seeds", "2", "--total-timesteps", "4096", "--checkpoint-every", "4",
         "--save-model", *TINY]  # fmt: skip


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """One uninterrupted sweep, shared by the tests below: (run folder, its stdout)."""
    log_dir = tmp_path_factory.mktemp("sweep")
    result = run_script(*SWEEP, "--log-dir", str(log_dir), timeout=570)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = log_dir.iterdir()
    return run_dir, result.stdout


def scalars(run_dir) -> dict:
    """{(pair folder, tag): [(step, value), ...]} of every TensorBoard scalar but SPS (EventAccumulator honours purge_step)."""
    out = {}
    for folder in sorted(p for p in run_dir.iterdir() if p.name.startswith("len_")):
        events = EventAccumulator(str(folder))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag != "charts/SPS":
                out[folder.name, tag] = [(e.step, e.value) for e in events.Scalars(tag)]
    return out


def test_sweep_writes_table_plot_json_and_tensorboard(sweep_run):
    """Two lengths with different rollouts (32 and 41 steps: two vmapped groups), 2 seeds, tiny budget."""
    run_dir, stdout = sweep_run
    assert "| 3 | 32 |" in stdout and "| 40 | 41 |" in stdout
    assert (run_dir / "summary.md").read_text().splitlines()[2].startswith("| 3 | 32 |")
    assert (run_dir / "success_vs_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run_dir / "summary.json").read_text(), parse_constant=pytest.fail)
    assert sorted(summary["per_length"]) == ["3", "40"] and len(summary["per_run"]) == 4
    for L, row in summary["per_length"].items():
        assert row["seeds"] == 2 and len(row["final_success_rates"]) == 2
        assert all(0 <= rate <= 1 for rate in row["final_success_rates"])
    run = summary["per_run"]["len_40_seed_2"]
    assert run["updates"] == 4096 // (4 * 41) == 24 and run["global_step"] == 24 * 4 * 41 and run["episodes"] == 24 * 4
    assert summary["args"]["memory_lengths"] == [40, 3]
    tags = scalars(run_dir)
    for L in (3, 40):
        for seed in (1, 2):
            folder = f"len_{L}_seed_{seed}"
            assert {"charts/success_rate", "charts/episodic_return", "losses/value_loss"} <= {t for f, t in tags if f == folder}
            assert tags[folder, "charts/success_rate"][-1][0] == {3: 4096, 40: 24 * 4 * 41}[L]
            events = EventAccumulator(str(run_dir / folder))
            events.Reload()
            assert "charts/SPS" in events.Tags()["scalars"]


def test_load_and_evaluate_a_saved_model(sweep_run):
    """load_model reads the same parameters from the --save-model file and from the final checkpoint;
    --eval-model plays the episodes and writes strict eval.json beside the model."""
    run_dir, _ = sweep_run
    args, from_file = mem.load_model(str(run_dir / "ppo_s5_memory.cleanrl_model"))
    args_ckpt, from_checkpoint = mem.load_model(str(run_dir / "checkpoints"))
    assert args == args_ckpt and args.memory_lengths == (40, 3) and args.total_timesteps == 4096
    assert sorted(from_file) == sorted(from_checkpoint) == ["len_3_seed_1", "len_3_seed_2", "len_40_seed_1", "len_40_seed_2"]
    for name in from_file:
        jax.tree.map(np.testing.assert_array_equal, from_file[name], from_checkpoint[name])
    result = run_script("--eval-model", str(run_dir), "--eval-episodes", "20", "--eval-greedy", timeout=570)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "eval.json").read_text(), parse_constant=pytest.fail)
    assert report["episodes_per_seed"] == 20 and report["greedy"] and set(report["per_length"]) == {"3", "40"}
    for run in report["per_run"].values():  # every episode ends with +1 or -1
        assert abs(run["mean"]) <= 1 and run["success_rate"] == pytest.approx((run["mean"] + 1) / 2)


def test_resume_refuses_a_flag_that_changes_the_run(sweep_run):
    result = run_script("--resume", str(sweep_run[0]), "--gamma", "0.9", timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --resume: --gamma 0.9 differs from the checkpoint's 0.99; it would change the run (allowed to change: "
        "--log-dir, --updates-per-chunk, --checkpoint-every, --keep-checkpoints, --compile-cache, --track, "
        "--wandb-project-name, --wandb-entity, --save-model)"
    )


def checkpoint_names(log_dir) -> list[str]:
    """The names in the checkpoints folder of the one run under log_dir (read without orbax: the run may be writing)."""
    return [name for path in log_dir.glob("*/checkpoints") for name in os.listdir(path)]


def test_kill_and_resume_is_bit_identical(sweep_run, tmp_path):
    """The sweep in one go, versus a run killed with SIGKILL inside the second group and resumed (the first group is
    skipped, its results and parameters come from the checkpoint; the second continues): the same parameters bit for
    bit, the same logged scalars, the same summary."""
    one = sweep_run[0]
    process = subprocess.Popen([sys.executable, "ppo_s5_memory.py", *SWEEP, "--log-dir", str(tmp_path)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while process.poll() is None and max(map(int, filter(str.isdigit, checkpoint_names(tmp_path))), default=0) <= 32:
        time.sleep(0.01)  # committed checkpoints only (orbax writes into a temporary folder, then renames it)
    process.kill()
    process.wait()
    (two,) = tmp_path.iterdir()
    killed_at = mem.restore_checkpoint(str(two), meta_only=True)[0]
    assert 32 < killed_at < 32 + 24 and not (two / "summary.json").exists(), "the run ended before it was killed"
    result = run_script("--resume", str(two), timeout=570)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lengths [3]" not in result.stdout and f"resumed at update {killed_at - 32}" in result.stdout
    assert mem.restore_checkpoint(str(two), meta_only=True)[0] == 32 + 24
    (_, a), (_, b) = (mem.load_model(str(run / "ppo_s5_memory.cleanrl_model")) for run in (one, two))
    assert sorted(a) == sorted(b) == ["len_3_seed_1", "len_3_seed_2", "len_40_seed_1", "len_40_seed_2"]
    for name in a:
        jax.tree.map(np.testing.assert_array_equal, a[name], b[name])
    assert scalars(one) == scalars(two)
    summary = [json.loads((run / "summary.json").read_text()) for run in (one, two)]
    assert summary[0]["per_run"] == summary[1]["per_run"]


def test_interrupt_between_logs_and_state_resumes_without_duplicates(sweep_run, tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) landing after a chunk's history rows are logged but before the runner state moves on (here:
    while the chunk's SPS is written, in the second group's 6th update): the checkpoint keeps the rows of the updates
    its state has done, no more, so the resumed run logs each update once and ends as the uninterrupted sweep."""
    calls, add_scalar = [], mem.SummaryWriter.add_scalar

    def interrupting_add_scalar(self, tag, *args, **kwargs):
        if tag == "charts/SPS" and len(calls) == 2 * (32 + 5):  # 2 pairs per update; group 1 has 32 updates
            raise KeyboardInterrupt
        calls.extend([tag] if tag == "charts/SPS" else [])
        return add_scalar(self, tag, *args, **kwargs)

    monkeypatch.setattr(mem.SummaryWriter, "add_scalar", interrupting_add_scalar)
    with pytest.raises(KeyboardInterrupt):  # main writes everything, then raises it again
        mem.main(tyro.cli(mem.Args, args=[*SWEEP, "--log-dir", str(tmp_path)]))
    monkeypatch.undo()
    (two,) = tmp_path.iterdir()
    step, meta, _ = mem.restore_checkpoint(str(two), meta_only=True)
    assert step == 32 + 5 and all(len(meta["history"][f"len_40_seed_{s}"]) == 5 for s in (1, 2))
    result = run_script("--resume", str(two), timeout=570)
    assert result.returncode == 0, result.stderr[-3000:]
    (_, a), (_, b) = (mem.load_model(str(run / "ppo_s5_memory.cleanrl_model")) for run in (sweep_run[0], two))
    for name in a:
        jax.tree.map(np.testing.assert_array_equal, a[name], b[name])
    assert scalars(sweep_run[0]) == scalars(two)
    summary = [json.loads((run / "summary.json").read_text()) for run in (sweep_run[0], two)]
    assert summary[0]["per_run"] == summary[1]["per_run"]


def test_non_finite_loss_stops_the_run(tmp_path):
    """A learning rate of 1e30 makes the parameters ~1e30 after one update (one minibatch) and the loss
    non-finite in the next: the run stops with one line naming the update and the (length, seed), keeps
    the last good checkpoint, and writes a strict summary.json."""
    result = run_script("--memory-lengths", "3", "--num-seeds", "1", "--total-timesteps", "512", "--learning-rate", "1e30",
                        "--checkpoint-every", "1", *TINY[:2], "--num-minibatches", "1", *TINY[4:], "--log-dir", str(tmp_path),
                        timeout=570)  # fmt: skip
    assert result.returncode == 1
    (run_dir,) = tmp_path.iterdir()
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss/parameters at update ") and "(memory length 3, seed 1)" in last, last
    bad = int(last.split("at update ")[1].split()[0])
    assert bad == 2 and last.endswith(f"last good checkpoint: update {bad - 1} in {run_dir}/checkpoints")
    assert mem.restore_checkpoint(str(run_dir), meta_only=True)[0] == bad - 1
    summary = json.loads((run_dir / "summary.json").read_text(), parse_constant=pytest.fail)
    assert summary["per_run"]["len_3_seed_1"]["updates"] == bad - 1
