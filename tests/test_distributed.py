"""--distributed: one run's seeds over two local processes (jax.distributed; gloo collectives on CPU) against the same
run in one process. Per script: the two processes agree on one run folder, write each seed's TensorBoard run once,
and give the same summary.json (timings and the distributed flags aside), the same logged scalars (SPS aside) and
the same final parameters, bit for bit. The one-process reference runs on two CPU devices (XLA's host device
count), so that both runs put 2 seeds on each device: XLA compiles a vmapped program for 4 seeds differently from
one for 2 (on CPU the results then differ by float round-off, ~1e-8), so only the same layout is the same math."""

import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_lstm_popgym
import ppo_s5_memory
import ppo_s5_metarl
import ppo_s5_popgym

pytestmark = pytest.mark.timeout(600)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S5_TINY = ["--d-model", "8", "--ssm-size", "8", "--n-layers", "1"]
PPO_TINY = ["--num-envs", "4", "--update-epochs", "1", "--num-minibatches", "2"]
RUNS = {  # 4 seeds, 2 chunks, a checkpoint at the end of each
    ppo_s5_popgym: [*PPO_TINY, *S5_TINY, "--num-steps", "8", "--total-timesteps", "64", "--updates-per-chunk", "1"],
    ppo_lstm_popgym: [*PPO_TINY, "--hidden-size", "8", "--num-steps", "8", "--total-timesteps", "64",
                      "--updates-per-chunk", "1", "--env-id", "CartPoleEasy"],
    ppo_s5_memory: [*PPO_TINY, *S5_TINY, "--hidden-size", "8", "--memory-lengths", "3", "--total-timesteps", "256"],
    ppo_s5_metarl: [*PPO_TINY, *S5_TINY, "--num-steps", "12", "--episode-length", "3", "--episodes-per-trial", "2",
                    "--eval-trials", "2", "--train-envs", "Pendulum-v1", "--heldout-envs", "Reacher-misc",
                    "--total-timesteps", "96", "--eval-every", "1"],
}  # fmt: skip
NOT_COMPARED = {"compile_seconds", "run_seconds", "sps", "log_dir", "distributed", "coordinator_address",
                "num_processes", "process_id", "clock"}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, flags: list, log_dir, processes: int) -> list[subprocess.CompletedProcess]:
    """Run `processes` copies of the script (process i of a --distributed run when processes > 1)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR="")
    if processes == 1:  # two devices in the one process: the same 2 seeds per device as with two processes
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    command = [sys.executable, f"{script.__name__}.py", *flags, "--num-seeds", "4", "--seed", "3",
               "--log-dir", str(log_dir), "--compile-cache", ""]  # fmt: skip
    if processes > 1:
        command += ["--distributed", "--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes",
                    str(processes)]  # fmt: skip
    running = [subprocess.Popen(command + (["--process-id", str(i)] if processes > 1 else []), cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]  # fmt: skip
    try:
        outs = [p.communicate(timeout=420) for p in running]
    finally:
        for p in running:
            p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(running, outs)]


def scrub(x):
    if isinstance(x, dict):
        return {k: scrub(v) for k, v in x.items() if k not in NOT_COMPARED}
    return [scrub(v) for v in x] if isinstance(x, list) else x


def tensorboard_runs(run_dir) -> dict:
    """{seed folder: {tag: [(step, value)]}} for every folder holding event files, SPS aside."""
    runs = {}
    for folder in sorted({os.path.dirname(p) for p in glob.glob(f"{run_dir}/**/events.out.tfevents.*", recursive=True)}):
        assert len(glob.glob(f"{folder}/events.out.tfevents.*")) == 1, f"{folder} was written more than once"
        events = EventAccumulator(folder)
        events.Reload()
        runs[os.path.relpath(folder, run_dir)] = {
            tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if "SPS" not in tag
        }
    return runs


@pytest.mark.parametrize("script", RUNS, ids=lambda s: s.__name__)
def test_two_processes_equal_one(script, tmp_path):
    results = {}
    for processes in (2, 1):
        log_dir = tmp_path / f"processes_{processes}"
        for result in launch(script, RUNS[script], log_dir, processes):
            assert result.returncode == 0, result.stderr[-3000:]
        (run_dir,) = log_dir.iterdir()  # one run folder, its name agreed by the processes
        with open(run_dir / "summary.json") as f:
            summary = json.load(f)
        results[processes] = (run_dir, scrub(summary), tensorboard_runs(run_dir), script.load_model(str(run_dir))[1])
    (run_2, summary_2, tb_2, params_2), (run_1, summary_1, tb_1, params_1) = results[2], results[1]
    assert summary_2 == summary_1
    assert sorted(tb_2) == sorted(tb_1) and len(tb_1) >= 4
    assert tb_2 == tb_1
    flat_2, flat_1 = _flatten(params_2), _flatten(params_1)
    assert flat_2.keys() == flat_1.keys()
    for name in flat_1:
        np.testing.assert_array_equal(flat_2[name], flat_1[name], err_msg=name)


def _flatten(tree, prefix="") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}/{key}").items()}
    return {prefix: np.asarray(tree)}


@pytest.mark.parametrize("script", RUNS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("flag, value", [("coordinator_address", "127.0.0.1:1234"), ("num_processes", 2),
                                         ("process_id", 1)])  # fmt: skip
def test_process_flags_without_distributed_are_refused(script, flag, value):
    """A process flag alone would silently start a single-process run: refused, naming --distributed."""
    error = script.check_args(script.Args(**{flag: value}))
    assert error is not None and "--distributed" in error and "\n" not in error, error
