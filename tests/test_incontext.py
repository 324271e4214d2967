"""In-context RL: the paper's meta-CartPole (popjaxrl's NoisyStatelessMetaCartPole) against a plain reference of its
semantics, the per-trial evaluation of the POPGym scripts, and the reset-every-trial control clearing the memory."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs_popjax
import ppo_lstm_popgym
import ppo_s5_metarl
import ppo_s5_popgym

pytestmark = pytest.mark.timeout(600)


def reference_meta_cartpole(physics0, kernel, actions, num_trials=16, trial_length=200):
    """popjaxrl's meta_cartpole.py step by step in float64 numpy: position-only CartPole (Euler, force +-10, fail at
    |x| > 2.4 or |theta| > 12 deg, or after `trial_length` steps), reward 1/trial_length on every step, every trial
    from `physics0`, obs [(x, theta) @ kernel, action, trial ended, 0]. Returns obs, rewards, dones per step (until
    the meta-episode ends or the actions run out)."""
    g, mc, mp, half_length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    physics, time, trial, out = np.array(physics0, np.float64), 0, 0, []
    for action in actions:
        x, x_dot, theta, theta_dot = physics
        force = force_mag if action == 1 else -force_mag
        temp = (force + mp * half_length * theta_dot**2 * np.sin(theta)) / (mc + mp)
        theta_acc = (g * np.sin(theta) - np.cos(theta) * temp) / (
            half_length * (4.0 / 3.0 - mp * np.cos(theta) ** 2 / (mc + mp)))  # fmt: skip
        x_acc = temp - mp * half_length * theta_acc * np.cos(theta) / (mc + mp)
        physics = np.array([x + tau * x_dot, x_dot + tau * x_acc, theta + tau * theta_dot, theta_dot + tau * theta_acc])
        time += 1
        ended = abs(physics[0]) > 2.4 or abs(physics[2]) > 12 * 2 * np.pi / 360 or time >= trial_length
        if ended:
            physics, time, trial = np.array(physics0, np.float64), 0, trial + 1
        obs = np.concatenate([physics[[0, 2]] @ kernel, [action, float(ended), 0.0]])
        out.append((obs, 1.0 / trial_length, trial >= num_trials))
        if trial >= num_trials:
            break
    return out


@pytest.mark.parametrize("trial_length", [200, 7])
def test_meta_cartpole_equals_reference(trial_length):
    env, params = envs_popjax.make("MetaCartPole", trial_length=trial_length)
    obs, state = env.reset(jax.random.key(3), params)
    kernel, physics0 = np.asarray(state.kernel, np.float64), np.asarray(state.cartpole.physics, np.float64)
    np.testing.assert_allclose(obs, np.concatenate([physics0[[0, 2]] @ kernel, [0, 0, 1]]), atol=1e-7)
    np.testing.assert_allclose(kernel @ kernel.T, 2 * np.eye(2), atol=1e-5)  # orthogonal rows, gain sqrt(2)
    actions = np.random.default_rng(0).integers(0, 2, 16 * trial_length)
    expected = reference_meta_cartpole(physics0, kernel, actions, trial_length=trial_length)
    step = jax.jit(env.step_env)
    trials_seen = 0
    for t, (want_obs, want_reward, want_done) in enumerate(expected):
        obs, state, reward, done, info = step(jax.random.key(t), state, jnp.int32(actions[t]), params)
        assert int(info["trial"]) == trials_seen and bool(info["trial_ended"]) == bool(want_obs[-2])
        trials_seen += int(info["trial_ended"])
        np.testing.assert_allclose(obs, want_obs, atol=2e-5)  # float32 physics against float64
        assert float(reward) == pytest.approx(want_reward) and bool(done) == want_done
        np.testing.assert_array_equal(state.kernel, kernel.astype(np.float32))  # one projection per meta-episode
        if info["trial_ended"]:  # every trial restarts from the same stored state
            np.testing.assert_array_equal(state.cartpole.physics, state.start.physics)
            assert int(state.cartpole.time) == 0
    assert bool(done) and trials_seen == 16 and int(state.trial) == 16


def test_meta_cartpole_ids_flags_and_fresh_projection_per_meta_episode():
    env, params = envs_popjax.make("NoisyStatelessMetaCartPole")  # popjaxrl's name
    assert isinstance(env, envs_popjax.MetaCartPole) and env.num_trials == 16 and env.trial_length == 200
    assert env.observation_space(params).shape == (7,) and env.action_space(params).n == 2
    assert "MetaCartPole" not in envs_popjax.ENV_IDS  # ENV_IDS stays popgym's 48 ids and their aliases
    with pytest.raises(ValueError, match="MetaCartPole"):
        envs_popjax.make("MetaCartPol")
    with pytest.raises(ValueError, match="num_trials"):
        envs_popjax.make("MetaCartPole", num_trials=0)
    # Batched, with auto-reset: a meta-episode of always-left actions (each trial fails after the same few steps)
    vec_env, vec_params = envs_popjax.make_vec("MetaCartPole", 3, wrappers=True)
    obs, state = vec_env.reset(jax.random.key(0), vec_params)
    kernels = np.asarray(state.env_state.env_state.kernel)
    step, key = jax.jit(vec_env.step), jax.random.key(1)
    steps, trial_ends, ended_at, returned = 0, np.zeros(3, int), np.zeros(3, int), np.zeros(3)
    while not ended_at.all():
        key, key_step = jax.random.split(key)
        obs, state, reward, terminated, truncated, info = step(key_step, state, jnp.zeros(3, jnp.int32), vec_params)
        steps += 1
        assert not truncated.any()
        running = ended_at == 0
        trial_ends += running & np.asarray(info["trial_ended"])
        returned = np.where(running & np.asarray(terminated), info["returned_episode_return"], returned)
        kernel, done_now = np.asarray(state.env_state.env_state.kernel), running & np.asarray(terminated)
        # auto-reset: a new meta-episode, a new projection, the start flags; else the same projection throughout
        assert (np.abs(kernel - kernels)[done_now] > 1e-3).any(axis=(1, 2)).all()
        assert (obs[done_now, 4:7] == np.array([0, 0, 1])).all() and (obs[done_now, -1] == 1).all()
        live = running & ~done_now
        np.testing.assert_array_equal(kernel[live], kernels[live])
        assert (obs[live, 6] == 0).all() and (obs[live, 4] == 0).all()  # meta-episode start flag, previous action
        ended_at = np.where(done_now, steps, ended_at)
    assert (trial_ends == 16).all()  # done with the 16th trial's end
    assert (ended_at % 16 == 0).all()  # one start and one action: every trial lasts the same number of steps
    np.testing.assert_allclose(returned, ended_at / 200, rtol=1e-5)  # 1/200 per step


MODULES = {"S5": (ppo_s5_popgym, dict(d_model=16, ssm_size=16, n_layers=1)),
           "LSTM": (ppo_lstm_popgym, dict(hidden_size=16))}  # fmt: skip
# how much the actor's last layer (128 -> 2, initialised at scale 0.01) is scaled, so that sampled actions follow
# the memory's output: at initialisation the LSTM's carry moves the logits by ~2e-4, S5's by more
ACTOR_SCALE = {"S5": 100.0, "LSTM": 1000.0}


def play_reference(module, args, params, key, reset_every_trial):
    """The evaluation's loop written plainly: sampled actions, one step at a time, the memory cleared at the meta-
    episode start and (with `reset_every_trial`) wherever a trial ended; the return of each trial of the first
    meta-episode."""
    env, env_params = module.make_env(args, args.eval_episodes)
    network = module.build_network(args, env, env_params)[0]
    n, num_trials = args.eval_episodes, env.num_trials
    carry = ppo_s5_popgym.S5Memory.initialize_carry(n, ppo_s5_popgym.S5Config.from_args(args)) if module is \
        ppo_s5_popgym else ppo_lstm_popgym.RNNMemory.initialize_carry(n, args.hidden_size, args.cell)  # fmt: skip
    apply, step = jax.jit(network.apply), jax.jit(env.step)
    key, key_reset = jax.random.split(key)
    obs, state = env.reset(key_reset, env_params)
    reset, returns, finished = np.ones(n, bool), np.zeros((n, num_trials)), np.zeros(n, bool)
    while not finished.all():
        key, key_action, key_env = jax.random.split(key, 3)
        carry, logits, _ = apply(params, carry, obs[None], jnp.asarray(reset)[None])
        action = jax.random.categorical(key_action, logits[0])
        obs, state, reward, terminated, truncated, info = step(key_env, state, action, env_params)
        for i in np.nonzero(~finished)[0]:
            returns[i, int(info["trial"][i])] += float(reward[i])
        reset = np.asarray(terminated | truncated) | (reset_every_trial & np.asarray(info["trial_ended"]))
        finished |= np.asarray(terminated | truncated)
    return returns


@pytest.mark.parametrize("memory", ["S5", "LSTM"])
def test_trial_returns_and_reset_every_trial_control_equal_a_plain_loop(memory, monkeypatch):
    """The per-trial returns of make_evaluate equal a plain loop's, with and without the control; the
    control changes them (the memory mattered), and the trials add up to the meta-episode's return."""
    module, sizes = MODULES[memory]
    args = module.Args(env_id="MetaCartPole", eval_episodes=4, num_envs=4, num_steps=8,
                       total_timesteps=32, **sizes)  # fmt: skip
    # 40-step trials: a meta-episode in at most 640 steps, and trial lengths that vary with the actions
    make_vec = envs_popjax.make_vec
    monkeypatch.setattr(module, "make_env", lambda a, n: make_vec(a.env_id, n, wrappers=True, trial_length=40))
    params = module.make_train(module.derive_sizes(args))[0](jax.random.key(0)).train_state.params
    params = jax.tree.map(lambda x: x * ACTOR_SCALE[memory] if x.shape == (128, 2) else x, params)
    curves = {}
    for control in (False, True):
        a = dataclasses.replace(args, eval_reset_every_trial=control)
        got = jax.jit(module.make_evaluate(a))(params, jax.random.key(5))
        want = play_reference(module, a, params, jax.random.key(5), control)
        np.testing.assert_allclose(got["trial_returns"], want, atol=1e-5)
        # the wrapper sums a meta-episode's ~300 float32 rewards in one accumulator, the curve per trial: they differ
        # by float32 rounding (~2e-5); a step counted in the wrong place would be off by a whole reward, 1/40
        np.testing.assert_allclose(got["trial_returns"].sum(1), got["return"], atol=1e-3)
        curves[control] = np.asarray(got["trial_returns"])
    assert np.abs(curves[True] - curves[False]).max() > 1e-3


def test_evaluate_model_writes_each_condition_and_summary_has_the_curve(tmp_path):
    """A tiny MetaCartPole run: summary.json holds the in-context curve (16 trials, gain) and TensorBoard its
    scalars; --eval-model writes eval.json, eval_reset_every_trial.json and eval_untrained.json with the curve."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ppo_s5_popgym.Args(env_id="MetaCartPole", num_seeds=2, num_envs=4, num_steps=16, update_epochs=1,
                              num_minibatches=2, d_model=16, ssm_size=16, n_layers=1, total_timesteps=128,
                              eval_episodes=3, log_dir=str(tmp_path), compile_cache="")  # fmt: skip
    summary = ppo_s5_popgym.main(args)
    curve = summary["in_context"]["trial_returns"]["mean"]
    assert len(curve) == 16 and set(summary["in_context"]["per_seed"]) == {"1", "2"}
    per_seed = summary["in_context"]["per_seed"]["1"]
    assert per_seed["gain"] == pytest.approx(np.mean(per_seed["trial_returns"][1:]) - per_seed["trial_returns"][0])
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    events = EventAccumulator(str(run_dir / "seed_1")).Reload()
    assert {f"eval/trial_{k}_return" for k in range(1, 17)} | {"eval/in_context_gain"} <= set(events.Tags()["scalars"])
    assert events.Scalars("eval/trial_1_return")[0].value == pytest.approx(per_seed["trial_returns"][0], abs=1e-6)
    for flags, name in [({}, "eval.json"), ({"eval_reset_every_trial": True}, "eval_reset_every_trial.json"),
                        ({"eval_untrained": True}, "eval_untrained.json")]:  # fmt: skip
        eval_args = dataclasses.replace(args, eval_model=str(run_dir), **flags)
        result = ppo_s5_popgym.evaluate_model(eval_args)
        written = json.loads((run_dir / name).read_text())
        assert written["in_context"]["gain"]["mean"] == pytest.approx(result["in_context"]["gain"]["mean"])
        assert len(written["in_context"]["trial_returns"]["mean"]) == 16
    assert json.loads((run_dir / "eval.json").read_text())["in_context"] == summary["in_context"]  # same keys
    # the untrained control plays each seed's initialisation: it differs from the trained weights' curve
    untrained = json.loads((run_dir / "eval_untrained.json").read_text())
    assert untrained["untrained"] and untrained["in_context"] != summary["in_context"]


def test_controls_need_eval_model_and_a_meta_env():
    args = ppo_s5_popgym.Args(env_id="MetaCartPole", eval_untrained=True)
    assert "--eval-model" in ppo_s5_popgym.check_args(args)
    args = ppo_lstm_popgym.Args(env_id="CartPoleEasy", eval_model="x", eval_reset_every_trial=True)
    assert "meta-env" in ppo_lstm_popgym.check_args(args)
    assert "--eval-model" in ppo_s5_metarl.check_args(ppo_s5_metarl.Args(eval_reset_every_episode=True))


def test_metarl_reset_every_episode_control_keeps_counting_every_episode():
    """ppo_s5_metarl's control clears the memory at every episode start but still counts every episode of a trial
    (a trial ends only after its last episode); with it, episodes differ from the evaluation without it."""
    args = ppo_s5_metarl.Args(train_envs=("gymnax/PointRobot-misc",), heldout_envs=(), episodes_per_trial=3,
                              episode_length=5, eval_trials=4, d_model=16, ssm_size=16, n_layers=1, num_envs=4,
                              num_steps=15, num_minibatches=2, total_timesteps=60)  # fmt: skip
    args = ppo_s5_metarl.derive_sizes(args)
    params = ppo_s5_metarl.make_train(args)[0](jax.random.key(0)).train_state.params
    # every Dense kernel x 10 (the S5 layer's own parameters kept): actions that follow the memory's output
    scale = lambda path, x: x * 10.0 if "kernel" in jax.tree_util.keystr(path) else x  # noqa: E731
    params = jax.tree_util.tree_map_with_path(scale, params)
    results = {}
    for control in (False, True):
        evaluate = jax.jit(ppo_s5_metarl.make_evaluate(args, greedy=True, reset_every_episode=control))
        results[control] = np.asarray(evaluate(params, jax.random.key(1))["train/gymnax/PointRobot-misc"])
    for control, curve in results.items():
        assert curve.shape == (3,) and (curve != 0).all()  # every episode counted (PointRobot pays < 0 each step)
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-6)  # episode 1: the same memory
    assert np.abs(results[True][1:] - results[False][1:]).max() > 1e-3
