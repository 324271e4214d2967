"""PPO with a resettable S5 memory for multi-environment meta-RL (Lu et al., "Structured State Space Models for
In-Context Reinforcement Learning", NeurIPS 2023, section 5.3), in one file.

A trial is `--episodes-per-trial` episodes of one continuous-control env of `--train-envs`, seen through fresh random
projections of its observations and actions (`envs_popjax.MetaEnv`). The S5 memory (`--memory lstm`: the LSTM of
ppo_lstm_popgym.py, the baseline) is reset only between trials, so the agent can identify the env in the first episodes
and do better in later ones (RL^2's meta-episode: GAE runs across the episode ends inside a trial). Before training,
every `--eval-every` updates and at the end, the policy plays fresh trials of every train and held-out env: the mean
return per episode index of a trial is the in-context learning curve (TensorBoard `eval/{train,heldout}/...`,
summary.json). Defaults: a CPU-sized setting on gymnax envs.

    python ppo_s5_metarl.py --num-seeds 3
    python ppo_s5_metarl.py --num-seeds 3 --memory lstm  # the LSTM baseline, otherwise the same run
    tensorboard --logdir runs
    python ppo_s5_metarl.py --resume runs/RUN_FOLDER      # continue after a crash or kill, bit for bit
    python ppo_s5_metarl.py --eval-model runs/RUN_FOLDER  # the in-context evaluation of a saved model
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
    """number of independent seeds, vmapped and sharded over all visible devices"""
    log_dir: str = "runs"
    """folder under which the run folder is created"""
    save_model: bool = False
    """save every seed's parameters and these Args to `{run folder}/{exp_name}.cleanrl_model`"""
    updates_per_chunk: int = 0
    """PPO updates per jitted chunk between logs (0: the largest divisor of the updates and --eval-every up to 1/25)"""
    seed_batching: Literal["auto", "vmap", "loop"] = "auto"
    """how a device runs its seeds: vmap (one batched program), loop (one device holds all seeds and runs the
    one-seed program for each in turn: seed i of N is bit-identical to a one-seed run), or auto: loop for one seed
    of --memory lstm at width >= 256 on a CPU, else vmap (the faster: benchmarks/bench_seed_batching.py)"""
    checkpoint_every: int = 20
    """checkpoint every N updates (at the next chunk boundary), at the end and on Ctrl-C/SIGTERM; 0: never"""
    keep_checkpoints: int = 3
    """how many of the latest checkpoints to keep"""
    resume: str = ""
    """continue the run in this run folder from its latest checkpoint, to its --total-timesteps (the other flags come
    from the checkpoint; only --total-timesteps (without --anneal-lr) and the logging/running flags may change)"""
    eval_model: str = ""
    """evaluate a saved model (a `.cleanrl_model` file or a run folder's checkpoint) instead of training"""
    eval_episodes: int = 100
    """--eval-model: trials (of --episodes-per-trial episodes) per train and held-out env and seed"""
    eval_greedy: bool = False
    """--eval-model acts greedily (the Gaussian mean) instead of sampling"""
    eval_reset_every_episode: bool = False
    """--eval-model: clear the memory at every episode start too, so nothing carries over between the episodes of a
    trial (the control of the in-context curve: it must stay flat)"""
    eval_untrained: bool = False
    """--eval-model plays each seed's initial, untrained parameters (the run's Args and seeds; a control)"""
    compile_cache: str = "~/.cache/s5_icrl_jax"
    """JAX's persistent compilation cache folder ('': off; the JAX_COMPILATION_CACHE_DIR variable, if set, wins)"""
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

    # Meta-RL environment (defaults: the CPU setting)
    train_envs: tuple[str, ...] = ("gymnax/PointRobot-misc", "gymnax/Reacher-misc")
    """envs trials are sampled from in training (envs_popjax.META_ENV_IDS; plain names like `hopper` work)"""
    heldout_envs: tuple[str, ...] = ("gymnax/Swimmer-misc", "gymnax/Pendulum-v1")
    """envs only evaluated, never trained on; must not overlap --train-envs"""
    episodes_per_trial: int = 6
    """episodes of one env with one pair of projections between two memory resets"""
    episode_length: int = 20
    """time limit of every episode in steps (0: each env's default in envs_popjax.META_ENVS)"""
    obs_size: int = 16
    """size of the projected observation the agent sees"""
    action_size: int = 2
    """size of the agent's action, in [-1, 1], projected to each env's action"""
    brax_backend: Literal["spring", "positional", "generalized", "mjx"] = "spring"
    """physics backend of brax envs (spring is the fastest on CPU; mjx is brax's default, for GPUs)"""
    fixed_reset: bool = True
    """every episode of a trial restarts from the trial's first state (goal, target and start are the task)"""
    eval_every: int = 50
    """evaluate on every train and held-out env every this many updates (0: only at the end)"""
    eval_trials: int = 64
    """trials per env in each evaluation (fresh projections; the same keys at every evaluation)"""

    # Algorithm specific arguments
    total_timesteps: int = 6_144_000
    """total environment steps per seed (the default: 800 updates)"""
    learning_rate: float = 1e-3
    """Adam learning rate"""
    num_envs: int = 64
    """parallel environments per seed, split evenly over --train-envs"""
    num_steps: int = 120
    """steps per environment per rollout (the length of each training sequence)"""
    anneal_lr: bool = False
    """anneal the learning rate linearly to zero over training"""
    gamma: float = 0.99
    """discount factor (over the whole trial: inner episode ends are not terminal)"""
    gae_lambda: float = 0.95
    """lambda of generalised advantage estimation"""
    num_minibatches: int = 4
    """minibatches per epoch; each holds num_envs / num_minibatches whole sequences"""
    update_epochs: int = 8
    """epochs over each rollout"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_coef: float = 0.2
    """PPO ratio clipping coefficient"""
    clip_vloss: bool = True
    """clip the value loss like the policy ratio"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient norm clip"""

    # Memory: S5 (the default) or the LSTM baseline
    memory: Literal["s5", "lstm"] = "s5"
    """the recurrent core: resettable S5, or ppo_lstm_popgym's LSTM (the same PPO, meta-env and evaluation)"""
    hidden_size: int = 64
    """LSTM hidden size (with --memory lstm)"""
    d_model: int = 64
    """width H of the encoder output and of every S5 layer"""
    ssm_size: int = 64
    """state size P of each S5 layer before conjugate symmetry halves it"""
    n_layers: int = 2
    """number of stacked S5 layers"""
    s5_blocks: int = 1
    """number of HiPPO-N blocks on the diagonal of the initial state matrix"""
    conj_sym: bool = True
    """keep one of each conjugate eigenvalue pair (P/2 complex states, output 2 Re(C x))"""
    clip_eigs: bool = False
    """clip Re(Lambda) below zero so every mode stays stable (the paper: off)"""
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
    """the resettable recurrence: associative scan or lax.scan (equal to round-off); auto: lax.scan on CPU only"""

    # to be filled in at runtime
    batch_size: int = 0
    """environment steps per update (num_envs * num_steps)"""
    minibatch_size: int = 0
    """transitions per minibatch"""
    num_updates: int = 0
    """PPO updates per seed (total_timesteps // batch_size)"""


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


# The LSTM baseline's memory (--memory lstm) ---------------------------------------------------------------------------
class RNNMemory(nn.Module):
    """ppo_lstm_popgym's resettable LSTM (without its GRU option): `(carry, x[T, B, H], resets[T, B]) -> (carry,
    y[T, B, H])`. `resets[t, b]`: x[t, b] starts a trial, so the carry is zeroed before it. Carry: `(c, h)`, [B, H]."""

    hidden_size: int = 256

    @nn.compact
    def __call__(self, carry, x, resets):
        def step(cell, carry, inputs):
            x_t, reset_t = inputs
            carry = jax.tree.map(lambda c: jnp.where(reset_t[:, None], jnp.zeros_like(c), c), carry)
            return cell(carry, x_t)

        scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False})
        return scan(nn.OptimizedLSTMCell(features=self.hidden_size), carry, (x, resets))

    @staticmethod
    def initialize_carry(batch_size: int, hidden_size: int):
        # flax's default carry_init is zeros, so this is the same carry the resets put back
        return nn.OptimizedLSTMCell(features=hidden_size).initialize_carry(jax.random.key(0), (batch_size, hidden_size))


# Actor-critic: shared encoder and S5 (or LSTM) trunk, separate actor and critic heads (paper, app. B) -----------------
class ActorCritic(nn.Module):
    """A diagonal Gaussian policy over the agent's fixed-size action, and the value."""

    action_dim: int
    width: int  # of the memory's inputs and outputs
    memory: nn.Module

    @nn.compact
    def __call__(self, carry, obs, resets):
        dense = lambda n, scale=math.sqrt(2): nn.Dense(n, kernel_init=nn.initializers.orthogonal(scale))  # noqa: E731
        x = nn.leaky_relu(dense(128)(obs))
        x = nn.leaky_relu(dense(self.width)(x))
        carry, x = self.memory(carry, x, resets)
        actor = nn.leaky_relu(dense(128, 2.0)(nn.leaky_relu(dense(128, 2.0)(x))))
        mean = dense(self.action_dim, 0.01)(actor)
        critic = nn.leaky_relu(dense(128, 2.0)(nn.leaky_relu(dense(128, 2.0)(x))))
        value = dense(1, 1.0)(critic)[..., 0]
        log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))  # state-independent
        return carry, (mean, jnp.broadcast_to(log_std, mean.shape)), value


def policy_sample(key, policy):
    mean, log_std = policy
    return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)


def policy_log_prob(policy, action):
    mean, log_std = policy
    z = (action - mean) / jnp.exp(log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi), -1)


def policy_entropy(policy):
    return jnp.sum(policy[1] + 0.5 * math.log(2 * math.pi * math.e), -1)


def act(network: ActorCritic, params, carry, obs, done, key, greedy: bool = False):
    """One step of the recurrent policy on a batch: `(carry, action, log_prob, value)`."""
    carry, policy, value = network.apply(params, carry, obs[None], done[None])
    policy = jax.tree.map(lambda p: p[0], policy)
    action = policy[0] if greedy else policy_sample(key, policy)
    return carry, action, policy_log_prob(policy, action), value[0]


# PPO ------------------------------------------------------------------------------------------------------------------
class Transition(NamedTuple):
    obs: jax.Array
    done: jax.Array  # the flag *before* the step: obs is the first of a trial (drives resets)
    action: jax.Array  # the unclipped Gaussian sample (the env clips it to [-1, 1])
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array  # scaled (envs_popjax.MetaEnvSpec)
    episode_done: jax.Array  # an inner episode ended at this step (for the logged returns)
    episode_return: jax.Array  # its scaled return
    episode_index: jax.Array  # its index within the trial


class RunnerState(NamedTuple):
    train_state: TrainState
    env_state: object
    obs: jax.Array
    done: jax.Array
    carry: tuple
    key: jax.Array


def compute_gae(rewards, values, dones, last_value, last_done, gamma, gae_lambda):
    """GAE over [T, ...] arrays. dones[t] = obs t starts a trial, so step t is bootstrapped unless the *next* flag
    (dones[t + 1], or last_done) is set; inner episode ends are not dones (RL^2). Returns (advantages, returns)."""

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


def make_env(args: Args, env_id: str) -> envs_popjax.MetaEnv:
    """Trials of `env_id` behind random projections: the observation carries the previous action and reward and the
    episode-start flag; `done` ends a trial, `info` holds the inner episodes' statistics."""
    sizes = (args.obs_size, args.action_size, args.episodes_per_trial, args.episode_length or None)
    return envs_popjax.MetaEnv(env_id, *sizes, args.brax_backend, args.fixed_reset)


def build_network(args: Args):
    """`(network, new_carry)`: the actor-critic with the --memory core, and `new_carry(batch)`, a batch's zero memory
    (what a trial start puts back)."""
    if args.memory == "lstm":
        memory, width = RNNMemory(args.hidden_size), args.hidden_size
        new_carry = partial(RNNMemory.initialize_carry, hidden_size=args.hidden_size)
    else:
        memory, width = S5Memory(config := S5Config.from_args(args)), args.d_model
        new_carry = partial(S5Memory.initialize_carry, config=config)
    return ActorCritic(args.action_size, width, memory), new_carry


def ppo_loss(params, network: ActorCritic, args: Args, carry, batch: Transition, advantages, returns):
    """PPO's loss on one minibatch of whole sequences, replayed by `network` from the carry they started from:
    `(loss, stats)`, the clipped surrogate plus `vf_coef` x the (clipped) value loss minus `ent_coef` x the entropy,
    as CleanRL's ppo_atari_lstm.py. Differentiated with respect to `params` (the other arguments stay fixed)."""
    _, policy, value = network.apply(params, carry, batch.obs, batch.done)
    log_prob = policy_log_prob(policy, batch.action)
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
    entropy = policy_entropy(policy).mean()
    loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss
    # http://joschu.net/blog/kl-approx.html
    kl = dict(old_approx_kl=(-log_ratio).mean(), approx_kl=((ratio - 1) - log_ratio).mean())
    clipfrac = (jnp.abs(ratio - 1) > args.clip_coef).mean()
    return loss, dict(policy_loss=pg_loss, value_loss=v_loss, entropy=entropy, **kl, clipfrac=clipfrac)


def make_train(args: Args):
    """Returns `(init, update_chunk)`, pure functions of one seed: `init(key) -> RunnerState` and
    `update_chunk(runner_state, num_updates) -> (runner_state, metrics[num_updates])`."""
    train_ids, _ = envs_popjax.check_meta_env_sets(args.train_envs, args.heldout_envs)
    pool = envs_popjax.MetaEnvPool([make_env(args, env_id) for env_id in train_ids], args.num_envs)
    network, new_carry = build_network(args)

    def learning_rate(count):  # CleanRL's linear annealing, once per update
        frac = 1.0 - (count // (args.num_minibatches * args.update_epochs)) / args.num_updates
        return args.learning_rate * frac if args.anneal_lr else args.learning_rate

    # flatten: one vector for the optimizer instead of one per leaf, a smaller program to compile
    clip = optax.clip_by_global_norm(args.max_grad_norm)
    optimizer = optax.flatten(optax.chain(clip, optax.adam(learning_rate, eps=1e-5)))

    def init(key) -> RunnerState:
        key, key_params, key_env = jax.random.split(key, 3)
        dummy_obs = jnp.zeros((1, args.num_envs, pool.agent_obs_size))
        params = network.init(key_params, new_carry(args.num_envs), dummy_obs, jnp.ones((1, args.num_envs), bool))
        train_state = TrainState.create(apply_fn=network.apply, params=params, tx=optimizer)
        obs, env_state = pool.reset(key_env)
        done = jnp.ones(args.num_envs, bool)  # the first observation starts a trial
        return RunnerState(train_state, env_state, obs, done, new_carry(args.num_envs), key)

    def env_step(runner: RunnerState, _):
        key, key_action, key_env = jax.random.split(runner.key, 3)
        carry, action, log_prob, value = act(
            network, runner.train_state.params, runner.carry, runner.obs, runner.done, key_action
        )
        obs, env_state, reward, done, info = pool.step(key_env, runner.env_state, action)  # done: trial ended
        episode = info["episode_done"], info["episode_return"], info["episode_index"]
        transition = Transition(runner.obs, runner.done, action, log_prob, value, reward, *episode)
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

        def mean_return(mask):  # mean scaled return of the inner episodes selected by mask (NaN if none)
            n = mask.sum()
            return (batch.episode_return * mask).sum() / jnp.where(n, n, jnp.nan)

        var_returns = jnp.var(returns)
        metrics = {k: v.mean() for k, v in stats.items()}
        metrics.update(
            explained_variance=jnp.where(var_returns == 0, jnp.nan, 1 - jnp.var(returns - batch.value) / var_returns),
            episodes=batch.episode_done.sum(),
            episodic_return=mean_return(batch.episode_done),
            first_episode_return=mean_return(batch.episode_done & (batch.episode_index == 0)),
            last_episode_return=mean_return(batch.episode_done & (batch.episode_index == args.episodes_per_trial - 1)),
            learning_rate=learning_rate(train_state.step - 1) * jnp.ones(()),
            # the run stops at the first update with a non-finite loss or parameter
            finite=jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves((train_state.params, stats))])),
        )
        return runner, metrics

    def update_chunk(runner: RunnerState, num_updates: int):
        return jax.lax.scan(update_step, runner, None, num_updates)

    return init, update_chunk


def make_evaluate(args: Args, greedy: bool = False, reset_every_episode: bool = False):
    """`evaluate(params, key) -> {"{train|heldout}/{env id}": mean return per episode index of a trial}`, pure, one
    seed: one trial on each of --eval-trials fresh projections of every train and held-out env, from a zero memory
    (with `reset_every_episode`, the control, cleared at every episode start too).
    An env's keys are `key` folded with its registry index, so every evaluation of a run, and every run with the same
    seed, sees the same projections and starts (the curves over training compare like with like)."""
    train_ids, heldout_ids = envs_popjax.check_meta_env_sets(args.train_envs, args.heldout_envs)
    envs = [("train", make_env(args, i)) for i in train_ids] + [("heldout", make_env(args, i)) for i in heldout_ids]
    (network, new_carry), n, num_episodes = build_network(args), args.eval_trials, args.episodes_per_trial

    def evaluate_env(params, key, env: envs_popjax.MetaEnv):
        key_reset, key_run = jax.random.split(jax.random.fold_in(key, envs_popjax.META_ENV_IDS.index(env.env_id)))
        obs, state = jax.vmap(env.reset)(jax.random.split(key_reset, n))

        def step(carry, key):
            memory, obs, done, state, active, returns = carry
            key_action, key_env = jax.random.split(key)
            memory, action, _, _ = act(network, params, memory, obs, done, key_action, greedy)
            obs, state, _, trial_done, info = jax.vmap(env.step)(jax.random.split(key_env, n), state, action)
            done = trial_done | (reset_every_episode & info["episode_done"])  # the control: nothing carries over
            counted = (active & info["episode_done"])[:, None] * jax.nn.one_hot(info["episode_index"], num_episodes)
            returns = returns + counted * info["episode_return"][:, None]
            return (memory, obs, done, state, active & ~trial_done, returns), None

        init = (new_carry(n), obs, jnp.ones(n, bool), state, jnp.ones(n, bool), jnp.zeros((n, num_episodes)))
        # a trial lasts at most episodes_per_trial * episode_length steps; later steps are masked
        (*_, returns), _ = jax.lax.scan(step, init, jax.random.split(key_run, num_episodes * env.episode_length))
        return returns.mean(0)

    def evaluate(params, key) -> dict[str, jax.Array]:
        return {f"{split}/{env.env_id}": evaluate_env(params, key, env) for split, env in envs}

    return evaluate


# Running: input checks, processes and devices, compiling --------------------------------------------------------------
POSITIVE = tuple(
    "num_seeds total_timesteps num_envs num_steps num_minibatches update_epochs episodes_per_trial obs_size "
    "action_size eval_trials d_model ssm_size n_layers s5_blocks hidden_size learning_rate clip_coef max_grad_norm "
    "dt_min dt_max keep_checkpoints eval_episodes".split()
)
NON_NEGATIVE = ("updates_per_chunk", "checkpoint_every", "eval_every", "episode_length", "vf_coef", "ent_coef",
                "num_processes")  # fmt: skip


def check_args(args: Args) -> str | None:
    """Return a one-line message saying what to change, or None if the settings can run."""
    try:
        train_ids, _ = envs_popjax.check_meta_env_sets(args.train_envs, args.heldout_envs)  # unknown or overlapping
    except ValueError as error:
        return f"--train-envs/--heldout-envs: {error}"
    domains = [(POSITIVE, "positive", lambda v: v > 0), (NON_NEGATIVE, ">= 0", lambda v: v >= 0)]
    for names, domain, ok in domains + [(("gamma", "gae_lambda"), "in [0, 1]", lambda v: 0 <= v <= 1)]:
        for name in names:
            if not (math.isfinite(value := getattr(args, name)) and ok(value)):
                return f"--{name.replace('_', '-')} must be {domain}, got {value}"
    if args.num_envs % len(train_ids):
        return f"--num-envs {args.num_envs} must be divisible by the {len(train_ids)} --train-envs (equal slots each)"
    if args.num_envs % args.num_minibatches:
        return f"--num-envs {args.num_envs} must be divisible by --num-minibatches {args.num_minibatches}"
    if args.total_timesteps < args.num_envs * args.num_steps:
        return (f"--total-timesteps {args.total_timesteps} gives zero updates: one update takes "
                f"--num-envs x --num-steps = {args.num_envs * args.num_steps} steps")
    if args.updates_per_chunk and args.eval_every and args.eval_every % args.updates_per_chunk:
        return f"--eval-every {args.eval_every} must be a multiple of --updates-per-chunk {args.updates_per_chunk}"
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
    if (args.eval_reset_every_episode or args.eval_untrained) and not args.eval_model:
        return "--eval-reset-every-episode and --eval-untrained are controls of --eval-model RUN: add it"
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


def eval_keys(seeds: list[int], sharding):
    """`(training keys, evaluation keys)` of the seeds, laid out by `sharding`: the evaluation keys are fixed, so every
    evaluation of a run (and --eval-model) sees the same trials."""
    keys = seed_keys(seeds, sharding)
    return keys, jax.jit(jax.vmap(lambda k: jax.random.fold_in(k, 0x5EED)), out_shardings=sharding)(keys)


def to_host(tree):
    """Every seed's values as numpy arrays on every process (an all-gather across processes; one process: a copy)."""
    return multihost_utils.process_allgather(tree, tiled=True)


def local_seeds(sharding, num_seeds: int) -> list[int]:
    """Indices of the seeds whose shards this process holds (it writes their TensorBoard runs)."""
    indices = sharding.addressable_devices_indices_map((num_seeds,)).values()
    return sorted({i for (index,) in indices for i in range(num_seeds)[index]})


def default_chunk(num_updates: int, eval_every: int = 0) -> int:
    """The largest divisor of num_updates (and of eval_every: evaluations end chunks) up to num_updates // 25 (at
    least 1): one program compiled, ~25 chunks."""
    whole = math.gcd(num_updates, eval_every) if eval_every else num_updates
    return max(d for d in range(1, max(1, num_updates // 25) + 1) if whole % d == 0)


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


def compile_training(init, update_chunk, keys, sharding, chunk_lengths, evaluate, keys_eval, seed_batching: str):
    """Initialise every seed (`keys`: [seeds], sharded; parameters outside the training jit) and compile
    `update_chunk` per chunk length and `evaluate` (every seed's parameters, `keys_eval`), all programs at once: XLA
    compiles each on one thread. vmap: programs of all the seeds; loop: of one seed, run for each in turn. Returns
    `(runner_state with a leading seed axis on every leaf, {length: compiled chunk}, compiled evaluate)`."""
    if seed_batching == "vmap":
        init_lowered = jax.jit(jax.vmap(init), out_shardings=sharding).lower(keys)
        evaluate_jit = jax.jit(jax.vmap(evaluate), in_shardings=sharding, out_shardings=sharding)
        evaluate_lowered = evaluate_jit.lower(init_lowered.out_info.train_state.params, keys_eval)
        chunk = lambda n: jax.jit(jax.vmap(partial(update_chunk, num_updates=n)), in_shardings=sharding,  # noqa: E731
                                  out_shardings=sharding).lower(init_lowered.out_info)
    else:  # one device (check_args): the keys uncommitted, like every later state, so split_seeds compiles once
        keys = jax.random.wrap_key_data(np.asarray(jax.random.key_data(keys)))
        init_lowered = jax.jit(init).lower(keys[0])
        evaluate_lowered = jax.jit(evaluate).lower(init_lowered.out_info.train_state.params, keys_eval[0])
        chunk = lambda n: jax.jit(partial(update_chunk, num_updates=n)).lower(init_lowered.out_info)  # noqa: E731
    lowered = [init_lowered, evaluate_lowered] + [chunk(n) for n in sorted(chunk_lengths)]
    with ThreadPoolExecutor(len(lowered)) as pool:
        programs = pool.map(lambda program: program.compile(), lowered)
    init_compiled, evaluate_compiled, *chunks = programs if seed_batching == "vmap" else map(each_seed, programs)
    return init_compiled(keys), dict(zip(sorted(chunk_lengths), chunks)), evaluate_compiled


def derive_sizes(args: Args) -> Args:
    if args.s5_scan == "auto":  # resolved here so that the logged hyperparameters say which ran
        args.s5_scan = "sequential" if jax.default_backend() == "cpu" else "parallel"
    if args.seed_batching == "auto":  # measured on a CPU: a vmap over one seed slows the LSTM-256 by a third; S5
        # and width 64 run faster vmapped (benchmarks/bench_seed_batching.py)
        one_seed_on_cpu = args.num_seeds == 1 and jax.default_backend() == "cpu" and jax.device_count() == 1
        wide_lstm = args.memory == "lstm" and args.hidden_size >= 256
        args.seed_batching = "loop" if one_seed_on_cpu and wide_lstm and not args.distributed else "vmap"
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
    "resume eval_model eval_episodes eval_greedy eval_reset_every_episode eval_untrained batch_size minibatch_size "
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
    """Args from their JSON or msgpack form (flax's msgpack stores a tuple as {"0": ..., "1": ...})."""

    def fix(v):  # the tuples: --train-envs, --heldout-envs
        if isinstance(v, dict):
            return tuple(v[k] for k in sorted(v, key=int))
        return tuple(v) if isinstance(v, list) else v

    saved = {"seed_batching": "vmap", **saved}  # runs saved before --seed-batching ran vmap
    return Args(**{f.name: fix(saved[f.name]) for f in fields(Args) if f.name in saved and f.name not in LAUNCH})


def run_folder(path: str) -> str:
    """The run folder of a `.cleanrl_model` file, of a run folder or of its `checkpoints/` folder."""
    path = os.path.abspath(path)
    return os.path.dirname(path) if os.path.isfile(path) or os.path.basename(path) == "checkpoints" else path


def checkpoints(path: str, args: Args | None = None) -> ocp.CheckpointManager:
    """A run's `checkpoints/`, to read (no `args`) or to write (keeps the latest --keep-checkpoints). Step = PPO
    updates done; items: `state` (every seed's RunnerState, PRNG keys as key_data) and `meta` (JSON: the Args, the
    per-update metrics and the evaluations so far, run seconds so far). Every process of a --distributed run writes
    its own shards."""
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


def save_checkpoint(manager, runner: RunnerState, args: Args, history: list, evals: list, run_s: float) -> int:
    """Checkpoint `runner` (the last completed chunk); written in the background while training goes on."""
    optimizer_steps = np.asarray(runner.train_state.step.addressable_shards[0].data)[0]  # the same in every seed
    step = int(optimizer_steps) // (args.num_minibatches * args.update_epochs)
    if step not in manager.all_steps():
        evals = [record for record in evals if record["update"] <= step]
        meta = strict_json({"args": asdict(args), "history": history[:step], "evals": evals, "run_seconds": run_s})
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
    _, meta, state = restore_checkpoint(path)  # as numpy: on one device, they would not go with sharded eval keys
    return args_from(meta["args"]), jax.tree.map(np.asarray, state["train_state"]["params"])


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


def eval_record(seeds: list[int], iteration: int | None, global_step: int | None, results: dict) -> dict:
    """One evaluation for summary.json: per seed and env the mean return of each episode index of a trial; per split
    (train, heldout), across seeds (mean, std): each env's curve, and the first and last episode's return averaged
    over the split's envs, and their difference."""
    per_seed = {str(s): {k: v[i].tolist() for k, v in results.items()} for i, s in enumerate(seeds)}
    record = {"update": iteration, "global_step": global_step, "per_seed": per_seed}
    mean_std = lambda x: {"mean": x.mean(0).tolist(), "std": x.std(0).tolist()}  # noqa: E731  (over seeds)
    for split in ("train", "heldout"):
        curves = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(split + "/")}  # [seeds, episodes]
        if curves:
            split_mean = np.mean(list(curves.values()), 0)  # [seeds, episodes], averaged over envs
            first, last = split_mean[:, 0], split_mean[:, -1]
            stats = {"first_episode": first, "last_episode": last, "improvement": last - first}
            record[split] = {"episode_returns": {k: mean_std(v) for k, v in curves.items()}}
            record[split].update({k: mean_std(x) for k, x in stats.items()})
    return record


def eval_line(record: dict, args: Args) -> str:
    """An evaluation's first and last episode return per split (mean +- std over seeds), for the progress lines."""
    return " | ".join(
        f"{split} envs: episode 1 {r['first_episode']['mean']:+.4f} +- {r['first_episode']['std']:.4f}, "
        f"episode {args.episodes_per_trial} {r['last_episode']['mean']:+.4f} +- {r['last_episode']['std']:.4f}"
        for split, r in record.items()
        if split in ("train", "heldout")
    )


def evaluate_model(args: Args) -> dict:
    """--eval-model: every seed's saved (or with --eval-untrained, initial) policy plays --eval-episodes trials of
    every train and held-out env, on the keys of the training run's evaluations; prints the in-context curves and
    writes eval.json (eval_untrained.json, eval_reset_every_episode.json for the controls) beside the model."""
    derive_sizes(args)
    seeds = [args.seed + i for i in range(args.num_seeds)]
    keys, keys_eval = eval_keys(seeds, seed_sharding(args.num_seeds))  # --eval-untrained inits as the training did
    if args.eval_untrained:
        params = over_seeds(make_train(args)[0], args.seed_batching)(keys).train_state.params
    else:
        params = load_model(args.eval_model)[1]
    evaluate = make_evaluate(replace(args, eval_trials=args.eval_episodes), args.eval_greedy,
                             args.eval_reset_every_episode)  # fmt: skip
    record = eval_record(seeds, None, None, to_host(over_seeds(evaluate, args.seed_batching)(params, keys_eval)))
    for seed in seeds:
        for split in ("train", "heldout"):
            curves = np.array([v for k, v in record["per_seed"][str(seed)].items() if k.startswith(split + "/")])
            if len(curves):  # averaged over the split's envs
                print(f"seed {seed}, {split} envs: return per episode of a trial {np.round(curves.mean(0), 3)}")
    result = {"model": os.path.abspath(args.eval_model), "trials_per_env": args.eval_episodes, **record}
    result.update(greedy=args.eval_greedy, untrained=args.eval_untrained)
    result.update(reset_every_episode=args.eval_reset_every_episode)
    controls = [name for name in ("untrained", "reset_every_episode") if result[name]]
    path = os.path.join(run_folder(args.eval_model), "_".join(["eval"] + controls) + ".json")
    write_json(path, result)
    how = " ".join(["greedy" if args.eval_greedy else "sampled"] + [c.replace("_", "-") for c in controls])
    print(f"{how}, over {args.num_seeds} seed(s): {eval_line(record, args)}; written to {path}")
    return result


# Training loop, logging -----------------------------------------------------------------------------------------------
def summarize(args: Args, history: list[dict], evals: list[dict], compile_s: float, run_s: float) -> dict:
    """Per-seed results: the last update's mean inner-episode return (null if it finished none), and every evaluation
    (the last also as `final_eval`)."""
    seeds = [str(args.seed + i) for i in range(args.num_seeds)]
    steps = len(history) * args.batch_size
    summary = dict(train_envs=list(args.train_envs), heldout_envs=list(args.heldout_envs), updates=len(history))
    summary.update(global_step=steps, compile_seconds=compile_s, run_seconds=run_s)
    summary["sps"] = steps * args.num_seeds / run_s if run_s > 0 else None
    summary["final_episodic_return"] = dict(zip(seeds, history[-1]["episodic_return"])) if history else None
    summary.update(final_eval=evals[-1] if evals else None, evals=evals)
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


def log_iteration(writers: dict, metrics: dict, global_step: int):
    """One iteration's TensorBoard scalars; `writers`: {seed index: writer} of this process's seeds."""
    for i, writer in writers.items():
        for name in ("episodic_return", "first_episode_return", "last_episode_return"):
            if not np.isnan(metrics[name][i]):
                writer.add_scalar(f"charts/{name}", metrics[name][i], global_step)
        writer.add_scalar("charts/learning_rate", metrics["learning_rate"][i], global_step)
        for name in ("value_loss", "policy_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac"):
            writer.add_scalar(f"losses/{name}", metrics[name][i], global_step)
        writer.add_scalar("losses/explained_variance", metrics["explained_variance"][i], global_step)


def log_eval(writers: dict, results: dict, global_step: int):
    """An evaluation's scalars: every env's return per episode index, and each split's first and last episode."""
    for i, writer in writers.items():
        for split in ("train", "heldout"):
            curves = [(k, v[i]) for k, v in results.items() if k.startswith(split + "/")]
            for name, curve in curves:
                for k, value in enumerate(curve):
                    writer.add_scalar(f"eval/{name}/episode_{k + 1}", value, global_step)
            if curves:
                writer.add_scalar(f"eval/{split}/first_episode", np.mean([c[0] for _, c in curves]), global_step)
                writer.add_scalar(f"eval/{split}/last_episode", np.mean([c[-1] for _, c in curves]), global_step)
        writer.flush()


def main(args: Args) -> dict:
    """Train (or with args.resume continue) a run; returns its summary. Checkpoints, TensorBoard, summary.json. On
    Ctrl-C or SIGTERM it writes everything, then raises KeyboardInterrupt."""
    start_distributed(args)
    derive_sizes(args)
    chunk = args.updates_per_chunk or default_chunk(args.num_updates, args.eval_every)
    stamp = int(multihost_utils.broadcast_one_to_all(np.int32(time.time())))  # the run folder's: process 0's
    run_dir = args.resume or os.path.join(args.log_dir, f"metarl__{args.exp_name}__{args.seed}__{stamp}")
    run_name, seeds = os.path.basename(os.path.normpath(run_dir)), [args.seed + i for i in range(args.num_seeds)]
    lead = jax.process_index() == 0  # process 0 alone prints, writes summary.json and the model, runs wandb
    print0 = print if lead else lambda *_, **__: None
    history, evals, run_s, compile_s, runner, failure = [], [], 0.0, 0.0, None, None
    if args.resume:  # the logs continue from the checkpoint: metrics (null -> NaN) and evaluations so far, run time
        meta = restore_checkpoint(run_dir, meta_only=True)[1]
        if "logs" in meta:  # an earlier version's checkpoint: one "logs" entry, of the metrics only the returns
            logs = meta["logs"]
            meta = dict(history=[{"episodic_return": r} for r in logs["returns"]], evals=logs["evals"],
                        run_seconds=logs["run_seconds"])
        history, run_s = [{k: np.array(v, float) for k, v in h.items()} for h in meta["history"]], meta["run_seconds"]
        evals = meta["evals"]
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

    init, update_chunk = make_train(args)
    keys, keys_eval = eval_keys(seeds, sharding)
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    resumed = f", from update {last_saved}" if args.resume else ""
    envs = f"train {', '.join(args.train_envs)}; held-out {', '.join(args.heldout_envs) or 'none'}"
    print0(f"{run_name}: {args.num_seeds} seed(s) on {sharding.mesh.size} {jax.default_backend()} device(s){processes}"
           f", {args.num_updates} updates of {args.batch_size} steps{resumed}; {envs}")

    def run_eval(params):  # before the state moves on to `params`: a checkpoint holds the evaluations it has done
        t, global_step = time.time(), len(history) * args.batch_size
        results = to_host(evaluate(params, keys_eval))
        log_eval(writers, results, global_step)
        evals.append(eval_record(seeds, len(history), global_step, results))
        print0(f"eval at update {len(history)}: {eval_line(evals[-1], args)} ({time.time() - t:.1f} s)", flush=True)

    start = time.time()
    try:
        left = args.num_updates - len(history)
        lengths, evaluate = {min(chunk, left), left % chunk} - {0}, make_evaluate(args)
        runner, compiled, evaluate = compile_training(init, update_chunk, keys, sharding, lengths, evaluate, keys_eval,
                                                      args.seed_batching)
        if args.resume:
            runner = restore_checkpoint(run_dir, runner)[2]
        compile_s = time.time() - start
        print0(f"compiled in {compile_s:.1f} s")
        if not history:  # the untrained policy's evaluation
            run_eval(runner.train_state.params)
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
                iteration = len(history)
                log_iteration(writers, history[-1], global_step := iteration * args.batch_size)
            if failure:
                break
            if (args.eval_every and iteration % args.eval_every == 0) or iteration == args.num_updates:
                run_eval(new_runner.train_state.params)
            runner, sps = new_runner, n * args.batch_size / elapsed
            for writer in writers.values():
                writer.add_scalar("charts/SPS", sps, global_step)
                writer.flush()
            if args.checkpoint_every and iteration // args.checkpoint_every > last_saved // args.checkpoint_every:
                last_saved = save_checkpoint(manager, runner, args, history, evals, run_s)
            eta = run_s / iteration * (args.num_updates - iteration)
            print0(f"step {global_step:>10,}/{args.num_updates * args.batch_size:,} | SPS {sps * args.num_seeds:,.0f} "
                   f"(all seeds) | return {console_mean(history[-1]['episodic_return'])} | ETA {eta:.0f} s", flush=True)
    except KeyboardInterrupt:  # raised again once the finally below has written everything
        print(f"\ninterrupted after {len(history)} updates; writing what was logged", file=sys.stderr)
        raise
    finally:  # a crash, Ctrl-C or SIGTERM keeps everything logged so far, writes the summary and a checkpoint
        if manager is not None:
            if args.checkpoint_every and runner is not None and not failure:
                last_saved = save_checkpoint(manager, runner, args, history, evals, run_s)
            manager.wait_until_finished()
            manager.close()
        summary = summarize(args, history, evals, compile_s, run_s)
        if evals:
            print0(f"final eval over {args.num_seeds} seed(s): {eval_line(evals[-1], args)}")
        if history:
            print0(f"compile {compile_s:.1f} s, run {run_s:.1f} s, {summary['sps'] or 0:,.0f} steps/s")
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
