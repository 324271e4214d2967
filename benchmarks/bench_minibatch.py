"""Where PPO's time goes: one minibatch's forward+backward, FLOP-counted, against the matmul peak.

At the paper's POPGym settings an update is one rollout (64 envs x 1024 steps, forward only) and
then 30 epochs x 8 minibatches of forward+backward over 8 whole sequences of 1024 steps: the
minibatch gradient runs 240 times per update and dominates. This script times that gradient
(`jax.grad` of the actor-critic's outputs, jitted, compile excluded, median of `--repeats`,
wall and process CPU seconds) for the memories of `ppo_s5_popgym.py` and `ppo_lstm_popgym.py`,
built by the scripts' own `build_network`, and compares it with this machine's jitted float32
matmul rate measured in the same run:

- `s5 sequential` / `s5 parallel`: the paper's S5 stack (d_model 256, SSM 256, 4 layers) with
  `--s5-scan sequential` (lax.scan, the CPU default) and `parallel` (associative scan);
- `s5 no scan`: the same stack with the recurrence replaced by x = Bu, to price the scan itself;
- `s5 2 layers`: an S5 stack with the LSTM-256's matmul FLOPs per step (equal-FLOP comparison);
- `lstm`: flax's OptimizedLSTMCell, 256 units.

FLOPs are counted from the parameters: every element of a weight matrix (any parameter with two
or more axes: Dense kernels, S5's B and C, the LSTM's kernels) is one multiply-add per token in
the forward pass, and the backward pass costs twice the forward; elementwise work is not counted.
(XLA's own cost analysis counts a loop body once, so it undercounts the LSTM.)

    python benchmarks/bench_minibatch.py            # about 3 min on 2 cores
    python benchmarks/bench_minibatch.py --quick    # smoke test

Writes `{out_dir}/{out_name}.json` and `.md`.
"""

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common beside this file
from bench_common import load_average, machine_info, machine_line, write_results  # noqa: E402

import envs_popjax  # noqa: E402
import ppo_lstm_popgym  # noqa: E402
import ppo_s5_popgym  # noqa: E402


@dataclasses.dataclass
class Args:
    env_id: str = "RepeatPreviousEasy"
    """env whose observation and action sizes the networks are built for"""
    sequence_length: int = 1024
    """steps per sequence (the paper's --num-steps)"""
    sequences: int = 8
    """sequences per minibatch (the paper's 64 envs / 8 minibatches)"""
    width: int = 256
    """S5 d_model and ssm_size, LSTM hidden size"""
    repeats: int = 5
    """timed calls per model; the median is reported"""
    quick: bool = False
    """smoke test: tiny sizes"""
    out_dir: str = "benchmarks/results"
    """folder for the JSON and markdown"""
    out_name: str = ""
    """file name stem (default bench_minibatch, or bench_minibatch_quick with --quick)"""


def timed(fn, *args, repeats: int) -> dict:
    compile_start = time.time()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.time() - compile_start
    jax.block_until_ready(compiled(*args))  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.time(), time.process_time()
        jax.block_until_ready(compiled(*args))
        walls.append(time.time() - wall)
        cpus.append(time.process_time() - cpu)
    return {"compile_s": compile_s, "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


def matmul_peak(n_rows: int, width: int, repeats: int) -> dict:
    """The rate of the matmul shape that dominates the minibatch: [rows, width] @ [width, width]."""
    x, w = jnp.ones((n_rows, width)), jnp.ones((width, width)) / width
    result = timed(lambda x, w: x @ w @ w @ w @ w, x, w, repeats=repeats)  # 4 matmuls per call
    flops = 4 * 2 * n_rows * width * width
    return {**result, "gflop": flops / 1e9, "gflops_wall": flops / 1e9 / result["wall_s"],
            "gflops_per_cpu_s": flops / 1e9 / result["cpu_s"]}  # fmt: skip


def minibatch_gradient(name: str, module, overrides: dict, args: Args) -> dict:
    script_args = module.derive_sizes(module.Args(env_id=args.env_id, **overrides))
    env, env_params = envs_popjax.make(args.env_id)
    env = envs_popjax.EpisodeStatsWrapper(envs_popjax.PreviousActionWrapper(env))
    network, _, _ = module.build_network(script_args, env, env_params)
    obs_size = env.observation_space(env_params).shape[0]
    if module is ppo_s5_popgym:
        carry = module.S5Memory.initialize_carry(args.sequences, module.S5Config.from_args(script_args))
    else:
        carry = module.RNNMemory.initialize_carry(args.sequences, script_args.hidden_size)
    T, B = args.sequence_length, args.sequences
    obs = jax.random.normal(jax.random.key(0), (T, B, obs_size))
    resets = jax.random.uniform(jax.random.key(1), (T, B)) < 0.02  # episode starts inside the sequence
    params = network.init(jax.random.key(2), carry, obs, resets)

    def outputs_sum(params):
        _, policy, value = network.apply(params, carry, obs, resets)
        return policy.sum() + value.sum()

    matrix_elements = sum(p.size for p in jax.tree.leaves(params) if p.ndim >= 2)
    flops = 3 * 2 * matrix_elements * T * B  # forward 2 FLOPs per element per token, backward twice that
    result = timed(jax.grad(outputs_sum), params, repeats=args.repeats)
    return {"model": name, **result, "matrix_params": matrix_elements, "gflop": flops / 1e9,
            "gflops_wall": flops / 1e9 / result["wall_s"], "gflops_per_cpu_s": flops / 1e9 / result["cpu_s"]}  # fmt: skip


def main(args: Args) -> dict:
    if args.quick:
        args.sequence_length, args.sequences, args.width, args.repeats = 32, 2, 16, 2
    machine = machine_info()
    w = args.width
    s5 = dict(d_model=w, ssm_size=w, n_layers=4)
    models = [
        ("s5 sequential", ppo_s5_popgym, dict(s5, s5_scan="sequential")),
        ("s5 parallel", ppo_s5_popgym, dict(s5, s5_scan="parallel")),
        ("s5 no scan", ppo_s5_popgym, dict(s5, s5_scan="none")),
        ("s5 2 layers", ppo_s5_popgym, dict(s5, n_layers=2, s5_scan="sequential")),
        ("lstm", ppo_lstm_popgym, dict(hidden_size=w)),
    ]
    peak = matmul_peak(args.sequence_length * args.sequences, w, args.repeats)
    print(f"matmul [{args.sequence_length * args.sequences}, {w}] @ [{w}, {w}]: {peak['gflops_wall']:.1f} GFLOP/s", flush=True)
    rows = []
    for name, module, overrides in models:
        if overrides.get("s5_scan") == "none":  # price the scan: the recurrence replaced by x = Bu
            saved = module.resettable_sequential_scan
            module.resettable_sequential_scan = lambda lambda_bar, bu, resets, h0: bu
            overrides = dict(overrides, s5_scan="sequential")
        try:
            row = minibatch_gradient(name, module, overrides, args)
        finally:
            if name == "s5 no scan":
                module.resettable_sequential_scan = saved
        row["fraction_of_matmul_peak"] = row["gflops_wall"] / peak["gflops_wall"]
        rows.append(row)
        print(f"{name:>14}: {row['gflop']:.1f} GFLOP, {row['wall_s']:.3f} s wall, {row['cpu_s']:.3f} CPU s, "
              f"{row['gflops_wall']:.1f} GFLOP/s ({row['fraction_of_matmul_peak']:.0%} of peak), compile {row['compile_s']:.1f} s",
              flush=True)  # fmt: skip
    machine["load_average_at_end"] = load_average()
    table = (
        f"One minibatch gradient: {args.sequences} sequences x {args.sequence_length} steps, width {w}.\n"
        f"Matmul peak ([{args.sequence_length * args.sequences}, {w}] @ [{w}, {w}], jit): {peak['gflops_wall']:.1f} GFLOP/s "
        f"({peak['gflops_per_cpu_s']:.1f} GFLOP per CPU second).\n\n"
        "| memory | GFLOP | wall s | CPU s | GFLOP/s | of peak | GFLOP per CPU s | compile s |\n|-|-|-|-|-|-|-|-|\n"
        + "".join(f"| {r['model']} | {r['gflop']:.1f} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | {r['gflops_wall']:.1f} | "
                  f"{r['fraction_of_matmul_peak']:.0%} | {r['gflops_per_cpu_s']:.1f} | {r['compile_s']:.1f} |\n" for r in rows)
        + f"\n{machine_line(machine)}\n"
    )  # fmt: skip
    report = {"machine": machine, "settings": dataclasses.asdict(args), "matmul_peak": peak, "models": rows}
    out = write_results(args.out_dir, args.out_name or ("bench_minibatch_quick" if args.quick else "bench_minibatch"), report, table)
    print(table + f"written to {out}")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
