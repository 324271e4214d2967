"""In-context RL: S5 against the LSTM, per-episode curves with controls and bootstrap intervals, resumable.

Three settings (`--setting`), each S5 and the LSTM at the same settings, seeds and budget:
- `metacartpole` (A): `ppo_s5_popgym.py` / `ppo_lstm_popgym.py` on the paper's `MetaCartPole` (16 trials of a randomly
  projected PositionOnlyCartPole per meta-episode, every trial from the same start), the quick CPU settings;
- `pointrobot` (B): `ppo_s5_metarl.py --memory s5|lstm` on PointRobot behind random projections, whose goal is hidden
  (only the reward reveals it) and fixed within a trial: 4 episodes of 100 steps per trial, so an episode that knows
  the goal pays more than one that searches. Trained on goals in one arc of the semicircle (angles 0-135 degrees),
  held out: the other arc (135-180 degrees), with projections never seen in training.
- `semicircle` (B'): as `pointrobot`, but the semicircle task as meta-RL papers run it: no projections, every
  episode from the centre, no teleport at the goal (`gymnax/PointRobot-semicircle-{train,heldout}-goals`): the goal
  is the only unknown.
After training, each seed plays `--eval-episodes` fresh trials (meta-episodes) with the saved weights, three ways:
- trained: the memory is cleared only at trial starts, as in training;
- memory reset (control): also cleared at every inner episode start (`--eval-reset-every-trial` of the POPGym scripts,
  `--eval-reset-every-episode` of ppo_s5_metarl), so nothing carries over and in-context learning is impossible;
- untrained (control): each seed's initial parameters.
The in-context curve is the mean return of inner episode k = 1..K; a seed's gain is the mean of episodes 2..K minus
episode 1. A memory shows in-context learning where the 95% bootstrap interval over seeds of the trained gain lies
above 0 and that of the memory-reset control does not (for B, per split: training goals, held-out goals).

    python benchmarks/bench_incontext.py --figure                       # A: S5 and LSTM, 5 seeds
    python benchmarks/bench_incontext.py --setting pointrobot --figure  # B
    python benchmarks/bench_incontext.py --setting semicircle --figure  # B'
    python benchmarks/bench_incontext.py --models S5                    # one memory (run two side by side)
    python benchmarks/bench_incontext.py --quick                        # smoke test: tiny budget and networks

A training cell whose run folder holds a complete summary.json with the same Args is read back, not re-run; an
evaluation whose eval*.json exists in the run folder with the same number of episodes is read back too. Writes
`{out_dir}/{out_name}.json` (machine, settings, per memory and condition: curves per seed, gains, intervals),
`.md` (the table) and `.png` (the curves); `--figure` copies them to `benchmarks/figures/{out_name}_{backend}.*`.
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
    parse_overrides,
    write_results,
    written_files,
)
import ppo_lstm_popgym  # noqa: E402
import ppo_s5_metarl  # noqa: E402
import ppo_s5_popgym  # noqa: E402

SETTINGS = {  # setting: ({memory: script}, the memory-reset control's flag, the setting's Args over the defaults)
    "metacartpole": ({"S5": ppo_s5_popgym, "LSTM": ppo_lstm_popgym}, "eval_reset_every_trial",
                     dict(env_id="MetaCartPole", **QUICK_PPO)),
    "pointrobot": ({"S5": ppo_s5_metarl, "LSTM": ppo_s5_metarl}, "eval_reset_every_episode",
                   dict(train_envs=("gymnax/PointRobot-misc-train-goals",),
                        heldout_envs=("gymnax/PointRobot-misc-heldout-goals",), episodes_per_trial=4,
                        episode_length=100, num_envs=16, num_steps=400, num_minibatches=4, eval_every=0)),
    "semicircle": ({"S5": ppo_s5_metarl, "LSTM": ppo_s5_metarl}, "eval_reset_every_episode",
                   dict(train_envs=("gymnax/PointRobot-semicircle-train-goals",),
                        heldout_envs=("gymnax/PointRobot-semicircle-heldout-goals",), episodes_per_trial=4,
                        episode_length=100, num_envs=16, num_steps=400, num_minibatches=4, eval_every=0)),
}  # fmt: skip
CONDITIONS = ("trained", "memory_reset", "untrained")
KEPT = ("updates", "global_step", "compile_seconds", "run_seconds", "sps", "per_seed", "mmer", "final_episodic_return",
        "wall_seconds", "load_average_before", "load_average_after", "continued_with_resume")  # fmt: skip


@dataclasses.dataclass
class Args:
    setting: str = "metacartpole"
    """metacartpole (A: the POPGym scripts on MetaCartPole), pointrobot (B: ppo_s5_metarl, held-out goals) or
    semicircle (B': as B without projections, from the centre, no teleport at the goal)"""
    models: tuple[str, ...] = ("S5", "LSTM")
    """which memories to run: S5, LSTM"""
    total_timesteps: int = 1 << 21
    """env steps per seed (A: 2^21 = 512 updates of the quick settings' 4096 steps)"""
    num_seeds: int = 5
    """seeds per memory, vmapped in one run"""
    seed: int = 1
    """first seed; seeds are seed, seed + 1, ..."""
    eval_episodes: int = 200
    """fresh meta-episodes per seed and condition"""
    bootstrap: int = 10_000
    """bootstrap resamples (over seeds) for the 95% intervals"""
    ppo: tuple[str, ...] = ()
    """extra Args for both memories as FIELD=VALUE (over the setting's), e.g. num_steps=256"""
    s5: tuple[str, ...] = ()
    """extra Args of the S5 run as FIELD=VALUE"""
    lstm: tuple[str, ...] = ()
    """extra Args of the LSTM run as FIELD=VALUE, e.g. cell=gru (A)"""
    quick: bool = False
    """smoke test: 2 seeds, tiny networks, 2 updates, 8 evaluation trials"""
    figure: bool = False
    """also copy the PNG, table and JSON to benchmarks/figures/{out_name}_{backend}.*"""
    out_dir: str = "benchmarks/results"
    """folder for the JSON, markdown and PNG results and the run folders"""
    out_name: str = ""
    """file stem of the results; default bench_incontext_{setting} (with _quick for --quick)"""


def cell_args(args: Args) -> dict:
    """{memory: the script's training Args}, all checked before anything runs."""
    if args.setting not in SETTINGS:
        raise SystemExit(f"--setting: choose from {', '.join(SETTINGS)}, got {args.setting}")
    modules, _, setting = SETTINGS[args.setting]
    if not args.models or any(m not in modules for m in args.models):
        raise SystemExit(f"--models: choose from {', '.join(modules)}, got {', '.join(args.models) or 'none'}")
    cells = {}
    for name in args.models:
        module = modules[name]
        if module is ppo_s5_metarl:  # its defaults are CPU-sized; --memory picks the LSTM
            sizes = {"memory": name.lower()}
        else:
            sizes = {"S5": QUICK_S5, "LSTM": QUICK_LSTM}[name]
        if args.quick:
            sizes = {**sizes, **{"S5": SMOKE_S5, "LSTM": SMOKE_LSTM}[name], **SMOKE_PPO}
        extra = {**parse_overrides(module.Args, args.ppo), **parse_overrides(module.Args, getattr(args, name.lower()))}
        a = module.Args(seed=args.seed, num_seeds=args.num_seeds, eval_episodes=args.eval_episodes,
                        total_timesteps=args.total_timesteps, **{**setting, **sizes, **extra})  # fmt: skip
        if error := module.check_args(a):
            raise SystemExit(f"{module.__name__}: {error}")
        cells[name] = a
    return cells


def complete_for(a):
    return lambda summary: summary.get("updates") == a.total_timesteps // (a.num_envs * a.num_steps)


def evaluation(module, run_dir: Path, a, condition: str, reset_flag: str) -> dict:
    """The eval*.json that --eval-model writes for `condition`: read back if it has as many episodes and is newer than
    the run's summary.json (a run continued with --resume is evaluated again), else played."""
    flag = {"trained": None, "memory_reset": reset_flag, "untrained": "eval_untrained"}[condition]
    path = run_dir / ("eval_" + flag[len("eval_"):] + ".json" if flag else "eval.json")
    if path.exists() and path.stat().st_mtime > (run_dir / "summary.json").stat().st_mtime:
        record = json.loads(path.read_text())
        if a.eval_episodes in (record.get("episodes_per_seed"), record.get("trials_per_env")):
            return record
    return module.evaluate_model(dataclasses.replace(a, eval_model=str(run_dir), **({flag: True} if flag else {})))


def split_curves(record: dict) -> dict:
    """{split: [seeds, episodes] array} of an eval record: A's one curve ("all"); B's per split ("train", "heldout"),
    each the mean over the split's envs."""
    if "in_context" in record:
        per_seed = record["in_context"]["per_seed"]
        return {"all": np.array([per_seed[s]["trial_returns"] for s in per_seed])}
    out = {}
    for split in ("train", "heldout"):
        per_seed = [[c for k, c in by_env.items() if k.startswith(split + "/")] for by_env in record["per_seed"].values()]
        if per_seed[0]:
            out[split] = np.array(per_seed).mean(1)
    return out


def bootstrap_interval(x: np.ndarray, resamples: int, seed: int = 0) -> list[float]:
    """The 95% percentile bootstrap interval of the mean of `x` (values per seed)."""
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (resamples, len(x)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def condition_stats(curves: np.ndarray, seeds: list[int], resamples: int) -> dict:
    """Per-seed curves ([seeds, episodes]) and gains, the mean curve, and the gain's mean and 95% interval."""
    gains = curves[:, 1:].mean(1) - curves[:, 0]
    return {
        "curve_per_seed": {str(s): np.round(c, 5).tolist() for s, c in zip(seeds, curves)},
        "curve_mean": np.round(curves.mean(0), 5).tolist(), "curve_std": np.round(curves.std(0), 5).tolist(),
        "trial_mean_return": float(curves.mean()), "gain_per_seed": np.round(gains, 5).tolist(),
        "gain_mean": float(gains.mean()), "gain_ci95": bootstrap_interval(gains, resamples),
    }  # fmt: skip


def memory_benefit(records: dict, split: str, resamples: int) -> dict:
    """What the memory of earlier episodes is worth, paired per seed: the trained weights' mean return over episodes
    2..K minus the memory-reset control's over the same episodes (same weights, same evaluation keys; the two differ
    only in what is carried over). It does not use episode 1, whose inputs differ from the later episodes' (the
    meta-episode-start flag, no previous action), so that a control that rises after episode 1 does not blur it."""
    gap = records["trained"][split][:, 1:].mean(1) - records["memory_reset"][split][:, 1:].mean(1)
    return {"per_seed": np.round(gap, 5).tolist(), "mean": float(gap.mean()), "ci95": bootstrap_interval(gap, resamples)}


def verdict(conditions: dict) -> str:
    """"yes" where the trained gain's interval lies above 0 and the memory-reset control's does not, else "no"."""
    trained, control = conditions.get("trained"), conditions.get("memory_reset")
    if not trained or not control:
        return "incomplete"
    return "yes" if trained["gain_ci95"][0] > 0 and control["gain_ci95"][0] <= 0 else "no"


def markdown(report: dict) -> str:
    s, unit = report["settings"], report["settings"]["unit"]
    whole = "meta-episodes" if unit == "trial" else "trials"  # A: trials of a meta-episode; B: episodes of a trial
    sizes = {m: {k: v for k, v in s["script_args"][m].items() if k in MEMORY_FIELDS} for m in s["script_args"]}
    lines = [
        f"# In-context curves, setting {s['setting']}: S5 against the LSTM", "",
        f"Training: {s['total_timesteps']:,} env steps per seed, seeds {s['seeds']}, {s['num_envs']} envs x "
        f"{s['num_steps']} steps, {s['update_epochs']} epochs x {s['num_minibatches']} minibatches, learning rate "
        f"{s['learning_rate']}; {'; '.join(f'{m} {v}' for m, v in sizes.items())}. Evaluation: {s['eval_episodes']} "
        f"fresh {whole} per seed (and env) and condition, actions sampled. Gain: mean return of {unit}s 2-K minus "
        f"{unit} 1, per seed; [95% bootstrap interval over seeds]. In-context learning: the trained gain's interval "
        f"above 0 and the memory-reset control's not.", "",
        f"| memory | split | condition | {unit} 1 | {unit} 2 | {unit} K | mean | gain [95% CI] | in-context learning |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]  # fmt: skip
    for model, r in report["results"].items():
        for split, conditions in r["splits"].items():
            for condition, c in conditions.items():
                curve, (lo, hi) = c["curve_mean"], c["gain_ci95"]
                call = r["verdict"][split] if condition == "trained" else ""
                lines.append(f"| {model} | {split} | {condition.replace('_', ' ')} | {curve[0]:.3f} | {curve[1]:.3f} | "
                             f"{curve[-1]:.3f} | {c['trial_mean_return']:.3f} | {c['gain_mean']:+.4f} [{lo:+.4f}, "
                             f"{hi:+.4f}] | {call} |")  # fmt: skip
    lines += ["", f"Memory benefit: trained minus memory reset, mean return of {unit}s 2-K, per seed (same weights and "
              f"evaluation keys; {unit} 1 left out, whose inputs differ) [95% bootstrap interval over seeds]:", ""]
    for model, r in report["results"].items():
        for split, b in r.get("memory_benefit", {}).items():
            lo, hi = b["ci95"]
            seeds = ", ".join(f"{x:+.4f}" for x in b["per_seed"])
            lines.append(f"- {model}, {split}: {b['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] (seeds: {seeds})")
    for model, r in report["results"].items():
        mmer = f"MMER {r['mmer']['mean']:.3f} +- {r['mmer']['std']:.3f}; " if r.get("mmer") else ""
        how = "run time over its sessions plus compile: continued with --resume" if r.get("continued_with_resume") \
            else r["source"]  # fmt: skip
        lines.append(f"\n{model} training: {mmer}wall time {r.get('wall_seconds', 0):.0f} s ({how}).")
    lines += ["", machine_line(report["machine"]), ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, split) for m, r in report["results"].items() for split in r["splits"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, constrained_layout=True)
    styles = {"trained": "-", "memory_reset": "--", "untrained": ":"}
    unit = report["settings"]["unit"]
    for ax, (model, split) in zip(axes[0], panels):
        for condition, c in report["results"][model]["splits"][split].items():
            k = np.arange(1, len(c["curve_mean"]) + 1)
            mean, std = np.array(c["curve_mean"]), np.array(c["curve_std"])
            label = f"{condition.replace('_', ' ')} (gain {c['gain_mean']:+.3f})"
            ax.plot(k, mean, styles[condition], marker=".", label=label)
            ax.fill_between(k, mean - std, mean + std, alpha=0.15)
        title = f"{model}, {report['settings']['setting']}" + ("" if split == "all" else f", {split} goals")
        whole = "meta-episode" if unit == "trial" else "trial"  # A: trials of a meta-episode; B: episodes of a trial
        ax.set(title=title, xlabel=f"{unit} k of a {whole}", ylabel=f"return of {unit} k (mean +- std over seeds)")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


MEMORY_FIELDS = ("memory", "d_model", "ssm_size", "n_layers", "hidden_size", "cell")


def main(args: Args) -> dict:
    if args.quick:
        args = dataclasses.replace(args, num_seeds=2, total_timesteps=2 * 4 * 16, eval_episodes=8, bootstrap=200)
    cells = cell_args(args)
    modules, reset_flag, _ = SETTINGS[args.setting]
    out_name = args.out_name or f"bench_incontext_{args.setting}" + ("_quick" if args.quick else "")
    runs_dir = Path(args.out_dir) / f"{out_name}_runs"
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores, jax {machine['jax']}; load {machine['load_average_at_start']}",
          flush=True)
    any_cell = dataclasses.asdict(next(iter(cells.values())))
    seeds = [args.seed + i for i in range(args.num_seeds)]
    settings = {
        "setting": args.setting, "unit": "trial" if args.setting == "metacartpole" else "episode",
        "total_timesteps": args.total_timesteps, "eval_episodes": args.eval_episodes, "seeds": seeds,
        "bootstrap": args.bootstrap,
        **{k: any_cell[k] for k in ("num_envs", "num_steps", "update_epochs", "num_minibatches", "learning_rate")},
        "script_args": {m: dataclasses.asdict(a) for m, a in cells.items()},
    }  # fmt: skip
    report = {"machine": machine, "args": dataclasses.asdict(args), "settings": settings, "results": {}}
    for model, a in cells.items():
        module = modules[model]
        run_dir, r = cell_result(module, a, runs_dir / model, model, [], complete_for(a))
        records = {c: split_curves(evaluation(module, Path(run_dir), a, c, reset_flag)) for c in CONDITIONS}
        splits = {split: {c: condition_stats(records[c][split], seeds, args.bootstrap) for c in CONDITIONS}
                  for split in records["trained"]}  # fmt: skip
        result = {**{k: r[k] for k in KEPT if k in r}, "source": r["source"], "run_dir": str(run_dir), "splits": splits}
        result["verdict"] = {split: verdict(conditions) for split, conditions in splits.items()}
        result["memory_benefit"] = {split: memory_benefit(records, split, args.bootstrap) for split in splits}
        report["results"][model] = result
        for split, conditions in splits.items():
            print(f"== {model} ({split}): in-context learning {result['verdict'][split]} (trained gain "
                  f"{conditions['trained']['gain_mean']:+.4f}, memory reset "
                  f"{conditions['memory_reset']['gain_mean']:+.4f}); load {load_average()}", flush=True)
        out = write_results(args.out_dir, out_name, report, markdown(report))  # partial results survive a crash
        plot(report, out / f"{out_name}.png")
    machine["load_average_at_end"] = load_average()
    report["load_range"] = load_range(list(report["results"].values()))
    out = write_results(args.out_dir, out_name, report, markdown(report))
    plot(report, out / f"{out_name}.png")
    written = written_files(out, out_name, machine["backend"], args.figure, keep_all=True)
    print("\n" + (out / f"{out_name}.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return report

if __name__ == "__main__":
    main(tyro.cli(Args))
