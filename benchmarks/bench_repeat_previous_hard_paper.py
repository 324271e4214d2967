"""RepeatPreviousHard at the paper's settings: the learning curve of a long run, however far it has got.

The paper's POPGym settings are the scripts' defaults (64 envs x 1024 steps, 30 epochs x 8 minibatches, lr 5e-5,
width 256; S5: 4 layers), 15M steps per seed: hours per seed on a CPU, so the run is a plain script run with frequent
checkpoints, continued with --resume until it reaches 15M steps. This reads the run folders back (TensorBoard's
charts/episodic_return, the latest checkpoint) and reports the curve, the MMER so far and the steps reached:

    python ppo_s5_popgym.py --env-id RepeatPreviousHard --exp-name S5 --checkpoint-every 4 \\
        --log-dir benchmarks/results/bench_repeat_previous_hard_paper_runs          # S5, seed 1
    python ppo_lstm_popgym.py --env-id RepeatPreviousHard --cell gru --exp-name GRU --checkpoint-every 4 \\
        --updates-per-chunk 1 --log-dir benchmarks/results/bench_repeat_previous_hard_paper_runs   # the paper's GRU
    python ppo_s5_popgym.py --resume benchmarks/results/bench_repeat_previous_hard_paper_runs/RUN   # continue
    python benchmarks/bench_repeat_previous_hard_paper.py --figure                 # read back, write the report

Writes `{out_dir}/bench_repeat_previous_hard_paper.{json,md,png}`; `--figure` copies them to
`benchmarks/figures/bench_repeat_previous_hard_paper_{backend}.*`. A run in that committed report whose folder is not
on this machine keeps its committed numbers (a run folder is gitignored and lives on one machine's disk).
"""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common beside this file
from bench_common import FIGURES_DIR, machine_info, read_curves, write_results, written_files  # noqa: E402
import ppo_lstm_popgym  # noqa: E402
import ppo_s5_popgym  # noqa: E402

OUT_NAME = "bench_repeat_previous_hard_paper"


@dataclasses.dataclass
class Args:
    runs_dir: str = f"benchmarks/results/{OUT_NAME}_runs"
    """folder whose run folders (those with checkpoints) are read: RepeatPreviousHard__{S5,GRU}__SEED__STAMP"""
    figure: bool = False
    """also copy the JSON, table and PNG to benchmarks/figures/bench_repeat_previous_hard_paper_{backend}.*"""
    out_dir: str = "benchmarks/results"
    """folder for the JSON, markdown and PNG"""
    earlier_report: str | None = None
    """a report whose runs are kept where their folder is not under runs_dir (a run folder lives on one machine's
    disk, its numbers in the committed report); default: benchmarks/figures/bench_repeat_previous_hard_paper_{backend}
    .json if it exists; "" for none"""


def read_run(run_dir: Path) -> dict:
    """One run folder: its Args, the checkpointed progress (updates, run seconds), the TensorBoard curve, the MMER."""
    step, meta, _ = ppo_s5_popgym.restore_checkpoint(str(run_dir), meta_only=True)  # the same format in both scripts
    args = meta["args"]
    module = ppo_lstm_popgym if "cell" in args else ppo_s5_popgym
    summary = run_dir / "summary.json"
    finished = summary.exists() and json.loads(summary.read_text())["updates"] == args["num_updates"]
    (steps, returns), = read_curves(run_dir, [args["seed"]]).values()
    batch = args["num_envs"] * args["num_steps"]
    kept = [(s, r) for s, r in zip(steps, returns) if s <= step * batch]  # what the checkpoint has (a kill: beyond)
    finite = [r for _, r in kept if np.isfinite(r)]
    return {
        "run_dir": str(run_dir), "script": Path(module.__file__).name, "env_id": args["env_id"], "seed": args["seed"],
        "memory": f"{args['cell'].upper()} {args['hidden_size']}" if "cell" in args
        else f"S5 {args['n_layers']}x{args['d_model']}",
        "settings": {k: args[k] for k in ("num_envs", "num_steps", "update_epochs", "num_minibatches",
                                          "learning_rate", "total_timesteps")},
        "updates_done": step, "updates_total": args["num_updates"], "steps_done": step * batch, "finished": finished,
        "run_seconds": meta["run_seconds"], "mmer": max(finite) if finite else None,
        "final_return": finite[-1] if finite else None, "curve": [[s for s, _ in kept], [r for _, r in kept]],
    }  # fmt: skip


SOLVED_RETURN = 0.9  # of RepeatPreviousHard's best return, 1.0 (the random policy's: -0.5)


def first_step_at(curve: list, level: float) -> int | None:
    """The first logged step whose episodic return is at least `level` (None: not yet)."""
    return next((s for s, r in zip(*curve) if r >= level), None)  # NaN (no episode ended) compares False


def markdown(report: dict) -> str:
    lines = ["# RepeatPreviousHard at the paper's settings", "",
             f"| memory | script | seed | steps done | of | MMER so far | last return | return >= {SOLVED_RETURN} from "
             "| run time |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"].values():
        mmer, last = (f"{r[k]:.3f}" if r[k] is not None else "n/a" for k in ("mmer", "final_return"))
        solved = first_step_at(r["curve"], SOLVED_RETURN)
        lines.append(f"| {r['memory']} | {r['script']} | {r['seed']} | {r['steps_done']:,} | "
                     f"{r['updates_total'] * r['settings']['num_envs'] * r['settings']['num_steps']:,} | {mmer} | "
                     f"{last} | {f'{solved:,} steps' if solved is not None else 'not yet'} | "
                     f"{r['run_seconds'] / 3600:.2f} h |")
    m = report["machine"]
    return "\n".join(lines + ["", f"Machine: {m['cpu']}, {m['cores']} cores, jax {m['jax']} ({m['backend']})."]) + "\n"


def plot(report: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for r in report["runs"].values():
        steps, returns = r["curve"]
        ax.plot(steps, returns, label=f"{r['memory']} seed {r['seed']} ({r['steps_done']:,} steps)")
    ax.set(title="RepeatPreviousHard, the paper's settings", xlabel="env steps", ylabel="episodic return",
           xlim=(0, 15_000_000))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: Args) -> dict:
    runs_dir = Path(args.runs_dir)
    runs = sorted(p for p in runs_dir.iterdir() if (p / "checkpoints").is_dir()) if runs_dir.is_dir() else []
    machine = machine_info()
    earlier = Path(args.earlier_report if args.earlier_report is not None
                   else FIGURES_DIR / f"{OUT_NAME}_{machine['backend']}.json")  # fmt: skip
    kept = json.loads(earlier.read_text())["runs"] if args.earlier_report != "" and earlier.is_file() else {}
    read = kept | {p.name: read_run(p) for p in runs}  # a run folder on this machine wins over the earlier report
    if not read:
        raise SystemExit(f"no run folder with checkpoints under {args.runs_dir}: start one (see this file's docstring)")
    report = {"machine": machine, "runs": dict(sorted(read.items()))}
    out = write_results(args.out_dir, OUT_NAME, report, markdown(report))
    plot(report, out / f"{OUT_NAME}.png")
    written = written_files(out, OUT_NAME, machine["backend"], args.figure, keep_all=True)
    print((out / f"{OUT_NAME}.md").read_text() + "wrote " + ", ".join(str(p) for p in written))
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
