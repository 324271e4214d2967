"""Meta-RL, the paper's in-context claim: S5 against the LSTM on training and held-out envs, one command.

Each cell (memory) is one call of `ppo_s5_metarl.main(args)` (`--memory s5` or `--memory lstm`, the same PPO,
meta-env, seeds, budget and evaluation) with all seeds vmapped, into its own folder
`{out_dir}/{out_name}_runs/{memory}/`; a finished cell is read back from there (or from `--previous`), an
interrupted one is run again. The script evaluates before training, every `--eval-every` updates and at the end: the
mean return of episode k of a trial, over fresh projections of every training and held-out env (the in-context
curve). This driver reads the first and the final evaluation of each seed and reports, per memory and split:

- the in-context curve, mean ± std over seeds of the split's env-averaged return of episode k (k = 1..K);
- the in-context gain, episode K minus episode 1 per seed (mean ± std): "in context" when the mean exceeds both 0
  and the spread over seeds (the std), the issue's criterion;
- S5 against the LSTM per split: the mean return over the trial's episodes, the better one where the gap exceeds
  both stds, a tie otherwise.

    python benchmarks/bench_metarl.py --figure        # the documented setting, 3 seeds, S5 and LSTM
    python benchmarks/bench_metarl.py --total-timesteps 2000000 --run episodes_per_trial=8 --out-name try_8
    python benchmarks/bench_metarl.py --quick         # smoke test

Writes `{out_dir}/{out_name}.json`, `.md` and `.png` (the in-context curves, training and held-out envs, before and
after training) after every cell; `--figure` copies them to `benchmarks/figures/{out_name}_{backend}.*`.
"""

import dataclasses
import json
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
    write_results,
    written_files,
)
import ppo_s5_metarl  # noqa: E402

SPLITS = ("train", "heldout")
SCRIPT = ppo_s5_metarl.Args()


@dataclasses.dataclass
class Args:
    memories: tuple[str, ...] = ("s5", "lstm")
    """which memories to run (ppo_s5_metarl.py --memory)"""
    train_envs: tuple[str, ...] = SCRIPT.train_envs
    """meta-RL envs trained on (envs_popjax.META_ENV_IDS)"""
    heldout_envs: tuple[str, ...] = SCRIPT.heldout_envs
    """envs only evaluated, never trained on"""
    total_timesteps: int = SCRIPT.total_timesteps
    """env steps per seed"""
    num_seeds: int = 3
    """seeds per cell, vmapped in one run"""
    seed: int = 1
    """first seed; seeds are seed, seed + 1, ..."""
    run: tuple[str, ...] = ()
    """extra ppo_s5_metarl Args for both memories as FIELD=VALUE, e.g. episodes_per_trial=8 eval_trials=128"""
    s5: tuple[str, ...] = ()
    """extra Args of the S5 cell only, e.g. n_layers=4"""
    lstm: tuple[str, ...] = ()
    """extra Args of the LSTM cell only, e.g. hidden_size=128"""
    previous: tuple[str, ...] = ()
    """earlier reports (JSON written by this script) whose finished cells with the same Args are taken, not run"""
    quick: bool = False
    """smoke test: 2 seeds, tiny networks, 2 updates, 2 episodes of 5 steps per trial"""
    figure: bool = False
    """also copy the PNG, table and JSON to benchmarks/figures/{out_name}_{backend}.*"""
    out_dir: str = "benchmarks/results"
    """folder for the JSON, markdown and PNG results and the run folders"""
    out_name: str = ""
    """file stem of the results; default bench_metarl (bench_metarl_quick with --quick)"""


QUICK = dict(num_envs=8, num_steps=10, episodes_per_trial=2, episode_length=5, eval_trials=4, eval_every=0,
             update_epochs=1, num_minibatches=2, d_model=16, ssm_size=16, n_layers=1, hidden_size=16)  # fmt: skip


def cell_args(args: Args) -> dict:
    """{memory: ppo_s5_metarl.Args}, every one checked before anything runs."""
    cells = {}
    for memory in args.memories:
        if memory not in ("s5", "lstm"):
            raise SystemExit(f"--memories: unknown {memory!r}; choose from s5, lstm")
        own = args.s5 if memory == "s5" else args.lstm
        extra = {**parse_overrides(ppo_s5_metarl.Args, args.run), **parse_overrides(ppo_s5_metarl.Args, own)}
        a = ppo_s5_metarl.Args(memory=memory, seed=args.seed, num_seeds=args.num_seeds, train_envs=args.train_envs,
                               heldout_envs=args.heldout_envs, total_timesteps=args.total_timesteps,
                               checkpoint_every=0, **{**(QUICK if args.quick else {}), **extra})  # fmt: skip
        if error := ppo_s5_metarl.check_args(a):
            raise SystemExit(f"{memory}: {error}")
        cells[memory] = a
    return cells


def complete_for(a):
    """Whether a summary covers every update `a` asks for and holds the final evaluation."""
    updates = a.total_timesteps // (a.num_envs * a.num_steps)
    return lambda s: s.get("updates") == updates and (s.get("final_eval") or {}).get("update") == updates


def curves(record: dict, split: str) -> np.ndarray:
    """[seeds, episodes]: each seed's return per episode index, averaged over the split's envs."""
    per_seed = record["per_seed"]
    return np.array([np.mean([v for k, v in per_seed[s].items() if k.startswith(split + "/")], 0) for s in per_seed])


def split_stats(summary: dict) -> dict:
    """Per split: the curve (mean, std over seeds) before and after training, the gain K - 1 per seed, the mean
    return over the trial's episodes per seed, and each env's final curve (mean over seeds)."""
    first, final = summary["evals"][0], summary["evals"][-1]  # before training, the final evaluation
    out = {}
    for split in SPLITS:
        if not any(k.startswith(split + "/") for k in next(iter(final["per_seed"].values()))):
            continue
        after, before = curves(final, split), curves(first, split)
        gain, trial_mean = after[:, -1] - after[:, 0], after.mean(1)
        envs = {k.split("/", 1)[1]: np.mean([final["per_seed"][s][k] for s in final["per_seed"]], 0).tolist()
                for k in next(iter(final["per_seed"].values())) if k.startswith(split + "/")}  # fmt: skip
        out[split] = {
            "curve": {"mean": after.mean(0).tolist(), "std": after.std(0).tolist()},
            "curve_before": {"mean": before.mean(0).tolist(), "std": before.std(0).tolist(),
                             "update": first["update"]},  # fmt: skip
            "gain": {"mean": float(gain.mean()), "std": float(gain.std()), "per_seed": gain.tolist()},
            "trial_mean": {"mean": float(trial_mean.mean()), "std": float(trial_mean.std())},
            "in_context": bool(gain.mean() > max(0.0, gain.std())),
            "envs": envs,
        }
    return out


def better(cells: dict, split: str) -> str | None:
    """The memory with the higher mean return over a trial where the gap exceeds both stds; "tie" otherwise."""
    stats = [(m, c["splits"][split]["trial_mean"]) for m, c in cells.items() if split in c.get("splits", {})]
    if len(stats) != 2:
        return None
    (m1, a), (m2, b) = stats
    if abs(a["mean"] - b["mean"]) <= max(a["std"], b["std"]):
        return "tie"
    return m1 if a["mean"] > b["mean"] else m2


def pm(x: dict, digits: int = 3) -> str:
    return f"{x['mean']:+.{digits}f} ± {x['std']:.{digits}f}"


def markdown(report: dict) -> str:
    s, cells = report["settings"], report["results"]
    k = s["episodes_per_trial"]
    lines = [
        f"Meta-RL in-context curves: train {', '.join(s['train_envs'])}; held out {', '.join(s['heldout_envs'])}. "
        f"{s['total_timesteps']:,} env steps per seed, seeds {s['seeds'][0]}-{s['seeds'][-1]}; trials of {k} "
        f"episodes of {s['episode_length']} steps, projections obs {s['obs_size']} / action {s['action_size']}; "
        f"final evaluation {s['eval_trials']} trials per env and seed. Returns scaled (O(1) per episode); mean ± std "
        f"over seeds of the split's env-averaged return. In context: the gain (episode {k} - episode 1) exceeds 0 "
        f"and its std over seeds.",
        "",
        f"| memory | envs | episode 1 | episode {k} | gain {k} - 1 | in context | trial mean | before training "
        f"(1 -> {k}) | wall (s) |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for memory, c in cells.items():
        for split, r in c.get("splits", {}).items():
            curve, before = r["curve"], r["curve_before"]
            first, last = ({"mean": curve["mean"][i], "std": curve["std"][i]} for i in (0, -1))
            lines.append(
                f"| {memory} | {split} | {pm(first)} | {pm(last)} | {pm(r['gain'])} | "
                f"{('no', 'yes')[r['in_context']]} | "
                f"{pm(r['trial_mean'])} | {before['mean'][0]:+.3f} -> {before['mean'][-1]:+.3f} | "
                f"{c.get('wall_seconds', 0):.0f} |"
            )
    lines += ["", "| memory | env | split | episode 1 | episode " + str(k) + " |", "|---|---|---|---:|---:|"]
    for memory, c in cells.items():
        for split, r in c.get("splits", {}).items():
            lines += [f"| {memory} | {e} | {split} | {v[0]:+.3f} | {v[-1]:+.3f} |" for e, v in r["envs"].items()]
    verdicts = ", ".join(f"{split}: {v}" for split in SPLITS if (v := better(cells, split)))
    lines += ["", f"Higher trial-mean return (gap over both stds): {verdicts or '-'}. Wall time of the cells "
              f"{report['wall_seconds_total'] / 60:.0f} min; 5-min load average at the cells' ends "
              f"{report['load_range']}. {machine_line(report['machine'])}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, s = report["results"], report["settings"]
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(10, 3.8), sharey=False)
    for ax, split in zip(axes, SPLITS):
        for i, (memory, c) in enumerate(cells.items()):
            r = c.get("splits", {}).get(split)
            if not r:
                continue
            x = np.arange(1, len(r["curve"]["mean"]) + 1)
            mean, std = np.array(r["curve"]["mean"]), np.array(r["curve"]["std"])
            ax.plot(x, mean, "o-", color=f"C{i}", label=f"{memory} (gain {pm(r['gain'], 2)})")
            ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.2)
            ax.plot(x, r["curve_before"]["mean"], "--", color=f"C{i}", alpha=0.6, label=f"{memory}, before training")
        ax.set_title(f"{'training' if split == 'train' else 'held-out'} envs", fontsize=9)
        ax.set_xlabel("episode of the trial")
        ax.set_xticks(np.arange(1, s["episodes_per_trial"] + 1))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("scaled return (mean ± std over seeds)")
    fig.suptitle(f"Meta-RL, {s['total_timesteps']:,} steps per seed, {len(s['seeds'])} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


KEPT = ("updates", "global_step", "compile_seconds", "run_seconds", "sps", "wall_seconds", "load_average_before",
        "load_average_after")  # fmt: skip


def cell_record(r: dict, run_dir) -> dict:
    """What the report keeps of a cell (a run's summary, or an earlier report's record): enough for `complete_for`
    to accept it again from `--previous` (the final evaluation's update), the statistics, the script's Args."""
    return {**{k: r[k] for k in KEPT if k in r}, "source": r["source"], "run_dir": str(run_dir),
            "script_args": r.get("script_args") or r["args"], "final_eval": {"update": r["final_eval"]["update"]},
            "splits": r.get("splits") or split_stats(r)}  # fmt: skip


def finish(report: dict, out_dir: str, out_name: str) -> Path:
    done = list(report["results"].values())
    report["wall_seconds_total"] = sum(r.get("wall_seconds", 0) for r in done)
    report["load_range"] = load_range(done)
    report["better"] = {split: better(report["results"], split) for split in SPLITS}
    out = write_results(out_dir, out_name, report, markdown(report))
    plot(report, out / f"{out_name}.png")
    return out


def main(args: Args) -> dict:
    if args.quick:
        args = dataclasses.replace(args, num_seeds=2, total_timesteps=2 * 8 * 10)
    cells = cell_args(args)
    previous = [json.loads(Path(p).read_text()) for p in args.previous]
    out_name = args.out_name or ("bench_metarl_quick" if args.quick else "bench_metarl")
    runs_dir = Path(args.out_dir) / f"{out_name}_runs"
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores, jax {machine['jax']} on {machine['backend']}; "
          f"load {machine['load_average_at_start']}; {len(cells)} cells", flush=True)  # fmt: skip
    a = dataclasses.asdict(next(iter(cells.values())))
    settings = {k: a[k] for k in ("train_envs", "heldout_envs", "total_timesteps", "episodes_per_trial",
                                  "episode_length", "obs_size", "action_size", "eval_trials")}  # fmt: skip
    settings["seeds"] = [args.seed + i for i in range(args.num_seeds)]
    report = {"machine": machine, "args": dataclasses.asdict(args), "settings": settings, "results": {}}
    for memory, a in cells.items():
        log_dir = runs_dir / memory
        run_dir, r = cell_result(ppo_s5_metarl, a, log_dir, memory, previous, complete_for(a))
        report["results"][memory] = cell_record(r, run_dir)
        gains = ", ".join(f"{split} gain {pm(v['gain'])}" for split, v in report["results"][memory]["splits"].items())
        print(f"== {memory}: {gains} ({r['source']}, load {load_average()})", flush=True)
        finish(report, args.out_dir, out_name)  # partial results survive a crash
    machine["load_average_at_end"] = load_average()
    out = finish(report, args.out_dir, out_name)
    written = written_files(out, out_name, machine["backend"], args.figure, keep_all=True)
    print("\n" + (out / f"{out_name}.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
