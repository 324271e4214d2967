"""Long runs of the POPGym scripts: a real kill -9 (S5) or SIGTERM (LSTM) and --resume give the
uninterrupted run bit for bit (complete training state, TensorBoard scalars, summary); non-finite
updates stop the run; --resume refuses flags that change the math; --track logs offline."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_lstm_popgym as lstm
import ppo_s5_popgym as s5

pytestmark = pytest.mark.timeout(600)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    s5: dict(num_envs=4, num_steps=8, update_epochs=2, num_minibatches=2, d_model=16, ssm_size=8, n_layers=1),
    lstm: dict(num_envs=4, num_steps=8, update_epochs=1, num_minibatches=2, hidden_size=16),
}
N = 10  # updates of the whole run; one update is 32 steps


def flags(script, **kw):
    return [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY[script], **kw}.items()]


def start(script, *args, cache):
    return subprocess.Popen([sys.executable, script.__file__, *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)})  # fmt: skip


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def scalars(run_dir):
    """{seed folder: {tag: [(step, value)]}} as TensorBoard reads it (purged points dropped), SPS aside."""
    result = {}
    for seed_dir in sorted(glob.glob(os.path.join(run_dir, "seed_*"))):
        acc = EventAccumulator(seed_dir)
        acc.Reload()
        result[os.path.basename(seed_dir)] = {
            tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag != "charts/SPS"
        }
    return result


def final_state(run_dir):
    manager = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"))
    step = manager.latest_step()
    return step, manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state


def strict_json(path):
    with open(path) as f:
        return json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"{path}: non-strict JSON constant {c}"))


def assert_resumed_equals_uninterrupted(resumed_dir, whole_dir):
    (step_a, state_a), (step_b, state_b) = final_state(resumed_dir), final_state(whole_dir)
    assert step_a == step_b == N
    leaves_a, leaves_b = (dict((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(s))
                          for s in (state_a, state_b))  # fmt: skip
    assert leaves_a.keys() == leaves_b.keys()
    for path, a in leaves_a.items():  # params, optimizer state, env states, carries, PRNG keys: everything
        np.testing.assert_array_equal(a, leaves_b[path], err_msg=path)
    resumed, whole = scalars(resumed_dir), scalars(whole_dir)
    assert resumed == whole  # same tags, steps and values: nothing duplicated or missing
    assert [s for s, _ in whole["seed_1"]["losses/value_loss"]] == [32 * (u + 1) for u in range(N)]
    summary_a, summary_b = strict_json(os.path.join(resumed_dir, "summary.json")), strict_json(
        os.path.join(whole_dir, "summary.json")
    )
    for key in ("updates", "global_step", "per_seed", "mmer", "final_episodic_return"):
        assert summary_a[key] == summary_b[key], key


@pytest.mark.timeout(900)
@pytest.mark.parametrize("script", [s5, lstm], ids=["s5", "lstm"])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(script, tmp_path):
    """S5: a real kill -9 after a periodic checkpoint. LSTM: SIGTERM, which checkpoints on its way out. The killed
    run was started with a larger --total-timesteps (allowed on --resume without --anneal-lr) so that it is still
    training when killed; resumed to N updates it equals N updates in one go, bit for bit."""
    cache = tmp_path / "cache"
    common = flags(script, updates_per_chunk=1, env_id="CartPoleEasy", num_seeds=2)
    whole = start(script, *common, f"--total-timesteps={32 * N}", f"--log-dir={tmp_path / 'whole'}", cache=cache)
    killed_flags = [*common, "--total-timesteps=100000000", f"--log-dir={tmp_path / 'killed'}", "--keep-checkpoints=50"]
    if script is s5:
        killed = start(script, *killed_flags, "--checkpoint-every=2", cache=cache)
        deadline = time.time() + 450  # a loaded 2-core machine compiles slowly
        while not glob.glob(str(tmp_path / "killed" / "*" / "checkpoints" / "2")) and time.time() < deadline:
            time.sleep(0.01)
        killed.send_signal(signal.SIGKILL)
    else:
        killed = start(script, *killed_flags, "--checkpoint-every=1000", cache=cache)
        for line in killed.stdout:  # the first progress line: a chunk is done
            if line.startswith("step"):
                break
        killed.send_signal(signal.SIGTERM)
    killed.communicate(timeout=120)
    assert killed.returncode == (-signal.SIGKILL if script is s5 else 0)
    (killed_dir,) = glob.glob(str(tmp_path / "killed" / "*"))
    done = ocp.CheckpointManager(os.path.join(killed_dir, "checkpoints")).latest_step()
    assert 1 <= done < N
    resumed = finish(start(script, f"--resume={killed_dir}", f"--total-timesteps={32 * N}", cache=cache))
    assert f"from update {done}" in resumed
    finish(whole)
    (whole_dir,) = glob.glob(str(tmp_path / "whole" / "*"))
    assert_resumed_equals_uninterrupted(killed_dir, whole_dir)


@pytest.fixture(scope="module")
def s5_run(tmp_path_factory):
    """2 updates of a tiny S5 run, checkpointed after each."""
    log_dir = tmp_path_factory.mktemp("s5_run")
    s5.main(s5.Args(env_id="CartPoleEasy", total_timesteps=64, log_dir=str(log_dir), checkpoint_every=1, **TINY[s5]))
    (run_dir,) = glob.glob(str(log_dir / "*"))
    return run_dir


def test_resume_refuses_flags_that_change_the_run(s5_run, tmp_path, monkeypatch):
    def parse(*argv):
        monkeypatch.setattr(sys, "argv", ["ppo_s5_popgym.py", *argv])
        return s5.parse_args()

    resumed, error = parse(f"--resume={s5_run}", "--total-timesteps=128", "--updates-per-chunk=1", "--keep-checkpoints=5")
    assert error is None and resumed.total_timesteps == 128 and resumed.d_model == 16 and resumed.resume == s5_run
    _, error = parse(f"--resume={s5_run}", "--learning-rate=0.001")
    assert error.startswith("--resume: --learning-rate 0.001 differs from the checkpoint's 5e-05; it would change")
    assert "allowed to change: --total-timesteps, --log-dir, --updates-per-chunk" in error
    _, error = parse(f"--resume={s5_run}", "--anneal-lr")
    assert error.startswith("--resume: --anneal-lr True differs")
    _, error = parse(f"--resume={s5_run}", "--total-timesteps=32")
    assert "--total-timesteps 32 is below the 64 steps" in error
    _, error = parse(f"--resume={tmp_path}")
    assert error.startswith(f"--resume: {tmp_path} is neither a .cleanrl_model file nor a run folder")
    _, error = parse(f"--eval-model={s5_run}", "--d-model=32")
    assert error.startswith("--eval-model: --d-model 32 differs from the model's 16")


def test_non_finite_update_stops_the_run_and_keeps_the_last_good_checkpoint(s5_run, tmp_path):
    """The 2 good updates (checkpointed) continue in Python with a learning rate of 1e30 (the CLI would refuse that
    change): Adam's first step moves every parameter by ~1e30 and the next forward pass overflows. The run stops
    at update 3 or 4 with one line; logs, summary and checkpoints stop before it."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(s5_run, run_dir)
    args = s5.Args(**{**s5.load_model(run_dir)[0].__dict__, "resume": run_dir, "learning_rate": 1e30,
                      "total_timesteps": 320})  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        s5.main(args)
    message = str(stop.value)
    assert message.startswith("error: non-finite loss/parameters at update ") and "\n" not in message
    assert message.endswith(f"; last good checkpoint: update 2 in {os.path.join(run_dir, 'checkpoints')}")
    assert ocp.CheckpointManager(os.path.join(run_dir, "checkpoints")).latest_step() == 2
    summary = strict_json(os.path.join(run_dir, "summary.json"))
    bad_update = int(message.split("update ")[1].split(" ")[0])
    assert summary["updates"] == bad_update - 1 >= 2
    steps = [s for s, _ in scalars(run_dir)["seed_1"]["losses/value_loss"]]
    assert steps == [32 * (u + 1) for u in range(bad_update - 1)]


def test_track_logs_to_wandb_offline(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "JAX_COMPILATION_CACHE_DIR": ""}
    result = subprocess.run([sys.executable, lstm.__file__, *flags(lstm, total_timesteps=64), "--track",
                             "--checkpoint-every=0", f"--log-dir={tmp_path / 'runs'}"],  # fmt: skip
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert glob.glob(os.path.join(run, "*.wandb"))
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))  # --checkpoint-every 0: none
