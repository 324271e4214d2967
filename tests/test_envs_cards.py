"""envs_popjax's memory card games and the bandit against the `popgym` package (1.0.7) as the oracle.

Covered: Autoencode, CountRecall, HigherLower, Concentration, MultiarmedBandit, every difficulty.
The differential tests copy popgym's hidden layout after `reset(seed)` into the JAX state (cards
in the order shown = `deck.idx[::-1]`, Concentration's board = `deck.idx`, the bandit's
probabilities plus its per-step uniform draws), drive both envs with the same random and
adversarial actions and compare every step. Oracle policies see only observations. The
`*_regression_popjaxrl` tests pin the bugs of popjaxrl/popjym listed in
shared/reference/popgym_semantics.md, section 3.
"""

import copy
import functools

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import popgym.envs
import pytest
from popgym.core.deck import Deck
from scipy import stats
from test_envs_basic import fast_jit

import envs_popjax as ep

pytestmark = pytest.mark.timeout(300)

LEVELS = ep.DIFFICULTIES
CARD_FAMILIES = ("Autoencode", "CountRecall", "HigherLower", "Concentration")
FAMILIES = CARD_FAMILIES + ("MultiarmedBandit",)
CARD_IDS = [family + level for family in CARD_FAMILIES for level in LEVELS]
ALL_IDS = [family + level for family in FAMILIES for level in LEVELS]


@functools.cache
def make(env_id: str):
    """One env object per id, so the jitted functions below compile once per id."""
    return ep.make(env_id)


def family_of(env_id: str) -> str:
    return next(family for family in FAMILIES if env_id.startswith(family))


def popgym_env(env_id: str):
    return getattr(popgym.envs, env_id)()


def encode(space, obs) -> np.ndarray:
    """popgym obs -> our encoding, derived from popgym's declared space (not from our env)."""
    if isinstance(space, gym.spaces.Discrete):
        return np.eye(space.n, dtype=np.float32)[int(obs)]
    if isinstance(space, gym.spaces.MultiDiscrete):
        return np.concatenate([np.eye(n, dtype=np.float32)[int(o)] for n, o in zip(space.nvec, obs)])
    if isinstance(space, gym.spaces.Tuple):
        return np.concatenate([encode(s, o) for s, o in zip(space.spaces, obs)])
    raise TypeError(space)


def popgym_horizon(pg) -> int:
    """popgym's episode length constant (call after reset); HigherLower has none, it ends when
    the cards left after the reset deal run out."""
    for name in ("max_episode_length", "episode_length"):
        if hasattr(pg, name):
            return int(getattr(pg, name))
    return len(pg.deck)


def state_from_popgym(env_id: str, pg):
    """Our state holding the hidden layout of a freshly reset popgym env."""
    time = jnp.int32(0)
    family = family_of(env_id)
    if family in ("Autoencode", "HigherLower"):
        return ep.CardSequenceState(cards=jnp.asarray(pg.deck.idx[::-1], jnp.int32), time=time)
    if family == "CountRecall":
        return make(env_id)[0].make_state(
            value_cards=jnp.asarray(pg.value_deck.idx[::-1], jnp.int32),
            query_cards=jnp.asarray(pg.query_deck.idx[::-1], jnp.int32),
        )
    if family == "Concentration":
        n = len(pg.deck.idx)
        return ep.ConcentrationState(
            cards=jnp.asarray(pg.deck.idx, jnp.int32), face_up=jnp.zeros(n, bool), first=jnp.int32(-1), time=time
        )
    return ep.BanditState(bandits=jnp.asarray(pg.bandits, jnp.float32), time=time)


def stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


_ROLLOUTS = {}
BATCH = 32  # every rollout is padded to this many episodes, so each env compiles once


def pad_batch(tree, size=BATCH):
    return jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[:1], size - len(x), axis=0)]), tree)


def rollout(env_id: str, states, actions, path: str = "make"):
    """Batched steps from `states` through `actions` [batch, time] in one jitted program: with
    `path="make"` a vmap(scan) of `env.step`, with `path="make_vec"` a scan of the `make_vec` env.

    Returns numpy arrays: the observation of each start state [batch, obs], then per step
    [batch, time] the obs before any auto-reset (`info["final_observation"]`), reward,
    terminated, truncated.
    """
    if (env_id, path) not in _ROLLOUTS:
        env, params = make(env_id)

        def one(state, actions):
            def body(state, action):
                _, state, reward, terminated, truncated, info = env.step(jax.random.key(0), state, action, params)
                return state, (info["final_observation"], reward, terminated, truncated)

            return (env.get_obs(state), *jax.lax.scan(body, state, actions)[1])

        def batch(states, actions):
            vec_env, _ = ep.make_vec(env_id, BATCH)

            def body(states, actions):
                key = jax.random.key(0)
                _, states, reward, terminated, truncated, info = vec_env.step(key, states, actions, params)
                return states, (info["final_observation"], reward, terminated, truncated)

            out = jax.lax.scan(body, states, actions.T)[1]
            return (jax.vmap(env.get_obs)(states), *(jnp.swapaxes(x, 0, 1) for x in out))

        _ROLLOUTS[env_id, path] = fast_jit(jax.vmap(one) if path == "make" else batch)
    batch = len(actions)
    actions = np.pad(actions, ((0, 0), (0, make(env_id)[0].max_episode_length - actions.shape[1])))
    out = _ROLLOUTS[env_id, path](pad_batch(states), pad_batch(jnp.asarray(actions, jnp.int32)))
    return tuple(np.asarray(x)[:batch] for x in out)


def bandit_rollout(env_id: str, states, actions, draws):
    """Like `rollout`, with popgym's float64 uniform draws injected through `step_with_draw`
    (float64, so that `u < p[a]` is the very comparison numpy makes)."""
    env, params = make(env_id)

    def one(state, actions, draws):
        def body(state, inputs):
            action, draw = inputs
            obs, state, reward, terminated, _ = env.step_with_draw(state, action, draw, params)
            return state, (obs, reward, terminated, env.is_truncated(state, params))

        return jax.lax.scan(body, state, (actions, draws))[1]

    with jax.enable_x64(True):
        out = fast_jit(jax.vmap(one))(states, jnp.asarray(actions, jnp.int32), jnp.asarray(draws, jnp.float64))
        reset_obs = np.asarray(env.reset(jax.random.key(0), params)[0])  # constant: "no payout"
        return (np.broadcast_to(reset_obs, (len(actions), 2)), *map(np.asarray, out))


# ---------------------------------------------------------------------------------------------
# Action policies for popgym: a mix of random, right and deliberately wrong actions. `skill` is
# the probability of the right action; they may read popgym's hidden state (they only choose
# actions, both envs then see the same ones).
# ---------------------------------------------------------------------------------------------
def autoencode_policy(pg, rng, skill):
    if pg.mode == 0 and rng.random() < skill:  # PLAY: the suit popgym pops next
        return int(pg.deck.suits_idx[pg.deck["system"][-1]])
    return int(rng.integers(4))


def countrecall_policy(pg, rng, skill):
    count = int(pg.counts[pg.query])  # popgym's target: includes the value shown now
    u = rng.random()
    if u < skill:
        return count
    if u < skill + (1 - skill) / 2:
        return count - int(pg.value == pg.query)  # popjaxrl's answer, which skips the current card
    return int(rng.integers(pg.action_space.n))


def higherlower_policy(pg, rng, skill):
    current = pg.deck.ranks_idx[pg.deck["player"][-1]]
    following = pg.deck.ranks_idx[pg.deck.idx[len(pg.deck) - 1]]  # popgym deals from the end
    if rng.random() < skill:
        return int(following < current)  # 0 = higher
    return int(rng.integers(2))


def concentration_perfect(pg):
    """Flip a face-down card, then its partner (knowing the board)."""
    face_up = set(pg.deck["face_up_idx"])
    in_play = pg.deck["in_play_idx"]
    face_down = [i for i in range(len(pg.state)) if i not in face_up]
    if not in_play:
        return face_down[0]
    first = in_play[0]
    return next(i for i in face_down if i != first and pg.state[i] == pg.state[first])


def concentration_policy(pg, rng, skill):
    if rng.random() < skill:
        return concentration_perfect(pg)
    face_up, in_play = pg.deck["face_up_idx"], pg.deck["in_play_idx"]
    u = rng.random()
    if u < 0.3 and face_up:
        return int(rng.choice(face_up))  # a card that is already up, as first or second flip
    if u < 0.5 and in_play:
        return int(in_play[0])  # the same position twice
    return int(rng.integers(len(pg.state)))


def concentration_finish_on_last_step(pg, rng, skill):
    """N wasted flips (position 0 twice, N/2 times), then N perfect ones: the last match lands
    on step E = 2N, where popgym reports terminated and truncated together."""
    return 0 if pg.curr_step < len(pg.state) else concentration_perfect(pg)


def bandit_policy(pg, rng, skill):
    if rng.random() < skill:
        return int(np.argmax(pg.bandits))
    return int(rng.integers(pg.num_bandits))


POLICIES = {
    "Autoencode": autoencode_policy,
    "CountRecall": countrecall_policy,
    "HigherLower": higherlower_policy,
    "Concentration": concentration_policy,
    "MultiarmedBandit": bandit_policy,
}
SKILLS = (0.0, 0.5, 0.9, 1.0)
NUM_SEEDS = 24


def play_popgym(env_id, seed, policy, skill):
    """One popgym episode; returns our state for its layout, the encoded reset obs, and per
    step: action, encoded obs, reward, terminated, truncated (and the bandit's draws)."""
    pg = popgym_env(env_id)
    obs, _ = pg.reset(seed=seed)
    record = dict(state=state_from_popgym(env_id, pg), reset_obs=encode(pg.observation_space, obs))
    if family_of(env_id) == "MultiarmedBandit":  # every later draw of this episode, in order
        record["draws"] = copy.deepcopy(pg.np_random).random(pg.max_episode_length)
    rng = np.random.default_rng(seed)
    steps = []
    while True:
        action = policy(pg, rng, skill)
        obs, reward, terminated, truncated, _ = pg.step(action)
        steps.append((action, encode(pg.observation_space, obs), reward, terminated, truncated))
        if terminated or truncated:
            break
    for name, values in zip(("actions", "obs", "rewards", "terminated", "truncated"), zip(*steps)):
        record[name] = np.array(values)
    return record


@functools.cache
def differential(env_id: str, path: str = "make"):
    """popgym episodes over NUM_SEEDS seeds (and, for Concentration, the finish-on-the-last-step
    sequence), replayed in our env through `make` or `make_vec` (see `rollout`; the bandit, whose
    popgym draws are injected, only through `make`). Returns (popgym records, our per-step outputs)."""
    env, params = make(env_id)
    family = family_of(env_id)
    runs = [(POLICIES[family], SKILLS[seed % len(SKILLS)]) for seed in range(NUM_SEEDS)]
    if family == "Concentration":
        runs.append((concentration_finish_on_last_step, 1.0))
    records = [play_popgym(env_id, seed, policy, skill) for seed, (policy, skill) in enumerate(runs)]
    horizon = env.max_episode_length
    actions = np.zeros((len(records), horizon), np.int32)
    for i, record in enumerate(records):
        actions[i, : len(record["actions"])] = record["actions"]
    states = stack([record["state"] for record in records])
    if family == "MultiarmedBandit":
        ours = bandit_rollout(env_id, states, actions, np.stack([record["draws"] for record in records]))
    else:
        ours = rollout(env_id, states, actions, path)
    return records, ours


# ---------------------------------------------------------------------------------------------
# Spaces, encodings, difficulty constants.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ALL_IDS)
def test_spaces_and_horizon_match_popgym(env_id):
    env, params = make(env_id)
    pg = popgym_env(env_id)
    obs, _ = pg.reset(seed=0)
    assert env.observation_space(params).shape == (len(encode(pg.observation_space, obs)),) == (env.obs_size,)
    assert env.action_space(params).n == pg.action_space.n == env.num_actions
    assert env.max_episode_length == params.max_steps_in_episode == popgym_horizon(pg)
    # popgym's card games end with terminated; the bandit and Concentration also truncate at T
    assert env.truncates == (family_of(env_id) in ("Concentration", "MultiarmedBandit"))


def test_aliases_and_registry():
    for family in FAMILIES:
        assert all(family + level in ep.ENV_IDS for level in LEVELS)
    assert ep.canonical_id("MultiArmedBanditHard") == "MultiarmedBanditHard"
    env, _ = ep.make("MultiArmedBanditMedium")
    assert isinstance(env, ep.MultiarmedBandit) and env.num_bandits == 20
    with pytest.raises(ValueError):
        ep.CountRecall(deck_type="jokers")
    with pytest.raises(ValueError):
        ep.Concentration(deck_type="suits")  # popgym cannot pair 13 cards per suit either


def test_card_identities_match_popgym_regression_popjaxrl():
    """popjaxrl drew card values as a permutation of arange(N) % V: the same multiset, other card
    identities. Ours map card ids exactly like popgym's Deck."""
    for decks in (1, 2, 3, 4):
        deck, cards = Deck(decks), jnp.arange(52 * decks)
        np.testing.assert_array_equal(ep.card_suit(cards), deck.suits_idx)
        np.testing.assert_array_equal(ep.card_colour(cards), deck.colors_idx)
        np.testing.assert_array_equal(ep.card_rank(cards), deck.ranks_idx)


# ---------------------------------------------------------------------------------------------
# Step-by-step differential tests.
# ---------------------------------------------------------------------------------------------
# The bandit's popgym draws are injected through step_with_draw, which make_vec does not expose: its
# make_vec path is covered by tests/test_make_vec.py (bit for bit equal to vmap(env.step)).
@pytest.mark.parametrize(
    "env_id, path",
    [(i, "make") for i in ALL_IDS] + [(i, "make_vec") for i in ALL_IDS if family_of(i) != "MultiarmedBandit"],
)
def test_step_by_step_equals_popgym(env_id, path):
    records, (reset_obs, obs, rewards, terminated, truncated) = differential(env_id, path)
    assert reset_obs.dtype == obs.dtype == np.float32
    for i, record in enumerate(records):
        np.testing.assert_array_equal(reset_obs[i], record["reset_obs"])
        length = len(record["actions"])
        np.testing.assert_array_equal(obs[i, :length], record["obs"], err_msg=f"episode {i}")
        np.testing.assert_allclose(rewards[i, :length], record["rewards"], rtol=0, atol=1e-6, err_msg=f"episode {i}")
        np.testing.assert_array_equal(terminated[i, :length], record["terminated"], err_msg=f"episode {i}")
        np.testing.assert_array_equal(truncated[i, :length], record["truncated"], err_msg=f"episode {i}")


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_differential_episodes_cover_the_edge_cases(env_id):
    """The action mix must reach the cases that earlier ports got wrong, or the comparison
    above proves little."""
    env, params = make(env_id)
    records, _ = differential(env_id)
    rewards = np.concatenate([record["rewards"] for record in records])
    ends = [(record["terminated"][-1], record["truncated"][-1], len(record["actions"])) for record in records]
    family = family_of(env_id)
    assert (rewards > 0).any() and (rewards < 0).any()
    if family == "HigherLower":
        assert (rewards == 0).sum() > 10  # pushes: equal ranks pay 0
    if family == "Concentration":
        e, n = env.max_episode_length, env.num_cards
        for value in (2 / n, -2 / e, -1 / e):  # match; mismatch or same position twice; first flip already up
            assert np.isclose(rewards, value, rtol=0, atol=1e-9).any(), value
        assert any(te and not tr for te, tr, _ in ends) and any(tr and not te for te, tr, _ in ends)
        assert (True, True, e) in ends  # finishing on the last step: both flags at once
    if family == "MultiarmedBandit":
        assert all(tr and not te and length == env.max_episode_length for te, tr, length in ends)
    if family in ("Autoencode", "CountRecall", "HigherLower"):
        assert all(te and not tr and length == env.max_episode_length for te, tr, length in ends)


# ---------------------------------------------------------------------------------------------
# Oracle policies that see only observations, run under jit/vmap from our own resets.
# ---------------------------------------------------------------------------------------------
def autoencode_oracle(env):
    """Push each card's suit while watching (the first PLAY obs still shows the last card),
    then recite the stack."""
    n = env.num_cards

    def policy(obs, memory):
        stack_, size, playing = memory
        play = obs[0] == 1  # mode one-hot: index 0 = PLAY
        suit = jnp.argmax(obs[2:])
        push = ~playing
        stack_ = jnp.where(push, stack_.at[size].set(suit), stack_)
        size = size + push
        action = jnp.where(play, stack_[jnp.maximum(size - 1, 0)], 0)
        return action, (stack_, size - play, playing | play)

    return policy, (jnp.zeros(n, jnp.int32), jnp.int32(0), jnp.asarray(False))


def countrecall_oracle(env, include_current=True):
    """Count the values seen; answer the count of the queried kind. popjaxrl's version of the
    env rewarded the count *before* the current card (`include_current=False`)."""
    v = env.num_values

    def policy(obs, counts):
        value, query = jnp.argmax(obs[:v]), jnp.argmax(obs[v:])
        new_counts = counts + ep.one_hot(value, v).astype(jnp.int32)
        return (new_counts if include_current else counts)[query], new_counts

    return policy, jnp.zeros(v, jnp.int32)


ORACLES = {
    "autoencode": autoencode_oracle,
    "countrecall": countrecall_oracle,
    "countrecall_exclude_current": functools.partial(countrecall_oracle, include_current=False),
}


@functools.cache
def run_oracle(env_id: str, oracle: str, num_episodes: int = 16):
    """`num_episodes` episodes of exactly T steps from our reset; numpy (rewards, terminated,
    truncated, actions), each [episodes, T]."""
    env, params = make(env_id)
    policy, memory0 = ORACLES[oracle](env)

    def episode(key):
        key_reset, key_steps = jax.random.split(key)
        obs, state = env.reset(key_reset, params)

        def body(carry, key):
            obs, state, memory = carry
            action, memory = policy(obs, memory)
            obs, state, reward, terminated, truncated, _ = env.step(key, state, action, params)
            return (obs, state, memory), (reward, terminated, truncated, action)

        keys = jax.random.split(key_steps, env.max_episode_length)
        return jax.lax.scan(body, (obs, state, memory0), keys)[1]

    keys = jax.random.split(jax.random.key(123), num_episodes)
    return jax.tree.map(np.asarray, jax.jit(jax.vmap(episode))(keys))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("family,oracle", [("Autoencode", "autoencode"), ("CountRecall", "countrecall")])
def test_observation_only_oracle_scores_one(family, oracle, level):
    env, _ = make(family + level)
    rewards, terminated, truncated, _ = run_oracle(family + level, oracle)
    np.testing.assert_allclose(rewards.sum(axis=1), 1.0, rtol=0, atol=1e-5)
    assert (rewards >= 0).all()  # not one wrong answer
    # exactly T steps, the last one terminal
    assert terminated[:, -1].all() and not terminated[:, :-1].any() and not truncated.any()


@pytest.mark.parametrize("level", LEVELS)
def test_concentration_best_play_scores_one_in_n_steps(level):
    """No observation-only policy avoids every mismatch. Knowing the board (the skill-1.0
    episodes of the differential test), N flips score exactly 1 and end terminated."""
    env, _ = make("Concentration" + level)
    records, (_, _, rewards, terminated, truncated) = differential("Concentration" + level)
    n = env.num_cards
    perfect = [i for i in range(NUM_SEEDS) if SKILLS[i % len(SKILLS)] == 1.0]
    assert perfect
    for i in perfect:
        assert len(records[i]["actions"]) == n
        np.testing.assert_allclose(rewards[i, :n].sum(), 1.0, rtol=0, atol=1e-5)
        assert terminated[i, n - 1] and not terminated[i, : n - 1].any() and not truncated[i, :n].any()


# ---------------------------------------------------------------------------------------------
# Reset distributions.
# ---------------------------------------------------------------------------------------------
def chi2_pvalue(observed: np.ndarray, expected: np.ndarray, ddof_cells: int) -> float:
    statistic = ((observed - expected) ** 2 / expected).sum()
    return float(stats.chi2.sf(statistic, ddof_cells))


def shuffle_pvalues(cards: np.ndarray) -> tuple[float, float]:
    """Two chi-square tests that a batch of decks [K, N] are uniform random permutations:
    (card at each position: K/N per cell) and (ranks of the first two cards: a uniform ordered
    pair of distinct cards, which catches rotations and other marginal-preserving shuffles)."""
    k, n = cards.shape
    where = np.bincount((np.arange(n) * n + cards).ravel(), minlength=n * n).reshape(n, n)
    p_position = chi2_pvalue(where, np.full((n, n), k / n), (n - 1) ** 2)
    per_rank = n // 13
    ranks = np.asarray(ep.card_rank(cards[:, :2]))
    pairs = np.bincount(ranks[:, 0] * 13 + ranks[:, 1], minlength=169).reshape(13, 13)
    expected = np.full((13, 13), per_rank * per_rank, float)
    np.fill_diagonal(expected, per_rank * (per_rank - 1))
    p_pairs = chi2_pvalue(pairs, k * expected / (n * (n - 1)), 168)
    return p_position, p_pairs


def test_shuffle_statistics_can_fail():
    """The statistics of the next test reject a rotated deck and a sometimes-unshuffled deck."""
    k, n = 20000, 52
    rng = np.random.default_rng(0)
    rotated = (np.arange(n)[None, :] + rng.integers(n, size=(k, 1))) % n  # uniform marginals
    assert shuffle_pvalues(rotated)[1] < 1e-6
    lazy = np.stack([rng.permutation(n) if rng.random() < 0.95 else np.arange(n) for _ in range(k)])
    assert shuffle_pvalues(lazy)[0] < 1e-6
    assert min(shuffle_pvalues(np.stack([rng.permutation(n) for _ in range(k)]))) > 1e-4


@pytest.mark.parametrize("env_id", CARD_IDS)
def test_reset_card_order_is_uniform(env_id):
    env, params = make(env_id)
    keys = jax.random.split(jax.random.key(7), 8000)  # >= 38 expected per chi-square cell
    obs, states = jax.jit(jax.vmap(lambda key: env.reset(key, params)))(keys)
    assert obs.dtype == jnp.float32 and obs.shape == (len(keys), env.obs_size)
    decks = [states.value_cards, states.query_cards] if family_of(env_id) == "CountRecall" else [states.cards]
    for deck in map(np.asarray, decks):
        np.testing.assert_array_equal(np.sort(deck, axis=1), np.broadcast_to(np.arange(env.num_cards), deck.shape))
        assert min(shuffle_pvalues(deck)) > 1e-4
    if family_of(env_id) == "CountRecall":
        # Independent decks share on average exactly one card position (sum over N positions of 1/N).
        shared = (decks[0] == decks[1]).sum(axis=1)
        assert abs(shared.mean() - 1.0) < 5 * shared.std() / np.sqrt(len(shared))
    if family_of(env_id) == "Concentration":
        assert not states.face_up.any() and (states.first == -1).all()


@pytest.mark.parametrize("level", LEVELS)
def test_reset_bandit_probabilities_are_uniform(level):
    env, params = make("MultiarmedBandit" + level)
    keys = jax.random.split(jax.random.key(3), 4000)
    obs, states = jax.jit(jax.vmap(lambda key: env.reset(key, params)))(keys)
    assert (np.asarray(obs) == [1.0, 0.0]).all()  # popgym's reset obs 0
    p = np.asarray(states.bandits)
    assert p.dtype == np.float32 and p.shape == (4000, env.num_bandits)
    assert stats.kstest(p.ravel(), "uniform").pvalue > 1e-4
    assert stats.kstest(p[:, 0], "uniform").pvalue > 1e-4
    assert abs(np.corrcoef(p[:, 0], p[:, -1])[0, 1]) < 5 / np.sqrt(len(p))  # arms drawn independently
    assert (states.time == 0).all()


def test_bandit_payout_frequency_matches_probability():
    """Through the real env.step (keys split by gymnax): P(obs = 1 | arm a) = p[a]."""
    env, params = make("MultiarmedBanditEasy")
    p = jnp.linspace(0.02, 0.98, env.num_bandits, dtype=jnp.float32)
    state = ep.BanditState(bandits=p, time=jnp.int32(0))
    pulls = 4000

    def pull(key, arm):
        obs, _, reward, _, _, _ = env.step(key, state, arm, params)
        return obs, reward

    keys = jax.random.split(jax.random.key(5), pulls * env.num_bandits).reshape(env.num_bandits, pulls)
    arms = jnp.arange(env.num_bandits)
    obs, reward = jax.jit(jax.vmap(jax.vmap(pull, (0, None)), (0, 0)))(keys, arms)
    paid = np.asarray(obs[..., 1])
    np.testing.assert_array_equal(paid + np.asarray(obs[..., 0]), 1.0)
    np.testing.assert_allclose(np.asarray(reward), np.where(paid == 1, 1 / 200, -1 / 200), rtol=1e-6)
    p = np.asarray(p)
    z = (paid.mean(axis=1) - p) / np.sqrt(p * (1 - p) / pulls)
    assert np.abs(z).max() < 5


# ---------------------------------------------------------------------------------------------
# Regressions: bugs of popjaxrl/popjym (reference section 3) that must not come back.
# ---------------------------------------------------------------------------------------------
def cards_state(cards, time=0):
    return ep.CardSequenceState(cards=jnp.asarray(cards, jnp.int32), time=jnp.int32(time))


@pytest.mark.parametrize("level", LEVELS)
def test_autoencode_shows_cards_during_watch_phase_regression_popjaxrl(level):
    """popjaxrl's inverted `jnp.where(play, watch_obs, play_obs)` never showed the cards."""
    env, params = make("Autoencode" + level)
    n = env.num_cards
    cards = np.random.default_rng(0).permutation(n)
    states = stack([cards_state(cards)])
    reset_obs, obs, rewards, _, _ = rollout("Autoencode" + level, states, np.zeros((1, env.max_episode_length)))
    shown = np.concatenate([reset_obs[:1], obs[0, : n - 1]])
    np.testing.assert_array_equal(shown[:, 2:], np.eye(4)[cards % 4])  # every card's suit, in order
    assert (rewards[0, : n - 1] == 0).all()  # watching pays nothing, whatever the action


@pytest.mark.parametrize("level", LEVELS)
def test_autoencode_mode_flag_regression_popjaxrl(level):
    """popjaxrl had no mode flag. popgym: WATCH = 1 until the last card, which already carries
    PLAY = 0; then the play phase shows the constant (0, 0)."""
    env, params = make("Autoencode" + level)
    n = env.num_cards
    cards = np.random.default_rng(1).permutation(n)
    reset_obs, obs, _, _, _ = rollout("Autoencode" + level, stack([cards_state(cards)]), np.zeros((1, env.max_episode_length)))
    shown = np.concatenate([reset_obs[:1], obs[0]])
    watch, play = np.array([0, 1]), np.array([1, 0])
    assert (shown[: n - 1, :2] == watch).all()
    np.testing.assert_array_equal(shown[n - 1], np.r_[play, np.eye(4)[cards[-1] % 4]])
    assert (shown[n:-1] == np.r_[play, 1, 0, 0, 0]).all()


@pytest.mark.parametrize("level", LEVELS)
def test_autoencode_length_and_max_return_regression_popjaxrl(level):
    """popjaxrl ran 2N + 1 steps with N + 1 rewarded ones (max return 1.0192); popgym runs
    2N - 1 steps, the last N rewarded +-1/N: the perfect player gets exactly 1."""
    env, _ = make("Autoencode" + level)
    n = env.num_cards
    rewards, terminated, _, _ = run_oracle("Autoencode" + level, "autoencode")
    assert rewards.shape[1] == 2 * n - 1 and terminated[:, -1].all() and not terminated[:, :-1].any()
    assert (rewards[:, : n - 1] == 0).all()
    np.testing.assert_allclose(rewards[:, n - 1 :], 1 / n, rtol=1e-6)


@pytest.mark.parametrize("level,expected", list(zip(LEVELS, (27, 27, 17))))
def test_countrecall_action_space_regression_popjaxrl(level, expected):
    """popjaxrl's action space was Discrete(2). popgym 1.0.7: Discrete(N/V + 1), and the
    largest count is really asked for: all N/V cards of one kind shown, then queried."""
    env, params = make("CountRecall" + level)
    assert env.action_space(params).n == expected == env.num_cards // env.num_values + 1
    cards = np.arange(env.num_cards)
    values = np.asarray(env.card_value(cards))
    kind_first = np.r_[cards[values == 0], cards[values != 0]]  # every card of kind 0 first
    max_count = expected - 1
    state = env.make_state(jnp.asarray(kind_first, jnp.int32), jnp.zeros(env.num_cards, jnp.int32), time=max_count - 1)
    _, _, reward, _, _, _ = env.step(jax.random.key(0), state, max_count, params)
    assert np.isclose(reward, 1 / (env.num_cards - 1), rtol=1e-6)


@pytest.mark.parametrize("level", LEVELS)
def test_countrecall_counts_current_card_regression_popjaxrl(level):
    """popjaxrl's target skipped the value shown with the query; popgym's includes it. The
    exclude-current player, perfect in popjaxrl, must score well below 1 here."""
    env, params = make("CountRecall" + level)
    state = env.make_state(jnp.arange(env.num_cards), jnp.arange(env.num_cards))
    # reset shows [value, query] of the same card: the answer is 1, not 0
    assert np.isclose(env.step(jax.random.key(0), state, 1, params)[2], 1 / (env.num_cards - 1), rtol=1e-6)
    assert np.isclose(env.step(jax.random.key(0), state, 0, params)[2], -1 / (env.num_cards - 1), rtol=1e-6)
    if level == "Easy":  # wrong whenever value and query share a colour, about half the steps
        returns = run_oracle("CountRecall" + level, "countrecall_exclude_current")[0].sum(axis=1)
        assert returns.max() < 0.5 and abs(returns.mean()) < 0.15


@pytest.mark.parametrize("level", LEVELS)
def test_countrecall_reward_scale_and_length_regression_popjaxrl(level):
    """popjaxrl paid +-1/N over N steps; popgym pays +-1/(N - 1) over N - 1 steps."""
    env, _ = make("CountRecall" + level)
    rewards, terminated, _, _ = run_oracle("CountRecall" + level, "countrecall")
    assert rewards.shape[1] == env.num_cards - 1 and terminated[:, -1].all()
    np.testing.assert_allclose(rewards, 1 / (env.num_cards - 1), rtol=1e-6)


@pytest.mark.parametrize("level", LEVELS)
def test_higherlower_last_step_regression_popjaxrl(level):
    """popjaxrl ran N steps, the last comparing cards[N - 1] with itself for 0. popgym ends
    after N - 1 steps, the last one comparing cards[N - 2] with cards[N - 1]."""
    env, params = make("HigherLower" + level)
    n = env.num_cards
    cards = np.r_[1 : n - 1, n - 1, 0]  # ..., a King (card n-1), then an Ace (card 0)
    actions = np.ones((1, env.max_episode_length))  # always "lower"
    _, _, rewards, terminated, truncated = rollout("HigherLower" + level, stack([cards_state(cards)]), actions)
    assert env.max_episode_length == n - 1
    assert np.isclose(rewards[0, -1], 1 / n, rtol=1e-6)  # King -> Ace: lower, right
    assert terminated[0, -1] and not terminated[0, :-1].any() and not truncated.any()


@pytest.mark.parametrize("level", LEVELS)
def test_bandit_discrete_obs_and_truncation_regression_popjaxrl(level):
    """popjaxrl: Box(1) obs and `done` (termination) at T. popgym: Discrete(2) -> one-hot(2),
    truncated, never terminated, after exactly T steps; the next step is a fresh episode."""
    env, params = make("MultiarmedBandit" + level)
    t = env.max_episode_length
    obs0, state0 = env.reset(jax.random.key(0), params)
    np.testing.assert_array_equal(obs0, [1.0, 0.0])

    def body(state, key):
        obs, state, reward, terminated, truncated, _ = env.step(key, state, 0, params)
        return state, (obs, terminated, truncated, state.time, state.bandits)

    keys = jax.random.split(jax.random.key(1), t + 1)
    obs, terminated, truncated, time, bandits = map(np.asarray, jax.jit(lambda s, k: jax.lax.scan(body, s, k)[1])(state0, keys))
    assert obs.shape == (t + 1, 2) and set(obs.sum(axis=1)) == {1.0}
    assert not terminated.any()
    assert truncated[t - 1] and truncated.sum() == 1
    assert time[t - 1] == 0 and time[t] == 1  # auto-reset after the T-th step
    assert (bandits[t - 2] == state0.bandits).all() and (bandits[t - 1] != state0.bandits).any()


@pytest.mark.parametrize("level,expected", list(zip(LEVELS, (104, 208, 104))))
def test_concentration_episode_length_is_int_regression_popjaxrl(level, expected):
    """popjaxrl kept E as a jnp float; here it is popgym's int, and truncation lands on step E."""
    env, params = make("Concentration" + level)
    assert type(env.max_episode_length) is int and env.max_episode_length == expected
    records, (_, _, _, _, truncated) = differential("Concentration" + level)
    for record, ours in zip(records, truncated):
        if record["truncated"][-1]:
            assert len(record["actions"]) == expected and ours[expected - 1] and not ours[: expected - 1].any()
