"""Every numeric flag of every ppo_*.py script is checked against its domain before compiling: one table of
(flag, bad value) rows per script, run through the script's own `check_args`; the one-line message must start
with the flag, so the user knows what to change. The defaults themselves must pass."""

import dataclasses

import pytest

import ppo_lstm_popgym
import ppo_s5_memory
import ppo_s5_metarl
import ppo_s5_popgym

NAN, INF = float("nan"), float("inf")
COMMON = [  # every script: PPO, sizes, checkpoints, evaluation
    ("gamma", 1.5), ("gamma", -0.1), ("gamma", NAN), ("gae_lambda", 1.01), ("gae_lambda", -0.5),
    ("clip_coef", 0.0), ("clip_coef", -1.0), ("max_grad_norm", -0.5), ("max_grad_norm", 0.0),
    ("vf_coef", -1.0), ("ent_coef", -0.01), ("learning_rate", 0.0), ("learning_rate", -1e-3),
    ("learning_rate", NAN), ("num_seeds", 0), ("total_timesteps", 0), ("total_timesteps", -5), ("num_envs", 0),
    ("num_minibatches", 0), ("update_epochs", 0), ("updates_per_chunk", -1), ("checkpoint_every", -1),
    ("keep_checkpoints", 0), ("eval_episodes", 0), ("learning_rate", INF), ("max_grad_norm", INF),
    ("clip_coef", INF), ("num_processes", -1),
]  # fmt: skip
S5 = [("d_model", 0), ("ssm_size", 0), ("n_layers", 0), ("s5_blocks", 0), ("dt_min", 0.0), ("dt_max", -0.1)]
SCRIPTS = {
    ppo_s5_popgym: COMMON + S5 + [("num_steps", 0), ("env_id", "MemoryChain-0")],
    ppo_lstm_popgym: COMMON + [("num_steps", 0), ("hidden_size", 0), ("env_id", "MemoryChain-0")],
    ppo_s5_memory: COMMON + S5 + [
        ("num_steps", -1), ("num_bits", 0), ("hidden_size", 0), ("success_window", 0.0), ("success_window", 1.5),
        ("solve_threshold", 1.5), ("solve_threshold", -0.1),
    ],  # fmt: skip
    ppo_s5_metarl: COMMON + S5 + [
        ("num_steps", 0), ("episodes_per_trial", 0), ("episode_length", -1), ("obs_size", 0), ("action_size", 0),
        ("eval_every", -1), ("eval_trials", 0),
    ],  # fmt: skip
}
ROWS = [pytest.param(script, flag, value, id=f"{script.__name__}-{flag}={value}")
        for script, rows in SCRIPTS.items() for flag, value in rows]  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_defaults_pass(script):
    assert script.check_args(script.Args()) is None


@pytest.mark.parametrize("script, flag, value", ROWS)
def test_bad_value_is_refused_naming_the_flag(script, flag, value):
    assert flag in {f.name for f in dataclasses.fields(script.Args)}, f"{script.__name__} has no --{flag}"
    error = script.check_args(dataclasses.replace(script.Args(), **{flag: value}))
    assert error is not None, f"{script.__name__} accepts --{flag} {value}"
    assert error.startswith("--" + flag.replace("_", "-")) and "\n" not in error, error
