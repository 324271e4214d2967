"""PPO with a resettable LSTM (or GRU) memory on POPGym, in one file: the recurrent baseline of Lu et al.,
"Structured State Space Models for In-Context Reinforcement Learning" (NeurIPS 2023).

Everything but the memory is ppo_s5_popgym.py line for line: the recurrent state is cleared at episode boundaries
with the same convention as the S5 scan, but a cell steps through time one input at a time (lax.scan). Seeds are a
vmapped (and device-sharded) leading axis; each seed gets its own TensorBoard run.

    python ppo_lstm_popgym.py --env-id CartPoleHard --num-seeds 8
    tensorboard --logdir runs
    python ppo_lstm_popgym.py --resume runs/RUN_FOLDER      # continue after a crash or kill, bit for bit
    python ppo_lstm_popgym.py --eval-model runs/RUN_FOLDER  # play the saved policy (latest checkpoint)
    python ppo_lstm_popgym.py --distributed --num-seeds 16  # one of several processes (README: many GPUs and hosts)

Defaults are the paper's POPGym settings; the README gives smaller settings for a CPU.
"""

import atexit
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Literal, NamedTuple

import flax.linen as nn
import flax.serialization
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tyro
from flax.training.train_state import TrainState
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

import envs_popjax


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed of the first run; run i of `--num-seeds` uses seed + i"""
    num_seeds: int = 1
    """number of independent seeds, sharded over all visible devices (each runs its seeds as --seed-batching says)"""
    log_dir: str = "runs"
    """folder under which the run folder is created"""
    save_model: bool = False
    """save every seed's parameters and these Args to `{run folder}/{exp_name}.cleanrl_model`"""
    updates_per_chunk: int = 0
    """PPO updates per jitted chunk between progress/TensorBoard writes (0: a divisor near 1/25 of the updates)"""
    seed_batching: Literal["auto", "vmap", "loop"] = "auto"
    """how a device runs its seeds: vmap (one batched program), loop (one device holds all seeds and runs the
    one-seed program for each in turn: seed i of N is bit-identical to a one-seed run), or auto: loop for one seed
    at width >= 256 on a CPU, else vmap (the faster: benchmarks/bench_seed_batching.py)"""
    checkpoint_every: int = 20
    """checkpoint the training state every N updates (at chunk ends), at the end and on Ctrl-C/SIGTERM; 0: never"""
    keep_checkpoints: int = 3
    """how many of the latest checkpoints to keep"""
    resume: str = ""
    """continue this run folder from its latest checkpoint (flags that would change its math are refused)"""
    eval_model: str = ""
    """evaluate a saved model (a `.cleanrl_model` file or a run folder's checkpoint) instead of training"""
    eval_episodes: int = 100
    """episodes per seed played by --eval-model"""
    eval_greedy: bool = False
    """--eval-model acts greedily (argmax / Gaussian mean) instead of sampling"""
    eval_reset_every_trial: bool = False
    """--eval-model on a meta-env (MetaCartPole): clear the memory at every trial start too, so nothing carries over
    from one trial to the next (the control of the in-context curve: it must stay flat)"""
    eval_untrained: bool = False
    """--eval-model plays each seed's initial, untrained parameters (the run's Args and seeds; a control)"""
    compile_cache: str = "~/.cache/s5_icrl_jax"
    """JAX's persistent compilation cache folder ('': off; JAX_COMPILATION_CACHE_DIR wins), for fast restarts"""
    track: bool = False
    """log to Weights & Biases (mirrors TensorBoard; needs `pip install wandb`)"""
    wandb_project_name: str = "s5-icrl"
    """the Weights & Biases project"""
    wandb_entity: str | None = None
    """the Weights & Biases entity (team)"""
    distributed: bool = False
    """one process of a multi-process run (jax.distributed): seeds are sharded over the devices of all processes;
    the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU) is detected unless the three flags below are given"""
    coordinator_address: str = ""
    """with --distributed: HOST:PORT of process 0 (empty: detected)"""
    num_processes: int = 0
    """with --distributed: the number of processes (0: detected)"""
    process_id: int = -1
    """with --distributed: this process's index, 0 to --num-processes - 1 (-1: detected)"""

    # Algorithm specific arguments (defaults: the paper's POPGym settings)
    env_id: str = "RepeatPreviousEasy"
    """env id: POPGym's (CartPoleHard, RepeatPreviousEasy; envs_popjax.ENV_IDS), MemoryChain-L, MetaCartPole, any
    gymnax id (CartPole-v1, MetaMaze-misc), or package.module:Name for your own gymnax-API env (docs/environments.md)"""
    total_timesteps: int = 15_000_000
    """total environment steps per seed"""
    learning_rate: float = 5e-5
    """Adam learning rate"""
    num_envs: int = 64
    """parallel environments per seed"""
    num_steps: int = 1024
    """steps per environment per rollout (the length of each training sequence)"""
    anneal_lr: bool = False
    """anneal the learning rate linearly to zero over training"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 1.0
    """lambda of generalised advantage estimation"""
    num_minibatches: int = 8
    """minibatches per epoch; each holds num_envs / num_minibatches whole sequences"""
    update_epochs: int = 30
    """epochs over each rollout"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_coef: float = 0.2
    """PPO ratio clipping coefficient"""
    clip_vloss: bool = True
    """clip the value loss like the policy ratio"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    vf_coef: float = 1.0
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient norm clip"""

    # recurrent memory
    hidden_size: int = 256
    """width H of the encoder output and of the recurrent cell"""
    cell: Literal["lstm", "gru"] = "lstm"
    """recurrent cell: flax's OptimizedLSTMCell or GRUCell"""

    # to be filled in at runtime
    batch_size: int = 0
    """environment steps per update (num_envs * num_steps)"""
    minibatch_size: int = 0
    """transitions per minibatch"""
    num_updates: int = 0
    """PPO updates per seed (total_timesteps // batch_size)"""


# LSTM / GRU memory, reset at episode boundaries with the same convention as the S5 scan -------------------------------
class RNNMemory(nn.Module):
    """A resettable LSTM or GRU: `(carry, x[T, B, H], resets[T, B]) -> (carry, y[T, B, H])`. `resets[t, b]`: x[t, b]
    starts an episode, so the carry is zeroed before it. Carry: `(c, h)` (LSTM) or `h` (GRU), [B, H] float32 each."""

    hidden_size: int = 256
    cell: str = "lstm"

    @nn.compact
    def __call__(self, carry, x, resets):
        def step(cell, carry, inputs):
            x_t, reset_t = inputs
            carry = jax.tree.map(lambda c: jnp.where(reset_t[:, None], jnp.zeros_like(c), c), carry)
            return cell(carry, x_t)

        scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False})
        return scan(self.make_cell(self.cell, self.hidden_size), carry, (x, resets))

    @staticmethod
    def make_cell(cell: str, hidden_size: int) -> nn.RNNCellBase:
        return {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}[cell](features=hidden_size)

    @staticmethod
    def initialize_carry(batch_size: int, hidden_size: int, cell: str = "lstm"):
        # flax's default carry_init is zeros, so this is the same carry the resets put back
        return RNNMemory.make_cell(cell, hidden_size).initialize_carry(jax.random.key(0), (batch_size, hidden_size))


# Actor-critic: shared encoder and recurrent trunk, separate actor and critic heads (paper, app. B) --------------------
class ActorCritic(nn.Module):
    action_dim: int
    continuous: bool
    memory: RNNMemory

    @nn.compact
    def __call__(self, carry, obs, resets):
        dense = lambda n, scale=math.sqrt(2): nn.Dense(n, kernel_init=nn.initializers.orthogonal(scale))  # noqa: E731
        x = nn.leaky_relu(dense(128)(obs))
        x = nn.leaky_relu(dense(self.memory.hidden_size)(x))
        carry, x = self.memory(carry, x, resets)
        actor = nn.leaky_relu(dense(128, 2.0)(nn.leaky_relu(dense(128, 2.0)(x))))
        actor_out = dense(self.action_dim, 0.01)(actor)
        critic = nn.leaky_relu(dense(128, 2.0)(nn.leaky_relu(dense(128, 2.0)(x))))
        value = dense(1, 1.0)(critic)[..., 0]
        if self.continuous:  # diagonal Gaussian with a state-independent log std
            log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))
            return carry, (actor_out, jnp.broadcast_to(log_std, actor_out.shape)), value
        return carry, actor_out, value


def policy_sample(key, policy, continuous: bool):
    if continuous:
        mean, log_std = policy
        return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
    return jax.random.categorical(key, policy)


def policy_log_prob(policy, action, continuous: bool):
    if continuous:
        mean, log_std = policy
        z = (action - mean) / jnp.exp(log_std)
        return jnp.sum(-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi), -1)
    log_p = jax.nn.log_softmax(policy)
    return jnp.take_along_axis(log_p, action[..., None], -1)[..., 0]


def policy_entropy(policy, continuous: bool):
    if continuous:
        return jnp.sum(policy[1] + 0.5 * math.log(2 * math.pi * math.e), -1)
    log_p = jax.nn.log_softmax(policy)
    return -jnp.sum(jnp.exp(log_p) * log_p, -1)


# PPO ------------------------------------------------------------------------------------------------------------------
class Transition(NamedTuple):
    obs: jax.Array
    done: jax.Array  # the flag *before* the step: obs is the first of an episode (drives resets)
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    episode_done: jax.Array  # an episode ended at this step (for the logged return)
    episode_return: jax.Array
    episode_length: jax.Array


class RunnerState(NamedTuple):
    train_state: TrainState
    env_state: object
    obs: jax.Array
    done: jax.Array
    carry: tuple | jax.Array  # the memory's carry: (c, h) for the LSTM, h for the GRU
    key: jax.Array


def compute_gae(rewards, values, dones, last_value, last_done, gamma, gae_lambda):
    """GAE over [T, ...] arrays. dones[t] = obs t starts an episode, so step t is bootstrapped
    unless the *next* flag (dones[t + 1], or last_done) is set. Returns (advantages, returns)."""

    def backward(carry, step):
        gae, next_value, next_done = carry
        reward, value, done = step
        not_end = 1.0 - next_done
        delta = reward + gamma * next_value * not_end - value
        gae = delta + gamma * gae_lambda * not_end * gae
        return (gae, value, done.astype(value.dtype)), gae

    init = (jnp.zeros_like(last_value), last_value, last_done.astype(last_value.dtype))
    _, advantages = jax.lax.scan(backward, init, (rewards, values, dones), reverse=True)
    return advantages, advantages + values


def build_network(args: Args, env, env_params) -> tuple[ActorCritic, int, bool]:
    action_space = env.action_space(env_params)
    continuous = not isinstance(action_space, envs_popjax.spaces.Discrete)
    action_dim = envs_popjax.action_size(action_space)
    memory = RNNMemory(hidden_size=args.hidden_size, cell=args.cell)
    return ActorCritic(action_dim, continuous, memory), action_dim, continuous


def make_env(args: Args, num_envs: int):
    """`num_envs` batched envs that reset only those whose episode ended; the observation carries the previous
    action and the first-step flag, `info` the episode statistics (envs_popjax.make_vec)."""
    return envs_popjax.make_vec(args.env_id, num_envs, wrappers=True)


def ppo_loss(params, network: ActorCritic, args: Args, carry, batch: Transition, advantages, returns):
    """PPO's loss on one minibatch of whole sequences, replayed by `network` from the carry they started from:
    `(loss, stats)`, the clipped surrogate plus `vf_coef` x the (clipped) value loss minus `ent_coef` x the entropy,
    as CleanRL's ppo_atari_lstm.py. Differentiated with respect to `params` (the other arguments stay fixed)."""
    _, policy, value = network.apply(params, carry, batch.obs, batch.done)
    log_prob = policy_log_prob(policy, batch.action, network.continuous)
    log_ratio = log_prob - batch.log_prob
    ratio = jnp.exp(log_ratio)
    if args.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    clipped_ratio = jnp.clip(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = jnp.maximum(-advantages * ratio, -advantages * clipped_ratio).mean()
    if args.clip_vloss:
        value_clipped = batch.value + jnp.clip(value - batch.value, -args.clip_coef, args.clip_coef)
        v_loss = 0.5 * jnp.maximum((value - returns) ** 2, (value_clipped - returns) ** 2).mean()
    else:
        v_loss = 0.5 * ((value - returns) ** 2).mean()
    entropy = policy_entropy(policy, network.continuous).mean()
    loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss
    # http://joschu.net/blog/kl-approx.html
    kl = dict(old_approx_kl=(-log_ratio).mean(), approx_kl=((ratio - 1) - log_ratio).mean())
    clipfrac = (jnp.abs(ratio - 1) > args.clip_coef).mean()
    return loss, dict(policy_loss=pg_loss, value_loss=v_loss, entropy=entropy, **kl, clipfrac=clipfrac)


def make_train(args: Args):
    """Returns `(init, update_chunk)`, pure functions of one seed: `init(key) -> RunnerState` and
    `update_chunk(runner_state, num_updates) -> (runner_state, metrics[num_updates])`."""
    env, env_params = make_env(args, args.num_envs)
    network, action_dim, continuous = build_network(args, env, env_params)
    obs_size = env.observation_space(env_params).shape[0]
    new_carry = partial(RNNMemory.initialize_carry, hidden_size=args.hidden_size, cell=args.cell)

    def learning_rate(count):  # CleanRL's linear annealing, once per update
        frac = 1.0 - (count // (args.num_minibatches * args.update_epochs)) / args.num_updates
        return args.learning_rate * frac if args.anneal_lr else args.learning_rate

    # flatten: one vector for the optimizer instead of one per leaf, a smaller program to compile
    clip = optax.clip_by_global_norm(args.max_grad_norm)
    optimizer = optax.flatten(optax.chain(clip, optax.adam(learning_rate, eps=1e-5)))

    def init(key) -> RunnerState:
        key, key_params, key_env = jax.random.split(key, 3)
        dummy_obs = jnp.zeros((1, args.num_envs, obs_size))
        params = network.init(key_params, new_carry(args.num_envs), dummy_obs, jnp.ones((1, args.num_envs), bool))
        train_state = TrainState.create(apply_fn=network.apply, params=params, tx=optimizer)
        obs, env_state = env.reset(key_env, env_params)
        done = jnp.ones(args.num_envs, bool)  # the first observation starts an episode
        return RunnerState(train_state, env_state, obs, done, new_carry(args.num_envs), key)

    def env_step(runner: RunnerState, _):
        key, key_action, key_env = jax.random.split(runner.key, 3)
        inputs = runner.carry, runner.obs[None], runner.done[None]  # a time axis of one step
        carry, policy, value = network.apply(runner.train_state.params, *inputs)
        policy = jax.tree.map(lambda p: p[0], policy)
        action = policy_sample(key_action, policy, continuous)
        log_prob = policy_log_prob(policy, action, continuous)
        obs, env_state, reward, terminated, truncated, info = env.step(key_env, runner.env_state, action, env_params)
        done = terminated | truncated  # POPGym returns are finite-horizon: truncation ends it too
        episode = info["returned_episode"], info["returned_episode_return"], info["returned_episode_length"]
        transition = Transition(runner.obs, runner.done, action, log_prob, value[0], reward, *episode)
        return RunnerState(runner.train_state, env_state, obs, done, carry, key), transition

    def update_step(runner: RunnerState, _):
        initial_carry = runner.carry  # replayed at update time: the carry the rollout started from
        runner, batch = jax.lax.scan(env_step, runner, None, args.num_steps)
        _, _, last_value = network.apply(runner.train_state.params, runner.carry, runner.obs[None], runner.done[None])
        advantages, returns = compute_gae(
            batch.reward, batch.value, batch.done, last_value[0], runner.done, args.gamma, args.gae_lambda
        )

        def epoch(train_state, key):
            # Minibatches split the envs: each keeps whole sequences and its own starting carry.
            perm = jax.random.permutation(key, args.num_envs)

            def split_envs(x, env_axis):  # [..., num_envs, ...] -> [num_minibatches, ..., envs_per_mb, ...]
                x = jnp.take(x, perm, env_axis)
                x = x.reshape(x.shape[:env_axis] + (args.num_minibatches, -1) + x.shape[env_axis + 1 :])
                return jnp.moveaxis(x, env_axis, 0)

            minibatches = (
                jax.tree.map(lambda x: split_envs(x, 0), initial_carry),
                jax.tree.map(lambda x: split_envs(x, 1), (batch, advantages, returns)),
            )

            def minibatch_step(train_state, minibatch):
                carry, (mb, mb_adv, mb_ret) = minibatch
                grad_and_stats = jax.grad(ppo_loss, has_aux=True)  # d loss / d params, and the loss's stats
                grads, stats = grad_and_stats(train_state.params, network, args, carry, mb, mb_adv, mb_ret)
                return train_state.apply_gradients(grads=grads), stats

            return jax.lax.scan(minibatch_step, train_state, minibatches)

        key, key_epochs = jax.random.split(runner.key)
        train_state, stats = jax.lax.scan(epoch, runner.train_state, jax.random.split(key_epochs, args.update_epochs))
        runner = runner._replace(train_state=train_state, key=key)

        var_returns = jnp.var(returns)
        n_episodes = batch.episode_done.sum()

        def per_episode(x):  # the mean over the episodes that ended in this rollout (NaN if none did)
            return (x * batch.episode_done).sum() / jnp.where(n_episodes, n_episodes, jnp.nan)

        metrics = {k: v.mean() for k, v in stats.items()}
        metrics.update(
            explained_variance=jnp.where(var_returns == 0, jnp.nan, 1 - jnp.var(returns - batch.value) / var_returns),
            episodes=n_episodes,
            episodic_return=per_episode(batch.episode_return),
            episodic_length=per_episode(batch.episode_length),
            learning_rate=learning_rate(train_state.step - 1) * jnp.ones(()),
            finite=jnp.isfinite(jnp.stack([stats[k] for k in ("policy_loss", "value_loss", "entropy")])).all()
            & jnp.isfinite(optax.tree.norm(train_state.params)),  # checked by the host after each chunk
        )
        return runner, metrics

    def update_chunk(runner: RunnerState, num_updates: int):
        return jax.lax.scan(update_step, runner, None, num_updates)

    return init, update_chunk


def make_evaluate(args: Args):
    """`evaluate(params, key) -> {"return": [eval_episodes]}`, pure, one seed: one episode in each of --eval-episodes
    parallel envs, played to its end (the memory starts cleared, as in training). On a meta-env (MetaCartPole) also
    `"trial_returns": [eval_episodes, num_trials]`, each trial's return: the in-context curve."""
    env, env_params = make_env(args, args.eval_episodes)
    network, _, continuous = build_network(args, env, env_params)
    n, num_trials = args.eval_episodes, getattr(env, "num_trials", 0)

    def evaluate(params, key):
        def step(state):
            env_state, obs, done, carry, key, returns, trial_returns, ended = state
            key, key_action, key_env = jax.random.split(key, 3)
            carry, policy, _ = network.apply(params, carry, obs[None], done[None])
            policy = jax.tree.map(lambda p: p[0], policy)
            if args.eval_greedy:
                action = policy[0] if continuous else jnp.argmax(policy, -1)
            else:
                action = policy_sample(key_action, policy, continuous)
            obs, env_state, reward, terminated, truncated, info = env.step(key_env, env_state, action, env_params)
            returns = jnp.where(ended, returns, info["returned_episode_return"])  # kept from each env's first end
            done = terminated | truncated
            if num_trials:  # the in-context curve: the reward of each trial of the first meta-episode
                counted = ~ended[:, None] & (info["trial"][:, None] == jnp.arange(num_trials))
                trial_returns += counted * reward[:, None]
                done = done | (args.eval_reset_every_trial & info["trial_ended"])
            return env_state, obs, done, carry, key, returns, trial_returns, ended | info["returned_episode"]

        key, key_reset = jax.random.split(key)
        obs, env_state = env.reset(key_reset, env_params)
        carry = RNNMemory.initialize_carry(n, args.hidden_size, args.cell)
        zeros = jnp.zeros(n), jnp.zeros((n, num_trials)), jnp.zeros(n, bool)  # returns, trial returns, ended
        state = (env_state, obs, jnp.ones(n, bool), carry, key, *zeros)
        *_, returns, trial_returns, _ = jax.lax.while_loop(lambda s: ~s[-1].all(), step, state)
        return {"return": returns, "trial_returns": trial_returns} if num_trials else {"return": returns}

    return evaluate


# Running: input checks, processes and devices, compiling --------------------------------------------------------------
POSITIVE = tuple(
    "num_seeds total_timesteps num_envs num_steps num_minibatches update_epochs hidden_size "
    "learning_rate clip_coef max_grad_norm keep_checkpoints eval_episodes".split()
)
NON_NEGATIVE = ("updates_per_chunk", "checkpoint_every", "vf_coef", "ent_coef", "num_processes")


def check_args(args: Args) -> str | None:
    """Return a one-line message saying what to change, or None if the settings can run."""
    try:
        make_env(args, 1)  # an unknown id, MemoryChain-L with L < 1, an import path that fails, a non-gymnax env
    except ValueError as error:
        return f"--env-id: {error}"
    domains = [(POSITIVE, "positive", lambda v: v > 0), (NON_NEGATIVE, ">= 0", lambda v: v >= 0)]
    for names, domain, ok in domains + [(("gamma", "gae_lambda"), "in [0, 1]", lambda v: 0 <= v <= 1)]:
        for name in names:
            if not (math.isfinite(value := getattr(args, name)) and ok(value)):
                return f"--{name.replace('_', '-')} must be {domain}, got {value}"
    if args.num_envs % args.num_minibatches:
        return f"--num-envs {args.num_envs} must be divisible by --num-minibatches {args.num_minibatches}"
    if args.total_timesteps < args.num_envs * args.num_steps:
        return (f"--total-timesteps {args.total_timesteps} gives zero updates: one update takes "
                f"--num-envs x --num-steps = {args.num_envs * args.num_steps} steps")
    if args.track and importlib.util.find_spec("wandb") is None:
        return "--track logs to Weights & Biases, which is not installed: pip install wandb"
    if not args.distributed and (args.coordinator_address or args.num_processes or args.process_id >= 0):
        return "--coordinator-address, --num-processes and --process-id are for multi-process runs: add --distributed"
    if args.seed_batching == "loop" and (args.distributed or jax.device_count() > 1):
        where = "several processes" if args.distributed else f"{jax.device_count()} devices"
        return f"--seed-batching loop runs every seed on one device, and this run has {where}: use vmap"
    if args.distributed and args.eval_model:
        return "--eval-model runs in one process; drop --distributed"
    if (args.eval_reset_every_trial or args.eval_untrained) and not args.eval_model:
        return "--eval-reset-every-trial and --eval-untrained are controls of --eval-model RUN: add it"
    if args.eval_reset_every_trial and not getattr(make_env(args, 1)[0], "num_trials", 0):
        return f"--eval-reset-every-trial needs a meta-env such as MetaCartPole; {args.env_id} has no trials"
    if args.distributed and args.num_seeds % jax.process_count():
        return f"--num-seeds {args.num_seeds} must be divisible by the number of processes, {jax.process_count()}"
    return None


def start_distributed(args: Args):
    """--distributed: join the multi-process run before any other JAX call (explicit flags, else auto-detected)."""
    if args.distributed and not jax.distributed.is_initialized():
        jax.extend.backend.clear_backends()  # importing gymnax made an array (frozen_lake), which started JAX
        process_id = None if args.process_id < 0 else args.process_id
        jax.distributed.initialize(args.coordinator_address or None, args.num_processes or None, process_id)


def seed_sharding(num_seeds: int):
    """Shard the leading seed axis over the devices of every process: in each, as many local devices as divide its
    seeds (one process: as many devices as divide the seeds)."""
    per_process = math.gcd(num_seeds // jax.process_count(), jax.local_device_count())
    by_process = [[d for d in jax.devices() if d.process_index == p][:per_process] for p in range(jax.process_count())]
    devices = [d for process_devices in by_process for d in process_devices]
    mesh = jax.sharding.Mesh(np.array(devices), ("seed",))  # not jax.make_mesh: Explicit axes break vmapped random
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("seed"))


def seed_keys(seeds: list[int], sharding):
    """jax.random.key(seed) for every seed, as one [num_seeds] key array laid out by `sharding` (each process builds
    only its own shards; bit-identical to jax.vmap(jax.random.key)(seeds))."""
    data = np.stack([np.asarray(jax.random.key_data(jax.random.key(s))) for s in seeds])
    return jax.random.wrap_key_data(jax.make_array_from_callback(data.shape, sharding, lambda index: data[index]))


def to_host(tree):
    """Every seed's values as numpy arrays on every process (an all-gather across processes; one process: a copy)."""
    return multihost_utils.process_allgather(tree, tiled=True)


def local_seeds(sharding, num_seeds: int) -> list[int]:
    """Indices of the seeds whose shards this process holds (it writes their TensorBoard runs)."""
    indices = sharding.addressable_devices_indices_map((num_seeds,)).values()
    return sorted({i for (index,) in indices for i in range(num_seeds)[index]})


def default_chunk(num_updates: int) -> int:
    """The largest divisor of num_updates up to num_updates // 25 (at least 1): one program compiled, ~25 chunks."""
    return max(d for d in range(1, max(1, num_updates // 25) + 1) if num_updates % d == 0)


def each_seed(program):
    """A one-seed `program` as a function of a leading [seeds] axis on every argument: run for each seed in turn,
    outputs stacked (--seed-batching loop: seed i is computed by the very program of a one-seed run)."""

    def run(*inputs):
        return stack_seeds([program(*seed_inputs) for seed_inputs in split_seeds(inputs)])

    return run


@jax.jit  # one program for the whole tree (eager indexing would compile one per leaf shape)
def split_seeds(tree) -> list:
    return [jax.tree.map(lambda x: x[i], tree) for i in range(len(jax.tree.leaves(tree)[0]))]


@jax.jit
def stack_seeds(trees: list):
    # astype: strong types, so that the state after init (TrainState.create's weakly typed step) splits like the
    # state after an update: split_seeds compiles once, not again at the second chunk
    return jax.tree.map(lambda *xs: jnp.stack(xs).astype(xs[0].dtype), *trees)


def over_seeds(fn, seed_batching: str):
    """`fn` of one seed, jitted, as a function of a leading [seeds] axis: vmapped, or looped over the seeds."""
    return jax.jit(jax.vmap(fn)) if seed_batching == "vmap" else each_seed(jax.jit(fn))


def compile_training(init, update_chunk, keys, sharding, chunk_lengths, seed_batching: str):
    """Initialise every seed (`keys`: [seeds], sharded; parameters outside the training jit) and compile
    `update_chunk` per chunk length, all programs at once: XLA compiles each on one thread. vmap: programs of all the
    seeds; loop: of one seed, run for each in turn. Returns `(runner_state with a leading seed axis on every leaf,
    {length: compiled chunk})`."""
    if seed_batching == "vmap":
        init_lowered = jax.jit(jax.vmap(init), out_shardings=sharding).lower(keys)
        chunk = lambda n: jax.jit(jax.vmap(partial(update_chunk, num_updates=n)), in_shardings=sharding,  # noqa: E731
                                  out_shardings=sharding).lower(init_lowered.out_info)
    else:  # one device (check_args): the keys uncommitted, like every later state, so split_seeds compiles once
        keys = jax.random.wrap_key_data(np.asarray(jax.random.key_data(keys)))
        init_lowered = jax.jit(init).lower(keys[0])
        chunk = lambda n: jax.jit(partial(update_chunk, num_updates=n)).lower(init_lowered.out_info)  # noqa: E731
    lowered = [init_lowered] + [chunk(n) for n in sorted(chunk_lengths)]
    with ThreadPoolExecutor(len(lowered)) as pool:
        programs = pool.map(lambda program: program.compile(), lowered)
    init_compiled, *chunks = programs if seed_batching == "vmap" else map(each_seed, programs)
    return init_compiled(keys), dict(zip(sorted(chunk_lengths), chunks))


def derive_sizes(args: Args) -> Args:
    if args.seed_batching == "auto":  # measured on a CPU: a vmap over one seed slows the LSTM-256 by a third, the
        # GRU-256 by 5-13%; at width 64 and with several seeds the vmap is the faster
        one_seed_on_cpu = args.num_seeds == 1 and jax.default_backend() == "cpu" and jax.device_count() == 1
        wide = args.hidden_size >= 256
        args.seed_batching = "loop" if one_seed_on_cpu and wide and not args.distributed else "vmap"
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // args.num_minibatches
    args.num_updates = args.total_timesteps // args.batch_size
    return args


def cache_folder(folder: str) -> str:
    """The persistent compilation cache's folder: `folder` ('': off), or JAX_COMPILATION_CACHE_DIR if set."""
    return os.path.expanduser(os.environ.get("JAX_COMPILATION_CACHE_DIR", folder))


def enable_compile_cache(folder: str):
    """JAX's persistent compilation cache in `folder` ('': off); JAX_COMPILATION_CACHE_DIR, if set, wins."""
    if folder := cache_folder(folder):
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


# What XLA logs at each load from the persistent cache that a user cannot act on (jaxlib 0.9.2). On a CPU with AVX-512
# XLA adds the LLVM tuning attributes +prefer-no-gather and +prefer-no-scatter to the CPU features it stores with an
# executable; they are not CPU features, so its loader reports them as "not supported on the host machine ... SIGILL"
# (openxla/xla#44565), and PjRt notes that it does not track executable versions. Both are harmless here: JAX's cache
# key holds the host's CPU model and features, so an entry is only loaded on a CPU like the one that compiled it. Any
# other feature the loader names (a real mismatch) and every other line stay on the console.
CACHE_LOAD_NOISE = (
    "] Loading XLA:CPU AOT result. Target machine feature +prefer-no-gather is not ",
    "] Loading XLA:CPU AOT result. Target machine feature +prefer-no-scatter is not ",
    "] Assume version compatibility. PjRt-IFRT does not track XLA executable versions.",
)
# The filter process: copies stdin to stdout, less the lines that contain one of its arguments; passes a partial line
# on after 0.1 s without input; ignores Ctrl-C and SIGTERM (this process may still be writing its last lines); ends at
# end of input, i.e. once every process that writes to the stderr it replaced has exited or restored its own.
LINE_FILTER = r"""
import os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
drop, pending = [a.encode() for a in sys.argv[1:]], b""

def out(data):
    try:
        while data:
            data = data[os.write(1, data) :]
    except OSError:  # stderr is gone: keep reading, so that no writer blocks
        pass

while True:
    if pending and not select.select([0], [], [], 0.1)[0]:
        out(pending)
        pending = b""
    elif chunk := os.read(0, 1 << 16):
        *lines, pending = (pending + chunk).split(b"\n")
        out(b"".join(line + b"\n" for line in lines if not any(d in line for d in drop)))
    else:
        break
out(pending)
"""


def quiet_cache_loads(folder: str):
    """With the compile cache on, pass this process's stderr (file descriptor 2: XLA's C++ logs and Python's
    sys.stderr) through a child process that drops the lines of CACHE_LOAD_NOISE and passes on every other byte as it
    comes. A child rather than a thread, so that a crash's last words still get through. At exit, fd 2 is restored;
    returns the function that restores it (for an exit that skips the atexit functions)."""
    if not cache_folder(folder) or os.name != "posix" or not sys.executable:
        return lambda: None
    read, write = os.pipe()
    child = subprocess.Popen([sys.executable, "-I", "-S", "-c", LINE_FILTER, *CACHE_LOAD_NOISE], stdin=read,
                             stdout=2, start_new_session=True)  # stdout: the stderr it replaces
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(write, 2)
    os.close(read)
    os.close(write)

    def restore():  # the filter sees the end of its input once no other process (that inherited fd 2) holds it
        sys.stderr.flush()
        os.dup2(saved, 2)
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    atexit.register(restore)
    return restore


# Checkpoints (orbax), --resume, load_model and --eval-model, strict JSON ----------------------------------------------
# --resume may change these (and --total-timesteps without --anneal-lr): they do not change the run's math
RESUME_MAY_CHANGE = tuple(
    "log_dir updates_per_chunk checkpoint_every keep_checkpoints compile_cache track wandb_project_name wandb_entity "
    "save_model".split()
)
NOT_COMPARED = tuple(
    "resume eval_model eval_episodes eval_greedy eval_reset_every_trial eval_untrained batch_size minibatch_size "
    "num_updates".split()
)
LAUNCH = ("distributed", "coordinator_address", "num_processes", "process_id")  # this process's, never a saved run's


def strict_json(x):
    """NaN and +-inf -> None, numpy -> Python: what json.dump(..., allow_nan=False) accepts."""
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [strict_json(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x.item() if isinstance(x, np.generic) else x


def write_json(path: str, obj):
    with open(path, "w") as f:
        json.dump(strict_json(obj), f, indent=2, allow_nan=False)


def args_from(saved: dict) -> Args:
    saved = {"seed_batching": "vmap", **saved}  # runs saved before --seed-batching ran vmap
    return Args(**{f.name: saved[f.name] for f in fields(Args) if f.name in saved and f.name not in LAUNCH})


def run_folder(path: str) -> str:
    """The run folder of a `.cleanrl_model` file, of a run folder or of its `checkpoints/` folder."""
    path = os.path.abspath(path)
    return os.path.dirname(path) if os.path.isfile(path) or os.path.basename(path) == "checkpoints" else path


def checkpoints(path: str, args: Args | None = None) -> ocp.CheckpointManager:
    """A run's `checkpoints/`, to read (no `args`) or to write (keeps the latest --keep-checkpoints). Step = PPO
    updates done; items: `state` (every seed's RunnerState, PRNG keys as key_data) and `meta` (JSON: the Args, the
    per-update metrics so far, run seconds so far). Every process of a --distributed run writes its own shards."""
    folder = os.path.join(run_folder(path), "checkpoints")
    if args is None and not os.path.isdir(folder):
        raise FileNotFoundError(f"{path} is neither a .cleanrl_model file nor a run folder with checkpoints/")
    options = ocp.CheckpointManagerOptions(max_to_keep=args.keep_checkpoints, create=True) if args else None
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(folder, options=options, item_handlers=handlers)


def restore_checkpoint(path: str, target: RunnerState | None = None, meta_only: bool = False):
    """(step, meta, state) of the latest checkpoint. The state takes `target`'s structure and sharding (a fresh
    init: the resumed arrays are bit-identical), or without one comes as nested dicts on this process's first
    device (whichever processes and devices wrote it)."""
    manager = checkpoints(path)
    if (step := manager.latest_step()) is None:
        raise FileNotFoundError(f"{path} holds no checkpoint")
    items = {"meta": ocp.args.JsonRestore()}
    if target is None and not meta_only:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        as_saved = lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)  # noqa: E731
        items["state"] = ocp.args.StandardRestore(jax.tree.map(as_saved, manager.item_metadata(step)["state"]))
    elif not meta_only:
        items["state"] = ocp.args.StandardRestore(target._replace(key=jax.random.key_data(target.key)))
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    manager.close()
    state = restored.get("state")
    return step, restored["meta"], state._replace(key=jax.random.wrap_key_data(state.key)) if target else state


def save_checkpoint(manager, runner: RunnerState, args: Args, history: list, run_s: float) -> int:
    """Checkpoint `runner` (the last completed chunk); written in the background while training goes on."""
    optimizer_steps = np.asarray(runner.train_state.step.addressable_shards[0].data)[0]  # the same in every seed
    step = int(optimizer_steps) // (args.num_minibatches * args.update_epochs)
    if step not in manager.all_steps():
        meta = strict_json({"args": asdict(args), "history": history[:step], "run_seconds": run_s})
        state = ocp.args.StandardSave(runner._replace(key=jax.random.key_data(runner.key)))
        manager.save(step, args=ocp.args.Composite(state=state, meta=ocp.args.JsonSave(meta)))
    return step


def load_model(path: str) -> tuple[Args, dict]:
    """`(args, params)` of a `--save-model` file, or of a run folder's latest checkpoint. The params have a leading
    [num_seeds] axis: `network.apply(jax.tree.map(lambda x: x[i], params), ...)` acts as seed args.seed + i."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            saved = flax.serialization.msgpack_restore(f.read())
        return args_from(saved["0"]), saved["1"]
    _, meta, state = restore_checkpoint(path)
    return args_from(meta["args"]), state["train_state"]["params"]


def parse_args() -> tuple[Args, str | None]:
    """The CLI: `(args, error or None)`. With --resume or --eval-model the defaults are the saved run's Args, and a
    flag that would change that run's math is refused. --distributed joins the other processes here."""
    args = tyro.cli(Args)
    if not args.eval_model:  # check_args refuses --distributed with --eval-model: nothing to join then
        start_distributed(args)  # before anything starts JAX's backend (reading a checkpoint does)
    if not (path := args.resume or args.eval_model):
        return args, None
    flag, whose = ("--resume", "checkpoint") if args.resume else ("--eval-model", "model")
    try:
        if args.resume and args.eval_model:
            raise ValueError("--resume and --eval-model exclude each other")
        if args.eval_model:
            saved, done = load_model(path)[0], 0
        else:
            step, meta, _ = restore_checkpoint(path, meta_only=True)
            saved = args_from(meta["args"])
            done = step * saved.batch_size
    except (FileNotFoundError, ValueError) as error:
        return args, f"{flag}: {error}"
    args = tyro.cli(Args, default=saved)
    if args.resume and (new := args.total_timesteps) < done:
        return args, f"--resume: --total-timesteps {new} is below the {done} steps the checkpoint has done"
    free = ("total_timesteps",) if args.eval_model or not args.anneal_lr else ()
    allowed = ", ".join("--" + name.replace("_", "-") for name in ("total_timesteps",) + RESUME_MAY_CHANGE)
    allowed = f"the run (allowed to change: {allowed})"
    for name in (f.name for f in fields(Args) if f.name not in free + RESUME_MAY_CHANGE + NOT_COMPARED + LAUNCH):
        if (new := getattr(args, name)) != (old := getattr(saved, name)):
            why = "the learning-rate schedule (--anneal-lr)" if name == "total_timesteps" else allowed
            option = "--" + name.replace("_", "-")
            return args, f"{flag}: {option} {new} differs from the {whose}'s {old}; it would change {why}"
    return args, None


def in_context_record(seeds: list[int], trial_returns: np.ndarray) -> dict:
    """The in-context curve of `trial_returns` [seeds, episodes, trials]: per seed the mean return of each trial and
    the gain (mean of trials 2..K minus trial 1); across seeds the mean and std of both."""
    curves = trial_returns.mean(1)
    gains = curves[:, 1:].mean(1) - curves[:, 0]
    mean_std = lambda x: {"mean": x.mean(0), "std": x.std(0)}  # noqa: E731  (over seeds)
    record = {"trial_returns": mean_std(curves), "gain": mean_std(gains)}
    record["per_seed"] = {str(s): {"trial_returns": c, "gain": g} for s, c, g in zip(seeds, curves, gains)}
    return strict_json(record)


def in_context_line(record: dict) -> str:
    curve = record["trial_returns"]["mean"]
    return (f"in-context curve (mean over seeds): trial 1 {curve[0]:+.4f}, trial {len(curve)} {curve[-1]:+.4f}; gain "
            f"(trials 2-{len(curve)} minus trial 1) {record['gain']['mean']:+.4f} +- {record['gain']['std']:.4f}")


def evaluate_model(args: Args) -> dict:
    """--eval-model: every seed's saved (or with --eval-untrained, initial) policy plays --eval-episodes episodes;
    prints and writes eval.json (eval_untrained.json, eval_reset_every_trial.json for the controls)."""
    derive_sizes(args)
    seeds = [args.seed + i for i in range(args.num_seeds)]
    keys = jax.vmap(jax.random.key)(jnp.array(seeds))  # the training's seed keys: --eval-untrained inits as it did
    if args.eval_untrained:
        params = over_seeds(make_train(args)[0], args.seed_batching)(keys).train_state.params
    else:
        params = load_model(args.eval_model)[1]
    results = to_host(over_seeds(make_evaluate(args), args.seed_batching)(params, keys))
    returns, means = results["return"], results["return"].mean(1)  # [seeds, N]; the std is that of the seeds' means
    result = {"model": os.path.abspath(args.eval_model), "env_id": args.env_id, "greedy": args.eval_greedy}
    result.update(untrained=args.eval_untrained, reset_every_trial=args.eval_reset_every_trial)
    result.update(episodes_per_seed=args.eval_episodes, mean=means.mean(), std=means.std())
    result["per_seed"] = {str(s): {"mean": r.mean(), "std": r.std()} for s, r in zip(seeds, returns)}
    if "trial_returns" in results:
        result["in_context"] = in_context_record(seeds, results["trial_returns"])
    result = strict_json(result)
    for s, r in result["per_seed"].items():
        print(f"seed {s}: return {r['mean']:.4f} +- {r['std']:.4f} over {args.eval_episodes} episodes")
    controls = [name for name in ("untrained", "reset_every_trial") if result[name]]
    path = os.path.join(run_folder(args.eval_model), "_".join(["eval"] + controls) + ".json")
    write_json(path, result)
    how = " ".join(["greedy" if args.eval_greedy else "sampled"] + [c.replace("_", "-") for c in controls])
    print(f"{how} return over {args.num_seeds} seed(s): {result['mean']:.4f} +- {result['std']:.4f}; written to {path}")
    if "in_context" in result:
        print(in_context_line(result["in_context"]))
    return result


# Training loop, logging -----------------------------------------------------------------------------------------------
def summarize(args: Args, history: list[dict], mmer: np.ndarray, compile_s: float, run_s: float) -> dict:
    """Per-seed and across-seed results: the MMER the loop kept, and the return of each seed's last rollout that
    completed episodes."""
    returns = np.array([h["episodic_return"] for h in history], float).reshape(len(history), args.num_seeds).T
    final = [r[~np.isnan(r)][-1] if (~np.isnan(r)).any() else None for r in returns]
    seeds = [str(args.seed + i) for i in range(args.num_seeds)]
    per_seed = {s: strict_json({"mmer": m, "final_episodic_return": f}) for s, m, f in zip(seeds, mmer, final)}
    steps = len(history) * args.batch_size
    summary = dict(env_id=args.env_id, updates=len(history), global_step=steps, compile_seconds=compile_s)
    summary.update(run_seconds=run_s, sps=steps * args.num_seeds / run_s if run_s > 0 else None, per_seed=per_seed)
    for key in ("mmer", "final_episodic_return"):
        values = [v[key] for v in per_seed.values() if v[key] is not None]
        summary[key] = {"mean": float(np.mean(values)), "std": float(np.std(values))} if values else None
    return summary


def console_mean(values, spec: str = "+.3f", spread: bool = False) -> str:
    """For the console: the mean over seeds of `values` (NaN, -inf or None where no episode ended), with spread=True
    "mean +- std", of the finite ones only; "(no episode ended)" if none is finite. Progress lines and summaries never
    print nan; what is logged keeps its gaps (no TensorBoard point for such an update, null in summary.json)."""
    x = np.array(values, float).ravel()  # None -> NaN
    x = x[np.isfinite(x)]
    if not x.size:
        return "(no episode ended)"
    return f"{x.mean():{spec}} +- {x.std():{spec.lstrip('+')}}" if spread else f"{x.mean():{spec}}"


def log_iteration(writers: dict, metrics: dict, mmer: np.ndarray, global_step: int):
    """One iteration's TensorBoard scalars; `writers`: {seed index: writer} of this process's seeds."""
    for i, writer in writers.items():
        if not np.isnan(metrics["episodic_return"][i]):
            writer.add_scalar("charts/episodic_return", metrics["episodic_return"][i], global_step)
            writer.add_scalar("charts/episodic_length", metrics["episodic_length"][i], global_step)
            writer.add_scalar("charts/mmer", mmer[i], global_step)
        writer.add_scalar("charts/learning_rate", metrics["learning_rate"][i], global_step)
        for name in ("value_loss", "policy_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac"):
            writer.add_scalar(f"losses/{name}", metrics[name][i], global_step)
        writer.add_scalar("losses/explained_variance", metrics["explained_variance"][i], global_step)


def log_in_context(writers: dict, record: dict, global_step: int):
    """A final evaluation's in-context curve: each trial's mean return, and the gain."""
    for i, writer in writers.items():
        seed = record["per_seed"][list(record["per_seed"])[i]]
        for k, value in enumerate(seed["trial_returns"]):
            writer.add_scalar(f"eval/trial_{k + 1}_return", value, global_step)
        writer.add_scalar("eval/in_context_gain", seed["gain"], global_step)


def main(args: Args) -> dict:
    """Train (or with args.resume continue) a run; returns its summary. Checkpoints, TensorBoard, summary.json. On
    Ctrl-C or SIGTERM it writes everything, then raises KeyboardInterrupt."""
    start_distributed(args)
    derive_sizes(args)
    chunk = args.updates_per_chunk or default_chunk(args.num_updates)
    stamp = int(multihost_utils.broadcast_one_to_all(np.int32(time.time())))  # the run folder's: process 0's
    run_dir = args.resume or os.path.join(args.log_dir, f"{args.env_id}__{args.exp_name}__{args.seed}__{stamp}")
    run_name, seeds = os.path.basename(os.path.normpath(run_dir)), [args.seed + i for i in range(args.num_seeds)]
    lead = jax.process_index() == 0  # process 0 alone prints, writes summary.json and the model, runs wandb
    print0 = print if lead else lambda *_, **__: None
    history, run_s, compile_s, runner, failure, in_context = [], 0.0, 0.0, None, None, None
    if args.resume:  # the logs continue from the checkpoint: metrics so far (null -> NaN), run time
        meta = restore_checkpoint(run_dir, meta_only=True)[1]
        history, run_s = [{k: np.array(v, float) for k, v in h.items()} for h in meta["history"]], meta["run_seconds"]
    if args.track and lead:
        import wandb

        settings = dict(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args), name=run_name)
        wandb.init(sync_tensorboard=True, save_code=True, **settings)
    sharding = seed_sharding(args.num_seeds)
    purge_step = len(history) * args.batch_size + 1 if args.resume else None  # TensorBoard drops what followed
    mine = local_seeds(sharding, args.num_seeds)  # each process writes its seeds' runs
    writers = {i: SummaryWriter(os.path.join(run_dir, f"seed_{seeds[i]}"), purge_step=purge_step) for i in mine}
    table = "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    for writer in [] if args.resume else writers.values():
        writer.add_text("hyperparameters", table)
    manager = checkpoints(run_dir, args) if args.checkpoint_every or args.resume else None
    last_saved = len(history)
    # MMER: the running max over iterations of each seed's mean completed-episode return
    mmer = np.fmax.reduce([np.full(args.num_seeds, -np.inf)] + [h["episodic_return"] for h in history])

    init, update_chunk = make_train(args)
    keys = seed_keys(seeds, sharding)
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    resumed = f", from update {last_saved}" if args.resume else ""
    print0(f"{run_name}: {args.num_seeds} seed(s) on {sharding.mesh.size} {jax.default_backend()} device(s){processes}"
           f", {args.num_updates} updates of {args.batch_size} steps{resumed}")
    start = time.time()
    try:
        left = args.num_updates - len(history)
        chunk_lengths = {min(chunk, left), left % chunk} - {0}
        runner, compiled = compile_training(init, update_chunk, keys, sharding, chunk_lengths, args.seed_batching)
        if args.resume:
            runner = restore_checkpoint(run_dir, runner)[2]
        compile_s = time.time() - start
        print0(f"compiled in {compile_s:.1f} s")
        while len(history) < args.num_updates:
            n = min(chunk, args.num_updates - len(history))
            t = time.time()
            new_runner, metrics = compiled[n](runner)
            metrics = to_host(jax.block_until_ready(metrics))  # [seeds, n], on every process
            run_s += (elapsed := time.time() - t)
            if not (finite := metrics.pop("finite")).all():  # log the iterations before the first bad one, then stop
                n, i = min((u, i) for i, u in zip(*np.nonzero(~finite)))
                failure = f"non-finite loss/parameters at update {len(history) + n + 1} (seed {seeds[i]})"
            for u in range(n):
                history.append({k: v[:, u] for k, v in metrics.items()})
                iteration, mmer = len(history), np.fmax(mmer, history[-1]["episodic_return"])
                log_iteration(writers, history[-1], mmer, global_step := iteration * args.batch_size)
            if failure:
                break
            runner, sps = new_runner, n * args.batch_size / elapsed
            for writer in writers.values():
                writer.add_scalar("charts/SPS", sps, global_step)
                writer.flush()
            if args.checkpoint_every and iteration // args.checkpoint_every > last_saved // args.checkpoint_every:
                last_saved = save_checkpoint(manager, runner, args, history, run_s)
            eta = run_s / iteration * (args.num_updates - iteration)
            mean_return, mean_mmer = console_mean(history[-1]["episodic_return"]), console_mean(mmer)
            print0(f"step {global_step:>10,}/{args.num_updates * args.batch_size:,} | SPS {sps * args.num_seeds:,.0f} "
                   f"(all seeds) | return {mean_return} | mmer {mean_mmer} | ETA {eta:.0f} s", flush=True)
        if not failure and getattr(make_env(args, 1)[0], "num_trials", 0):  # a meta-env: the in-context curve
            results = to_host(over_seeds(make_evaluate(args), args.seed_batching)(runner.train_state.params, keys))
            in_context = in_context_record(seeds, results["trial_returns"])
            log_in_context(writers, in_context, len(history) * args.batch_size)
            print0(in_context_line(in_context))
    except KeyboardInterrupt:  # raised again once the finally below has written everything
        print(f"\ninterrupted after {len(history)} updates; writing what was logged", file=sys.stderr)
        raise
    finally:  # a crash, Ctrl-C or SIGTERM keeps everything logged so far, writes the summary and a checkpoint
        if manager is not None:
            if args.checkpoint_every and runner is not None and not failure:
                last_saved = save_checkpoint(manager, runner, args, history, run_s)
            manager.wait_until_finished()
            manager.close()
        summary = summarize(args, history, mmer, compile_s, run_s)
        for s, r in summary["per_seed"].items():
            print0(f"seed {s}: mmer {console_mean(r['mmer'], '.4f')}, "
                   f"final return {console_mean(r['final_episodic_return'], '.4f')}")
        if history:
            mmers, sps = [r["mmer"] for r in summary["per_seed"].values()], summary["sps"] or 0
            print0(f"MMER over {args.num_seeds} seed(s): {console_mean(mmers, '.4f', spread=True)} | "
                   f"compile {compile_s:.1f} s, run {run_s:.1f} s, {sps:,.0f} steps/s")
        summary.update({"in_context": in_context} if in_context else {})
        if lead:
            write_json(os.path.join(run_dir, "summary.json"), {"args": asdict(args), **summary})
        if args.save_model and runner is not None:  # every seed's parameters: a leading [num_seeds] axis
            model, path = to_host(runner.train_state.params), os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
            if lead:
                with open(path, "wb") as f:
                    f.write(flax.serialization.to_bytes([asdict(args), model]))
                print(f"model saved to {path}")
        for writer in writers.values():
            writer.close()
        if args.track and lead:
            wandb.finish()
        print0(f"results in {run_dir}" + (f"; latest checkpoint: update {last_saved}" if manager else ""))
    if failure:
        where = f"update {last_saved} in {os.path.join(run_dir, 'checkpoints')}" if manager and last_saved else "none"
        raise SystemExit(f"error: {failure}; last good checkpoint: {where}")
    return summary


if __name__ == "__main__":
    # Python leaves SIGINT ignored when started from a background shell; Ctrl-C must stop cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM (preemption) stops like Ctrl-C
    args, error = parse_args()  # with --distributed, joins the multi-process run first
    enable_compile_cache(args.compile_cache)  # before anything is compiled (JAX decides once per process)
    restore_stderr = quiet_cache_loads(args.compile_cache)
    error = error or check_args(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        evaluate_model(args) if args.eval_model else main(args)
    except KeyboardInterrupt:
        if args.eval_model:
            raise
        # Stopped with everything written: end now. JAX's exit-time teardown would first wait for the update still
        # running on the device (a whole chunk at worst, minutes at the paper's settings).
        sys.stdout.flush()
        restore_stderr()
        os._exit(0)
