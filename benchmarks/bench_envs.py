"""Env-only throughput: envs_popjax (jit + vmap, CPU) beside popgym's own numpy envs.

For each env id, random actions, no policy:
- JAX: a jitted `lax.scan` of N steps of `vmap(env.step)` (gymnax auto-reset included: the
  reset is computed every step and selected where an episode ended) for each vmap width in
  `--num-envs` (default 1, 64, 4096). Compilation is done ahead of time and excluded; each timed
  call ends in `block_until_ready`; the best of `--repeats` runs is kept. Steps/s counts env
  steps (N x envs). N = `--num-steps` at the narrowest width; wider runs take N such that a run
  lasts about `--target-seconds` at the previous width's rate (at least `--min-steps`), so that
  slow envs (the labyrinths generate a maze in every step's reset) stay affordable at 4096 envs.
- popgym: one env stepped in a Python loop (`action_space.sample()`, reset when an episode ends),
  `--popgym-steps` steps, in the same process on the same machine.

Run from the repository root:

    python benchmarks/bench_envs.py                       # every canonical id (about 10 min, 2 cores)
    python benchmarks/bench_envs.py --env-ids RepeatFirstEasy CartPoleHard
    python benchmarks/bench_envs.py --quick               # smoke test: tiny sizes, seconds per id

Writes `{out_dir}/{out_name}.json` (machine, versions, settings, per-id numbers) and
`{out_dir}/{out_name}.md` (the table), and prints the table. `--quick` writes `bench_envs_quick.*`
unless `--out-name` is given, so it never overwrites a full run.
"""

import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import gymnasium
import jax
import jaxlib
import numpy as np
import popgym
import popgym.envs
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # envs_popjax from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common beside this file
import envs_popjax  # noqa: E402
from bench_common import cpu_model  # noqa: E402


@dataclasses.dataclass
class Args:
    env_ids: tuple[str, ...] = ()
    """env ids to benchmark (aliases allowed); empty: every canonical id in envs_popjax.CANONICAL_IDS"""
    num_envs: tuple[int, ...] = (1, 64, 4096)
    """vmap widths to time the JAX envs at"""
    num_steps: int = 1000
    """scan steps per timed JAX run at the narrowest width (at most this many at the others)"""
    target_seconds: float = 0.3
    """wider runs take about this long: their scan length comes from the previous width's rate"""
    min_steps: int = 4
    """fewest scan steps per timed run (slow envs at 4096 envs take longer than the target)"""
    repeats: int = 3
    """timed runs per (env id, width); the fastest is reported"""
    popgym_steps: int = 5000
    """steps of the single popgym env in its Python loop"""
    seed: int = 0
    """seed of the JAX keys, popgym's reset and its action sampling"""
    quick: bool = False
    """smoke test: widths (1, 8), 20 scan steps, 200 popgym steps, 1 repeat"""
    out_dir: str = "benchmarks/results"
    """folder for the JSON and markdown results"""
    out_name: str = ""
    """file stem of the results; default bench_envs (bench_envs_quick with --quick)"""


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "jax_device": str(jax.devices("cpu")[0]),
        "numpy": np.__version__,
        "popgym": getattr(popgym, "__version__", "1.0.7"),
        "gymnasium": gymnasium.__version__,
    }


def jax_steps_per_second(env, params, num_envs: int, num_steps: int, repeats: int, seed: int) -> float:
    """Env steps per second of a jitted scan over vmap(env.step) with random actions."""
    action_space = env.action_space(params)

    def run(key):
        key_reset, key_scan = jax.random.split(key)
        _, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(key_reset, num_envs), params)

        def body(state, key):
            key_action, key_step = jax.random.split(key)
            actions = jax.vmap(action_space.sample)(jax.random.split(key_action, num_envs))
            obs, state, reward, _, _, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                jax.random.split(key_step, num_envs), state, actions, params
            )
            return state, obs.sum() + reward.sum()

        state, checksums = jax.lax.scan(body, state, jax.random.split(key_scan, num_steps))
        # Every step's obs and reward and the final state are outputs: nothing can be optimised
        # away (a cart-pole's constant reward alone would let XLA drop the physics).
        return state, checksums.sum()

    key = jax.random.key(seed)
    compiled = jax.jit(run).lower(key).compile()
    jax.block_until_ready(compiled(key))  # warm-up (allocations), not timed
    best = float("inf")
    for i in range(repeats):
        key_i = jax.random.fold_in(key, i + 1)
        start = time.perf_counter()
        jax.block_until_ready(compiled(key_i))
        best = min(best, time.perf_counter() - start)
    return num_envs * num_steps / best


def popgym_steps_per_second(env_id: str, num_steps: int, seed: int) -> float | None:
    """Steps per second of popgym's own env (same class name) in a single-env Python loop."""
    env_class = getattr(popgym.envs, env_id, None)
    if env_class is None:
        return None
    env = env_class()
    env.reset(seed=seed)
    env.action_space.seed(seed)
    start = time.perf_counter()
    for _ in range(num_steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    return num_steps / (time.perf_counter() - start)


def fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def markdown(results: list[dict], widths: tuple[int, ...], machine: dict, args: Args) -> str:
    lines = [
        f"Env steps/s, random actions. Machine: {machine['cpu']}, {machine['cores']} cores "
        f"({machine['cores_usable']} usable), load average at start {machine['load_average_at_start']}; "
        f"jax {machine['jax']} (CPU), popgym {machine['popgym']}, numpy {machine['numpy']}. "
        f"JAX: jit(lax.scan(vmap(step))), compile excluded, best of {args.repeats}; popgym: one env, Python loop.",
        "",
        "| env id | " + " | ".join(f"JAX x{n}" for n in widths) + " | popgym (1 env) | JAX widest / popgym |",
        "|---|" + "---:|" * (len(widths) + 2),
    ]
    for r in results:
        jax_cols = [fmt(r["jax_steps_per_s"][str(n)]) for n in widths]
        ratio = r["speedup_widest_vs_popgym"]
        lines.append(
            f"| {r['env_id']} | " + " | ".join(jax_cols) + f" | {fmt(r['popgym_steps_per_s'])} | "
            + (f"{ratio:.3g}x" if ratio is not None else "n/a") + " |"
        )
    return "\n".join(lines) + "\n"


def main(args: Args) -> dict:
    if args.quick:
        args = dataclasses.replace(args, num_envs=(1, 8), num_steps=20, popgym_steps=200, repeats=1)
    if min(args.num_envs, default=0) < 1 or min(args.num_steps, args.min_steps, args.repeats, args.popgym_steps) < 1:
        raise SystemExit("--num-envs, --num-steps, --min-steps, --repeats and --popgym-steps must be positive")
    args = dataclasses.replace(args, num_envs=tuple(sorted(args.num_envs)))
    try:
        env_ids = [envs_popjax.canonical_id(i) for i in args.env_ids] or list(envs_popjax.CANONICAL_IDS)
    except ValueError as error:  # names the closest valid ids
        raise SystemExit(f"--env-ids: {error}") from None
    out_name = args.out_name or ("bench_envs_quick" if args.quick else "bench_envs")
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores, jax {machine['jax']}; {len(env_ids)} env ids", flush=True)

    results = []
    with jax.default_device(jax.devices("cpu")[0]):
        for env_id in env_ids:
            env, params = envs_popjax.make(env_id)
            per_width = {}
            for n in args.num_envs:
                steps = args.num_steps
                if per_width:  # the previous (narrower) width's rate is a lower bound for this one
                    rate = list(per_width.values())[-1]
                    steps = int(np.clip(args.target_seconds * rate / n, args.min_steps, args.num_steps))
                per_width[str(n)] = jax_steps_per_second(env, params, n, steps, args.repeats, args.seed)
            ref = popgym_steps_per_second(env_id, args.popgym_steps, args.seed)
            widest = per_width[str(max(args.num_envs))]
            results.append(
                {
                    "env_id": env_id,
                    "jax_steps_per_s": per_width,
                    "popgym_steps_per_s": ref,
                    "speedup_widest_vs_popgym": widest / ref if ref else None,
                }
            )
            print(f"{env_id}: " + ", ".join(f"x{n} {fmt(v)}" for n, v in per_width.items()) + f", popgym {fmt(ref)}", flush=True)

    table = markdown(results, args.num_envs, machine, args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "args": dataclasses.asdict(args), "unix_time": time.time(), "results": results}
    (out_dir / f"{out_name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{out_name}.md").write_text(table)
    print("\n" + table)
    print(f"wrote {out_dir / out_name}.json and .md")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
