"""envs_popjax against the `popgym` package (1.0.7) as the oracle, and the module's contract.

Covered here: RepeatFirst, RepeatPrevious, PositionOnlyCartPole, NoisyPositionOnlyCartPole (every
difficulty), then `make`/ids/aliases/overrides and the two wrappers. The differential tests copy
popgym's hidden state (the shuffled deck, the cart-pole state) into the JAX state after
`reset(seed)`, drive both envs with the same random actions and compare every step, both through `make`
(`vmap(env.step)`) and through the batched env of `make_vec` (`rollouts`, `PATHS`).
"""

import copy
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import popgym.envs
import pytest
from gymnasium.utils import seeding
from scipy import stats

import envs_popjax as ep

pytestmark = pytest.mark.timeout(300)

LEVELS = ep.DIFFICULTIES
CARD_FAMILIES = ("RepeatFirst", "RepeatPrevious")
CARTPOLE_FAMILIES = ("PositionOnlyCartPole", "NoisyPositionOnlyCartPole")


def popgym_env(env_id: str):
    return getattr(popgym.envs, env_id)()


# Tests need correct, not fast, code: XLA's cheapest compile roughly halves compile time,
# which dominates this file (one compile per env and shape).
fast_jit = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
)


@functools.cache
def default_env(env_id: str):
    """make(env_id), built once per test session so jitted rollouts compile once per id."""
    return ep.make(env_id)


_ROLLOUTS = {}  # (id(env), path, episodes) -> (env, jitted rollout): one compiled program per env object and path
PATHS = ("make", "make_vec")


def stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def rollouts(env, params, states, actions, path="make", key=None):
    """Step episodes from `states` (stacked, one per episode) through `actions` [episode, time, ...] in one jitted
    lax.scan: with `path="make"` of `vmap(env.step)`, with `path="make_vec"` of the batched env that `make_vec`
    builds around `env` (`ep.VecEnv(env, episodes)`; it resets ended envs its own way).

    Returns numpy arrays [episode, time, ...]: the observation before any auto-reset (`info["final_observation"]`),
    the returned observation, reward, terminated, truncated.
    """
    actions = jnp.asarray(actions)
    cache_key = (id(env), path, actions.shape[0])
    if cache_key not in _ROLLOUTS:
        step = jax.vmap(env.step, (None, 0, 0, None)) if path == "make" else ep.VecEnv(env, actions.shape[0]).step

        def scan_fn(params, states, actions, key):
            def body(states, inputs):
                step_key, action = inputs
                obs, states, reward, terminated, truncated, info = step(step_key, states, action, params)
                return states, (info["final_observation"], obs, reward, terminated, truncated)

            keys = jax.random.split(key, actions.shape[1])
            return [jnp.swapaxes(x, 0, 1) for x in jax.lax.scan(body, states, (keys, jnp.swapaxes(actions, 0, 1)))[1]]

        _ROLLOUTS[cache_key] = (env, fast_jit(scan_fn))
    key = jax.random.key(0) if key is None else key
    return jax.tree.map(np.asarray, _ROLLOUTS[cache_key][1](params, states, actions, key))


def rollout(env, params, state, actions, key=None):
    """`rollouts` of one episode from `state` through `actions` [time, ...], via `make`: arrays [time, ...]."""
    out = rollouts(env, params, stack([state]), np.asarray(actions)[None], key=key)
    return [x[0] for x in out]


# ---------------------------------------------------------------------------------------------
# Spaces, encodings, difficulty constants.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("family", CARD_FAMILIES + CARTPOLE_FAMILIES)
def test_spaces_match_popgym(family, level):
    env_id = family + level
    env, params = ep.make(env_id)
    ref = popgym_env(env_id)
    obs_space, act_space = env.observation_space(params), env.action_space(params)
    # Actions: popgym's Discrete(n) is kept.
    assert act_space.n == ref.action_space.n == env.num_actions
    if family in CARD_FAMILIES:
        # Discrete(4) suit observation -> one-hot of length 4 in [0, 1].
        assert ref.observation_space.n == 4
        assert obs_space.shape == (4,)
        np.testing.assert_array_equal(np.broadcast_to(obs_space.low, (4,)), 0.0)
        np.testing.assert_array_equal(np.broadcast_to(obs_space.high, (4,)), 1.0)
    else:
        # Box stays as its floats, with popgym's bounds.
        assert obs_space.shape == ref.observation_space.shape == (2,)
        np.testing.assert_allclose(obs_space.low, ref.observation_space.low, rtol=1e-7)
        np.testing.assert_allclose(obs_space.high, ref.observation_space.high, rtol=1e-7)
    obs, _ = env.reset(jax.random.key(1), params)
    assert obs.shape == obs_space.shape and obs.dtype == jnp.float32
    assert bool(obs_space.contains(obs))


@pytest.mark.parametrize("level", LEVELS)
def test_difficulty_constants(level):
    rf, rp = ep.make("RepeatFirst" + level)[0], ep.make("RepeatPrevious" + level)[0]
    assert rf.num_cards == popgym_env("RepeatFirst" + level).deck.num_cards
    ref_rp = popgym_env("RepeatPrevious" + level)
    assert (rp.num_cards, rp.k) == (ref_rp.deck.num_cards, ref_rp.k)
    for family in CARTPOLE_FAMILIES:
        env, params = default_env(family + level)
        ref = popgym_env(family + level)
        assert params.max_steps_in_episode == ref.max_episode_length
        assert env.noise_sigma == float(getattr(ref, "noise_sigma", np.zeros(1))[0])


def test_difficulty_table():
    """The constants of reference section 2, written out (independent of popgym's classes)."""
    assert [ep.make(f"RepeatFirst{lv}")[0].num_cards - 1 for lv in LEVELS] == [51, 415, 831]
    assert [(ep.make(f"RepeatPrevious{lv}")[0].num_cards, ep.make(f"RepeatPrevious{lv}")[0].k) for lv in LEVELS] == [
        (52, 4),
        (104, 32),
        (156, 64),
    ]
    assert [ep.make(f"PositionOnlyCartPole{lv}")[1].max_steps_in_episode for lv in LEVELS] == [200, 400, 600]
    assert [ep.make(f"NoisyPositionOnlyCartPole{lv}")[1].max_steps_in_episode for lv in LEVELS] == [200] * 3
    assert [ep.make(f"NoisyPositionOnlyCartPole{lv}")[0].noise_sigma for lv in LEVELS] == [0.1, 0.2, 0.3]


# ---------------------------------------------------------------------------------------------
# Card envs: step-by-step against popgym with the deck copied across.
# ---------------------------------------------------------------------------------------------
def card_state(ref) -> ep.CardSequenceState:
    """popgym deals from the end of deck.idx: the cards in observation order are idx[::-1]."""
    return ep.CardSequenceState(cards=jnp.asarray(ref.deck.idx[::-1].copy(), jnp.int32), time=jnp.int32(0))


def run_popgym(ref, actions):
    """Step popgym until the episode ends; per-step obs, reward, terminated, truncated."""
    out = []
    for a in actions:
        obs, reward, terminated, truncated, _ = ref.step(a.item() if ref.action_space.shape == () else a)
        out.append((obs, reward, terminated, truncated))
        if terminated or truncated:
            break
    obs, rewards, terms, truncs = zip(*out)
    return np.array(obs), np.array(rewards), np.array(terms), np.array(truncs)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("family", CARD_FAMILIES)
def test_card_env_matches_popgym_step_by_step(family, level, path):
    env, params = default_env(family + level)
    ref = popgym_env(family + level)
    rng = np.random.default_rng(0)
    steps = env.num_cards - 1  # popgym's T = N - 1, ending with terminated
    states, actions, records = [], [], []
    for seed in range(3):
        ref_obs0, _ = ref.reset(seed=seed)
        states.append(card_state(ref))
        np.testing.assert_array_equal(env.get_obs(states[-1]), np.eye(4)[ref_obs0])
        # Random suits (both reward signs occur), over two episodes: ours auto-resets after the first.
        actions.append(rng.integers(0, 4, size=2 * steps))
        records.append(run_popgym(ref, actions[-1]))
    final_obs, _, reward, terminated, truncated = rollouts(env, params, stack(states), np.stack(actions), path)
    for i, (obs_ref, r_ref, term_ref, trunc_ref) in enumerate(records):
        assert len(r_ref) == steps
        np.testing.assert_array_equal(final_obs[i, :steps], np.eye(4)[obs_ref])
        np.testing.assert_allclose(reward[i, :steps], r_ref, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(terminated[i, :steps], term_ref)
        np.testing.assert_array_equal(truncated[i, :steps], trunc_ref)
        # After the auto-reset the next episode is again N - 1 steps long.
        assert np.flatnonzero(terminated[i] | truncated[i]).tolist() == [steps - 1, 2 * steps - 1]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("family", CARD_FAMILIES)
def test_card_reward_constants(family, level):
    env, params = default_env(family + level)
    n, k = env.num_cards, getattr(env, "k", 1)
    _, state = env.reset(jax.random.key(3), params)
    actions = np.random.default_rng(1).integers(0, 4, size=n - 1)
    _, _, reward, terminated, _ = rollout(env, params, state, actions)
    scale = 1.0 / (n - 1) if family == "RepeatFirst" else 1.0 / (n - k)
    np.testing.assert_array_equal(reward[: k - 1], 0.0)  # RepeatPrevious: first k-1 actions unscored
    np.testing.assert_allclose(np.abs(reward[k - 1 :]), scale, rtol=1e-6)
    assert terminated.tolist() == [False] * (n - 2) + [True]


def oracle_returns(env, params, num_episodes: int, lag: int, first: bool = False) -> np.ndarray:
    """Returns of the observation-only policy 'repeat the suit seen `lag` observations ago'
    (or always the first suit), over `num_episodes` vmapped episodes of the JAX env."""
    n_steps = env.num_cards - 1

    def episode(key):
        obs, state = env.reset(key, params)
        history = jnp.zeros(n_steps + 1, jnp.int32).at[0].set(jnp.argmax(obs))

        def body(carry, t):
            state, history, key = carry
            key, step_key = jax.random.split(key)
            action = history[0] if first else history[jnp.maximum(t - lag, 0)]
            obs, state, reward, terminated, truncated, info = env.step(step_key, state, action, params)
            history = history.at[t + 1].set(jnp.argmax(info["final_observation"]))
            return (state, history, key), (reward, terminated | truncated)

        _, (rewards, dones) = jax.lax.scan(body, (state, history, key), jnp.arange(n_steps))
        return rewards, dones

    rewards, dones = fast_jit(jax.vmap(episode))(jax.random.split(jax.random.key(0), num_episodes))
    assert np.asarray(dones[:, -1]).all() and not np.asarray(dones[:, :-1]).any()
    return np.sum(np.asarray(rewards, np.float64), axis=1)


def popgym_lag_policy_return(ref, seed: int, lag: int) -> float:
    obs, _ = ref.reset(seed=seed)
    history, total = [obs], 0.0
    while True:
        action = history[max(len(history) - 1 - lag, 0)]
        obs, reward, terminated, truncated, _ = ref.step(action)
        history.append(obs)
        total += reward
        if terminated or truncated:
            return total


@pytest.mark.parametrize("level", LEVELS)
def test_repeat_first_oracle_scores_one(level):
    env, params = default_env("RepeatFirst" + level)
    np.testing.assert_allclose(oracle_returns(env, params, 4, lag=0, first=True), 1.0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("level", LEVELS)
def test_repeat_previous_oracle_lag_k_minus_1_scores_one(level):
    env, params = default_env("RepeatPrevious" + level)
    np.testing.assert_allclose(oracle_returns(env, params, 4, lag=env.k - 1), 1.0, atol=1e-5, rtol=0)
    # The same oracle on popgym itself scores 1.0: the oracle, not just the port, is right.
    assert popgym_lag_policy_return(popgym_env("RepeatPrevious" + level), 0, env.k - 1) == pytest.approx(1.0)


def test_regression_popjaxrl_repeat_first_length_is_n_minus_1():
    """popjaxrl/popjym: T = N (one extra rewarded step, max return N/(N-1) = 1.0196 on Easy)."""
    env, params = default_env("RepeatFirstEasy")
    _, state = env.reset(jax.random.key(0), params)
    _, _, _, terminated, _ = rollout(env, params, state, np.zeros(60, np.int32))
    assert np.flatnonzero(terminated)[0] + 1 == 51  # N - 1 step() calls, not N
    (ret,) = oracle_returns(env, params, 1, lag=0, first=True)
    assert ret == pytest.approx(1.0, abs=1e-5) and ret != pytest.approx(52 / 51, abs=1e-3)


def test_regression_popjaxrl_repeat_previous_lag_is_k_minus_1_not_k():
    """popjaxrl/popjym target cards[t - k]; popgym targets cards[t - (k - 1)] (k-th most recent,
    counting the current card). The lag-k policy must not score 1.0 and equals popgym's score."""
    env, params = default_env("RepeatPreviousEasy")
    ref = popgym_env("RepeatPreviousEasy")
    ref.reset(seed=5)
    cards = card_state(ref)
    # Lag-k policy on identical cards in both implementations: same (poor) return.
    suits = np.asarray(cards.cards) % 4
    t = np.arange(env.num_cards - 1)
    actions = suits[np.maximum(t - env.k, 0)]
    _, _, reward, _, _ = rollout(env, params, cards, actions)
    ref_return = popgym_lag_policy_return(ref, 5, env.k)
    assert float(reward.sum()) == pytest.approx(ref_return, abs=1e-5)
    assert ref_return < 0.5
    assert (oracle_returns(env, params, 4, lag=env.k) < 0.5).all()
    # And the episode is N - 1 steps, not N.
    assert env.max_episode_length == 51


# ---------------------------------------------------------------------------------------------
# CartPole: step-by-step against popgym with env.state copied across.
# ---------------------------------------------------------------------------------------------
def cartpole_state(ref) -> ep.CartPoleState:
    return ep.CartPoleState(physics=jnp.asarray(np.asarray(ref.state, np.float32)), time=jnp.int32(0))


@functools.cache
def _clean_env(env_class, max_episode_length):
    return env_class(noise_sigma=0.0, max_episode_length=max_episode_length)


def clean_env_of(env):
    """The noiseless twin of a noisy control env: identical physics, auto-resets and keys (one object per env
    class and horizon, so its jitted rollouts compile once)."""
    return _clean_env(type(env), env.max_episode_length)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("family", CARTPOLE_FAMILIES)
def test_cartpole_matches_popgym_step_by_step(family, level, path):
    env, params = default_env(family + level)
    ref = popgym_env(family + level)
    noisy = env.noise_sigma > 0
    clean = clean_env_of(env)
    rng = np.random.default_rng(1)
    T, sigma = params.max_steps_in_episode, np.full(2, env.noise_sigma)
    low, high = ref.observation_space.low, ref.observation_space.high
    states, actions, records = [], [], []
    for seed in range(12):
        ref_obs0, _ = ref.reset(seed=seed)
        states.append(cartpole_state(ref))
        noise0, noise = np.zeros(2, np.float32), np.zeros((T, 2), np.float32)
        if noisy:
            # The reset noise: gymnasium's generator for `seed`, after the uniform(4) initial state.
            gen = seeding.np_random(seed)[0]
            gen.uniform(-0.05, 0.05, size=(4,))
            noise0 = gen.normal(0, sigma).astype(np.float32)
            # numpy draws noise per step in float64 and casts it to float32 (2 draws per step)
            noise = copy.deepcopy(ref.np_random).normal(0, sigma, size=(T, 2)).astype(np.float32)
        expected0 = np.clip(np.asarray(clean.get_obs(states[-1])) + noise0, low, high)
        np.testing.assert_allclose(expected0, ref_obs0, atol=1e-6, rtol=0)
        actions.append(rng.integers(0, 2, size=T))
        records.append((run_popgym(ref, actions[-1]), noise))
    states, actions = stack(states), np.stack(actions)
    # Noise-free observations of the JAX dynamics (the noisy env's physics equals its twin's).
    clean_obs, _, reward, terminated, truncated = rollouts(clean, params, states, actions, path)
    if noisy:
        noisy_final, _, reward_noisy, terminated_noisy, _ = rollouts(env, params, states, actions, path)
        np.testing.assert_array_equal(reward_noisy, reward)
        np.testing.assert_array_equal(terminated_noisy, terminated)
    lengths = []
    for i, ((obs_ref, r_ref, term_ref, trunc_ref), noise) in enumerate(records):
        steps = len(r_ref)
        lengths.append(steps)
        expected = clean_obs[i, :steps]
        if noisy:
            assert np.abs(noisy_final[i, :steps] - expected).max() > 0  # the JAX obs is noisy
            expected = np.clip(expected + noise[:steps], low, high)
        np.testing.assert_allclose(expected, obs_ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(reward[i, :steps], r_ref, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(terminated[i, :steps], term_ref)
        np.testing.assert_array_equal(truncated[i, :steps], trunc_ref)
        assert bool(terminated[i, steps - 1] | truncated[i, steps - 1])
    assert len(set(lengths)) > 3  # random episodes of varied length were compared


@pytest.mark.parametrize("family", CARTPOLE_FAMILIES)
def test_cartpole_terminated_and_truncated_at_same_step(family):
    """With T set to the step where the pole falls, popgym reports both flags at step T."""
    ref_easy = popgym_env(family + "Easy")
    ref_easy.reset(seed=7)
    actions = np.random.default_rng(7).integers(0, 2, size=200)
    _, _, term, _ = run_popgym(ref_easy, actions)
    t_fall = len(term)
    assert term[-1] and t_fall < 200
    sigma = getattr(ref_easy, "noise_sigma", np.zeros(2))[0]
    kwargs = dict(noise_sigma=sigma) if sigma > 0 else {}
    ref = getattr(popgym.envs, family)(max_episode_length=t_fall, **kwargs)
    ref.reset(seed=7)
    state = cartpole_state(ref)
    _, r_ref, term_ref, trunc_ref = run_popgym(ref, actions)
    assert len(r_ref) == t_fall and term_ref[-1] and trunc_ref[-1]
    env, params = ep.make(family + "Easy", max_episode_length=t_fall)
    assert params.max_steps_in_episode == t_fall
    for path in PATHS:
        _, _, reward, terminated, truncated = rollouts(env, params, stack([state]), actions[None, :t_fall], path)
        np.testing.assert_array_equal(terminated[0], term_ref)
        np.testing.assert_array_equal(truncated[0], trunc_ref)
        np.testing.assert_allclose(reward[0], r_ref, atol=1e-6, rtol=0)
        np.testing.assert_allclose(reward[0], 1.0 / t_fall, rtol=1e-6)


def test_cartpole_termination_thresholds():
    """Just inside / just outside |x| = 2.4 and |theta| = 12 degrees, from both sides, as popgym.
    (With zero velocities one Euler step leaves the positions unchanged.)"""
    env, params = ep.make("PositionOnlyCartPoleEasy")
    ref = popgym_env("PositionOnlyCartPoleEasy")
    theta_max = 12 * 2 * math.pi / 360
    positions = [(x, 0.0) for x in (2.3999, 2.4001, -2.3999, -2.4001)]
    positions += [(0.0, th) for th in (theta_max - 1e-5, theta_max + 1e-5, -theta_max + 1e-5, -theta_max - 1e-5)]
    physics = jnp.array([[x, 0.0, th, 0.0] for x, th in positions], jnp.float32)
    states = ep.CartPoleState(physics=physics, time=jnp.zeros(len(positions), jnp.int32))
    step = fast_jit(jax.vmap(env.step_env, in_axes=(None, 0, None, None)))
    _, _, _, terminated, _ = step(jax.random.key(0), states, 1, params)
    expected = []
    for p in np.asarray(physics, np.float64):
        ref.reset(seed=0)
        ref.state = p
        expected.append(ref.step(1)[2])
    assert expected == [False, True] * 4
    assert np.asarray(terminated).tolist() == expected


def balancing_action(physics):
    """A linear bang-bang controller that keeps the pole up for 600+ steps (uses hidden state)."""
    return (jnp.dot(jnp.array([0.5, 1.0, 10.0, 2.0]), physics) > 0).astype(jnp.int32)


@pytest.mark.parametrize("level", LEVELS)
def test_cartpole_truncates_at_T_when_balanced(level):
    """Closed loop in both implementations: truncated (not terminated) at exactly T, return 1."""
    env, params = default_env("PositionOnlyCartPole" + level)
    ref = popgym_env("PositionOnlyCartPole" + level)
    T = params.max_steps_in_episode
    for seed in range(2):
        ref.reset(seed=seed)
        state = cartpole_state(ref)
        ref_len, ref_ret = 0, 0.0
        while True:
            _, r, term, trunc, _ = ref.step(int(np.dot([0.5, 1.0, 10.0, 2.0], ref.state) > 0))
            ref_len, ref_ret = ref_len + 1, ref_ret + r
            if term or trunc:
                break
        assert (ref_len, term, trunc) == (T, False, True)

        def body(state, key):
            obs, state_next, reward, terminated, truncated, _ = env.step(key, state, balancing_action(state.physics), params)
            return state_next, (reward, terminated, truncated)

        _, (reward, terminated, truncated) = fast_jit(lambda s: jax.lax.scan(body, s, jax.random.split(jax.random.key(0), T)))(state)
        assert not bool(terminated.any())
        assert np.flatnonzero(np.asarray(truncated)).tolist() == [T - 1]
        assert float(np.sum(np.asarray(reward, np.float64))) == pytest.approx(ref_ret, abs=1e-5)
        assert ref_ret == pytest.approx(1.0)


def test_cartpole_reset_distribution():
    env, params = ep.make("PositionOnlyCartPoleEasy")
    _, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(jax.random.key(0), 4096), params)
    physics = np.asarray(state.physics)
    assert physics.dtype == np.float32 and np.abs(physics).max() <= 0.05
    # U(-0.05, 0.05) in each of the 4 components (KS against the uniform, independent draws).
    for i in range(4):
        assert stats.kstest(physics[:, i], stats.uniform(-0.05, 0.1).cdf).pvalue > 1e-3
    assert np.abs(np.corrcoef(physics.T) - np.eye(4)).max() < 0.1


# ---------------------------------------------------------------------------------------------
# Noisy cart-pole: the JAX noise process. obs - clean ~ N(0, sigma^2), clipped to the bounds.
# ---------------------------------------------------------------------------------------------
def noise_residuals(env, params, num_envs=256, num_steps=200, seed=0):
    """(obs - noiseless twin's obs) over a vmapped random-action run with auto-resets."""
    clean = clean_env_of(env)

    def run(key):
        key_reset, key_act, key_steps = jax.random.split(key, 3)
        obs_n, state_n = env.reset(key_reset, params)
        obs_c, state_c = clean.reset(key_reset, params)
        actions = jax.random.randint(key_act, (num_steps,), 0, 2)

        def body(carry, inputs):
            state_n, state_c = carry
            step_key, action = inputs
            obs_n, state_n, *_ = env.step(step_key, state_n, action, params)
            obs_c, state_c, *_ = clean.step(step_key, state_c, action, params)
            return (state_n, state_c), (obs_n, obs_c)

        _, (obs_ns, obs_cs) = jax.lax.scan(body, (state_n, state_c), (jax.random.split(key_steps, num_steps), actions))
        return jnp.concatenate([obs_n[None], obs_ns]), jnp.concatenate([obs_c[None], obs_cs])

    noisy, clean_obs = fast_jit(jax.vmap(run))(jax.random.split(jax.random.key(seed), num_envs))
    return np.asarray(noisy, np.float64), np.asarray(clean_obs, np.float64)


def noise_matches(noisy, clean_obs, sigma, low, high, seed=0) -> bool:
    """Does `noisy` look like clip(clean + N(0, sigma^2), low, high), fresh every step and
    independent between components? Arrays are (envs, steps, 2).

    Two-sample KS per component against numpy draws of that exact clipped law; and where the
    clean value lies 4 sigma inside the bounds (chosen by the clean value, so no selection bias)
    the residual is plain N(0, sigma^2): mean, std, lag-1 and cross-component correlation
    (checked where there are enough such samples; the cart-pole's theta at sigma >= 0.2 and the
    pendulum at sigma >= 0.3 have none, the KS test covers them).
    """
    residual = noisy - clean_obs
    reference = np.clip(clean_obs + np.random.default_rng(seed).normal(0, sigma, clean_obs.shape), low, high) - clean_obs
    inside = (clean_obs - low > 4 * sigma) & (high - clean_obs > 4 * sigma)
    ok, checked = True, 0
    for i in range(2):
        ok &= stats.ks_2samp(residual[..., i].ravel(), reference[..., i].ravel()).pvalue > 1e-4
        r = residual[..., i][inside[..., i]]
        both = inside[:, 1:, i] & inside[:, :-1, i]
        if both.sum() >= 1000:
            checked += 1
            ok &= abs(r.mean()) < 5 * sigma / math.sqrt(r.size)
            ok &= abs(r.std() / sigma - 1) < 5 / math.sqrt(2 * r.size) + 0.005
            lag1 = np.corrcoef(residual[:, 1:, i][both], residual[:, :-1, i][both])[0, 1]
            ok &= abs(lag1) < 5 / math.sqrt(both.sum())
    both = inside[..., 0] & inside[..., 1]
    if both.sum() >= 1000:
        cross = np.corrcoef(residual[..., 0][both], residual[..., 1][both])[0, 1]
        ok &= abs(cross) < 5 / math.sqrt(both.sum())
    assert checked or sigma >= 0.25, "no unclipped samples to check mean/std on"
    return bool(ok)


@pytest.mark.parametrize("level", LEVELS)
def test_noisy_cartpole_noise_statistics(level):
    env, params = ep.make("NoisyPositionOnlyCartPole" + level)
    noisy, clean_obs = noise_residuals(env, params)
    space = env.observation_space(params)
    low, high = np.asarray(space.low, np.float64), np.asarray(space.high, np.float64)
    assert (noisy >= low - 1e-7).all() and (noisy <= high + 1e-7).all()
    assert noise_matches(noisy, clean_obs, env.noise_sigma, low, high)
    # The check has power: the same data are rejected as noise of a 5% different sigma,
    # and unclipped noise is rejected where clipping matters (Hard: theta hits its bound).
    assert not noise_matches(noisy, clean_obs, 1.05 * env.noise_sigma, low, high)
    if level == "Hard":
        assert (np.abs(noisy[..., 1]) >= high[1] - 1e-6).any()
        assert not noise_matches(noisy, clean_obs, env.noise_sigma, -np.inf, np.inf)


# ---------------------------------------------------------------------------------------------
# The contract: make, ids, aliases, overrides.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ep.CANONICAL_IDS)
def test_every_canonical_id_builds_and_steps_under_jit_vmap(env_id):
    env, params = ep.make(env_id)
    num_envs, num_steps = 3, 4
    actions = random_actions(env.action_space(params), (num_steps, num_envs))

    def run(key, actions):
        keys = jax.random.split(key, num_envs + 1)
        obs, state = jax.vmap(env.reset, in_axes=(0, None))(keys[:num_envs], params)

        def body(state, inputs):
            key, action = inputs
            obs, state, reward, terminated, truncated, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                jax.random.split(key, num_envs), state, action, params
            )
            return state, (obs, reward, terminated, truncated)

        return obs, jax.lax.scan(body, state, (jax.random.split(keys[-1], num_steps), actions))[1]

    obs0, (obs, reward, terminated, truncated) = fast_jit(run)(jax.random.key(0), actions)
    obs_shape = env.observation_space(params).shape
    assert len(obs_shape) == 1 and obs0.shape == (num_envs, *obs_shape) and obs0.dtype == jnp.float32
    assert obs.shape == (num_steps, num_envs, *obs_shape) and obs.dtype == jnp.float32
    assert reward.shape == terminated.shape == truncated.shape == (num_steps, num_envs)
    assert terminated.dtype == truncated.dtype == jnp.bool_
    assert np.isfinite(np.asarray(obs)).all() and np.isfinite(np.asarray(reward)).all()


def env_config(env_id):
    env, params = ep.make(env_id)
    return type(env), {k: v if not isinstance(v, np.ndarray) else v.tolist() for k, v in vars(env).items()}, params


@pytest.mark.parametrize("alias", sorted(ep.ALIASES))
def test_alias_gives_the_same_env(alias):
    target = ep.ALIASES[alias]
    assert target in ep.CANONICAL_IDS and ep.canonical_id(alias) == target
    assert env_config(alias) == env_config(target)


def test_named_aliases():
    expected = {
        "CartPoleHard": "PositionOnlyCartPoleHard",
        "StatelessCartPoleEasy": "PositionOnlyCartPoleEasy",
        "StatelessCartPoleMedium": "PositionOnlyCartPoleMedium",
        "NoisyStatelessCartPoleHard": "NoisyPositionOnlyCartPoleHard",
        "NoisyCartPoleEasy": "NoisyPositionOnlyCartPoleEasy",
    }
    for alias, target in expected.items():
        assert alias in ep.ENV_IDS and ep.canonical_id(alias) == target
        assert env_config(alias) == env_config(target)
    # Every id in ENV_IDS is unique and resolves to itself or its canonical id.
    assert len(set(ep.ENV_IDS)) == len(ep.ENV_IDS)
    assert set(ep.CANONICAL_IDS) == {f + lv for f in ep.FAMILIES for lv in LEVELS}


def test_unknown_id_raises_naming_closest_ids():
    with pytest.raises(ValueError, match="RepeatPreviousEasy"):
        ep.make("RepeatPreviousEasyy")
    with pytest.raises(ValueError, match="PositionOnlyCartPoleHard"):
        ep.make("PositionOnlyCartpoleHard")
    with pytest.raises(ValueError) as excinfo:
        ep.make("TotallyUnknownXYZ")
    assert "TotallyUnknownXYZ" in str(excinfo.value) and "RepeatFirstEasy" in str(excinfo.value)
    with pytest.raises(ValueError):
        ep.canonical_id("RepeatFirst")  # a family without a difficulty is not an id


def test_overrides_change_the_env():
    env, params = ep.make("RepeatPreviousEasy", k=2)
    assert env.k == 2 and env.reward_scale == pytest.approx(1 / 50)
    # ... and equal popgym's RepeatPrevious(num_decks=1, k=2) step by step.
    ref = popgym.envs.RepeatPrevious(num_decks=1, k=2)
    ref.reset(seed=3)
    state = card_state(ref)
    actions = np.random.default_rng(3).integers(0, 4, size=51)
    obs_ref, r_ref, term_ref, _ = run_popgym(ref, actions)
    final_obs, _, reward, terminated, _ = rollout(env, params, state, actions)
    np.testing.assert_array_equal(final_obs, np.eye(4)[obs_ref])
    np.testing.assert_allclose(reward, r_ref, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(terminated, term_ref)
    # Env-param overrides.
    env, params = ep.make("PositionOnlyCartPoleEasy", max_steps_in_episode=50)
    assert params.max_steps_in_episode == 50
    env, params = ep.make("NoisyPositionOnlyCartPoleEasy", noise_sigma=0.25)
    assert env.noise_sigma == 0.25 and params.max_steps_in_episode == 200
    # Defaults are not changed by an earlier override.
    assert ep.make("RepeatPreviousEasy")[0].k == 4


def test_unknown_override_raises():
    with pytest.raises(ValueError, match="foo"):
        ep.make("RepeatPreviousEasy", foo=1)
    with pytest.raises(ValueError, match="noise_sigma"):
        ep.make("RepeatFirstEasy", noise_sigma=0.1)


# ---------------------------------------------------------------------------------------------
# Wrappers.
# ---------------------------------------------------------------------------------------------
def random_actions(action_space, shape, seed=0) -> np.ndarray:
    """Uniform random actions drawn in numpy (Discrete: integers, Box: floats in its bounds)."""
    rng = np.random.default_rng(seed)
    if hasattr(action_space, "n"):
        return rng.integers(0, action_space.n, size=shape).astype(np.int32)
    low, high = np.broadcast_to(action_space.low, action_space.shape), np.broadcast_to(action_space.high, action_space.shape)
    return rng.uniform(low, high, size=(*shape, *action_space.shape)).astype(np.float32)


def wrapped_rollout(env, params, num_envs, num_steps, seed=0):
    """Random actions, vmapped envs, a jitted scan; numpy (obs0, obs, actions, reward, done, info)."""
    actions = random_actions(env.action_space(params), (num_steps, num_envs), seed)

    def run(key, actions):
        key_reset, key_steps = jax.random.split(key)
        obs0, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(key_reset, num_envs), params)

        def body(state, inputs):
            key, action = inputs
            obs, state, reward, terminated, truncated, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                jax.random.split(key, num_envs), state, action, params
            )
            return state, (obs, reward, terminated | truncated, info)

        return obs0, jax.lax.scan(body, state, (jax.random.split(key_steps, num_steps), actions))[1]

    obs0, (obs, reward, done, info) = fast_jit(run)(jax.random.key(seed), actions)
    return jax.tree.map(np.asarray, (obs0, obs, actions, reward, done, info))


def test_previous_action_wrapper_flags_and_actions():
    base, params = ep.make("RepeatFirstEasy")  # T = 51: several auto-resets in 130 steps
    env = ep.PreviousActionWrapper(base)
    inner = base.observation_space(params).shape[0]
    assert env.observation_space(params).shape == (inner + 4 + 1,)
    obs0, obs, actions, _, done, _ = wrapped_rollout(env, params, num_envs=4, num_steps=130)
    # At reset: zero action block, first flag 1.
    np.testing.assert_array_equal(obs0[:, inner:], np.tile([0, 0, 0, 0, 1.0], (4, 1)))
    assert done.sum() == 4 * 2 and done[50].all() and done[101].all()
    for t in range(130):
        for i in range(4):
            block, flag = obs[t, i, inner:-1], obs[t, i, -1]
            if done[t, i]:  # right after an auto-reset inside step: like a reset
                np.testing.assert_array_equal(block, 0.0)
                assert flag == 1.0
            else:
                np.testing.assert_array_equal(block, np.eye(4)[actions[t, i]])
                assert flag == 0.0
    # The wrapped env's own observation is untouched.
    _, obs_plain, _, _, _, _ = wrapped_rollout(base, params, num_envs=4, num_steps=130)
    np.testing.assert_array_equal(obs[..., :inner], obs_plain)


def test_episode_stats_wrapper_matches_python_accumulation():
    for env_id, num_steps in (("PositionOnlyCartPoleEasy", 300), ("RepeatPreviousEasy", 160)):
        base, params = ep.make(env_id)
        env = ep.EpisodeStatsWrapper(ep.PreviousActionWrapper(base))
        num_envs = 8
        _, _, _, reward, done, info = wrapped_rollout(env, params, num_envs=num_envs, num_steps=num_steps, seed=1)
        np.testing.assert_array_equal(info["returned_episode"], done)
        completed = 0
        for i in range(num_envs):
            running_return, running_length, last_return, last_length = 0.0, 0, 0.0, 0
            for t in range(num_steps):
                running_return += float(reward[t, i])
                running_length += 1
                if done[t, i]:
                    last_return, last_length = running_return, running_length
                    running_return, running_length = 0.0, 0
                    completed += 1
                assert info["returned_episode_return"][t, i] == pytest.approx(last_return, abs=1e-5)
                assert info["returned_episode_length"][t, i] == last_length
        assert completed >= 2 * num_envs  # several episodes per env were checked
