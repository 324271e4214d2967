"""Helpers shared by the benchmark scripts: machine description, load average, result files.

Not a benchmark itself. The scripts import it from their own folder (`python benchmarks/bench_X.py`
puts `benchmarks/` first on sys.path) and add the repository root so that they can import the
training scripts as modules.
"""

import dataclasses
import json
import os
import platform
import shutil
import sys
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


def written_files(out: Path, out_name: str, backend: str, figure: bool) -> list[Path]:
    """The JSON, markdown and PNG written under `out`; with `figure`, the PNG is also copied to
    benchmarks/figures/{out_name}_{backend}.png (committed with the README)."""
    written = [out / f"{out_name}.json", out / f"{out_name}.md", out / f"{out_name}.png"]
    if figure:
        FIGURES_DIR.mkdir(parents=True, exist_ok=True)
        written.append(Path(shutil.copyfile(out / f"{out_name}.png", FIGURES_DIR / f"{out_name}_{backend}.png")))
    return written


def write_results(out_dir: str, out_name: str, report: dict, table: str) -> Path:
    """Write `{out_dir}/{out_name}.json` and `.md`; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{out_name}.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
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
