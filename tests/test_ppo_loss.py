"""PPO's arithmetic in all four scripts, against references written here from the definitions.

- `ppo_loss` on policy outputs chosen by the test (a stand-in network returns them) against a float64 numpy
  restatement of the PPO paper's clipped surrogate (Schulman et al. 2017, eq. 7) with CleanRL's clipped value loss,
  entropy bonus, per-minibatch advantage normalisation, both KL estimates and clipfrac; values and gradients.
- Each script's own `compute_gae` against a Python loop.
- A real update of each script: its first minibatch of the first epoch replays the rollout exactly (ratio 1, the
  rollout's values), which only holds if the update starts from the carry and parameters the rollout started from.
"""

import math
from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppo_lstm_popgym
import ppo_s5_memory
import ppo_s5_metarl
import ppo_s5_popgym

pytestmark = pytest.mark.timeout(600)

SCRIPTS = {m.__name__: m for m in (ppo_s5_popgym, ppo_lstm_popgym, ppo_s5_memory, ppo_s5_metarl)}
# (script, Gaussian policy?): the POPGym scripts take either policy, MemoryChain's is discrete, meta-RL's Gaussian
POLICIES = [("ppo_s5_popgym", False), ("ppo_s5_popgym", True), ("ppo_lstm_popgym", False),
            ("ppo_lstm_popgym", True), ("ppo_s5_memory", False), ("ppo_s5_metarl", True)]  # fmt: skip
POLICY_IDS = [f"{script}-{'gauss' if continuous else 'discrete'}" for script, continuous in POLICIES]
CLIP_COEF = 0.2


# References in float64 numpy ------------------------------------------------------------------------------------------
def log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def reference_log_prob_and_entropy(policy, action, continuous):
    """Categorical over logits, or a diagonal Gaussian (mean, log_std) with independent components."""
    if continuous:
        mean, log_std = policy
        var = np.exp(2 * log_std)
        log_prob = (-((action - mean) ** 2) / (2 * var) - 0.5 * np.log(2 * np.pi * var)).sum(-1)
        return log_prob, (0.5 * np.log(2 * np.pi * np.e * var)).sum(-1)
    log_p = log_softmax(policy)
    log_prob = np.take_along_axis(log_p, action[..., None], -1)[..., 0]
    return log_prob, -(np.exp(log_p) * log_p).sum(-1)


def reference_ppo_loss(policy, value, action, old_log_prob, old_value, advantages, returns, continuous, args):
    """PPO's loss to minimise: -L^CLIP + vf_coef L^VF - ent_coef S, as CleanRL computes it per minibatch.

    L^CLIP = mean(min(r A, clip(r, 1 - eps, 1 + eps) A)) with r = pi / pi_old (the paper's eq. 7); the advantages
    normalised per minibatch by their mean and population std (np.std, as jnp.std in CleanRL's JAX PPO and in the
    paper's code; CleanRL's torch std is the sample std); L^VF = 0.5 mean((V - R)^2), or with clipping 0.5
    mean(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)); KL estimates k1 = mean(-log r) and
    k3 = mean(r - 1 - log r) (joschu.net/blog/kl-approx.html); clipfrac = share of |r - 1| > eps.
    """
    log_prob, entropy = reference_log_prob_and_entropy(policy, action, continuous)
    log_ratio = log_prob - old_log_prob
    ratio = np.exp(log_ratio)
    if args.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    eps = args.clip_coef
    surrogate = np.minimum(ratio * advantages, np.clip(ratio, 1 - eps, 1 + eps) * advantages)
    policy_loss = -surrogate.mean()
    squared_error = (value - returns) ** 2
    if args.clip_vloss:
        clipped_value = old_value + np.clip(value - old_value, -eps, eps)
        squared_error = np.maximum(squared_error, (clipped_value - returns) ** 2)
    value_loss = 0.5 * squared_error.mean()
    loss = policy_loss + args.vf_coef * value_loss - args.ent_coef * entropy.mean()
    stats = dict(policy_loss=policy_loss, value_loss=value_loss, entropy=entropy.mean(),
                 old_approx_kl=(-log_ratio).mean(), approx_kl=(ratio - 1 - log_ratio).mean(),
                 clipfrac=(np.abs(ratio - 1) > eps).mean())  # fmt: skip
    return loss, stats


def numerical_gradient(f, params, h=1e-6):
    """Central differences of the scalar f over every element of every array in the pytree `params`."""
    leaves, treedef = jax.tree.flatten(params)
    grads = []
    for i, leaf in enumerate(leaves):
        grad = np.zeros_like(leaf)
        for index in np.ndindex(leaf.shape):
            shifted = []
            for sign in (1, -1):
                moved = [x.copy() for x in leaves]
                moved[i][index] += sign * h
                shifted.append(f(jax.tree.unflatten(treedef, moved)))
            grad[index] = (shifted[0] - shifted[1]) / (2 * h)
        grads.append(grad)
    return jax.tree.unflatten(treedef, grads)


# ppo_loss against the reference ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GivenOutputs:
    """Stands in for a script's actor-critic: its `params` are the policy and values it returns, whatever the inputs
    (so the test controls every ratio and value the loss sees)."""

    continuous: bool  # read by the POPGym scripts' ppo_loss

    def apply(self, params, carry, obs, resets):
        return carry, params["policy"], params["value"]


def loss_inputs(continuous, seed=0, T=6, B=5, num_actions=3):
    """Policy outputs, values and a minibatch whose ratios straddle both clip bounds and whose old values are off by
    more than the clip coefficient on some steps: every branch of the loss is taken."""
    rng = np.random.default_rng(seed)
    if continuous:
        mean, log_std = rng.normal(size=(T, B, 2)), rng.normal(0, 0.3, (T, B, 2))
        policy, action = (mean, log_std), mean + np.exp(log_std) * rng.normal(size=(T, B, 2))
    else:
        policy, action = rng.normal(size=(T, B, num_actions)), rng.integers(0, num_actions, (T, B))
    value = rng.normal(size=(T, B))
    new_log_prob, _ = reference_log_prob_and_entropy(policy, action, continuous)
    ratio = rng.uniform(0.6, 1.45, (T, B))  # the clip range is [0.8, 1.2]
    batch = dict(action=action, log_prob=new_log_prob - np.log(ratio), value=value + rng.uniform(-0.5, 0.5, (T, B)))
    # advantages far from mean 0 / std 1, so that normalising them changes the loss
    advantages, returns = rng.normal(0.7, 2.0, (T, B)), rng.normal(size=(T, B))
    return {"policy": policy, "value": value}, batch, advantages, returns


def transition(module, batch):
    """The script's Transition with the fields ppo_loss reads (obs and done are ignored by the stand-in)."""
    T, B = batch["value"].shape
    fields = {name: np.zeros((T, B)) for name in module.Transition._fields}
    return module.Transition(**{**fields, "done": np.zeros((T, B), bool), **batch})


@pytest.mark.parametrize("clip_vloss", [True, False], ids=["clip_vloss", "plain_vloss"])
@pytest.mark.parametrize("norm_adv", [True, False], ids=["norm_adv", "raw_adv"])
@pytest.mark.parametrize("script, continuous", POLICIES, ids=POLICY_IDS)
def test_ppo_loss_equals_reference_float64(script, continuous, norm_adv, clip_vloss):
    module = SCRIPTS[script]
    args = replace(module.Args(), norm_adv=norm_adv, clip_vloss=clip_vloss, clip_coef=CLIP_COEF, ent_coef=0.03,
                   vf_coef=0.7)  # fmt: skip
    params, batch, advantages, returns = loss_inputs(continuous)
    network = GivenOutputs(continuous)

    def reference(params, args=args):
        return reference_ppo_loss(params["policy"], params["value"], batch["action"], batch["log_prob"],
                                  batch["value"], advantages, returns, continuous, args)  # fmt: skip

    with jax.enable_x64(True):
        as_jax = partial(jax.tree.map, jnp.asarray)
        loss_and_grad = jax.value_and_grad(module.ppo_loss, has_aux=True)
        (loss, stats), grads = loss_and_grad(as_jax(params), network, args, (), transition(module, as_jax(batch)),
                                             jnp.asarray(advantages), jnp.asarray(returns))  # fmt: skip
    expected_loss, expected_stats = reference(params)
    assert loss.dtype == jnp.float64
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12, atol=1e-12)
    assert set(stats) == set(expected_stats)
    for name, value in expected_stats.items():
        # clipfrac, a mean of booleans, comes in float32 even under x64: its round-off is far below one step of 1/N
        rtol = 1e-6 if name == "clipfrac" else 1e-12
        np.testing.assert_allclose(stats[name], value, rtol=rtol, atol=1e-12, err_msg=name)
    # the gradient that training follows: against central differences of the reference (error ~h^2 + 1e-16 / h)
    expected_grads = numerical_gradient(lambda p: reference(p)[0], params)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    # every branch was taken: ratios beyond both clip bounds, and clipping changed the losses
    ratio = np.exp(reference_log_prob_and_entropy(params["policy"], batch["action"], continuous)[0] - batch["log_prob"])
    assert (ratio < 1 - CLIP_COEF).any() and (ratio > 1 + CLIP_COEF).any()
    _, unclipped = reference(params, replace(args, clip_coef=np.inf, clip_vloss=False))
    assert abs(unclipped["policy_loss"] - expected_stats["policy_loss"]) > 1e-2
    if clip_vloss:
        assert abs(unclipped["value_loss"] - expected_stats["value_loss"]) > 1e-2


# compute_gae against a Python loop ------------------------------------------------------------------------------------
def python_loop_gae(rewards, values, dones, last_value, last_done, gamma, lam):
    """GAE (Schulman et al. 2016) one env at a time; dones[t] = obs t starts an episode, so step t bootstraps from
    t + 1 unless the next flag is set (CleanRL's nextnonterminal)."""
    T = len(rewards)
    advantages, last_gae = np.zeros(T), 0.0
    for t in reversed(range(T)):
        next_non_terminal = 1.0 - (last_done if t == T - 1 else dones[t + 1])
        next_value = last_value if t == T - 1 else values[t + 1]
        delta = rewards[t] + gamma * next_value * next_non_terminal - values[t]
        advantages[t] = last_gae = delta + gamma * lam * next_non_terminal * last_gae
    return advantages


@pytest.mark.parametrize("lam", [1.0, 0.9])
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_compute_gae_equals_python_loop(script, lam):
    rng = np.random.default_rng(1)
    T, E, gamma = 24, 6, 0.97
    rewards, values = rng.normal(size=(T, E)), rng.normal(size=(T, E))
    dones = rng.random((T, E)) < 0.2
    dones[0, 0] = dones[-1, 1] = True  # an episode start at the first and at the last step
    last_value, last_done = rng.normal(size=E), np.arange(E) % 2 == 0
    with jax.enable_x64(True):
        advantages, returns = SCRIPTS[script].compute_gae(*map(jnp.asarray, (rewards, values, dones, last_value,
                                                                              last_done)), gamma, lam)  # fmt: skip
    expected = np.stack([python_loop_gae(rewards[:, e], values[:, e], dones[:, e].astype(float), last_value[e],
                                         float(last_done[e]), gamma, lam) for e in range(E)], 1)  # fmt: skip
    np.testing.assert_allclose(advantages, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(returns, expected + values, rtol=1e-12, atol=1e-12)


# The update replays the rollout -------------------------------------------------------------------------------------
def policy_log_prob(module, network, policy, action):
    if hasattr(network, "continuous"):  # the POPGym scripts' helpers take the policy kind
        return module.policy_log_prob(policy, action, network.continuous)
    return module.policy_log_prob(policy, action)


def record_minibatches(module, monkeypatch) -> list[dict]:
    """Wrap the script's ppo_loss so that every minibatch, in order, appends to the returned list its stats and how
    far the replayed log-probabilities and values are from those the rollout stored."""
    records, ppo_loss = [], module.ppo_loss

    def recording_ppo_loss(params, network, args, carry, batch, advantages, returns):
        loss, stats = ppo_loss(params, network, args, carry, batch, advantages, returns)
        _, policy, value = network.apply(params, carry, batch.obs, batch.done)
        replay = dict(log_ratio=jnp.abs(policy_log_prob(module, network, policy, batch.action) - batch.log_prob).max(),
                      value=jnp.abs(value - batch.value).max(), value_scale=jnp.abs(batch.value).max())  # fmt: skip
        jax.debug.callback(lambda s, r: records.append({**s, **r}), stats, replay, ordered=True)
        return loss, stats

    monkeypatch.setattr(module, "ppo_loss", recording_ppo_loss)
    return records


# (script, the Args that differ from its defaults): rollouts of 16 steps (7 for ppo_s5_memory, whose episodes last 6)
# that start inside episodes after the first update, so the carry a rollout starts from is not cleared at its first step
TINY_S5 = dict(d_model=8, ssm_size=8, n_layers=2)
REPLAY_RUNS = {
    "ppo_s5_popgym-discrete": ("ppo_s5_popgym", dict(env_id="RepeatPreviousEasy", **TINY_S5)),
    "ppo_s5_popgym-gauss": ("ppo_s5_popgym", dict(env_id="PositionOnlyPendulumEasy", **TINY_S5)),
    "ppo_lstm_popgym-discrete": ("ppo_lstm_popgym", dict(env_id="RepeatPreviousEasy", hidden_size=8)),
    "ppo_s5_memory": ("ppo_s5_memory", dict(num_steps=7, hidden_size=8, s5_scan="sequential", **TINY_S5)),  # L = 5
    "ppo_s5_metarl": ("ppo_s5_metarl", dict(episode_length=3, episodes_per_trial=2, obs_size=4, **TINY_S5)),
}
UPDATES, EPOCHS, MINIBATCHES = 3, 2, 2
# The rollout acts one step at a time, the update replays whole sequences: the same float32 operations in the same
# order but for the matrix products (one step's rows or the whole sequence's), which may sum in another order. That
# leaves round-off of a few float32 ulps at most (measured on this CPU: log-ratios exactly 0, values within 4e-7);
# 1e-5 leaves room for other CPUs. Replaying from the carry after the rollout instead moves the log-probabilities of
# the first minibatch by 2e-4 to 1e-2 in these runs, while approx_kl, second order in those, stays near 1e-7: hence
# the direct check of the largest |log ratio|.
REPLAY_TOLERANCE = 1e-5


@pytest.mark.parametrize("run", list(REPLAY_RUNS))
def test_first_minibatch_of_each_update_replays_the_rollout(run, monkeypatch):
    """On the first minibatch of the first epoch nothing has been learned from the rollout yet: the ratio must be 1,
    approx_kl 0, clipfrac 0 and the values the rollout's, which proves the update replays each sequence from the carry
    the rollout started from, with the parameters that acted. Later minibatches moved (so the check has power)."""
    script, changes = REPLAY_RUNS[run]
    module = SCRIPTS[script]
    records = record_minibatches(module, monkeypatch)
    settings = dict(num_envs=4, num_steps=16, num_minibatches=MINIBATCHES, update_epochs=EPOCHS, learning_rate=3e-3)
    args = module.Args(**{**settings, "total_timesteps": UPDATES * 4 * 16, **changes})
    if script == "ppo_s5_memory":  # one memory length per program; the length is an init argument
        init, update_chunk, _ = module.make_train(args, args.num_steps)
        init = partial(init, memory_length=5)
    else:
        init, update_chunk = module.make_train(module.derive_sizes(args))
    runner = jax.jit(init)(jax.random.key(3))
    jax.block_until_ready(jax.jit(partial(update_chunk, num_updates=UPDATES))(runner))
    jax.effects_barrier()
    assert len(records) == UPDATES * EPOCHS * MINIBATCHES
    for update in range(UPDATES):
        first, *later = records[update * EPOCHS * MINIBATCHES : (update + 1) * EPOCHS * MINIBATCHES]
        assert first["log_ratio"] <= REPLAY_TOLERANCE, (update, first)
        assert first["value"] <= REPLAY_TOLERANCE * max(1.0, first["value_scale"]), (update, first)
        # approx_kl ~ log_ratio^2 / 2, plus float32's rounding of exp(log_ratio) - 1 (~1e-7)
        assert first["clipfrac"] == 0 and abs(first["approx_kl"]) <= REPLAY_TOLERANCE**2 + 1e-7, (update, first)
        assert abs(first["old_approx_kl"]) <= REPLAY_TOLERANCE, (update, first)
        assert max(r["log_ratio"] for r in later) > 100 * REPLAY_TOLERANCE, (update, later)  # learning moved it
