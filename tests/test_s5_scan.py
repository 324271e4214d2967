"""The resettable S5 scan against a plain sequential loop, and the S5 memory step by step."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppo_s5_popgym as s5

RESET_PATTERNS = {
    "reset_at_t0": [1, 0, 0, 0, 0, 0, 0, 0],
    "consecutive_resets": [0, 0, 1, 1, 1, 0, 0, 1],
    "no_resets": [0] * 8,
    "all_resets": [1] * 8,
    "last_step_reset": [0, 0, 0, 0, 0, 0, 0, 1],
}


def sequential_loop(lambda_bar, bu, resets, h0):
    """x_t = Bu_t if resets[t] else lambda_bar * x_{t-1} + Bu_t, in plain numpy."""
    h, out = np.array(h0), []
    for t in range(bu.shape[0]):
        h = np.where(resets[t][..., None], bu[t], lambda_bar * h + bu[t])
        out.append(h)
    return np.stack(out)


def random_complex(rng, shape):
    return rng.normal(size=shape) + 1j * rng.normal(size=shape)


@pytest.mark.parametrize("pattern", list(RESET_PATTERNS))
@pytest.mark.parametrize("scan", [s5.resettable_parallel_scan, s5.resettable_sequential_scan])
def test_scan_equals_sequential_loop_float64(pattern, scan):
    rng = np.random.default_rng(0)
    T, B, P = len(RESET_PATTERNS[pattern]), 3, 5
    lambda_bar = np.exp(-rng.uniform(0.01, 0.5, P) + 1j * rng.normal(size=P))
    bu = random_complex(rng, (T, B, P))
    h0 = random_complex(rng, (B, P))
    resets = np.tile(np.array(RESET_PATTERNS[pattern], bool)[:, None], (1, B))
    resets[:, 1] = rng.random(T) < 0.3  # one batch column with a random pattern
    expected = sequential_loop(lambda_bar, bu, resets, h0)
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(scan)(jnp.asarray(lambda_bar), jnp.asarray(bu), jnp.asarray(resets), jnp.asarray(h0)))
    assert got.dtype == np.complex128
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_reset_operator_is_associative():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        elems = [
            (jnp.asarray(random_complex(rng, 4)), jnp.asarray(random_complex(rng, 4)), jnp.asarray(rng.random(4) < 0.5))
            for _ in range(3)
        ]
        op = s5.reset_binary_operator
        for a, b, c in itertools.permutations(elems):
            left, right = op(op(a, b), c), op(a, op(b, c))
            for x, y in zip(left, right):
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12)


def test_hippo_n_diagonalisation_reconstructs_normal_matrix():
    n = 16
    eigenvalues, v = s5.hippo_n_diagonalised(n)
    q = np.sqrt(2 * np.arange(n) + 1.0)
    hippo = -(np.tril(np.outer(q, q)) - np.diag(np.arange(n)))
    normal = hippo + np.outer(np.sqrt(np.arange(n) + 0.5), np.sqrt(np.arange(n) + 0.5))
    np.testing.assert_allclose(v @ np.diag(eigenvalues) @ v.conj().T, normal, atol=1e-10)
    np.testing.assert_allclose(eigenvalues.real, -0.5)
    # conjugate symmetry: the first half are the conjugates of the second half
    np.testing.assert_allclose(np.sort(eigenvalues.imag[: n // 2]), np.sort(-eigenvalues.imag[n // 2 :]), atol=1e-9)


def make_memory(**kw):
    cfg = s5.S5Config(**{"d_model": 8, "ssm_size": 16, "n_layers": 2, "s5_blocks": 1, **kw})
    return s5.S5Memory(cfg), cfg


MEMORY_VARIANTS = {
    "paper": {},
    "blocks4_clip": dict(s5_blocks=4, clip_eigs=True),
    "norms_half_glu1": dict(prenorm=True, postnorm=True, activation="half_glu1"),
    "no_conj_sym_half_glu2": dict(conj_sym=False, activation="half_glu2"),
    "gelu_sequential": dict(activation="gelu", s5_scan="sequential"),
}


@pytest.mark.parametrize("variant", list(MEMORY_VARIANTS))
def test_memory_one_step_at_a_time_equals_parallel_pass(variant):
    memory, cfg = make_memory(**MEMORY_VARIANTS[variant])
    T, B = 12, 3
    key_x, key_init = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (T, B, cfg.d_model))
    resets = jnp.zeros((T, B), bool).at[0, 0].set(True).at[4, 1].set(True).at[5, 1].set(True).at[7].set(True)
    carry = s5.S5Memory.initialize_carry(B, cfg)
    params = memory.init(key_init, carry, x, resets)
    # a non-zero starting carry, as at the start of a later rollout
    carry, _ = memory.apply(params, carry, x[::-1], jnp.zeros((T, B), bool))
    full_carry, full_out = jax.jit(memory.apply)(params, carry, x, resets)
    step = jax.jit(memory.apply)
    outs, c = [], carry
    for t in range(T):
        c, y = step(params, c, x[t : t + 1], resets[t : t + 1])
        outs.append(y[0])
    np.testing.assert_allclose(np.stack(outs), full_out, rtol=2e-5, atol=2e-5)
    for a, b in zip(c, full_carry):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_reset_gives_same_output_as_fresh_carry():
    memory, cfg = make_memory()
    T, B = 10, 2
    x = jax.random.normal(jax.random.key(1), (T, B, cfg.d_model))
    zero = s5.S5Memory.initialize_carry(B, cfg)
    params = memory.init(jax.random.key(2), zero, x, jnp.zeros((T, B), bool))
    warm, _ = memory.apply(params, zero, x, jnp.zeros((T, B), bool))  # some non-zero state
    resets = jnp.zeros((T, B), bool).at[6].set(True)
    _, out = memory.apply(params, warm, x, resets)
    _, fresh = memory.apply(params, zero, x[6:], jnp.zeros((T - 6, B), bool))
    np.testing.assert_allclose(out[6:], fresh, rtol=1e-5, atol=1e-5)
    _, no_reset = memory.apply(params, warm, x, jnp.zeros((T, B), bool))
    assert not np.allclose(out[6:], no_reset[6:], atol=1e-3)  # the reset really changed something


def test_blocks_give_block_diagonal_initial_state_matrix():
    memory, cfg = make_memory(s5_blocks=4, n_layers=1)
    params = memory.init(
        jax.random.key(0), s5.S5Memory.initialize_carry(1, cfg), jnp.zeros((1, 1, 8)), jnp.zeros((1, 1), bool)
    )
    ssm = params["params"]["S5Block_0"]["S5SSM_0"]
    lam = np.asarray(ssm["lambda_re"] + 1j * ssm["lambda_im"])
    assert lam.shape == (8,)  # 4 blocks of size 4, conjugate symmetry keeps 2 each
    block, _ = s5.hippo_n_diagonalised(4)
    np.testing.assert_allclose(lam, np.tile(block[:2], 4), rtol=1e-6)
