"""End to end: ppo_s5_popgym.py against ppo_lstm_popgym.py at the same settings, run alternately.

Both scripts are imported as modules and driven the way their `main` drives them: Args with the
same PPO settings, `derive_sizes`, `make_train`, then the script's `compile_training` (initialiser
over one seed and `update_chunk` compiled ahead of time; one update per call). Per run:
- `compile_s`: after `make_train`, until the parameters are initialised and the update program is
  compiled, through the script's own `compile_training` (what its main prints as "compiled in");
- `first_update_ready_s`: compile_s plus the first (untimed for SPS) update's execution;
- `sps`: env steps per second over the next `--updates` updates, each call ending in
  `block_until_ready` (steady state: compile and warm-up excluded).
Runs alternate S5, LSTM, S5, LSTM, ... for `--repeats` rounds, so both see the same machine load;
every run compiles afresh (no persistent compilation cache). Medians and the S5/LSTM ratio of the
medians are reported, with the load average (1/5/15 min) before and after every run.

Presets (PPO settings identical for both models; `--s5 FIELD=VALUE` / `--lstm FIELD=VALUE` override):
- `paper`: the scripts' defaults (64 envs x 1024 steps, 30 epochs x 8 minibatches, S5 d_model 256,
  SSM 256, 4 layers; LSTM hidden 256); 1 timed update after no warm-up update (one update is
  minutes on a CPU, so its first-call overhead is negligible);
- `quick`: the README's quick CPU settings (`--num-envs 32 --num-steps 128 --update-epochs 4
  --num-minibatches 4 --learning-rate 3e-4`; S5 `--d-model 64 --ssm-size 64 --n-layers 2`, LSTM
  `--hidden-size 64`); 1 warm-up + 20 timed updates;
- `smoke`: tiny sizes for CI (`--quick` = `--preset smoke --repeats 1`).

Run from the repository root:

    python benchmarks/bench_end_to_end.py --preset quick --repeats 3     # about 5 min on 2 cores
    python benchmarks/bench_end_to_end.py --preset paper --repeats 2     # tens of minutes on a CPU
    python benchmarks/bench_end_to_end.py --quick                        # smoke test

Writes `{out_dir}/{out_name}.json` (machine, settings, every run) and `{out_name}.md` (tables);
default out_name `bench_end_to_end_{preset}`.
"""

import dataclasses
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common beside this file
from bench_common import (  # noqa: E402
    QUICK_LSTM,
    QUICK_PPO,
    QUICK_S5,
    SMOKE_LSTM,
    SMOKE_PPO,
    SMOKE_S5,
    load_average,
    machine_info,
    machine_line,
    parse_overrides,
    write_results,
)
import ppo_lstm_popgym  # noqa: E402
import ppo_s5_popgym  # noqa: E402

MODELS = {"S5": ppo_s5_popgym, "LSTM": ppo_lstm_popgym}
# preset -> (PPO settings, S5 settings, LSTM settings, timed updates, warm-up updates)
PRESETS = {
    "paper": ({}, {}, {}, 1, 0),
    "quick": (QUICK_PPO, QUICK_S5, QUICK_LSTM, 20, 1),
    "smoke": (SMOKE_PPO, SMOKE_S5, SMOKE_LSTM, 2, 1),
}


@dataclasses.dataclass
class Args:
    preset: Literal["paper", "quick", "smoke"] = "quick"
    """settings: paper (the scripts' defaults), quick (the README's CPU settings), smoke (CI)"""
    repeats: int = 3
    """rounds of (S5 run, LSTM run)"""
    updates: int = 0
    """timed PPO updates per run (0: the preset's: paper 1, quick 20, smoke 2)"""
    warmup_updates: int = -1
    """updates run before timing, after compile (-1: the preset's: paper 0, quick 1, smoke 1)"""
    env_id: str = "RepeatPreviousEasy"
    """POPGym env id for both models"""
    seed: int = 1
    """the one seed of every run"""
    s5: tuple[str, ...] = ()
    """extra ppo_s5_popgym Args as FIELD=VALUE, e.g. s5_scan=sequential"""
    lstm: tuple[str, ...] = ()
    """extra ppo_lstm_popgym Args as FIELD=VALUE, e.g. cell=gru"""
    quick: bool = False
    """smoke test: --preset smoke --repeats 1"""
    out_dir: str = "benchmarks/results"
    """folder for the JSON and markdown results"""
    out_name: str = ""
    """file stem of the results; default bench_end_to_end_{preset}"""


def script_args(module, preset_ppo: dict, preset_model: dict, overrides: dict, env_id: str, seed: int, n_updates: int):
    """The module's Args at the preset's settings, with a budget of exactly n_updates updates."""
    a = module.Args(env_id=env_id, seed=seed, **{"num_seeds": 1, **preset_ppo, **preset_model, **overrides})
    a.total_timesteps = a.num_envs * a.num_steps * n_updates
    error = module.check_args(a)
    if error:
        raise SystemExit(f"{module.__name__}: {error}")
    return module.derive_sizes(a)


def compile_one_update(module, init, update_chunk, keys, seed_batching: str = "vmap"):
    """(runner state, compiled one-update program) the way the script's main builds them: its
    `compile_training` where it has one (initialiser and chunk programs compiled concurrently)."""
    if hasattr(module, "compile_training"):
        sharding = module.seed_sharding(len(keys))
        runner, compiled = module.compile_training(init, update_chunk, keys, sharding, {1}, seed_batching)
        return runner, compiled[1]
    runner = jax.jit(jax.vmap(init))(keys)
    return runner, jax.jit(jax.vmap(partial(update_chunk, num_updates=1))).lower(runner).compile()


def run_once(module, a, warmup_updates: int, updates: int) -> dict:
    """Compile and run one model; returns compile time, per-update times and steady-state SPS."""
    load_before = load_average()
    start = time.perf_counter()
    init, update_chunk = module.make_train(a)
    make_train_s = time.perf_counter() - start
    start = time.perf_counter()  # from here on as the script's main counts "compiled in"
    keys = jax.vmap(jax.random.key)(jnp.arange(a.seed, a.seed + a.num_seeds))
    runner, step = compile_one_update(module, init, update_chunk, keys, a.seed_batching)
    runner = jax.block_until_ready(runner)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(warmup_updates + updates):
        t = time.perf_counter()
        runner, metrics = step(runner)
        jax.block_until_ready((runner, metrics))
        times.append(time.perf_counter() - t)
    timed = times[warmup_updates:]
    params = getattr(getattr(runner, "train_state", None), "params", None)
    n_params = sum(p.size for p in jax.tree.leaves(params)) if params is not None else None
    last_return = float(metrics["episodic_return"][0, -1])
    return {
        "make_train_s": make_train_s,
        "compile_s": compile_s,
        "first_update_ready_s": compile_s + times[0],
        "used_compile_training": hasattr(module, "compile_training"),
        "update_times_s": times,
        "warmup_updates": warmup_updates,
        "sps": updates * a.batch_size / sum(timed),  # per seed
        "num_seeds": a.num_seeds,
        "seed_batching": a.seed_batching,
        "n_params": None if n_params is None else int(n_params),
        "episodic_return_last": None if last_return != last_return else last_return,  # NaN: no episode ended
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def markdown(report: dict) -> str:
    s = report["settings"]
    runs, summary = report["runs"], report["summary"]
    lines = [
        f"End to end, {s['env_id']}, preset `{s['preset']}` ({s['num_envs']} envs x {s['num_steps']} steps, "
        f"{s['update_epochs']} epochs x {s['num_minibatches']} minibatches; S5 d_model {s['s5']['d_model']}, "
        f"SSM {s['s5']['ssm_size']}, {s['s5']['n_layers']} layers, scan {s['s5'].get('s5_scan')}; LSTM hidden "
        f"{s['lstm']['hidden_size']}); SPS = env steps/s per seed over {s['updates']} update(s) after "
        f"{s['warmup_updates']} warm-up; runs alternate. {machine_line(report['machine'])}",
        "",
        "| round | model | seeds | batching | compile (s) | first update ready (s) | env steps/s per seed "
        "| load before | load after |",
        "|---:|---|---:|---|---:|---:|---:|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['round']} | {r['model']} | {r['num_seeds']} | {r['seed_batching']} | {r['compile_s']:.1f} | "
            f"{r['first_update_ready_s']:.1f} | {r['sps']:,.0f} | "
            f"{r['load_average_before'][0] if r['load_average_before'] else '?'} | "
            f"{r['load_average_after'][0] if r['load_average_after'] else '?'} |"
        )
    lines += [
        "",
        "| median | S5 | LSTM | S5/LSTM |",
        "|---|---:|---:|---:|",
        f"| compile (s) | {summary['S5']['compile_s']:.1f} | {summary['LSTM']['compile_s']:.1f} | "
        f"{summary['ratio_compile']:.2f} |",
        f"| env steps/s | {summary['S5']['sps']:,.0f} | {summary['LSTM']['sps']:,.0f} | {summary['ratio_sps']:.2f}x |",
        f"| parameters | {summary['S5']['n_params'] or '?':,} | {summary['LSTM']['n_params'] or '?':,} | |",
    ]
    return "\n".join(lines) + "\n"


def main(args: Args) -> dict:
    if args.quick:
        args = dataclasses.replace(args, preset="smoke", repeats=1)
    ppo, s5_preset, lstm_preset, preset_updates, preset_warmup = PRESETS[args.preset]
    updates = args.updates or preset_updates
    warmup = preset_warmup if args.warmup_updates < 0 else args.warmup_updates
    if args.repeats < 1 or updates < 1:
        raise SystemExit("--repeats and --updates must be positive")
    overrides = {"S5": parse_overrides(ppo_s5_popgym.Args, args.s5), "LSTM": parse_overrides(ppo_lstm_popgym.Args, args.lstm)}
    model_presets = {"S5": s5_preset, "LSTM": lstm_preset}
    script = {
        name: script_args(module, ppo, model_presets[name], overrides[name], args.env_id, args.seed, warmup + updates)
        for name, module in MODELS.items()
    }
    out_name = args.out_name or f"bench_end_to_end_{args.preset}"
    machine = machine_info()
    machine["jax_compilation_cache_dir"] = jax.config.jax_compilation_cache_dir
    print(f"{machine['cpu']}, {machine['cores']} cores, jax {machine['jax']} on {machine['backend']}; "
          f"load {machine['load_average_at_start']}", flush=True)  # fmt: skip

    runs = []
    for round_ in range(1, args.repeats + 1):
        for name, module in MODELS.items():
            result = run_once(module, script[name], warmup, updates)
            runs.append({"round": round_, "model": name, **result})
            print(f"round {round_} {name:>4}: compile {result['compile_s']:.1f} s, first update ready "
                  f"{result['first_update_ready_s']:.1f} s, {result['sps']:,.0f} env steps/s "
                  f"(load {result['load_average_before']} -> {result['load_average_after']})", flush=True)  # fmt: skip
    machine["load_average_at_end"] = load_average()

    summary = {}
    for name in MODELS:
        mine = [r for r in runs if r["model"] == name]
        summary[name] = {
            "compile_s": statistics.median(r["compile_s"] for r in mine),
            "first_update_ready_s": statistics.median(r["first_update_ready_s"] for r in mine),
            "sps": statistics.median(r["sps"] for r in mine),
            "n_params": mine[0]["n_params"],
        }
    summary["ratio_sps"] = summary["S5"]["sps"] / summary["LSTM"]["sps"]
    summary["ratio_compile"] = summary["S5"]["compile_s"] / summary["LSTM"]["compile_s"]
    summary["ratio_sps_per_round"] = [
        s["sps"] / l["sps"] for s, l in zip(runs[0::2], runs[1::2], strict=True)  # noqa: E741
    ]
    s5_args, lstm_args = dataclasses.asdict(script["S5"]), dataclasses.asdict(script["LSTM"])
    settings = {
        "preset": args.preset, "env_id": args.env_id, "seed": args.seed, "updates": updates, "warmup_updates": warmup,
        **{k: s5_args[k] for k in ("num_envs", "num_steps", "update_epochs", "num_minibatches", "learning_rate")},
        "s5": {k: s5_args[k] for k in ("d_model", "ssm_size", "n_layers", "s5_scan") if k in s5_args},
        "lstm": {k: lstm_args[k] for k in ("hidden_size", "cell")},
    }  # fmt: skip
    report = {
        "machine": machine, "args": dataclasses.asdict(args), "settings": settings, "unix_time": time.time(),
        "script_args": {"S5": s5_args, "LSTM": lstm_args}, "runs": runs, "summary": summary,
    }  # fmt: skip
    table = markdown(report)
    out = write_results(args.out_dir, out_name, report, table)
    print("\n" + table)
    print(f"wrote {out / out_name}.json and .md")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
