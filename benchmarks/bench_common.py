"""Helpers shared by the benchmark scripts: machine description, load average, result files.

Not a benchmark itself. The scripts import it from their own folder (`python benchmarks/bench_X.py`
puts `benchmarks/` first on sys.path) and add the repository root so that they can import the
training scripts as modules.
"""

import dataclasses
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # ppo_*.py and envs_popjax from the repo root

import jax  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402

FIGURES_DIR = ROOT / "benchmarks" / "figures"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (what `uptime` prints), or None where unsupported."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "load_average_at_start": load_average(),
    }


def machine_line(machine: dict) -> str:
    """One sentence naming the machine, for the markdown tables."""
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['cores_usable']} usable), "
        f"jax {machine['jax']} on {', '.join(machine['jax_devices'])}; load average (1/5/15 min) "
        f"{machine['load_average_at_start']} at start, {machine.get('load_average_at_end')} at end."
    )


def written_files(
    out: Path, out_name: str, backend: str, figure: bool, keep_all: bool = False, extra: tuple[str, ...] = ()
) -> list[Path]:
    """The JSON, markdown and PNG written under `out` (and `{out_name}{suffix}` for each of `extra`); with `figure`,
    the PNGs (with `keep_all`, all of them) are also copied to benchmarks/figures/{out_name}_{backend}* (committed
    with the README)."""
    written = [out / f"{out_name}{suffix}" for suffix in (".json", ".md", ".png", *extra)]
    if figure:
        FIGURES_DIR.mkdir(parents=True, exist_ok=True)
        for path in [p for p in written if (keep_all or p.suffix == ".png") and p.exists()]:  # some write no PNG
            suffix = path.name[len(out_name):]
            written.append(Path(shutil.copyfile(path, FIGURES_DIR / f"{out_name}_{backend}{suffix}")))
    return written


def write_results(out_dir: str, out_name: str, report: dict, table: str) -> Path:
    """Write `{out_dir}/{out_name}.json` and `.md`; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=float)
    # lists of numbers (learning curves) on one line each: the committed reports stay readable and small
    text = re.sub(r"\[\s+([-+\d.eE,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    (out / f"{out_name}.json").write_text(text + "\n")
    (out / f"{out_name}.md").write_text(table)
    return out


# The README's quick CPU settings, shared by bench_end_to_end.py (--preset quick) and
# bench_learning.py: PPO settings for both scripts, then each memory's width.
QUICK_PPO = dict(num_envs=32, num_steps=128, update_epochs=4, num_minibatches=4, learning_rate=3e-4)
QUICK_S5 = dict(d_model=64, ssm_size=64, n_layers=2)
QUICK_LSTM = dict(hidden_size=64)
# Tiny sizes for the CI smoke tests (compile dominates; nothing is learned).
SMOKE_PPO = dict(num_envs=4, num_steps=16, update_epochs=1, num_minibatches=2, learning_rate=3e-4)
SMOKE_S5 = dict(d_model=16, ssm_size=16, n_layers=1)
SMOKE_LSTM = dict(hidden_size=16)


def parse_overrides(args_class, overrides: tuple[str, ...]) -> dict:
    """`("s5_scan=sequential", "num_envs=16")` -> typed dict of fields of the dataclass `args_class`."""
    fields = {f.name: f for f in dataclasses.fields(args_class)}
    out = {}
    for item in overrides:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise SystemExit(f"override {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        default = fields[name].default
        if isinstance(default, bool):
            out[name] = text.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)):
            out[name] = type(default)(float(text)) if isinstance(default, int) else float(text)
        else:
            out[name] = text
    return out


# Resumable cells (bench_popgym_table.py, bench_memory_length.py): one cell is one call of a
# script's own `main(args)` into its own log folder; a finished cell is read back from the run
# folder's summary.json (plus the bench_cell.json written beside it), never re-run.
# filled in by the scripts' main; `resume` names the folder a run was continued from (--resume): the same run
DERIVED_ARGS = ("log_dir", "batch_size", "minibatch_size", "num_updates", "resume")


def args_match(saved: dict, args) -> bool:
    """Whether a run's saved Args (a dict) are the dataclass `args`: fields the script derives, and
    "auto" choices it resolves, are not compared; a field the saved run lacks (added to the script
    since) matches if `args` leaves it at its default; tuples compare as the lists JSON makes."""
    intended = json.loads(json.dumps(dataclasses.asdict(args)))
    defaults = json.loads(json.dumps(dataclasses.asdict(type(args)())))
    return all(saved[k] == v if k in saved else v == defaults[k]
               for k, v in intended.items() if k not in DERIVED_ARGS and v != "auto")  # fmt: skip


def finished_run(log_dir: Path, args, complete) -> tuple[Path, dict] | None:
    """The newest run folder under `log_dir` whose summary.json has the Args `args` and
    passes `complete(summary)` (an interrupted run writes a summary too), with its summary and
    the driver's bench_cell.json merged in; None if there is none. A run continued with --resume after
    the driver's cell (its summary newer than bench_cell.json) gets as wall time its compile and run
    seconds over all its sessions, and no load averages (those of the first session would mislead)."""
    for path in sorted(log_dir.glob("*/summary.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if args_match(summary.get("args", {}), args) and complete(summary):
            cell = path.parent / "bench_cell.json"
            extra = json.loads(cell.read_text()) if cell.exists() else {}
            if extra and cell.stat().st_mtime < path.stat().st_mtime and summary.get("run_seconds") is not None:
                seconds = summary["run_seconds"] + (summary.get("compile_seconds") or 0)
                extra = {"wall_seconds": seconds, "continued_with_resume": True}
            return path.parent, {**summary, **extra}
    return None


def from_previous(reports: list[dict], key: str, args, complete) -> dict | None:
    """The cell `key` of an earlier report (JSON of the same driver, e.g. its copy in
    benchmarks/figures) if it ran with the Args `args` and is complete; None otherwise."""
    for report in reports:
        r = report.get("results", {}).get(key)
        if r and args_match(r["script_args"], args) and complete(r):
            return {**r, "source": "previous report"}
    return None


def run_cell(module, args, log_dir: Path) -> tuple[Path, dict]:
    """`module.main(copy of args)` into `log_dir`; returns the new run folder and its summary.json
    (the script's Args under "args") plus wall time and load averages, which are also saved there
    as bench_cell.json."""
    log_dir.mkdir(parents=True, exist_ok=True)
    before = set(log_dir.iterdir())
    load_before, start = load_average(), time.perf_counter()
    module.main(dataclasses.replace(args, log_dir=str(log_dir)))  # main fills in derived fields
    extra = {"wall_seconds": time.perf_counter() - start, "load_average_before": load_before,
             "load_average_after": load_average()}  # fmt: skip
    run_dir = max(set(log_dir.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    (run_dir / "bench_cell.json").write_text(json.dumps(extra, indent=2) + "\n")
    return run_dir, {**json.loads((run_dir / "summary.json").read_text()), **extra}


def cell_result(module, args, log_dir: Path, key: str, previous: list[dict], complete) -> tuple:
    """One resumable cell: `(run_dir, result)` read back from `log_dir`, else taken from an earlier report
    (`from_previous`), else run here (`run_cell`); `result["source"]` says which."""
    if found := finished_run(log_dir, args, complete):
        return found[0], {**found[1], "source": "read back"}
    if r := from_previous(previous, key, args, complete):
        return r.get("run_dir"), r
    run_dir, r = run_cell(module, args, log_dir)
    return run_dir, {**r, "source": "run here"}


def read_curves(run_dir: Path, seeds: list[int]) -> dict:
    """{seed: (steps, returns)} from the run's TensorBoard files (tag charts/episodic_return)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = {}
    for s in seeds:
        acc = EventAccumulator(str(run_dir / f"seed_{s}"), size_guidance={"scalars": 0})
        acc.Reload()
        events = acc.Scalars("charts/episodic_return") if "charts/episodic_return" in acc.Tags()["scalars"] else []
        curves[str(s)] = ([int(e.step) for e in events], [float(e.value) for e in events])
    return curves


def mean_std_curve(curves: dict) -> tuple[list, list, list]:
    """Mean and std over seeds at every logged step (seeds with no episode there are left out)."""
    steps = sorted({x for xs, _ in curves.values() for x in xs})
    index = {x: i for i, x in enumerate(steps)}
    table = np.full((len(curves), len(steps)), np.nan)
    for row, (xs, ys) in enumerate(curves.values()):
        table[row, [index[x] for x in xs]] = ys
    with np.errstate(all="ignore"):
        mean, std = np.nanmean(table, 0), np.nanstd(table, 0)
    return steps, mean.tolist(), std.tolist()


def plot_return_curves(
    by_env: dict, s: dict, path: Path, colors: dict | None = None, memories: str | None = None
) -> None:
    """One panel per env of `by_env` ({env: {memory: cell}}): each cell's `curve_mean` (episodic return, mean ±
    std over seeds, against env steps per seed), labelled with its MMER, and its seeds' `curves` as thin lines where
    the cell has them; `s` is the report's settings, `colors` ({memory: colour}) keeps a memory's colour the same in
    every panel, `memories` names the memories' sizes in the title (default: S5 and the LSTM from `s`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(by_env)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    size = (max(4.5 * cols, 7), 3.4 * rows + 0.4)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")  # room for the suptitle
    for ax, (env_id, per_model) in zip(axes.flat, by_env.items()):
        for model, r in per_model.items():
            c = r.get("curve_mean")
            if not c or not c["steps"]:
                continue
            steps, mean, std = np.array(c["steps"]), np.array(c["mean"]), np.array(c["std"])
            marker = "." if len(steps) < 20 else None
            mmer = f"{r['mmer']['mean']:.3f} ± {r['mmer']['std']:.3f}" if r.get("mmer") else "n/a"
            color = (colors or {}).get(model)
            line = ax.plot(steps, mean, marker=marker, color=color, label=f"{model} (MMER {mmer})")[0]
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.25)
            for xs, ys in r.get("curves", {}).values():  # each seed, thin: seeds that part ways show
                ax.plot(xs, ys, color=line.get_color(), lw=0.5, alpha=0.5)
        ax.set_title(env_id, fontsize=10)
        ax.set_xlabel("env steps per seed")
        ax.set_ylabel("episodic return")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    memories = memories or f"S5 {s['s5']['n_layers']}x{s['s5']['d_model']}, LSTM {s['lstm']['hidden_size']}"
    fig.suptitle(f"episodic return, mean ± std over {len(s['seeds'])} seeds; {s['num_envs']} envs x {s['num_steps']} "
                 f"steps, {s['update_epochs']} epochs x {s['num_minibatches']} minibatches, lr {s['learning_rate']};\n"
                 f"{memories}; "
                 f"{s['total_timesteps']:,} steps per seed", fontsize=8)  # fmt: skip
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_range(cells) -> list[float] | None:
    """[min, max] of the 5-minute load average at the ends of the cells run (None if none ran here)."""
    loads = [c["load_average_after"][1] for c in cells if c.get("load_average_after")]
    return [min(loads), max(loads)] if loads else None
