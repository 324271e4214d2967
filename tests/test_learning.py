"""Seeded learning tests: each script's PPO learns bsuite's MemoryChain at memory length 4 in a small budget.

The context bit is shown on the first observation of an episode only, and only the answer L = 4 steps later is
rewarded (+1 right, -1 wrong), so a policy that does not remember scores 0 in expectation (success 0.5), as does a
random one. Each test trains two seeds (vmapped) and asks for a mean return of at least 0.6 (80% right answers) over
the last 8 updates of each, after a first update at chance. Measured with these settings on seeds 1-8 (-O0, as in
the suite; the 2-core AMD EPYC VM): every seed of every script ended at 0.93-1.00 and began within 0.21 of 0, so the
threshold sits far from both chance and what the agents reach, with room for a CPU whose round-off sends training
elsewhere. (The POPGym and memory scripts also show the previous action, which a policy could use to carry the bit;
the trained agents use their memory: ppo_s5_memory's seed 1 answers 100% right greedily, 54% with its memory cleared
before every step.)
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs_popjax
import ppo_lstm_popgym
import ppo_s5_memory
import ppo_s5_metarl
import ppo_s5_popgym

pytestmark = pytest.mark.timeout(600)

MEMORY_LENGTH = 4
SEEDS = (1, 2)
THRESHOLD, LAST_UPDATES = 0.6, 8
# ppo_s5_memory's defaults, which the others take too: 16 envs, lr 1e-3 annealed, 4 epochs x 4 minibatches
PPO = dict(num_envs=16, learning_rate=1e-3, anneal_lr=True, update_epochs=4, num_minibatches=4, gae_lambda=0.95,
           ent_coef=0.01, vf_coef=0.5)  # fmt: skip
S5 = dict(d_model=32, ssm_size=32, n_layers=2, s5_scan="sequential")
NUM_STEPS = 32


def train(init, update_chunk, num_updates: int) -> dict:
    """Every seed of SEEDS trained for num_updates in one vmapped program: the metrics, [seeds, updates] each."""
    runner = jax.jit(jax.vmap(init))(jax.vmap(jax.random.key)(jnp.array(SEEDS)))
    _, metrics = jax.jit(jax.vmap(partial(update_chunk, num_updates=num_updates)))(runner)
    return jax.device_get(metrics)


def assert_learned(returns: np.ndarray):
    """returns: [seeds, updates], the mean return of the episodes that ended in each update."""
    assert (np.abs(returns[:, 0]) < 0.4).all(), returns[:, 0]  # the untrained policy is at chance
    final = np.nanmean(returns[:, -LAST_UPDATES:], axis=1)
    assert (final >= THRESHOLD).all(), f"final returns {final} of seeds {SEEDS}"


@pytest.mark.parametrize("script", [ppo_s5_popgym, ppo_lstm_popgym], ids=lambda m: m.__name__)
def test_popgym_scripts_learn_memory_chain(script):
    memory = S5 if script is ppo_s5_popgym else dict(hidden_size=32)
    num_updates = 48
    args = script.Args(env_id=f"MemoryChain-{MEMORY_LENGTH}", num_steps=NUM_STEPS,
                       total_timesteps=num_updates * PPO["num_envs"] * NUM_STEPS, **PPO, **memory)  # fmt: skip
    init, update_chunk = script.make_train(script.derive_sizes(args))
    assert_learned(train(init, update_chunk, num_updates)["episodic_return"])


def test_memory_script_learns_memory_chain():
    args = ppo_s5_memory.Args(memory_lengths=(MEMORY_LENGTH,), s5_scan="sequential")  # its own defaults otherwise
    num_steps, num_updates = ppo_s5_memory.rollout_length(args, MEMORY_LENGTH), 64
    args.total_timesteps = num_updates * args.num_envs * num_steps
    init, update_chunk, planned_updates = ppo_s5_memory.make_train(args, num_steps)
    assert planned_updates == num_updates  # (the learning rate anneals over these)
    metrics = train(partial(init, memory_length=MEMORY_LENGTH), update_chunk, num_updates)
    assert_learned(2 * metrics["successes"] / metrics["episodes"] - 1)


class BoxActionMemoryChain:
    """MemoryChain (envs_popjax) behind the meta-RL pool's interface (`reset`, `step_batch`, info of the inner
    episodes), answered by the sign of the Gaussian policy's action: action > 0 is answer 1. Each episode is one
    trial, so the memory is cleared at every episode start; the observation is MemoryChain's own, without the previous
    action, so nothing but the memory carries the context to the answer."""

    action_size = 1

    def __init__(self, memory_length: int):
        self.env, self.params = envs_popjax.make("MemoryChain", memory_length=memory_length)
        self.agent_obs_size = self.env.observation_space(self.params).shape[0]

    def reset(self, key):
        return self.env.reset(key, self.params)

    def step_batch(self, keys, states, actions):
        answers = (actions[:, 0] > 0).astype(jnp.int32)
        step = jax.vmap(self.env.step, in_axes=(0, 0, 0, None))
        obs, states, reward, terminated, truncated, _ = step(keys, states, answers, self.params)  # auto-resets
        done = terminated | truncated
        info = dict(episode_done=done, episode_return=reward, episode_index=jnp.zeros(done.shape, jnp.int32))
        return obs, states, reward, done, info  # only an episode's last step is rewarded: its return is that reward


def test_metarl_script_learns_memory_chain(monkeypatch):
    """ppo_s5_metarl's PPO and S5 (Gaussian policy, trial resets) on MemoryChain instead of its random-projection
    meta-envs, on which no CPU-sized budget learns reliably within a test's time (docs/ppo_s5_metarl.md)."""
    monkeypatch.setattr(ppo_s5_metarl, "make_env", lambda args, env_id: BoxActionMemoryChain(MEMORY_LENGTH))
    num_updates = 48
    args = ppo_s5_metarl.Args(train_envs=("gymnax/Reacher-misc",), action_size=1, num_steps=NUM_STEPS,  # ids: unused
                              total_timesteps=num_updates * PPO["num_envs"] * NUM_STEPS, **{**PPO, "ent_coef": 0.0},
                              **S5)  # fmt: skip
    init, update_chunk = ppo_s5_metarl.make_train(ppo_s5_metarl.derive_sizes(args))
    assert_learned(train(init, update_chunk, num_updates)["episodic_return"])
