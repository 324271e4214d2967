"""Every script stopped at several points of its training loop, by SIGTERM (which stops like Ctrl-C: checkpoint,
summary, exit) and by SIGKILL (nothing runs after it), then continued with --resume: the finished run equals an
uninterrupted one bit for bit (saved parameters, every TensorBoard scalar but SPS, the summary without timings),
with nothing logged twice or missing.

The signals are real and land at exact points: the script runs in a child process whose copy of one of its functions
(`log_iteration`, which logs an update's metrics; `save_checkpoint`; TensorBoard's `add_scalar` of the SPS, written
once per chunk after its metrics) sends the signal to its own process on its k-th call, before the function's body.
These lie between an update's metrics reaching the host and the runner state moving on, the window where the logged
history and the state can disagree; SIGKILL there also leaves TensorBoard rows past the last checkpoint, which the
resumed run must drop and log again."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_lstm_popgym
import ppo_s5_memory
import ppo_s5_metarl
import ppo_s5_popgym

pytestmark = pytest.mark.timeout(900)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POPGYM = ["--env-id=CartPoleEasy", "--num-envs=4", "--num-steps=8", "--num-minibatches=2", "--update-epochs=2",
          "--num-seeds=2", "--total-timesteps=256"]  # 8 updates of 32 steps  # fmt: skip
COMMON = ["--updates-per-chunk=1", "--checkpoint-every=3", "--keep-checkpoints=20", "--save-model"]
# script: its module, flags of a tiny run of 8 updates, TensorBoard folders and log_iteration calls per update (one per
# (length, seed) pair in ppo_s5_memory); every script calls save_checkpoint only when a checkpoint is due (every 3
# updates here)
SCRIPTS = {
    "s5": dict(module=ppo_s5_popgym, flags=[*POPGYM, "--d-model=16", "--ssm-size=8", "--n-layers=1"],
               folders="seed_*", log_calls=1),
    "lstm": dict(module=ppo_lstm_popgym, flags=[*POPGYM, "--hidden-size=16"], folders="seed_*", log_calls=1),
    "memory": dict(module=ppo_s5_memory, flags=["--memory-lengths=3", "--num-seeds=2", "--total-timesteps=1024",
                                                "--num-envs=4", "--num-minibatches=2", "--update-epochs=1",
                                                "--d-model=8", "--ssm-size=8", "--n-layers=1"],
                   folders="len_*", log_calls=2),  # L = 3: 4 envs x 32 steps
    "metarl": dict(module=ppo_s5_metarl, flags=["--train-envs=Pendulum-v1", "--heldout-envs", "--num-envs=4",
                                                "--num-steps=12", "--num-minibatches=2", "--update-epochs=1",
                                                "--d-model=16", "--ssm-size=8", "--n-layers=1", "--episode-length=3",
                                                "--episodes-per-trial=2", "--eval-trials=3", "--eval-every=4",
                                                "--num-seeds=2", "--total-timesteps=384"],
                   folders="seed_*", log_calls=1),
}  # fmt: skip
UPDATES = 8
# (signal, function, the update during which the k-th call comes, the checkpoints the resumed run may start from)
POINTS = [
    ("SIGTERM", "log_iteration", 5, (4,)),  # update 5's metrics in hand, state at 4: the checkpoint on the way out
    ("SIGTERM", "SummaryWriter.add_scalar", 5, (4, 5)),  # update 5 logged; the state moved on or not (by script)
    ("SIGKILL", "log_iteration", 5, (3,)),  # update 4 logged past the periodic checkpoint at 3
    ("SIGKILL", "save_checkpoint", 6, (3,)),  # killed as the checkpoint at 6 is about to be written
]
# The child: runs the script as __main__, its `function` wrapped to signal the process on call `k`. For SIGKILL it
# first waits until the checkpoint the test expects is committed (orbax writes in the background), so that what the
# resumed run starts from does not depend on timing.
CHILD = r"""
import glob, os, signal, sys, time, types
path, function, k, name, committed, *argv = sys.argv[1:]
source = open(path).read()
top, main = source.split('\nif __name__ == "__main__":\n')
module = types.ModuleType("__main__")
module.__file__ = path
sys.modules["__main__"], sys.argv = module, [path, *argv]
exec(compile(top, path, "exec"), module.__dict__)
owner, attribute = function.split(".") if "." in function else ("", function)
owner = module.__dict__[owner] if owner else module
original, calls = getattr(owner, attribute), []

def signalling(*args, **kwargs):
    calls.extend([1] if owner is module or args[1] == "charts/SPS" else [])  # add_scalar(self, tag, ...): SPS only
    if len(calls) == int(k) and (owner is module or args[1] == "charts/SPS"):
        log_dir = [a.split("=", 1)[1] for a in argv if a.startswith("--log-dir=")][0]
        while name == "SIGKILL" and not glob.glob(os.path.join(log_dir, "*", "checkpoints", committed)):
            time.sleep(0.01)
        os.kill(os.getpid(), getattr(signal, name))
        time.sleep(60)  # SIGTERM's KeyboardInterrupt is raised in here (the handler runs in the main thread)
    return original(*args, **kwargs)

setattr(owner, attribute, signalling)
exec(compile("if True:\n" + main, path, "exec"), module.__dict__)
"""


def run(args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def fingerprint(module, run_dir: str, folders: str) -> tuple:
    """(saved parameters, every scalar but SPS per TensorBoard folder, the summary without timings)."""
    _, params = module.load_model(os.path.join(run_dir, f"{module.Args.exp_name}.cleanrl_model"))
    scalars = {}
    for folder in sorted(glob.glob(os.path.join(run_dir, folders))):
        events = EventAccumulator(folder)
        events.Reload()  # honours purge_step: what a killed run logged past its checkpoint is dropped
        for tag in events.Tags()["scalars"]:
            if tag != "charts/SPS":
                scalars[os.path.basename(folder), tag] = [(e.step, e.value) for e in events.Scalars(tag)]
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    return params, scalars, timeless(summary)


TIMINGS = ("seconds", "sps", "load_average", "continued_with_resume", "args")


def timeless(tree):
    """The summary less its timings, load averages and Args (log_dir and resume differ between the runs)."""
    if isinstance(tree, dict):
        return {k: timeless(v) for k, v in tree.items() if not any(t in k for t in TIMINGS)}
    return [timeless(v) for v in tree] if isinstance(tree, list) else tree


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("compile_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    """{script: fingerprint of its tiny run in one go}, run on first use."""
    results = {}

    def get(name):
        if name not in results:
            script, log_dir = SCRIPTS[name], tmp_path_factory.mktemp(f"{name}_whole")
            module = script["module"]
            flags = [*script["flags"], *COMMON, f"--log-dir={log_dir}", f"--compile-cache={cache}"]
            result = run([module.__file__, *flags])
            assert result.returncode == 0, result.stderr[-3000:]
            (run_dir,) = glob.glob(str(log_dir / "*"))
            results[name] = fingerprint(module, run_dir, script["folders"])
        return results[name]

    return get


@pytest.mark.parametrize("point", POINTS, ids=[f"{s}-{f.split('.')[-1]}-update{u}" for s, f, u, _ in POINTS])
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_stopped_and_resumed_equals_uninterrupted(name, point, uninterrupted, cache, tmp_path):
    script = SCRIPTS[name]
    module, signal_name, function, update, resumed_from = script["module"], *point
    committed = str(resumed_from[0])  # SIGKILL: the checkpoint that must be committed before the kill
    if function == "log_iteration":  # the first call of the update
        k = (update - 1) * script["log_calls"] + 1
    elif function == "SummaryWriter.add_scalar":  # the first TensorBoard run's SPS (one per seed, per chunk)
        k = (update - 1) * 2 + 1
    else:
        k = update // 3
    stopped = run(["-c", CHILD, module.__file__, function, str(k), signal_name, committed, *script["flags"],
                   *COMMON, f"--log-dir={tmp_path}", f"--compile-cache={cache}"])  # fmt: skip
    assert stopped.returncode == (-signal.SIGKILL if signal_name == "SIGKILL" else 0), stopped.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "*"))
    assert signal_name == "SIGTERM" or not os.path.exists(os.path.join(run_dir, "summary.json"))
    assert module.restore_checkpoint(run_dir, meta_only=True)[0] in resumed_from
    resumed = run([module.__file__, f"--resume={run_dir}", f"--compile-cache={cache}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    params, scalars, summary = fingerprint(module, run_dir, script["folders"])
    whole_params, whole_scalars, whole_summary = uninterrupted(name)
    jax.tree.map(np.testing.assert_array_equal, params, whole_params)
    assert scalars.keys() == whole_scalars.keys()
    for key, points in whole_scalars.items():  # same steps (nothing twice, nothing missing) and values
        assert scalars[key] == points, key
    assert summary == whole_summary


def test_metarl_resumes_a_checkpoint_of_the_earlier_format(uninterrupted, cache, tmp_path):
    """ppo_s5_metarl's checkpoints once kept their logs in one `logs` entry (the per-update returns, the evaluations,
    the clock). A run killed after its checkpoint at update 3, whose checkpoint is rewritten in that format, resumes
    to the uninterrupted run."""
    script = SCRIPTS["metarl"]
    module = script["module"]
    stopped = run(["-c", CHILD, module.__file__, "log_iteration", "5", "SIGKILL", "3", *script["flags"], *COMMON,
                   f"--log-dir={tmp_path}", f"--compile-cache={cache}"])  # fmt: skip
    assert stopped.returncode == -signal.SIGKILL, stopped.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "*"))
    (path,) = glob.glob(os.path.join(run_dir, "checkpoints", "3", "meta", "metadata"))
    with open(path) as f:
        meta = json.load(f)
    returns = [row["episodic_return"] for row in meta["history"]]
    logs = dict(returns=returns, evals=meta["evals"], global_step=3 * 48, run_seconds=meta["run_seconds"],
                compile_seconds=1.0)  # fmt: skip
    with open(path, "w") as f:
        json.dump({"args": meta["args"], "logs": logs}, f)
    resumed = run([module.__file__, f"--resume={run_dir}", f"--compile-cache={cache}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    params, scalars, summary = fingerprint(module, run_dir, script["folders"])
    whole_params, whole_scalars, whole_summary = uninterrupted("metarl")
    jax.tree.map(np.testing.assert_array_equal, params, whole_params)
    assert scalars == whole_scalars and summary == whole_summary


# One update that takes hours (many epochs over a large rollout; tiny networks, so it compiles as fast as the runs above)
LONG_UPDATE = ["--num-seeds=1", "--num-envs=64", "--num-steps=1200", "--num-minibatches=1", "--update-epochs=100000",
               "--total-timesteps=100000000"]  # fmt: skip


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_sigterm_during_an_update_ends_the_process_at_once(name, cache, tmp_path):
    """SIGTERM while an update is still running on the device: the script writes what was logged and exits at once,
    instead of waiting for that update to finish (JAX's exit-time teardown waits for the device's work)."""
    script = SCRIPTS[name]
    flags = [f for f in script["flags"] if not f.startswith(("--num-seeds", "--num-envs", "--num-steps", "--total"))]
    flags = [*flags, *LONG_UPDATE, f"--log-dir={tmp_path}", f"--compile-cache={cache}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, script["module"].__file__, *flags], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for line in process.stdout:  # the first update is dispatched right after this line
            if "compiled in" in line:
                break
        time.sleep(3)
        process.send_signal(signal.SIGTERM)
        stopped = time.time()
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("60 s after SIGTERM the process still runs: it waits for the update in flight")
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert "interrupted after 0 updates" in stderr
    assert glob.glob(str(tmp_path / "*" / "summary.json")), stdout[-3000:]
