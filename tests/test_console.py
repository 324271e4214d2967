"""What a user reads on the console (issue 30): a start from the persistent compilation cache prints none of XLA's
harmless cache-load lines (on an AVX-512 CPU, jaxlib 0.9.2 logs "Target machine feature +prefer-no-gather is not
supported on the host machine ... SIGILL" for every executable it loads), and a progress line or summary never shows
nan when no episode ended: it says "(no episode ended)". The stderr filter (`quiet_cache_loads`) is checked with
synthetic lines, so that it is tested on every CPU; the end-to-end runs check the real thing where the CPU has AVX-512.
"""

import glob
import inspect
import os
import re
import signal
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
SCRIPTS = [ppo_s5_popgym, ppo_lstm_popgym, ppo_s5_memory, ppo_s5_metarl]
NAN = re.compile(r"\bnan\b", re.IGNORECASE)


def test_console_helpers_are_the_same_in_every_script():
    """One way in all four scripts: the same helpers, word for word (the scripts share no module)."""
    for name in ("console_mean", "cache_folder", "enable_compile_cache", "quiet_cache_loads"):
        sources = {inspect.getsource(getattr(script, name)) for script in SCRIPTS}
        assert len(sources) == 1, name
    for name in ("CACHE_LOAD_NOISE", "LINE_FILTER"):
        assert len({getattr(script, name) for script in SCRIPTS}) == 1, name
    console_mean = ppo_s5_popgym.console_mean
    assert console_mean(np.array([np.nan, np.nan])) == "(no episode ended)"
    assert console_mean(np.array([-np.inf, -np.inf])) == "(no episode ended)"  # the MMER before a first episode
    assert console_mean([None, None], ".4f", spread=True) == "(no episode ended)"  # summary.json's nulls
    assert console_mean(np.array([np.nan, 0.25, -np.inf, 0.75])) == "+0.500"  # the seeds that finished episodes
    assert console_mean([0.1, None, 0.3], ".4f", spread=True) == "0.2000 +- 0.1000"
    assert console_mean(-1.0) == "-1.000" and console_mean(0.5, ".3f") == "0.500"


# The loader's line as jaxlib 0.9.2 prints it on an AVX-512 host (feature lists shortened), and its neighbours.
AOT = ("E1207 07:04:40.949995   19904 cpu_aot_loader.cc:220] Loading XLA:CPU AOT result. Target machine feature {} "
       "is not  supported on the host machine. Machine type used for XLA:CPU compilation doesn't match the machine "
       "type for execution. Compile machine features: [+64bit,+adx,+avx512f,+prefer-no-gather,+prefer-no-scatter,"
       "+sse4a] vs host machine features: [64bit,adx,avx512f,sse4a]. This could lead to execution errors such as "
       "SIGILL.\n")  # fmt: skip
PJRT = ("W1207 07:04:40.949463   19875 pjrt_executable.cc:642] Assume version compatibility. PjRt-IFRT does not track "
        "XLA executable versions.\n")  # fmt: skip
OTHER_ERROR = "E1207 07:04:41.000000   19904 cpu_compiler.cc:99] Some other XLA error: kept\n"
CHILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
import ppo_s5_popgym as script
aot, pjrt, other, cache = {aot!r}, {pjrt!r}, {other!r}, sys.argv[1]
script.quiet_cache_loads("")  # the cache off: no filter
os.write(2, aot.format("+prefer-no-gather").encode())
script.quiet_cache_loads(cache)
print("stdout is untouched", flush=True)
os.write(2, aot.format("+prefer-no-gather").encode())  # C++'s writes to fd 2, one line per write
os.write(2, aot.format("+prefer-no-scatter").encode() + pjrt.encode() + other.encode())  # several lines in one write
os.write(2, aot.format("+avx512fp16").encode())  # a feature this host really lacks: kept
print("a Python line on sys.stderr", file=sys.stderr, flush=True)
os.write(2, b"x" * 200000 + b" a line longer than the filter's reads\\n")
os.write(2, other.encode()[:40])  # a line in two writes
os.write(2, other.encode()[40:])
os.write(2, b"last words, no newline, then a crash")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_stderr_filter_drops_exactly_the_cache_load_noise(tmp_path):
    """With the cache on, fd 2 goes through the filter: the +prefer-no-gather/-scatter loader lines and PjRt's
    version note are dropped, whether written alone or together with other lines; everything else passes unchanged
    and in order (a real missing feature, other XLA errors, Python's stderr, a long line, a line in pieces); a
    process killed by SIGKILL still gets its last words out. With the cache off nothing is filtered."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    code = CHILD.format(root=ROOT, aot=AOT, pjrt=PJRT, other=OTHER_ERROR)
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], capture_output=True, timeout=300,
                            env=env)  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert result.stdout.decode() == "stdout is untouched\n"
    expected = (AOT.format("+prefer-no-gather") + OTHER_ERROR + AOT.format("+avx512fp16")
                + "a Python line on sys.stderr\n" + "x" * 200000 + " a line longer than the filter's reads\n"
                + OTHER_ERROR + "last words, no newline, then a crash")  # fmt: skip
    assert result.stderr.decode() == expected


# Tiny runs in which the first rollouts end no episode (PositionOnlyPendulumEasy: 200-step episodes; the meta-RL
# trial's first episode: 20 steps); MemoryChain's episodes (L + 1 steps) end in every rollout.
TINY_POPGYM = ["--env-id=PositionOnlyPendulumEasy", "--num-envs=2", "--num-steps=40", "--update-epochs=1",
               "--num-minibatches=1", "--total-timesteps=400", "--updates-per-chunk=1"]  # fmt: skip
RUNS = {
    "ppo_s5_popgym": [*TINY_POPGYM, "--d-model=8", "--ssm-size=8", "--n-layers=1"],
    "ppo_lstm_popgym": [*TINY_POPGYM, "--hidden-size=8"],
    "ppo_s5_memory": ["--memory-lengths=3", "--num-envs=2", "--num-minibatches=1", "--update-epochs=1", "--d-model=8",
                      "--ssm-size=8", "--n-layers=1", "--total-timesteps=128", "--updates-per-chunk=1"],  # fmt: skip
    "ppo_s5_metarl": ["--train-envs=Pendulum-v1", "--heldout-envs", "--num-envs=2", "--num-steps=12",
                      "--update-epochs=1", "--num-minibatches=1", "--d-model=8", "--ssm-size=8", "--n-layers=1",
                      "--episode-length=20", "--episodes-per-trial=2", "--eval-trials=2", "--total-timesteps=48",
                      "--updates-per-chunk=1"],  # fmt: skip
}


@pytest.mark.parametrize("script", sorted(RUNS))
def test_cached_second_start_is_quiet_and_progress_never_prints_nan(script, tmp_path):
    """The same tiny run twice with a fresh compilation cache: the second loads its programs from the cache and its
    stderr holds no cache-load noise (no SIGILL line); no line of either run shows nan, and where a rollout ended no
    episode the progress line says so. TensorBoard keeps its gaps (no return point for such an update)."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
    results = []
    for run in ("first", "second"):
        command = [sys.executable, f"{script}.py", *RUNS[script], f"--log-dir={tmp_path / run}"]
        results.append(subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500))
        assert results[-1].returncode == 0, results[-1].stderr[-3000:]
        assert os.listdir(tmp_path / "cache"), "nothing was cached"
    second = results[1].stderr
    assert "SIGILL" not in second and "+prefer-no-" not in second, second[-3000:]
    assert "PjRt-IFRT does not track XLA executable versions" not in second, second[-3000:]
    for result in results:
        assert not NAN.search(result.stdout + result.stderr), result.stdout
        progress = [line for line in result.stdout.splitlines() if line.startswith("step ")]
        assert progress, result.stdout
        if script != "ppo_s5_memory":
            assert "return (no episode ended)" in progress[0] and "(no episode ended)" not in progress[-1], progress
    if script in ("ppo_s5_popgym", "ppo_lstm_popgym"):  # the first 4 updates ended no episode, the 5th did
        (seed_dir,) = glob.glob(str(tmp_path / "first" / "*" / "seed_1"))
        events = EventAccumulator(seed_dir)
        events.Reload()
        assert [e.step for e in events.Scalars("charts/episodic_return")] == [400]
        assert len(events.Scalars("losses/value_loss")) == 5
