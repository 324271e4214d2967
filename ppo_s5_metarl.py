"""Multi-environment meta-RL with a resettable S5 memory (Lu et al., "Structured State Space Models
for In-Context Reinforcement Learning", NeurIPS 2023, section 5.3), PPO in one file.

A *trial* samples one continuous-control env of the training set and fresh random linear
projections of its observations and actions, and lasts `--episodes-per-trial` episodes. The agent
sees the projected observation, its previous action, the previous (scaled) reward and an
episode-boundary flag (`envs_popjax.MetaEnv` documents the layout, the projection distribution and
the reward scaling). Its S5 memory is reset only between trials, so it can learn *in context*:
identify the env and the projections during the first episodes and do better in later ones. That is
RL^2's meta-episode: PPO's `done` is the trial boundary, and GAE bootstraps across the episode
boundaries inside a trial (they are only an input flag) and is masked at trial boundaries only.

Every `--eval-every` updates and at the end, the policy runs one trial on fresh projections of every
training env and every held-out env (never trained on); the mean return of each episode index of
the trial is the in-context learning curve. TensorBoard tags per seed (`seed_{S+i}/`):
`charts/episodic_return` (mean scaled return of the *inner episodes* completed in a rollout, all
train envs and episode indices together), `charts/first_episode_return` and
`charts/last_episode_return` (only episode 1 / the last episode of their trial), `charts/SPS`,
`losses/*`; `eval/{train,heldout}/{env id}/episode_{k}` (k = 1..episodes per trial) and
`eval/{train,heldout}/{first,last}_episode` (averaged over the split's envs). summary.json holds
every evaluation per seed and, for the last one, mean and std over seeds.

CPU setting (the defaults): train on gymnax's PointRobot (dense reward, hidden goal) and Reacher,
hold out Swimmer and Pendulum; 6 episodes of 20 steps per trial, each restarting from the trial's
first state (`--fixed-reset`: the goal or target is the trial's task); 16-d projected observations,
2-d actions; 64 envs x 120 steps (one trial) per update, 8 epochs x 4 minibatches, lr 1e-3; S5 with
2 layers of width 64; 6.1M steps per seed. What it showed, and its wall time: the README's meta-RL section.

    python ppo_s5_metarl.py --num-seeds 3
    python ppo_s5_metarl.py --resume runs/metarl__...       # continue a stopped run bit for bit
    python ppo_s5_metarl.py --eval-model runs/metarl__...   # the held-out evaluation of a saved model
    tensorboard --logdir runs

Paper-scale setting (brax envs on a GPU; the paper used DMControl, whose meta-RL hyperparameters
were not published, so these are our choice at POPGym scale):

    python ppo_s5_metarl.py --num-seeds 8 --brax-backend mjx --episode-length 200 --episodes-per-trial 4 \
        --train-envs brax/hopper brax/walker2d brax/halfcheetah brax/ant brax/reacher brax/inverted_pendulum \
        --heldout-envs brax/inverted_double_pendulum brax/pusher brax/swimmer \
        --obs-size 32 --action-size 8 --num-envs 384 --num-steps 800 --num-minibatches 8 --update-epochs 10 \
        --d-model 256 --ssm-size 256 --n-layers 4 --s5-scan parallel --learning-rate 1e-4 \
        --total-timesteps 491520000 --eval-every 50

(1,600 updates of 307,200 steps; the settings pass `check_args` and the envs build with mjx, but
this setting has not been run: no GPU was available.)
"""

import importlib.util
import json
import math
import os
import signal
import sys
import time
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
    """PPO updates per jitted chunk between progress/TensorBoard writes (0: a divisor of the update count and
    of --eval-every near 1/25 of the updates)"""
    checkpoint_every: int = 20
    """write a checkpoint of the complete training state every N updates (at the first chunk boundary after
    each N; also at the end and on Ctrl-C/SIGTERM); 0: never"""
    keep_checkpoints: int = 3
    """how many of the latest checkpoints to keep"""
    resume: str = ""
    """continue the run in this run folder from its latest checkpoint, to its --total-timesteps (the other flags come
    from the checkpoint; only --total-timesteps (without --anneal-lr) and the logging/running flags may change)"""
    eval_model: str = ""
    """evaluate a saved model (a `.cleanrl_model` file or a run folder's checkpoint) instead of training"""
    eval_episodes: int = 100
    """trials (of --episodes-per-trial episodes, one memory) per env and seed played by --eval-model, on
    every train and held-out env"""
    eval_greedy: bool = False
    """--eval-model acts greedily (argmax / Gaussian mean) instead of sampling"""
    compile_cache: str = "~/.cache/s5_icrl_jax"
    """JAX persistent compilation cache folder, so a repeated or resumed run starts fast; empty string: off
    (the JAX_COMPILATION_CACHE_DIR environment variable, if set, wins)"""
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
    """every episode of a trial restarts from the trial's first env state (goal, target and start are part of the task)"""
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

    # S5 memory
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
    """how the resettable recurrence is evaluated: associative scan or lax.scan (same numbers to
    round-off); auto: lax.scan on CPU (faster there), the associative scan on GPU/TPU"""

    # to be filled in at runtime
    batch_size: int = 0
    """environment steps per update (num_envs * num_steps)"""
    minibatch_size: int = 0
    """transitions per minibatch"""
    num_updates: int = 0
    """PPO updates per seed (total_timesteps // batch_size)"""


# ---------------------------------------------------------------------------------------------
# S5 (Smith et al. 2023) with resets inside the scan (Lu et al. 2023, section 3).
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Actor-critic: shared encoder and S5 trunk, separate actor and critic heads (paper, app. B),
# a diagonal Gaussian policy over the agent's fixed-size action.
# ---------------------------------------------------------------------------------------------
class ActorCritic(nn.Module):
    action_dim: int
    memory: S5Memory

    @nn.compact
    def __call__(self, carry, obs, resets):
        dense = lambda n, scale=math.sqrt(2): nn.Dense(n, kernel_init=nn.initializers.orthogonal(scale))  # noqa: E731
        x = nn.leaky_relu(dense(128)(obs))
        x = nn.leaky_relu(dense(self.memory.config.d_model)(x))
        carry, x = self.memory(carry, x, resets)
        actor = nn.leaky_relu(dense(128, 2.0)(nn.leaky_relu(dense(128, 2.0)(x))))
        mean = dense(self.action_dim, 0.01)(actor)
        critic = nn.leaky_relu(dense(128, 2.0)(nn.leaky_relu(dense(128, 2.0)(x))))
        value = dense(1, 1.0)(critic)[..., 0]
        log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))  # state-independent
        return carry, (mean, jnp.broadcast_to(log_std, mean.shape)), value


def gaussian_sample(key, policy):
    mean, log_std = policy
    return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)


def gaussian_log_prob(policy, action):
    mean, log_std = policy
    z = (action - mean) / jnp.exp(log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi), -1)


def gaussian_entropy(policy):
    return jnp.sum(policy[1] + 0.5 * math.log(2 * math.pi * math.e), -1)


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------
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
    """GAE over [T, ...] arrays. dones[t] = obs t starts a trial, so step t is bootstrapped
    unless the *next* flag (dones[t + 1], or last_done) is set. Inner episode ends are not dones:
    the trial is one meta-episode (RL^2). Returns (advantages, returns)."""

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


def make_envs(args: Args, env_ids) -> list[envs_popjax.MetaEnv]:
    return [envs_popjax.MetaEnv(i, args.obs_size, args.action_size, args.episodes_per_trial,
                                args.episode_length or None, args.brax_backend, args.fixed_reset) for i in env_ids]  # fmt: skip


def build_network(args: Args) -> ActorCritic:
    memory = S5Memory(S5Config.from_args(args))
    return ActorCritic(args.action_size, memory)


def make_train(args: Args):
    """Returns `(init, update_chunk, evaluate)`, pure functions of one seed: `init(key) -> RunnerState`,
    `update_chunk(runner_state, num_updates) -> (runner_state, metrics[num_updates])` and
    `evaluate(params, key, greedy) -> {"{train|heldout}/{env id}": mean return per episode index}`."""
    train_ids, heldout_ids = envs_popjax.check_meta_env_sets(args.train_envs, args.heldout_envs)
    train_envs = make_envs(args, train_ids)
    pool = envs_popjax.MetaEnvPool(train_envs, args.num_envs)
    eval_envs = [("train", env) for env in train_envs] + [("heldout", env) for env in make_envs(args, heldout_ids)]
    network = build_network(args)
    new_carry = partial(S5Memory.initialize_carry, config=S5Config.from_args(args))
    num_episodes = args.episodes_per_trial

    def learning_rate(count):  # CleanRL's linear annealing, once per update
        frac = 1.0 - (count // (args.num_minibatches * args.update_epochs)) / args.num_updates
        return args.learning_rate * frac if args.anneal_lr else args.learning_rate

    # flatten: one vector for the optimizer instead of one per leaf, a smaller program to compile
    optimizer = optax.flatten(
        optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(learning_rate, eps=1e-5))
    )

    def init(key) -> RunnerState:
        key, key_params, key_env = jax.random.split(key, 3)
        dummy_obs = jnp.zeros((1, args.num_envs, pool.agent_obs_size))
        params = network.init(key_params, new_carry(args.num_envs), dummy_obs, jnp.ones((1, args.num_envs), bool))
        train_state = TrainState.create(apply_fn=network.apply, params=params, tx=optimizer)
        obs, env_state = pool.reset(key_env)
        done = jnp.ones(args.num_envs, bool)  # the first observation starts a trial
        return RunnerState(train_state, env_state, obs, done, new_carry(args.num_envs), key)

    def act(params, carry, obs, done, key, greedy=False):  # one step of the recurrent policy on a batch
        carry, policy, value = network.apply(params, carry, obs[None], done[None])
        policy = jax.tree.map(lambda p: p[0], policy)
        action = policy[0] if greedy else gaussian_sample(key, policy)
        return carry, action, gaussian_log_prob(policy, action), value[0]

    def env_step(runner: RunnerState, _):
        key, key_action, key_env = jax.random.split(runner.key, 3)
        carry, action, log_prob, value = act(runner.train_state.params, runner.carry, runner.obs, runner.done, key_action)
        obs, env_state, reward, done, info = pool.step(key_env, runner.env_state, action)  # done: trial ended
        transition = Transition(
            runner.obs, runner.done, action, log_prob, value, reward, info["episode_done"],
            info["episode_return"], info["episode_index"],
        )  # fmt: skip
        return RunnerState(runner.train_state, env_state, obs, done, carry, key), transition

    def ppo_loss(params, carry, batch: Transition, advantages, returns):
        _, policy, value = network.apply(params, carry, batch.obs, batch.done)
        log_prob = gaussian_log_prob(policy, batch.action)
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
        entropy = gaussian_entropy(policy).mean()
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
            last_episode_return=mean_return(batch.episode_done & (batch.episode_index == num_episodes - 1)),
            learning_rate=learning_rate(train_state.step - 1) * jnp.ones(()),
            # the run stops at the first update with a non-finite loss or parameter
            finite=jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves((train_state.params, stats))])),
        )
        return runner, metrics

    def update_chunk(runner: RunnerState, num_updates: int):
        return jax.lax.scan(update_step, runner, None, num_updates)

    def evaluate(params, key, greedy=False) -> dict[str, jax.Array]:
        """One trial on each of `eval_trials` fresh projections of every train and held-out env, acting
        with the stochastic (or greedy) policy from a zero memory. An env's keys are `key` folded with its
        registry index, so every evaluation of a run, and every run with the same seed, sees the
        same projections and starts (the curves over training compare like with like)."""
        results = {}
        for split, env in eval_envs:
            n = args.eval_trials
            key_reset, key_run = jax.random.split(jax.random.fold_in(key, envs_popjax.META_ENV_IDS.index(env.env_id)))
            obs, state = jax.vmap(env.reset)(jax.random.split(key_reset, n))

            def step(carry, key, env=env):
                memory, obs, done, state, active, returns = carry
                key_action, key_env = jax.random.split(key)
                memory, action, _, _ = act(params, memory, obs, done, key_action, greedy)
                obs, state, _, done, info = jax.vmap(env.step)(jax.random.split(key_env, n), state, action)
                counted = (active & info["episode_done"])[:, None] * jax.nn.one_hot(info["episode_index"], num_episodes)
                returns = returns + counted * info["episode_return"][:, None]
                return (memory, obs, done, state, active & ~done, returns), None

            init = (new_carry(n), obs, jnp.ones(n, bool), state, jnp.ones(n, bool), jnp.zeros((n, num_episodes)))
            # a trial lasts at most episodes_per_trial * episode_length steps; later steps are masked
            (*_, returns), _ = jax.lax.scan(step, init, jax.random.split(key_run, num_episodes * env.episode_length))
            results[f"{split}/{env.env_id}"] = returns.mean(0)
        return results

    return init, update_chunk, evaluate


# ---------------------------------------------------------------------------------------------
# Input checks, --resume
# ---------------------------------------------------------------------------------------------
def check_args(args: Args) -> str | None:
    """Return a one-line message saying what to change, or None if the settings can run."""
    try:
        train, _ = envs_popjax.check_meta_env_sets(args.train_envs, args.heldout_envs)
    except ValueError as error:
        return f"--train-envs/--heldout-envs: {error}"
    positive = ("num_seeds", "total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs",
                "episodes_per_trial", "obs_size", "action_size", "eval_trials", "d_model", "ssm_size", "n_layers",
                "s5_blocks", "learning_rate", "dt_min", "dt_max", "clip_coef", "max_grad_norm", "keep_checkpoints",
                "eval_episodes")  # fmt: skip
    non_negative = ("updates_per_chunk", "eval_every", "episode_length", "checkpoint_every", "vf_coef", "ent_coef",
                    "num_processes")  # fmt: skip
    for name in positive + non_negative:
        value = getattr(args, name)
        if not value >= 0 or (value == 0 and name in positive):
            return f"--{name.replace('_', '-')} must be {'positive' if name in positive else '>= 0'}, got {value}"
    for name in ("gamma", "gae_lambda"):
        if not 0 <= getattr(args, name) <= 1:
            return f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}"
    if args.num_envs % len(train):
        return (f"--num-envs {args.num_envs} must be divisible by the {len(train)} --train-envs "
                "(every training env gets the same number of parallel slots)")  # fmt: skip
    if args.num_envs % args.num_minibatches:
        return (f"--num-envs {args.num_envs} must be divisible by --num-minibatches {args.num_minibatches} "
                "(minibatches split the envs into whole sequences)")  # fmt: skip
    if args.total_timesteps < args.num_envs * args.num_steps:
        return (f"--total-timesteps {args.total_timesteps} gives zero updates: one update takes "
                f"--num-envs x --num-steps = {args.num_envs * args.num_steps} steps")  # fmt: skip
    if args.updates_per_chunk and args.eval_every and args.eval_every % args.updates_per_chunk:
        return f"--eval-every {args.eval_every} must be a multiple of --updates-per-chunk {args.updates_per_chunk}"
    if error := S5Config.from_args(args).error():
        return error
    if args.dt_min > args.dt_max:
        return f"--dt-min {args.dt_min} must not exceed --dt-max {args.dt_max}"
    if args.resume and args.eval_model:
        return "--resume and --eval-model exclude each other"
    if args.distributed and args.eval_model:
        return "--eval-model runs in one process; drop --distributed"
    if not args.distributed and (args.coordinator_address or args.num_processes or args.process_id >= 0):
        return "--coordinator-address, --num-processes, --process-id: a multi-process run's flags; add --distributed"
    if args.distributed and args.num_seeds % jax.process_count():
        return f"--num-seeds {args.num_seeds} must be divisible by the {jax.process_count()} processes of the run"
    for flag, path in (("--resume", args.resume), ("--eval-model", args.eval_model)):
        if path and not (flag == "--eval-model" and os.path.isfile(path)) and latest_checkpoint(path) is None:
            return f"{flag}: {path} is neither a .cleanrl_model file nor a run folder with checkpoints/"
    if args.track and importlib.util.find_spec("wandb") is None:
        return "--track logs to Weights & Biases, which is not installed: pip install wandb"
    return None


# may differ from the checkpoint's on --resume: they do not change the run's math (and --total-timesteps, see Args)
RESUME_MAY_CHANGE = ("log_dir", "updates_per_chunk", "checkpoint_every", "keep_checkpoints", "compile_cache",
                     "track", "wandb_project_name", "wandb_entity", "save_model")  # fmt: skip
NOT_COMPARED = ("resume", "eval_model", "eval_episodes", "eval_greedy", "batch_size", "minibatch_size", "num_updates")
# one launch's: a run may be resumed with another number of processes (the seeds compute the same)
DISTRIBUTED = ("distributed", "coordinator_address", "num_processes", "process_id")


def resume_error(args: Args, saved: Args, steps_done: int) -> str | None:
    """A flag given with --resume that would change the run. A larger --total-timesteps continues the same
    run further, unless --anneal-lr is on (the learning-rate schedule depends on the total)."""
    for name, new in asdict(args).items():
        if name in RESUME_MAY_CHANGE + NOT_COMPARED + DISTRIBUTED or new == (old := getattr(saved, name)):
            continue
        flag = "--" + name.replace("_", "-")
        if name == "total_timesteps" and args.anneal_lr:
            return (f"--resume: {flag} {new} differs from the checkpoint's {old}; with --anneal-lr it would change "
                    "the learning-rate schedule")  # fmt: skip
        if name == "total_timesteps" and new < steps_done:
            return f"--resume: {flag} {new} is below the {steps_done} steps the checkpoint has done"
        if name != "total_timesteps":
            allowed = ", ".join("--" + n.replace("_", "-") for n in ("total_timesteps",) + RESUME_MAY_CHANGE)
            return (f"--resume: {flag} {new} differs from the checkpoint's {old}; it would change the run "
                    f"(allowed to change: {allowed})")  # fmt: skip
    return None


# ---------------------------------------------------------------------------------------------
# Checkpoints (orbax), strict JSON, loading a saved model
# ---------------------------------------------------------------------------------------------
def checkpoint_manager(path: str, keep: int = 0) -> ocp.CheckpointManager | None:
    """The checkpoints of a run folder (or of its `checkpoints/` folder): written keeping the latest `keep`,
    or only read (keep 0; None if the folder does not exist)."""
    path = os.path.abspath(path)
    path = path if os.path.basename(path) == "checkpoints" else os.path.join(path, "checkpoints")
    if keep or os.path.isdir(path):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=bool(keep))
        handlers = {"state": ocp.StandardCheckpointHandler(), "args": ocp.JsonCheckpointHandler(),
                    "logs": ocp.JsonCheckpointHandler()}  # fmt: skip
        return ocp.CheckpointManager(path, options=options, item_handlers=handlers)


def latest_checkpoint(path: str) -> int | None:
    return (manager := checkpoint_manager(path)) and manager.latest_step()


def read_checkpoint(path: str, state=None, raw_state: bool = False) -> dict:
    """The latest checkpoint's `args` and `logs` (JSON), and its training `state`: restored bit for bit
    into the abstract structure `state` (with shardings) if given, as saved (nested dicts on this process's first
    device, whichever processes and devices wrote it) if `raw_state`."""
    items = dict(args=ocp.args.JsonRestore(), logs=ocp.args.JsonRestore())
    manager = checkpoint_manager(path)
    step = manager.latest_step()
    if state is not None:  # PRNG keys are stored as their key data
        items["state"] = ocp.args.StandardRestore(state._replace(key=jax.random.key_data(state.key)))
    elif raw_state:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                manager.item_metadata(step)["state"])  # fmt: skip
        items["state"] = ocp.args.StandardRestore(abstract)
    restored = dict(manager.restore(step, args=ocp.args.Composite(**items)))
    manager.close()
    if state is not None:
        restored["state"] = restored["state"]._replace(key=jax.random.wrap_key_data(restored["state"].key))
    return restored


def strict_json(x):
    """NaN and inf -> None (JSON null), recursively: `json.dump(..., allow_nan=False)` then writes strict JSON."""
    if isinstance(x, dict):
        return {str(k): strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return int(x) if isinstance(x, np.integer) else x


def write_json(path: str, obj):
    with open(path, "w") as f:
        json.dump(strict_json(obj), f, indent=2, allow_nan=False)


def args_from_dict(saved: dict) -> Args:
    """Args from their JSON or msgpack form (flax's msgpack stores a tuple as {"0": ..., "1": ...})."""
    def fix(v):
        return tuple(v[k] for k in sorted(v, key=int)) if isinstance(v, dict) else tuple(v) if isinstance(v, list) else v

    return Args(**{k: fix(v) for k, v in saved.items()})


def load_model(path: str) -> tuple[Args, dict]:
    """(Args, params with a leading [num_seeds] axis) from a `--save-model` file or from the latest
    checkpoint of a run folder (or of its checkpoints folder)."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            saved = flax.serialization.msgpack_restore(f.read())
        return args_from_dict(saved["0"]), saved["1"]
    restored = read_checkpoint(path, raw_state=True)
    return args_from_dict(restored["args"]), jax.tree.map(np.asarray, restored["state"]["train_state"]["params"])


# ---------------------------------------------------------------------------------------------
# Running: seeds and devices, evaluation and logging
# ---------------------------------------------------------------------------------------------
def start_distributed(args: Args):
    """--distributed: join the multi-process run before any other JAX call (explicit flags, else auto-detected)."""
    if args.distributed and not jax.distributed.is_initialized():
        jax.extend.backend.clear_backends()  # importing gymnax made an array (frozen_lake), which started JAX
        jax.distributed.initialize(args.coordinator_address or None, args.num_processes or None,
                                   None if args.process_id < 0 else args.process_id)  # fmt: skip


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
    """Every seed's values as numpy arrays on every process (an all-gather across processes)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def local_seeds(sharding, num_seeds: int) -> list[int]:
    """The indices of the seeds whose shards this process holds (all of them in one process)."""
    held = sharding.addressable_devices_indices_map((num_seeds,)).values()
    return sorted({i for (index,) in held for i in range(num_seeds)[index]})


def derive_sizes(args: Args) -> Args:
    if args.s5_scan == "auto":  # resolved here so that the logged hyperparameters say which ran
        args.s5_scan = "sequential" if jax.default_backend() == "cpu" else "parallel"
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // args.num_minibatches
    args.num_updates = args.total_timesteps // args.batch_size
    return args


def default_chunk(args: Args) -> int:
    """The largest divisor of the update count (and of --eval-every) up to 1/25 of the updates."""
    whole = math.gcd(args.num_updates, args.eval_every) if args.eval_every else args.num_updates
    return max(d for d in range(1, max(1, args.num_updates // 25) + 1) if whole % d == 0)


def eval_record(seeds: list[int], update: int, step: int, results: dict) -> dict:
    """One evaluation for summary.json: per seed and env the mean return of each episode index of a
    trial; per split (train, heldout), across seeds (mean, std): each env's curve, and the first and
    last episode's return averaged over the split's envs, and their difference."""
    record = {"update": update, "global_step": step,
              "per_seed": {str(s): {k: v[i].tolist() for k, v in results.items()} for i, s in enumerate(seeds)}}  # fmt: skip
    for split in ("train", "heldout"):
        curves = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(split + "/")}  # [seeds, episodes]
        if curves:
            split_mean = np.mean(list(curves.values()), 0)  # [seeds, episodes], averaged over envs
            record[split] = {
                "episode_returns": {k: {"mean": v.mean(0).tolist(), "std": v.std(0).tolist()} for k, v in curves.items()},
                **{name: {"mean": float(x.mean()), "std": float(x.std())} for name, x in (
                    ("first_episode", split_mean[:, 0]), ("last_episode", split_mean[:, -1]),
                    ("improvement", split_mean[:, -1] - split_mean[:, 0]))},
            }  # fmt: skip
    return record


def log_eval(writers, results: dict, step: int):
    for i, writer in writers.items():  # {seed index: writer}
        for split in ("train", "heldout"):
            curves = [(k, v[i]) for k, v in results.items() if k.startswith(split + "/")]
            for name, curve in curves:
                for k, value in enumerate(curve):
                    writer.add_scalar(f"eval/{name}/episode_{k + 1}", value, step)
            if curves:
                writer.add_scalar(f"eval/{split}/first_episode", np.mean([c[0] for _, c in curves]), step)
                writer.add_scalar(f"eval/{split}/last_episode", np.mean([c[-1] for _, c in curves]), step)
        writer.flush()


def eval_keys(seeds: list[int], sharding):
    """The training and evaluation keys of the seeds: fixed, so every evaluation (and --eval-model) sees the same
    trials."""
    keys = seed_keys(seeds, sharding)
    return keys, jax.jit(jax.vmap(lambda k: jax.random.fold_in(k, 0x5EED)), out_shardings=sharding)(keys)


def enable_compile_cache(folder: str):
    """JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR, if set, wins): a rerun skips compiling."""
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser(folder)
    if folder:
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def main(args: Args) -> dict:
    start_distributed(args)
    enable_compile_cache(args.compile_cache)
    derive_sizes(args)
    chunk = args.updates_per_chunk or default_chunk(args)
    lead = jax.process_index() == 0  # process 0 alone prints, writes summary.json and the model, runs wandb
    say = print if lead else lambda *_, **__: None
    # logs: what summary.json and the progress need to continue after --resume (saved with each checkpoint)
    logs = {"returns": [], "evals": [], "global_step": 0, "run_seconds": 0.0, "compile_seconds": 0.0}
    if args.resume:
        run_dir = args.resume.rstrip("/")
        logs = read_checkpoint(run_dir)["logs"]
    else:  # the processes of a --distributed run agree on the run folder's time stamp
        stamp = np.int32(time.time())
        stamp = int(multihost_utils.broadcast_one_to_all(stamp)) if jax.process_count() > 1 else int(stamp)
        run_dir = os.path.join(args.log_dir, f"metarl__{args.exp_name}__{args.seed}__{stamp}")
    run_name, seeds = os.path.basename(run_dir), [args.seed + i for i in range(args.num_seeds)]
    if args.track and lead:  # CleanRL's: imported only when asked; TensorBoard's scalars are synced
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=run_name, save_code=True)  # fmt: skip
    sharding = seed_sharding(args.num_seeds)
    # TensorBoard continues after the checkpoint's step; anything a killed process logged later is purged.
    # Each process writes the runs of the seeds it holds.
    purge = logs["global_step"] + 1 if args.resume else None
    writers = {i: SummaryWriter(os.path.join(run_dir, f"seed_{seeds[i]}"), purge_step=purge)
               for i in local_seeds(sharding, args.num_seeds)}  # fmt: skip
    table = "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    for writer in writers.values() if not args.resume else []:
        writer.add_text("hyperparameters", table)

    init, update_chunk, evaluate = make_train(args)
    keys, keys_eval = eval_keys(seeds, sharding)
    say(f"{run_name}: {args.num_seeds} seed(s) on {sharding.mesh.size} {jax.default_backend()} device(s), "
        f"{args.num_updates} updates of {args.batch_size} steps; train {', '.join(args.train_envs)}; "
        f"held-out {', '.join(args.heldout_envs) or 'none'}")  # fmt: skip
    start = time.time()
    # every leaf carries the leading seed axis, sharded; parameters are initialised outside the training jit
    runner = jax.jit(jax.vmap(init), out_shardings=sharding).lower(keys).compile()(keys)
    if args.resume:  # the checkpoint's state, bit for bit, in the structure and sharding of a fresh one
        runner = read_checkpoint(run_dir, state=runner)["state"]
    evaluate_seeds = jax.jit(jax.vmap(evaluate), in_shardings=sharding, out_shardings=sharding)
    manager = checkpoint_manager(run_dir, args.keep_checkpoints) if args.checkpoint_every else None
    compiled, returns, evals = {}, logs["returns"], logs["evals"]
    saved = len(returns) if args.resume else 0  # the update count of the latest checkpoint

    def compiled_chunk(n):  # one compile per distinct chunk length (at most two)
        if n not in compiled:
            chunk_fn = jax.vmap(partial(update_chunk, num_updates=n))
            compiled[n] = jax.jit(chunk_fn, in_shardings=sharding, out_shardings=sharding).lower(runner).compile()
        return compiled[n]

    def run_eval():
        t = time.time()
        results = to_host(evaluate_seeds(runner.train_state.params, keys_eval))
        log_eval(writers, results, logs["global_step"])
        evals.append(eval_record(seeds, len(returns), logs["global_step"], results))
        line = " | ".join(f"{s} episode 1 {evals[-1][s]['first_episode']['mean']:+.3f} -> {args.episodes_per_trial} "
                          f"{evals[-1][s]['last_episode']['mean']:+.3f}" for s in ("train", "heldout") if s in evals[-1])  # fmt: skip
        say(f"eval at update {len(returns)}: {line} ({time.time() - t:.1f} s)", flush=True)

    def checkpoint(force=False):  # every --checkpoint-every updates (at the next chunk boundary), at the end, on Ctrl-C
        nonlocal saved
        done = len(returns)
        if manager and done != saved and (force or done // args.checkpoint_every > saved // args.checkpoint_every):
            state = runner._replace(key=jax.random.key_data(runner.key))  # every process saves its own shards
            manager.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                         args=ocp.args.JsonSave(asdict(args)), logs=ocp.args.JsonSave(strict_json(logs))))  # fmt: skip
            saved = done

    failure = None
    try:
        compiled_chunk(min(chunk, args.num_updates - len(returns)) or 1)
        logs["compile_seconds"] += time.time() - start
        say(f"compiled in {time.time() - start:.1f} s" + (f"; resumed at update {len(returns)}" if args.resume else ""))
        if not returns:
            run_eval()
        while len(returns) < args.num_updates:
            n = min(chunk, args.num_updates - len(returns))
            if n not in compiled:
                t = time.time()
                compiled_chunk(n)
                logs["compile_seconds"] += time.time() - t
            t = time.time()
            new_runner, metrics = compiled_chunk(n)(runner)
            metrics = to_host(jax.block_until_ready(metrics))  # [seeds, n]
            elapsed = time.time() - t
            logs["run_seconds"] += elapsed
            sps = n * args.batch_size / elapsed
            bad = np.argwhere(~metrics.pop("finite").T)  # (update in chunk, seed index) of non-finite updates
            new_returns = []
            for u in range(bad[0, 0] if len(bad) else n):  # only the updates before a non-finite one
                step = logs["global_step"] + (u + 1) * args.batch_size
                update = {k: v[:, u] for k, v in metrics.items()}
                new_returns.append(update["episodic_return"].tolist())
                for i, writer in writers.items():
                    for name in ("episodic_return", "first_episode_return", "last_episode_return"):
                        if not np.isnan(update[name][i]):
                            writer.add_scalar(f"charts/{name}", update[name][i], step)
                    writer.add_scalar("charts/learning_rate", update["learning_rate"][i], step)
                    for name in ("value_loss", "policy_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac",
                                 "explained_variance"):  # fmt: skip
                        writer.add_scalar(f"losses/{name}", update[name][i], step)
            # the returns, the step count and the state change together (a checkpoint saves them)
            returns += new_returns
            logs["global_step"] += len(new_returns) * args.batch_size
            if len(bad):
                raise FloatingPointError(
                    f"non-finite loss/parameters at update {len(returns) + 1} (seed {seeds[bad[0, 1]]}); last good "
                    f"checkpoint: " + (f"update {saved} in {run_dir}/checkpoints" if saved else "none")
                )  # fmt: skip
            runner = new_runner
            for writer in writers.values():
                writer.add_scalar("charts/SPS", sps, logs["global_step"])
                writer.flush()
            eta = logs["run_seconds"] / len(returns) * (args.num_updates - len(returns))
            last = np.array(returns[-1], float)
            mean_ret = np.nanmean(last) if np.isfinite(last).any() else float("nan")
            say(f"step {logs['global_step']:>10,}/{args.num_updates * args.batch_size:,} | SPS {sps * args.num_seeds:,.0f} "
                f"(all seeds) | episode return {mean_ret:+.3f} | ETA {eta:.0f} s", flush=True)  # fmt: skip
            if (args.eval_every and len(returns) % args.eval_every == 0) or len(returns) == args.num_updates:
                run_eval()
            checkpoint()
        checkpoint(force=True)
    except KeyboardInterrupt:
        say(f"\ninterrupted after {len(returns)} updates; writing what was logged and a checkpoint", file=sys.stderr)
        checkpoint(force=True)
    except FloatingPointError as error:  # the last good checkpoint stays the latest
        failure = str(error)
    finally:  # a crash or Ctrl-C keeps everything logged so far, and writes the summary
        run_s, compile_s, steps_done = logs["run_seconds"], logs["compile_seconds"], logs["global_step"]
        summary = {"train_envs": list(args.train_envs), "heldout_envs": list(args.heldout_envs),
                   "updates": len(returns), "global_step": steps_done, "compile_seconds": compile_s,
                   "run_seconds": run_s, "sps": steps_done * args.num_seeds / run_s if run_s > 0 else None,
                   # null for a seed whose last update finished no inner episode
                   "final_episodic_return": dict(zip(map(str, seeds), returns[-1])) if returns else None,
                   "final_eval": evals[-1] if evals else None, "evals": evals}  # fmt: skip
        for split in ("train", "heldout"):
            if evals and split in evals[-1]:
                r = evals[-1][split]
                say(f"final eval, {split} envs over {args.num_seeds} seed(s): episode 1 {r['first_episode']['mean']:+.4f} "
                    f"+- {r['first_episode']['std']:.4f}, episode {args.episodes_per_trial} "
                    f"{r['last_episode']['mean']:+.4f} +- {r['last_episode']['std']:.4f}")  # fmt: skip
        say(f"compile {compile_s:.1f} s, run {run_s:.1f} s, {summary['sps'] or 0:,.0f} steps/s")
        if lead:
            write_json(os.path.join(run_dir, "summary.json"), {"args": asdict(args), **summary})
        if args.save_model:
            params = to_host(runner.train_state.params)  # an all-gather: every process takes part
            path = os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
            if lead:
                with open(path, "wb") as f:  # params carry a leading [num_seeds] axis
                    f.write(flax.serialization.to_bytes([asdict(args), params]))
            say(f"model saved to {path}")
        if manager:
            manager.wait_until_finished()
            manager.close()
        for writer in writers.values():
            writer.close()
        if args.track and lead:
            wandb.finish()
        say(f"results in {run_dir}")
    if failure:
        say(f"error: {failure}", file=sys.stderr)
        sys.exit(1)
    return summary


def evaluate_model(args: Args) -> dict:
    """--eval-model: the in-context evaluation of a saved model, --eval-episodes trials per train and held-out
    env and seed, on the keys of the training run's evaluations; eval.json beside the model."""
    saved, params = load_model(args.eval_model)
    enable_compile_cache(args.compile_cache)
    saved = derive_sizes(replace(saved, eval_trials=args.eval_episodes))
    seeds = [saved.seed + i for i in range(saved.num_seeds)]
    evaluate = make_train(saved)[2]
    keys_eval = eval_keys(seeds, seed_sharding(len(seeds)))[1]
    results = jax.jit(jax.vmap(partial(evaluate, greedy=args.eval_greedy)))(params, keys_eval)
    record = eval_record(seeds, None, None, jax.tree.map(np.asarray, results))
    for i, seed in enumerate(seeds):
        for split in ("train", "heldout"):
            curves = np.array([v for k, v in record["per_seed"][str(seed)].items() if k.startswith(split + "/")])
            if len(curves):
                print(f"seed {seed}, {split} envs: return per episode of a trial " + " ".join(f"{x:+.3f}" for x in curves.mean(0))
                      + f" (first {curves[:, 0].mean():+.3f} +- {curves[:, 0].std():.3f} over envs, last "
                      f"{curves[:, -1].mean():+.3f} +- {curves[:, -1].std():.3f})")  # fmt: skip
    for split in ("train", "heldout"):
        if split in record:
            r = record[split]
            print(f"{split} envs over {len(seeds)} seed(s): episode 1 {r['first_episode']['mean']:+.4f} +- "
                  f"{r['first_episode']['std']:.4f}, episode {saved.episodes_per_trial} {r['last_episode']['mean']:+.4f} "
                  f"+- {r['last_episode']['std']:.4f}")  # fmt: skip
    path = os.path.abspath(args.eval_model)
    folder = os.path.dirname(path) if os.path.isfile(path) or os.path.basename(path) == "checkpoints" else path
    result = {"model": args.eval_model, "trials_per_env": args.eval_episodes, "greedy": args.eval_greedy, **record}
    write_json(os.path.join(folder, "eval.json"), result)
    print(f"written to {os.path.join(folder, 'eval.json')}")
    return result


def parse_args() -> tuple[Args, str | None]:
    """The CLI: `(args, error or None)`. --distributed joins the run first (before any other JAX call); with
    --resume the defaults come from the checkpoint and a flag that would change the run is refused."""
    args = tyro.cli(Args)
    if not args.eval_model:
        start_distributed(args)
    error = check_args(args)
    if error or not args.resume:
        return args, error
    restored = read_checkpoint(args.resume)
    running = {f.name: getattr(args, f.name) for f in fields(Args) if f.name in DISTRIBUTED}  # this launch's
    saved = replace(args_from_dict(restored["args"]), **running)
    args = tyro.cli(Args, default=saved)
    return args, check_args(args) or resume_error(args, saved, restored["logs"]["global_step"])


if __name__ == "__main__":
    # Python leaves SIGINT ignored when started from a background shell; Ctrl-C must stop cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM too: checkpoint, summary, exit
    args, error = parse_args()
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    evaluate_model(args) if args.eval_model else main(args)
