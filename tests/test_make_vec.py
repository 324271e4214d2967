"""envs_popjax.make_vec: batched envs that reset only the envs whose episode ended.

What is checked:
- Every family steps exactly like gymnax's auto-reset `vmap(env.step)` with the same keys (bit for
  bit: obs, state, reward, flags, info), alone and under an outer `vmap` over seeds, with the
  dense pass (many envs end) and the chunked one (a few end, chunks smaller than the number).
  Since `env.step` equals popgym step by step (tests/test_envs_*.py, which also run through
  make_vec), so does make_vec.
- Start states: every reset draws `reset_env` with that env's own key; with lockstep endings
  (RepeatFirst: every env ends on step 51) all decks of two episodes are distinct, uniform and
  unrelated to the previous episode.
- Cost: the number of reset_env rows computed per step is 0 when no episode ends, the chunk when
  a few end, N when many end; also under an outer vmap.
- Wrappers (`wrappers=True`) equal the per-env wrappers; MemoryChain ids and a vmapped
  `memory_length` work.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from test_envs_basic import fast_jit

import envs_popjax as ep

pytestmark = pytest.mark.timeout(600)

NUM_ENVS, NUM_STEPS = 16, 110
# One id per family, plus MemoryChain; shorter horizons where episodes would not end in NUM_STEPS.
IDS = [family + "Easy" for family in ep.FAMILIES] + ["MemoryChain-3"]
SHORTER = dict(
    MultiarmedBanditEasy=dict(episode_length=40), PositionOnlyPendulumEasy=dict(max_episode_length=40),
    NoisyPositionOnlyPendulumEasy=dict(max_episode_length=40), LabyrinthEscapeEasy=dict(episode_length=40),
    LabyrinthExploreEasy=dict(episode_length=40),
)


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def random_actions(space, key, n):
    return jax.vmap(space.sample)(jax.random.split(key, n))


def rollouts(vec_env, env, params, num_envs):
    """jit(vmap over seeds) of NUM_STEPS random-action steps, through make_vec and through
    gymnax's vmap(env.step) with the same keys; both return every output of every step."""
    space = env.action_space(params)

    def run(key, reset, step):
        _, state = reset(key)

        def body(state, key):
            obs, state, reward, terminated, truncated, info = step(key, state, random_actions(space, key, num_envs))
            return state, (obs, state, reward, terminated, truncated, info)

        return jax.lax.scan(body, state, jax.random.split(key, NUM_STEPS))[1]

    ours = functools.partial(
        run, reset=lambda k: vec_env.reset(k, params), step=lambda k, s, a: vec_env.step(k, s, a, params)
    )
    gymnax = functools.partial(
        run,
        reset=lambda k: jax.vmap(env.reset, (0, None))(jax.random.split(k, num_envs), params),
        step=lambda k, s, a: jax.vmap(env.step, (0, 0, 0, None))(jax.random.split(k, num_envs), s, a, params),
    )
    return ours, gymnax


@pytest.mark.parametrize("env_id", IDS)
def test_make_vec_equals_gymnax_auto_reset_bit_for_bit(env_id):
    # reset_chunk 3: 1 to 4 ended envs take one or two chunks, more one dense pass
    vec_env, params = ep.make_vec(env_id, NUM_ENVS, reset_chunk=3, **SHORTER.get(env_id, {}))
    env = vec_env.env
    ours, gymnax = rollouts(vec_env, env, params, NUM_ENVS)
    keys = jax.random.split(jax.random.key(7), 2)
    # One program (one compile): ours under an outer vmap over seeds (the scripts' use) and alone, and gymnax's.
    vmapped, alone, expected = fast_jit(lambda keys: (jax.vmap(ours)(keys), ours(keys[1]), jax.vmap(gymnax)(keys)))(keys)
    assert_trees_equal(vmapped, expected)
    assert_trees_equal(alone, jax.tree.map(lambda x: x[1], expected))
    terminated, truncated = expected[3], expected[4]
    assert (terminated | truncated).any(), "no episode ended: the resets were not exercised"


def test_reset_where_replaces_exactly_the_done_envs():
    """VecEnv's resets (`reset_where`): dense pass (more than N/4 ended), chunked passes (fewer, more than one
    chunk), nothing."""
    n = 32
    vec_env, params = ep.make_vec("RepeatFirstEasy", n, reset_chunk=3)
    env = vec_env.env
    keys = jax.random.split(jax.random.key(1), n)
    obs, state = vec_env.reset(jax.random.key(0), params)
    fresh_obs, fresh = jax.vmap(env.reset_env, (0, None))(keys, params)
    others = jnp.arange(n)
    reset = lambda key, values: (env.reset_env(key, params), values[1])  # noqa: E731
    reset_where = jax.jit(lambda done: ep.reset_where(done, keys, reset, ((obs, state), others), 3))
    for done in (np.ones(n, bool), np.arange(n) % 3 == 0, np.arange(n) == 5, np.zeros(n, bool)):
        (new_obs, new_state), new_others = reset_where(done)
        pick = lambda a, b: np.where(done.reshape((n,) + (1,) * (np.ndim(a) - 1)), a, b)  # noqa: E731
        assert_trees_equal((new_obs, new_state), jax.tree.map(pick, (fresh_obs, fresh), (obs, state)))
        np.testing.assert_array_equal(new_others, others)


def decks_after_lockstep_ending(num_envs, reset_chunk=None, seed=0):
    """RepeatFirstEasy ends on step 51 in every env at once: the decks of episodes 1 and 2."""
    vec_env, params = ep.make_vec("RepeatFirstEasy", num_envs, reset_chunk=reset_chunk)

    @jax.jit
    def run(key):
        _, state = vec_env.reset(key, params)
        first = state.cards

        def body(state, key):
            _, state, _, terminated, _, _ = vec_env.step(key, state, jnp.zeros(num_envs, jnp.int32), params)
            return state, terminated

        state, terminated = jax.lax.scan(body, state, jax.random.split(key, 51))
        return first, state.cards, terminated

    first, second, terminated = map(np.asarray, run(jax.random.key(seed)))
    assert terminated[-1].all() and not terminated[:-1].any()  # lockstep
    return first, second


@pytest.mark.parametrize("reset_chunk", [None, 1])
def test_lockstep_endings_give_independent_fresh_decks(reset_chunk):
    n = 2048
    first, second = decks_after_lockstep_ending(n, reset_chunk)
    decks = np.concatenate([first, second])
    assert len({deck.tobytes() for deck in decks}) == 2 * n  # no start state handed to two envs
    assert (np.sort(decks, axis=1) == np.arange(52)).all()  # each a permutation of the deck
    # Uniform first card (the card shown at reset) in the new episode, and unrelated to the old one.
    counts = np.bincount(second[:, 0], minlength=52)
    assert stats.chisquare(counts).pvalue > 1e-4
    same_position = (first == second).mean()  # 1/52 for independent uniform permutations
    assert abs(same_position - 1 / 52) < 4 * np.sqrt(1 / 52 / (52 * n))


class CountingRepeatFirst(ep.RepeatFirst):
    """RepeatFirstEasy that counts the reset_env rows it computes (host callback)."""

    rows = []

    def reset_env(self, key, params):
        jax.debug.callback(lambda marker: self.rows.append(np.size(marker)), jax.random.key_data(key)[0])
        return super().reset_env(key, params)


@functools.cache
def counting_step(seeds: int, num_envs=64, reset_chunk=4):
    """A compiled VecEnv step of CountingRepeatFirst (under an outer vmap over `seeds` if > 0) and
    a function making its state with the envs of `done_at` at their last step."""
    env = CountingRepeatFirst(num_decks=1)
    vec_env = ep.VecEnv(env, num_envs, reset_chunk)
    params = env.default_params
    _, state = vec_env.reset(jax.random.key(0), params)
    actions = jnp.zeros(num_envs, jnp.int32)
    step = lambda s: vec_env.step(jax.random.key(1), s, actions, params)  # noqa: E731

    def make_state(done_at):
        s = state.replace(time=jnp.where(jnp.asarray(done_at), env.max_episode_length - 1, 0))
        return jax.tree.map(lambda x: jnp.stack([x] * seeds), s) if seeds else s

    return jax.jit(jax.vmap(step) if seeds else step).lower(make_state(np.zeros(num_envs, bool))).compile(), make_state


def reset_rows_per_step(done_at, seeds=0):
    """Rows of reset_env computed by one VecEnv step in which the envs of `done_at` end."""
    compiled, make_state = counting_step(seeds)
    state = make_state(done_at)
    CountingRepeatFirst.rows.clear()
    jax.block_until_ready(compiled(state))
    jax.effects_barrier()
    return sum(CountingRepeatFirst.rows)


def test_reset_cost_is_proportional_to_the_episodes_that_end():
    n = 64
    none, few, many = np.zeros(n, bool), np.arange(n) < 6, np.arange(n) < 40
    assert reset_rows_per_step(none) == 0
    assert reset_rows_per_step(few) == 8  # 6 ended: two chunks of 4
    assert reset_rows_per_step(many) == n  # 40 > n / 4 ended: one pass over all envs
    # Under an outer vmap over 2 seeds the while loops still skip work when no seed needs it.
    assert reset_rows_per_step(none, seeds=2) == 0
    assert 0 < reset_rows_per_step(few, seeds=2) <= 2 * 8


@pytest.mark.parametrize("env_id", ["RepeatFirstEasy", "PositionOnlyPendulumEasy"])
def test_wrappers_equal_the_per_env_wrappers(env_id):
    n = 8
    vec_env, params = ep.make_vec(env_id, n, wrappers=True)
    env = ep.EpisodeStatsWrapper(ep.PreviousActionWrapper(ep.make(env_id)[0]))
    assert vec_env.observation_space(params).shape == env.observation_space(params).shape
    space = env.action_space(params)

    def run(key, reset, step):
        obs, state = reset(key)

        def body(state, key):
            obs, state, reward, terminated, truncated, info = step(key, state, random_actions(space, key, n))
            return state, (obs, reward, terminated, truncated, info)

        return obs, jax.lax.scan(body, state, jax.random.split(key, 130))[1]

    key = jax.random.key(3)
    ours = jax.jit(run, static_argnums=(1, 2))(
        key, lambda k: vec_env.reset(k, params), lambda k, s, a: vec_env.step(k, s, a, params)
    )
    theirs = jax.jit(run, static_argnums=(1, 2))(
        key,
        lambda k: jax.vmap(env.reset, (0, None))(jax.random.split(k, n), params),
        lambda k, s, a: jax.vmap(env.step, (0, 0, 0, None))(jax.random.split(k, n), s, a, params),
    )
    assert_trees_equal(ours, theirs)
    reset_obs, (obs, _, terminated, truncated, info) = ours
    assert (reset_obs[:, -1] == 1).all()
    done = np.asarray(terminated | truncated)
    if env_id == "RepeatFirstEasy":  # T = 51: two auto-resets in 130 steps
        assert done[50].all() and done[101].all()
    np.testing.assert_array_equal(obs[..., -1], done)  # the first-step flag right after every reset
    action_size = ep.action_size(space)
    assert (np.asarray(obs)[done][:, -action_size - 1 : -1] == 0).all()  # no previous action after a reset
    assert set(info) >= {"returned_episode", "returned_episode_return", "returned_episode_length", "final_observation"}


def test_memory_chain_ids_and_vmapped_memory_length():
    vec_env, params = ep.make_vec("MemoryChain-30", 4, wrappers=True)
    assert params.memory_length == 30 and vec_env.observation_space(params).shape == (3 + 2 + 1,)
    vec_env, params = ep.make_vec("MemoryChain", 4)
    env = vec_env.env

    def episode_lengths(key, length):
        p = params.replace(memory_length=length)
        _, state = vec_env.reset(key, p)

        def body(state, key):
            _, state, _, terminated, _, _ = vec_env.step(key, state, jnp.zeros(4, jnp.int32), p)
            return state, terminated

        return jax.lax.scan(body, state, jax.random.split(key, 12))[1]

    lengths = jnp.array([1, 2, 5])
    terminated = np.asarray(jax.jit(jax.vmap(episode_lengths))(jax.random.split(jax.random.key(0), 3), lengths))
    for ends, length in zip(terminated, lengths.tolist()):  # every episode lasts L + 1 steps
        expected_ends = np.arange(1, 12 // (length + 1) + 1) * (length + 1)
        np.testing.assert_array_equal(np.flatnonzero(ends[:, 0]) + 1, expected_ends)
    assert isinstance(env, ep.MemoryChain)


def test_make_vec_validates_and_make_is_unchanged():
    with pytest.raises(ValueError, match="RepeatFirstEasy"):
        ep.make_vec("RepeatFirstEasyy", 4)
    with pytest.raises(ValueError):
        ep.make_vec("RepeatFirstEasy", 0)
    with pytest.raises(ValueError):
        ep.make_vec("RepeatFirstEasy", 4, reset_chunk=0)
    vec_env, params = ep.make_vec("RepeatPreviousEasy", 4, k=2)  # overrides reach make
    assert vec_env.env.k == 2 and vec_env.num_envs == 4
    assert copy.copy(vec_env).env is vec_env.env and vec_env.action_space().n == 4  # forwards to its env, copies
    env, _ = ep.make("RepeatPreviousEasy")
    assert isinstance(env, ep.RepeatPrevious) and not hasattr(env, "num_envs")
