"""bsuite's memory-length task: S5 against the LSTM, success against memory length L, one command.

Each cell (L, memory) is one call of a script's own `main(args)` with all seeds vmapped, into its
own folder `{out_dir}/{out_name}_runs/L{L}__{memory}/`; a finished cell is read back from there,
an interrupted one is run again. S5: ppo_s5_memory.py with `--memory-lengths L` (its own defaults:
16 envs, lr 1e-3 annealed, 4 epochs x 4 minibatches, GAE lambda 0.95, entropy 0.01, width 32).
LSTM: ppo_lstm_popgym.py on `MemoryChain-L` with the same PPO settings, seeds and budget, hidden
size = the S5 width, and the same rollout, `ppo_s5_memory.rollout_length(args, L)`. Lengths run in
ascending order; the sweep stops once both memories have solved no seed at `--stop-after`
consecutive lengths (0: run every length).

    python benchmarks/bench_memory_length.py --figure                          # lengths 1 .. 512, 4 seeds
    python benchmarks/bench_memory_length.py --memory-lengths 64 128 --total-timesteps 2000000
    python benchmarks/bench_memory_length.py --quick                           # smoke test

Success, as ppo_s5_memory.py defines it: the share of episodes answered right over the last 10%
(`success_window`) of updates; solved: success >= 0.9 (`solve_threshold`) on at least 100 such
episodes. The S5 numbers are the script's own summary. The LSTM's are computed the same way from
its TensorBoard returns (`charts/episodic_return`, the mean return of the episodes completed in an
update; return = 2 x success - 1): every update of a rollout that is a multiple of L + 1 completes
the same number of episodes (num_envs x rollout / (L + 1); MemoryChain episodes last exactly
L + 1 steps and all envs start together), so the mean over updates is the share over episodes.
Steps/s: env steps of all seeds per second of training (compile excluded), as the scripts report.

Writes `{out_dir}/{out_name}.json`, `.md` (the table) and `.png` (success against L for both
memories; steps/s against L) after every cell; `--figure` copies them to
`benchmarks/figures/{out_name}_{backend}.*`; `--previous JSON` takes finished cells from such a copy.
"""

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common beside this file
from bench_common import (  # noqa: E402
    cell_result,
    load_average,
    load_range,
    machine_info,
    machine_line,
    parse_overrides,
    read_curves,
    write_results,
    written_files,
)
import ppo_lstm_popgym  # noqa: E402
import ppo_s5_memory  # noqa: E402

MODELS = ("S5", "LSTM")
DEFAULT_LENGTHS = (1, 2, 4, 8, 16, 32, 64, 100, 128, 256, 512)
# the PPO fields the LSTM takes from the S5 memory script's Args (its own defaults are the paper's POPGym ones)
SHARED = ("learning_rate", "num_envs", "anneal_lr", "gamma", "gae_lambda", "num_minibatches", "update_epochs",
          "norm_adv", "clip_coef", "clip_vloss", "ent_coef", "vf_coef", "max_grad_norm")  # fmt: skip


@dataclasses.dataclass
class Args:
    memory_lengths: tuple[int, ...] = DEFAULT_LENGTHS
    """memory lengths L, run in ascending order (bsuite's own list: ppo_s5_memory.BSUITE_MEMORY_LENGTHS)"""
    models: tuple[str, ...] = MODELS
    """S5 (ppo_s5_memory.py), LSTM (ppo_lstm_popgym.py on MemoryChain-L)"""
    total_timesteps: int = 1_000_000
    """env steps per (length, seed), both memories"""
    num_seeds: int = 4
    """seeds per cell, vmapped in one run"""
    seed: int = 1
    """first seed; seeds are seed, seed + 1, ..."""
    stop_after: int = 1
    """stop once both memories solved no seed at this many consecutive lengths (0: never stop early)"""
    s5: tuple[str, ...] = ()
    """ppo_s5_memory Args as FIELD=VALUE (PPO fields among them also go to the LSTM), e.g. num_envs=32"""
    lstm: tuple[str, ...] = ()
    """extra ppo_lstm_popgym Args as FIELD=VALUE, e.g. cell=gru"""
    previous: tuple[str, ...] = ()
    """earlier reports of this script (e.g. the copy in benchmarks/figures) to take finished cells from"""
    quick: bool = False
    """smoke test: length 3, 2 seeds, tiny networks, 8 updates"""
    figure: bool = False
    """also copy the PNG, table and JSON to benchmarks/figures/{out_name}_{backend}.*"""
    out_dir: str = "benchmarks/results"
    """folder for the JSON, markdown and PNG results and the run folders"""
    out_name: str = ""
    """file stem of the results; default bench_memory_length (bench_memory_length_quick with --quick)"""


def cell_args(args: Args, length: int) -> dict:
    """{memory: the script's Args} for one length: the LSTM gets the S5 script's PPO settings,
    width, rollout and updates per jitted chunk (equal per-chunk overhead)."""
    s5 = ppo_s5_memory.Args(memory_lengths=(length,), seed=args.seed, num_seeds=args.num_seeds,
                            total_timesteps=args.total_timesteps, **parse_overrides(ppo_s5_memory.Args, args.s5))  # fmt: skip
    lstm = ppo_lstm_popgym.Args(
        env_id=f"MemoryChain-{length}", seed=args.seed, num_seeds=args.num_seeds, total_timesteps=args.total_timesteps,
        num_steps=ppo_s5_memory.rollout_length(s5, length), hidden_size=s5.d_model, updates_per_chunk=s5.updates_per_chunk
        or ppo_s5_memory.default_chunk(args.total_timesteps // (s5.num_envs * ppo_s5_memory.rollout_length(s5, length))),
        **{k: getattr(s5, k) for k in SHARED}, **parse_overrides(ppo_lstm_popgym.Args, args.lstm),
    )  # fmt: skip
    return {"S5": s5, "LSTM": lstm}


def num_updates(a) -> int:
    rollout = a.num_steps if isinstance(a, ppo_lstm_popgym.Args) else ppo_s5_memory.rollout_length(a, a.memory_lengths[0])
    return a.total_timesteps // (a.num_envs * rollout)


def complete_for(a):
    """Whether a summary covers every update of every seed (an interrupted run has fewer)."""
    if isinstance(a, ppo_lstm_popgym.Args):
        return lambda summary: summary.get("updates") == num_updates(a)
    return lambda summary: len(summary.get("per_run", {})) == a.num_seeds and all(
        r["updates"] == num_updates(a) for r in summary["per_run"].values())  # fmt: skip


def s5_result(summary: dict, length: int) -> dict:
    runs = sorted((r for r in summary["per_run"].values() if r["memory_length"] == length), key=lambda r: r["seed"])
    return {"success": [r["final_success_rate"] for r in runs], "solved": [r["solved"] for r in runs],
            "final_episodes": [r["final_episodes"] for r in runs]}  # fmt: skip


def lstm_result(a, s5: ppo_s5_memory.Args, run_dir: Path) -> dict:
    """Final success per seed from the LSTM run's TensorBoard returns, by the S5 script's rule."""
    length = int(a.env_id.rsplit("-", 1)[1])
    n = num_updates(a)
    recent = math.ceil(s5.success_window * n)  # the last `recent` updates
    first_step = (n - recent) * a.num_envs * a.num_steps  # updates are logged at their end step
    episodes = recent * a.num_envs * (a.num_steps // (length + 1))  # whole episodes per update (see docstring)
    out = {"success": [], "solved": [], "final_episodes": []}
    for seed, (steps, returns) in read_curves(run_dir, [a.seed + i for i in range(a.num_seeds)]).items():
        final = [(r + 1) / 2 for x, r in zip(steps, returns) if x > first_step]
        rate = float(np.mean(final)) if final else None
        out["success"].append(rate)
        out["solved"].append(bool(rate is not None and episodes >= ppo_s5_memory.MIN_VERDICT_EPISODES and rate >= s5.solve_threshold))
        out["final_episodes"].append(episodes if final else 0)
    return out


def fmt_rates(rates) -> str:
    return " ".join("-" if r is None else f"{r:.3f}" for r in rates)


def largest_solved(report: dict, model: str) -> int | None:
    """The largest length every seed of `model` solved."""
    return max((int(L) for L, row in report["results"].items() if model in row and all(row[model]["solved"])), default=None)


def markdown(report: dict) -> str:
    s, models = report["settings"], report["args"]["models"]
    lines = [
        f"bsuite MemoryChain, {s['total_timesteps']:,} env steps per (length, seed), seeds {s['seeds'][0]}-{s['seeds'][-1]}; "
        f"{s['num_envs']} envs, rollout = ppo_s5_memory.rollout_length, lr {s['learning_rate']}, {s['update_epochs']} epochs x "
        f"{s['num_minibatches']} minibatches; S5 {s['s5']['n_layers']} layers of {s['s5']['d_model']} (SSM {s['s5']['ssm_size']}), "
        f"LSTM {s['lstm_hidden_size']}. Success: share of episodes answered right over the last "
        f"{s['success_window']:.0%} of updates; solved: >= {s['solve_threshold']}.",
        "",
        "| L | rollout | " + " | ".join(f"{m} success per seed | {m} solved" for m in models) + " | "
        + " | ".join(f"{m} steps/s" for m in models) + " |",
        "|-:|-:|" + "-|-|" * len(models) + "-:|" * len(models),
    ]  # fmt: skip
    for length, row in report["results"].items():
        cells = [(fmt_rates(row[m]["success"]), f"{sum(row[m]['solved'])}/{len(row[m]['solved'])}") if m in row else ("-", "-")
                 for m in models]  # fmt: skip
        sps = [f"{row[m]['sps']:,.0f}" if m in row and row[m].get("sps") else "-" for m in models]
        lines.append(f"| {length} | {row['rollout']} | " + " | ".join(" | ".join(c) for c in cells) + " | " + " | ".join(sps) + " |")
    sps = report["sps_overall"]
    lines += ["", "Largest length solved on all seeds: " + ", ".join(f"{m} {largest_solved(report, m)}" for m in models) + ". "
              "Env steps/s over all lengths (all seeds, compile excluded): "
              + ", ".join(f"{m} {sps[m]:,.0f}" for m in models if sps.get(m))
              + (f" (S5/LSTM {sps['S5'] / sps['LSTM']:.2f}x)" if sps.get("S5") and sps.get("LSTM") else "")
              + f". Wall time of the cells: {report['wall_seconds_total'] / 60:.0f} min; 5-min load average at the cells' "
              f"ends {report['load_range']}. {machine_line(report['machine'])}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["settings"]
    fig, (ax, ax_sps) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for k, model in enumerate(report["args"]["models"]):
        rows = [(int(L), row[model]) for L, row in report["results"].items() if model in row]
        if not rows:
            continue
        lengths = np.array([L for L, _ in rows])
        rates = [np.array([x for x in r["success"] if x is not None]) for _, r in rows]
        mean = np.array([x.mean() if x.size else np.nan for x in rates])
        std = np.array([x.std() if x.size else 0 for x in rates])
        offset = 1.04 if k else 1 / 1.04  # the two memories' dots side by side on the log axis
        for L, x in zip(lengths, rates):
            ax.scatter([L * offset] * x.size, x, s=10, alpha=0.5, color=f"C{k}")
        ax.plot(lengths, mean, "o-", color=f"C{k}", label=f"{model}, mean of {len(s['seeds'])} seeds (dots: seeds)")
        ax.fill_between(lengths, mean - std, mean + std, color=f"C{k}", alpha=0.15)
        sps = [r.get("sps") or np.nan for _, r in rows]
        ax_sps.plot(lengths, sps, "o-", color=f"C{k}", label=model)
    ax.axhline(s["solve_threshold"], color="C2", ls="--", lw=1, label=f"solved (>= {s['solve_threshold']})")
    ax.axhline(0.5, color="grey", ls=":", lw=1, label="random")
    ax.set(xscale="log", ylim=(0.3, 1.02), xlabel="memory length L", ylabel="final success rate",
           title=f"bsuite MemoryChain, {s['total_timesteps']:,} steps per (length, seed)")  # fmt: skip
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(True, alpha=0.3)
    ax_sps.set(xscale="log", xlabel="memory length L", ylabel="env steps/s (all seeds)", title="training speed")
    ax_sps.legend(fontsize=8)
    ax_sps.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish(report: dict, out_dir: str, out_name: str) -> Path:
    cells = [row[m] for row in report["results"].values() for m in MODELS if m in row]
    report["largest_solved_all_seeds"] = {m: largest_solved(report, m) for m in report["args"]["models"]}
    steps = {m: sum(r["sps"] * r["run_seconds"] for row in report["results"].values() if (r := row.get(m)) and r.get("sps"))
             for m in MODELS}  # fmt: skip
    run_s = {m: sum(r["run_seconds"] for row in report["results"].values() if (r := row.get(m)) and r.get("sps")) for m in MODELS}
    report["sps_overall"] = {m: steps[m] / run_s[m] if run_s[m] else None for m in MODELS}
    report["wall_seconds_total"] = sum(r.get("wall_seconds", r["compile_seconds"] + r["run_seconds"]) for r in cells)
    report["load_range"] = load_range(cells)  # recorded when each cell ran, also for cells read back
    out = write_results(out_dir, out_name, report, markdown(report))
    plot(report, out / f"{out_name}.png")
    return out


def main(args: Args) -> dict:
    if args.quick:
        args = dataclasses.replace(
            args, memory_lengths=(3,), num_seeds=2, total_timesteps=8 * 4 * 32, stop_after=0,
            s5=("num_envs=4", "num_minibatches=2", "update_epochs=1", "hidden_size=8", "d_model=8", "ssm_size=8",
                "n_layers=1", *args.s5),
        )  # fmt: skip
    if not args.models or set(args.models) - set(MODELS):
        raise SystemExit(f"--models: choose from {', '.join(MODELS)}, got {args.models}")
    lengths = sorted(set(args.memory_lengths))
    cells = {L: cell_args(args, L) for L in lengths}
    for L, per_model in cells.items():  # every cell's Args checked before anything runs
        for model, a in per_model.items():
            error = (ppo_s5_memory if model == "S5" else ppo_lstm_popgym).check_args(a)
            if error:
                raise SystemExit(f"L={L} {model}: {error}")
    previous = [  # keyed "L/memory" like the cells below
        {"results": {f"{L}/{m}": cell for L, row in json.loads(Path(p).read_text())["results"].items() for m, cell in row.items()
                     if m in MODELS}} for p in args.previous
    ]  # fmt: skip
    out_name = args.out_name or ("bench_memory_length_quick" if args.quick else "bench_memory_length")
    runs_dir = Path(args.out_dir) / f"{out_name}_runs"
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores, jax {machine['jax']} on {machine['backend']}; "
          f"load {machine['load_average_at_start']}; lengths {lengths}", flush=True)  # fmt: skip
    s5 = cells[lengths[0]]["S5"]
    settings = {
        "total_timesteps": args.total_timesteps, "seeds": [args.seed + i for i in range(args.num_seeds)],
        **{k: getattr(s5, k) for k in ("num_envs", "learning_rate", "update_epochs", "num_minibatches", "success_window",
                                       "solve_threshold")},
        "s5": {k: getattr(s5, k) for k in ("hidden_size", "d_model", "ssm_size", "n_layers")},
        "lstm_hidden_size": cells[lengths[0]]["LSTM"].hidden_size,
    }  # fmt: skip
    report = {"machine": machine, "args": dataclasses.asdict(args), "settings": settings, "results": {}}
    failed_in_a_row = 0
    for L in lengths:
        row = report["results"][str(L)] = {"rollout": ppo_s5_memory.rollout_length(cells[L]["S5"], L)}
        for model in args.models:
            a, module = cells[L][model], (ppo_s5_memory if model == "S5" else ppo_lstm_popgym)
            key, log_dir = f"{L}/{model}", runs_dir / f"L{L}__{model}"
            run_dir, r = cell_result(module, a, log_dir, key, previous, complete_for(a))
            run_dir = Path(run_dir)
            if "success" not in r:  # from a run folder: success per seed, by the S5 script's rule
                r |= s5_result(r, L) if model == "S5" else lstm_result(a, cells[L]["S5"], run_dir)
            row[model] = {k: v for k, v in r.items() if k not in ("per_length", "args", "per_seed")}  # per_run: complete_for
            row[model] |= {"run_dir": str(run_dir), "script_args": r.get("script_args") or r["args"]}
            print(f"== L={L} {model}: success {fmt_rates(r['success'])}, solved {sum(r['solved'])}/{len(r['solved'])} "
                  f"({r['source']}, load {load_average()})", flush=True)  # fmt: skip
            finish(report, args.out_dir, out_name)  # partial results survive a crash
        failed_in_a_row = failed_in_a_row + 1 if not any(any(row[m]["solved"]) for m in args.models) else 0
        if args.stop_after and failed_in_a_row >= args.stop_after:
            print(f"both memories solved no seed at {failed_in_a_row} length(s) in a row: sweep stops at L={L}")
            break
    machine["load_average_at_end"] = load_average()
    out = finish(report, args.out_dir, out_name)
    written = written_files(out, out_name, machine["backend"], args.figure, keep_all=True)
    print("\n" + (out / f"{out_name}.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
