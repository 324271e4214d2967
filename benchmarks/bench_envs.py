"""Env-only throughput: envs_popjax's batched `make_vec` envs (jit, CPU) beside gymnax's auto-reset
path and popgym's own numpy envs.

For each env id, random actions, no policy:
- make_vec: a jitted `lax.scan` of N steps of `vec_env.step` (auto-reset included: a reset is
  computed only for the envs whose episode ended) for each width in `--num-envs` (default 1, 64,
  4096). N = `--num-steps` at the narrowest width; wider runs take N such that a run lasts about
  `--target-seconds` at the previous width's rate (at least `--min-steps`), and, with
  `--cover-horizon` (default), at least the env's horizon `max_steps_in_episode`, so that every env
  ends an episode inside the timed run (card games end in lockstep, all envs on the same step).
- gymnax (the old path, `--gymnax-widths`, default the widest width): the same scan over
  `vmap(env.step)`, whose auto-reset computes a reset for every env on every step and selects it
  where an episode ended. Its N comes from `--target-seconds` only (it is too slow for a horizon).
  Measured right after the make_vec run of the same id, so the two see about the same load.
- Both: the initial reset is done before the timed run (not timed); compilation is done ahead of
  time and excluded; each timed call ends in `block_until_ready`; the best of `--repeats` is kept.
  Steps/s counts env steps (N x envs). The 1-minute load average is recorded for every id.
- popgym: one env stepped in a Python loop (`action_space.sample()`, reset when an episode ends),
  `--popgym-steps` steps, in the same process on the same machine.

Run from the repository root:

    python benchmarks/bench_envs.py                       # every canonical id (about 15 min, 2 cores)
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
    """make_vec widths (number of batched envs) to time"""
    gymnax_widths: tuple[int, ...] = (4096,)
    """widths at which to time the old path, vmap(env.step) with gymnax's auto-reset (empty: none)"""
    cover_horizon: bool = True
    """make_vec runs last at least the env's horizon, so that every env's episode ends in the timing"""
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
    """smoke test: widths (1, 8), gymnax at 8, 20 scan steps, no horizon cover, 200 popgym steps, 1 repeat"""
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


def jax_steps_per_second(env_id: str, num_envs: int, num_steps: int, repeats: int, seed: int, gymnax: bool):
    """Env steps per second of a jitted scan of `num_steps` batched steps with random actions:
    through `make_vec`, or (`gymnax`) through vmap(env.step) with gymnax's auto-reset."""
    vec_env, params = envs_popjax.make_vec(env_id, num_envs)
    env, action_space = vec_env.env, vec_env.action_space(params)
    if gymnax:
        reset = lambda key: jax.vmap(env.reset, (0, None))(jax.random.split(key, num_envs), params)  # noqa: E731
        step = lambda key, state, actions: jax.vmap(env.step, (0, 0, 0, None))(  # noqa: E731
            jax.random.split(key, num_envs), state, actions, params
        )
    else:
        reset = lambda key: vec_env.reset(key, params)  # noqa: E731
        step = lambda key, state, actions: vec_env.step(key, state, actions, params)  # noqa: E731

    def run(state, key):
        def body(state, key):
            key_action, key_step = jax.random.split(key)
            actions = jax.vmap(action_space.sample)(jax.random.split(key_action, num_envs))
            obs, state, reward, _, _, _ = step(key_step, state, actions)
            return state, obs.sum() + reward.sum()

        state, checksums = jax.lax.scan(body, state, jax.random.split(key, num_steps))
        # Every step's obs and reward and the final state are outputs: nothing can be optimised
        # away (a cart-pole's constant reward alone would let XLA drop the physics).
        return state, checksums.sum()

    key = jax.random.key(seed)
    _, state = jax.jit(reset)(key)  # the initial reset is not timed
    compiled = jax.jit(run).lower(state, key).compile()
    jax.block_until_ready(compiled(state, key))  # warm-up (allocations), not timed
    best = float("inf")
    for i in range(repeats):
        key_i = jax.random.fold_in(key, i + 1)
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, key_i))
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


def markdown(results: list[dict], widths: tuple[int, ...], gymnax_widths: tuple[int, ...], machine: dict, args) -> str:
    widest = max(widths)
    lines = [
        f"Env steps/s, random actions. Machine: {machine['cpu']}, {machine['cores']} cores "
        f"({machine['cores_usable']} usable), load average at start {machine['load_average_at_start']}; "
        f"jax {machine['jax']} (CPU), popgym {machine['popgym']}, numpy {machine['numpy']}. "
        f"make_vec: jit(lax.scan(vec_env.step)); gymnax: jit(lax.scan(vmap(env.step))); initial reset and "
        f"compile excluded, best of {args.repeats}; popgym: one env, Python loop; load: 1-minute load average.",
        "",
        "| env id | " + " | ".join(f"make_vec x{n}" for n in widths) + " | "
        + "".join(f"gymnax x{n} | " for n in gymnax_widths)
        + f"popgym (1 env) | make_vec x{widest} / popgym | "
        + "".join(f"make_vec / gymnax x{n} | " for n in gymnax_widths) + "load |",
        "|---|" + "---:|" * (len(widths) + 2 * len(gymnax_widths) + 3),
    ]
    ratio = lambda x: f"{x:.3g}x" if x is not None else "n/a"  # noqa: E731
    for r in results:
        lines.append(
            f"| {r['env_id']} | " + " | ".join(fmt(r["jax_steps_per_s"][str(n)]) for n in widths) + " | "
            + "".join(f"{fmt(r['gymnax_steps_per_s'][str(n)])} | " for n in gymnax_widths)
            + f"{fmt(r['popgym_steps_per_s'])} | {ratio(r['speedup_widest_vs_popgym'])} | "
            + "".join(f"{ratio(r['speedup_vs_gymnax'][str(n)])} | " for n in gymnax_widths)
            + f"{r['load_average']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(args: Args) -> dict:
    if args.quick:
        args = dataclasses.replace(args, num_envs=(1, 8), gymnax_widths=(8,), num_steps=20, popgym_steps=200,
                                   repeats=1, cover_horizon=False)  # fmt: skip
    if min(args.num_envs + args.gymnax_widths, default=0) < 1 or min(
        args.num_steps, args.min_steps, args.repeats, args.popgym_steps
    ) < 1:
        raise SystemExit(
            "--num-envs, --gymnax-widths, --num-steps, --min-steps, --repeats and --popgym-steps must be positive"
        )
    args = dataclasses.replace(args, num_envs=tuple(sorted(args.num_envs)))
    try:
        env_ids = [envs_popjax.canonical_id(i) for i in args.env_ids] or list(envs_popjax.CANONICAL_IDS)
    except ValueError as error:  # names the closest valid ids
        raise SystemExit(f"--env-ids: {error}") from None
    out_name = args.out_name or ("bench_envs_quick" if args.quick else "bench_envs")
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores, jax {machine['jax']}; {len(env_ids)} env ids", flush=True)

    def num_steps(rate: float | None, n: int, horizon: int = 0) -> int:
        """Scan steps at width n: `--num-steps` without a previous rate, else about `--target-seconds`
        at that rate (within [--min-steps, --num-steps]), and at least `horizon`."""
        if rate is None:
            return max(args.num_steps, horizon)
        return max(int(np.clip(args.target_seconds * rate / n, args.min_steps, args.num_steps)), horizon)

    results = []
    with jax.default_device(jax.devices("cpu")[0]):
        for env_id in env_ids:
            horizon = int(envs_popjax.make(env_id)[1].max_steps_in_episode) if args.cover_horizon else 0
            per_width, rate = {}, None
            for n in args.num_envs:  # each width's rate is a lower bound for the next, wider one
                rate = per_width[str(n)] = jax_steps_per_second(
                    env_id, n, num_steps(rate, n, horizon), args.repeats, args.seed, gymnax=False
                )
            gymnax = {}
            for n in args.gymnax_widths:  # the old path can be very slow: probe with --min-steps first
                gymnax[str(n)] = jax_steps_per_second(env_id, n, args.min_steps, args.repeats, args.seed, gymnax=True)
                if num_steps(gymnax[str(n)], n) > args.min_steps:
                    steps = num_steps(gymnax[str(n)], n)
                    gymnax[str(n)] = jax_steps_per_second(env_id, n, steps, args.repeats, args.seed, gymnax=True)
            ref = popgym_steps_per_second(env_id, args.popgym_steps, args.seed)
            widest = per_width[str(max(args.num_envs))]
            results.append(
                {
                    "env_id": env_id,
                    "jax_steps_per_s": per_width,
                    "gymnax_steps_per_s": gymnax,
                    "popgym_steps_per_s": ref,
                    "speedup_widest_vs_popgym": widest / ref if ref else None,
                    "speedup_vs_gymnax": {k: per_width[k] / v if k in per_width else None for k, v in gymnax.items()},
                    "load_average": os.getloadavg()[0],
                }
            )
            print(f"{env_id}: make_vec " + ", ".join(f"x{n} {fmt(v)}" for n, v in per_width.items())
                  + "; gymnax " + ", ".join(f"x{n} {fmt(v)}" for n, v in gymnax.items())
                  + f"; popgym {fmt(ref)}; load {results[-1]['load_average']:.1f}", flush=True)  # fmt: skip
            table = markdown(results, args.num_envs, args.gymnax_widths, machine, args)
            report = dict(machine=machine, args=dataclasses.asdict(args), unix_time=time.time(), results=results)
            out_dir = Path(args.out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{out_name}.json").write_text(json.dumps(report, indent=2) + "\n")  # after every id
            (out_dir / f"{out_name}.md").write_text(table)

    print("\n" + table)
    print(f"wrote {out_dir / out_name}.json and .md")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
