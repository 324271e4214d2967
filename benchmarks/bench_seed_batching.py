"""Seed batching: env steps/s per seed of ppo_s5_popgym.py and ppo_lstm_popgym.py (LSTM and GRU) for 1, 2, 4 and 8
seeds, with each --seed-batching mode, run alternately.

`vmap` runs a device's seeds as one vmapped program; `loop` runs the one-seed program for each seed in turn (seed i is
then the one-seed run bit for bit). Which is faster depends on the backend, the model and the seed count: XLA's CPU
backend runs the batched matmuls of a vmapped program more slowly than plain ones, while a loop gives up the batching.
This driver measures it the way `bench_end_to_end.py` does (the scripts' own `make_train` and `compile_training`, one
update per call, compile and warm-up excluded from the SPS), for every (seed count, model, mode) cell, in rounds:
every round runs each seed count's models and modes one after the other, so the modes of a cell see the same load.

Run from the repository root, alone on the machine:

    python benchmarks/bench_seed_batching.py --repeats 2                  # quick settings, 1/2/4/8 seeds
    python benchmarks/bench_seed_batching.py --preset paper --seed-counts 1 --repeats 2   # the paper's settings
    python benchmarks/bench_seed_batching.py --quick                      # smoke test

Writes `{out_dir}/{out_name}.json` (machine, settings, every run) and `.md` (per cell: the median env steps/s per seed
of each mode, loop/vmap, compile times); default out_name `bench_seed_batching_{preset}`; `--figure` copies them to
benchmarks/figures/.
"""

import dataclasses
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import jax
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other drivers beside this file
from bench_common import load_average, machine_info, machine_line, write_results, written_files  # noqa: E402
from bench_end_to_end import PRESETS, run_once, script_args  # noqa: E402
import ppo_lstm_popgym  # noqa: E402
import ppo_s5_popgym  # noqa: E402

# model -> (script, its width settings: 0 S5, 1 LSTM of a preset's (S5, LSTM) pair, extra Args)
MODELS = {"S5": (ppo_s5_popgym, 0, {}), "LSTM": (ppo_lstm_popgym, 1, {}), "GRU": (ppo_lstm_popgym, 1, {"cell": "gru"})}


@dataclasses.dataclass
class Args:
    preset: Literal["paper", "quick", "smoke"] = "quick"
    """settings: paper (the scripts' defaults), quick (the README's CPU settings), smoke (CI); as in bench_end_to_end"""
    seed_counts: tuple[int, ...] = (1, 2, 4, 8)
    """numbers of seeds (--num-seeds) to measure"""
    models: tuple[Literal["S5", "LSTM", "GRU"], ...] = ("S5", "LSTM", "GRU")
    """S5: ppo_s5_popgym.py; LSTM and GRU: ppo_lstm_popgym.py (--cell gru), the preset's width"""
    modes: tuple[Literal["vmap", "loop"], ...] = ("vmap", "loop")
    """--seed-batching modes to compare"""
    repeats: int = 2
    """rounds over every cell"""
    updates: int = 0
    """timed PPO updates per run (0: the preset's: paper 1, quick 20, smoke 2)"""
    warmup_updates: int = -1
    """updates run before timing, after compile (-1: the preset's: paper 0, quick 1, smoke 1)"""
    env_id: str = "RepeatPreviousEasy"
    """POPGym env id"""
    seed: int = 1
    """the first seed of every run"""
    also: tuple[str, ...] = ()
    """other programs timed once per round after the scripts, as NAME=COMMAND; the last line a command prints must
    be JSON with "sps" (env steps/s per seed) and "compile_s", e.g. the paper's code run outside this repository"""
    quick: bool = False
    """smoke test: --preset smoke --repeats 1 --seed-counts 2 --models GRU"""
    out_dir: str = "benchmarks/results"
    """folder for the JSON and markdown results"""
    out_name: str = ""
    """file stem of the results; default bench_seed_batching_{preset}"""
    figure: bool = False
    """also copy the JSON and table to benchmarks/figures/{out_name}_{backend}.*"""


def markdown(report: dict) -> str:
    s, cells = report["settings"], report["cells"]
    modes = s["modes"]
    lines = [
        f"Seed batching, {s['env_id']}, preset `{s['preset']}` ({s['num_envs']} envs x {s['num_steps']} steps, "
        f"{s['update_epochs']} epochs x {s['num_minibatches']} minibatches; S5 {s['s5'] or '-'}; LSTM/GRU "
        f"{s['lstm']}); env steps/s per seed over "
        f"{s['updates']} update(s) after {s['warmup_updates']} warm-up, median of {s['repeats']} round(s). "
        f"{machine_line(report['machine'])}",
        "",
        "| seeds | model | " + " | ".join(f"{m} steps/s per seed" for m in modes)
        + (" | loop/vmap" if set(modes) == {"vmap", "loop"} else "")
        + " | " + " | ".join(f"{m} compile (s)" for m in modes) + " |",
        "|---:|---|" + "---:|" * (2 * len(modes) + (set(modes) == {"vmap", "loop"})),
    ]
    for c in [c for c in cells if "other" not in c]:
        row = [str(c["num_seeds"]), c["model"]] + [f"{c[m]['sps']:,.0f}" for m in modes]
        row += [f"{c['loop_over_vmap']:.2f}"] if "loop_over_vmap" in c else []
        row += [f"{c[m]['compile_s']:.1f}" for m in modes]
        lines.append("| " + " | ".join(row) + " |")
    others = [c for c in cells if "other" in c]
    lines += ["", "| other program | command | env steps/s | compile (s) |", "|---|---|---:|---:|"] if others else []
    for c in others:
        lines.append(f"| {c['model']} | `{c['command']}` | {c['other']['sps']:,.0f} | {c['other']['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def write_report(args: Args, script: dict, runs: list, machine: dict, rounds: int, updates: int, warmup: int):
    """Medians per cell over the rounds done so far; writes the JSON and the table; returns them and their path
    without suffix."""
    machine["load_average_at_end"] = load_average()
    cells = []
    for n in args.seed_counts:
        for model in [m for m in MODELS if m in args.models]:
            cell = {"num_seeds": n, "model": model}
            for mode in args.modes:
                mine = [r for r in runs if (r["num_seeds"], r["model"], r["seed_batching"]) == (n, model, mode)]
                cell[mode] = {"sps": statistics.median(r["sps"] for r in mine),
                              "compile_s": statistics.median(r["compile_s"] for r in mine),
                              "sps_per_round": [r["sps"] for r in mine]}  # fmt: skip
            if set(args.modes) == {"vmap", "loop"}:
                cell["loop_over_vmap"] = cell["loop"]["sps"] / cell["vmap"]["sps"]
            cells.append(cell)
    for name, command in (item.split("=", 1) for item in args.also):
        mine = [r for r in runs if r["model"] == name]
        other = {key: statistics.median(r[key] for r in mine) for key in ("sps", "compile_s")}
        other["sps_per_round"] = [r["sps"] for r in mine]
        cells.append({"num_seeds": 1, "model": name, "command": command, "other": other})
    first = dataclasses.asdict(next(iter(script.values())))
    widths_used = {model: dataclasses.asdict(a) for (_, model, _), a in script.items()}
    settings = {
        "preset": args.preset, "env_id": args.env_id, "seed": args.seed, "updates": updates, "warmup_updates": warmup,
        "repeats": rounds, "seed_counts": list(args.seed_counts), "modes": list(args.modes),
        **{k: first[k] for k in ("num_envs", "num_steps", "update_epochs", "num_minibatches", "learning_rate")},
        "s5": {k: widths_used["S5"][k] for k in ("d_model", "n_layers")} if "S5" in widths_used else None,
        "lstm": {"hidden_size": (widths_used.get("LSTM") or widths_used.get("GRU") or {}).get("hidden_size")},
    }  # fmt: skip
    report = {"machine": machine, "args": dataclasses.asdict(args), "settings": settings, "unix_time": time.time(),
              "cells": cells, "runs": runs}  # fmt: skip
    table = markdown(report)
    out_name = args.out_name or f"bench_seed_batching_{args.preset}"
    out = write_results(args.out_dir, out_name, report, table)
    written_files(out, out_name, machine["backend"], args.figure, keep_all=True)
    return report, table, out / out_name


def main(args: Args) -> dict:
    if args.quick:
        args = dataclasses.replace(args, preset="smoke", repeats=1, seed_counts=(2,), models=("GRU",))
    ppo, *widths, preset_updates, preset_warmup = PRESETS[args.preset]
    updates = args.updates or preset_updates
    warmup = preset_warmup if args.warmup_updates < 0 else args.warmup_updates
    if args.repeats < 1 or updates < 1 or min(args.seed_counts) < 1:
        raise SystemExit("--repeats, --updates and --seed-counts must be positive")
    if jax.device_count() > 1 and "loop" in args.modes:
        raise SystemExit(f"--seed-batching loop needs one device; this machine has {jax.device_count()}")
    script = {
        (n, model, mode): script_args(
            module, ppo, widths[width], {**extra, "num_seeds": n, "seed_batching": mode}, args.env_id, args.seed,
            warmup + updates,
        )
        for n in args.seed_counts for model, (module, width, extra) in MODELS.items() if model in args.models
        for mode in args.modes
    }  # fmt: skip
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores, jax {machine['jax']} on {machine['backend']}; "
          f"load {machine['load_average_at_start']}", flush=True)  # fmt: skip

    runs = []
    for round_ in range(1, args.repeats + 1):
        for (n, model, mode), a in script.items():
            result = run_once(MODELS[model][0], a, warmup, updates)
            runs.append({"round": round_, "model": model, **result})
            print(f"round {round_}, {n} seed(s), {model:>4} {mode:>4}: compile {result['compile_s']:.1f} s, "
                  f"{result['sps']:,.0f} env steps/s per seed (load {result['load_average_before']} -> "
                  f"{result['load_average_after']})", flush=True)  # fmt: skip
        for name, command in (item.split("=", 1) for item in args.also):
            load_before = load_average()
            proc = subprocess.run(shlex.split(command), capture_output=True, text=True, check=True)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            runs.append({"round": round_, "model": name, "command": command, "num_seeds": 1, "seed_batching": "-",
                         "sps": result["sps"], "compile_s": result["compile_s"], "output": result,
                         "load_average_before": load_before, "load_average_after": load_average()})  # fmt: skip
            print(f"round {round_}, {name}: compile {result['compile_s']:.1f} s, {result['sps']:,.0f} env steps/s "
                  f"(load {load_before} -> {load_average()})", flush=True)  # fmt: skip
        # written after every round: a benchmark stopped early keeps the rounds it finished
        report, table, path = write_report(args, script, runs, machine, round_, updates, warmup)
    print("\n" + table)
    print(f"wrote {path}.json and .md")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
