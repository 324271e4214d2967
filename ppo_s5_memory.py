"""PPO with a resettable S5 memory on bsuite's MemoryChain, swept over memory lengths (the memory length experiment of
Lu et al., "Structured State Space Models for In-Context Reinforcement Learning", NeurIPS 2023), in one file.

The agent sees a context bit (+-1) at the start of an episode and must answer it L steps later; only that last step
is rewarded (+1 right, -1 wrong). Every (memory length, seed) pair that shares a rollout length is one entry of a
single vmapped program (the memory length is an env param, not a shape), sharded over the devices of every process;
the groups train one after the other. Each pair gets its own TensorBoard run; the run folder also gets a summary
table, JSON and a plot of success rate against memory length.

    python ppo_s5_memory.py --num-seeds 4                               # bsuite's lengths 1..100
    python ppo_s5_memory.py --memory-lengths 255 1023 --num-envs 8 --total-timesteps 20000000
    python ppo_s5_memory.py --resume runs/MemoryChain__...             # continue a stopped sweep
    python ppo_s5_memory.py --eval-model runs/MemoryChain__...         # evaluate its saved parameters
    tensorboard --logdir runs
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
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache, partial
from typing import Literal, NamedTuple

import flax.linen as nn
import flax.serialization
import jax
import jax.extend
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import orbax.checkpoint as ocp
import tyro
from flax.training.train_state import TrainState
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

import envs_popjax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# bsuite's memory_len sweep (bsuite/experiments/memory_len/sweep.py)
BSUITE_MEMORY_LENGTHS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 17, 20, 25, 30, 40, 50, 60, 70, 80, 90, 100)
# bsuite's score: learned if (1 - success rate over training) / 0.5 (a random agent's error rate) < 0.75
BSUITE_REGRET_THRESHOLD = 0.75
# no verdict (solved or learned) from fewer episodes than this: random play passes 0.9 on 10 episodes 1% of the time
MIN_VERDICT_EPISODES = 100


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed of the first run; run i of `--num-seeds` uses seed + i (the same seed for every length)"""
    num_seeds: int = 4
    """number of independent seeds per memory length"""
    log_dir: str = "runs"
    """folder under which the run folder is created"""
    save_model: bool = False
    """save the parameters of every (length, seed) and these Args to `{run folder}/{exp_name}.cleanrl_model`"""
    updates_per_chunk: int = 0
    """PPO updates per jitted chunk between progress/TensorBoard writes (0: a divisor near 1/25 of a group's)"""
    seed_batching: Literal["auto", "vmap", "loop"] = "auto"
    """how a device runs its (length, seed) pairs: vmap (one batched program), loop (one device holds them all and
    runs the one-pair program for each in turn: a pair is bit-identical to a run of that length and seed alone), or
    auto: vmap, the faster for S5 (benchmarks/bench_seed_batching.py)"""
    checkpoint_every: int = 20
    """checkpoint the sweep (finished groups' results and parameters, the current group's training state) every N
    updates over all groups, at the first chunk boundary after each N, at the end and on Ctrl-C/SIGTERM; 0: never"""
    keep_checkpoints: int = 3
    """how many of the latest checkpoints to keep"""
    resume: str = ""
    """continue the sweep in this run folder from its latest checkpoint (the other flags come from the checkpoint;
    only the logging/running flags may change): finished groups are skipped, the group under way continues"""
    eval_model: str = ""
    """evaluate a saved model (a `.cleanrl_model` file or a run folder's checkpoint) instead of training"""
    eval_episodes: int = 100
    """episodes per (length, seed) played by --eval-model"""
    eval_greedy: bool = False
    """--eval-model acts greedily (argmax) instead of sampling"""
    compile_cache: str = "~/.cache/s5_icrl_jax"
    """JAX persistent compilation cache folder ('': off; the JAX_COMPILATION_CACHE_DIR environment variable wins)"""
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

    # Algorithm specific arguments
    memory_lengths: tuple[int, ...] = BSUITE_MEMORY_LENGTHS
    """memory lengths L to sweep (an episode lasts L + 1 steps); any list, e.g. 256 1024 4096"""
    num_bits: int = 1
    """context bits (bsuite's memory_len uses 1; its memory_size experiment varies this)"""
    total_timesteps: int = 1_000_000
    """environment steps per (length, seed)"""
    learning_rate: float = 1e-3
    """Adam learning rate"""
    num_envs: int = 16
    """parallel environments per (length, seed)"""
    num_steps: int = 0
    """steps per env per rollout; 0: per length, the smallest multiple of L + 1 that is >= 32 (see rollout_length)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to zero over training"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """lambda of generalised advantage estimation"""
    num_minibatches: int = 4
    """minibatches per epoch; each holds num_envs / num_minibatches whole sequences"""
    update_epochs: int = 4
    """epochs over each rollout"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_coef: float = 0.2
    """PPO ratio clipping coefficient"""
    clip_vloss: bool = True
    """clip the value loss like the policy ratio"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient norm clip"""
    success_window: float = 0.1
    """final fraction of the updates whose completed episodes give the final success rate"""
    solve_threshold: float = 0.9
    """a (length, seed) is solved if its final success rate is at least this (random play: 0.5)"""

    # S5 memory (much smaller than the POPGym defaults: the task needs one bit of memory)
    hidden_size: int = 32
    """width of the encoder's first layer and of the actor and critic heads"""
    d_model: int = 32
    """width H of the encoder output and of every S5 layer"""
    ssm_size: int = 32
    """state size P of each S5 layer before conjugate symmetry halves it"""
    n_layers: int = 2
    """number of stacked S5 layers"""
    s5_blocks: int = 1
    """number of HiPPO-N blocks on the diagonal of the initial state matrix"""
    conj_sym: bool = True
    """keep one of each conjugate eigenvalue pair (P/2 complex states, output 2 Re(C x))"""
    clip_eigs: bool = False
    """clip Re(Lambda) below zero so every mode stays stable"""
    dt_min: float = 0.001
    """smallest initial step size of the zero-order-hold discretisation"""
    dt_max: float = 0.1
    """largest initial step size"""
    activation: Literal["full_glu", "half_glu1", "half_glu2", "gelu"] = "full_glu"
    """activation after each S5 layer"""
    prenorm: bool = False
    """LayerNorm before each S5 layer"""
    postnorm: bool = False
    """LayerNorm after each residual (its own parameters, separate from the prenorm's)"""
    s5_scan: Literal["auto", "parallel", "sequential"] = "auto"
    """the recurrence as an associative scan or lax.scan (same numbers to round-off); auto: lax.scan on CPU"""


# S5 (Smith et al. 2023) with resets inside the scan (Lu et al. 2023, section 3) ---------------------------------------
@dataclass(frozen=True)
class S5Config:
    """The S5 memory's settings; the names are Args' S5 flags (documented there)."""

    d_model: int = 256
    ssm_size: int = 256
    n_layers: int = 4
    s5_blocks: int = 1
    conj_sym: bool = True
    clip_eigs: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    activation: str = "full_glu"
    prenorm: bool = False
    postnorm: bool = False
    s5_scan: str = "parallel"

    @classmethod
    def from_args(cls, args) -> "S5Config":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def error(self) -> str | None:
        """What to change when the state does not split into even blocks, else None."""
        if self.ssm_size % self.s5_blocks or (self.conj_sym and (self.ssm_size // self.s5_blocks) % 2):
            return (f"--ssm-size {self.ssm_size} must split into --s5-blocks {self.s5_blocks} equal blocks"
                    + (" of even size (conjugate symmetry keeps half of each)" if self.conj_sym else ""))  # fmt: skip
        return None


@lru_cache  # called at every trace of every layer; the eigendecomposition is the slow part
def hippo_n_diagonalised(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors of the normal part of HiPPO-LegS (S5 section 4.1).

    HiPPO-LegS plus the rank-1 term p p^T (p_k = sqrt(k + 1/2)) is -I/2 + a skew-symmetric
    matrix K, so its eigenvalues are -1/2 + i w with i w the eigenvalues of K.
    """
    q = np.sqrt(2 * np.arange(n) + 1.0)
    hippo = -(np.tril(np.outer(q, q)) - np.diag(np.arange(n)))
    p = np.sqrt(np.arange(n) + 0.5)
    normal = hippo + np.outer(p, p)
    skew = normal - np.diag(np.diag(normal))
    w, eigenvectors = np.linalg.eigh(-1j * skew)  # -iK is Hermitian; ascending w
    return np.diag(normal).mean() + 1j * w, eigenvectors


def reset_binary_operator(earlier, later):
    """Compose two affine maps x -> A x + b, unless the later one resets (c): then it alone counts.

    (A_i, b_i, c_i) . (A_j, b_j, c_j) = (c_j ? A_j : A_j A_i, c_j ? b_j : A_j b_i + b_j, c_i | c_j)
    """
    a_i, b_i, c_i = earlier
    a_j, b_j, c_j = later
    return jnp.where(c_j, a_j, a_j * a_i), jnp.where(c_j, b_j, a_j * b_i + b_j), c_i | c_j


def resettable_parallel_scan(lambda_bar, bu, resets, h0):
    """x_t = Bu_t if resets[t] else lambda_bar * x_{t-1} + Bu_t, with x_{-1} = h0, for all t at once.

    The carried state enters as an extra first element (1, h0, no reset). bu: [T, ..., P],
    resets: [T, ...] bool, h0: [..., P]. Returns x: [T, ..., P].
    """
    a = jnp.broadcast_to(lambda_bar, (bu.shape[0] + 1,) + bu.shape[1:]).at[0].set(1.0)
    b = jnp.concatenate([h0[None], bu])
    c = jnp.concatenate([jnp.zeros_like(resets[:1]), resets])[..., None]
    _, x, _ = jax.lax.associative_scan(reset_binary_operator, (a, b, c))
    return x[1:]


def resettable_sequential_scan(lambda_bar, bu, resets, h0):
    """The same recurrence as `resettable_parallel_scan`, one step at a time (lax.scan)."""

    def step(h, inputs):
        bu_t, reset_t = inputs
        h = jnp.where(reset_t[..., None], bu_t, lambda_bar * h + bu_t)
        return h, h

    return jax.lax.scan(step, h0, (bu, resets))[1]


class S5SSM(nn.Module):
    """One S5 state-space layer: complex diagonal Lambda, B, C, real D, learnable step, ZOH."""

    config: S5Config

    @nn.compact
    def __call__(self, h0, u, resets):
        cfg = self.config
        if error := cfg.error():
            raise ValueError(error)
        block_size = cfg.ssm_size // cfg.s5_blocks
        eigenvalues, eigenvectors = hippo_n_diagonalised(block_size)
        if cfg.conj_sym:  # eigenvalues come in conjugate pairs: keep one of each (S5 app. C.1)
            eigenvalues, eigenvectors = eigenvalues[: block_size // 2], eigenvectors[:, : block_size // 2]
        eigenvalues = np.tile(eigenvalues, cfg.s5_blocks)
        v = np.kron(np.eye(cfg.s5_blocks), eigenvectors)  # block-diagonal copies: [P, P_kept]
        v_inv = v.conj().T
        n_states = eigenvalues.shape[0]

        lambda_re = self.param("lambda_re", lambda _: jnp.asarray(eigenvalues.real, jnp.float32))
        lambda_im = self.param("lambda_im", lambda _: jnp.asarray(eigenvalues.imag, jnp.float32))

        def init_b(key):  # B~ = V^-1 B with B lecun-normal, stored as (real, imag)
            b = jnp.asarray(v_inv) @ nn.initializers.lecun_normal()(key, (cfg.ssm_size, cfg.d_model))
            return jnp.stack([b.real, b.imag], -1).astype(jnp.float32)

        def init_c(key):  # C~ = C V with C lecun-normal
            c = nn.initializers.lecun_normal()(key, (cfg.d_model, cfg.ssm_size, 2))
            c = (c[..., 0] + 1j * c[..., 1]) @ jnp.asarray(v)
            return jnp.stack([c.real, c.imag], -1).astype(jnp.float32)

        def init_log_step(key):  # log dt uniform in [log dt_min, log dt_max), one per state
            return jax.random.uniform(key, (n_states,), minval=math.log(cfg.dt_min), maxval=math.log(cfg.dt_max))

        b_param = self.param("B", init_b)
        c_param = self.param("C", init_c)
        d = self.param("D", nn.initializers.normal(stddev=1.0), (cfg.d_model,))
        log_step = self.param("log_step", init_log_step)

        if cfg.clip_eigs:
            lambda_re = jnp.minimum(lambda_re, -1e-4)
        lam = lambda_re + 1j * lambda_im
        b_tilde = b_param[..., 0] + 1j * b_param[..., 1]
        c_tilde = c_param[..., 0] + 1j * c_param[..., 1]
        # Zero-order hold: lambda_bar = exp(lambda dt), B_bar = (lambda_bar - 1) / lambda * B~.
        lambda_bar = jnp.exp(lam * jnp.exp(log_step))
        b_bar = ((lambda_bar - 1) / lam)[:, None] * b_tilde

        # Real inputs and outputs: two real matmuls do the work of complex ones at half the FLOPs.
        bu = u @ jnp.concatenate([b_bar.real, b_bar.imag]).T  # [..., 2 P_kept]
        bu = jax.lax.complex(bu[..., :n_states], bu[..., n_states:])
        scan = {"parallel": resettable_parallel_scan, "sequential": resettable_sequential_scan}[cfg.s5_scan]
        x = scan(lambda_bar, bu, resets, h0)
        c_out = jnp.concatenate([c_tilde.real, -c_tilde.imag], axis=1) * (2.0 if cfg.conj_sym else 1.0)
        y = jnp.concatenate([x.real, x.imag], -1) @ c_out.T + d * u  # 2 Re(C~ x) + D u
        return x[-1], y


class S5Block(nn.Module):
    """S5 -> activation -> residual, with optional LayerNorms before and after."""

    config: S5Config

    @nn.compact
    def __call__(self, h0, x, resets):
        skip = x
        if self.config.prenorm:
            x = nn.LayerNorm(name="prenorm")(x)
        h, x = S5SSM(self.config)(h0, x, resets)
        width, activation = x.shape[-1], self.config.activation
        if activation == "full_glu":
            x = nn.gelu(x)
            x = nn.Dense(width)(x) * nn.sigmoid(nn.Dense(width)(x))
        elif activation == "half_glu1":
            x = nn.gelu(x)
            x = x * nn.sigmoid(nn.Dense(width)(x))
        elif activation == "half_glu2":
            x = x * nn.sigmoid(nn.Dense(width)(nn.gelu(x)))
        else:
            x = nn.gelu(x)
        x = skip + x
        if self.config.postnorm:
            x = nn.LayerNorm(name="postnorm")(x)
        return h, x


class S5Memory(nn.Module):
    """A stack of resettable S5 layers: `(carry, x[T, B, H], resets[T, B]) -> (carry, y[T, B, H])`.

    `resets[t, b] = True` means x[t, b] is the first input of a new episode: that layer's state is
    cleared before x[t, b] is consumed. The carry is a tuple of [B, P_kept] complex64 arrays, one
    per layer; make it with `S5Memory.initialize_carry`.
    """

    config: S5Config

    @nn.compact
    def __call__(self, carry, x, resets):
        new_carry = []
        for h0 in carry:
            h, x = S5Block(self.config)(h0, x, resets)
            new_carry.append(h)
        return tuple(new_carry), x

    @staticmethod
    def initialize_carry(batch_size: int, config: S5Config):
        n_states = config.ssm_size // 2 if config.conj_sym else config.ssm_size
        return tuple(jnp.zeros((batch_size, n_states), jnp.complex64) for _ in range(config.n_layers))


# Actor-critic: shared encoder and S5 trunk, separate one-layer actor and critic heads ---------------------------------
class ActorCritic(nn.Module):
    action_dim: int
    hidden_size: int
    memory: S5Memory

    @nn.compact
    def __call__(self, carry, obs, resets):
        dense = lambda n, scale=math.sqrt(2): nn.Dense(n, kernel_init=nn.initializers.orthogonal(scale))  # noqa: E731
        x = nn.leaky_relu(dense(self.hidden_size)(obs))
        x = nn.leaky_relu(dense(self.memory.config.d_model)(x))
        carry, x = self.memory(carry, x, resets)
        logits = dense(self.action_dim, 0.01)(nn.leaky_relu(dense(self.hidden_size, 2.0)(x)))
        value = dense(1, 1.0)(nn.leaky_relu(dense(self.hidden_size, 2.0)(x)))[..., 0]
        return carry, logits, value


# The policy helpers of every script, for discrete actions only (MemoryChain's answer), so without `continuous`.
def policy_sample(key, policy):
    return jax.random.categorical(key, policy)


def policy_log_prob(policy, action):
    log_p = jax.nn.log_softmax(policy)
    return jnp.take_along_axis(log_p, action[..., None], -1)[..., 0]


def policy_entropy(policy):
    log_p = jax.nn.log_softmax(policy)
    return -jnp.sum(jnp.exp(log_p) * log_p, -1)


# PPO ------------------------------------------------------------------------------------------------------------------
class Transition(NamedTuple):
    obs: jax.Array
    done: jax.Array  # the flag *before* the step: obs is the first of an episode (drives resets)
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array  # nonzero only on an episode's last step: +1 right, -1 wrong
    episode_done: jax.Array  # an episode ended at this step


class RunnerState(NamedTuple):
    train_state: TrainState
    env_params: envs_popjax.MemoryChainParams  # holds this run's memory length
    env_state: object
    obs: jax.Array
    done: jax.Array
    carry: tuple
    key: jax.Array


def compute_gae(rewards, values, dones, last_value, last_done, gamma, gae_lambda):
    """GAE over [T, ...] arrays; dones[t]: obs t starts an episode, so step t is bootstrapped unless the next flag
    (dones[t + 1], or last_done) is set. Returns (advantages, returns)."""

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


def rollout_length(args: Args, memory_length: int) -> int:
    """Steps per env per rollout: --num-steps, or the smallest multiple of L + 1 that is >= 32. Episodes last L + 1
    steps and all envs start together, so every training sequence then holds whole episodes only."""
    return args.num_steps or -(-32 // (memory_length + 1)) * (memory_length + 1)


def make_env(args: Args, num_envs: int):
    """`num_envs` wrapped MemoryChain envs (envs_popjax.make_vec) and their params (the memory length: per pair)."""
    return envs_popjax.make_vec("MemoryChain", num_envs, wrappers=True, num_bits=args.num_bits)


def build_network(args: Args, env, env_params) -> ActorCritic:
    return ActorCritic(env.action_space(env_params).n, args.hidden_size, S5Memory(S5Config.from_args(args)))


def ppo_loss(params, network: ActorCritic, args: Args, carry, batch: Transition, advantages, returns):
    """PPO's loss on one minibatch of whole sequences, replayed by `network` from the carry they started from:
    `(loss, stats)`, the clipped surrogate plus `vf_coef` x the (clipped) value loss minus `ent_coef` x the entropy,
    as CleanRL's ppo_atari_lstm.py. Differentiated with respect to `params` (the other arguments stay fixed)."""
    _, logits, value = network.apply(params, carry, batch.obs, batch.done)
    log_ratio = policy_log_prob(logits, batch.action) - batch.log_prob
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
    entropy = policy_entropy(logits).mean()
    loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss
    old_approx_kl, approx_kl = (-log_ratio).mean(), ((ratio - 1) - log_ratio).mean()  # joschu.net/blog/kl-approx
    clipfrac = (jnp.abs(ratio - 1) > args.clip_coef).mean()
    return loss, dict(policy_loss=pg_loss, value_loss=v_loss, entropy=entropy, old_approx_kl=old_approx_kl,
                      approx_kl=approx_kl, clipfrac=clipfrac)


def make_train(args: Args, num_steps: int):
    """`(init, update_chunk, num_updates)` for one (length, seed) with rollouts of `num_steps`, both pure:
    `init(key, memory_length) -> RunnerState`, `update_chunk(runner_state, num_updates) -> (runner_state, metrics)`."""
    env, env_params = make_env(args, args.num_envs)
    network, config = build_network(args, env, env_params), S5Config.from_args(args)
    num_updates = args.total_timesteps // (args.num_envs * num_steps)

    def learning_rate(count):  # CleanRL's linear annealing, once per update
        frac = 1.0 - (count // (args.num_minibatches * args.update_epochs)) / num_updates
        return args.learning_rate * frac if args.anneal_lr else args.learning_rate

    # flatten: one vector for the optimizer instead of ~60 leaves, a smaller program to compile
    clip_adam = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(learning_rate, eps=1e-5))
    optimizer = optax.flatten(clip_adam)

    def init(key, memory_length) -> RunnerState:
        key, key_params, key_env = jax.random.split(key, 3)
        params = env_params.replace(memory_length=memory_length)
        dummy_obs = jnp.zeros((1, args.num_envs, env.observation_space(env_params).shape[0]))
        carry = S5Memory.initialize_carry(args.num_envs, config)
        net_params = network.init(key_params, carry, dummy_obs, jnp.ones((1, args.num_envs), bool))
        train_state = TrainState.create(apply_fn=network.apply, params=net_params, tx=optimizer)
        obs, env_state = env.reset(key_env, params)
        done = jnp.ones(args.num_envs, bool)  # the first observation starts an episode
        return RunnerState(train_state, params, env_state, obs, done, carry, key)

    def env_step(runner: RunnerState, _):
        key, key_action, key_env = jax.random.split(runner.key, 3)
        params = runner.train_state.params
        carry, logits, value = network.apply(params, runner.carry, runner.obs[None], runner.done[None])
        action = policy_sample(key_action, logits[0])
        step = env.step(key_env, runner.env_state, action, runner.env_params)
        obs, env_state, reward, terminated, truncated, info = step
        log_prob = policy_log_prob(logits[0], action)
        transition = Transition(runner.obs, runner.done, action, log_prob, value[0], reward, info["returned_episode"])
        runner = runner._replace(env_state=env_state, obs=obs, done=terminated | truncated, carry=carry, key=key)
        return runner, transition

    def update_step(runner: RunnerState, _):
        initial_carry = runner.carry  # replayed at update time: the carry the rollout started from
        runner, batch = jax.lax.scan(env_step, runner, None, num_steps)
        _, _, last_value = network.apply(runner.train_state.params, runner.carry, runner.obs[None], runner.done[None])
        advantages, returns = compute_gae(batch.reward, batch.value, batch.done, last_value[0], runner.done,
                                          args.gamma, args.gae_lambda)

        def epoch(train_state, key):
            # Minibatches split the envs: each keeps whole sequences and its own starting carry.
            perm = jax.random.permutation(key, args.num_envs)

            def split_envs(x, env_axis):  # [..., num_envs, ...] -> [num_minibatches, ..., envs_per_mb, ...]
                x = jnp.take(x, perm, env_axis)
                x = x.reshape(x.shape[:env_axis] + (args.num_minibatches, -1) + x.shape[env_axis + 1 :])
                return jnp.moveaxis(x, env_axis, 0)

            minibatches = (jax.tree.map(lambda x: split_envs(x, 0), initial_carry),
                           jax.tree.map(lambda x: split_envs(x, 1), (batch, advantages, returns)))

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
        metrics = {k: v.mean() for k, v in stats.items()}
        metrics.update(
            explained_variance=jnp.where(var_returns == 0, jnp.nan, 1 - jnp.var(returns - batch.value) / var_returns),
            episodes=batch.episode_done.sum(),  # episodes completed in this rollout
            successes=(batch.episode_done & (batch.reward > 0)).sum(),  # ... and answered right
            learning_rate=learning_rate(train_state.step - 1) * jnp.ones(()),
            # the run stops at the first update with a non-finite loss or parameter
            finite=jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves((train_state.params, stats))])),
        )
        return runner, metrics

    def update_chunk(runner: RunnerState, num_updates: int):
        return jax.lax.scan(update_step, runner, None, num_updates)

    return init, update_chunk, num_updates


def make_evaluate(args: Args, num_episodes: int, num_steps: int, greedy: bool):
    """`evaluate(params, memory_length, key) -> returns[num_episodes]` (+1 or -1): `num_episodes` envs each play one
    episode from a zero memory (as every training rollout starts one) in `num_steps` >= L + 1 steps."""
    env, env_params = make_env(args, num_episodes)
    network, config = build_network(args, env, env_params), S5Config.from_args(args)

    def evaluate(params, memory_length, key):
        length_params = env_params.replace(memory_length=memory_length)
        key_reset, key_run = jax.random.split(key)
        obs, env_state = env.reset(key_reset, length_params)

        def step(state, key):
            carry, obs, done, env_state, active, returns = state
            key_action, key_env = jax.random.split(key)
            carry, logits, _ = network.apply(params, carry, obs[None], done[None])
            action = jnp.argmax(logits[0], -1) if greedy else policy_sample(key_action, logits[0])
            obs, env_state, reward, terminated, truncated, _ = env.step(key_env, env_state, action, length_params)
            done = terminated | truncated
            return (carry, obs, done, env_state, active & ~done, returns + active * reward), None

        ones = jnp.ones(num_episodes, bool)
        init = (S5Memory.initialize_carry(num_episodes, config), obs, ones, env_state, ones, jnp.zeros(num_episodes))
        return jax.lax.scan(step, init, jax.random.split(key_run, num_steps))[0][-1]

    return evaluate


# Running: input checks, processes and devices, compiling --------------------------------------------------------------
POSITIVE = tuple(
    "num_seeds total_timesteps num_envs num_minibatches update_epochs num_bits hidden_size d_model ssm_size n_layers "
    "s5_blocks learning_rate clip_coef max_grad_norm dt_min dt_max keep_checkpoints eval_episodes".split()
)
NON_NEGATIVE = ("num_steps", "updates_per_chunk", "checkpoint_every", "vf_coef", "ent_coef", "num_processes")


def check_args(args: Args) -> str | None:
    """Return a one-line message saying what to change, or None if the settings can run."""
    if not args.memory_lengths:
        return "--memory-lengths is empty: give at least one length, e.g. --memory-lengths 1 2 4 8"
    if min(args.memory_lengths) < 1:
        return f"--memory-lengths must all be >= 1 (an episode lasts L + 1 steps), got {min(args.memory_lengths)}"
    domains = [(POSITIVE, "positive", lambda v: v > 0), (NON_NEGATIVE, ">= 0", lambda v: v >= 0)]
    domains += [(("gamma", "gae_lambda", "solve_threshold"), "in [0, 1]", lambda v: 0 <= v <= 1)]
    for names, domain, ok in domains + [(("success_window",), "in (0, 1]", lambda v: 0 < v <= 1)]:
        for name in names:
            if not (math.isfinite(value := getattr(args, name)) and ok(value)):
                return f"--{name.replace('_', '-')} must be {domain}, got {value}"
    if args.num_envs % args.num_minibatches:
        return f"--num-envs {args.num_envs} must be divisible by --num-minibatches {args.num_minibatches}"
    longest, length = max((rollout_length(args, length), length) for length in args.memory_lengths)
    if args.total_timesteps < args.num_envs * longest:
        return (f"--total-timesteps {args.total_timesteps} gives zero updates at L = {length}: one update takes "
                f"--num-envs x rollout steps = {args.num_envs} x {longest} = {args.num_envs * longest} steps")
    if error := S5Config.from_args(args).error():
        return error
    if args.dt_min > args.dt_max:
        return f"--dt-min {args.dt_min} must not exceed --dt-max {args.dt_max}"
    if args.track and importlib.util.find_spec("wandb") is None:
        return "--track logs to Weights & Biases, which is not installed: pip install wandb"
    if not args.distributed and (args.coordinator_address or args.num_processes or args.process_id >= 0):
        return "--coordinator-address, --num-processes and --process-id are for multi-process runs: add --distributed"
    if args.seed_batching == "loop" and (args.distributed or jax.device_count() > 1):
        where = "several processes" if args.distributed else f"{jax.device_count()} devices"
        return f"--seed-batching loop runs every seed on one device, and this run has {where}: use vmap"
    if args.distributed and args.eval_model:
        return "--eval-model runs in one process; drop --distributed"
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
    """Indices of the seeds (here: the pairs) whose shards this process holds (it writes their TensorBoard runs)."""
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


def compile_training(init, update_chunk, inputs, sharding, chunk_lengths, seed_batching: str):
    """Initialise every (length, seed) pair (`inputs`: their keys and memory lengths, sharded; parameters outside the
    training jit) and compile `update_chunk` per chunk length, all programs at once: XLA compiles each on one thread.
    vmap: programs of all the pairs; loop: of one pair, run for each in turn. Returns `(runner_state with a leading
    pair axis on every leaf, {length: compiled chunk})`."""
    if seed_batching == "vmap":
        init_lowered = jax.jit(jax.vmap(init), out_shardings=sharding).lower(*inputs)
        chunk = lambda n: jax.jit(jax.vmap(partial(update_chunk, num_updates=n)), in_shardings=sharding,  # noqa: E731
                                  out_shardings=sharding).lower(init_lowered.out_info)
    else:  # one device (check_args): the inputs uncommitted, like every later state, so split_seeds compiles once
        keys, lengths = inputs
        inputs = jax.random.wrap_key_data(np.asarray(jax.random.key_data(keys))), np.asarray(lengths)
        init_lowered = jax.jit(init).lower(*(x[0] for x in inputs))
        chunk = lambda n: jax.jit(partial(update_chunk, num_updates=n)).lower(init_lowered.out_info)  # noqa: E731
    lowered = [init_lowered] + [chunk(n) for n in sorted(chunk_lengths)]
    with ThreadPoolExecutor(len(lowered)) as pool:
        programs = pool.map(lambda program: program.compile(), lowered)
    init_compiled, *chunks = programs if seed_batching == "vmap" else map(each_seed, programs)
    return init_compiled(*inputs), dict(zip(sorted(chunk_lengths), chunks))


def resolve_auto(args: Args) -> Args:
    if args.s5_scan == "auto":  # resolved here so that the logged hyperparameters say which ran
        args.s5_scan = "sequential" if jax.default_backend() == "cpu" else "parallel"
    if args.seed_batching == "auto":  # S5: vmap, measured faster than loop at every seed count on a CPU
        args.seed_batching = "vmap"
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
# --resume may change these: they do not change the sweep's math
RESUME_MAY_CHANGE = tuple(
    "log_dir updates_per_chunk checkpoint_every keep_checkpoints compile_cache track wandb_project_name wandb_entity "
    "save_model".split()
)
NOT_COMPARED = ("resume", "eval_model", "eval_episodes", "eval_greedy")
LAUNCH = ("distributed", "coordinator_address", "num_processes", "process_id")  # this process's, never a saved run's


def strict_json(x):
    """NaN and +-inf -> None, numpy -> Python: what json.dump(..., allow_nan=False) accepts."""
    if isinstance(x, dict):
        return {str(k): strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [strict_json(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x.item() if isinstance(x, np.generic) else x


def write_json(path: str, obj):
    with open(path, "w") as f:
        json.dump(strict_json(obj), f, indent=2, allow_nan=False)


def args_from(saved: dict) -> Args:
    """Args from their JSON or msgpack form (msgpack stores a tuple as {"0": ..., "1": ...}, JSON as a list)."""
    def fix(v):
        if isinstance(v, dict):
            return tuple(v[k] for k in sorted(v, key=int))
        return tuple(v) if isinstance(v, list) else v

    saved = {"seed_batching": "vmap", **saved}  # runs saved before --seed-batching ran vmap
    return Args(**{f.name: fix(saved[f.name]) for f in fields(Args) if f.name in saved and f.name not in LAUNCH})


def run_folder(path: str) -> str:
    """The run folder of a `.cleanrl_model` file, of a run folder or of its `checkpoints/` folder."""
    path = os.path.abspath(path)
    return os.path.dirname(path) if os.path.isfile(path) or os.path.basename(path) == "checkpoints" else path


def pair_name(pair) -> str:
    return f"len_{pair[0]}_seed_{pair[1]}"


def checkpoints(path: str, args: Args | None = None) -> ocp.CheckpointManager:
    """A run's `checkpoints/`, to read (no `args`) or to write (keeps the latest --keep-checkpoints). Step = PPO
    updates done over all groups; items: `meta` (JSON: the Args, every pair's history, the clock, updates done per
    group, the names of the pairs in `models`), `models` (the parameters of every pair trained so far, stacked,
    finished groups first) and `state` (the RunnerState of the group under way, PRNG keys as key_data)."""
    folder = os.path.join(run_folder(path), "checkpoints")
    if args is None and not os.path.isdir(folder):
        raise FileNotFoundError(f"{path} is neither a .cleanrl_model file nor a run folder with checkpoints/")
    options = ocp.CheckpointManagerOptions(max_to_keep=args.keep_checkpoints, create=True) if args else None
    return ocp.CheckpointManager(folder, options=options)


def restore_checkpoint(path: str, target: RunnerState | None = None, meta_only: bool = False):
    """(step, meta, state) of the latest checkpoint: `state["models"]` (unless meta_only) and, given `target` (the
    group under way's fresh init), `state["runner"]` in its structure and shardings (bit-identical to the saved)."""
    manager = checkpoints(path)
    if (step := manager.latest_step()) is None:
        raise FileNotFoundError(f"{path} holds no checkpoint")
    items = {"meta": ocp.args.JsonRestore()} | ({} if meta_only else {"models": ocp.args.StandardRestore()})
    if target is not None:
        items["state"] = ocp.args.StandardRestore(target._replace(key=jax.random.key_data(target.key)))
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    manager.close()
    state = {"models": restored.get("models")}
    if target is not None:
        state["runner"] = restored["state"]._replace(key=jax.random.wrap_key_data(restored["state"].key))
    return step, restored["meta"], state


def trained_models(sweep: dict) -> tuple[list, dict]:
    """The names of every (length, seed) trained so far (finished groups first) and their parameters, stacked."""
    names, params = list(sweep["finished_names"]), list(sweep["finished_params"])
    if sweep["current"] is not None:
        names += [pair_name(pair) for pair in sweep["current"][0]]
        params.append(to_host(sweep["current"][1].train_state.params))
    return names, jax.tree.map(lambda *x: np.concatenate(x), *params) if params else {}


def save_checkpoint(manager, args: Args, sweep: dict) -> int:
    """Checkpoint the sweep (the group under way at its last completed chunk); written in the background while
    training goes on. Every process calls it at the same points (each writes its own shards). Returns the step."""
    step = sum(sweep["logs"]["updates_done"].values())
    if step in manager.all_steps():
        return step
    names, models, history = *trained_models(sweep), dict(sweep["logs"]["history"])
    if sweep["current"] is not None:  # the group under way: the rows of the updates its state has done, no more
        pairs, runner = sweep["current"]  # (a Ctrl-C can land after a chunk's rows are logged, before the state moves)
        optimizer_steps = np.asarray(runner.train_state.step.addressable_shards[0].data)[0]  # the same in every pair
        history.update({pair: history[pair][: int(optimizer_steps) // (args.num_minibatches * args.update_epochs)]
                        for pair in pairs})
    history = {pair_name(pair): rows for pair, rows in history.items() if rows}
    meta = strict_json({"args": asdict(args), **sweep["logs"], "history": history, "model_pairs": names})
    items = dict(meta=ocp.args.JsonSave(meta), models=ocp.args.StandardSave(models))
    if sweep["current"] is not None:
        items["state"] = ocp.args.StandardSave(runner._replace(key=jax.random.key_data(runner.key)))
    manager.save(step, args=ocp.args.Composite(**items))
    return step


def load_model(path: str) -> tuple[Args, dict]:
    """(Args, {"len_{L}_seed_{S}": params}) from a `--save-model` file or from a run folder's latest checkpoint, which
    holds every (length, seed) trained so far (the group under way's parameters at the checkpoint)."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            saved = flax.serialization.msgpack_restore(f.read())
        return args_from(saved["0"]), saved["1"]
    _, meta, state = restore_checkpoint(path)
    models = jax.tree.map(np.asarray, state["models"])
    return args_from(meta["args"]), {name: jax.tree.map(lambda x: x[i], models) for i, name in
                                     enumerate(meta["model_pairs"])}


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
            saved = load_model(path)[0]
        else:
            saved = args_from(restore_checkpoint(path, meta_only=True)[1]["args"])
    except (FileNotFoundError, ValueError) as error:
        return args, f"{flag}: {error}"
    args = tyro.cli(Args, default=replace(saved, resume="", eval_model=""))  # a resumed run saved its --resume
    # not on --resume: --total-timesteps sets every group's updates, and finished groups keep no state to continue
    free = ("total_timesteps",) if args.eval_model else ()
    allowed = ", ".join("--" + name.replace("_", "-") for name in free + RESUME_MAY_CHANGE)
    allowed = f"the run (allowed to change: {allowed})"
    for name in (f.name for f in fields(Args) if f.name not in free + RESUME_MAY_CHANGE + NOT_COMPARED + LAUNCH):
        if (new := getattr(args, name)) != (old := getattr(saved, name)):
            option = "--" + name.replace("_", "-")
            return args, f"{flag}: {option} {new} differs from the {whose}'s {old}; it would change {allowed}"
    return args, None


def evaluate_model(args: Args) -> dict:
    """--eval-model: every saved (length, seed) plays --eval-episodes episodes; prints and writes eval.json."""
    resolve_auto(args)
    models = load_model(args.eval_model)[1]
    pairs = sorted(tuple(int(x) for x in name.split("_")[1::2]) for name in models)  # "len_{L}_seed_{S}"
    params = jax.tree.map(lambda *x: jnp.stack(x), *(models[pair_name(pair)] for pair in pairs))
    lengths, seeds = jnp.array([L for L, _ in pairs]), jnp.array([s for _, s in pairs])
    evaluate = make_evaluate(args, args.eval_episodes, int(lengths.max()) + 1, args.eval_greedy)
    keys = jax.vmap(lambda s, L: jax.random.fold_in(jax.random.key(s), L))(seeds, lengths)
    returns = np.asarray(over_seeds(evaluate, args.seed_batching)(params, lengths, keys))  # [pairs, episodes], +-1
    per_run = {pair_name(p): {"memory_length": p[0], "seed": p[1], "mean": float(r.mean()), "std": float(r.std()),
                              "success_rate": float((r > 0).mean())} for p, r in zip(pairs, returns)}
    per_length = {}
    for (length, _), r in zip(pairs, returns):
        per_length.setdefault(str(length), []).append(float(r.mean()))
    result = {"model": args.eval_model, "episodes_per_seed": args.eval_episodes, "greedy": args.eval_greedy,
              "per_run": per_run, "overall": {"mean": float(returns.mean()), "std": float(returns.std())},
              "per_length": {k: {"mean": np.mean(v), "std": np.std(v), "seeds": len(v)} for k, v in per_length.items()}}
    for name, run in per_run.items():
        print(f"{name}: return {run['mean']:+.3f} +- {run['std']:.3f}, success {run['success_rate']:.3f}")
    write_json(path := os.path.join(run_folder(args.eval_model), "eval.json"), result)
    print(f"overall over {len(pairs)} (length, seed) pair(s) x {args.eval_episodes} episodes: return "
          f"{result['overall']['mean']:+.3f} +- {result['overall']['std']:.3f}; written to {path}")
    return result



# Training loop: (length, seed) groups, logging, summary table / JSON / plot -------------------------------------------
def summarize(args: Args, history: dict, clock: dict) -> dict:
    """Final success rate and verdicts per (length, seed), then per length over seeds."""
    per_run, per_length = {}, {}
    for (length, seed), rows in history.items():
        if not rows:
            continue
        rows = np.array(rows)  # [updates, (global_step, episodes, successes)]
        recent = rows[-math.ceil(args.success_window * len(rows)) :]
        episodes, final_episodes = int(rows[:, 1].sum()), int(recent[:, 1].sum())
        final = float(recent[:, 2].sum() / final_episodes) if final_episodes else None
        overall = float(rows[:, 2].sum() / episodes) if episodes else None
        regret_ratio = None if overall is None else (1 - overall) / 0.5  # bsuite: error rate / random's
        per_run[pair_name((length, seed))] = run = {
            "memory_length": length,
            "seed": seed,
            "updates": len(rows),
            "global_step": int(rows[-1, 0]),
            "episodes": episodes,
            "final_episodes": final_episodes,
            "final_success_rate": final,
            "training_success_rate": overall,
            "bsuite_regret_ratio": regret_ratio,
            "bsuite_learned": bool(episodes >= MIN_VERDICT_EPISODES and regret_ratio < BSUITE_REGRET_THRESHOLD),
            "solved": bool(final_episodes >= MIN_VERDICT_EPISODES and final >= args.solve_threshold),
        }
        per_length.setdefault(length, []).append(run)
    lengths = {}
    for length, runs in sorted(per_length.items()):
        rates = [r["final_success_rate"] for r in runs if r["final_success_rate"] is not None]
        lengths[str(length)] = {
            "rollout_steps": rollout_length(args, length),
            "seeds": len(runs),
            "final_success_rates": rates,
            "final_success_rate": {"mean": float(np.mean(rates)), "std": float(np.std(rates))} if rates else None,
            "solved_seeds": sum(r["solved"] for r in runs),
            "bsuite_learned_seeds": sum(r["bsuite_learned"] for r in runs),
        }
    all_solved = [int(k) for k, v in lengths.items() if v["solved_seeds"] == v["seeds"] == args.num_seeds]
    return {
        "solve_rule": f"final success rate (completed episodes of the last {args.success_window:.0%} of updates, "
        f"at least {MIN_VERDICT_EPISODES}) >= {args.solve_threshold}",
        "bsuite_rule": "bsuite's score: (1 - success rate over all training episodes) / 0.5 < "
        f"{BSUITE_REGRET_THRESHOLD}",
        "largest_length_solved_by_all_seeds": max(all_solved, default=None),
        "compile_seconds": clock["compile_seconds"],
        "run_seconds": clock["run_seconds"],
        "sps": clock["env_steps"] / clock["run_seconds"] if clock["run_seconds"] > 0 else None,
        "per_length": lengths,
        "per_run": per_run,
    }


def summary_table(args: Args, summary: dict) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = ["| memory length | rollout | final success per seed | mean +- std | solved | bsuite learned |",
             "|-:|-:|-|-|-|-|"]
    for length, row in summary["per_length"].items():
        rate = row["final_success_rate"] or {"mean": None, "std": None}
        lines.append(f"| {length} | {row['rollout_steps']} | {' '.join(map(fmt, row['final_success_rates']))} | "
                     f"{fmt(rate['mean'])} +- {fmt(rate['std'])} | {row['solved_seeds']}/{row['seeds']} | "
                     f"{row['bsuite_learned_seeds']}/{row['seeds']} |")
    return "\n".join(lines + ["", f"solved: {summary['solve_rule']}", f"bsuite learned: {summary['bsuite_rule']}",
                              f"largest memory length solved by all {args.num_seeds} seed(s): "
                              f"{summary['largest_length_solved_by_all_seeds']}"])


def plot_success(args: Args, summary: dict, path: str):
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [(int(L), rate) for L, row in summary["per_length"].items() for rate in row["final_success_rates"]]
    ax.scatter(*zip(*rows) if rows else ([], []), s=12, alpha=0.4, label="seeds")
    means = [(int(L), row["final_success_rate"]["mean"]) for L, row in summary["per_length"].items()
             if row["final_success_rates"]]
    ax.plot(*zip(*means) if means else ([], []), "o-", color="C1", label=f"mean over {args.num_seeds} seed(s)")
    ax.axhline(args.solve_threshold, color="C2", ls="--", lw=1, label=f"solved (>= {args.solve_threshold})")
    ax.axhline(0.5, color="grey", ls=":", lw=1, label="random")
    ax.set(xscale="log" if rows else "linear", ylim=(0, 1.02), xlabel="memory length L", ylabel="final success rate",
           title=f"PPO + S5 on bsuite MemoryChain, {args.total_timesteps:,} steps per run")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def console_mean(values, spec: str = "+.3f", spread: bool = False) -> str:
    """For the console: the mean over seeds of `values` (NaN, -inf or None where no episode ended), with spread=True
    "mean +- std", of the finite ones only; "(no episode ended)" if none is finite. Progress lines and summaries never
    print nan; what is logged keeps its gaps (no TensorBoard point for such an update, null in summary.json)."""
    x = np.array(values, float).ravel()  # None -> NaN
    x = x[np.isfinite(x)]
    if not x.size:
        return "(no episode ended)"
    return f"{x.mean():{spec}} +- {x.std():{spec.lstrip('+')}}" if spread else f"{x.mean():{spec}}"


def log_iteration(writer, metrics: dict, global_step: int) -> tuple:
    """One pair's metrics of one PPO iteration to its TensorBoard run (writer None: another process holds the pair);
    returns its history row (global_step, episodes, successes)."""
    m = {k: float(v) for k, v in metrics.items()}
    episodes, successes = int(m.pop("episodes")), int(m.pop("successes"))
    if episodes:  # episodes completed in this rollout; the return is 2 * success_rate - 1
        m.update(success_rate=successes / episodes, episodic_return=(2 * successes - episodes) / episodes)
    for name, value in m.items() if writer else ():
        section = "charts" if name in ("success_rate", "episodic_return", "learning_rate") else "losses"
        writer.add_scalar(f"{section}/{name}", value, global_step)
    return global_step, episodes, successes


def run_group(args: Args, num_steps: int, pairs: list, run_dir: str, sweep: dict) -> str | None:
    """Train the (length, seed) `pairs` whose rollouts last `num_steps` as one vmapped program, sharded over the
    devices of every process, from scratch or from the checkpoint if the group was under way. Appends each
    iteration's (global_step, episodes, successes) to every pair's history; checkpoints between chunks. Returns the
    failure that stopped it (a non-finite loss), or None."""
    init, update_chunk, num_updates = make_train(args, num_steps)
    batch_size, chunk = args.num_envs * num_steps, args.updates_per_chunk or default_chunk(num_updates)
    logs, manager = sweep["logs"], sweep["manager"]
    print0 = print if jax.process_index() == 0 else lambda *_, **__: None  # as in main
    history, clock, done = logs["history"], logs["clock"], logs["updates_done"].get(str(num_steps), 0)
    sharding, lengths = seed_sharding(len(pairs)), np.array([length for length, _ in pairs], np.int32)
    inputs = (seed_keys([seed for _, seed in pairs], sharding),
              jax.make_array_from_callback(lengths.shape, sharding, lambda index: lengths[index]))
    purge_step = done * batch_size + 1 if done else 0  # TensorBoard drops what a killed run logged past the checkpoint
    writers = {pairs[i]: SummaryWriter(os.path.join(run_dir, pair_name(pairs[i])), purge_step=purge_step)
               for i in local_seeds(sharding, len(pairs))}  # each process writes its pairs' runs
    table = "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    for (length, _), writer in [] if done else writers.items():
        writer.add_text("hyperparameters", f"{table}\n|memory_length|{length}|\n|rollout_steps|{num_steps}|")
    resumed = f", resumed at update {done}" if done else ""
    print0(f"rollouts of {num_steps} steps for lengths {sorted(set(lengths.tolist()))}: {len(pairs)} (length, seed) "
           f"pairs on {sharding.mesh.size} {jax.default_backend()} device(s), {num_updates} updates of {batch_size} "
           f"steps{resumed}")
    start, run_s, resumed_at, failure = time.time(), 0.0, done, None
    try:
        chunk_lengths = {min(chunk, num_updates - done), (num_updates - done) % chunk} - {0}
        runner, compiled = compile_training(init, update_chunk, inputs, sharding, chunk_lengths, args.seed_batching)
        if done:  # the group was under way at the checkpoint: its state, bit for bit
            runner = restore_checkpoint(run_dir, runner)[2]["runner"]
        clock["compile_seconds"] += (compile_s := time.time() - start)
        sweep["current"] = pairs, runner
        print0(f"compiled in {compile_s:.1f} s")
        while done < num_updates:
            n = min(chunk, num_updates - done)
            t = time.time()
            new_runner, metrics = compiled[n](runner)
            metrics = to_host(jax.block_until_ready(metrics))  # [pairs, n], on every process
            run_s += (elapsed := time.time() - t)
            clock["run_seconds"] += elapsed
            if not (finite := metrics.pop("finite")).all():  # log the iterations before the first bad one, then stop
                n, i = min((u, i) for i, u in zip(*np.nonzero(~finite)))
                failure = (f"non-finite loss/parameters at update {done + n + 1} (memory length {pairs[i][0]}, "
                           f"seed {pairs[i][1]})")
            for u in range(n):
                for i, pair in enumerate(pairs):
                    pair_metrics = {k: v[i, u] for k, v in metrics.items()}
                    history[pair].append(log_iteration(writers.get(pair), pair_metrics, (done + u + 1) * batch_size))
            if failure:
                break
            done, sps = done + n, n * batch_size / elapsed
            for writer in writers.values():
                writer.add_scalar("charts/SPS", sps, done * batch_size)
                writer.flush()
            # the state and the update count move on together (a checkpoint saves them; the history is already ahead)
            runner, sweep["current"], logs["updates_done"][str(num_steps)] = new_runner, (pairs, new_runner), done
            clock["env_steps"] += n * batch_size * len(pairs)
            step = sum(logs["updates_done"].values())  # over all groups: the checkpoints' step
            if args.checkpoint_every and step // args.checkpoint_every > sweep["last_saved"] // args.checkpoint_every:
                sweep["last_saved"] = save_checkpoint(manager, args, sweep)
            episodes, successes = metrics["episodes"][:, -1].sum(), metrics["successes"][:, -1].sum()
            success = console_mean(successes / episodes if episodes else None, ".3f")
            eta = run_s / (done - resumed_at) * (num_updates - done)
            print0(f"step {done * batch_size:>10,}/{num_updates * batch_size:,} per pair | SPS {sps * len(pairs):,.0f} "
                   f"(all pairs) | success {success} (all pairs) | ETA {eta:.0f} s", flush=True)
    finally:
        for writer in writers.values():
            writer.close()
    if not failure:
        sweep["finished_names"] += [pair_name(pair) for pair in pairs]
        sweep["finished_params"].append(to_host(runner.train_state.params))
        sweep["current"] = None
    return failure


def main(args: Args) -> dict:
    """Train (or with --resume continue) the sweep; returns its summary. TensorBoard per pair, checkpoints, and in the
    run folder a summary table, summary.json and a plot. On Ctrl-C or SIGTERM it writes everything, then raises
    KeyboardInterrupt."""
    start_distributed(args)
    resolve_auto(args)
    stamp = int(multihost_utils.broadcast_one_to_all(np.int32(time.time())))  # the run folder's: process 0's
    run_dir = args.resume or os.path.join(args.log_dir, f"MemoryChain__{args.exp_name}__{args.seed}__{stamp}")
    run_name, seeds = os.path.basename(os.path.normpath(run_dir)), [args.seed + i for i in range(args.num_seeds)]
    lead = jax.process_index() == 0  # process 0 alone prints, writes the summary, plot and model, runs wandb
    print0 = print if lead else lambda *_, **__: None
    lengths, groups = sorted(set(args.memory_lengths)), {}  # rollout length -> its pairs, trained in one program
    for length in lengths:
        groups.setdefault(rollout_length(args, length), []).extend((length, seed) for seed in seeds)
    if cut := [length for length in lengths if rollout_length(args, length) % (length + 1)]:
        print0(f"note: --num-steps {args.num_steps} is not a multiple of L + 1 for lengths {cut}: their episodes are "
               "cut between training sequences, where no gradient flows from the answer back to the context",
               file=sys.stderr)
    logs = {"history": {}, "clock": {"compile_seconds": 0.0, "run_seconds": 0.0, "env_steps": 0}, "updates_done": {}}
    sweep = {"finished_names": [], "finished_params": [], "current": None, "last_saved": 0}

    def finished(num_steps):  # all updates of the group with this rollout are done
        return logs["updates_done"].get(str(num_steps)) == args.total_timesteps // (args.num_envs * num_steps)

    if args.resume:  # finished groups' results and parameters; the group under way's state is read in run_group
        sweep["last_saved"], meta, state = restore_checkpoint(run_dir)
        logs = {key: meta[key] for key in logs}
        n = sum(len(pairs) for num_steps, pairs in groups.items() if finished(num_steps))
        sweep["finished_names"] = meta["model_pairs"][:n]
        sweep["finished_params"] = [jax.tree.map(lambda x: np.asarray(x)[:n], state["models"])]
    logs["history"] = history = {pair: [tuple(row) for row in logs["history"].get(pair_name(pair), [])]
                                 for pairs in groups.values() for pair in pairs}
    clock = logs["clock"]
    if args.track and lead:
        import wandb

        settings = dict(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args), name=run_name)
        wandb.init(sync_tensorboard=True, save_code=True, **settings)
    os.makedirs(run_dir, exist_ok=True)  # for the summary, also if stopped before any pair's TensorBoard run
    manager = checkpoints(run_dir, args) if args.checkpoint_every or args.resume else None
    sweep.update(logs=logs, manager=manager)
    print0(f"{run_name}: {len(lengths)} memory length(s) x {args.num_seeds} seed(s), {len(groups)} rollout length(s)")
    failure = None
    try:
        for num_steps, pairs in groups.items():
            if not finished(num_steps) and (failure := run_group(args, num_steps, pairs, run_dir, sweep)):
                break
    except KeyboardInterrupt:  # raised again once the finally below has written everything
        print(f"\ninterrupted after {sum(logs['updates_done'].values())} updates; writing what was logged",
              file=sys.stderr)
        raise
    finally:  # a crash, Ctrl-C or SIGTERM keeps everything logged so far, writes the summary and a checkpoint
        if manager is not None:
            if args.checkpoint_every and not failure:
                sweep["last_saved"] = save_checkpoint(manager, args, sweep)
            manager.wait_until_finished()
            manager.close()
        summary = summarize(args, history, clock)
        text = summary_table(args, summary)
        print0(f"{text}\ncompile {clock['compile_seconds']:.1f} s, run {clock['run_seconds']:.1f} s, "
               f"{summary['sps'] or 0:,.0f} steps/s")
        if lead:
            with open(os.path.join(run_dir, "summary.md"), "w") as f:
                f.write(text + "\n")
            write_json(os.path.join(run_dir, "summary.json"), {"args": asdict(args), **summary})
            plot_success(args, summary, os.path.join(run_dir, "success_vs_length.png"))
        if args.save_model:  # {"len_{L}_seed_{S}": params} of every (length, seed) trained so far
            (names, model), path = trained_models(sweep), os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
            model = {name: jax.tree.map(lambda x: x[i], model) for i, name in enumerate(names)}
            if lead and model:
                with open(path, "wb") as f:
                    f.write(flax.serialization.to_bytes([asdict(args), model]))
                print(f"model saved to {path}")
        if args.track and lead:
            wandb.finish()
        print0(f"results in {run_dir}" + (f"; latest checkpoint: update {sweep['last_saved']}" if manager else ""))
    if failure:  # the last good checkpoint stays the latest
        last_saved = sweep["last_saved"]
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
