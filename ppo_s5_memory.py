"""PPO with a resettable S5 memory on bsuite's MemoryChain, swept over memory lengths (the memory
length experiment of Lu et al., "Structured State Space Models for In-Context Reinforcement
Learning", NeurIPS 2023), in one file.

The agent sees a context bit (+-1) at the start of an episode and must answer it L steps later;
only that last step is rewarded (+1 right, -1 wrong). Episodes last L + 1 steps and all envs start
together, so the default rollout (a multiple of L + 1) makes every training sequence hold whole
episodes: the answer's gradient reaches the step that saw the context. Every (memory length, seed)
pair that shares a rollout length is one entry of a single vmapped program (the memory length is
an env param, not a shape); the groups train one after the other. Each pair gets its own
TensorBoard run; the run folder also gets a summary table, JSON and a plot of success rate
against memory length. Measured results and settings: README.

    python ppo_s5_memory.py --num-seeds 4                               # bsuite's lengths 1..100
    python ppo_s5_memory.py --memory-lengths 255 1023 --num-envs 8 --total-timesteps 20000000
    python ppo_s5_memory.py --resume runs/MemoryChain__...             # continue a stopped sweep
    python ppo_s5_memory.py --eval-model runs/MemoryChain__...         # evaluate its saved parameters
    tensorboard --logdir runs
"""

import importlib.util
import json
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from functools import lru_cache, partial
from typing import Literal, NamedTuple

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import orbax.checkpoint as ocp
import tyro
from flax.training.train_state import TrainState
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
    """PPO updates per jitted chunk between progress/TensorBoard writes (0: about 1/25 of a group's run)"""
    checkpoint_every: int = 20
    """write a checkpoint of the complete training state every N updates (at the first chunk boundary after
    each N; also at the end and on Ctrl-C/SIGTERM); 0: never. Here N counts the updates of the whole sweep:
    a checkpoint holds the finished groups' results and parameters and the current group's training state"""
    keep_checkpoints: int = 3
    """how many of the latest checkpoints to keep"""
    resume: str = ""
    """continue the run in this run folder from its latest checkpoint, to its --total-timesteps (the other flags come
    from the checkpoint; only the logging/running flags may change): finished groups are skipped, the group under
    way continues bit for bit"""
    eval_model: str = ""
    """evaluate a saved model (a `.cleanrl_model` file or a run folder's checkpoint) instead of training"""
    eval_episodes: int = 100
    """episodes per seed played by --eval-model (per memory length and seed here)"""
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

    # Algorithm specific arguments
    memory_lengths: tuple[int, ...] = BSUITE_MEMORY_LENGTHS
    """memory lengths L to sweep (an episode lasts L + 1 steps); any list, e.g. 256 1024 4096"""
    num_bits: int = 1
    """context bits (bsuite's memory_len uses 1; its memory_size experiment varies this)"""
    total_timesteps: int = 1_000_000
    """environment steps per (length, seed)"""
    learning_rate: float = 1e-3
    """Adam learning rate (1e-3 solved L = 32 on 4/4 seeds in 300k steps where 2.5e-4 solved 2/4)"""
    num_envs: int = 16
    """parallel environments per (length, seed)"""
    num_steps: int = 0
    """steps per env per rollout; 0: per length, the smallest multiple of L + 1 that is >= 32, so every
    training sequence holds whole episodes (lengths with the same rollout are vmapped together)"""
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
    """how the resettable recurrence is evaluated: associative scan or lax.scan (same numbers to
    round-off); auto: lax.scan on CPU (faster there, and compiles in a fraction of the time), the
    associative scan on GPU/TPU"""


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
# Actor-critic: shared encoder and S5 trunk, separate one-layer actor and critic heads.
# ---------------------------------------------------------------------------------------------
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


def log_prob_of(logits, action):
    return jnp.take_along_axis(jax.nn.log_softmax(logits), action[..., None], -1)[..., 0]


def entropy_of(logits):
    log_p = jax.nn.log_softmax(logits)
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


def rollout_length(args: Args, memory_length: int) -> int:
    """Steps per env per rollout for a length: --num-steps, or the smallest multiple of L + 1 that is
    >= 32. All envs start together and episodes last L + 1 steps, so every rollout (one training
    sequence per env) then starts an episode and holds whole episodes only."""
    return args.num_steps or -(-32 // (memory_length + 1)) * (memory_length + 1)


def build(args: Args, num_envs: int):
    """`num_envs` wrapped MemoryChain envs (envs_popjax.make_vec), their params, the network, the carry constructor."""
    env, env_params = envs_popjax.make_vec("MemoryChain", num_envs, wrappers=True, num_bits=args.num_bits)
    memory = S5Memory(S5Config.from_args(args))
    network = ActorCritic(env.action_space(env_params).n, args.hidden_size, memory)
    new_carry = partial(S5Memory.initialize_carry, config=S5Config.from_args(args))
    return env, env_params, network, new_carry


def make_train(args: Args, num_steps: int):
    """Returns `(init, update_chunk, num_updates)` for one (length, seed) with rollouts of
    `num_steps`: `init(key, memory_length) -> RunnerState` and
    `update_chunk(runner_state, num_updates) -> (runner_state, metrics[num_updates])`, both pure."""
    env, env_params, network, new_carry = build(args, args.num_envs)
    obs_size = env.observation_space(env_params).shape[0]
    num_updates = args.total_timesteps // (args.num_envs * num_steps)

    def learning_rate(count):  # CleanRL's linear annealing, once per update
        frac = 1.0 - (count // (args.num_minibatches * args.update_epochs)) / num_updates
        return args.learning_rate * frac if args.anneal_lr else args.learning_rate

    # flatten: one vector for the optimizer instead of ~60 leaves, a smaller program to compile
    optimizer = optax.flatten(
        optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(learning_rate, eps=1e-5))
    )

    def init(key, memory_length) -> RunnerState:
        key, key_params, key_env = jax.random.split(key, 3)
        params = env_params.replace(memory_length=memory_length)
        dummy_obs = jnp.zeros((1, args.num_envs, obs_size))
        net_params = network.init(key_params, new_carry(args.num_envs), dummy_obs, jnp.ones((1, args.num_envs), bool))
        train_state = TrainState.create(apply_fn=network.apply, params=net_params, tx=optimizer)
        obs, env_state = env.reset(key_env, params)
        done = jnp.ones(args.num_envs, bool)  # the first observation starts an episode
        return RunnerState(train_state, params, env_state, obs, done, new_carry(args.num_envs), key)

    def env_step(runner: RunnerState, _):
        key, key_action, key_env = jax.random.split(runner.key, 3)
        carry, logits, value = network.apply(runner.train_state.params, runner.carry, runner.obs[None], runner.done[None])
        action = jax.random.categorical(key_action, logits[0])
        step = env.step(key_env, runner.env_state, action, runner.env_params)
        obs, env_state, reward, terminated, truncated, info = step
        done = terminated | truncated
        transition = Transition(
            runner.obs, runner.done, action, log_prob_of(logits[0], action), value[0], reward, info["returned_episode"]
        )
        return runner._replace(env_state=env_state, obs=obs, done=done, carry=carry, key=key), transition

    def ppo_loss(params, carry, batch: Transition, advantages, returns):
        _, logits, value = network.apply(params, carry, batch.obs, batch.done)
        log_ratio = log_prob_of(logits, batch.action) - batch.log_prob
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
        entropy = entropy_of(logits).mean()
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
        runner, batch = jax.lax.scan(env_step, runner, None, num_steps)
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
    """`evaluate(params, memory_length, key) -> returns[num_episodes]`: `num_episodes` envs each play one
    episode from a zero memory (as in training, where every rollout starts an episode) for `num_steps`
    >= L + 1 steps; later episodes are not counted. The return is +1 (right answer) or -1."""
    env, env_params, network, new_carry = build(args, num_episodes)

    def evaluate(params, memory_length, key):
        env_params_l = env_params.replace(memory_length=memory_length)
        key_reset, key_run = jax.random.split(key)
        obs, env_state = env.reset(key_reset, env_params_l)

        def step(state, key):
            carry, obs, done, env_state, active, returns = state
            key_action, key_env = jax.random.split(key)
            carry, logits, _ = network.apply(params, carry, obs[None], done[None])
            action = jnp.argmax(logits[0], -1) if greedy else jax.random.categorical(key_action, logits[0])
            obs, env_state, reward, terminated, truncated, _ = env.step(key_env, env_state, action, env_params_l)
            done = terminated | truncated
            return (carry, obs, done, env_state, active & ~done, returns + active * reward), None

        ones = jnp.ones(num_episodes, bool)
        init = (new_carry(num_episodes), obs, ones, env_state, ones, jnp.zeros(num_episodes))
        return jax.lax.scan(step, init, jax.random.split(key_run, num_steps))[0][-1]

    return evaluate


# ---------------------------------------------------------------------------------------------
# Input checks, --resume
# ---------------------------------------------------------------------------------------------
def check_args(args: Args) -> str | None:
    """Return a one-line message saying what to change, or None if the settings can run."""
    if not args.memory_lengths:
        return "--memory-lengths is empty: give at least one length, e.g. --memory-lengths 1 2 4 8"
    if min(args.memory_lengths) < 1:
        return f"--memory-lengths must all be >= 1 (an episode lasts L + 1 steps), got {min(args.memory_lengths)}"
    for length in args.memory_lengths:
        try:  # the env's own check of its params, without compiling anything
            envs_popjax.make("MemoryChain", memory_length=length)
        except (ValueError, TypeError) as error:
            return f"--memory-lengths {length}: {error}"
    positive = ("num_seeds", "num_bits", "total_timesteps", "num_envs", "num_minibatches", "update_epochs",
                "hidden_size", "d_model", "ssm_size", "n_layers", "s5_blocks", "learning_rate", "dt_min", "dt_max",
                "clip_coef", "max_grad_norm", "keep_checkpoints", "eval_episodes")  # fmt: skip
    for name in positive + ("num_steps", "updates_per_chunk", "checkpoint_every", "vf_coef", "ent_coef"):
        value = getattr(args, name)
        if not value >= 0 or (value == 0 and name in positive):
            return f"--{name.replace('_', '-')} must be {'positive' if name in positive else '>= 0'}, got {value}"
    for name in ("gamma", "gae_lambda", "solve_threshold"):
        if not 0 <= getattr(args, name) <= 1:
            return f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}"
    if not 0 < args.success_window <= 1:
        return f"--success-window must be in (0, 1], got {args.success_window}"
    if args.num_envs % args.num_minibatches:
        return (f"--num-envs {args.num_envs} must be divisible by --num-minibatches {args.num_minibatches} "
                "(minibatches split the envs into whole sequences)")  # fmt: skip
    longest, length = max((rollout_length(args, length), length) for length in args.memory_lengths)
    if args.total_timesteps < args.num_envs * longest:
        return (f"--total-timesteps {args.total_timesteps} gives zero updates at L = {length}: one update takes "
                f"--num-envs x rollout steps = {args.num_envs} x {longest} = {args.num_envs * longest} steps")  # fmt: skip
    if error := S5Config.from_args(args).error():
        return error
    if args.dt_min > args.dt_max:
        return f"--dt-min {args.dt_min} must not exceed --dt-max {args.dt_max}"
    if args.resume and args.eval_model:
        return "--resume and --eval-model exclude each other"
    for flag, path in (("--resume", args.resume), ("--eval-model", args.eval_model)):
        if path and not (flag == "--eval-model" and os.path.isfile(path)) and latest_checkpoint(path) is None:
            return f"{flag}: {path} is neither a .cleanrl_model file nor a run folder with checkpoints/"
    if args.track and importlib.util.find_spec("wandb") is None:
        return "--track logs to Weights & Biases, which is not installed: pip install wandb"
    return None


# may differ from the checkpoint's on --resume: they do not change the sweep's math
RESUME_MAY_CHANGE = ("log_dir", "updates_per_chunk", "checkpoint_every", "keep_checkpoints", "compile_cache",
                     "track", "wandb_project_name", "wandb_entity", "save_model")  # fmt: skip
NOT_COMPARED = ("resume", "eval_model", "eval_episodes", "eval_greedy")


def resume_error(args: Args, saved: Args) -> str | None:
    """A flag given with --resume that would change the sweep; the budget too: finished groups keep theirs."""
    for name, new in asdict(args).items():
        if name not in RESUME_MAY_CHANGE + NOT_COMPARED and new != (old := getattr(saved, name)):
            allowed = ", ".join("--" + n.replace("_", "-") for n in RESUME_MAY_CHANGE)
            return (f"--resume: --{name.replace('_', '-')} {new} differs from the checkpoint's {old}; "
                    f"it would change the run (allowed to change: {allowed})")  # fmt: skip
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
        return ocp.CheckpointManager(path, options=options)


def latest_checkpoint(path: str) -> int | None:
    return (manager := checkpoint_manager(path)) and manager.latest_step()


def read_checkpoint(path: str, state=None) -> dict:
    """The latest checkpoint's items: `args` and `logs` (JSON), `models`, and `state` if its abstract
    structure (with shardings) is given, restored bit for bit into that structure."""
    items = dict(args=ocp.args.JsonRestore(), logs=ocp.args.JsonRestore(), models=ocp.args.StandardRestore())
    if state is not None:
        items["state"] = ocp.args.StandardRestore(state)
    manager = checkpoint_manager(path)
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(**items))
    manager.close()
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


def pair_name(pair) -> str:
    return f"len_{pair[0]}_seed_{pair[1]}"


def load_model(path: str) -> tuple[Args, dict]:
    """(Args, {"len_{L}_seed_{S}": params}) from a `--save-model` file or from a run folder's (or
    checkpoints folder's) latest checkpoint, which holds every (length, seed) trained so far: the
    finished groups' final parameters and the current group's parameters at the checkpoint."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            saved = flax.serialization.msgpack_restore(f.read())
        return args_from_dict(saved["0"]), saved["1"]
    restored = read_checkpoint(path)
    stacked = jax.tree.map(np.asarray, restored["models"])
    models = {name: jax.tree.map(lambda x: x[i], stacked) for i, name in enumerate(restored["logs"]["model_pairs"])}
    return args_from_dict(restored["args"]), models


def save_sweep(args: Args, sweep: dict, force: bool = False):
    """Checkpoint the sweep when --checkpoint-every updates of the sweep have passed since the last one
    (or when `force`d and anything is new). Step: updates done over all groups so far. Items: the Args;
    the logs (every pair's history, the clock, updates done per group); `models`: the parameters of
    every pair trained so far, stacked (finished groups first, in `logs["model_pairs"]` order); `state`:
    the current group's complete training state (absent between groups)."""
    step, manager = sum(sweep["logs"]["updates_done"].values()), sweep["manager"]
    due = force or step // args.checkpoint_every > sweep["saved_step"] // args.checkpoint_every if manager else False
    if not due or step == sweep["saved_step"]:
        return
    names, params = trained_models(sweep)
    history = {pair_name(pair): rows for pair, rows in sweep["logs"]["history"].items() if rows}
    logs = {**sweep["logs"], "history": history, "model_pairs": names}
    items = dict(args=ocp.args.JsonSave(asdict(args)), logs=ocp.args.JsonSave(strict_json(logs)),
                 models=ocp.args.StandardSave(params))  # fmt: skip
    if sweep["current"] is not None:
        items["state"] = ocp.args.StandardSave(sweep["current"][1])
    manager.save(step, args=ocp.args.Composite(**items))
    sweep["saved_step"] = step


def trained_models(sweep: dict) -> tuple[list, dict]:
    """The names of every (length, seed) trained so far (finished groups first) and their parameters, stacked."""
    names, params = list(sweep["finished_names"]), list(sweep["finished_params"])
    if sweep["current"] is not None:
        names += [pair_name(pair) for pair in sweep["current"][0]]
        params.append(jax.device_get(sweep["current"][1].train_state.params))
    return names, jax.tree.map(lambda *x: np.concatenate(x), *params) if params else {}


# ---------------------------------------------------------------------------------------------
# Running: (length, seed) groups, logging, summary table / JSON / plot, evaluation
# ---------------------------------------------------------------------------------------------
def default_chunk(num_updates: int) -> int:
    """About 1/25 of the updates, preferring a divisor of num_updates (one compile instead of two)."""
    target = max(1, num_updates // 25)
    return next((d for d in range(target, 2 * target + 1) if num_updates % d == 0), target)


def run_group(args: Args, num_steps: int, pairs: list, run_dir: str, sweep: dict):
    """Train all (length, seed) `pairs` sharing rollouts of `num_steps` as one vmapped program, sharded
    over the devices, from scratch or from the checkpoint's state if the group was under way. Appends
    (global_step, episodes, successes) per update to the pair's history; checkpoints between chunks."""
    init, update_chunk, num_updates = make_train(args, num_steps)
    batch_size, chunk = args.num_envs * num_steps, args.updates_per_chunk or default_chunk(num_updates)
    devices = jax.devices()[: math.gcd(len(pairs), jax.device_count())]
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("pair",)), jax.sharding.PartitionSpec("pair"))
    keys = jax.device_put(jax.vmap(jax.random.key)(jnp.array([s for _, s in pairs])), sharding)
    lengths = jax.device_put(jnp.array([length for length, _ in pairs], jnp.int32), sharding)
    history, clock, updates_done = sweep["logs"]["history"], sweep["logs"]["clock"], sweep["logs"]["updates_done"]
    done_updates = updates_done.get(str(num_steps), 0)
    print(f"rollouts of {num_steps} steps for lengths {sorted({L for L, _ in pairs})}: {len(pairs)} (length, seed) pairs "
          f"on {len(devices)} {jax.default_backend()} device(s), {num_updates} updates of {batch_size} steps"
          + (f", resumed at update {done_updates}" if done_updates else ""))  # fmt: skip
    start = time.time()
    # Every leaf carries the leading pair axis, sharded. Parameters are initialised outside the
    # training jit, and the initialiser and the update chunks (at most two lengths) are compiled at
    # the same time: XLA compiles a program on one thread, and the machine has more.
    init_lowered = jax.jit(jax.vmap(init), out_shardings=sharding).lower(keys, lengths)
    chunk_lengths = sorted({min(chunk, num_updates - done_updates), (num_updates - done_updates) % chunk} - {0})
    lowered = [init_lowered] + [
        jax.jit(jax.vmap(partial(update_chunk, num_updates=n)), in_shardings=sharding, out_shardings=sharding)
        .lower(init_lowered.out_info) for n in chunk_lengths
    ]  # fmt: skip
    with ThreadPoolExecutor(len(lowered)) as pool:
        init_compiled, *chunk_compiled = pool.map(lambda program: program.compile(), lowered)
    compiled = dict(zip(chunk_lengths, chunk_compiled))
    if done_updates:  # the group was under way at the checkpoint: its state, bit for bit
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                init_lowered.out_info)
        runner = read_checkpoint(run_dir, state=abstract)["state"]
    else:
        runner = jax.block_until_ready(init_compiled(keys, lengths))
    clock["compile_seconds"] += time.time() - start
    print(f"initialised and compiled in {time.time() - start:.1f} s")
    # TensorBoard continues after the last logged step; anything a killed process logged later is purged
    writers = {pair: SummaryWriter(os.path.join(run_dir, pair_name(pair)), purge_step=history[pair][-1][0] + 1
                                   if history[pair] else 0) for pair in pairs}  # fmt: skip
    table = "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    for (length, _), writer in writers.items():
        if not done_updates:
            writer.add_text("hyperparameters", f"{table}\n|memory_length|{length}|\n|rollout_steps|{num_steps}|")
    sweep["current"], run_s, resumed_at = (pairs, runner), 0.0, done_updates
    try:
        while done_updates < num_updates:
            n = min(chunk, num_updates - done_updates)
            t = time.time()
            new_runner, metrics = compiled[n](runner)
            metrics = jax.tree.map(np.asarray, jax.block_until_ready(metrics))  # [pairs, n]
            run_s += time.time() - t
            clock["run_seconds"] += time.time() - t
            bad = np.argwhere(~metrics.pop("finite").T)  # (update in chunk, pair) of non-finite updates
            rows = {pair: [] for pair in pairs}
            for u in range(bad[0, 0] if len(bad) else n):  # only the updates before a non-finite one
                step = (done_updates + u + 1) * batch_size
                for i, pair in enumerate(pairs):
                    m = {k: float(v[i, u]) for k, v in metrics.items()}
                    episodes, successes = int(m.pop("episodes")), int(m.pop("successes"))
                    rows[pair].append((step, episodes, successes))
                    if episodes:  # episodes completed in this rollout; the return is 2 * success_rate - 1
                        m.update(success_rate=successes / episodes, episodic_return=(2 * successes - episodes) / episodes)
                    for name, value in m.items():
                        section = "charts" if name in ("success_rate", "episodic_return", "learning_rate") else "losses"
                        writers[pair].add_scalar(f"{section}/{name}", value, step)
            for pair in pairs:  # history, state and update count change together (a checkpoint saves them)
                history[pair] += rows[pair]
            if len(bad):
                (length, seed), saved = pairs[bad[0, 1]], sweep["saved_step"]
                where = f"update {saved} in {run_dir}/checkpoints" if saved else "none"
                raise FloatingPointError(f"non-finite loss/parameters at update {done_updates + bad[0, 0] + 1} "
                                         f"(memory length {length}, seed {seed}); last good checkpoint: {where}")  # fmt: skip
            done_updates += n
            clock["env_steps"] += n * batch_size * len(pairs)
            sps = n * batch_size / (time.time() - t)
            for pair in pairs:
                writers[pair].add_scalar("charts/SPS", sps, done_updates * batch_size)
                writers[pair].flush()
            runner, sweep["current"], updates_done[str(num_steps)] = new_runner, (pairs, new_runner), done_updates
            save_sweep(args, sweep)
            episodes, successes = metrics["episodes"][:, -1].sum(), metrics["successes"][:, -1].sum()
            eta = run_s / (done_updates - resumed_at) * (num_updates - done_updates)
            print(f"step {done_updates * batch_size:>10,}/{num_updates * batch_size:,} per pair | SPS {sps * len(pairs):,.0f} "
                  f"(all pairs) | success {successes / max(episodes, 1):.3f} (all pairs) | ETA {eta:.0f} s", flush=True)  # fmt: skip
    finally:
        for writer in writers.values():
            writer.close()
    sweep["finished_names"] += [pair_name(pair) for pair in pairs]
    sweep["finished_params"].append(jax.device_get(runner.train_state.params))
    sweep["current"] = None


def summarize(args: Args, history: dict, clock: dict) -> dict:
    """Final success rate and verdicts per (length, seed), then per length over seeds."""
    per_run, per_length = {}, {}
    for (length, seed), rows in history.items():
        if not rows:
            continue
        rows = np.array(rows)  # [updates, (global_step, episodes, successes)]
        recent = rows[-math.ceil(args.success_window * len(rows)) :]
        final = float(recent[:, 2].sum() / recent[:, 1].sum()) if recent[:, 1].sum() else None
        overall = float(rows[:, 2].sum() / rows[:, 1].sum()) if rows[:, 1].sum() else None
        regret_ratio = None if overall is None else (1 - overall) / 0.5  # bsuite: error rate / random's
        per_run[f"len_{length}_seed_{seed}"] = run = {
            "memory_length": length, "seed": seed, "updates": len(rows), "global_step": int(rows[-1, 0]),
            "episodes": int(rows[:, 1].sum()), "final_episodes": int(recent[:, 1].sum()), "final_success_rate": final,
            "training_success_rate": overall, "bsuite_regret_ratio": regret_ratio,
            "bsuite_learned": bool(rows[:, 1].sum() >= MIN_VERDICT_EPISODES and regret_ratio < BSUITE_REGRET_THRESHOLD),
            "solved": bool(recent[:, 1].sum() >= MIN_VERDICT_EPISODES and final >= args.solve_threshold),
        }  # fmt: skip
        per_length.setdefault(length, []).append(run)
    lengths = {}
    for length, runs in sorted(per_length.items()):
        rates = [r["final_success_rate"] for r in runs if r["final_success_rate"] is not None]
        lengths[str(length)] = {
            "rollout_steps": rollout_length(args, length), "seeds": len(runs), "final_success_rates": rates,
            "final_success_rate": {"mean": float(np.mean(rates)), "std": float(np.std(rates))} if rates else None,
            "solved_seeds": sum(r["solved"] for r in runs), "bsuite_learned_seeds": sum(r["bsuite_learned"] for r in runs),
        }  # fmt: skip
    all_solved = [int(k) for k, v in lengths.items() if v["solved_seeds"] == v["seeds"] == args.num_seeds]
    return {
        "solve_rule": f"final success rate (completed episodes of the last {args.success_window:.0%} of updates, "
        f"at least {MIN_VERDICT_EPISODES}) >= {args.solve_threshold}",
        "bsuite_rule": f"bsuite's score: (1 - success rate over all training episodes) / 0.5 < {BSUITE_REGRET_THRESHOLD}",
        "largest_length_solved_by_all_seeds": max(all_solved, default=None),
        "compile_seconds": clock["compile_seconds"], "run_seconds": clock["run_seconds"],
        "sps": clock["env_steps"] / clock["run_seconds"] if clock["run_seconds"] > 0 else None,
        "per_length": lengths, "per_run": per_run,
    }  # fmt: skip


def summary_table(args: Args, summary: dict) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = ["| memory length | rollout | final success per seed | mean +- std | solved | bsuite learned |", "|-:|-:|-|-|-|-|"]
    for length, row in summary["per_length"].items():
        rate = row["final_success_rate"] or {"mean": None, "std": None}
        lines.append(f"| {length} | {row['rollout_steps']} | {' '.join(map(fmt, row['final_success_rates']))} | "
                     f"{fmt(rate['mean'])} +- {fmt(rate['std'])} | {row['solved_seeds']}/{row['seeds']} | "
                     f"{row['bsuite_learned_seeds']}/{row['seeds']} |")  # fmt: skip
    return "\n".join(lines + ["", f"solved: {summary['solve_rule']}", f"bsuite learned: {summary['bsuite_rule']}",
                              f"largest memory length solved by all {args.num_seeds} seed(s): "
                              f"{summary['largest_length_solved_by_all_seeds']}"])  # fmt: skip


def plot_success(args: Args, summary: dict, path: str):
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [(int(L), rate) for L, row in summary["per_length"].items() for rate in row["final_success_rates"]]
    ax.scatter(*zip(*rows) if rows else ([], []), s=12, alpha=0.4, label="seeds")
    means = [(int(L), row["final_success_rate"]["mean"]) for L, row in summary["per_length"].items() if row["final_success_rates"]]
    ax.plot(*zip(*means) if means else ([], []), "o-", color="C1", label=f"mean over {args.num_seeds} seed(s)")
    ax.axhline(args.solve_threshold, color="C2", ls="--", lw=1, label=f"solved (>= {args.solve_threshold})")
    ax.axhline(0.5, color="grey", ls=":", lw=1, label="random")
    ax.set(xscale="log" if rows else "linear", ylim=(0, 1.02), xlabel="memory length L", ylabel="final success rate",
           title=f"PPO + S5 on bsuite MemoryChain, {args.total_timesteps:,} steps per run")  # fmt: skip
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def enable_compile_cache(folder: str):
    """JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR, if set, wins): a rerun skips compiling."""
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser(folder)
    if folder:
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def main(args: Args) -> dict:
    enable_compile_cache(args.compile_cache)
    if args.s5_scan == "auto":  # resolved here so that the logged hyperparameters say which ran
        args.s5_scan = "sequential" if jax.default_backend() == "cpu" else "parallel"
    lengths, seeds = sorted(set(args.memory_lengths)), [args.seed + i for i in range(args.num_seeds)]
    groups = {}  # rollout length -> the memory lengths trained together in one vmapped program
    for length in lengths:
        groups.setdefault(rollout_length(args, length), []).append(length)
    cut = [length for length in lengths if rollout_length(args, length) % (length + 1)]
    if cut:
        print(f"note: --num-steps {args.num_steps} is not a multiple of L + 1 for lengths {cut}: their episodes are "
              "cut between training sequences, where no gradient flows from the answer back to the context",
              file=sys.stderr)  # fmt: skip
    pairs_of = {num_steps: [(L, s) for L in group for s in seeds] for num_steps, group in groups.items()}
    logs = {"history": {}, "clock": {"compile_seconds": 0.0, "run_seconds": 0.0, "env_steps": 0}, "updates_done": {}}
    sweep = {"finished_names": [], "finished_params": [], "current": None, "saved_step": 0}

    def is_finished(num_steps):  # all updates of the group with this rollout are done
        return logs["updates_done"].get(str(num_steps)) == args.total_timesteps // (args.num_envs * num_steps)

    if args.resume:  # finished groups' results and parameters; the current group's state is read in run_group
        run_dir, restored = args.resume.rstrip("/"), read_checkpoint(args.resume)
        logs, sweep["saved_step"] = restored["logs"], sum(restored["logs"]["updates_done"].values())
        finished = [pair_name(pair) for num_steps, pairs in pairs_of.items() if is_finished(num_steps) for pair in pairs]
        sweep["finished_names"] = logs["model_pairs"][: len(finished)]
        sweep["finished_params"] = [jax.tree.map(lambda x: np.asarray(x)[: len(finished)], restored["models"])]
    else:
        run_dir = os.path.join(args.log_dir, f"MemoryChain__{args.exp_name}__{args.seed}__{int(time.time())}")
    run_name, clock = os.path.basename(run_dir), logs["clock"]
    logs["history"] = history = {pair: [tuple(row) for row in logs["history"].get(pair_name(pair), [])]
                                 for pairs in pairs_of.values() for pair in pairs}  # fmt: skip
    sweep["logs"] = logs
    sweep["manager"] = checkpoint_manager(run_dir, args.keep_checkpoints) if args.checkpoint_every else None
    if args.track:  # CleanRL's: imported only when asked; TensorBoard's scalars are synced
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=run_name, save_code=True)  # fmt: skip
    print(f"{run_name}: {len(lengths)} memory length(s) x {args.num_seeds} seed(s), {len(groups)} rollout length(s)")
    failure = None
    try:
        for num_steps, pairs in pairs_of.items():
            if not is_finished(num_steps):
                run_group(args, num_steps, pairs, run_dir, sweep)
        save_sweep(args, sweep, force=True)
    except KeyboardInterrupt:
        print("\ninterrupted; writing what was logged and a checkpoint", file=sys.stderr)
        save_sweep(args, sweep, force=True)
    except FloatingPointError as error:  # the last good checkpoint stays the latest
        failure = str(error)
    finally:  # a crash or Ctrl-C keeps everything logged so far, and writes the summary
        summary = summarize(args, history, clock)
        text = summary_table(args, summary)
        print(f"{text}\ncompile {clock['compile_seconds']:.1f} s, run {clock['run_seconds']:.1f} s, {summary['sps'] or 0:,.0f} steps/s")
        with open(os.path.join(run_dir, "summary.md"), "w") as f:
            f.write(text + "\n")
        write_json(os.path.join(run_dir, "summary.json"), {"args": asdict(args), **summary})
        plot_success(args, summary, os.path.join(run_dir, "success_vs_length.png"))
        if args.save_model:  # {"len_{L}_seed_{S}": params} for every (length, seed) trained
            names, params = trained_models(sweep)
            models = {name: jax.tree.map(lambda x: x[i], params) for i, name in enumerate(names)}
            with open(os.path.join(run_dir, f"{args.exp_name}.cleanrl_model"), "wb") as f:
                f.write(flax.serialization.to_bytes([asdict(args), models]))
        if sweep["manager"]:
            sweep["manager"].wait_until_finished()
            sweep["manager"].close()
        if args.track:
            wandb.finish()
        print(f"results in {run_dir}")
    if failure:
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(1)
    return summary


def evaluate_model(args: Args) -> dict:
    """--eval-model: every saved (length, seed) plays --eval-episodes episodes; eval.json beside the model."""
    saved, models = load_model(args.eval_model)
    enable_compile_cache(args.compile_cache)
    if saved.s5_scan == "auto":
        saved.s5_scan = "sequential" if jax.default_backend() == "cpu" else "parallel"
    pairs = sorted(tuple(int(x) for x in name.split("_")[1::2]) for name in models)  # "len_{L}_seed_{S}"
    params = jax.tree.map(lambda *x: jnp.stack(x), *(models[pair_name(pair)] for pair in pairs))
    lengths, seeds = jnp.array([L for L, _ in pairs]), jnp.array([s for _, s in pairs])
    evaluate = make_evaluate(saved, args.eval_episodes, int(lengths.max()) + 1, args.eval_greedy)
    keys = jax.vmap(lambda s, L: jax.random.fold_in(jax.random.key(s), L))(seeds, lengths)
    returns = np.asarray(jax.jit(jax.vmap(evaluate))(params, lengths, keys))  # [pairs, episodes], each +-1
    per_run = {pair_name(p): {"memory_length": p[0], "seed": p[1], "mean": float(r.mean()), "std": float(r.std()),
                              "success_rate": float((r > 0).mean())} for p, r in zip(pairs, returns)}  # fmt: skip
    per_length = {}
    for (length, _), r in zip(pairs, returns):
        per_length.setdefault(str(length), []).append(float(r.mean()))
    result = {"model": args.eval_model, "episodes_per_seed": args.eval_episodes, "greedy": args.eval_greedy,
              "per_run": per_run, "per_length": {k: {"mean": float(np.mean(v)), "std": float(np.std(v)),
                                                     "seeds": len(v)} for k, v in per_length.items()},
              "overall": {"mean": float(returns.mean()), "std": float(returns.std())}}  # fmt: skip
    for name, run in per_run.items():
        print(f"{name}: return {run['mean']:+.3f} +- {run['std']:.3f}, success {run['success_rate']:.3f}")
    print(f"overall over {len(pairs)} (length, seed) pair(s) x {args.eval_episodes} episodes: return "
          f"{result['overall']['mean']:+.3f} +- {result['overall']['std']:.3f}")  # fmt: skip
    path = os.path.abspath(args.eval_model)
    folder = os.path.dirname(path) if os.path.isfile(path) or os.path.basename(path) == "checkpoints" else path
    write_json(os.path.join(folder, "eval.json"), result)
    print(f"written to {os.path.join(folder, 'eval.json')}")
    return result


def parse_args() -> Args:
    """tyro's CLI; with --resume, the defaults come from the checkpoint and a changed flag that would
    change the run is refused."""
    args = tyro.cli(Args)
    error = check_args(args)
    if not error and args.resume:
        saved = args_from_dict(read_checkpoint(args.resume)["args"])
        args = tyro.cli(Args, default=saved)
        error = check_args(args) or resume_error(args, saved)
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return args


if __name__ == "__main__":
    # Python leaves SIGINT ignored when started from a background shell; Ctrl-C must stop cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM too: checkpoint, summary, exit
    args = parse_args()
    evaluate_model(args) if args.eval_model else main(args)
