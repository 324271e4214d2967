"""The POPGym table: MMER of S5 against the LSTM (and the GRU) over a list of env ids, resumable, one command.

Each cell (env, memory) is one call of the script's own `main(args)` (ppo_s5_popgym.py or
ppo_lstm_popgym.py, imported as modules; the GRU is ppo_lstm_popgym.py with `cell=gru` at the LSTM's
hidden size) with all seeds vmapped, into its own folder
`{out_dir}/{out_name}_runs/{env_id}__{memory}/`. A cell whose run folder holds a complete
summary.json with the same Args is read back, not re-run; an interrupted cell (no summary, or fewer
updates than asked) is run again. Default: the 16 Easy ids (one per POPGym family), 3 seeds,
2^20 env steps per seed, at the README's quick CPU settings (`--num-envs 32 --num-steps 128
--update-epochs 4 --num-minibatches 4 --learning-rate 3e-4`; S5 `--d-model 64 --ssm-size 64
--n-layers 2`, LSTM `--hidden-size 64`, GRU `--hidden-size 64 --cell gru`).

    python benchmarks/bench_popgym_table.py --figure                 # 16 Easy ids x {S5, LSTM}
    python benchmarks/bench_popgym_table.py --models S5 LSTM GRU --figure   # x {S5, LSTM, GRU}
    python benchmarks/bench_popgym_table.py --env-ids RepeatPreviousMedium --total-timesteps 4000000
    python benchmarks/bench_popgym_table.py --quick                  # smoke test: 1 env, tiny budget

MMER: max over updates of the mean return of the episodes completed in the update, per seed; the
table gives mean +- std over seeds. S5 (where it is not run, the first of `--models`) is compared with each other
memory: the better of the two where the gap between the means exceeds both stds, otherwise a tie;
wins, ties and losses are tallied per baseline. Bold marks a memory ahead of every other one by
that rule. Writes `{out_dir}/{out_name}.json` (machine, settings, per cell: summary, run folder, wall
time, load; the verdicts and tallies), `.md` (the table) and `.png` (MMER per env, every memory, seeds
as dots) and `_curves.png` (each env's learning curves, episodic return mean +- std over seeds against
env steps, every memory) after every cell; `--figure` copies them, the table
and the JSON to `benchmarks/figures/{out_name}_{backend}.*`. `--previous JSON` takes finished cells from
such a copied report (a later session resumes from the committed JSON without the run folders).
"""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common beside this file
from bench_common import (  # noqa: E402
    QUICK_LSTM,
    QUICK_PPO,
    QUICK_S5,
    SMOKE_LSTM,
    SMOKE_PPO,
    SMOKE_S5,
    cell_result,
    load_average,
    load_range,
    machine_info,
    machine_line,
    mean_std_curve,
    parse_overrides,
    plot_return_curves,
    read_curves,
    write_results,
    written_files,
)
import envs_popjax  # noqa: E402
import ppo_lstm_popgym  # noqa: E402
import ppo_s5_popgym  # noqa: E402

MODELS = {"S5": ppo_s5_popgym, "LSTM": ppo_lstm_popgym, "GRU": ppo_lstm_popgym}
RECURRENT = {"LSTM": "lstm", "GRU": "gru"}  # ppo_lstm_popgym's cell of each recurrent column
COLORS = {"S5": "C0", "LSTM": "C1", "GRU": "C2"}  # the same in both figures
EASY_IDS = tuple(e for e in envs_popjax.CANONICAL_IDS if e.endswith("Easy"))  # one per family
KEPT = ("env_id", "updates", "global_step", "compile_seconds", "run_seconds", "sps", "per_seed", "mmer",
        "final_episodic_return", "wall_seconds", "load_average_before", "load_average_after", "curve_mean",
        "curves")  # fmt: skip


@dataclasses.dataclass
class Args:
    env_ids: tuple[str, ...] = EASY_IDS
    """POPGym env ids (aliases allowed: CartPoleEasy is PositionOnlyCartPoleEasy); default the 16 Easy ids"""
    models: tuple[str, ...] = ("S5", "LSTM")
    """which memories to run: S5 (ppo_s5_popgym.py), LSTM (ppo_lstm_popgym.py), GRU (ppo_lstm_popgym.py with
    cell=gru, the LSTM's hidden size)"""
    total_timesteps: int = 1 << 20
    """env steps per seed (2^20 = 256 updates of the quick settings' 4096 steps)"""
    num_seeds: int = 3
    """seeds per cell, vmapped in one run"""
    seed: int = 1
    """first seed; seeds are seed, seed + 1, ..."""
    ppo: tuple[str, ...] = ()
    """extra PPO Args for both scripts as FIELD=VALUE (over the quick settings), e.g. update_epochs=8"""
    s5: tuple[str, ...] = ()
    """extra ppo_s5_popgym Args as FIELD=VALUE, e.g. n_layers=4"""
    lstm: tuple[str, ...] = ()
    """extra ppo_lstm_popgym Args of the LSTM column as FIELD=VALUE, e.g. hidden_size=128"""
    gru: tuple[str, ...] = ()
    """extra ppo_lstm_popgym Args of the GRU column as FIELD=VALUE, e.g. hidden_size=128"""
    previous: tuple[str, ...] = ()
    """earlier reports (JSON written by this script, e.g. the copy in benchmarks/figures) whose
    finished cells with the same Args are taken instead of run"""
    quick: bool = False
    """smoke test: 2 seeds, tiny networks, 4 updates of 64 steps, RepeatPreviousEasy unless --env-ids is given"""
    figure: bool = False
    """also copy the PNG, table and JSON to benchmarks/figures/{out_name}_{backend}.*"""
    out_dir: str = "benchmarks/results"
    """folder for the JSON, markdown and PNG results and the run folders"""
    out_name: str = ""
    """file stem of the results; default bench_popgym_table (bench_popgym_table_quick with --quick)"""


def cell_args(args: Args) -> dict:
    """{(env_id, memory): the script's Args}, all checked before anything runs."""
    ppo, sizes = QUICK_PPO, {"S5": QUICK_S5, "LSTM": QUICK_LSTM, "GRU": {**QUICK_LSTM, "cell": "gru"}}
    if args.quick:
        ppo, sizes = SMOKE_PPO, {"S5": SMOKE_S5, "LSTM": SMOKE_LSTM, "GRU": {**SMOKE_LSTM, "cell": "gru"}}
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models or len(set(args.models)) < len(args.models):
        raise SystemExit(f"--models {' '.join(args.models)}: choose from {', '.join(MODELS)}, each at most once")
    try:
        env_ids = [envs_popjax.canonical_id(e) for e in args.env_ids]
    except ValueError as error:  # names the closest valid ids
        raise SystemExit(f"--env-ids: {error}") from None
    cells = {}
    for env_id in env_ids:
        for name in args.models:
            module = MODELS[name]
            extra = {**parse_overrides(module.Args, args.ppo), **parse_overrides(module.Args, getattr(args, name.lower()))}
            a = module.Args(env_id=env_id, seed=args.seed, num_seeds=args.num_seeds,
                            total_timesteps=args.total_timesteps, **{**ppo, **sizes[name], **extra})  # fmt: skip
            error = module.check_args(a)
            if error:
                raise SystemExit(f"{module.__name__}: {error}")
            cells[env_id, name] = a
    return cells


def complete_for(a):
    """Whether a summary covers every update `a` asks for (an interrupted run has fewer)."""
    return lambda summary: summary.get("updates") == a.total_timesteps // (a.num_envs * a.num_steps)


def verdict(cells: dict, a: str = "S5", b: str = "LSTM") -> str | None:
    """Of the memories `a` and `b` of one env's `cells`: the better where the gap between mean MMERs exceeds both
    stds, "tie" otherwise; None unless both have an MMER."""
    ma, mb = (cells.get(m, {}).get("mmer") for m in (a, b))
    if not ma or not mb:
        return None
    if abs(ma["mean"] - mb["mean"]) > max(ma["std"], mb["std"]):
        return a if ma["mean"] > mb["mean"] else b
    return "tie"


def best(cells: dict, models) -> str | None:
    """The memory of `models` that `verdict` puts ahead of every other one with an MMER (of two: the better one);
    None if there is none, or fewer than two memories have an MMER."""
    done = [m for m in models if cells.get(m, {}).get("mmer")]
    ahead = [m for m in done if len(done) > 1 and all(verdict(cells, m, o) == m for o in done if o != m)]
    return ahead[0] if ahead else None


def comparisons(models) -> list[tuple[str, str]]:
    """(reference, baseline) pairs: S5 (else the first memory) against each other memory, in the order given."""
    ref = "S5" if "S5" in models else models[0]
    return [(ref, m) for m in models if m != ref]


def tallies(by_env: dict, models) -> dict:
    """{"S5 vs LSTM": {"wins", "ties", "losses", "cells"}, ...}: the reference's verdicts against each baseline over
    the envs where both are done."""
    out = {}
    for ref, base in comparisons(models):
        v = [verdict(c, ref, base) for c in by_env.values()]
        out[f"{ref} vs {base}"] = {"wins": v.count(ref), "ties": v.count("tie"), "losses": v.count(base),
                                   "cells": sum(x is not None for x in v)}  # fmt: skip
    return out


def sizes_text(s: dict, models, short: bool = False) -> str:
    """The memories' sizes from the settings: "S5 2 layers, d_model 64, SSM 64; LSTM hidden 64" (short: "S5 2x64,
    LSTM 64"); a recurrent column run with another cell (--lstm cell=gru) says so."""
    parts = []
    for m in models:
        if m == "S5":
            n, d = s["s5"]["n_layers"], s["s5"]["d_model"]
            parts.append(f"S5 {n}x{d}" if short else f"S5 {n} layers, d_model {d}, SSM {s['s5']['ssm_size']}")
        else:
            r = s[m.lower()]
            other = f" ({r['cell']} cell)" if r["cell"] != RECURRENT[m] else ""
            parts.append(f"{m} {'' if short else 'hidden '}{r['hidden_size']}{other}")
    return (", " if short else "; ").join(parts)


def fmt_mmer(m: dict | None, bold: bool = False) -> str:
    text = "-" if not m else f"{m['mean']:.3f} ± {m['std']:.3f}"
    return f"**{text}**" if bold and m else text


def early_mmer(cell: dict, total_timesteps: int) -> bool:
    """Whether the seeds' mean return peaks in the first 5% of training: then MMER holds only the episodes short enough
    to end in the first updates (LabyrinthEscape's early exits, before any timeout could end), not learning."""
    curve = cell.get("curve_mean")
    if not curve or not curve["steps"]:
        return False
    return curve["steps"][int(np.nanargmax(curve["mean"]))] <= 0.05 * total_timesteps


def markdown(report: dict) -> str:
    s, by_env, models = report["settings"], report["by_env"], report["args"]["models"]
    pairs = comparisons(models)
    vs = [f"{a} vs {b}" for a, b in pairs]
    lines = [
        f"MMER (max over updates of the mean completed-episode return), mean ± std over seeds "
        f"{s['seeds'][0]}-{s['seeds'][-1]}, {s['total_timesteps']:,} env steps per seed; {s['num_envs']} envs x "
        f"{s['num_steps']} steps, {s['update_epochs']} epochs x {s['num_minibatches']} minibatches, lr "
        f"{s['learning_rate']}; {sizes_text(s, models)}. Bold: the memory ahead of every other one, where the gap "
        f"exceeds both stds; {', '.join(vs) or 'no comparison'}: the better of the two where the gap exceeds both "
        f"stds, else tie. Final: the "
        f"mean return of the last update's episodes. †: the mean return peaked in the first 5% of training (early "
        f"episodes that ended soon), so that MMER does not measure learning: read the final return.",
        "",
        "| env | " + " | ".join([f"{m} MMER" for m in models] + vs + [f"{m} final" for m in models]
                                + [f"{m} wall (s)" for m in models]) + " |",
        "|---|" + "---|" * len(models) + "---|" * len(pairs) + "---|" * len(models) + "---:|" * len(models),
    ]  # fmt: skip
    for env_id, cells in by_env.items():
        ahead, runs = best(cells, models), [cells.get(m, {}) for m in models]
        row = [fmt_mmer(r.get("mmer"), bold=ahead == m) + (" †" if early_mmer(r, s["total_timesteps"]) else "")
               for m, r in zip(models, runs)] + [verdict(cells, a, b) or "-" for a, b in pairs]  # fmt: skip
        row += [fmt_mmer(r.get("final_episodic_return")) for r in runs]
        row += [f"{r['wall_seconds']:.0f}" if "wall_seconds" in r else "-" for r in runs]
        lines.append(f"| {env_id} | " + " | ".join(row) + " |")
    tally = "; ".join(f"{pair}: {t['wins']} wins, {t['ties']} ties, {t['losses']} losses over {t['cells']} envs with "
                      f"both done" for pair, t in report["tally"].items())  # fmt: skip
    lines += ["", f"{tally or 'One memory: no comparison'}. Wall time of the cells: "
              f"{report['wall_seconds_total'] / 60:.0f} min; 5-min load average at the cells' ends "
              f"{report['load_range']}. {machine_line(report['machine'])}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_env, models = report["by_env"], report["args"]["models"]
    envs = list(by_env)
    fig, ax = plt.subplots(figsize=(7.5, (0.42 + 0.14 * max(len(models) - 2, 0)) * len(envs) + 1.6))
    height = 0.8 / len(models)
    for k, model in enumerate(models):
        y = np.arange(len(envs)) + (k - (len(models) - 1) / 2) * height
        cells = [by_env[e].get(model, {}) for e in envs]
        mean = [c["mmer"]["mean"] if c.get("mmer") else np.nan for c in cells]
        std = [c["mmer"]["std"] if c.get("mmer") else 0 for c in cells]
        ax.barh(y, mean, height, xerr=std, color=COLORS[model], alpha=0.75, label=model, capsize=2)
        for yi, c in zip(y, cells):  # every seed's MMER as a dot
            seeds = [v["mmer"] for v in c.get("per_seed", {}).values() if v["mmer"] is not None]
            ax.scatter(seeds, [yi] * len(seeds), s=8, color="k", zorder=3)
    labels = [f"{e}{' *' if best(by_env[e], models) else ''}" for e in envs]
    ax.set_yticks(np.arange(len(envs)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="grey", lw=0.8)
    s = report["settings"]
    ax.set_xlabel("MMER (mean ± std over seeds; dots: seeds)")
    ax.set_title(f"POPGym, {s['total_timesteps']:,} steps per seed, {len(s['seeds'])} seeds; "
                 f"{sizes_text(s, models, short=True)}\n(* one memory ahead of every other one by more than both "
                 f"stds)", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finish(report: dict, out_dir: str, out_name: str) -> Path:
    """Tally, table, JSON and figure from the cells done so far."""
    by_env, done = {}, [r for r in report["results"].values()]
    for key, r in report["results"].items():
        env_id, model = key.split("/")
        by_env.setdefault(env_id, {})[model] = r
    models = report["args"]["models"]
    report["by_env"] = {e: {m: by_env[e][m] for m in models if m in by_env.get(e, {})}
                        for e in report["settings"]["env_ids"]}  # fmt: skip
    report["verdicts"] = {e: {"best": best(c, models), **{f"{a} vs {b}": verdict(c, a, b) for a, b in comparisons(models)}}
                          for e, c in report["by_env"].items()}  # fmt: skip
    report["tally"] = tallies(report["by_env"], models)
    report["wall_seconds_total"] = sum(r.get("wall_seconds", r.get("compile_seconds", 0) + r.get("run_seconds", 0)) for r in done)
    report["load_range"] = load_range(done)  # recorded when each cell ran, also for cells read back
    out = write_results(out_dir, out_name, {k: v for k, v in report.items() if k != "by_env"}, markdown(report))
    plot(report, out / f"{out_name}.png")
    plot_return_curves(report["by_env"], report["settings"], out / f"{out_name}_curves.png", colors=COLORS,
                       memories=sizes_text(report["settings"], models, short=True))
    return out


def report_settings(args: Args, cells: dict) -> dict:
    """The report's settings from the cells' Args (`cell_args`): env ids, budget, seeds, PPO settings, each memory's
    size ("s5" and "lstm" always, "gru" where the GRU runs)."""
    first = {m: dataclasses.asdict(next(a for (_, n), a in cells.items() if n == m)) for m in args.models}
    any_first = next(iter(first.values()))
    return {
        "env_ids": list(dict.fromkeys(e for e, _ in cells)), "total_timesteps": args.total_timesteps,
        "seeds": [args.seed + i for i in range(args.num_seeds)],
        **{k: any_first[k] for k in ("num_envs", "num_steps", "update_epochs", "num_minibatches", "learning_rate")},
        "s5": {k: first.get("S5", dataclasses.asdict(ppo_s5_popgym.Args(**QUICK_S5)))[k] for k in ("d_model", "ssm_size", "n_layers")},
        "lstm": {k: first.get("LSTM", dataclasses.asdict(ppo_lstm_popgym.Args(**QUICK_LSTM)))[k] for k in ("hidden_size", "cell")},
        **({"gru": {k: first["GRU"][k] for k in ("hidden_size", "cell")}} if "GRU" in first else {}),
    }  # fmt: skip


def main(args: Args) -> dict:
    if args.quick:
        env_ids = ("RepeatPreviousEasy",) if args.env_ids == EASY_IDS else args.env_ids
        args = dataclasses.replace(args, env_ids=env_ids, num_seeds=2, total_timesteps=4 * 64)
    cells = cell_args(args)
    previous = [json.loads(Path(p).read_text()) for p in args.previous]
    out_name = args.out_name or ("bench_popgym_table_quick" if args.quick else "bench_popgym_table")
    runs_dir = Path(args.out_dir) / f"{out_name}_runs"
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores, jax {machine['jax']} on {machine['backend']}; "
          f"load {machine['load_average_at_start']}; {len(cells)} cells", flush=True)  # fmt: skip
    settings = report_settings(args, cells)
    report = {"machine": machine, "args": dataclasses.asdict(args), "settings": settings, "results": {}}
    for (env_id, model), a in cells.items():
        key, log_dir = f"{env_id}/{model}", runs_dir / f"{env_id}__{model}"
        run_dir, r = cell_result(MODELS[model], a, log_dir, key, previous, complete_for(a))
        if run_dir and Path(run_dir).is_dir():  # else an earlier report's curves, if it has them
            r["curves"] = read_curves(Path(run_dir), [a.seed + i for i in range(a.num_seeds)])
            steps, mean, std = mean_std_curve(r["curves"])
            r["curve_mean"] = {"steps": steps, "mean": np.round(mean, 5).tolist(), "std": np.round(std, 5).tolist()}
            r["curves"] = {seed: (xs, np.round(ys, 5).tolist()) for seed, (xs, ys) in r["curves"].items()}
        report["results"][key] = {**{k: r[k] for k in KEPT if k in r}, "source": r["source"], "run_dir": str(run_dir),
                                  "script_args": r.get("script_args") or r["args"]}  # fmt: skip
        wall = r.get("wall_seconds")
        print(f"== {key}: MMER {fmt_mmer(r['mmer'])} ({r['source']}{f', wall {wall:.0f} s' if wall else ''}, "
              f"load {load_average()})", flush=True)  # fmt: skip
        out = finish(report, args.out_dir, out_name)  # partial results survive a crash
    machine["load_average_at_end"] = load_average()
    out = finish(report, args.out_dir, out_name)
    written = written_files(out, out_name, machine["backend"], args.figure, keep_all=True, extra=("_curves.png",))
    print("\n" + (out / f"{out_name}.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
