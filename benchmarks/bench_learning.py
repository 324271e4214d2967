"""Learning: MMER of S5 against the LSTM on a set of POPGym envs at a stated budget, with curves.

For each env id, S5 then LSTM: the scripts' own `main(args)` (ppo_s5_popgym.py, ppo_lstm_popgym.py,
imported as modules) runs `--num-seeds` seeds vmapped, at the README's quick CPU settings
(`--num-envs 32 --num-steps 128 --update-epochs 4 --num-minibatches 4 --learning-rate 3e-4`;
S5 `--d-model 64 --ssm-size 64 --n-layers 2`, LSTM `--hidden-size 64`) and `--total-timesteps`
per seed, so every number is what a user running the script gets. MMER (max over updates of the
mean return of the episodes completed in the update, per seed; then mean +- std over seeds) comes
from the summary `main` returns; the learning curves are read back from the TensorBoard runs it
writes (`charts/episodic_return`, per seed).

Run from the repository root:

    python benchmarks/bench_learning.py                                     # 4 envs, 3 seeds, 500k steps
    python benchmarks/bench_learning.py --env-ids RepeatPreviousEasy CartPoleEasy --total-timesteps 300000 --figure
    python benchmarks/bench_learning.py --quick                             # smoke test: 1 env, tiny budget

Writes `{out_dir}/{out_name}.json` (machine, settings, per env and model: per-seed MMER, final
return, compile and run time, curves), `{out_name}.md` (the table) and `{out_name}.png` (episodic
return against env steps, mean +- std over seeds, one panel per env); `--figure` copies the PNG to
`benchmarks/figures/{out_name}_{backend}.png`. The TensorBoard runs go to `{out_dir}/{out_name}_runs/`.
`--quick` writes `bench_learning_quick.*` unless `--out-name` is given.
"""

import dataclasses
import sys
import time
from pathlib import Path

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

MODELS = {"S5": ppo_s5_popgym, "LSTM": ppo_lstm_popgym}
DEFAULT_ENVS = ("RepeatPreviousEasy", "AutoencodeEasy", "CountRecallEasy", "NoisyCartPoleEasy")


@dataclasses.dataclass
class Args:
    env_ids: tuple[str, ...] = DEFAULT_ENVS
    """POPGym env ids (aliases allowed: CartPoleEasy is PositionOnlyCartPoleEasy)"""
    models: tuple[str, ...] = ("S5", "LSTM")
    """which scripts to run: S5 (ppo_s5_popgym.py), LSTM (ppo_lstm_popgym.py)"""
    total_timesteps: int = 500_000
    """env steps per seed (the budget)"""
    num_seeds: int = 3
    """seeds per (env, model), vmapped in one run"""
    seed: int = 1
    """first seed; seeds are seed, seed + 1, ..."""
    ppo: tuple[str, ...] = ()
    """extra PPO Args for both scripts as FIELD=VALUE (over the quick settings), e.g. update_epochs=8"""
    s5: tuple[str, ...] = ()
    """extra ppo_s5_popgym Args as FIELD=VALUE, e.g. s5_scan=sequential"""
    lstm: tuple[str, ...] = ()
    """extra ppo_lstm_popgym Args as FIELD=VALUE, e.g. cell=gru"""
    quick: bool = False
    """smoke test: 2 seeds, tiny network, 4 updates of 64 steps, RepeatPreviousEasy unless --env-ids is given"""
    figure: bool = False
    """also write the PNG to benchmarks/figures/{out_name}_{backend}.png"""
    out_dir: str = "benchmarks/results"
    """folder for the JSON, markdown and PNG results (and the TensorBoard runs)"""
    out_name: str = ""
    """file stem of the results; default bench_learning (bench_learning_quick with --quick)"""


def run_one(module, a, log_dir: Path) -> dict:
    """`module.main(a)`; returns its summary plus the run folder, the curves and the wall time."""
    log_dir.mkdir(parents=True, exist_ok=True)
    before = set(log_dir.iterdir())
    load_before = load_average()
    start = time.perf_counter()
    summary = module.main(a)
    wall = time.perf_counter() - start
    run_dir = max(set(log_dir.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    seeds = [a.seed + i for i in range(a.num_seeds)]
    curves = read_curves(run_dir, seeds)
    steps, mean, std = mean_std_curve(curves)
    return {
        **summary,
        "wall_seconds": wall,
        "run_dir": str(run_dir),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "curves": curves,
        "curve_mean": {"steps": steps, "mean": mean, "std": std},
    }


def fmt_mmer(m: dict | None) -> str:
    return "n/a" if not m else f"{m['mean']:.3f} ± {m['std']:.3f}"


def markdown(report: dict) -> str:
    s, results = report["settings"], report["results"]
    models = report["args"]["models"]
    lines = [
        f"MMER (max over updates of the mean completed-episode return; mean ± std over seeds "
        f"{s['seeds'][0]}-{s['seeds'][-1]}) at {s['total_timesteps']:,} env steps per seed, "
        f"{s['num_envs']} envs x {s['num_steps']} steps, {s['update_epochs']} epochs x {s['num_minibatches']} "
        f"minibatches, lr {s['learning_rate']}; S5 d_model {s['s5']['d_model']}, SSM {s['s5']['ssm_size']}, "
        f"{s['s5']['n_layers']} layers; LSTM hidden {s['lstm']['hidden_size']}. {machine_line(report['machine'])}",
        "",
        "| env | " + " | ".join(f"{m} MMER" for m in models) + " | "
        + " | ".join(f"{m} final return" for m in models) + " | " + " | ".join(f"{m} wall (s)" for m in models) + " |",
        "|---|" + "---|" * (2 * len(models)) + "---:|" * len(models),
    ]
    for env_id, per_model in results.items():
        runs = [per_model.get(m, {}) for m in models]  # a partial report lacks the runs still to come
        cells = [fmt_mmer(r.get("mmer")) for r in runs] + [fmt_mmer(r.get("final_episodic_return")) for r in runs]
        cells += [f"{r['wall_seconds']:.0f}" if "wall_seconds" in r else "-" for r in runs]
        lines.append(f"| {env_id} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args: Args) -> dict:
    ppo, s5_size, lstm_size = QUICK_PPO, QUICK_S5, QUICK_LSTM
    if args.quick:
        env_ids = ("RepeatPreviousEasy",) if args.env_ids == DEFAULT_ENVS else args.env_ids
        args = dataclasses.replace(args, env_ids=env_ids, num_seeds=2, total_timesteps=4 * 64)
        ppo, s5_size, lstm_size = SMOKE_PPO, SMOKE_S5, SMOKE_LSTM
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        raise SystemExit(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    try:
        env_ids = [envs_popjax.canonical_id(e) for e in args.env_ids]
    except ValueError as error:  # names the closest valid ids
        raise SystemExit(f"--env-ids: {error}") from None
    out_name = args.out_name or ("bench_learning_quick" if args.quick else "bench_learning")
    log_dir = Path(args.out_dir) / f"{out_name}_runs"
    sizes = {"S5": s5_size, "LSTM": lstm_size}
    overrides = {name: {**parse_overrides(module.Args, args.ppo), **parse_overrides(module.Args, getattr(args, name.lower()))}
                 for name, module in MODELS.items()}  # fmt: skip
    script = {}
    for env_id in env_ids:  # build and check every run's Args before running any
        for name in args.models:
            module = MODELS[name]
            a = module.Args(
                env_id=env_id, seed=args.seed, num_seeds=args.num_seeds, total_timesteps=args.total_timesteps,
                log_dir=str(log_dir), **{**ppo, **sizes[name], **overrides[name]},
            )  # fmt: skip
            error = module.check_args(a)
            if error:
                raise SystemExit(f"{module.__name__}: {error}")
            script[env_id, name] = a
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores, jax {machine['jax']} on {machine['backend']}; "
          f"load {machine['load_average_at_start']}; {len(script)} runs", flush=True)  # fmt: skip

    first = dataclasses.asdict(script[env_ids[0], args.models[0]])
    s5_first = dataclasses.asdict(script.get((env_ids[0], "S5")) or ppo_s5_popgym.Args(**s5_size))
    lstm_first = dataclasses.asdict(script.get((env_ids[0], "LSTM")) or ppo_lstm_popgym.Args(**lstm_size))
    settings = {
        "total_timesteps": args.total_timesteps, "seeds": [args.seed + i for i in range(args.num_seeds)],
        **{k: first[k] for k in ("num_envs", "num_steps", "update_epochs", "num_minibatches", "learning_rate")},
        "s5": {k: s5_first[k] for k in ("d_model", "ssm_size", "n_layers", "s5_scan") if k in s5_first},
        "lstm": {k: lstm_first[k] for k in ("hidden_size", "cell")},
    }  # fmt: skip
    report = {
        "machine": machine, "args": dataclasses.asdict(args), "settings": settings, "unix_time": time.time(),
        "script_args": {f"{e}/{m}": dataclasses.asdict(a) for (e, m), a in script.items()}, "results": {},
    }  # fmt: skip
    results = report["results"]
    for env_id in env_ids:
        results[env_id] = {}
        for name in args.models:
            r = run_one(MODELS[name], script[env_id, name], log_dir)
            results[env_id][name] = r
            print(f"== {env_id} {name}: MMER {fmt_mmer(r['mmer'])}, wall {r['wall_seconds']:.0f} s "
                  f"(load {r['load_average_before']} -> {r['load_average_after']})", flush=True)  # fmt: skip
            write_results(args.out_dir, out_name, report, markdown(report))  # partial results survive a crash
    machine["load_average_at_end"] = load_average()
    report["unix_time"] = time.time()

    table = markdown(report)
    out = write_results(args.out_dir, out_name, report, table)
    plot_return_curves(report["results"], report["settings"], out / f"{out_name}.png")
    written = written_files(out, out_name, machine["backend"], args.figure)
    print("\n" + table)
    print("wrote " + ", ".join(str(p) for p in written))
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
