"""Battleship, MineSweeper, LabyrinthEscape and LabyrinthExplore against popgym 1.0.7, the oracle.

Differential tests copy the hidden layout of a seeded popgym env (ships, mines, maze and position)
into our state, play the same actions in both (grid games: popgym's (row, col) = divmod(our flat
action, C)) and require, step by step, the same encoded observation, rewards within 1e-6 and the
same steps of termination and truncation. Action sequences are random and adversarial (repeats,
mines, wins, walls, the last step). Oracles score 1.0 where a perfect policy exists and the worst
policies reach popgym's lower bounds. Reset distributions (ships, mines, mazes with their
entrances) are compared with popgym's own samples by tests shown to fail on plausible wrong
samplers. The Labyrinth tests need mazelib (`pip install mazelib`, popgym's `navigation` extra).
"""

import collections
import copy
import functools
import random
import warnings

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import popgym.envs
import pytest
from scipy import stats
from test_envs_basic import fast_jit

import envs_popjax as E

pytestmark = pytest.mark.timeout(300)

LEVELS = ("Easy", "Medium", "Hard")
KEY = jax.random.PRNGKey(0)
BATCH = 32  # episodes per jitted rollout call (padded), so each env compiles its rollout once


# ---------------------------------------------------------------------------------------------
# Helpers: our env, popgym's env, encodings, layout copies, batched rollouts.
# ---------------------------------------------------------------------------------------------
@functools.cache
def ours(env_id):
    return E.make(env_id)


def popgym_env(env_id):
    if env_id.startswith("Labyrinth"):
        pytest.importorskip("mazelib")  # a guard only: CI installs it
    with warnings.catch_warnings():  # popgym warns that MLPs solve its mazes
        warnings.simplefilter("ignore", DeprecationWarning)
        return getattr(popgym.envs, env_id)()


def encode(observations: list, space) -> np.ndarray:
    """DESIGN.md's encoding of a list of popgym observations: [step, one-hot features]."""
    if isinstance(space, gymnasium.spaces.Discrete):
        return np.eye(space.n, dtype=np.float32)[np.array(observations)]
    observations = np.array(observations).reshape(len(observations), len(space.nvec))
    return np.concatenate([np.eye(n, dtype=np.float32)[observations[:, i]] for i, n in enumerate(space.nvec)], 1)


def copied_state(env, pop):
    """Our state holding the hidden layout and progress of popgym env `pop`."""
    if isinstance(env, E.Battleship):
        return E.BattleshipState(
            board=pop.board == 1, guesses=pop.guesses == 1, hits=np.int32(pop.hits), time=np.int32(pop.num_steps)
        )
    if isinstance(env, E.MineSweeper):
        return E.MineSweeperState(
            mines=pop.hidden_grid == 1, viewed=pop.hidden_grid == 2, exploded=np.bool_(False), time=np.int32(pop.timestep)
        )
    return E.LabyrinthState(
        grid=pop.maze.grid.astype(np.int8),
        position=np.array(pop.position, np.int32),
        explored=pop.explored == 1,
        time=np.int32(pop.curr_step),
    )


def popgym_action(env, action: int):
    if isinstance(env, E.Battleship):
        return np.array(divmod(action, env.board_size))
    if isinstance(env, E.MineSweeper):
        return np.array(divmod(action, env.dims[1]))
    return int(action)


@functools.cache
def rollout_fn(env_id, path="make"):
    """jit(vmap) over episodes: (states, actions [T]) -> per step (obs, reward, terminated, truncated)
    exactly as env.step reports them, without the auto-reset (tested on its own below). With
    `path="make_vec"` the same through a `make_vec` env of BATCH envs (obs: `final_observation`)."""
    env, params = ours(env_id)

    def play(state, actions):
        def step(state, action):
            obs, state, reward, terminated, _ = env.step_env(KEY, state, action, params)
            return state, (obs, reward, terminated, env.is_truncated(state, params))

        return jax.lax.scan(step, state, actions)[1]

    def play_batch(states, actions):
        vec_env, _ = E.make_vec(env_id, BATCH)

        def step(states, actions):
            _, states, reward, terminated, truncated, info = vec_env.step(KEY, states, actions, params)
            return states, (info["final_observation"], reward, terminated, truncated)

        return [jnp.swapaxes(x, 0, 1) for x in jax.lax.scan(step, states, actions.T)[1]]

    return fast_jit(jax.vmap(play) if path == "make" else play_batch)


def run_ours(env_id, states: list, actions: list[np.ndarray], path="make"):
    """Our rollouts of several episodes, as numpy arrays [episode, step, ...]."""
    horizon = ours(env_id)[1].max_steps_in_episode
    padded = np.zeros((-(-len(actions) // BATCH) * BATCH, horizon), np.int32)
    for i, a in enumerate(actions):
        padded[i, : min(len(a), horizon)] = a[:horizon]
    states = states + [states[0]] * (len(padded) - len(states))
    stacked = jax.tree.map(lambda *leaves: np.stack(leaves), *states)
    rollout = rollout_fn(env_id, path)
    outputs = [rollout(jax.tree.map(lambda x: x[i : i + BATCH], stacked), padded[i : i + BATCH])
               for i in range(0, len(padded), BATCH)]
    return [np.concatenate(parts)[: len(actions)] for parts in zip(*outputs)]


def play_popgym(pop, env, actions):
    """Steps popgym until it is done: lists of (obs, reward, terminated, truncated)."""
    steps = []
    for a in actions:
        steps.append(pop.step(popgym_action(env, int(a)))[:4])
        if steps[-1][2] or steps[-1][3]:
            break
    return steps


Episode = collections.namedtuple("Episode", "ret length terminated truncated")


def compare_with_popgym(env_id, policies, seeds=(0, 1, 2), path="make"):
    """For every seed and policy(pop, rng) -> flat actions: play popgym and ours (through `make` or
    `make_vec`) from the same layout and require identical episodes. Returns {policy name:
    [popgym's Episode for each seed]}."""
    env, params = ours(env_id)
    pop = popgym_env(env_id)
    episodes, states, action_lists = [], [], []
    reset_obs = None if hasattr(env, "observe_view") else own_resets(env_id)[0][0]
    for seed in seeds:
        for policy in policies:
            obs0, _ = pop.reset(seed=seed)
            state = copied_state(env, pop)
            if reset_obs is None:  # labyrinths: the reset obs depends on the maze
                np.testing.assert_array_equal(env.observe_view(state, E.NO_ACTION), encode([obs0], pop.observation_space)[0])
            else:
                np.testing.assert_array_equal(reset_obs, encode([obs0], pop.observation_space)[0])
            actions = np.asarray(policy(pop, np.random.default_rng(seed)), np.int32)
            states.append(state)
            action_lists.append(actions)
            episodes.append((policy.__name__, seed, play_popgym(pop, env, actions)))
    obs, rewards, terminated, truncated = run_ours(env_id, states, action_lists, path)
    results = {}
    for i, (name, seed, steps) in enumerate(episodes):
        where = f"{env_id} {name} seed {seed}"
        assert steps[-1][2] or steps[-1][3], f"{where}: the action sequence ended before popgym's episode"
        p_obs, p_rewards, p_terminated, p_truncated = zip(*steps)
        n = len(steps)
        np.testing.assert_array_equal(obs[i, :n], encode(p_obs, pop.observation_space), err_msg=where)
        np.testing.assert_allclose(rewards[i, :n], p_rewards, rtol=0, atol=1e-6, err_msg=where)
        np.testing.assert_array_equal(terminated[i, :n], p_terminated, err_msg=where)
        np.testing.assert_array_equal(truncated[i, :n], p_truncated, err_msg=where)
        results.setdefault(name, []).append(Episode(sum(s[1] for s in steps), len(steps), *steps[-1][2:]))
    return results


def returns_of(results, name):
    return [episode.ret for episode in results[name]]


@functools.cache
def own_resets(env_id):
    """(observations, states) of many resets of our env, as numpy arrays (one jit per env)."""
    env, params = ours(env_id)
    keys = jax.random.split(jax.random.PRNGKey(7), 4000 if env_id.startswith("Labyrinth") else 20000)
    return jax.tree.map(np.asarray, jax.jit(jax.vmap(lambda k: env.reset_env(k, params)))(keys))


def unstack(batch, n):
    return [jax.tree.map(lambda x: x[i], batch) for i in range(n)]


def max_abs_z(freq_a, n_a, freq_b, n_b) -> float:
    """Largest |z| of the two-proportion tests comparing per-cell frequencies."""
    pooled = (freq_a * n_a + freq_b * n_b) / (n_a + n_b)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    return float(np.max(np.abs(freq_a - freq_b)[se > 0] / se[se > 0], initial=0.0))


# ---------------------------------------------------------------------------------------------
# Spaces and the registry.
# ---------------------------------------------------------------------------------------------
GRID_FAMILIES = ("Battleship", "MineSweeper")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("family", GRID_FAMILIES)
def test_spaces_match_popgym(family, level):
    env, params = ours(family + level)
    pop = popgym_env(family + level)
    rows, cols = pop.action_space.nvec
    assert env.action_space(params).n == rows * cols == env.num_actions
    obs_size = pop.observation_space.n  # Discrete(n) -> one-hot n
    assert env.observation_space(params).shape == (obs_size,)
    obs = own_resets(family + level)[0]
    assert obs.shape[1:] == (obs_size,) and obs.dtype == np.float32
    assert params.max_steps_in_episode == pop.max_episode_length


def test_difficulty_constants_and_aliases():
    for level, board in zip(LEVELS, (8, 10, 12)):
        assert ours("Battleship" + level)[0].board_size == board
    for level, dims, mines in zip(LEVELS, ((4, 4), (6, 6), (8, 8)), (2, 6, 10)):
        env, params = E.make("Minesweeper" + level)  # the popjaxrl spelling resolves to the same env
        assert (env.dims, env.num_mines, params.max_steps_in_episode) == (dims, mines, dims[0] * dims[1] - mines)
        assert "MineSweeper" + level in E.ENV_IDS


def test_flat_action_is_row_major():
    env, params = ours("MineSweeperEasy")
    mines = np.zeros((4, 4), bool)
    mines[0, 3] = mines[1, 3] = True  # cell (0, 3) is a mine, cell (3, 0) is not
    state = E.MineSweeperState(mines, np.zeros_like(mines), np.bool_(False), np.int32(0))
    _, rewards, terminated, _ = run_ours("MineSweeperEasy", [state, state], [[0 * 4 + 3], [3 * 4 + 0]])
    assert terminated[0, 0] and rewards[0, 0] < -0.5  # (row 0, col 3) is the mine
    assert not terminated[1, 0] and rewards[1, 0] > 0


# ---------------------------------------------------------------------------------------------
# Battleship: step-by-step equality with popgym, oracle and worst case.
# ---------------------------------------------------------------------------------------------
def ship_cells(pop, rng):
    return rng.permutation(np.flatnonzero(pop.board))


def sea_cells(pop, rng):
    return rng.permutation(np.flatnonzero(pop.board == 0))


def random_shots(pop, rng):
    return rng.integers(pop.board.size, size=pop.board.size)


def few_cells_many_repeats(pop, rng):
    cells = np.concatenate([ship_cells(pop, rng)[:2], sea_cells(pop, rng)[:2]])
    return rng.choice(cells, size=pop.board.size)


def repeat_one_hit(pop, rng):
    return np.repeat(ship_cells(pop, rng)[:1], pop.board.size)


def sweep_every_cell(pop, rng):
    return rng.permutation(pop.board.size)


def all_ships(pop, rng):  # the oracle: 12 hits in 12 steps
    return ship_cells(pop, rng)


def never_hit(pop, rng):  # the worst case: B^2 misses
    return np.repeat(sea_cells(pop, rng)[:1], pop.board.size)


def last_shot_sinks(pop, rng):  # 11 hits, every sea cell, then the 12th hit on step B^2
    ships = ship_cells(pop, rng)
    return np.concatenate([ships[:-1], sea_cells(pop, rng), ships[-1:]])


BATTLESHIP_POLICIES = (
    random_shots,
    few_cells_many_repeats,
    repeat_one_hit,
    sweep_every_cell,
    all_ships,
    never_hit,
    last_shot_sinks,
)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("path", ["make", "make_vec"])
def test_battleship_matches_popgym_step_by_step(level, path):
    results = compare_with_popgym("Battleship" + level, BATTLESHIP_POLICIES, path=path)
    b2 = ours("Battleship" + level)[0].board_size ** 2
    np.testing.assert_allclose(returns_of(results, "all_ships"), 1.0, atol=1e-9)
    np.testing.assert_allclose(returns_of(results, "never_hit"), -b2 / (b2 - 12), atol=1e-9)
    assert all(e.terminated and e.truncated and e.length == b2 for e in results["last_shot_sinks"])


@pytest.mark.parametrize("level", LEVELS)
def test_battleship_oracle_and_worst_case_on_our_boards(level):
    env_id = "Battleship" + level
    env, _ = ours(env_id)
    states = unstack(own_resets(env_id)[1], 2 * BATCH)
    sea = [np.flatnonzero(~s.board)[0] for s in states]
    actions = [np.flatnonzero(s.board) for s in states[:BATCH]] + [np.full(env.num_actions, c) for c in sea[BATCH:]]
    _, rewards, terminated, truncated = run_ours(env_id, states, actions)
    b2 = env.num_actions
    # the oracle: terminated (not truncated) on step 12 with return 1.0
    assert terminated[:BATCH, 11].all() and not truncated[:BATCH, 11].any() and not terminated[:BATCH, :11].any()
    np.testing.assert_allclose(rewards[:BATCH, :12].sum(1, dtype=np.float64), 1.0, atol=1e-6)
    # never hitting: truncated (not terminated) on step B^2 with return -B^2 / (B^2 - 12)
    assert truncated[BATCH:, -1].all() and not terminated[BATCH:].any() and not truncated[BATCH:, :-1].any()
    np.testing.assert_allclose(rewards[BATCH:].sum(1, dtype=np.float64), -b2 / (b2 - 12), atol=1e-5)


def test_battleship_auto_reset_through_env_step():
    env, params = ours("BattleshipEasy")
    _, state = env.reset(KEY, params)
    for a in np.flatnonzero(np.asarray(state.board)):
        obs, state, reward, terminated, truncated, info = env.step(KEY, state, int(a), params)
    assert terminated and not truncated
    np.testing.assert_array_equal(info["final_observation"], [0.0, 1.0])  # the 12th hit
    np.testing.assert_array_equal(obs, [1.0, 0.0])  # the next episode's reset obs
    assert int(state.time) == 0 and int(state.hits) == 0 and not np.asarray(state.guesses).any()


# ---------------------------------------------------------------------------------------------
# MineSweeper: step-by-step equality with popgym, oracle and worst case.
# ---------------------------------------------------------------------------------------------
def clear_cells(pop, rng):
    return rng.permutation(np.flatnonzero(pop.hidden_grid.ravel() == 0))


def mine_cells(pop, rng):
    return rng.permutation(np.flatnonzero(pop.hidden_grid.ravel() == 1))


def random_clicks(pop, rng):
    return rng.integers(pop.hidden_grid.size, size=pop.max_episode_length)


def clear_cells_with_repeats(pop, rng):  # never a mine: wins by chance or is truncated at L
    return rng.choice(clear_cells(pop, rng), size=pop.max_episode_length)


def crowded_cells(pop, rng):  # cells with the most mines around them, repeats included
    counts = pop.neighbor_grid.ravel()
    return rng.choice(np.argsort(-counts, kind="stable")[:5], size=pop.max_episode_length)


def mine_first(pop, rng):
    return mine_cells(pop, rng)[:1]


def clear_all(pop, rng):  # the oracle: L new cells, terminated on step L
    return clear_cells(pop, rng)


def one_cell_repeats_then_mine(pop, rng):  # the worst case: 1/L - 0.5 - 0.5 - 1/L = -1
    cell = clear_cells(pop, rng)[:1]
    return np.concatenate([np.repeat(cell, pop.max_episode_length - 1), mine_cells(pop, rng)[:1]])


def one_cell_forever(pop, rng):  # truncated on step L
    return np.repeat(clear_cells(pop, rng)[:1], pop.max_episode_length)


def mine_on_step_L(pop, rng):  # L - 1 new cells then a mine: terminated, not truncated, on step L
    return np.concatenate([clear_cells(pop, rng)[:-1], mine_cells(pop, rng)[:1]])


MINESWEEPER_POLICIES = (
    random_clicks,
    clear_cells_with_repeats,
    crowded_cells,
    mine_first,
    clear_all,
    one_cell_repeats_then_mine,
    one_cell_forever,
    mine_on_step_L,
)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("path", ["make", "make_vec"])
def test_minesweeper_matches_popgym_step_by_step(level, path):
    results = compare_with_popgym("MineSweeper" + level, MINESWEEPER_POLICIES, seeds=(0, 1, 2, 3), path=path)
    np.testing.assert_allclose(returns_of(results, "clear_all"), 1.0, atol=1e-9)
    np.testing.assert_allclose(returns_of(results, "one_cell_repeats_then_mine"), -1.0, atol=1e-9)
    length = ours("MineSweeper" + level)[1].max_steps_in_episode
    assert all(e.truncated and not e.terminated and e.length == length for e in results["one_cell_forever"])
    assert all(e.terminated and not e.truncated and e.length == length for e in results["mine_on_step_L"])


@pytest.mark.parametrize("level", LEVELS)
def test_minesweeper_oracle_and_worst_case_on_our_boards(level):
    env_id = "MineSweeper" + level
    env, params = ours(env_id)
    length = params.max_steps_in_episode
    states = unstack(own_resets(env_id)[1], 2 * BATCH)
    clear = [np.flatnonzero(~s.mines) for s in states]
    mine = [np.flatnonzero(s.mines)[0] for s in states]
    actions = [c for c in clear[:BATCH]] + [
        np.r_[np.repeat(c[:1], length - 1), m] for c, m in zip(clear[BATCH:], mine[BATCH:])
    ]
    _, rewards, terminated, truncated = run_ours(env_id, states, actions)
    # both end on step L, terminated and not truncated, with returns 1.0 and -1.0
    assert terminated[:, length - 1].all() and not truncated.any() and not terminated[:, : length - 1].any()
    np.testing.assert_allclose(rewards[:BATCH].sum(1, dtype=np.float64), 1.0, atol=1e-5)
    np.testing.assert_allclose(rewards[BATCH:].sum(1, dtype=np.float64), -1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Named regressions: the popjaxrl/popjym bugs of reference section 3 for these families.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level, values", [("Easy", 3), ("Medium", 7), ("Hard", 10)])
def test_regression_minesweeper_one_hot_has_min_mines_plus_one_10_values(level, values):
    """popjaxrl: a one-hot of length num_mines (2/6/10); a count equal to num_mines became all zeros."""
    env, params = ours("MineSweeper" + level)
    assert env.observation_space(params).shape == (values,)
    around = min(env.num_mines, 9)  # as many mines as fit in the 3 x 3 block around cell (1, 1)
    mines = np.zeros(env.dims, bool)
    mines[:3, :3] = (np.arange(9) < around).reshape(3, 3)
    mines[-1, -1] = env.num_mines > around  # Hard's 10th mine, far away
    assert mines.sum() == env.num_mines
    state = E.MineSweeperState(mines, np.zeros_like(mines), np.bool_(False), np.int32(0))
    obs = run_ours("MineSweeper" + level, [state], [[1 * env.dims[1] + 1]])[0]
    np.testing.assert_array_equal(obs[0, 0], np.eye(values)[around])  # counts 2 / 6 / 9, never all-zero


@pytest.mark.parametrize("level", LEVELS)
def test_regression_minesweeper_clearing_every_cell_terminates(level):
    """popjaxrl: the win test `all(grid == 2)` never fired (mines are never 2)."""
    env_id = "MineSweeper" + level
    pop = popgym_env(env_id)
    pop.reset(seed=11)
    state = copied_state(ours(env_id)[0], pop)
    _, rewards, terminated, truncated = run_ours(env_id, [state], [clear_cells(pop, np.random.default_rng(0))])
    length = ours(env_id)[1].max_steps_in_episode
    assert terminated[0, length - 1] and not truncated[0, length - 1] and not terminated[0, : length - 1].any()


@pytest.mark.parametrize("level", LEVELS)
def test_regression_minesweeper_episode_ends_on_step_L_not_L_plus_1(level):
    """popjaxrl and paper-era popgym allowed L + 1 steps; popgym 1.0.7 (fix #38) truncates at L."""
    env_id = "MineSweeper" + level
    env, params = ours(env_id)
    pop = popgym_env(env_id)
    pop.reset(seed=5)
    _, _, terminated, truncated = run_ours(env_id, [copied_state(env, pop)], [one_cell_forever(pop, np.random.default_rng(0))])
    length = params.max_steps_in_episode
    assert length == env.dims[0] * env.dims[1] - env.num_mines
    assert np.flatnonzero(truncated[0]).tolist()[:1] == [length - 1] and not terminated[0].any()


@pytest.mark.parametrize("level", LEVELS)
def test_regression_minesweeper_perfect_play_scores_exactly_one(level):
    """popjaxrl: perfect play scored 1 - 0.5/(L - 2) (0.9583 Easy) because of the extra step."""
    env_id = "MineSweeper" + level
    pop = popgym_env(env_id)
    pop.reset(seed=3)
    _, rewards, terminated, _ = run_ours(env_id, [copied_state(ours(env_id)[0], pop)], [clear_cells(pop, np.random.default_rng(1))])
    end = np.flatnonzero(terminated[0])[0]
    assert abs(rewards[0, : end + 1].sum(dtype=np.float64) - 1.0) < 1e-5


@pytest.mark.parametrize("level", LEVELS)
def test_regression_battleship_obs_is_one_hot_hit_flag_and_done_is_split(level):
    """popjaxrl: a Box((1,)) hit observation and one `done` for termination and truncation."""
    env_id = "Battleship" + level
    env, params = ours(env_id)
    assert env.observation_space(params).shape == (2,)
    pop = popgym_env(env_id)
    pop.reset(seed=4)
    state = copied_state(env, pop)
    rng = np.random.default_rng(0)
    obs, _, terminated, truncated = run_ours(env_id, [state, state], [all_ships(pop, rng), never_hit(pop, rng)])
    np.testing.assert_array_equal(obs[0, :12], np.tile([0.0, 1.0], (12, 1)))
    assert terminated[0, 11] and not truncated[0, 11]  # won: terminated, not truncated
    assert truncated[1, -1] and not terminated[1, -1]  # out of time: truncated, not terminated
    np.testing.assert_array_equal(obs[1], np.tile([1.0, 0.0], (env.num_actions, 1)))


# ---------------------------------------------------------------------------------------------
# Reset distributions against popgym's own samples.
# ---------------------------------------------------------------------------------------------
def popgym_layouts(env_id, n, attribute):
    pop = popgym_env(env_id)
    pop.reset(seed=2024)
    layouts = []
    for _ in range(n):
        pop.reset()
        layouts.append(np.array(getattr(pop, attribute)))
    return np.stack(layouts)


def clipped_ship_boards(board_size, n, rng):
    """A plausible wrong sampler: a random start and direction, moved back onto the board when the
    ship sticks out (instead of redrawn), redrawn only on overlap. Edge cells get too many ships."""
    boards = np.zeros((n, board_size, board_size), bool)
    for board in boards:
        for size in (2, 3, 3, 4):
            while True:
                start, axis = rng.integers(board_size, size=2), rng.integers(2)
                start[axis] = min(start[axis], board_size - size)
                cells = tuple(start[k] + (np.arange(size) if k == axis else 0) for k in range(2))
                if not board[cells].any():
                    board[cells] = True
                    break
    return boards


@pytest.mark.parametrize("level", LEVELS)
def test_battleship_ship_occupancy_matches_popgym(level):
    env_id = "Battleship" + level
    board_size = ours(env_id)[0].board_size
    our_boards = own_resets(env_id)[1].board
    popgym_boards = popgym_layouts(env_id, 3000, "board") == 1
    assert (our_boards.sum((1, 2)) == 12).all()
    z = max_abs_z(our_boards.mean(0), len(our_boards), popgym_boards.mean(0), len(popgym_boards))
    assert z < 4.5, f"per-cell ship occupancy differs from popgym's: max |z| = {z:.1f}"
    # Orientation, which per-cell marginals of a square board barely see: side-by-side ship cells.
    def horizontal_pairs(boards):
        return (boards[:, :, 1:] & boards[:, :, :-1]).sum((1, 2))

    assert stats.ks_2samp(horizontal_pairs(our_boards), horizontal_pairs(popgym_boards)).pvalue > 1e-3
    # The same check rejects a sampler that is wrong only near the edges.
    wrong = clipped_ship_boards(board_size, 3000, np.random.default_rng(0))
    assert max_abs_z(wrong.mean(0), len(wrong), popgym_boards.mean(0), len(popgym_boards)) > 6


@pytest.mark.parametrize("level", LEVELS)
def test_minesweeper_mine_positions_match_popgym(level):
    env_id = "MineSweeper" + level
    env, _ = ours(env_id)
    our_mines = own_resets(env_id)[1].mines
    popgym_mines = popgym_layouts(env_id, 3000, "hidden_grid") == 1
    assert (our_mines.sum((1, 2)) == env.num_mines).all()
    # every cell holds a mine with probability mines / cells
    rate = env.num_mines / env.num_actions
    z = np.abs(our_mines.mean(0) - rate) / np.sqrt(rate * (1 - rate) / len(our_mines))
    assert z.max() < 4.5, f"mine frequencies are not uniform: max |z| = {z.max():.1f}"
    assert max_abs_z(our_mines.mean(0), len(our_mines), popgym_mines.mean(0), len(popgym_mines)) < 4.5
    # What the agent sees: the mines around a cell of a k-cell block are hypergeometric
    # (k draws from the R * C cells, `mines` of them mined), at a corner, an edge and inside.
    rows, cols = env.dims
    for (row, col), block in [((0, 0), 4), ((0, cols // 2), 6), ((rows // 2, cols // 2), 9)]:
        expected = stats.hypergeom(env.num_actions, env.num_mines, block).pmf(np.arange(block + 1))
        for mines in (our_mines, popgym_mines):
            counts = mines[:, max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2].sum((1, 2))
            observed = np.bincount(counts, minlength=block + 1)
            keep = expected * len(mines) > 5  # pool the rare counts into one bin
            observed = np.r_[observed[keep], observed[~keep].sum()]
            expected_counts = np.r_[expected[keep], expected[~keep].sum()] * len(mines)
            p_value = stats.chisquare(observed[expected_counts > 0], expected_counts[expected_counts > 0]).pvalue
            assert p_value > 1e-3, (row, col, observed, expected_counts)


# ---------------------------------------------------------------------------------------------
# Labyrinths: spaces, step-by-step equality with popgym, oracles, popgym's horizon and view.
# ---------------------------------------------------------------------------------------------
MAZE_FAMILIES = ("LabyrinthEscape", "LabyrinthExplore")
UP, DOWN, LEFT, RIGHT = 2, 3, 0, 1


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("family", MAZE_FAMILIES)
def test_labyrinth_spaces_match_popgym(family, level):
    env, params = ours(family + level)
    pop = popgym_env(family + level)
    assert env.action_space(params).n == pop.action_space.n == 4
    obs_size = int(pop.observation_space.nvec.sum())  # MultiDiscrete([5] * 9 + [5]) -> 50
    assert env.observation_space(params).shape == (obs_size,) == own_resets(family + level)[0].shape[1:]
    assert params.max_steps_in_episode == pop.max_episode_length - 1 == 1023  # popgym stops at step 1023
    pop.reset(seed=0)
    assert env.maze_dims == tuple(2 * d for d in pop.maze_dims) and pop.maze.grid.shape == own_resets(family + level)[1].grid.shape[1:]


def passable(grid, cell) -> bool:
    return 0 <= cell[0] < grid.shape[0] and 0 <= cell[1] < grid.shape[1] and grid[cell] != E.OBSTACLE


def shortest_path(grid, start, goal) -> list[int]:
    """Actions of a shortest walk from start to goal (breadth-first search)."""
    previous = {tuple(start): None}
    queue = collections.deque([tuple(start)])
    while queue:
        cell = queue.popleft()
        for action, (dr, dc) in enumerate(E.MOVES):
            nxt = (cell[0] + dr, cell[1] + dc)
            if passable(grid, nxt) and nxt not in previous:
                previous[nxt] = (cell, action)
                queue.append(nxt)
    actions, cell = [], tuple(goal)
    while previous[cell] is not None:
        cell, action = previous[cell]
        actions.append(action)
    return actions[::-1]


def depth_first_tour(grid, start) -> list[int]:
    """Actions of a depth-first walk from start that reaches every non-wall cell, backtracking
    along the way, and stops on the last new cell."""
    to_visit = int((grid != E.OBSTACLE).sum())
    seen, path, actions = {tuple(start)}, [tuple(start)], []
    while len(seen) < to_visit and path:
        cell = path[-1]
        for action, (dr, dc) in enumerate(E.MOVES):
            nxt = (cell[0] + dr, cell[1] + dc)
            if passable(grid, nxt) and nxt not in seen:
                seen.add(nxt)
                path.append(nxt)
                actions.append(action)
                break
        else:  # a dead end: step back
            path.pop()
            if path:
                back = (path[-1][0] - cell[0], path[-1][1] - cell[1])
                actions.append(E.MOVES.index(back))
    return actions


def outward(pop) -> int:
    """The move from the start entrance off the grid: always blocked."""
    row, col = pop.position
    height, width = pop.maze.grid.shape
    return UP if row == 0 else DOWN if row == height - 1 else LEFT if col == 0 else RIGHT


def random_moves(pop, rng):
    return rng.integers(4, size=1023)


def bump_into_the_edge(pop, rng):  # truncated on step 1023, never moving; the view from the edge
    return np.full(1023, outward(pop))


def to_the_goal(pop, rng):  # LabyrinthEscape's oracle
    return shortest_path(pop.maze.grid, pop.position, pop.maze.end)


def tour(pop, rng):  # LabyrinthExplore's oracle
    return depth_first_tour(pop.maze.grid, pop.position)


def oracle(pop, rng):
    return to_the_goal(pop, rng) if isinstance(pop, popgym.envs.LabyrinthEscape) else tour(pop, rng)


def wander_then_oracle(pop, rng):  # 200 random moves, then the oracle from wherever that led
    wander = rng.integers(4, size=200)
    clone = copy.deepcopy(pop)
    for a in wander:
        clone.step(int(a))
    return np.r_[wander, oracle(clone, rng)]


def oracle_on_the_last_step(pop, rng):  # wait at the edge, then finish on step 1023: terminated and truncated
    finish = oracle(pop, rng)
    return np.r_[np.full(1023 - len(finish), outward(pop)), finish]


def oracle_one_step_too_late(pop, rng):  # truncated on step 1023, one step short
    finish = oracle(pop, rng)
    return np.r_[np.full(1024 - len(finish), outward(pop)), finish]


LABYRINTH_POLICIES = (
    random_moves,
    bump_into_the_edge,
    oracle,
    wander_then_oracle,
    oracle_on_the_last_step,
    oracle_one_step_too_late,
)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("family", MAZE_FAMILIES)
@pytest.mark.parametrize("path", ["make", "make_vec"])
def test_labyrinth_matches_popgym_step_by_step(family, level, path):
    pop = popgym_env(family + level)
    first_seed = {}  # the first seed whose start lies on each side (the view differs on rows/columns 0)
    for seed in range(100):
        pop.reset(seed=seed)
        first_seed.setdefault(outward(pop), seed)
        if len(first_seed) == 4:
            break
    assert len(first_seed) == 4
    seeds = tuple(sorted(first_seed.values())) + (100,)
    results = compare_with_popgym(family + level, LABYRINTH_POLICIES, seeds, path=path)
    step = 1 / 1024
    # the lowest return: 1023 steps (not 1024) of -1/1024
    np.testing.assert_allclose(returns_of(results, "bump_into_the_edge"), -1023 * step, atol=1e-9)
    assert all(e.truncated and not e.terminated and e.length == 1023 for e in results["bump_into_the_edge"])
    assert all(e.terminated and e.truncated and e.length == 1023 for e in results["oracle_on_the_last_step"])
    assert all(e.truncated and not e.terminated and e.length == 1023 for e in results["oracle_one_step_too_late"])
    assert all(e.terminated for e in results["wander_then_oracle"])
    for seed, ret in zip(seeds, returns_of(results, "oracle")):
        pop.reset(seed=seed)
        if family == "LabyrinthEscape":  # every step costs 1/1024, the goal pays 1
            assert abs(ret - (1 - len(to_the_goal(pop, None)) * step)) < 1e-9
        else:  # 1 for the new cells, 1/1024 for each step back
            revisits = len(tour(pop, None)) - int((pop.maze.grid == E.FREE).sum())
            assert abs(ret - (1 - revisits * step)) < 1e-9


def test_labyrinth_view_on_row_or_column_0_is_popgyms_uncentred_view():
    """popgym quirk (core/maze.py local_view): at row 0 the 3 x 3 view holds rows 0, 1 and a row of
    walls, with the agent in its top row; at column 0 likewise. Elsewhere the agent is centred."""
    env, _ = ours("LabyrinthEscapeEasy")
    pop = popgym_env("LabyrinthEscapeEasy")
    for seed in range(100):
        obs0, _ = pop.reset(seed=seed)
        if outward(pop) == UP:
            break
    view = np.asarray(env.observe_view(copied_state(env, pop), E.NO_ACTION))[:45].reshape(3, 3, 5).argmax(-1)
    row, col = pop.position
    np.testing.assert_array_equal(view, np.reshape(obs0[:9], (3, 3)))
    np.testing.assert_array_equal(view[:2], pop.maze.grid[0:2, col - 1 : col + 2])
    assert view[0, 1] == E.START and (view[2] == E.OBSTACLE).all()


def test_labyrinth_auto_reset_through_env_step():
    env, params = ours("LabyrinthExploreEasy")
    params = params.replace(max_steps_in_episode=3)
    obs, state = env.reset(KEY, params)
    for t in range(3):
        obs, state, reward, terminated, truncated, info = env.step(jax.random.PRNGKey(t), state, UP, params)
    assert truncated and not terminated and int(state.time) == 0 and np.asarray(state.explored).sum() == 1
    assert np.asarray(info["final_observation"])[45 + UP] == 1 and obs[45 + E.NO_ACTION] == 1


# ---------------------------------------------------------------------------------------------
# Maze distribution: our generator against popgym's (mazelib's HuntAndKill + its entrances).
# ---------------------------------------------------------------------------------------------
def popgym_mazes(env_id, n):
    """n of popgym's reset grids (START/GOAL marked) and start positions."""
    pop = popgym_env(env_id)
    pop.reset(seed=2024)  # seeds python's `random`, which mazelib draws from
    grids, starts = [], []
    for _ in range(n):
        pop.reset()
        grids.append(pop.maze.grid.copy())
        starts.append(pop.position)
    return np.stack(grids), np.array(starts)


def mazelib_backtracker_mazes(cells, n, seed):
    """A plausible wrong generator: mazelib's recursive backtracker, with popgym's entrances."""
    from mazelib import Maze
    from mazelib.generate.BacktrackingGenerator import BacktrackingGenerator

    random.seed(seed)
    np.random.seed(seed)
    grids, starts = [], []
    for _ in range(n):
        maze = Maze()
        maze.generator = BacktrackingGenerator(cells, cells)
        maze.generate()
        maze.generate_entrances(start_outer=True)
        maze.grid[maze.start], maze.grid[maze.end] = E.START, E.GOAL
        grids.append(maze.grid)
        starts.append(maze.start)
    return np.stack(grids), np.array(starts)


def maze_statistics(grids, starts):
    """Per grid cell: how often it is open; per maze: dead ends, and the start-to-goal distance."""
    is_open = grids != E.OBSTACLE
    n = len(grids)

    def neighbours(mask):
        out = np.zeros(mask.shape, int)
        out[:, 1:] += mask[:, :-1]
        out[:, :-1] += mask[:, 1:]
        out[:, :, 1:] += mask[:, :, :-1]
        out[:, :, :-1] += mask[:, :, 1:]
        return out

    dead_ends = ((neighbours(is_open) == 1) & is_open)[:, 1::2, 1::2].sum((1, 2))
    # breadth-first search from every start at once
    distance = np.full(grids.shape, -1)
    front = np.zeros(grids.shape, bool)
    front[np.arange(n), starts[:, 0], starts[:, 1]] = True
    steps = 0
    while front.any():
        distance[front] = steps
        front = (neighbours(front) > 0) & is_open & (distance < 0)
        steps += 1
    return {
        "open": is_open.mean(0),
        "n": n,
        "dead_ends": dead_ends,
        "path_length": distance[grids == E.GOAL],
        "unreached": int(((distance < 0) & is_open).sum()),
    }


def maze_differences(a, b) -> list[str]:
    """The checks on which two samples of maze statistics disagree (none: consistent)."""
    problems = []
    z = max_abs_z(a["open"], a["n"], b["open"], b["n"])
    if z > 4.5:
        problems.append(f"per-cell open frequency: max |z| = {z:.1f}")
    for name in ("dead_ends", "path_length"):
        p_value = stats.ks_2samp(a[name], b[name]).pvalue
        if p_value < 1e-3:
            problems.append(f"{name}: KS p = {p_value:.1e} (means {a[name].mean():.2f} vs {b[name].mean():.2f})")
    return problems


@functools.cache
def popgym_maze_statistics(level):
    return maze_statistics(*popgym_mazes("LabyrinthEscape" + level, 1500))


@pytest.mark.parametrize("level", LEVELS)
def test_maze_distribution_matches_popgym(level):
    _, states = own_resets("LabyrinthEscape" + level)
    ours_ = maze_statistics(states.grid, states.position)
    theirs = popgym_maze_statistics(level)
    assert ours_["unreached"] == theirs["unreached"] == 0  # perfect mazes: every open cell reachable
    assert (ours_["path_length"] > 0).all() and len(ours_["path_length"]) == ours_["n"]  # one goal each
    assert maze_differences(ours_, theirs) == []


def test_maze_distribution_check_rejects_a_different_generator():
    """The check above is not vacuous: it tells mazelib's recursive backtracker, whose mazes look
    much alike, from popgym's hunt-and-kill at the same sample size."""
    pytest.importorskip("mazelib")
    wrong = maze_statistics(*mazelib_backtracker_mazes(9, 1500, seed=0))
    assert maze_differences(wrong, popgym_maze_statistics("Hard")) != []


@pytest.mark.parametrize("level", LEVELS)
def test_mazes_are_spanning_trees_with_entrances_on_opposite_sides(level):
    for states in (own_resets("LabyrinthEscape" + level)[1], own_resets("LabyrinthExplore" + level)[1]):
        cells = (states.grid.shape[1] // 2) ** 2
        # 2 * cells - 1 open squares: the cells and the cells - 1 passages of a tree, plus START (and GOAL)
        extra = 1 + (states.grid == E.GOAL).sum((1, 2))
        np.testing.assert_array_equal((states.grid != E.OBSTACLE).sum((1, 2)), 2 * cells - 1 + extra)
        start, size = states.position, states.grid.shape[1]
        on_edge = (start == 0) | (start == size - 1)
        assert (on_edge.sum(1) == 1).all() and (start % 2 == 1).sum(1).min() == 1  # odd, on one edge
    escape, explore = own_resets("LabyrinthEscape" + level)[1], own_resets("LabyrinthExplore" + level)[1]
    goal = escape.grid == E.GOAL
    np.testing.assert_array_equal(goal.sum((1, 2)), 1)
    goal_cell = np.argwhere(goal)[:, 1:]
    np.testing.assert_array_equal(np.abs(goal_cell - escape.position).max(1), size - 1)  # the far side
    # Explore draws the same maze from the same key and leaves the far entrance a wall
    np.testing.assert_array_equal(np.where(goal, E.OBSTACLE, escape.grid), explore.grid)
    np.testing.assert_array_equal(escape.position, explore.position)


@pytest.mark.parametrize("level", LEVELS)
def test_labyrinth_escape_oracle_on_our_mazes(level):
    env_id = "LabyrinthEscape" + level
    states = unstack(own_resets(env_id)[1], BATCH)
    paths = [shortest_path(s.grid, s.position, np.argwhere(s.grid == E.GOAL)[0]) for s in states]
    _, rewards, terminated, truncated = run_ours(env_id, states, paths)
    for i, path in enumerate(paths):
        assert terminated[i, len(path) - 1] and not (terminated | truncated)[i, : len(path) - 1].any()
        assert not truncated[i, len(path) - 1]
        assert abs(rewards[i, : len(path)].sum(dtype=np.float64) - (1 - len(path) / 1024)) < 1e-5
