"""VelocityOnlyCartPole, PositionOnlyPendulum and NoisyPositionOnlyPendulum against popgym 1.0.7.

popgym's hidden state (`env.state`) is copied into the JAX state after `reset(seed)`; both envs are then driven by
the same random actions, through `make` and through the batched env of `make_vec` (`PATHS`). The pendulum is
compared in float32 (atol 5e-5 over 100 steps, 1e-2 over a whole episode) and, under `jax.enable_x64(True)`, in
float64 (atol 1e-9; `step_env` only).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import popgym.envs
import pytest
from gymnasium.utils import seeding
from test_envs_basic import (
    PATHS,
    clean_env_of,
    fast_jit,
    noise_matches,
    noise_residuals,
    popgym_env,
    rollouts,
    run_popgym,
    stack,
    wrapped_rollout,
)

import envs_popjax as ep

pytestmark = pytest.mark.timeout(300)

LEVELS = ep.DIFFICULTIES
PENDULUM_FAMILIES = ("PositionOnlyPendulum", "NoisyPositionOnlyPendulum")


def pendulum_state(ref, dtype=jnp.float32) -> ep.PendulumState:
    return ep.PendulumState(physics=jnp.asarray(np.asarray(ref.state), dtype), time=jnp.int32(0))


def cartpole_state(ref) -> ep.CartPoleState:
    return ep.CartPoleState(physics=jnp.asarray(np.asarray(ref.state, np.float32)), time=jnp.int32(0))


def reset_noise(seed: int, num_state_draws: int, sigma: float) -> np.ndarray:
    """The noise popgym adds to its reset obs: gymnasium's generator for `seed`, after the
    uniform initial-state draws."""
    gen = seeding.np_random(seed)[0]
    gen.uniform(size=num_state_draws)
    return gen.normal(0, np.full(2, sigma)).astype(np.float32)


def pendulum_actions(rng, n):
    """Random torques, some outside [-2, 2] (both implementations clip them)."""
    return rng.uniform(-2.5, 2.5, size=(n, 1)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Spaces and constants.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("family", ("VelocityOnlyCartPole",) + PENDULUM_FAMILIES)
def test_spaces_and_constants_match_popgym(family, level):
    env, params = ep.make(family + level)
    ref = popgym_env(family + level)
    obs_space, act_space = env.observation_space(params), env.action_space(params)
    assert obs_space.shape == ref.observation_space.shape == (2,)
    np.testing.assert_array_equal(np.broadcast_to(obs_space.low, (2,)), ref.observation_space.low)
    np.testing.assert_array_equal(np.broadcast_to(obs_space.high, (2,)), ref.observation_space.high)
    assert params.max_steps_in_episode == ref.max_episode_length
    if family == "VelocityOnlyCartPole":
        assert act_space.n == ref.action_space.n == 2
    else:
        assert act_space.shape == ref.action_space.shape == (1,)
        assert (float(act_space.low), float(act_space.high)) == (-2.0, 2.0)
        np.testing.assert_array_equal(ref.action_space.low, -2.0)
        assert env.noise_sigma == float(getattr(ref, "noise_sigma", np.zeros(1))[0])
    obs, _ = env.reset(jax.random.key(0), params)
    assert obs.shape == (2,) and obs.dtype == jnp.float32 and bool(obs_space.contains(obs))


def test_difficulty_table():
    table = {
        "VelocityOnlyCartPole": [200, 400, 600],
        "PositionOnlyPendulum": [200, 150, 100],
        "NoisyPositionOnlyPendulum": [200, 200, 200],
    }
    for family, lengths in table.items():
        assert [ep.make(family + lv)[1].max_steps_in_episode for lv in LEVELS] == lengths
    assert [ep.make("NoisyPositionOnlyPendulum" + lv)[0].noise_sigma for lv in LEVELS] == [0.1, 0.2, 0.3]


def test_aliases():
    for level in LEVELS:
        assert ep.canonical_id("VelocityOnlyCartpole" + level) == "VelocityOnlyCartPole" + level  # popgym's gym id
        for alias in ("StatelessPendulum", "Pendulum"):
            assert ep.canonical_id(alias + level) == "PositionOnlyPendulum" + level
        for alias in ("NoisyStatelessPendulum", "NoisyPendulum"):
            assert ep.canonical_id(alias + level) == "NoisyPositionOnlyPendulum" + level
    env, params = ep.make("PendulumMedium")
    assert type(env) is ep.PositionOnlyPendulum and params.max_steps_in_episode == 150


# ---------------------------------------------------------------------------------------------
# VelocityOnlyCartPole.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("level", LEVELS)
def test_velocity_only_cartpole_matches_popgym_step_by_step(level, path):
    env, params = ep.make("VelocityOnlyCartPole" + level)
    ref = popgym_env("VelocityOnlyCartPole" + level)
    rng = np.random.default_rng(0)
    states, actions, records = [], [], []
    for seed in range(12):
        ref_obs0, _ = ref.reset(seed=seed)
        states.append(cartpole_state(ref))
        # popgym's reset bug, kept: the reset obs holds the positions (x, theta).
        np.testing.assert_array_equal(ref_obs0, np.asarray(ref.state, np.float32)[[0, 2]])
        obs0, reset_state = env.reset(jax.random.key(seed), params)
        np.testing.assert_array_equal(obs0, reset_state.physics[jnp.array([0, 2])])
        actions.append(rng.integers(0, 2, size=params.max_steps_in_episode))
        records.append(run_popgym(ref, actions[-1]))
    final_obs, _, reward, terminated, truncated = rollouts(env, params, stack(states), np.stack(actions), path)
    lengths = []
    for i, (obs_ref, r_ref, term_ref, trunc_ref) in enumerate(records):
        steps = len(r_ref)
        lengths.append(steps)
        np.testing.assert_allclose(final_obs[i, :steps], obs_ref, atol=1e-5, rtol=0)  # velocities
        np.testing.assert_allclose(reward[i, :steps], r_ref, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(terminated[i, :steps], term_ref)
        np.testing.assert_array_equal(truncated[i, :steps], trunc_ref)
        assert bool(terminated[i, steps - 1] | truncated[i, steps - 1])
    assert len(set(lengths)) > 3


def test_velocity_only_cartpole_reset_obs_option():
    """`popgym_reset_obs=False` shows the velocities at reset too (not popgym's behaviour)."""
    env, params = ep.make("VelocityOnlyCartPoleEasy", popgym_reset_obs=False)
    obs, state = env.reset(jax.random.key(3), params)
    np.testing.assert_array_equal(obs, state.physics[jnp.array([1, 3])])
    # The auto-reset inside step uses the same reset obs as reset().
    default_env, _ = ep.make("VelocityOnlyCartPoleEasy")
    for e, idx in ((env, [1, 3]), (default_env, [0, 2])):
        _, state = e.reset(jax.random.key(0), params)
        state = state.replace(physics=jnp.array([0.0, 0.0, 0.3, 0.0]))  # past 12 degrees: falls now
        obs, new_state, _, terminated, _, _ = e.step(jax.random.key(1), state, 1, params)
        assert bool(terminated)
        np.testing.assert_array_equal(obs, new_state.physics[jnp.array(idx)])


def test_velocity_only_cartpole_terminated_and_truncated_at_same_step():
    ref_easy = popgym_env("VelocityOnlyCartPoleEasy")
    ref_easy.reset(seed=11)
    actions = np.random.default_rng(11).integers(0, 2, size=200)
    t_fall = len(run_popgym(ref_easy, actions)[1])
    ref = popgym.envs.VelocityOnlyCartPole(max_episode_length=t_fall)
    ref.reset(seed=11)
    state = cartpole_state(ref)
    _, r_ref, term_ref, trunc_ref = run_popgym(ref, actions)
    assert len(r_ref) == t_fall and term_ref[-1] and trunc_ref[-1]
    env, params = ep.make("VelocityOnlyCartPoleEasy", max_episode_length=t_fall)
    for path in PATHS:
        _, _, reward, terminated, truncated = rollouts(env, params, stack([state]), actions[None, :t_fall], path)
        np.testing.assert_array_equal(terminated[0], term_ref)
        np.testing.assert_array_equal(truncated[0], trunc_ref)
        np.testing.assert_allclose(reward[0], r_ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Pendulum.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("family", PENDULUM_FAMILIES)
def test_pendulum_matches_popgym_float32(family, level, path):
    """float32 JAX vs popgym's float64 over whole episodes (noise predicted from popgym's cloned
    generator and added to the JAX twin's clean obs); truncated, never terminated, at step T."""
    env, params = ep.make(family + level)
    ref = popgym_env(family + level)
    noisy = env.noise_sigma > 0
    clean = clean_env_of(env) if noisy else env
    T = params.max_steps_in_episode
    sigma = np.full(2, env.noise_sigma)
    low, high = ref.observation_space.low, ref.observation_space.high
    rng = np.random.default_rng(2)
    states, actions, records = [], [], []
    for seed in range(4):
        ref_obs0, _ = ref.reset(seed=seed)
        states.append(pendulum_state(ref))
        noise0 = reset_noise(seed, 2, env.noise_sigma) if noisy else np.zeros(2, np.float32)
        np.testing.assert_allclose(np.clip(clean.get_obs(states[-1]) + noise0, low, high), ref_obs0, atol=1e-6, rtol=0)
        noise = copy.deepcopy(ref.np_random).normal(0, sigma, size=(T, 2)).astype(np.float32)
        actions.append(pendulum_actions(rng, T + 3))
        records.append((run_popgym(ref, actions[-1]), noise))
    states, actions = stack(states), np.stack(actions)
    clean_obs, _, reward, terminated, truncated = rollouts(clean, params, states, actions, path)
    if noisy:  # the noisy env has the clean twin's dynamics and rewards
        noisy_final, _, noisy_reward, _, noisy_truncated = rollouts(env, params, states, actions, path)
        np.testing.assert_array_equal(noisy_reward, reward)
        np.testing.assert_array_equal(noisy_truncated, truncated)
        assert np.abs(noisy_final - clean_obs).max(axis=(1, 2)).min() > 0
    for i, ((obs_ref, r_ref, term_ref, trunc_ref), noise) in enumerate(records):
        assert len(r_ref) == T and trunc_ref[-1] and not term_ref.any()
        expected = np.clip(clean_obs[i, :T] + (noise if noisy else 0), low, high)
        # float32 round-off grows near the unstable upright position (one seed here reaches 3.7e-3
        # at step 196 of 200): tight over the first 100 steps, looser over the rest, at about 3x the
        # largest differences measured on these seeds (observations 1.7e-5 and 3.7e-3, rewards 1e-7
        # and 1.6e-5). The exactness checks are the float64 test below and the one-step float32 test
        # at round-off tolerances (test_envs_differential.py).
        np.testing.assert_allclose(expected[:100], obs_ref[:100], atol=5e-5, rtol=0)
        np.testing.assert_allclose(expected, obs_ref, atol=1e-2, rtol=0)
        np.testing.assert_allclose(reward[i, :100], r_ref[:100], atol=3e-7, rtol=0)
        np.testing.assert_allclose(reward[i, :T], r_ref, atol=5e-5, rtol=0)
        np.testing.assert_array_equal(terminated[i, :T], term_ref)
        np.testing.assert_array_equal(truncated[i, :T], trunc_ref)
        assert not terminated[i].any() and np.flatnonzero(truncated[i]).tolist() == [T - 1]


@pytest.mark.parametrize("level", LEVELS)
def test_pendulum_matches_popgym_float64(level):
    """Under x64 the JAX dynamics and reward equal gymnasium's float64 ones to round-off."""
    env, params = ep.make("PositionOnlyPendulum" + level)
    ref = popgym_env("PositionOnlyPendulum" + level)
    T = params.max_steps_in_episode
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):

        @fast_jit
        def run(state, actions):
            # step_env (no auto-reset: reset_env draws a float32 state) with the float64 state.
            def body(state, action):
                obs, state, reward, terminated, _ = env.step_env(jax.random.key(0), state, action, params)
                return state, (state.physics, reward, terminated)

            return jax.lax.scan(body, state, actions)[1]

        for seed in range(3):
            ref.reset(seed=seed)
            state = pendulum_state(ref, jnp.float64)
            actions = pendulum_actions(rng, T).astype(np.float64)
            physics, reward, terminated = jax.tree.map(np.asarray, run(state, actions))
            ref_physics, ref_reward = [], []
            for a in actions:
                _, r, _, _, _ = ref.step(a)
                ref_physics.append(np.asarray(ref.state))
                ref_reward.append(r)
            assert physics.dtype == np.float64
            np.testing.assert_allclose(physics, np.array(ref_physics), atol=1e-9, rtol=0)
            np.testing.assert_allclose(reward, ref_reward, atol=1e-7, rtol=0)  # float32 rewards
            assert not terminated.any()


def test_pendulum_reward_transform_and_bounds():
    """popgym's r' = ((r + c) / c) / T: the worst state/torque pays -1/T, the best +1/T."""
    # (theta, theta_dot, torque): worst cases, best case, others incl. unwrapped angles, clipping.
    cases = np.array(
        [[np.pi, 8.0, 2.0], [np.pi, -8.0, -2.0], [0.0, 0.0, 0.0], [1.0, -3.0, 0.5], [7.0, 2.0, -1.0], [-4.0, 1.0, 3.0]]
    )
    for level in LEVELS:
        env, params = ep.make("PositionOnlyPendulum" + level)
        ref = popgym_env("PositionOnlyPendulum" + level)
        T = params.max_steps_in_episode
        states = ep.PendulumState(physics=jnp.asarray(cases[:, :2], jnp.float32), time=jnp.zeros(len(cases), jnp.int32))
        step = fast_jit(jax.vmap(env.step_env, in_axes=(None, 0, 0, None)))
        _, _, reward, terminated, _ = step(jax.random.key(0), states, jnp.asarray(cases[:, 2:], jnp.float32), params)
        ref.reset(seed=0)
        for (theta, theta_dot, torque), r in zip(cases, np.asarray(reward)):
            ref.state = np.array([theta, theta_dot])
            _, r_ref, _, _, _ = ref.step(np.array([torque], np.float32))
            assert r == pytest.approx(r_ref, abs=1e-6)
        assert not bool(terminated.any())
        assert reward[0] == pytest.approx(-1 / T, abs=1e-6) and reward[1] == pytest.approx(-1 / T, abs=1e-6)
        assert reward[2] == pytest.approx(1 / T, abs=1e-7)
        # A random-policy episode: every reward within [-1/T, 1/T], the return within [-1, 1].
        _, _, _, reward, done, info = wrapped_rollout(ep.EpisodeStatsWrapper(env), params, num_envs=8, num_steps=T)
        assert (np.abs(reward) <= 1 / T + 1e-7).all() and done[-1].all() and not done[:-1].any()
        assert (np.abs(info["returned_episode_return"][-1]) <= 1 + 1e-5).all()


def test_pendulum_action_clipping_and_shapes():
    env, params = ep.make("PositionOnlyPendulumEasy")
    _, state = env.reset(jax.random.key(0), params)
    out = [env.step_env(jax.random.key(0), state, a, params) for a in (jnp.array([2.0]), jnp.float32(2.0), jnp.array([7.5]))]
    for o in out[1:]:
        np.testing.assert_array_equal(o[0], out[0][0])
        np.testing.assert_array_equal(o[1].physics, out[0][1].physics)
        assert float(o[2]) == float(out[0][2])


@pytest.mark.parametrize("level", LEVELS)
def test_noisy_pendulum_noise_statistics(level):
    env, params = ep.make("NoisyPositionOnlyPendulum" + level)
    noisy, clean_obs = noise_residuals(env, params)
    assert (np.abs(noisy) <= 1.0).all()  # clipped to [-1, 1] (popjaxrl's was not: saw 1.21)
    assert (np.abs(noisy) == 1.0).any()
    assert noise_matches(noisy, clean_obs, env.noise_sigma, -1.0, 1.0)
    # The check has power: a 10% different sigma, or no clipping, is rejected on the same data.
    assert not noise_matches(noisy, clean_obs, 1.1 * env.noise_sigma, -1.0, 1.0)
    assert not noise_matches(noisy, clean_obs, env.noise_sigma, -np.inf, np.inf)


# ---------------------------------------------------------------------------------------------
# Wrappers with the Box action.
# ---------------------------------------------------------------------------------------------
def test_previous_action_wrapper_box_action():
    base, params = ep.make("PositionOnlyPendulumHard")  # T = 100: two auto-resets in 250 steps
    env = ep.PreviousActionWrapper(base)
    assert env.observation_space(params).shape == (2 + 1 + 1,)
    obs0, obs, actions, _, done, _ = wrapped_rollout(env, params, num_envs=3, num_steps=250)
    np.testing.assert_array_equal(obs0[:, 2:], np.tile([0.0, 1.0], (3, 1)))
    assert np.flatnonzero(done[:, 0]).tolist() == [99, 199]
    expected_block = np.where(done[..., None], 0.0, actions)  # the raw torque, shape (1,)
    np.testing.assert_array_equal(obs[..., 2:3], expected_block)
    np.testing.assert_array_equal(obs[..., 3], done.astype(np.float32))
