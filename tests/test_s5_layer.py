"""The S5 layer of every S5 script against the S5 paper's equations in float64 numpy, and the three copies of the S5
section against each other (only ppo_s5_popgym's copy is exercised by the other S5 tests)."""

import difflib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppo_s5_memory
import ppo_s5_metarl
import ppo_s5_popgym

S5_SCRIPTS = {m.__name__: m for m in (ppo_s5_popgym, ppo_s5_memory, ppo_s5_metarl)}


def reference_s5(params, u, resets, h0, conj_sym: bool, clip_eigs: bool):
    """S5 (Smith et al. 2023, sections 2-3 and appendix C) from its equations, one step at a time.

    The continuous system x' = Lambda x + B~ u, y = C~ x + D u (Lambda diagonal, complex) discretised by zero-order
    hold with a step dt per state: Lambda_bar = exp(Lambda dt), B_bar = Lambda^-1 (Lambda_bar - I) B~. Then
    x_t = Lambda_bar x_{t-1} + B_bar u_t, with the state cleared before u_t where resets[t] (Lu et al. 2023), and
    y_t = 2 Re(C~ x_t) + D u_t when only one state of each conjugate pair is kept, else Re(C~ x_t) + D u_t.
    u: [T, N, H], resets: [T, N], h0: [N, P]. Returns (x_T, y [T, N, H]).
    """
    lambda_re = np.minimum(params["lambda_re"], -1e-4) if clip_eigs else params["lambda_re"]
    lam = lambda_re + 1j * params["lambda_im"]
    b = params["B"][..., 0] + 1j * params["B"][..., 1]  # [P, H]
    c = params["C"][..., 0] + 1j * params["C"][..., 1]  # [H, P]
    lambda_bar = np.exp(lam * np.exp(params["log_step"]))
    b_bar = ((lambda_bar - 1) / lam)[:, None] * b
    x, ys = h0, []
    for t in range(u.shape[0]):
        x = np.where(resets[t][:, None], 0, lambda_bar * x) + u[t] @ b_bar.T
        y = x @ c.T
        ys.append((2 * y.real if conj_sym else y.real) + params["D"] * u[t])
    return x, np.stack(ys)


VARIANTS = {
    "paper": dict(),
    "no_conj_sym": dict(conj_sym=False),
    "clip_eigs_2_blocks": dict(clip_eigs=True, s5_blocks=2),
    "parallel_scan": dict(s5_scan="parallel"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("script", list(S5_SCRIPTS))
def test_s5_layer_equals_the_papers_equations_float64(script, variant):
    module = S5_SCRIPTS[script]
    config = module.S5Config(**{"d_model": 6, "ssm_size": 8, "n_layers": 1, "s5_scan": "sequential",
                                **VARIANTS[variant]})  # fmt: skip
    layer = module.S5SSM(config)
    rng = np.random.default_rng(0)
    T, N, H = 11, 3, config.d_model
    num_states = config.ssm_size // 2 if config.conj_sym else config.ssm_size
    u = rng.normal(size=(T, N, H))
    resets = np.zeros((T, N), bool)
    resets[0, 0] = resets[4, 1] = resets[5, 1] = resets[T - 1, 2] = True
    h0 = rng.normal(size=(N, num_states)) + 1j * rng.normal(size=(N, num_states))  # a later rollout's carry
    params = layer.init(jax.random.key(1), jnp.zeros((N, num_states), jnp.complex64), jnp.zeros((1, N, H)),
                        jnp.zeros((1, N), bool))["params"]  # fmt: skip
    # Move every parameter off its initial value (so no term is trivially zero), and some eigenvalues into the right
    # half plane, which clip_eigs must pull back.
    params = {name: np.asarray(p, np.float64) + rng.normal(0, 0.1, p.shape) for name, p in params.items()}
    params["lambda_re"][: num_states // 2] = rng.uniform(0.05, 0.3, num_states // 2)

    with jax.enable_x64(True):
        last, y = layer.apply({"params": jax.tree.map(jnp.asarray, params)}, jnp.asarray(h0), jnp.asarray(u),
                              jnp.asarray(resets))  # fmt: skip
    assert y.dtype == jnp.float64 and last.dtype == jnp.complex128
    expected_last, expected_y = reference_s5(params, u, resets, h0, config.conj_sym, config.clip_eigs)
    np.testing.assert_allclose(y, expected_y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(last, expected_last, rtol=1e-10, atol=1e-10)


def section(path: str, title: str) -> str:
    """The text of the `# {title}... ----` section of a script, up to the next such header."""
    with open(path) as f:
        text = f.read()
    headers = [m.start() for m in re.finditer(r"^# .*-{10,}$", text, re.MULTILINE)]
    (start,) = [h for h in headers if text.startswith(f"# {title}", h)]
    return text[start : min([h for h in headers if h > start], default=len(text))]


def test_the_three_s5_sections_are_identical():
    """The S5 section (scan, layer, block, memory) is copied into every S5 script (CleanRL's one file per
    experiment); the copies must not drift apart, since the layer's other tests run ppo_s5_popgym's copy."""
    copies = {name: section(module.__file__, "S5 (Smith et al. 2023)") for name, module in S5_SCRIPTS.items()}
    reference = copies["ppo_s5_popgym"]
    for name in ("class S5Config", "def resettable_parallel_scan", "class S5SSM", "class S5Block", "class S5Memory"):
        assert name in reference
    for name, text in copies.items():
        diff = "".join(difflib.unified_diff(reference.splitlines(True), text.splitlines(True), "ppo_s5_popgym", name))
        assert text == reference, diff
