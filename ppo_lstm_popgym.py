"""PPO with a resettable LSTM (or GRU) memory on POPGym, in one file: the recurrent baseline
of Lu et al., "Structured State Space Models for In-Context Reinforcement Learning" (NeurIPS 2023).

Everything but the memory is ppo_s5_popgym.py line for line: the recurrent state is cleared at
episode boundaries with the same convention as the S5 scan, but a cell steps through time one
input at a time (lax.scan). Seeds are a vmapped (and device-sharded) leading axis; each seed gets
its own TensorBoard run.

    python ppo_lstm_popgym.py --env-id CartPoleHard --num-seeds 8
    tensorboard --logdir runs

Defaults are the paper's POPGym settings (64 envs x 1024 steps, 30 epochs x 8 minibatches,
lr 5e-5, GAE lambda 1.0, a recurrent core of width 256). The README gives smaller settings for a CPU.
"""

import json
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal, NamedTuple

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax.training.train_state import TrainState
from gymnax.environments import spaces
from tensorboardX import SummaryWriter

import envs_popjax


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed of the first run; run i of `--num-seeds` uses seed + i"""
    num_seeds: int = 1
    """number of independent seeds, vmapped and sharded over all visible devices"""
    log_dir: str = "runs"
    """folder under which the run folder is created"""
    save_model: bool = False
    """save every seed's parameters and these Args to `{run folder}/{exp_name}.cleanrl_model`"""
    updates_per_chunk: int = 0
    """PPO updates per jitted chunk between progress/TensorBoard writes (0: a divisor of the update count near 1/25 of it)"""

    # Algorithm specific arguments (defaults: the paper's POPGym settings)
    env_id: str = "RepeatPreviousEasy"
    """POPGym env id, e.g. CartPoleHard, RepeatPreviousEasy (see envs_popjax.ENV_IDS)"""
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


# ---------------------------------------------------------------------------------------------
# LSTM / GRU memory, reset at episode boundaries with the same convention as the S5 scan.
# ---------------------------------------------------------------------------------------------
class RNNMemory(nn.Module):
    """A resettable LSTM or GRU: `(carry, x[T, B, H], resets[T, B]) -> (carry, y[T, B, H])`.

    `resets[t, b] = True` means x[t, b] is the first input of a new episode: the carry is replaced
    by the initial (zero) carry before x[t, b] is consumed. The carry is `(c, h)` ([B, H] float32
    each) for the LSTM and `h` for the GRU; make it with `RNNMemory.initialize_carry`.
    """

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


# ---------------------------------------------------------------------------------------------
# Actor-critic: shared encoder and recurrent trunk, separate actor and critic heads (paper, app. B).
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------
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
    continuous = not isinstance(action_space, spaces.Discrete)
    action_dim = envs_popjax.action_size(action_space)
    memory = RNNMemory(hidden_size=args.hidden_size, cell=args.cell)
    return ActorCritic(action_dim, continuous, memory), action_dim, continuous


def make_train(args: Args):
    """Returns `(init, update_chunk)`, pure functions of one seed: `init(key) -> RunnerState` and
    `update_chunk(runner_state, num_updates) -> (runner_state, metrics[num_updates])`."""
    env, env_params = envs_popjax.make(args.env_id)
    env = envs_popjax.EpisodeStatsWrapper(envs_popjax.PreviousActionWrapper(env))
    network, action_dim, continuous = build_network(args, env, env_params)
    obs_size = env.observation_space(env_params).shape[0]
    new_carry = partial(RNNMemory.initialize_carry, hidden_size=args.hidden_size, cell=args.cell)

    def learning_rate(count):  # CleanRL's linear annealing, once per update
        frac = 1.0 - (count // (args.num_minibatches * args.update_epochs)) / args.num_updates
        return args.learning_rate * frac if args.anneal_lr else args.learning_rate

    # flatten: one vector for the optimizer instead of one per leaf, a smaller program to compile
    optimizer = optax.flatten(
        optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(learning_rate, eps=1e-5))
    )

    def init(key) -> RunnerState:
        key, key_params, key_env = jax.random.split(key, 3)
        dummy_obs = jnp.zeros((1, args.num_envs, obs_size))
        params = network.init(key_params, new_carry(args.num_envs), dummy_obs, jnp.ones((1, args.num_envs), bool))
        train_state = TrainState.create(apply_fn=network.apply, params=params, tx=optimizer)
        obs, env_state = jax.vmap(env.reset, (0, None))(jax.random.split(key_env, args.num_envs), env_params)
        done = jnp.ones(args.num_envs, bool)  # the first observation starts an episode
        return RunnerState(train_state, env_state, obs, done, new_carry(args.num_envs), key)

    def env_step(runner: RunnerState, _):
        key, key_action, key_env = jax.random.split(runner.key, 3)
        carry, policy, value = network.apply(runner.train_state.params, runner.carry, runner.obs[None], runner.done[None])
        policy = jax.tree.map(lambda p: p[0], policy)
        action = policy_sample(key_action, policy, continuous)
        log_prob = policy_log_prob(policy, action, continuous)
        env_keys = jax.random.split(key_env, args.num_envs)
        obs, env_state, reward, terminated, truncated, info = jax.vmap(env.step, (0, 0, 0, None))(
            env_keys, runner.env_state, action, env_params
        )
        done = terminated | truncated  # POPGym returns are finite-horizon: truncation ends it too
        transition = Transition(
            runner.obs, runner.done, action, log_prob, value[0], reward, info["returned_episode"],
            info["returned_episode_return"], info["returned_episode_length"],
        )  # fmt: skip
        return RunnerState(runner.train_state, env_state, obs, done, carry, key), transition

    def ppo_loss(params, carry, batch: Transition, advantages, returns):
        _, policy, value = network.apply(params, carry, batch.obs, batch.done)
        log_prob = policy_log_prob(policy, batch.action, continuous)
        log_ratio = log_prob - batch.log_prob
        ratio = jnp.exp(log_ratio)
        if args.norm_adv:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        pg_loss = jnp.maximum(
            -advantages * ratio, -advantages * jnp.clip(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
        ).mean()
        if args.clip_vloss:
            value_clipped = batch.value + jnp.clip(value - batch.value, -args.clip_coef, args.clip_coef)
            v_loss = 0.5 * jnp.maximum((value - returns) ** 2, (value_clipped - returns) ** 2).mean()
        else:
            v_loss = 0.5 * ((value - returns) ** 2).mean()
        entropy = policy_entropy(policy, continuous).mean()
        loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss
        stats = dict(
            policy_loss=pg_loss, value_loss=v_loss, entropy=entropy,
            old_approx_kl=(-log_ratio).mean(),  # http://joschu.net/blog/kl-approx.html
            approx_kl=((ratio - 1) - log_ratio).mean(),
            clipfrac=(jnp.abs(ratio - 1) > args.clip_coef).mean(),
        )  # fmt: skip
        return loss, stats

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
                grads, stats = jax.grad(ppo_loss, has_aux=True)(train_state.params, carry, mb, mb_adv, mb_ret)
                return train_state.apply_gradients(grads=grads), stats

            return jax.lax.scan(minibatch_step, train_state, minibatches)

        key, key_epochs = jax.random.split(runner.key)
        train_state, stats = jax.lax.scan(epoch, runner.train_state, jax.random.split(key_epochs, args.update_epochs))
        runner = runner._replace(train_state=train_state, key=key)

        var_returns = jnp.var(returns)
        n_episodes = batch.episode_done.sum()
        metrics = {k: v.mean() for k, v in stats.items()}
        metrics.update(
            explained_variance=jnp.where(var_returns == 0, jnp.nan, 1 - jnp.var(returns - batch.value) / var_returns),
            episodes=n_episodes,
            # mean return of the episodes completed in this rollout (NaN if none completed)
            episodic_return=(batch.episode_return * batch.episode_done).sum() / jnp.where(n_episodes, n_episodes, jnp.nan),
            episodic_length=(batch.episode_length * batch.episode_done).sum() / jnp.where(n_episodes, n_episodes, jnp.nan),
            learning_rate=learning_rate(train_state.step - 1) * jnp.ones(()),
        )
        return runner, metrics

    def update_chunk(runner: RunnerState, num_updates: int):
        return jax.lax.scan(update_step, runner, None, num_updates)

    return init, update_chunk


# ---------------------------------------------------------------------------------------------
# Running: input checks, seeds and devices, logging
# ---------------------------------------------------------------------------------------------
def check_args(args: Args) -> str | None:
    """Return a one-line message saying what to change, or None if the settings can run."""
    try:
        envs_popjax.canonical_id(args.env_id)
    except ValueError as error:
        return f"--env-id: {error}"
    positive = ("num_seeds", "total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs",
                "hidden_size", "learning_rate")  # fmt: skip
    for name in positive:
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
    if args.updates_per_chunk < 0:
        return f"--updates-per-chunk must be >= 0, got {args.updates_per_chunk}"
    if args.num_envs % args.num_minibatches:
        return (f"--num-envs {args.num_envs} must be divisible by --num-minibatches {args.num_minibatches} "
                "(minibatches split the envs into whole sequences)")  # fmt: skip
    if args.total_timesteps < args.num_envs * args.num_steps:
        return (f"--total-timesteps {args.total_timesteps} gives zero updates: one update takes "
                f"--num-envs x --num-steps = {args.num_envs * args.num_steps} steps")  # fmt: skip
    return None


def seed_sharding(num_seeds: int):
    """Shard the leading seed axis over as many devices as divide the number of seeds."""
    devices = jax.devices()
    n = math.gcd(num_seeds, len(devices))
    mesh = jax.sharding.Mesh(np.array(devices[:n]), ("seed",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("seed"))


def summarize(args: Args, history: list[dict], compile_s: float, run_s: float, steps_done: int) -> dict:
    """Per-seed and across-seed results from the per-update metrics (arrays of [seeds])."""
    seeds = [args.seed + i for i in range(args.num_seeds)]
    returns = np.array([h["episodic_return"] for h in history]).reshape(len(history), args.num_seeds)
    finished = [r[~np.isnan(r)] for r in returns.T]  # per seed, the updates that completed episodes
    per_seed = {str(s): {"mmer": float(f.max()) if f.size else None, "final_episodic_return": float(f[-1]) if f.size else None}
                for s, f in zip(seeds, finished)}  # fmt: skip
    summary = {"env_id": args.env_id, "updates": len(history), "global_step": steps_done,
               "compile_seconds": compile_s, "run_seconds": run_s,
               "sps": steps_done * args.num_seeds / run_s if run_s > 0 else None, "per_seed": per_seed}  # fmt: skip
    for key in ("mmer", "final_episodic_return"):
        values = [v[key] for v in per_seed.values() if v[key] is not None]
        summary[key] = {"mean": float(np.mean(values)), "std": float(np.std(values))} if values else None
    return summary


def compile_training(init, update_chunk, keys, sharding, chunk_lengths):
    """Initialise every seed (`keys`: [seeds], sharded; parameters outside the training jit) and
    compile `update_chunk` per chunk length, all programs at once: XLA compiles each on one thread.
    Returns `(runner_state with a leading seed axis on every leaf, {length: compiled chunk})`."""
    init_lowered = jax.jit(jax.vmap(init), out_shardings=sharding).lower(keys)
    lowered = [init_lowered] + [
        jax.jit(jax.vmap(partial(update_chunk, num_updates=n)), in_shardings=sharding, out_shardings=sharding)
        .lower(init_lowered.out_info) for n in sorted(chunk_lengths)
    ]  # fmt: skip
    with ThreadPoolExecutor(len(lowered)) as pool:
        init_compiled, *chunks = pool.map(lambda program: program.compile(), lowered)
    return init_compiled(keys), dict(zip(sorted(chunk_lengths), chunks))


def derive_sizes(args: Args) -> Args:
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // args.num_minibatches
    args.num_updates = args.total_timesteps // args.batch_size
    return args


def main(args: Args) -> dict:
    derive_sizes(args)
    # default: the largest divisor of num_updates up to 1/25 of it, so one program is compiled
    chunk = args.updates_per_chunk or max(d for d in range(1, max(1, args.num_updates // 25) + 1) if args.num_updates % d == 0)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.log_dir, run_name)
    seeds = [args.seed + i for i in range(args.num_seeds)]
    writers = [SummaryWriter(os.path.join(run_dir, f"seed_{s}")) for s in seeds]
    table = "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    for writer in writers:
        writer.add_text("hyperparameters", table)

    init, update_chunk = make_train(args)
    sharding = seed_sharding(args.num_seeds)
    keys = jax.device_put(jax.vmap(jax.random.key)(jnp.array(seeds)), sharding)
    print(f"{run_name}: {args.num_seeds} seed(s) on {sharding.mesh.size} {jax.default_backend()} device(s), "
          f"{args.num_updates} updates of {args.batch_size} steps")  # fmt: skip
    start = time.time()
    history, mmer, steps_done, run_s, compile_s, runner = [], np.full(args.num_seeds, -np.inf), 0, 0.0, 0.0, None
    try:
        chunk_lengths = {min(chunk, args.num_updates), args.num_updates % chunk or chunk}
        runner, compiled_chunk = compile_training(init, update_chunk, keys, sharding, chunk_lengths)
        compile_s = time.time() - start
        print(f"compiled in {compile_s:.1f} s")
        while len(history) < args.num_updates:
            n = min(chunk, args.num_updates - len(history))
            t = time.time()
            runner, metrics = compiled_chunk[n](runner)
            metrics = jax.tree.map(np.asarray, jax.block_until_ready(metrics))  # [seeds, n]
            elapsed = time.time() - t
            run_s += elapsed
            sps = n * args.batch_size / elapsed
            for u in range(n):
                steps_done += args.batch_size
                update = {k: v[:, u] for k, v in metrics.items()}
                history.append(update)
                ret = update["episodic_return"]
                mmer = np.where(np.isnan(ret), mmer, np.maximum(mmer, np.nan_to_num(ret, nan=-np.inf)))
                for i, writer in enumerate(writers):
                    if not np.isnan(ret[i]):
                        writer.add_scalar("charts/episodic_return", ret[i], steps_done)
                        writer.add_scalar("charts/episodic_length", update["episodic_length"][i], steps_done)
                        writer.add_scalar("charts/mmer", mmer[i], steps_done)
                    writer.add_scalar("charts/learning_rate", update["learning_rate"][i], steps_done)
                    for name in ("value_loss", "policy_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac",
                                 "explained_variance"):  # fmt: skip
                        writer.add_scalar(f"losses/{name}", update[name][i], steps_done)
            for writer in writers:
                writer.add_scalar("charts/SPS", sps, steps_done)
                writer.flush()
            eta = run_s / len(history) * (args.num_updates - len(history))
            last = history[-1]["episodic_return"]
            mean_ret = np.nanmean(last) if np.isfinite(last).any() else float("nan")
            mean_mmer = mmer[np.isfinite(mmer)].mean() if np.isfinite(mmer).any() else float("nan")
            print(f"step {steps_done:>10,}/{args.num_updates * args.batch_size:,} | SPS {sps * args.num_seeds:,.0f} "
                  f"(all seeds) | return {mean_ret:+.3f} | mmer {mean_mmer:+.3f} | ETA {eta:.0f} s", flush=True)  # fmt: skip
    except KeyboardInterrupt:
        print(f"\ninterrupted after {len(history)} updates; writing what was logged", file=sys.stderr)
    finally:  # a crash or Ctrl-C keeps everything logged so far, and writes the summary
        summary = summarize(args, history, compile_s, run_s, steps_done)
        for s in seeds:
            r = summary["per_seed"][str(s)]
            print(f"seed {s}: mmer {r['mmer']}, final return {r['final_episodic_return']}")
        if summary["mmer"]:
            print(f"MMER over {args.num_seeds} seed(s): {summary['mmer']['mean']:.4f} +- {summary['mmer']['std']:.4f} | "
                  f"compile {compile_s:.1f} s, run {run_s:.1f} s, {summary['sps'] or 0:,.0f} steps/s")  # fmt: skip
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump({"args": asdict(args), **summary}, f, indent=2)
        if args.save_model and runner is not None:
            path = os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
            with open(path, "wb") as f:  # params carry a leading [num_seeds] axis
                f.write(flax.serialization.to_bytes([asdict(args), jax.device_get(runner.train_state.params)]))
            print(f"model saved to {path}")
        for writer in writers:
            writer.close()
        print(f"results in {run_dir}")
    return summary


if __name__ == "__main__":
    # Python leaves SIGINT ignored when started from a background shell; Ctrl-C must stop cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = tyro.cli(Args)
    error = check_args(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    main(args)
