"""POPGym in JAX: the 48 envs of popgym 1.0.7, bsuite's MemoryChain and a meta-RL env, plus the scripts' wrappers.

Every POPGym env is a gymnax 1.x `Environment` (`reset(key, params) -> (obs, state)`, `step(key, state, action,
params) -> (obs, state, reward, terminated, truncated, info)`, auto-reset, jit- and vmap-safe) whose rewards, episode
lengths, termination vs truncation and card order follow the `popgym` package exactly, as `tests/` checks step by
step. Observations are flat float32 vectors (a `Discrete(n)` component becomes a one-hot of length n, components are
concatenated in popgym's order, a `Box` stays as its floats); actions are `Discrete(n)` (grid actions flattened
row-major) or the pendulum's `Box(1)`. The scripts import this module and nothing else of ours.

    import envs_popjax
    env, env_params = envs_popjax.make("RepeatPreviousEasy")  # one env, gymnax style
    vec_env, env_params = envs_popjax.make_vec("RepeatPreviousEasy", 64, wrappers=True)  # the scripts' batch

Map, in file order (sections 3-8: the POPGym families in the registry's order):
  1. spaces and helpers: PopGymEnvironment (the base of every POPGym env), one_hot, action_size, ...
  2. wrappers and the batched env: PreviousActionWrapper, EpisodeStatsWrapper, VecEnv, make_vec
  3. card games: RepeatFirst, RepeatPrevious, Autoencode, CountRecall, HigherLower, Concentration
  4. MultiarmedBandit
  5. cart-poles: PositionOnlyCartPole (its noise_sigma makes the Noisy ones), VelocityOnlyCartPole, and the paper's
     MetaCartPole (16 trials of a randomly projected PositionOnlyCartPole per meta-episode; outside popgym's ids)
  6. pendulums: PositionOnlyPendulum (likewise NoisyPositionOnlyPendulum)
  7. grid games: Battleship, MineSweeper
  8. labyrinths: LabyrinthEscape, LabyrinthExplore
  9. registry: FAMILIES (one row per family), aliases, canonical_id, make
 10. bsuite's MemoryChain
 11. multi-environment meta-RL: META_ENVS (gymnax, brax, DM Control via MuJoCo Playground), MetaEnv, MetaEnvPool
"""

import difflib
import importlib
import inspect
import math
from functools import partial
from typing import Any

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces
from gymnax.wrappers.purerl import GymnaxWrapper


# 1. Spaces and helpers ---------------------------------------------------------------------------------------------
class PopGymEnvironment(environment.Environment):
    """What every POPGym port shares: popgym's horizon, a flat observation, `Discrete` actions. popgym's card and grid
    games end with `terminated`, its control tasks and the bandit with `truncated` at `params.max_steps_in_episode`;
    `truncates` says which. Subclasses set `max_episode_length`, `obs_size` and `num_actions` (class or __init__)."""

    truncates: bool = True
    obs_low, obs_high = 0.0, 1.0  # one-hot observations; the control envs set their own bounds
    obs_size = num_actions = 0  # class-level, so that __init__ may set them (shadows gymnax's `num_actions` property)

    def is_truncated(self, state, params) -> jax.Array:
        if not self.truncates:
            return jnp.asarray(False)
        return state.time >= params.max_steps_in_episode

    @property
    def default_params(self) -> environment.EnvParams:
        return environment.EnvParams(max_steps_in_episode=self.max_episode_length)

    def observation_space(self, params) -> spaces.Box:
        return spaces.Box(self.obs_low, self.obs_high, (self.obs_size,), jnp.float32)

    def action_space(self, params=None) -> spaces.Discrete:
        return spaces.Discrete(self.num_actions)


def one_hot(index: jax.Array, n: int) -> jax.Array:
    return jax.nn.one_hot(index, n, dtype=jnp.float32)


def signed_reward(correct: jax.Array, scale) -> jax.Array:
    return (jnp.where(correct, 1.0, -1.0) * scale).astype(jnp.float32)


def add_clipped_noise(obs: jax.Array, key: jax.Array, sigma: float, low, high) -> jax.Array:
    """popgym's noisy control envs: obs + N(0, sigma^2) per component, clipped to the bounds."""
    if sigma == 0:
        return obs
    return jnp.clip(obs + sigma * jax.random.normal(key, obs.shape, jnp.float32), low, high)


def action_size(action_space) -> int:
    """Length of the encoded action: n for Discrete(n) (one-hot), the flat size for a Box."""
    if isinstance(action_space, spaces.Discrete):
        return action_space.n
    return math.prod(action_space.shape)


# 2. Wrappers and the batched env (what the scripts use) ------------------------------------------------------------
@struct.dataclass
class PreviousActionState:
    env_state: Any
    previous_action: jax.Array  # encoded: one-hot for Discrete, raw floats for Box
    first: jax.Array  # 1.0 when the current observation is the first of an episode


class PreviousActionWrapper(GymnaxWrapper):
    """Observation -> [observation, previous action (one-hot or raw), first-step flag]: popgym's `PreviousAction` +
    `Antialias` wrappers as its baselines use them. The flag is 1 and the action block zero on the first observation
    of *every* episode, auto-resets included (popjaxrl's AliasPrevActionV2 only did this at the initial reset)."""

    def __init__(self, env):
        super().__init__(env)
        self.discrete = isinstance(env.action_space(env.default_params), spaces.Discrete)
        self.action_dim = action_size(env.action_space(env.default_params))
        self.batch_shape = getattr(env, "batch_shape", ())  # (num_envs,) around a VecEnv

    def observation_space(self, params) -> spaces.Box:
        inner = self._env.observation_space(params)
        return spaces.Box(-jnp.inf, jnp.inf, (inner.shape[0] + self.action_dim + 1,), jnp.float32)

    def encode_action(self, action: jax.Array) -> jax.Array:
        if self.discrete:
            return one_hot(action, self.action_dim)
        return jnp.reshape(action, self.batch_shape + (self.action_dim,)).astype(jnp.float32)

    @staticmethod
    def _observe(obs, state: PreviousActionState) -> jax.Array:
        return jnp.concatenate([obs, state.previous_action, state.first[..., None]], axis=-1)

    @partial(jax.jit, static_argnames=("self",))
    def reset(self, key, params=None):
        obs, env_state = self._env.reset(key, params)
        zeros = jnp.zeros(self.batch_shape + (self.action_dim,), jnp.float32)
        state = PreviousActionState(env_state, zeros, jnp.ones(self.batch_shape, jnp.float32))
        return self._observe(obs, state), state

    @partial(jax.jit, static_argnames=("self",))
    def step(self, key, state, action, params=None):
        obs, env_state, reward, terminated, truncated, info = self._env.step(key, state.env_state, action, params)
        done = terminated | truncated
        previous_action = jnp.where(done[..., None], 0.0, self.encode_action(action))
        state = PreviousActionState(env_state, previous_action, done.astype(jnp.float32))
        return self._observe(obs, state), state, reward, terminated, truncated, info


@struct.dataclass
class EpisodeStatsState:
    env_state: Any
    episode_return: jax.Array  # running return of the current episode
    episode_length: jax.Array
    returned_episode_return: jax.Array  # return of the last completed episode
    returned_episode_length: jax.Array


class EpisodeStatsWrapper(GymnaxWrapper):
    """Fixed-shape episode statistics for jit/vmap. `info` gets `returned_episode` (an episode ended at this step),
    `returned_episode_return` and `returned_episode_length` (of the last completed episode)."""

    @partial(jax.jit, static_argnames=("self",))
    def reset(self, key, params=None):
        obs, env_state = self._env.reset(key, params)
        zero_f, zero_i = jnp.zeros(obs.shape[:-1], jnp.float32), jnp.zeros(obs.shape[:-1], jnp.int32)
        return obs, EpisodeStatsState(env_state, zero_f, zero_i, zero_f, zero_i)

    @partial(jax.jit, static_argnames=("self",))
    def step(self, key, state, action, params=None):
        obs, env_state, reward, terminated, truncated, info = self._env.step(key, state.env_state, action, params)
        done = terminated | truncated
        episode_return, episode_length = state.episode_return + reward, state.episode_length + 1
        returned_return = jnp.where(done, episode_return, state.returned_episode_return)
        returned_length = jnp.where(done, episode_length, state.returned_episode_length)
        running = jnp.where(done, 0.0, episode_return), jnp.where(done, 0, episode_length)  # the next episode's
        state = EpisodeStatsState(env_state, *running, returned_return, returned_length)
        info = {**info, "returned_episode": done}
        info.update(returned_episode_return=returned_return, returned_episode_length=returned_length)
        return obs, state, reward, terminated, truncated, info


class VecEnv:
    """`num_envs` copies of a gymnax env stepped together, with gymnax's auto-reset semantics.

    `reset(key, params) -> (obs[N, ...], state)`; `step(key, state, action[N], params) -> (obs, state, reward[N],
    terminated[N], truncated[N], info)`, equal bit for bit to `vmap(env.step)(jax.random.split(key, N), ...)` (env i
    uses the same key, so every episode starts from its own fresh `reset_env` draw, also when envs end in lockstep).
    Only the cost differs: gymnax computes a reset for every env at every step; here a step computes only those of the
    envs whose episode ended (`reset_where`: chunks of `reset_chunk`, default N // 32; one pass of N when over N // 4
    end), in while loops, which under the scripts' vmap over seeds still run only when some seed needs them."""

    def __init__(self, env: environment.Environment, num_envs: int, reset_chunk: int | None = None):
        if num_envs < 1 or (reset_chunk is not None and reset_chunk < 1):
            raise ValueError(f"num_envs and reset_chunk must be >= 1, got {num_envs} and {reset_chunk}")
        self.env, self.num_envs, self.batch_shape, self.reset_chunk = env, num_envs, (num_envs,), reset_chunk

    def __getattr__(self, name):  # default_params, action_space, observation_space, ...: the env's
        if name == "env":  # not set yet (copy, pickle): no attribute, rather than endless recursion
            raise AttributeError(name)
        return getattr(self.env, name)

    @partial(jax.jit, static_argnames=("self",))
    def reset(self, key, params=None):
        params = self.default_params if params is None else params
        return jax.vmap(self.env.reset_env, (0, None))(jax.random.split(key, self.num_envs), params)

    @partial(jax.jit, static_argnames=("self",))
    def step(self, key, state, action, params=None):
        params = self.default_params if params is None else params
        keys = jax.vmap(jax.random.split)(jax.random.split(key, self.num_envs))  # [N, 2]: step, reset
        step_env = jax.vmap(self.env.step_env, (0, 0, 0, None))
        obs, state, reward, terminated, info = step_env(keys[:, 0], state, action, params)
        truncated = jax.vmap(self.env.is_truncated, (0, None))(state, params)
        info = {**info, "terminated": terminated, "truncated": truncated, "final_observation": obs}
        done = terminated | truncated
        reset = lambda key, values: (self.env.reset_env(key, params), values[1])  # noqa: E731
        values = ((obs, state), (reward, info))
        (obs, state), (reward, info) = reset_where(done, keys[:, 1], reset, values, self.reset_chunk)
        return obs, state, reward, terminated, truncated, info


def tree_select(cond: jax.Array, new, old):  # lax.select of two pytrees
    return jax.tree.map(lambda x, y: jax.lax.select(cond, x, y), new, old)


def reset_where(done: jax.Array, keys: jax.Array, reset, values, chunk: int | None = None):
    """`values` ([N, ...] arrays) with entry i replaced by `reset(keys[i], values[i])` where `done[i]` (see VecEnv;
    MetaEnv.step_batch). What `reset` returns unchanged is rewritten with its own value: all reads of the old values
    come first, so XLA updates them in place (it copied the state on every step when an output bypassed the loops)."""
    n = done.shape[0]
    chunk = min(chunk or max(1, n // 32), n)

    def reset_chunks(size: int, carry_on, carry):
        def one_chunk(carry):  # reset the first `size` pending entries
            pending, values = carry
            index = jnp.nonzero(pending, size=size, fill_value=n)[0]  # n: no entry, dropped below
            some = jnp.minimum(index, n - 1)  # indexing by `pending` also keeps XLA from hoisting the resets
            new = jax.vmap(reset)(keys[some], jax.tree.map(lambda x: x[some], values))
            scatter = lambda old, new: old.at[index].set(new, mode="drop")  # noqa: E731
            return pending.at[index].set(False, mode="drop"), jax.tree.map(scatter, values, new)

        return jax.lax.while_loop(lambda carry: carry_on(carry[0]), one_chunk, carry)

    carry = reset_chunks(n, lambda pending: 4 * jnp.sum(pending) > n, (done, values))
    return reset_chunks(chunk, jnp.any, carry)[1]


def make_vec(env_id: str, num_envs: int, *, wrappers: bool = False, reset_chunk: int | None = None, **overrides):
    """`make(env_id, **overrides)` as a `VecEnv` of `num_envs` envs: `(vec_env, params)`. `wrappers=True` adds the
    scripts' wrappers: the previous action and the first-step flag in the observation, episode statistics in `info`."""
    env, params = make(env_id, **overrides)
    vec_env = VecEnv(env, num_envs, reset_chunk)
    if wrappers:
        vec_env = EpisodeStatsWrapper(PreviousActionWrapper(vec_env))
    return vec_env, params


# 3. Card games (popgym/core/deck.py) -------------------------------------------------------------------------------
# Card id c in [0, 52 * decks): suit c % 4, colour c % 2, rank (c % 52) // 4 with 0 = Ace. popgym deals from the end
# of a shuffled `deck.idx`, so `cards` here holds `deck.idx[::-1]`, the cards in the order the agent sees them. Each
# state holds popgym's hidden layout (cards in the order shown, or board positions), so tests can copy it from popgym.
def shuffled_cards(key: jax.Array, num_decks: int) -> jax.Array:
    return jax.random.permutation(key, 52 * num_decks)


def card_suit(card: jax.Array) -> jax.Array:
    return card % 4


def card_colour(card: jax.Array) -> jax.Array:
    return card % 2  # popgym's colors_idx; equals card_suit(card) % 2 (spades/clubs 0, red 1)


def card_rank(card: jax.Array) -> jax.Array:
    return (card % 52) // 4  # popgym's ranks_idx: 0 = Ace (lowest) ... 12 = King


# popgym's `deck_type` argument: what a card counts as, and how many distinct values there are.
CARD_VALUES = {"colors": (card_colour, 2), "suits": (card_suit, 4), "ranks": (card_rank, 13)}


class CardGame(PopGymEnvironment):
    """N = 52 * `num_decks` shuffled cards; terminated after N - 1 steps unless a subclass sets `max_episode_length`."""

    truncates = False

    def __init__(self, num_decks: int = 1):
        self.num_decks, self.num_cards = num_decks, 52 * num_decks
        self.max_episode_length = self.num_cards - 1

    def advance(self, state, reward: jax.Array):
        """The end of `step_env`: time moves on, the new observation, terminated at the horizon."""
        state = state.replace(time=state.time + 1)
        return self.get_obs(state), state, reward, state.time >= self.max_episode_length, {}


@struct.dataclass
class CardSequenceState:
    cards: jax.Array  # card ids in the order they are shown
    time: jax.Array  # number of step() calls so far; the current observation is cards[time]


class CardSequenceGame(CardGame):
    """A game over one shuffled deck shown card by card; subclasses define obs and reward."""

    def reset_env(self, key, params):
        state = CardSequenceState(cards=shuffled_cards(key, self.num_decks), time=jnp.int32(0))
        return self.get_obs(state), state


class RepeatPrevious(CardSequenceGame):
    """popgym/envs/repeat_previous.py: name the suit of the card shown k observations ago. Observation n (0 at reset)
    is the suit of `cards[n]`; the action taken after seeing it pays +-1/(N - k) once n >= k - 1, against the suit of
    `cards[n - (k - 1)]` (the k-th most recent card, counting the current one). Terminated after N - 1 steps."""

    obs_size, num_actions = 4, 4

    def __init__(self, num_decks: int = 1, k: int = 4):
        if not 1 <= k < 52 * num_decks:
            raise ValueError(f"k must be in [1, {52 * num_decks}), got {k}")
        super().__init__(num_decks)
        self.k, self.reward_scale = k, 1.0 / (self.num_cards - k)

    def target_index(self, time: jax.Array) -> jax.Array:
        return time - (self.k - 1)

    def get_obs(self, state: CardSequenceState, params=None, key=None) -> jax.Array:
        return one_hot(card_suit(state.cards[state.time]), 4)

    def step_env(self, key, state, action, params):
        target = self.target_index(state.time)
        correct = action == card_suit(state.cards[jnp.maximum(target, 0)])
        reward = jnp.where(target >= 0, jnp.where(correct, 1.0, -1.0) * self.reward_scale, 0.0)
        return self.advance(state, reward.astype(jnp.float32))


class RepeatFirst(RepeatPrevious):
    """popgym/envs/repeat_first.py: name the suit of the first card, at every step, +-1/(N - 1)."""

    def __init__(self, num_decks: int = 1):
        super().__init__(num_decks=num_decks, k=1)

    def target_index(self, time: jax.Array) -> jax.Array:
        return jnp.zeros_like(time)


class Autoencode(CardSequenceGame):
    """popgym/envs/autoencode.py: watch N cards, then name their suits in reverse order.

    Obs (mode, suit) -> one-hot(2) ++ one-hot(4), mode WATCH = 1, PLAY = 0. Reset shows (1, suit of cards[0]); watch
    step t < N - 1 shows (1, suit of cards[t]) and pays 0 whatever the action. Step N - 1 shows the last card already
    flagged PLAY (popgym switches mode when the deck runs out, before building the obs). The N play steps show (0, 0)
    (popgym's `make_obs(array([0]))`, card id 0) and pay +-1/N for naming cards[N-1], ..., cards[0]; terminated after
    2N - 1 steps."""

    obs_size, num_actions = 6, 4

    def __init__(self, num_decks: int = 1):
        super().__init__(num_decks)
        self.max_episode_length = 2 * self.num_cards - 1

    def get_obs(self, state: CardSequenceState, params=None, key=None) -> jax.Array:
        last = self.num_cards - 1
        watching = state.time < last
        suit = jnp.where(state.time <= last, card_suit(state.cards[jnp.minimum(state.time, last)]), 0)
        return jnp.concatenate([one_hot(watching.astype(jnp.int32), 2), one_hot(suit, 4)])

    def step_env(self, key, state, action, params):
        last = self.num_cards - 1
        playing = state.time >= last  # the obs acted on carried the PLAY flag
        # Play step j = time - last names cards[last - j]: popgym pops its hand (LIFO).
        target = card_suit(state.cards[jnp.clip(2 * last - state.time, 0, last)])
        reward = jnp.where(playing, signed_reward(action == target, 1.0 / self.num_cards), 0.0)
        return self.advance(state, reward)


@struct.dataclass
class CountRecallState:
    value_cards: jax.Array  # the value deck in the order shown
    query_cards: jax.Array  # an independently shuffled second deck, in the order shown
    counts: jax.Array  # [V] how many value cards of each kind have been shown, the current one included
    time: jax.Array


class CountRecall(CardGame):
    """popgym/envs/count_recall.py: how many value cards of the queried kind have been shown, the current one included?
    Obs [value, query] -> one-hot(V) ++ one-hot(V), V = 2 colours, 4 suits or 13 ranks, value and query dealt from two
    independently shuffled decks. Action: that count, in 0..N/V (Discrete(N/V + 1)), paid +-1/(N - 1). Terminated
    after N - 1 steps. popgym's `error_clamp` is accepted there but never used, so it is left out."""

    def __init__(self, num_decks: int = 1, deck_type: str = "colors"):
        if deck_type not in CARD_VALUES:
            raise ValueError(f"deck_type must be one of {sorted(CARD_VALUES)}, got {deck_type!r}")
        super().__init__(num_decks)
        self.card_value, self.num_values = CARD_VALUES[deck_type]
        self.obs_size = 2 * self.num_values
        self.num_actions = self.num_cards // self.num_values + 1

    def get_obs(self, state: CountRecallState, params=None, key=None) -> jax.Array:
        value = self.card_value(state.value_cards[state.time])
        query = self.card_value(state.query_cards[state.time])
        return jnp.concatenate([one_hot(value, self.num_values), one_hot(query, self.num_values)])

    def make_state(self, value_cards: jax.Array, query_cards: jax.Array, time=0) -> CountRecallState:
        """The state showing card `time` of both decks (also a test hook)."""
        shown = (jnp.arange(self.num_cards) <= time).astype(jnp.int32)
        counts = jnp.zeros(self.num_values, jnp.int32).at[self.card_value(value_cards)].add(shown)
        return CountRecallState(value_cards, query_cards, counts, jnp.int32(time))

    def reset_env(self, key, params):
        key_value, key_query = jax.random.split(key)
        state = self.make_state(shuffled_cards(key_value, self.num_decks), shuffled_cards(key_query, self.num_decks))
        return self.get_obs(state), state

    def step_env(self, key, state, action, params):
        count = state.counts[self.card_value(state.query_cards[state.time])]  # kept up to date: O(1) a step
        reward = signed_reward(action == count, 1.0 / self.max_episode_length)
        shown = one_hot(self.card_value(state.value_cards[state.time + 1]), self.num_values).astype(jnp.int32)
        return self.advance(state.replace(counts=state.counts + shown), reward)


class HigherLower(CardSequenceGame):
    """popgym/envs/higher_lower.py: guess whether the next card ranks higher (action 0) or lower (1). Obs: one-hot(13)
    of the rank of cards[time]. Step t compares cards[t + 1] with cards[t]: +1/N if the guess is right, -1/N if wrong,
    0 on equal ranks (a push). Terminated after N - 1 steps, when the last card is shown (nothing follows it)."""

    obs_size, num_actions = 13, 2

    def get_obs(self, state: CardSequenceState, params=None, key=None) -> jax.Array:
        return one_hot(card_rank(state.cards[state.time]), 13)

    def step_env(self, key, state, action, params):
        current = card_rank(state.cards[state.time])
        following = card_rank(state.cards[state.time + 1])
        correct = (following > current) == (action == 0)
        reward = jnp.where(following == current, 0.0, signed_reward(correct, 1.0 / self.num_cards))
        return self.advance(state, reward)


@struct.dataclass
class ConcentrationState:
    cards: jax.Array  # card id at each board position (popgym's deck.idx, not reversed)
    face_up: jax.Array  # bool per position: matched pairs, which stay up
    first: jax.Array  # position flipped first in the current pair, -1 if none
    time: jax.Array


class Concentration(CardGame):
    """popgym/envs/concentration.py: find the pairs of equal value among N face-down cards.

    Obs: per position its value (colour or rank) if face up or flipped in the current pair, else the face-down code V;
    N one-hots of length V + 1 in position order. An action flips one position; every second flip ends a pair. A
    matching pair pays +1/(N/2) and stays up; a mismatch, or the same position twice, pays -2/E. Flipping a card that
    is already up pays -(flips in this pair, itself included)/E and starts the pair over. The obs of a pair's second
    flip still shows both cards. E = ceil(2N - N/(2N - 1)), popgym's bound on a perfect memory player's expected
    number of flips; truncated after E steps, terminated when every card is up (both can hold on step E)."""

    truncates = True

    def __init__(self, num_decks: int = 1, deck_type: str = "ranks"):
        # popgym has no "suits": 13 cards per suit cannot all be paired.
        if deck_type not in ("colors", "ranks"):
            raise ValueError(f"deck_type must be 'colors' or 'ranks', got {deck_type!r}")
        super().__init__(num_decks)
        self.card_value, self.num_values = CARD_VALUES[deck_type]
        n = self.num_cards
        self.max_episode_length = math.ceil(2 * n - n / (2 * n - 1))
        self.obs_size = n * (self.num_values + 1)
        self.num_actions = n

    def board_obs(self, state: ConcentrationState, shown: jax.Array) -> jax.Array:
        values = jnp.where(shown, self.card_value(state.cards), self.num_values)
        return one_hot(values, self.num_values + 1).reshape(-1)

    def get_obs(self, state: ConcentrationState, params=None, key=None) -> jax.Array:
        positions = jnp.arange(self.num_cards)
        return self.board_obs(state, state.face_up | (positions == state.first))

    def reset_env(self, key, params):
        n = self.num_cards
        state = ConcentrationState(shuffled_cards(key, self.num_decks), jnp.zeros(n, bool), jnp.int32(-1), jnp.int32(0))
        return self.get_obs(state), state

    def step_env(self, key, state, action, params):
        positions = jnp.arange(self.num_cards)
        # The obs is taken right after the flip, before a finished pair turns face down.
        obs = self.board_obs(state, state.face_up | (positions == state.first) | (positions == action))
        has_first = state.first >= 0
        already_up = state.face_up[action]
        values = self.card_value(state.cards)
        match = has_first & (action != state.first) & (values[action] == values[jnp.maximum(state.first, 0)])
        failure_scale = 1.0 / params.max_steps_in_episode
        pair_reward = jnp.where(has_first, jnp.where(match, 2.0 / self.num_cards, -2.0 * failure_scale), 0.0)
        reward = jnp.where(already_up, -(1 + has_first) * failure_scale, pair_reward).astype(jnp.float32)
        pair = (positions == action) | (positions == state.first)
        face_up = state.face_up | (match & ~already_up & pair)
        first = jnp.where(already_up | has_first, -1, action).astype(jnp.int32)
        state = ConcentrationState(cards=state.cards, face_up=face_up, first=first, time=state.time + 1)
        return obs, state, reward, jnp.all(face_up), {}


# 4. MultiarmedBandit -----------------------------------------------------------------------------------------------
@struct.dataclass
class BanditState:
    bandits: jax.Array  # payout probability of each arm, drawn U(0, 1) per episode
    time: jax.Array


class MultiarmedBandit(PopGymEnvironment):
    """popgym/envs/multiarmed_bandit.py: pull arms whose payout probabilities are hidden. Obs: one-hot(2), 1 if the
    pulled arm paid out (0 at reset). A payout pays +1/T, anything else -1/T. Never terminated; truncated after T steps.
    """

    obs_size = 2

    def __init__(self, num_bandits: int = 10, episode_length: int = 200):
        self.num_bandits = self.num_actions = num_bandits
        self.max_episode_length = episode_length

    def reset_env(self, key, params):
        state = BanditState(bandits=jax.random.uniform(key, (self.num_bandits,), jnp.float32), time=jnp.int32(0))
        return one_hot(0, 2), state

    def step_env(self, key, state, action, params):
        return self.step_with_draw(state, action, jax.random.uniform(key), params)

    def step_with_draw(self, state: BanditState, action, draw: jax.Array, params):
        """`step_env` given its U(0, 1) draw: popgym pays out iff `np_random.random() < p[a]`, so a test can inject
        popgym's own draws here."""
        payout = draw < state.bandits[action]
        reward = signed_reward(payout, 1.0 / params.max_steps_in_episode)
        state = state.replace(time=state.time + 1)
        return one_hot(payout.astype(jnp.int32), 2), state, reward, jnp.asarray(False), {}


# 5. Cart-poles: gymnasium's CartPoleEnv (Euler integration) with part of the state hidden --------------------------
@struct.dataclass
class CartPoleState:
    physics: jax.Array  # (x, x_dot, theta, theta_dot)
    time: jax.Array


class PositionOnlyCartPole(PopGymEnvironment):
    """popgym/envs/position_only_cartpole.py: CartPole observing only (x, theta). Reward 1/T on every step (the failing
    step included); terminated when |x| > 2.4 or |theta| > 12 degrees, truncated after T = `max_steps_in_episode`
    steps (both can hold). `noise_sigma > 0` makes popgym's NoisyPositionOnlyCartPole: N(0, sigma) noise on the
    observation at reset and every step, clipped to the observation bounds."""

    num_actions = 2
    observed = (0, 2)  # indices of (x, x_dot, theta, theta_dot) that the agent sees
    gravity, masscart, masspole, pole_half_length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    x_threshold, theta_threshold = 2.4, 12 * 2 * math.pi / 360

    def __init__(self, max_episode_length: int = 200, noise_sigma: float = 0.0):
        self.max_episode_length, self.noise_sigma = max_episode_length, noise_sigma
        self.obs_size = len(self.observed)
        # gymnasium's bounds: twice the termination thresholds, infinite velocities.
        full_high = np.array([2 * self.x_threshold, np.inf, 2 * self.theta_threshold, np.inf], np.float32)
        self.obs_high = full_high[list(self.observed)]
        self.obs_low = -self.obs_high

    def get_obs(self, state: CartPoleState, params=None, key=None) -> jax.Array:
        obs = state.physics[jnp.array(self.observed)].astype(jnp.float32)
        return add_clipped_noise(obs, key, self.noise_sigma, self.obs_low, self.obs_high)

    def reset_env(self, key, params):
        key_state, key_noise = jax.random.split(key)
        physics = jax.random.uniform(key_state, (4,), jnp.float32, -0.05, 0.05)
        state = CartPoleState(physics=physics, time=jnp.int32(0))
        return self.get_obs(state, key=key_noise), state

    def step_env(self, key, state, action, params):
        x, x_dot, theta, theta_dot = state.physics
        force = jnp.where(action == 1, self.force_mag, -self.force_mag)
        cos, sin = jnp.cos(theta), jnp.sin(theta)
        total_mass = self.masscart + self.masspole
        polemass_length = self.masspole * self.pole_half_length
        temp = (force + polemass_length * theta_dot**2 * sin) / total_mass
        denominator = self.pole_half_length * (4.0 / 3.0 - self.masspole * cos**2 / total_mass)
        theta_acc = (self.gravity * sin - cos * temp) / denominator
        x_acc = temp - polemass_length * theta_acc * cos / total_mass
        dt = self.tau
        physics = jnp.stack([x + dt * x_dot, x_dot + dt * x_acc, theta + dt * theta_dot, theta_dot + dt * theta_acc])
        state = CartPoleState(physics=physics, time=state.time + 1)
        terminated = (jnp.abs(physics[0]) > self.x_threshold) | (jnp.abs(physics[2]) > self.theta_threshold)
        reward = jnp.float32(1.0) / params.max_steps_in_episode
        return self.get_obs(state, key=key), state, reward, terminated, {}


class VelocityOnlyCartPole(PositionOnlyCartPole):
    """popgym/envs/velocity_only_cartpole.py: CartPole observing only (x_dot, theta_dot); else as PositionOnlyCartPole.
    popgym's reset bug is kept by default (`popgym_reset_obs=True`, so trajectories match popgym 1.0.7): its `reset`
    shows the *positions* (x, theta), every `step` the velocities; with `popgym_reset_obs=False` reset shows them."""

    observed = (1, 3)

    def __init__(self, max_episode_length: int = 200, popgym_reset_obs: bool = True):
        super().__init__(max_episode_length=max_episode_length)
        self.popgym_reset_obs = popgym_reset_obs

    def reset_env(self, key, params):
        obs, state = super().reset_env(key, params)
        if self.popgym_reset_obs:
            obs = state.physics[jnp.array((0, 2))]
        return obs, state



@struct.dataclass
class MetaCartPoleState:
    cartpole: CartPoleState  # the current trial's cart-pole
    start: CartPoleState  # the meta-episode's first state: every trial restarts from it
    kernel: jax.Array  # [2, projection_size]: the observation (x, theta) is shown as (x, theta) @ kernel
    trial: jax.Array  # trials finished so far (0 .. num_trials - 1 while the meta-episode runs)
    time: jax.Array  # steps in the meta-episode


class MetaCartPole(PopGymEnvironment):
    """The paper's meta-CartPole (popjaxrl envs/environments/meta_cartpole.py, `NoisyStatelessMetaCartPole`): a
    meta-episode is `num_trials` trials of PositionOnlyCartPole (noise 0, `trial_length` steps, reward 1/T per step),
    each restarting from the *same* initial state, seen through a random linear map of (x, theta) drawn once per
    meta-episode: a 2 -> `projection_size` kernel, orthogonal with gain sqrt(2) (flax's `Dense` init there; zero bias).
    Observation `[(x, theta) @ kernel, previous action (0/1), this step ended a trial, meta-episode start]`; at reset
    `[.., 0, 0, 1]`. `terminated` only when the last trial ends, so the memory and GAE run across trials; never
    truncated. `info["trial"]`: the trial a step's reward belongs to (0-based); `info["trial_ended"]`.
    Differences from popjaxrl, on purpose: the observation bounds are infinite (popjaxrl declares [-1, 1], which the
    projected positions exceed), and the inner cart-pole is popgym 1.0.7's PositionOnlyCartPole (the same dynamics,
    reward and limits; popjaxrl clips [x, theta] to its bounds, which a live cart-pole never reaches)."""

    num_actions = 2
    truncates = False  # a meta-episode ends with its last trial, at most num_trials * trial_length steps
    obs_low, obs_high = -np.inf, np.inf

    def __init__(self, num_trials: int = 16, trial_length: int = 200, projection_size: int = 4):
        sizes = dict(num_trials=num_trials, trial_length=trial_length, projection_size=projection_size)
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_trials, self.trial_length, self.projection_size = num_trials, trial_length, projection_size
        self.cartpole = PositionOnlyCartPole(max_episode_length=trial_length)
        self.cartpole_params = self.cartpole.default_params
        self.obs_size, self.max_episode_length = projection_size + 3, num_trials * trial_length

    def observe(self, state: MetaCartPoleState, action, trial_ended, start) -> jax.Array:
        flags = jnp.stack([action, trial_ended, start]).astype(jnp.float32)
        return jnp.concatenate([self.cartpole.get_obs(state.cartpole) @ state.kernel, flags])

    def reset_env(self, key, params):
        key_cartpole, key_kernel = jax.random.split(key)
        cartpole = self.cartpole.reset_env(key_cartpole, self.cartpole_params)[1]
        kernel = jax.nn.initializers.orthogonal(math.sqrt(2))(key_kernel, (2, self.projection_size), jnp.float32)
        state = MetaCartPoleState(cartpole, cartpole, kernel, jnp.int32(0), jnp.int32(0))
        return self.observe(state, 0, 0, 1), state

    def step_env(self, key, state, action, params):
        _, cartpole, reward, terminated, _ = self.cartpole.step_env(key, state.cartpole, action, self.cartpole_params)
        trial_ended = terminated | self.cartpole.is_truncated(cartpole, self.cartpole_params)
        trial = state.trial + trial_ended
        state = state.replace(
            cartpole=tree_select(trial_ended, state.start, cartpole), trial=trial, time=state.time + 1
        )
        info = {"trial": trial - trial_ended, "trial_ended": trial_ended}
        return self.observe(state, action, trial_ended, 0), state, reward, trial >= self.num_trials, info


# 6. Pendulums: gymnasium's Pendulum observing the angle only -------------------------------------------------------
@struct.dataclass
class PendulumState:
    physics: jax.Array  # (theta, theta_dot); theta is not wrapped, as in gymnasium
    time: jax.Array


class PositionOnlyPendulum(PopGymEnvironment):
    """popgym/envs/position_only_pendulum.py: gymnasium's Pendulum (g = 10) observing (cos, sin) of the angle only.

    Action Box(1) in [-2, 2] (torque; clipped as gymnasium does). Reset theta ~ U(-pi, pi), theta_dot ~ U(-1, 1).
    Gymnasium's reward r = -(angle^2 + 0.1 theta_dot^2 + 0.001 u^2), from the state *before* the step, r in
    [-16.2736044, 0], becomes popgym's ((r + c) / c) / T with c = 8.1368022, in [-1/T, 1/T]. Never terminates;
    truncated after T = `max_steps_in_episode` steps. `noise_sigma > 0` makes popgym's NoisyPositionOnlyPendulum:
    N(0, sigma) noise on the observation at reset and every step, clipped to [-1, 1] (popjaxrl did not clip)."""

    num_actions = 1
    obs_size, obs_low, obs_high = 2, -1.0, 1.0
    max_speed, max_torque, dt, gravity, mass, length = 8.0, 2.0, 0.05, 10.0, 1.0, 1.0
    reward_half_range = 16.2736044 / 2  # popgym: (high - low) / 2 with low = -16.2736044, high = 0

    def __init__(self, max_episode_length: int = 200, noise_sigma: float = 0.0):
        self.max_episode_length, self.noise_sigma = max_episode_length, noise_sigma

    def get_obs(self, state: PendulumState, params=None, key=None) -> jax.Array:
        theta = state.physics[0]
        obs = jnp.stack([jnp.cos(theta), jnp.sin(theta)]).astype(jnp.float32)
        return add_clipped_noise(obs, key, self.noise_sigma, self.obs_low, self.obs_high)

    def reset_env(self, key, params):
        key_state, key_noise = jax.random.split(key)
        high = jnp.array([jnp.pi, 1.0], jnp.float32)
        physics = jax.random.uniform(key_state, (2,), jnp.float32, -high, high)
        state = PendulumState(physics=physics, time=jnp.int32(0))
        return self.get_obs(state, key=key_noise), state

    def step_env(self, key, state, action, params):
        theta, theta_dot = state.physics
        torque = jnp.clip(jnp.reshape(action, (-1,))[0], -self.max_torque, self.max_torque)
        angle = jnp.mod(theta + jnp.pi, 2 * jnp.pi) - jnp.pi
        reward = -(angle**2 + 0.1 * theta_dot**2 + 0.001 * torque**2)
        reward = (reward + self.reward_half_range) / self.reward_half_range / params.max_steps_in_episode
        theta_acc = 3 * self.gravity / (2 * self.length) * jnp.sin(theta) + 3.0 / (self.mass * self.length**2) * torque
        theta_dot = jnp.clip(theta_dot + theta_acc * self.dt, -self.max_speed, self.max_speed)
        physics = jnp.stack([theta + theta_dot * self.dt, theta_dot]).astype(state.physics.dtype)
        state = PendulumState(physics=physics, time=state.time + 1)
        return self.get_obs(state, key=key), state, reward.astype(jnp.float32), jnp.asarray(False), {}

    def action_space(self, params=None) -> spaces.Box:
        return spaces.Box(-self.max_torque, self.max_torque, (1,), jnp.float32)


# 7. Grid games (popgym battleship.py, minesweeper.py) --------------------------------------------------------------
# popgym's MultiDiscrete([R, C]) action is the flat Discrete(R * C) here, row-major: a = row * C + col. The states
# keep the hidden layout (ships, mines) as boolean grids, so tests can copy it from a seeded popgym env.
def grid_cell(action: jax.Array, num_cols: int) -> tuple[jax.Array, jax.Array]:
    """(row, col) of a row-major flattened grid action."""
    return action // num_cols, action % num_cols


def shifted(grid: jax.Array, d_row: int, d_col: int, fill) -> jax.Array:
    """out[i, j] = grid[i + d_row, j + d_col], or `fill` where that cell lies off the grid."""
    pad = max(abs(d_row), abs(d_col))
    padded = jnp.pad(grid, pad, constant_values=fill)
    rows, cols = grid.shape
    return padded[pad + d_row : pad + d_row + rows, pad + d_col : pad + d_col + cols]


def neighbour_sum(grid: jax.Array, offsets, fill: int = 0) -> jax.Array:
    """out[i, j] = sum of grid[i + dr, j + dc] over (dr, dc) in offsets; cells off the grid count `fill`."""
    grid = grid.astype(jnp.int32)
    return sum(shifted(grid, dr, dc, fill) for dr, dc in offsets)


BLOCK_3X3 = tuple((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1))  # a cell and its 8 neighbours


def pick_true(u: jax.Array, mask: jax.Array) -> jax.Array:
    """One-hot (shaped like `mask`) of its floor(u * count)-th True entry in row-major order: a uniform choice among
    the True entries when u ~ U[0, 1); all False when there are none."""
    flat = mask.ravel()
    rank = jnp.cumsum(flat)  # 1-based rank of each True entry
    k = jnp.minimum(jnp.floor(u * rank[-1]), rank[-1] - 1)
    return (flat & (rank == k + 1)).reshape(mask.shape)


@struct.dataclass
class BattleshipState:
    board: jax.Array  # (B, B) bool, True on a ship: popgym's env.board
    guesses: jax.Array  # (B, B) bool, cells fired at so far
    hits: jax.Array  # ship cells hit for the first time so far
    time: jax.Array


class Battleship(PopGymEnvironment):
    """popgym/envs/battleship.py: fire at a hidden B x B board holding ships of sizes 2, 3, 3, 4.

    Observation: one-hot(2) of "this shot was a hit"; 0 at reset. A first hit on a ship cell pays 1/12, anything else
    (a repeated guess included) -1/(B^2 - 12). Terminated at the 12th hit, truncated after B^2 steps; both hold when
    the last possible shot is the 12th hit. Ships are placed in turn, each uniformly among the positions that fit
    beside those already placed: popgym's distribution, as its rejection sampling over (start cell, axis, sign)
    reaches every such position in exactly two ways (either end as the start)."""

    obs_size = 2

    def __init__(self, board_size: int = 10, ship_sizes: tuple[int, ...] = (2, 3, 3, 4)):
        self.board_size, self.ship_sizes = board_size, tuple(ship_sizes)
        self.num_actions = self.max_episode_length = board_size**2
        self.needed_hits = sum(self.ship_sizes)
        self.hit_reward = 1.0 / self.needed_hits
        self.miss_reward = -1.0 / (self.max_episode_length - self.needed_hits)

    @staticmethod
    def place_ship(u: jax.Array, board: jax.Array, size: int) -> jax.Array:
        # fits[0 / 1, r, c]: a ship from (r, c) downwards / rightwards stays on the board, on free cells
        down, right = [(k, 0) for k in range(size)], [(0, k) for k in range(size)]
        fits = jnp.stack([neighbour_sum(board, down, fill=1) == 0, neighbour_sum(board, right, fill=1) == 0])
        down_start, right_start = pick_true(u, fits)  # one-hot: where the chosen ship starts
        up, left = [(-k, 0) for k in range(size)], [(0, -k) for k in range(size)]
        return board | (neighbour_sum(down_start, up) + neighbour_sum(right_start, left) > 0)

    def reset_env(self, key, params):
        board = jnp.zeros((self.board_size, self.board_size), bool)
        for u, size in zip(jax.random.uniform(key, (len(self.ship_sizes),)), self.ship_sizes):
            board = self.place_ship(u, board, size)
        state = BattleshipState(board=board, guesses=jnp.zeros_like(board), hits=jnp.int32(0), time=jnp.int32(0))
        return one_hot(0, 2), state

    def step_env(self, key, state, action, params):
        row, col = grid_cell(action, self.board_size)
        hit = state.board[row, col] & ~state.guesses[row, col]
        guesses = state.guesses.at[row, col].set(True)
        state = BattleshipState(board=state.board, guesses=guesses, hits=state.hits + hit, time=state.time + 1)
        reward = jnp.where(hit, self.hit_reward, self.miss_reward).astype(jnp.float32)
        return one_hot(hit.astype(jnp.int32), 2), state, reward, state.hits >= self.needed_hits, {}


@struct.dataclass
class MineSweeperState:
    mines: jax.Array  # (R, C) bool: popgym's env.hidden_grid == 1 after reset
    viewed: jax.Array  # (R, C) bool, clear cells uncovered so far
    exploded: jax.Array  # a mine was hit
    time: jax.Array


class MineSweeper(PopGymEnvironment):
    """popgym/envs/minesweeper.py: uncover the L = R * C - mines clear cells of a hidden board.

    Observation: one-hot over min(mines + 1, 10) values of the number of mines in the 3 x 3 block around the chosen
    cell, the cell itself included; 0 at reset. A new clear cell pays 1/L, one already uncovered -0.5/(L - 2), a mine
    -0.5 - 1/L and terminates. Terminated when no clear cell is left; truncated at step L unless terminated on that
    step (popgym 1.0.7, fix #38). Perfect play returns 1; one new cell, L - 2 repeats and a mine return -1."""

    def __init__(self, dims: tuple[int, int] = (4, 4), num_mines: int = 2):
        self.dims, self.num_mines = tuple(dims), num_mines
        self.num_actions = dims[0] * dims[1]
        self.obs_size = min(num_mines + 1, 10)
        self.max_episode_length = dims[0] * dims[1] - num_mines
        self.clear_reward = 1.0 / self.max_episode_length
        self.mine_reward = -0.5 - self.clear_reward
        self.repeat_reward = -0.5 / (self.max_episode_length - 2)

    def reset_env(self, key, params):
        mine_cells = jax.random.choice(key, self.num_actions, (self.num_mines,), replace=False)
        mines = jnp.zeros(self.num_actions, bool).at[mine_cells].set(True).reshape(self.dims)
        state = MineSweeperState(mines, viewed=jnp.zeros_like(mines), exploded=jnp.bool_(False), time=jnp.int32(0))
        return one_hot(0, self.obs_size), state

    def step_env(self, key, state, action, params):
        row, col = grid_cell(action, self.dims[1])
        mine, viewed = state.mines[row, col], state.viewed[row, col]
        reward = jnp.where(mine, self.mine_reward, jnp.where(viewed, self.repeat_reward, self.clear_reward))
        viewed = state.viewed.at[row, col].set(~mine)
        state = MineSweeperState(state.mines, viewed, exploded=state.exploded | mine, time=state.time + 1)
        mines_around = neighbour_sum(state.mines, BLOCK_3X3)[row, col]
        obs = one_hot(mines_around, self.obs_size)
        return obs, state, reward.astype(jnp.float32), self.is_terminated(state, params), {}

    def is_terminated(self, state, params=None) -> jax.Array:
        return state.exploded | jnp.all(state.viewed | state.mines)

    def is_truncated(self, state, params) -> jax.Array:
        return super().is_truncated(state, params) & ~self.is_terminated(state, params)


# 8. Labyrinths (popgym/core/maze.py, labyrinth_escape.py, labyrinth_explore.py) ------------------------------------
# popgym makes its mazes with mazelib. A maze of R x C cells lives on a (2R + 1) x (2C + 1) grid of popgym's cell
# codes: cell (i, j) at (2i + 1, 2j + 1), the walls between and around them.
FREE, OBSTACLE, START, GOAL = 0, 1, 2, 3  # popgym's Cell codes; its Discrete(5) also has HIDDEN = 4
NUM_CELL_CODES = 5
MOVES = ((0, -1), (0, 1), (-1, 0), (1, 0))  # popgym's actions LEFT, RIGHT, UP, DOWN as (d_row, d_col)
NO_ACTION = 4  # popgym's Actions.NONE, shown as the action in the reset observation


def hunt_and_kill_maze(key: jax.Array, rows: int, cols: int) -> jax.Array:
    """A maze as mazelib's HuntAndKill(hunt_order="random") makes it: int8 grid, 1 = wall, 0 = open.

    mazelib opens a uniformly random cell and walks from it, each step into a uniformly chosen unvisited neighbour
    (opening the wall between), until stuck. Then it hunts: it draws uniformly random cells, at most (2R + 1)(2C + 1)
    draws in all, and walks again from any that is open and has an unvisited neighbour (a frontier cell); other draws
    change nothing. So one hunt here draws how many cells mazelib would draw (geometric, success rate |frontier| / RC)
    and then a uniform frontier cell: the same distribution in exactly RC - 1 carving steps. If the draws run out
    first, the maze keeps unvisited (solid) cells, as mazelib's does (very rarely). Cells are boolean (R, C) masks
    throughout, the current cell a one-hot mask."""
    max_draws = (2 * rows + 1) * (2 * cols + 1)
    u = jax.random.uniform(key, (3 * rows * cols,)).reshape(rows * cols, 3)
    visited = pick_true(u[0, 0], jnp.ones((rows, cols), bool))
    no_walls = jnp.zeros((rows, cols), bool)

    def carve(carry, u):
        visited, east, south, current, draws = carry  # east/south[i, j]: wall right of/below (i, j) open
        frontier = visited & (neighbour_sum(~visited, MOVES) > 0)
        stuck = ~jnp.any(current & frontier)
        success = jnp.maximum(jnp.mean(frontier), 1 / (rows * cols))  # the floor only avoids 0/0 when done
        hunt_draws = jnp.clip(1 + jnp.floor(jnp.log1p(-u[0]) / jnp.log1p(-success)), 1, max_draws + 1)
        draws = draws + jnp.where(stuck, hunt_draws.astype(jnp.int32), 0)
        current = jnp.where(stuck, pick_true(u[1], frontier) & (draws <= max_draws), current)
        reached = pick_true(u[2], ~visited & (neighbour_sum(current, MOVES) > 0))
        pair = current | reached  # two adjacent cells (or only `current` when nothing is left to do)
        east = east | (pair & shifted(pair, 0, 1, False))
        south = south | (pair & shifted(pair, 1, 0, False))
        return (visited | reached, east, south, reached, draws), None

    carry = (visited, no_walls, no_walls, visited, jnp.int32(0))
    (visited, east, south, *_), _ = jax.lax.scan(carve, carry, u[1:])
    walls = lambda is_open: (~is_open).astype(jnp.int8)  # noqa: E731
    grid = jnp.ones((2 * rows + 1, 2 * cols + 1), jnp.int8).at[1::2, 1::2].set(walls(visited))
    return grid.at[1::2, 2:-1:2].set(walls(east[:, :-1])).at[2:-1:2, 1::2].set(walls(south[:-1]))


def maze_entrances(key: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """mazelib's Maze.generate_entrances(start_outer=True) as popgym calls it: (start, end). A uniformly chosen side
    (north, south, west, east) gets the start on a uniformly chosen odd row/column of the outer wall, the opposite
    side the end, drawn likewise and independently (mazelib redraws adjacent entrances, which opposite sides never are).
    """
    u = jax.random.uniform(key, (3,))
    side = jnp.floor(4 * u[0]).astype(jnp.int32)  # 0 north, 1 south, 2 west, 3 east
    north_south = side < 2
    along = 2 * jnp.floor(u[1:] * jnp.where(north_south, width // 2, height // 2)).astype(jnp.int32) + 1
    last = jnp.where(north_south, height - 1, width - 1)  # index of the far edge
    start_edge = jnp.where(side % 2 == 0, 0, last)  # north and west start on row/column 0
    start = jnp.where(north_south, jnp.stack([start_edge, along[0]]), jnp.stack([along[0], start_edge]))
    end = jnp.where(north_south, jnp.stack([last - start_edge, along[1]]), jnp.stack([along[1], last - start_edge]))
    return start, end


@struct.dataclass
class LabyrinthState:
    grid: jax.Array  # (2R + 1, 2C + 1) int8 cell codes, START/GOAL marked: popgym's env.maze.grid
    position: jax.Array  # (row, col): popgym's env.position
    explored: jax.Array  # (2R + 1, 2C + 1) bool: popgym's env.explored
    time: jax.Array


class Labyrinth(PopGymEnvironment):
    """popgym/core/maze.py MazeEnv, shared by LabyrinthEscape and LabyrinthExplore.

    `maze_dims` (even) = (2R, 2C): a hunt-and-kill maze of R x C cells; the agent starts on the outer wall
    (`maze_entrances`). Actions: 0 left, 1 right, 2 up, 3 down; a move into a wall or off the grid stays put.
    Observation: one-hot(5) of the 9 cell codes of a 3 x 3 view, row by row (off-grid cells read as walls), then
    one-hot(5) of the action just taken, blocked or not (4 = none, at reset): 50 floats. popgym's quirks, kept: on
    row or column 0 its view starts at the edge rather than one before, so there the agent sits in the view's first
    row/column; it truncates when its step counter reaches `episode_length` - 1, so an episode has at most 1023 steps
    (`max_steps_in_episode`), while each step costs -1/`episode_length`."""

    obs_size, num_actions = 10 * NUM_CELL_CODES, 4
    marks_goal = False  # whether the end entrance becomes a GOAL cell

    def __init__(self, maze_dims: tuple[int, int] = (10, 10), episode_length: int = 1024):
        if maze_dims[0] % 2 or maze_dims[1] % 2 or min(maze_dims) < 6:
            raise ValueError(f"maze_dims must be even and at least 6, got {maze_dims}")
        self.maze_dims = tuple(maze_dims)
        self.max_episode_length = episode_length - 1
        self.step_reward = -1.0 / episode_length

    def reset_env(self, key, params):
        key_maze, key_entrances = jax.random.split(key)
        grid = hunt_and_kill_maze(key_maze, self.maze_dims[0] // 2, self.maze_dims[1] // 2)
        start, end = maze_entrances(key_entrances, *grid.shape)
        grid = grid.at[start[0], start[1]].set(START)
        if self.marks_goal:
            grid = grid.at[end[0], end[1]].set(GOAL)
        explored = jnp.zeros(grid.shape, bool).at[start[0], start[1]].set(True)
        state = LabyrinthState(grid=grid, position=start, explored=explored, time=jnp.int32(0))
        return self.observe_view(state, NO_ACTION), state

    def observe_view(self, state: LabyrinthState, action) -> jax.Array:
        last = jnp.array(state.grid.shape) - 1
        first = jnp.maximum(state.position - 1, 0)  # popgym: max(y - 1, 0), no centring at 0
        rows, cols = first[0] + jnp.arange(3), first[1] + jnp.arange(3)
        end = jnp.minimum(state.position + 1, last)  # the view's last row and column on the grid
        inside = (rows <= end[0])[:, None] & (cols <= end[1])[None, :]
        view = jnp.where(inside, state.grid[jnp.minimum(rows, last[0])][:, jnp.minimum(cols, last[1])], OBSTACLE)
        return jnp.concatenate([one_hot(view.ravel(), NUM_CELL_CODES).ravel(), one_hot(action, NUM_CELL_CODES)])

    def moved(self, state: LabyrinthState, action: jax.Array) -> LabyrinthState:
        target = jnp.clip(state.position + jnp.array(MOVES)[action], 0, jnp.array(state.grid.shape) - 1)
        position = jnp.where(state.grid[target[0], target[1]] == OBSTACLE, state.position, target)
        explored = state.explored.at[position[0], position[1]].set(True)
        return LabyrinthState(grid=state.grid, position=position, explored=explored, time=state.time + 1)


class LabyrinthEscape(Labyrinth):
    """popgym/envs/labyrinth_escape.py: reach the exit on the far side of the maze. Every step pays -1/1024; stepping
    onto the GOAL cell pays +1 more and terminates."""

    marks_goal = True

    def step_env(self, key, state, action, params):
        state = self.moved(state, action)
        escaped = state.grid[state.position[0], state.position[1]] == GOAL
        reward = (self.step_reward + jnp.where(escaped, 1.0, 0.0)).astype(jnp.float32)
        return self.observe_view(state, action), state, reward, escaped, {}


class LabyrinthExplore(Labyrinth):
    """popgym/envs/labyrinth_explore.py: visit every open cell of the maze. Stepping onto a cell not visited before
    pays 1/(number of FREE cells, the start excluded), so visiting them all earns 1; any other step pays -1/1024.
    Terminated once every non-wall cell has been visited. There is no goal: the far entrance stays a wall."""

    def step_env(self, key, state, action, params):
        moved = self.moved(state, action)
        new_cell = ~state.explored[moved.position[0], moved.position[1]]
        reward = jnp.where(new_cell, 1.0 / jnp.sum(moved.grid == FREE), self.step_reward).astype(jnp.float32)
        explored_all = jnp.all(moved.explored == (moved.grid != OBSTACLE))
        return self.observe_view(moved, action), moved, reward, explored_all, {}


# 9. Registry: popgym's families with their difficulty constants, and the aliases of earlier names ------------------
DIFFICULTIES = ("Easy", "Medium", "Hard")
FAMILIES: dict[str, tuple[type, dict[str, tuple]]] = {
    # family: (class, {constructor argument: its (Easy, Medium, Hard) values})
    "RepeatFirst": (RepeatFirst, dict(num_decks=(1, 8, 16))),
    "RepeatPrevious": (RepeatPrevious, dict(num_decks=(1, 2, 3), k=(4, 32, 64))),
    "Autoencode": (Autoencode, dict(num_decks=(1, 2, 3))),
    "CountRecall": (CountRecall, dict(num_decks=(1, 2, 4), deck_type=("colors", "suits", "ranks"))),
    "HigherLower": (HigherLower, dict(num_decks=(1, 2, 3))),
    "Concentration": (Concentration, dict(num_decks=(1, 2, 1), deck_type=("colors", "colors", "ranks"))),
    "MultiarmedBandit": (MultiarmedBandit, dict(num_bandits=(10, 20, 30), episode_length=(200, 400, 600))),
    "PositionOnlyCartPole": (PositionOnlyCartPole, dict(max_episode_length=(200, 400, 600))),
    "NoisyPositionOnlyCartPole": (PositionOnlyCartPole, dict(noise_sigma=(0.1, 0.2, 0.3))),  # T = 200 at every level
    "VelocityOnlyCartPole": (VelocityOnlyCartPole, dict(max_episode_length=(200, 400, 600))),
    "PositionOnlyPendulum": (PositionOnlyPendulum, dict(max_episode_length=(200, 150, 100))),
    "NoisyPositionOnlyPendulum": (PositionOnlyPendulum, dict(noise_sigma=(0.1, 0.2, 0.3))),  # T = 200 at every level
    "Battleship": (Battleship, dict(board_size=(8, 10, 12))),
    "MineSweeper": (MineSweeper, dict(dims=((4, 4), (6, 6), (8, 8)), num_mines=(2, 6, 10))),
    "LabyrinthEscape": (LabyrinthEscape, dict(maze_dims=((10, 10), (14, 14), (18, 18)))),
    "LabyrinthExplore": (LabyrinthExplore, dict(maze_dims=((10, 10), (14, 14), (18, 18)))),
}
FAMILY_ALIASES: dict[str, tuple[str, ...]] = {
    # family: its earlier names (popgym <= 1.0.3, the S5 paper, popjaxrl), short forms, popgym's gym-id spelling
    "PositionOnlyCartPole": ("StatelessCartPole", "CartPole"),
    "NoisyPositionOnlyCartPole": ("NoisyStatelessCartPole", "NoisyCartPole"),
    "VelocityOnlyCartPole": ("VelocityOnlyCartpole",),
    "PositionOnlyPendulum": ("StatelessPendulum", "Pendulum"),
    "NoisyPositionOnlyPendulum": ("NoisyStatelessPendulum", "NoisyPendulum"),
    "MultiarmedBandit": ("MultiArmedBandit",),
    "MineSweeper": ("Minesweeper",),
}
CANONICAL_IDS: tuple[str, ...] = tuple(family + level for family in FAMILIES for level in DIFFICULTIES)
ALIASES: dict[str, str] = {
    name + level: family + level for family, names in FAMILY_ALIASES.items() for name in names for level in DIFFICULTIES
}
ENV_IDS: tuple[str, ...] = CANONICAL_IDS + tuple(ALIASES)
# Outside popgym's registry (ENV_IDS stays popgym's): the paper's meta-CartPole under its own name and popjaxrl's.
META_CARTPOLE_IDS: tuple[str, ...] = ("MetaCartPole", "NoisyStatelessMetaCartPole")


def canonical_id(env_id: str) -> str:
    """The popgym 1.0.7 name of `env_id`; raises ValueError naming the closest valid ids."""
    if env_id in CANONICAL_IDS:
        return env_id
    if env_id in ALIASES:
        return ALIASES[env_id]
    if name := memory_chain_id(env_id):  # bsuite's MemoryChain, outside the POPGym registry
        return name
    if env_id in META_CARTPOLE_IDS:
        return META_CARTPOLE_IDS[0]
    raise unknown_id(env_id)


def unknown_id(env_id: str, external: bool = False) -> ValueError:
    """The error for an unknown id, naming the closest ids (gymnax's too with `external`: `make` takes them)."""
    gymnax_ids = tuple(gymnax.registered_envs) if external else ()
    close = difflib.get_close_matches(env_id, ENV_IDS + MEMORY_CHAIN_IDS + META_CARTPOLE_IDS + gymnax_ids, cutoff=0.5)
    more = f", MemoryChain, MetaCartPole, gymnax's {', '.join(gymnax_ids)}." if external else ""
    hint = f"did you mean {', '.join(close)}?" if close else f"valid ids: {', '.join(CANONICAL_IDS)}{more}"
    own = " An env of your own: package.module:Name (docs/environments.md)." if external else ""
    return ValueError(f"unknown env id {env_id!r}; {hint}{own}")


def make(env_id: str, **overrides) -> tuple[environment.Environment, environment.EnvParams]:
    """Build `env_id` and its default params. Ids resolve in this order: ours (POPGym's and their aliases,
    MemoryChain, MetaCartPole; ours win where gymnax has the same id: MemoryChain-bsuite is ours), then
    `package.module:Name` (a gymnax-API env of yours), then any id `gymnax.make` knows; the last two come as an
    `ExternalEnv`. `overrides` replace difficulty constants (constructor arguments such as `k` or `noise_sigma`) or
    fields of the env params."""
    try:
        env_id = canonical_id(env_id)
    except ValueError:
        if ":" in env_id or env_id in gymnax.registered_envs:
            return make_external(env_id, **overrides)
        raise unknown_id(env_id, external=True) from None
    if memory_chain_id(env_id):
        return make_memory_chain(env_id, **overrides)
    if env_id in META_CARTPOLE_IDS:
        env_class, kwargs = MetaCartPole, {}
    else:
        level = next(d for d in DIFFICULTIES if env_id.endswith(d))
        env_class, levels = FAMILIES[env_id[: -len(level)]]
        kwargs = {name: values[DIFFICULTIES.index(level)] for name, values in levels.items()}
    constructor_args = set(inspect.signature(env_class.__init__).parameters) - {"self"}
    kwargs.update({k: v for k, v in overrides.items() if k in constructor_args})
    env = env_class(**kwargs)
    params = env.default_params
    param_overrides = {k: v for k, v in overrides.items() if k not in constructor_args}
    unknown = set(param_overrides) - set(params.__dataclass_fields__)
    if unknown:
        valid = sorted(constructor_args | set(params.__dataclass_fields__))
        raise ValueError(f"{env_id} has no setting {', '.join(sorted(unknown))}; valid: {', '.join(valid)}")
    return env, params.replace(**param_overrides)


def attempt(what: str, function, *args):
    """`function(*args)`, any error of it (the user's code, an import) a one-line ValueError saying `what` failed."""
    try:
        return function(*args)
    except Exception as error:
        raise ValueError(f"{what} failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}") from error


def make_external(env_id: str, **overrides) -> tuple["ExternalEnv", Any]:
    """A gymnax id, or `package.module:Name` naming a gymnax-API env class (built without arguments) or a function
    returning `(env, params)`, as an `ExternalEnv` and its params; overrides replace fields of the params."""
    if ":" not in env_id:
        env, params = attempt(f"gymnax.make({env_id!r})", gymnax.make, env_id)
    else:
        module_name, _, name = env_id.partition(":")
        maker = getattr(attempt(f"{env_id}: importing {module_name}", importlib.import_module, module_name), name, None)
        if not callable(maker):
            raise ValueError(f"{env_id}: module {module_name} has no class or function {name!r}")
        made = attempt(f"{env_id}: calling {name}()", maker)
        if inspect.isclass(maker):
            env, params = made, getattr(made, "default_params", None)
        elif isinstance(made, tuple) and len(made) == 2:
            env, params = made
        else:
            raise ValueError(f"{env_id}: {name}() must return (env, params), got a {type(made).__name__}")
    env = ExternalEnv(env, params, env_id, overrides)
    return env, env.params


class ExternalEnv(environment.Environment):
    """Any gymnax-API env in this module's contract, so that `make_vec` and the scripts' wrappers take it: flat float32
    observations (a Box of any shape flattened, a `Discrete(n)` one-hot), a float32 reward, boolean flags; actions
    `Discrete(n)` or a flat `Box(k)`, reshaped to the env's action shape and clipped to its bounds before the env sees
    them (CleanRL's ClipAction; the policy's log-probability is of the unclipped sample). Truncation is the env's own
    `is_truncated` (gymnax's default: `state.time >= params.max_steps_in_episode`); an env without one never truncates.
    `step` is gymnax's, and a `VecEnv` of it equals `vmap` of it bit for bit. Construction checks the API and traces a
    reset and a step (nothing compiles): a bad env is a one-line ValueError, not a traceback from a compiled step."""

    API = ("reset_env", "step_env", "observation_space", "action_space")  # what gymnax's base class leaves undefined

    def __init__(self, env, params, env_id: str, overrides: dict | None = None):
        super().__init__()
        missing = [name for name in self.API if not callable(getattr(env, name, None))
                   or getattr(type(env), name, None) is getattr(environment.Environment, name)]  # fmt: skip
        if missing or params is None:
            missing = ", ".join(missing + ["default_params"] * (params is None))
            raise ValueError(f"{env_id}: {type(env).__name__} lacks gymnax's {missing} (docs/environments.md)")
        unknown = set(overrides or ()) - set(getattr(params, "__dataclass_fields__", ()))
        if unknown:
            valid = ", ".join(getattr(params, "__dataclass_fields__", ()))
            raise ValueError(f"{env_id} has no setting {', '.join(sorted(unknown))}; valid: {valid}")
        self.env, self.params, self.env_id = env, params.replace(**overrides) if overrides else params, env_id
        for kind in ("observation", "action"):  # kept: shapes and bounds are static under jit and vmap
            space = attempt(f"{env_id}: {kind}_space(params)", getattr(env, f"{kind}_space"), self.params)
            if not isinstance(space, (spaces.Box, spaces.Discrete)):
                raise ValueError(f"{env_id}: a {type(space).__name__} {kind} space; the scripts take Box or Discrete")
            setattr(self, f"inner_{kind}_space", space)
        self.check()

    @property
    def default_params(self):
        return self.params

    @staticmethod
    def flat_box(space: spaces.Box) -> spaces.Box:
        flat = lambda bound: np.broadcast_to(np.asarray(bound, np.float32), space.shape).reshape(-1)  # noqa: E731
        return spaces.Box(flat(space.low), flat(space.high), (math.prod(space.shape),), jnp.float32)

    def observation_space(self, params=None) -> spaces.Box:
        space = self.inner_observation_space
        if isinstance(space, spaces.Discrete):
            return spaces.Box(0.0, 1.0, (space.n,), jnp.float32)
        return self.flat_box(space)

    def action_space(self, params=None):
        space = self.inner_action_space
        return space if isinstance(space, spaces.Discrete) else self.flat_box(space)

    def flat_obs(self, obs) -> jax.Array:
        space = self.inner_observation_space
        if isinstance(space, spaces.Discrete):
            return one_hot(jnp.reshape(obs, ()), space.n)
        return jnp.reshape(obs, -1).astype(jnp.float32)

    def reset_env(self, key, params):
        obs, state = self.env.reset_env(key, params)
        return self.flat_obs(obs), state

    def step_env(self, key, state, action, params):
        if isinstance(space := self.inner_action_space, spaces.Box):
            action = jnp.clip(jnp.reshape(action, space.shape), space.low, space.high)
        obs, state, reward, terminated, info = self.env.step_env(key, state, action, params)
        reward, terminated = jnp.reshape(reward, ()).astype(jnp.float32), jnp.reshape(terminated, ()).astype(bool)
        return self.flat_obs(obs), state, reward, terminated, info

    def is_truncated(self, state, params) -> jax.Array:
        if getattr(self.env, "is_truncated", None) is None:
            return jnp.asarray(False)
        return jnp.reshape(self.env.is_truncated(state, params), ()).astype(bool)

    def check(self):
        space = self.action_space()
        action = np.zeros(space.shape, np.float32) if isinstance(space, spaces.Box) else np.int32(0)

        def reset_and_step(params):
            obs, state = self.reset_env(jax.random.key(0), params)
            next_obs, state, *_ = self.step_env(jax.random.key(1), state, action, params)
            return obs, next_obs, self.is_truncated(state, params)

        what = f"{self.env_id}: tracing reset_env, step_env and is_truncated"
        obs, next_obs, _ = attempt(what, jax.eval_shape, reset_and_step, self.params)
        size = self.observation_space().shape
        if obs.shape != size or next_obs.shape != size:
            raise ValueError(f"{self.env_id}: observations of {obs.shape[0]} values; observation_space says {size[0]}")


# 10. bsuite's MemoryChain (bsuite/environments/memory_chain.py) ----------------------------------------------------
# Ids: "MemoryChain" (alias: gymnax's "MemoryChain-bsuite") and "MemoryChain-{L}", which fixes L for scripts that take
# only an id. Kept out of the POPGym registry.
MEMORY_CHAIN_IDS: tuple[str, ...] = ("MemoryChain", "MemoryChain-bsuite")


@struct.dataclass
class MemoryChainParams:
    memory_length: Any = 5  # L; an int, or a traced int32 when vmapping over lengths

    @property
    def max_steps_in_episode(self):  # every episode lasts exactly L + 1 steps
        return self.memory_length + 1


@struct.dataclass
class MemoryChainState:
    context: jax.Array  # [num_bits] bits in {0, 1}
    query: jax.Array  # index of the bit asked for
    time: jax.Array  # number of step() calls so far


class MemoryChain(environment.Environment):
    """bsuite's memory chain: remember the context bit shown at the start for L steps.

    The observation at time t (t = 0 at reset) is `[1 - t/L, query if t == L - 1 else 0, 2 * context - 1 (+-1) if
    t == 0 else 0]`, `num_bits + 2` floats whatever L is, so L can be a traced param. As in bsuite, a step returns the
    observation of the time *before* it: the context is shown at reset and by the first step, the query by step L.
    Steps 1..L pay 0; step L + 1 pays +1 if the action is the bit `context[query]`, else -1, and terminates. No
    truncation (gymnax 1.0.1's port also ends episodes at `max_steps_in_episode`, default 1000, cutting L >= 1000)."""

    def __init__(self, num_bits: int = 1):
        super().__init__()
        if num_bits < 1:
            raise ValueError(f"num_bits must be >= 1, got {num_bits}")
        self.num_bits = num_bits

    @property
    def default_params(self) -> MemoryChainParams:
        return MemoryChainParams()

    def get_obs(self, state: MemoryChainState, params: MemoryChainParams, key=None) -> jax.Array:
        time_left = (params.memory_length - state.time) / params.memory_length  # 1 - t/L, one rounding
        query = jnp.where(state.time == params.memory_length - 1, state.query, 0)
        context = jnp.where(state.time == 0, 2 * state.context - 1, 0)
        return jnp.concatenate([jnp.stack([time_left, query]), context]).astype(jnp.float32)

    def reset_env(self, key, params):
        key_context, key_query = jax.random.split(key)
        context = jax.random.bernoulli(key_context, 0.5, (self.num_bits,)).astype(jnp.int32)
        state = MemoryChainState(context, query=jax.random.randint(key_query, (), 0, self.num_bits), time=jnp.int32(0))
        return self.get_obs(state, params), state

    def step_env(self, key, state, action, params):
        obs = self.get_obs(state, params)  # the pre-step observation, as bsuite returns it
        last = state.time >= params.memory_length
        correct = action == state.context[state.query]
        reward = jnp.where(last, jnp.where(correct, 1.0, -1.0), 0.0).astype(jnp.float32)
        return obs, state.replace(time=state.time + 1), reward, last, {}

    def is_truncated(self, state, params) -> jax.Array:
        return jnp.asarray(False)

    @property
    def num_actions(self) -> int:
        return 2

    def action_space(self, params=None) -> spaces.Discrete:
        return spaces.Discrete(2)

    def observation_space(self, params) -> spaces.Box:
        return spaces.Box(-1.0, max(1.0, self.num_bits - 1.0), (self.num_bits + 2,), jnp.float32)


def memory_chain_id(env_id: str) -> str | None:
    """"MemoryChain" or "MemoryChain-{L}" for a MemoryChain id, None for any other id."""
    if env_id in MEMORY_CHAIN_IDS:
        return "MemoryChain"
    name, _, length = env_id.partition("-")
    return f"MemoryChain-{int(length)}" if name == "MemoryChain" and length.isdigit() else None


def make_memory_chain(env_id: str, **overrides) -> tuple[MemoryChain, MemoryChainParams]:
    """`make` for the MemoryChain ids; overrides: `memory_length` (default 5) and `num_bits` (1)."""
    name = memory_chain_id(env_id)
    if name is None:
        raise ValueError(f"not a MemoryChain id: {env_id!r}")
    unknown = set(overrides) - {"memory_length", "num_bits"}
    if unknown:
        raise ValueError(f"{name} has no setting {', '.join(sorted(unknown))}; valid: memory_length, num_bits")
    if name != "MemoryChain":
        if "memory_length" in overrides:
            raise ValueError(f"{env_id!r} already sets the memory length; use 'MemoryChain' with memory_length=")
        overrides["memory_length"] = int(name.split("-")[1])
    length = overrides.get("memory_length", 1)
    if isinstance(length, (int, np.integer)) and length < 1:
        raise ValueError(f"memory_length must be >= 1, got {length}")
    env = MemoryChain(num_bits=overrides.pop("num_bits", 1))
    return env, env.default_params.replace(**overrides)


# 11. Multi-environment meta-RL (Lu et al. 2023, section 5.3; used by ppo_s5_metarl.py) -----------------------------
# Continuous-control envs from gymnax, brax and the DM Control suite (MuJoCo Playground) behind random projections of
# their observations and actions, in trials of several episodes (MetaEnv; docs/ppo_s5_metarl.md).
@struct.dataclass
class MetaEnvSpec:
    """One env of the meta-RL pool: `reward_scale`, a rough, fixed size of its per-step reward (rewards are divided by
    `reward_scale * episode_length`, so a typical episode return is O(1) whatever the env and episode length);
    `episode_length`, the default inner-episode time limit; `backend`, the brax backend of an env that supports only
    one; `params`, overrides of gymnax env params; `env`, the gymnax env of a variant id; `goal_angles`, a variant's
    range of PointRobot goal angles (radians; gymnax draws them in [0, pi]), for held-out goals; `fixed_projection`,
    a variant seen without random projections (the identity embedded in the agent's sizes: only its task is hidden)."""

    reward_scale: float = struct.field(pytree_node=False)
    episode_length: int = struct.field(pytree_node=False)
    backend: str | None = struct.field(pytree_node=False, default=None)
    params: dict | None = struct.field(pytree_node=False, default=None)
    env: str | None = struct.field(pytree_node=False, default=None)
    goal_angles: tuple[float, float] | None = struct.field(pytree_node=False, default=None)
    fixed_projection: bool = struct.field(pytree_node=False, default=False)


META_ENVS: dict[str, MetaEnvSpec] = {
    # gymnax 1.0.1's Box-action envs (10-300x cheaper than brax on CPU). Per-step rewards: Pendulum's cost lies in
    # [-16.3, 0]; MountainCarContinuous pays -0.1 a^2 per step and +100 at the goal (scaled: 0.5 at 200 steps);
    # PointRobot (dense: its sparse reward is out of a random policy's reach behind projections) pays minus the
    # distance to its hidden goal, in [-2, 0]; Reacher and Swimmer pay in [0, 1].
    "gymnax/Pendulum-v1": MetaEnvSpec(16.3, 100),
    "gymnax/MountainCarContinuous-v0": MetaEnvSpec(1.0, 200),
    "gymnax/PointRobot-misc": MetaEnvSpec(1.0, 100, params={"dense_reward": True}),
    "gymnax/Reacher-misc": MetaEnvSpec(1.0, 100),
    "gymnax/Swimmer-misc": MetaEnvSpec(1.0, 100),
    # brax 0.14 (per-step reward ~ healthy bonus + forward speed - control cost).
    "brax/inverted_pendulum": MetaEnvSpec(1.0, 200),
    "brax/inverted_double_pendulum": MetaEnvSpec(10.0, 200),
    "brax/reacher": MetaEnvSpec(1.0, 100),
    "brax/pusher": MetaEnvSpec(1.0, 200),
    "brax/hopper": MetaEnvSpec(3.0, 200),
    "brax/walker2d": MetaEnvSpec(3.0, 200),
    "brax/halfcheetah": MetaEnvSpec(5.0, 200),
    "brax/ant": MetaEnvSpec(3.0, 200),
    "brax/humanoid": MetaEnvSpec(5.0, 200),
    "brax/swimmer": MetaEnvSpec(0.3, 200, backend="generalized"),  # brax supports no other backend
    # The DM Control suite on MJX (MuJoCo Playground 0.2.0, its registered names): rewards in [0, 1] per control step
    # (ctrl_dt 0.01-0.04 s, several physics steps). DM Control's episodes are 1,000 steps, ours 200 (4-8 s simulated),
    # 400 for the envs with a 0.01 s control step (acrobot, cartpole, cheetah).
    **{
        f"dmc/{name}": MetaEnvSpec(1.0, 400 if name.startswith(("Acrobot", "Cartpole", "Cheetah")) else 200)
        for name in """AcrobotSwingup AcrobotSwingupSparse BallInCup CartpoleBalance CartpoleBalanceSparse
        CartpoleSwingup CartpoleSwingupSparse CheetahRun FingerSpin FingerTurnEasy FingerTurnHard FishSwim HopperHop
        HopperStand HumanoidStand HumanoidWalk HumanoidRun PendulumSwingup PointMass ReacherEasy ReacherHard
        SwimmerSwimmer6 WalkerRun WalkerStand WalkerWalk""".split()
    },
    # PointRobot with its goals split into two arcs of the semicircle: train on one, hold out the other (unseen goals).
    # Listed last: an env's evaluation keys fold in its index here, so earlier ids keep theirs.
    "gymnax/PointRobot-misc-train-goals": MetaEnvSpec(1.0, 100, params={"dense_reward": True}, env="PointRobot-misc",
                                                      goal_angles=(0.0, 0.75 * math.pi)),
    "gymnax/PointRobot-misc-heldout-goals": MetaEnvSpec(1.0, 100, params={"dense_reward": True}, env="PointRobot-misc",
                                                        goal_angles=(0.75 * math.pi, math.pi)),
    # The semicircle task of Dorfman et al. 2021 / Ni et al. 2022 as meta-RL papers run it: start at the centre, no
    # projections, and no teleport on reaching the goal (gymnax moves the agent to a random start within
    # goal_radius of the goal; -1 turns that off), so the only unknown is the goal, which only the reward reveals:
    # an agent that found it in episode 1 can walk straight to it (10 steps of max_force 0.1) in the next episodes.
    **{
        f"gymnax/PointRobot-semicircle-{split}-goals": MetaEnvSpec(
            1.0, 100, params={"dense_reward": True, "center_init": True, "goal_radius": -1.0}, env="PointRobot-misc",
            goal_angles=angles, fixed_projection=True)
        for split, angles in (("train", (0.0, 0.75 * math.pi)), ("heldout", (0.75 * math.pi, math.pi)))
    },
}
META_ENV_IDS: tuple[str, ...] = tuple(META_ENVS)
BRAX_BACKENDS = ("spring", "positional", "generalized", "mjx")


def meta_env_id(env_id: str) -> str:
    """`gymnax/Pendulum-v1` / `brax/hopper` / `dmc/PointMass`; plain names (`hopper`, `PointMass`) resolve. Raises
    ValueError naming the closest valid ids."""
    if env_id in META_ENVS:
        return env_id
    matches = [i for i in META_ENV_IDS if i.split("/", 1)[1] == env_id]
    if len(matches) == 1:
        return matches[0]
    close = difflib.get_close_matches(env_id, META_ENV_IDS + tuple(i.split("/", 1)[1] for i in META_ENV_IDS), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"valid ids: {', '.join(META_ENV_IDS)}"
    raise ValueError(f"unknown meta-RL env id {env_id!r}; {hint}")


def check_meta_env_sets(train_ids, heldout_ids) -> tuple[list[str], list[str]]:
    """Canonical train and held-out ids; ValueError if an id is unknown, repeated, or in both sets."""
    train, heldout = [meta_env_id(i) for i in train_ids], [meta_env_id(i) for i in heldout_ids]
    if not train:
        raise ValueError("the training set is empty")
    for name, ids in (("training", train), ("held-out", heldout)):
        if len(set(ids)) != len(ids):
            raise ValueError(f"the {name} set names an env twice: {', '.join(ids)}")
    overlap = sorted(set(train) & set(heldout))
    if overlap:
        raise ValueError(f"held-out envs must not be trained on; in both sets: {', '.join(overlap)}")
    return train, heldout


class GymnaxInnerEnv:
    """A gymnax env without auto-reset or time limit: `reset(key) -> (obs, state)`,
    `step(key, state, action) -> (obs, state, reward, terminated)`."""

    def __init__(self, name: str, episode_length: int, params: dict | None = None, goal_angles=None):
        import gymnax

        self.goal_angles = goal_angles
        self.env, default_params = gymnax.make(name)  # PointRobot shows time / limit: set the limit
        self.params = default_params.replace(max_steps_in_episode=episode_length, **(params or {}))
        space = self.env.action_space(self.params)
        self.obs_size = math.prod(self.env.observation_space(self.params).shape)
        self.action_size = math.prod(space.shape)
        self.low = np.broadcast_to(np.asarray(space.low, np.float32), (self.action_size,))
        self.high = np.broadcast_to(np.asarray(space.high, np.float32), (self.action_size,))

    def reset(self, key):
        if self.goal_angles:  # PointRobot: the goal redrawn on the arc of these angles (its obs does not show it)
            key, key_goal = jax.random.split(key)
        obs, state = self.env.reset_env(key, self.params)
        if self.goal_angles:
            angle = jax.random.uniform(key_goal, (), jnp.float32, *self.goal_angles)
            state = state.replace(goal=self.params.circle_radius * jnp.stack([jnp.cos(angle), jnp.sin(angle)]))
        return jnp.reshape(obs, (-1,)).astype(jnp.float32), state

    def step(self, key, state, action):
        obs, state, reward, terminated, _ = self.env.step_env(key, state, action, self.params)
        obs = jnp.reshape(obs, (-1,)).astype(jnp.float32)
        return obs, state, jnp.reshape(reward, ()).astype(jnp.float32), jnp.reshape(terminated, ()).astype(bool)


class BraxInnerEnv:
    """A brax env (no auto-reset, no time limit) with GymnaxInnerEnv's interface; actions in [-1, 1]."""

    def __init__(self, name: str, backend: str):
        from brax import envs as brax_envs  # imported here: brax (and MuJoCo) load slowly

        self.env = brax_envs.get_environment(name, backend=backend)
        self.obs_size, self.action_size = self.env.observation_size, self.env.action_size
        self.low, self.high = -np.ones(self.action_size, np.float32), np.ones(self.action_size, np.float32)

    @staticmethod
    def _typed(state):  # some envs return Python floats: make the pytrees of reset and step alike
        return state.replace(reward=jnp.asarray(state.reward, jnp.float32), done=jnp.asarray(state.done, jnp.float32))

    def reset(self, key):
        state = self._typed(self.env.reset(key))
        return state.obs, state

    def step(self, key, state, action):
        state = self._typed(self.env.step(state, action))
        return state.obs, state, state.reward, state.done > 0.5


class PlaygroundInnerEnv(BraxInnerEnv):
    """A MuJoCo Playground DM Control env, as BraxInnerEnv (its State has brax's obs/reward/done): MJX's pure-JAX
    `impl` (Playground's default, warp, is NVIDIA-only), flat observations, actions in [-1, 1]. Its `done` only flags
    NaN physics; its own episode_length/action_repeat belong to its training wrappers, which are not used."""

    def __init__(self, name: str):
        try:  # imported here: slow (~5 s), and an optional install (requirements-dmc.txt)
            from mujoco_playground import dm_control_suite
        except ImportError:
            raise ValueError(f"dmc/{name} needs the DM Control extra: pip install -r requirements-dmc.txt") from None

        self.env = dm_control_suite.load(name, config_overrides={"impl": "jax"})
        # jitted, so that tracing MJX (seconds) happens once per env: observation_size's eval_shape and every later
        # trace of reset/step (under vmap, jit or scan too) reuse the cached jaxpr; XLA inlines the nested jit.
        self.env.reset, self.env.step = jax.jit(self.env.reset), jax.jit(self.env.step)
        self.obs_size, self.action_size = self.env.observation_size, self.env.action_size
        self.low, self.high = -np.ones(self.action_size, np.float32), np.ones(self.action_size, np.float32)


@struct.dataclass
class MetaEnvState:
    env_state: Any
    w_obs: jax.Array  # [obs_size, env obs size]: agent obs = w_obs @ env obs
    w_act: jax.Array  # [env action size, action_size]: env action = clip(mid + w_act @ a, low, high)
    prev_action: jax.Array  # the agent's (clipped) action of the previous step; 0 at a trial start
    prev_reward: jax.Array  # the previous step's reward / reward_scale (O(1) per step); 0 at a trial start
    first: jax.Array  # 1.0 on the first observation of every episode of the trial
    episode: jax.Array  # index of the current episode within the trial, 0-based
    time: jax.Array  # steps taken in the current episode
    episode_return: jax.Array  # scaled return of the current episode so far
    start_obs: jax.Array  # the env's first observation of the trial (unprojected) ...
    start_env_state: Any  # ... and its state: every episode restarts here when fixed_reset


class MetaEnv:
    """One env of the pool behind random projections, in trials of `episodes_per_trial` episodes (docs: ppo_s5_metarl).
    Agent observation: `[W_obs @ o, previous action (clipped to [-1, 1]), previous reward / reward_scale, first]`;
    action and reward are 0 at a trial start and carry over between its episodes (RL^2's inputs); `first` = 1 on the
    first step of every episode. Drawn at every trial start: `W_obs[i, j] ~ N(0, 1 / env_obs_size)`, `W_act[k, j] ~
    N(0, 1 / action_size) * (high_k - low_k) / 2`; the env gets `clip((low + high) / 2 + W_act @ clip(a, -1, 1), low,
    high)`. An episode ends when the env terminates or after `episode_length` steps; with `fixed_reset` each episode
    of a trial restarts from the trial's first env state (its reset randomness, e.g. PointRobot's goal, is the task),
    else from a fresh reset. `done` is True only at a trial's end (all the memory sees), with the next trial's state.
    `reset(key) -> (obs, state)`; `step(key, state, action) -> (obs, state, reward, done, info)`: the reward divided by
    `reward_scale * episode_length`; info: `episode_done`, `episode_return` (scaled, valid where episode_done),
    `episode_index` (in the trial), `raw_reward`. Pure: jit- and vmap-able."""

    def __init__(self, env_id: str, obs_size: int = 16, action_size: int = 2, episodes_per_trial: int = 4,
                 episode_length: int | None = None, brax_backend: str = "spring",
                 fixed_reset: bool = True):  # fmt: skip
        self.env_id, self.fixed_reset = meta_env_id(env_id), fixed_reset
        spec = META_ENVS[self.env_id]
        self.fixed_projection = spec.fixed_projection
        if brax_backend not in BRAX_BACKENDS:
            raise ValueError(f"unknown brax backend {brax_backend!r}; valid: {', '.join(BRAX_BACKENDS)}")
        sizes = dict(obs_size=obs_size, action_size=action_size, episodes_per_trial=episodes_per_trial)
        for name, value in {**sizes, "episode_length": episode_length or 1}.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.obs_size, self.action_size, self.episodes_per_trial = obs_size, action_size, episodes_per_trial
        self.episode_length = episode_length or spec.episode_length
        self.reward_scale, self.reward_divisor = spec.reward_scale, spec.reward_scale * self.episode_length
        family, name = self.env_id.split("/", 1)
        if family == "gymnax":
            self.env = GymnaxInnerEnv(spec.env or name, self.episode_length, spec.params, spec.goal_angles)
        elif family == "dmc":
            self.env = PlaygroundInnerEnv(name)
        else:
            self.env = BraxInnerEnv(name, spec.backend or brax_backend)
        self.mid = jnp.asarray((self.env.low + self.env.high) / 2)
        self.half = jnp.asarray((self.env.high - self.env.low) / 2)
        if self.fixed_projection and (obs_size < self.env.obs_size or action_size != self.env.action_size):
            raise ValueError(f"{self.env_id} is seen without projections: it needs obs_size >= {self.env.obs_size} "
                             f"and action_size = {self.env.action_size}, got {obs_size} and {action_size}")

    @property
    def agent_obs_size(self) -> int:
        return self.obs_size + self.action_size + 2

    def sample_projections(self, key):
        if self.fixed_projection:  # the env's own observation and action, zero-padded to the agent's sizes
            w_obs, w_act = jnp.eye(self.obs_size, self.env.obs_size), jnp.eye(self.env.action_size, self.action_size)
            return w_obs, w_act * self.half[:, None]
        key_obs, key_act = jax.random.split(key)
        w_obs = jax.random.normal(key_obs, (self.obs_size, self.env.obs_size)) / math.sqrt(self.env.obs_size)
        w_act = jax.random.normal(key_act, (self.env.action_size, self.action_size)) / math.sqrt(self.action_size)
        return w_obs, w_act * self.half[:, None]

    def observe(self, env_obs, state: MetaEnvState) -> jax.Array:
        return jnp.concatenate([state.w_obs @ env_obs, state.prev_action, state.prev_reward[None], state.first[None]])

    def new_trial(self, key) -> tuple[jax.Array, MetaEnvState]:
        """The env's first observation (unprojected) and the state of a fresh trial."""
        key_proj, key_env = jax.random.split(key)
        w_obs, w_act = self.sample_projections(key_proj)
        env_obs, env_state = self.env.reset(key_env)
        zero, one, no_action = jnp.float32(0.0), jnp.float32(1.0), jnp.zeros(self.action_size)
        state = MetaEnvState(
            env_state, w_obs, w_act, no_action, zero, one, jnp.int32(0), jnp.int32(0), zero, env_obs, env_state
        )
        return env_obs, state

    def reset(self, key):
        env_obs, state = self.new_trial(key)
        return self.observe(env_obs, state), state

    def env_action(self, state: MetaEnvState, action: jax.Array) -> jax.Array:
        return jnp.clip(self.mid + state.w_act @ jnp.clip(action, -1.0, 1.0), self.env.low, self.env.high)

    @partial(jax.jit, static_argnames=("self",))  # jitted: eager calls would compile its loops at every call
    def step(self, key, state: MetaEnvState, action: jax.Array):  # under vmap: a reset only if some env needs one
        out = self.step_batch(*jax.tree.map(lambda x: jnp.expand_dims(x, 0), (key, state, action)), reset_chunk=1)
        return jax.tree.map(lambda x: x[0], out)

    def step_batch(self, keys, states: MetaEnvState, actions: jax.Array, reset_chunk: int | None = None):
        """`step` of `[N]` envs, drawing a new trial (`reset_where`) only where a trial (without fixed_reset: an
        episode) ended, with the env's own `key_reset`: the values of a reset drawn for all and selected."""
        key_reset, need_reset, trial, reward, info = jax.vmap(self.step_without_reset)(keys, states, actions)
        done, env_obs, states = reset_where(need_reset, key_reset, self.with_new_trial, trial, reset_chunk)
        return jax.vmap(self.observe)(env_obs, states), states, reward, done, info

    def step_without_reset(self, key, state: MetaEnvState, action: jax.Array):
        """`(key_reset, need_reset, (trial_done, env_obs, state), reward, info)`: `step` but for the new trial."""
        key_step, key_reset = jax.random.split(key)
        action = jnp.clip(action, -1.0, 1.0)
        env_action = self.env_action(state, action)
        env_obs, env_state, raw_reward, terminated = self.env.step(key_step, state.env_state, env_action)
        reward = raw_reward / self.reward_divisor
        time = state.time + 1
        episode_done = terminated | (time >= self.episode_length)
        trial_done = episode_done & (state.episode + 1 >= self.episodes_per_trial)
        episode_return = state.episode_return + reward
        info = dict(
            episode_done=episode_done, episode_return=episode_return, episode_index=state.episode, raw_reward=raw_reward
        )
        restart = episode_done & self.fixed_reset  # from the trial's first state; else (no fixed_reset) a fresh one
        state = state.replace(
            env_state=tree_select(restart, state.start_env_state, env_state),
            prev_action=action.astype(jnp.float32),
            prev_reward=raw_reward / self.reward_scale,
            first=episode_done.astype(jnp.float32),
            episode=state.episode + episode_done.astype(jnp.int32),
            time=jnp.where(episode_done, 0, time),
            episode_return=jnp.where(episode_done, 0.0, episode_return),
        )
        env_obs = jnp.where(restart, state.start_obs, env_obs)
        return key_reset, trial_done | (episode_done & ~restart), (trial_done, env_obs, state), reward, info

    def with_new_trial(self, key, trial):  # one reset serves both: a new trial, or a new episode's env state
        trial_done, _, state = trial
        fresh_obs, fresh = self.new_trial(key)
        return trial_done, fresh_obs, tree_select(trial_done, fresh, state.replace(env_state=fresh.env_state))


class MetaEnvPool:
    """`num_envs` parallel slots split evenly over `envs` (slot i holds `envs[i // (num_envs // len(envs))]`): state
    pytrees differ per env, so each group is vmapped on its own and the groups are concatenated along the batch axis.
    `reset(key) -> (obs[N, D], states)`, `step(key, states, actions[N, A]) -> (obs, states, reward[N], done[N], info)`;
    `states` is a tuple with one batched MetaEnvState per env."""

    def __init__(self, envs: list[MetaEnv], num_envs: int):
        if num_envs % len(envs):
            raise ValueError(f"num_envs {num_envs} must be divisible by the number of envs {len(envs)} (equal slots)")
        if len({(e.agent_obs_size, e.action_size) for e in envs}) != 1:
            raise ValueError("all envs of a pool need the same obs_size and action_size")
        self.envs, self.num_envs, self.per_env = envs, num_envs, num_envs // len(envs)
        self.agent_obs_size, self.action_size = envs[0].agent_obs_size, envs[0].action_size

    def groups(self, x):
        return [x[g * self.per_env : (g + 1) * self.per_env] for g in range(len(self.envs))]

    def reset(self, key):
        out = [jax.vmap(env.reset)(k) for env, k in zip(self.envs, self.groups(jax.random.split(key, self.num_envs)))]
        return jnp.concatenate([o for o, _ in out]), tuple(s for _, s in out)

    def step(self, key, states, actions):
        keys = self.groups(jax.random.split(key, self.num_envs))
        out = [env.step_batch(k, s, a) for env, k, s, a in zip(self.envs, keys, states, self.groups(actions))]
        obs, states, reward, done, info = zip(*out)
        concat = lambda *xs: jnp.concatenate(xs)  # noqa: E731
        return concat(*obs), tuple(states), concat(*reward), concat(*done), jax.tree.map(concat, *info)
