"""The rules of --resume and --eval-model, the same in all four scripts: a saved run's launch flags (--distributed and
its coordinator, process count and id) belong to the launch that saved it and are never inherited; with
--eval-model the defaults are the saved run's Args, and a flag that differs from them is refused (the evaluation
would not use it) rather than silently ignored."""

import dataclasses
import sys

import flax.serialization
import pytest

import ppo_lstm_popgym
import ppo_s5_memory
import ppo_s5_metarl
import ppo_s5_popgym

pytestmark = pytest.mark.timeout(300)
SCRIPTS = [ppo_s5_popgym, ppo_lstm_popgym, ppo_s5_memory, ppo_s5_metarl]
LAUNCH = ("distributed", "coordinator_address", "num_processes", "process_id")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_a_saved_runs_launch_flags_are_not_inherited(script):
    launched = dataclasses.replace(script.Args(), distributed=True, coordinator_address="10.0.0.1:1234",
                                   num_processes=2, process_id=1)  # fmt: skip
    args = script.args_from(dataclasses.asdict(launched))
    assert {name: getattr(args, name) for name in LAUNCH} == {name: getattr(script.Args(), name) for name in LAUNCH}


def saved_model(tmp_path, script) -> str:
    """A `--save-model` file with the script's default Args (no parameters: parse_args reads only the Args)."""
    path = tmp_path / f"{script.__name__}.cleanrl_model"
    path.write_bytes(flax.serialization.to_bytes([dataclasses.asdict(script.Args()), {}]))
    return str(path)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_eval_model_refuses_a_flag_that_differs_from_the_saved_run(script, tmp_path, monkeypatch):
    path = saved_model(tmp_path, script)
    monkeypatch.setattr(sys, "argv", [script.__name__, "--eval-model", path, "--eval-episodes", "3"])
    args, error = script.parse_args()
    assert error is None and args.eval_model == path and args.eval_episodes == 3
    monkeypatch.setattr(sys, "argv", [script.__name__, "--eval-model", path, "--learning-rate", "0.123"])
    args, error = script.parse_args()
    assert error is not None and error.startswith("--eval-model: --learning-rate 0.123 differs from the model's")
