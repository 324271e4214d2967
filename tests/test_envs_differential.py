"""Every registered POPGym family is compared step by step with popgym at every difficulty; the pendulum's float32
step matches popgym's float64 one to float32 round-off, and its start states follow popgym's reset distribution."""

import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import popgym.envs
import pytest
from scipy import stats

import envs_popjax as ep

pytestmark = pytest.mark.timeout(300)

# The suite's step-by-step comparisons with popgym: (test module, test function, the family it plays where its
# parameters name only the level). A family added to envs_popjax.FAMILIES fails the test below until a differential
# test of all its levels is listed here.
DIFFERENTIAL_TESTS = [
    ("test_envs_basic", "test_card_env_matches_popgym_step_by_step", None),
    ("test_envs_basic", "test_cartpole_matches_popgym_step_by_step", None),
    ("test_envs_cards", "test_step_by_step_equals_popgym", None),
    ("test_envs_control", "test_velocity_only_cartpole_matches_popgym_step_by_step", "VelocityOnlyCartPole"),
    ("test_envs_control", "test_pendulum_matches_popgym_float32", None),
    ("test_envs_grid", "test_battleship_matches_popgym_step_by_step", "Battleship"),
    ("test_envs_grid", "test_minesweeper_matches_popgym_step_by_step", "MineSweeper"),
    ("test_envs_grid", "test_labyrinth_matches_popgym_step_by_step", None),
]


def parameter_sets(test) -> list[dict]:
    """The parameter combinations pytest runs `test` with: the product of its parametrize marks."""
    combinations = [{}]
    for mark in getattr(test, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = [n.strip() for n in mark.args[0].split(",")] if isinstance(mark.args[0], str) else list(mark.args[0])
        rows = [getattr(v, "values", v) for v in mark.args[1]]  # pytest.param(...) keeps its values in .values
        rows = [tuple(row) if len(names) > 1 else (row,) for row in rows]
        combinations = [{**c, **dict(zip(names, row, strict=True))} for c in combinations for row in rows]
    return combinations


def test_every_family_has_a_differential_test_against_popgym():
    """Every id of envs_popjax.FAMILIES x DIFFICULTIES is run by one of DIFFERENTIAL_TESTS, each of which exists and
    plays against popgym."""
    covered = set()
    for module_name, name, family in DIFFERENTIAL_TESTS:
        test = getattr(importlib.import_module(module_name), name)
        source = inspect.getsource(test)
        assert "popgym" in name and "popgym" in source, name  # a comparison with the oracle
        if family:  # the family named in its body
            assert f'"{family}' in source, (name, family)
        for params in parameter_sets(test):
            env_id = params.get("env_id") or params.get("family", family) + params["level"]
            covered.add(ep.canonical_id(env_id))
    missing = sorted(set(ep.CANONICAL_IDS) - covered)
    assert not missing, f"no step-by-step test against popgym for {missing}: add one to DIFFERENTIAL_TESTS"


@pytest.mark.parametrize("level", ep.DIFFICULTIES)
def test_pendulum_step_matches_popgym_to_float32_round_off(level):
    """Over popgym's float64 episodes (random torques, some beyond the clip at 2), our float32 step from each of its
    states, rounded to float32, gives its next state, observation and reward to float32 round-off. The whole-episode
    comparison (test_envs_control.py) cannot be this tight: the upright position is unstable and amplifies round-off.

    Tolerance: 4 eps (1 + |theta| + |theta_dot|), eps = 2^-23. Rounding the state costs half an ulp of each component,
    and the step adds a handful of float32 operations (sin, the clip, two multiply-adds; cos and sin for the
    observation) each within an ulp of the state's scale; the reward's slopes in the angle and the velocity, 2 pi /
    (c T) and 1.6 / (c T) with c = 8.14, sum to under 1 / T, so it gets the same bound over T. Measured: at most 0.73
    of (eps (1 + |theta| + |theta_dot|)) for the state and the observation, and of that over T for the reward."""
    env, params = ep.make("PositionOnlyPendulum" + level)
    reference = getattr(popgym.envs, "PositionOnlyPendulum" + level)()
    T, rng = params.max_steps_in_episode, np.random.default_rng(5)
    states, actions, next_states, next_obs, rewards = [], [], [], [], []
    for seed in range(8):
        reference.reset(seed=seed)
        for action in rng.uniform(-2.5, 2.5, size=(T, 1)).astype(np.float32):
            states.append(np.array(reference.state))
            obs, reward, *_ = reference.step(action)
            next_states.append(np.array(reference.state))
            next_obs.append(obs)
            rewards.append(reward)
            actions.append(action)
    states = np.array(states)
    ours = ep.PendulumState(physics=jnp.asarray(states, jnp.float32), time=jnp.zeros(len(states), jnp.int32))
    step = jax.jit(jax.vmap(env.step_env, in_axes=(None, 0, 0, None)))
    obs, state, reward, terminated, _ = step(jax.random.key(0), ours, jnp.asarray(np.array(actions)), params)
    assert obs.dtype == reward.dtype == state.physics.dtype == jnp.float32 and not terminated.any()
    assert np.abs(states[:, 0]).max() > 3 * np.pi  # unwrapped angles, beyond a turn, are covered
    tolerance = 4 * np.finfo(np.float32).eps * (1 + np.abs(states).sum(1))
    errors = {
        "state": np.abs(np.asarray(state.physics, np.float64) - np.array(next_states)).max(1),
        "observation": np.abs(np.asarray(obs, np.float64) - np.array(next_obs)).max(1),
        "reward": T * np.abs(np.asarray(reward, np.float64) - np.array(rewards)),
    }
    for name, error in errors.items():
        assert (error <= tolerance).all(), (name, (error / tolerance).max())


@pytest.mark.parametrize("family", ["PositionOnlyPendulum", "NoisyPositionOnlyPendulum"])
def test_pendulum_reset_distribution_matches_popgym(family):
    """gymnasium's Pendulum (popgym's base) starts at theta ~ U(-pi, pi), theta_dot ~ U(-1, 1), independently. Ours:
    one-sample KS against those laws, two-sample KS against popgym's own resets, no correlation; and the check has
    the power to see a range 10% off."""
    env, params = ep.make(family + "Easy")
    n = 4096
    _, state = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(jax.random.split(jax.random.key(0), n), params)
    ours = np.asarray(state.physics, np.float64)
    popgym_env, popgym_states = getattr(popgym.envs, family + "Easy")(), []
    for seed in range(1000):
        popgym_env.reset(seed=seed)
        popgym_states.append(np.asarray(popgym_env.state))
    popgym_states = np.array(popgym_states)
    assert ours.shape == (n, 2) and (np.abs(ours) <= [np.pi, 1.0]).all()
    for i, high in enumerate((np.pi, 1.0)):
        law = stats.uniform(-high, 2 * high).cdf
        assert stats.kstest(ours[:, i], law).pvalue > 1e-3, i
        assert stats.kstest(popgym_states[:, i], law).pvalue > 1e-3, i  # (the law read off gymnasium's code)
        assert stats.ks_2samp(ours[:, i], popgym_states[:, i]).pvalue > 1e-3, i
        assert stats.kstest(ours[:, i], stats.uniform(-1.1 * high, 2.2 * high).cdf).pvalue < 1e-6, i  # power
    assert abs(np.corrcoef(ours.T)[0, 1]) < 4 / np.sqrt(n)
