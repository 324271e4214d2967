"""Any gymnax id and any gymnax-API env by import path (envs_popjax.make / make_vec, ppo_s5_popgym.py and
ppo_lstm_popgym.py): how ids resolve, VecEnv over such an env against gymnax's own auto-reset step, a discrete and a
continuous gymnax env and a custom env training through each script, and the one-line refusals of bad input.

The custom envs are defined here, so that the scripts import them as `tests.test_env_ids:Name` (the repository root
is the scripts' folder). RememberBit is the env docs/environments.md shows, word for word (tested below)."""

import dataclasses
import glob
import importlib
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from gymnax.environments import environment, spaces

import envs_popjax as ep

pytestmark = pytest.mark.timeout(900)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = "tests.test_env_ids"  # this module's import path from the repository root
SCRIPTS = {  # script module: its tiny settings
    "ppo_s5_popgym": dict(num_envs=4, num_steps=8, update_epochs=1, num_minibatches=2, d_model=16, ssm_size=8,
                          n_layers=1),
    "ppo_lstm_popgym": dict(num_envs=4, num_steps=8, update_epochs=1, num_minibatches=2, hidden_size=16),
}  # fmt: skip


# docs/environments.md, "Use your own environment" (its imports are this module's) -----------------------------------
@struct.dataclass
class EnvState(environment.EnvState):  # gymnax's EnvState holds `time`, which the time limit reads
    bit: jax.Array


@struct.dataclass
class EnvParams(environment.EnvParams):
    length: int = 8  # steps per episode: the answer is due at the last one
    max_steps_in_episode: int = 1000  # gymnax's time limit (truncation), never reached here


class RememberBit(environment.Environment):
    """A random bit, shown at the first step only; the last step pays +1 for naming it, -1 otherwise."""

    @property
    def default_params(self) -> EnvParams:
        return EnvParams()

    def observation_space(self, params) -> spaces.Box:  # [the bit as -1 or +1 at the first step, 1 at the last]
        return spaces.Box(-1.0, 1.0, (2,), jnp.float32)

    def action_space(self, params=None) -> spaces.Discrete:
        return spaces.Discrete(2)

    def get_obs(self, state: EnvState, params: EnvParams, key=None) -> jax.Array:
        shown = jnp.where(state.time == 0, 2.0 * state.bit - 1.0, 0.0)
        return jnp.stack([shown, (state.time == params.length - 1).astype(jnp.float32)])

    def reset_env(self, key, params):
        state = EnvState(time=jnp.int32(0), bit=jax.random.bernoulli(key).astype(jnp.int32))
        return self.get_obs(state, params), state

    def step_env(self, key, state, action, params):
        last = state.time == params.length - 1
        reward = jnp.where(last, jnp.where(action == state.bit, 1.0, -1.0), 0.0)
        state = state.replace(time=state.time + 1)
        return self.get_obs(state, params), state, reward, last, {}
# end of the documented env ------------------------------------------------------------------------------------------


def remember_bit_3():  # the function form of an import path: (env, params)
    return RememberBit(), EnvParams(length=3)


class GridRememberBit(RememberBit):
    """RememberBit with a 2 x 3 image observation and a Box action of shape (2, 1) (its first value > 0 names 1), and
    no `is_truncated` of gymnax's (a duck-typed env: it never truncates)."""

    is_truncated = None

    def observation_space(self, params):
        return spaces.Box(-1.0, 1.0, (2, 3), jnp.float32)

    def action_space(self, params=None):
        return spaces.Box(-1.0, 1.0, (2, 1), jnp.float32)

    def get_obs(self, state, params, key=None):
        return jnp.tile(super().get_obs(state, params)[:, None], (1, 3))

    def step_env(self, key, state, action, params):
        return super().step_env(key, state, (action[0, 0] > 0).astype(jnp.int32), params)


class WithoutStep(environment.Environment):  # lacks step_env and action_space
    def reset_env(self, key, params):
        return jnp.zeros(2), environment.EnvState(time=0)

    def observation_space(self, params):
        return spaces.Box(0.0, 1.0, (2,), jnp.float32)


class DictObservation(RememberBit):
    def observation_space(self, params):
        return spaces.Dict({"bit": spaces.Box(-1.0, 1.0, (2,), jnp.float32)})


@struct.dataclass
class TimelessState:
    bit: jax.Array


class TimelessRememberBit(RememberBit):  # gymnax's is_truncated reads `state.time`, which this state lacks
    def reset_env(self, key, params):
        return jnp.zeros(2), TimelessState(bit=jnp.int32(0))

    def step_env(self, key, state, action, params):
        return jnp.zeros(2), state, 0.0, False, {}


class WrongObservationSize(RememberBit):
    def observation_space(self, params):
        return spaces.Box(-1.0, 1.0, (3,), jnp.float32)


def not_a_pair():
    return RememberBit()


class NeedsArguments(RememberBit):
    def __init__(self, length: int):
        super().__init__()


# Ids -----------------------------------------------------------------------------------------------------------------
def test_the_documented_env_is_the_one_tested_here():
    with open(os.path.join(ROOT, "docs", "environments.md")) as f:
        section = f.read().split("## Use your own environment", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    imports = [line for line in block.splitlines() if line.startswith(("import ", "from "))]
    body = "\n".join(line for line in block.splitlines() if line not in imports).strip()
    with open(__file__) as f:
        source = f.read()
    assert body in source and all(f"\n{line}\n" in source for line in imports)


def test_ids_resolve_ours_first_then_import_paths_then_gymnax():
    env, params = ep.make("MemoryChain-bsuite")  # gymnax has this id too: ours wins
    assert isinstance(env, ep.MemoryChain) and params.memory_length == 5
    env, params = ep.make("CartPole-v1")
    assert isinstance(env, ep.ExternalEnv) and type(env.env).__name__ == "CartPole" and params.max_steps_in_episode == 500
    assert env.observation_space(params).shape == (4,) and env.action_space(params).n == 2
    assert ep.make("CartPole-v1", max_steps_in_episode=50)[1].max_steps_in_episode == 50
    env, params = ep.make("Pendulum-v1")
    space = env.action_space(params)
    assert isinstance(space, spaces.Box) and space.shape == (1,) and space.low[0] == -2 and space.high[0] == 2
    assert ep.make("Breakout-MinAtar")[0].observation_space(None).shape == (10 * 10 * 4,)  # an image, flattened
    assert ep.make("FrozenLake-misc")[0].observation_space(None).shape == (16,)  # Discrete(16), one-hot
    assert ep.make("MetaMaze-misc")[0].observation_space(None).shape == (15,)
    env, params = ep.make(f"{HERE}:RememberBit")
    assert type(env.env).__name__ == "RememberBit" and params.length == 8
    assert ep.make(f"{HERE}:remember_bit_3")[1].length == 3
    assert ep.make(f"{HERE}:RememberBit", length=5)[1].length == 5
    with pytest.raises(ValueError, match="no setting lenght; valid: max_steps_in_episode, length"):
        ep.make(f"{HERE}:RememberBit", lenght=5)
    # ENV_IDS and canonical_id stay ours
    assert not set(ep.ENV_IDS) & {"CartPole-v1", "Pendulum-v1", "MetaMaze-misc"}
    with pytest.raises(ValueError, match="unknown env id 'CartPole-v1'"):
        ep.canonical_id("CartPole-v1")


# VecEnv over a foreign env = gymnax's own auto-reset step -------------------------------------------------------------
def flat(obs, env: ep.ExternalEnv):
    if isinstance(env.inner_observation_space, spaces.Discrete):
        return jax.nn.one_hot(obs, env.inner_observation_space.n)
    return np.reshape(obs, (obs.shape[0], -1)).astype(np.float32)


@pytest.mark.parametrize(
    "env_id, overrides",
    [("CartPole-v1", {}), ("Pendulum-v1", dict(max_steps_in_episode=13)), ("FrozenLake-misc", {}),
     (f"{HERE}:RememberBit", dict(length=5))],
)  # fmt: skip
def test_vec_env_over_a_gymnax_env_equals_vmap_of_its_step(env_id, overrides):
    """`make_vec` of a gymnax env equals `vmap(env.step)` of the unwrapped env with the same keys, step by step, for
    60 steps in which episodes end (terminated and truncated) and restart: observations (flattened), states, rewards
    and both flags. Pendulum's actions are drawn outside its bounds: it clips them itself, as ExternalEnv does."""
    n = 8
    vec_env, params = ep.make_vec(env_id, n, **overrides)
    raw = vec_env.env.env
    raw_step = jax.jit(jax.vmap(raw.step, (0, 0, 0, None)))
    key_reset, key = jax.random.split(jax.random.key(4))
    obs, state = vec_env.reset(key_reset, params)
    raw_obs, raw_state = jax.vmap(raw.reset_env, (0, None))(jax.random.split(key_reset, n), params)
    ends = np.zeros(2, int)
    for _ in range(60):
        np.testing.assert_array_equal(obs, flat(raw_obs, vec_env.env))
        jax.tree.map(np.testing.assert_array_equal, state, raw_state)
        key, key_action, key_step = jax.random.split(key, 3)
        space = vec_env.action_space(params)
        if isinstance(space, spaces.Box):
            action = 3.0 * jax.random.normal(key_action, (n, *space.shape))
        else:
            action = jax.random.randint(key_action, (n,), 0, space.n)
        obs, state, reward, terminated, truncated, _ = vec_env.step(key_step, state, action, params)
        raw_obs, raw_state, raw_reward, raw_terminated, raw_truncated, _ = raw_step(
            jax.random.split(key_step, n), raw_state, action, params)
        np.testing.assert_array_equal(reward, np.asarray(raw_reward, np.float32))
        np.testing.assert_array_equal(terminated, raw_terminated)
        np.testing.assert_array_equal(truncated, raw_truncated)
        ends += [int(terminated.sum()), int(truncated.sum())]
    assert (ends[1] if env_id == "Pendulum-v1" else ends[0]) > n, ends  # episodes ended (truncated: Pendulum's)


def test_box_actions_are_reshaped_and_clipped_to_the_bounds():
    """Reacher-misc does not clip its actions: ExternalEnv does, so an action beyond the bounds acts as the bound.
    A Box action of shape (2, 1) is sampled flat and reshaped; an env without is_truncated never truncates."""
    env, params = ep.make("Reacher-misc")
    obs, state = env.reset_env(jax.random.key(0), params)
    clipped = env.step_env(jax.random.key(1), state, jnp.array([5.0, -0.5]), params)
    raw = env.env.step_env(jax.random.key(1), state, jnp.array([1.0, -0.5]), params)
    jax.tree.map(np.testing.assert_array_equal, clipped[:2], raw[:2])
    env, params = ep.make(f"{HERE}:GridRememberBit")
    assert env.observation_space(params).shape == (6,) and env.action_space(params).shape == (2,)
    obs, state = env.reset_env(jax.random.key(3), params)
    state = state.replace(time=jnp.int32(params.length - 1))
    _, _, reward, terminated, _ = env.step_env(jax.random.key(1), state, jnp.array([2 * state.bit - 1.0, 0.0]), params)
    assert reward == 1.0 and terminated and not env.is_truncated(state.replace(time=10**6), params)


# Training through each script ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_gymnax_envs_train_through_each_script(script, env_id, tmp_path):
    """A discrete and a continuous (Box(1)) gymnax env train for 3 updates through each script: finite losses (a
    non-finite one stops the run), a run folder named after the id, and completed CartPole episodes."""
    module = importlib.import_module(script)
    tiny = {**SCRIPTS[script], "num_steps": 16}
    args = module.Args(env_id=env_id, total_timesteps=3 * 4 * 16, log_dir=str(tmp_path), **tiny)
    assert module.check_args(args) is None
    summary = module.main(args)
    assert summary["updates"] == 3 and summary["env_id"] == env_id
    (run_dir,) = glob.glob(str(tmp_path / f"{env_id}__*"))
    assert os.path.isfile(os.path.join(run_dir, "summary.json"))
    if env_id == "CartPole-v1":  # 48 random steps per env: episodes of about 20 steps end
        assert summary["final_episodic_return"]["mean"] > 5


def test_a_custom_env_runs_by_import_path_through_the_cli(tmp_path):
    """ppo_s5_popgym.py from the command line on this module's RememberBit; ppo_lstm_popgym in-process on the
    function form. Each run's episodes have the env's length."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SCRIPTS["ppo_s5_popgym"].items()]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "ppo_s5_popgym.py"), f"--env-id={HERE}:RememberBit", *flags,
         "--total-timesteps=64", f"--log-dir={tmp_path / 's5'}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "JAX_COMPILATION_CACHE_DIR": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "s5" / f"{HERE}:RememberBit__*"))
    assert os.path.isfile(os.path.join(run_dir, "summary.json"))
    lstm = importlib.import_module("ppo_lstm_popgym")
    args = lstm.Args(env_id=f"{HERE}:remember_bit_3", total_timesteps=2 * 4 * 8, log_dir=str(tmp_path / "lstm"),
                     **SCRIPTS["ppo_lstm_popgym"])  # fmt: skip
    summary = lstm.main(args)
    assert summary["updates"] == 2 and -1 <= summary["final_episodic_return"]["mean"] <= 1


# Bad input: one line, before anything compiles, no run folder -----------------------------------------------------------
BAD = [
    ("CartPole-v2", "unknown env id 'CartPole-v2'; did you mean CartPole-v1"),
    ("Pendulum", "did you mean"),  # a family of ours without a level, and close to gymnax's Pendulum-v1
    ("no_such_package.envs:MyEnv", "importing no_such_package.envs failed: ModuleNotFoundError"),
    (f"{HERE}:NoSuchEnv", "has no class or function 'NoSuchEnv'"),
    (f"{HERE}:WithoutStep", "WithoutStep lacks gymnax's step_env, action_space"),
    (f"{HERE}:NeedsArguments", "calling NeedsArguments() failed: TypeError"),
    (f"{HERE}:not_a_pair", "not_a_pair() must return (env, params), got a RememberBit"),
    (f"{HERE}:DictObservation", "a Dict observation space; the scripts take Box or Discrete"),
    (f"{HERE}:TimelessRememberBit", "tracing reset_env, step_env and is_truncated failed: AttributeError"),
    (f"{HERE}:WrongObservationSize", "observations of 2 values; observation_space says 3"),
]


@pytest.mark.parametrize("env_id, message", BAD, ids=[b[0].replace(f"{HERE}:", "") for b in BAD])
def test_bad_env_ids_are_refused_with_one_line_and_no_run_folder(env_id, message, tmp_path):
    """The CLI of one script (they alternate) refuses with one line on stderr, no traceback, no run folder; the other
    script's check_args gives the same message."""
    index = [b[0] for b in BAD].index(env_id)
    cli, other = list(SCRIPTS)[index % 2], list(SCRIPTS)[1 - index % 2]
    module = importlib.import_module(other)
    error = module.check_args(dataclasses.replace(module.Args(), env_id=env_id))
    assert error is not None and error.startswith("--env-id: ") and message in error and "\n" not in error, error
    result = subprocess.run([sys.executable, os.path.join(ROOT, f"{cli}.py"), f"--env-id={env_id}",
                             f"--log-dir={tmp_path / 'runs'}"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "JAX_COMPILATION_CACHE_DIR": ""})  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines == [f"error: {error}"], result.stderr[-3000:]
    assert not os.path.exists(tmp_path / "runs")
