"""Memory-layer cost against sequence length: forward+backward time and peak memory per batch.

Series (each maps `(carry, x[T, B, H], resets[T, B]) -> (carry, y[T, B, H])`):
- `s5_parallel`: `S5Memory` imported from ppo_s5_popgym.py (the resettable S5 stack, associative scan);
- `s5_sequential`: the same module with `scan="sequential"` (lax.scan over time; same numbers);
- `lstm`: `RNNMemory` imported from ppo_lstm_popgym.py (flax OptimizedLSTMCell under nn.scan);
- `attention`: a causal self-attention stack defined here (pre-LayerNorm, multi-head attention,
  MLP, residuals; no positional encoding), one block per S5 layer. Episode resets ARE applied, as a
  block-diagonal mask: position t attends to position s <= t only inside the same episode, which
  is what resetting a memory means for attention. The mask is dense, so the cost is that of plain
  causal attention (O(T^2) in time and memory per layer).

For each series and each length T = min_length, 2 min_length, ... max_length: the loss is the mean
square of the output; `jax.value_and_grad` over the parameters and the input is jitted and
compiled ahead of time (compile excluded), run once untimed, then `--repeats` timed runs each
ending in `block_until_ready`; the median is reported. A series stops at the first length that
does not fit (compiled memory above `--max-memory-gb`, or the allocator fails) or whose time
exceeds `--time-cap` seconds (that point is kept; if the untimed run alone exceeded the cap, its
time is the one reported).

Peak memory per point: on GPU `device.memory_stats()["peak_bytes_in_use"]` (a process-wide high
water mark, so lengths run in increasing order); everywhere the compiled executable's
`memory_analysis()` (temp + argument + output - alias bytes), which is what the CPU column shows.
The JSON says which one each number is.

Run from the repository root:

    python benchmarks/bench_memory_layers.py              # batch 1, width 256, 4 layers: about 10 min on 2 cores
    python benchmarks/bench_memory_layers.py --figure     # also writes the PNG to benchmarks/figures/
    python benchmarks/bench_memory_layers.py --quick      # smoke test: width 16, lengths 64 and 128, seconds

Writes `{out_dir}/{out_name}.json` (machine, settings, every point), `{out_name}.md` (the table)
and `{out_name}.png` (log-log time and memory against length, one line per series); `--figure`
copies the PNG to `benchmarks/figures/{out_name}_{backend}.png`. `--quick` writes
`bench_memory_layers_quick.*` unless `--out-name` is given.
"""

import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common beside this file
from bench_common import load_average, machine_info, machine_line, write_results, written_files  # noqa: E402
from ppo_lstm_popgym import RNNMemory  # noqa: E402
from ppo_s5_popgym import S5Config, S5Memory  # noqa: E402

SERIES = ("s5_parallel", "s5_sequential", "lstm", "attention")


@dataclasses.dataclass
class Args:
    series: tuple[str, ...] = SERIES
    """which layers to time: s5_parallel, s5_sequential, lstm, attention"""
    batch_size: int = 1
    """sequences per batch (the paper's PPO minibatch holds 8 sequences of 1024; 1 lets a CPU reach long lengths)"""
    d_model: int = 256
    """width H of every layer's input and output (S5 d_model, LSTM hidden size, attention width)"""
    ssm_size: int = 256
    """S5 state size P (before conjugate symmetry halves it)"""
    n_layers: int = 4
    """S5 layers, and attention blocks (the LSTM is one cell, as in the paper's baseline)"""
    n_heads: int = 4
    """attention heads"""
    mlp_ratio: int = 1
    """attention MLP width / H; 1 gives two H x H Dense layers, like the GLU of an S5 block"""
    min_length: int = 64
    """first sequence length"""
    max_length: int = 65536
    """last sequence length tried (lengths double)"""
    repeats: int = 5
    """timed runs per point; the median is reported"""
    time_cap: float = 3.0
    """seconds: a series stops after the first length whose forward+backward takes longer"""
    max_memory_gb: float = 4.0
    """a series stops at the first length whose compiled memory exceeds this (the machine is shared)"""
    reset_prob: float = 0.01
    """probability that a step starts a new episode (step 0 always does)"""
    seed: int = 0
    """seed of the inputs and parameters"""
    quick: bool = False
    """smoke test: width 16, 1 layer, 2 heads, lengths 64 and 128, 1 repeat"""
    figure: bool = False
    """also write the PNG to benchmarks/figures/{out_name}_{backend}.png"""
    out_dir: str = "benchmarks/results"
    """folder for the JSON, markdown and PNG results"""
    out_name: str = ""
    """file stem of the results; default bench_memory_layers (bench_memory_layers_quick with --quick)"""


# ---------------------------------------------------------------------------------------------
# Causal self-attention with episode resets (the Transformer the paper compares against).
# ---------------------------------------------------------------------------------------------
class AttentionBlock(nn.Module):
    """Pre-LN block: x + MHA(LN(x)) then x + MLP(LN(x)); x: [B, T, H], mask: [B, T, T] bool."""

    n_heads: int
    mlp_ratio: int = 1

    @nn.compact
    def __call__(self, x, mask):
        batch, length, width = x.shape
        head_dim = width // self.n_heads
        qkv = nn.Dense(3 * width)(nn.LayerNorm()(x)).reshape(batch, length, 3, self.n_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        scores = jnp.where(mask[:, None], scores, jnp.finfo(scores.dtype).min)
        attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        x = x + nn.Dense(width)(attended.reshape(batch, length, width))
        h = nn.gelu(nn.Dense(self.mlp_ratio * width)(nn.LayerNorm()(x)))
        return x + nn.Dense(width)(h)


class AttentionMemory(nn.Module):
    """A stack of causal attention blocks with the memory interface; the carry is unused (None).

    resets[t, b] = True starts a new episode at t: a position attends only to earlier positions
    of its own episode (block-diagonal causal mask).
    """

    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 1

    @nn.compact
    def __call__(self, carry, x, resets):
        x = jnp.swapaxes(x, 0, 1)  # [B, T, H]
        episode = jnp.cumsum(jnp.swapaxes(resets, 0, 1), axis=1)  # [B, T]: episode index of each step
        length = x.shape[1]
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal[None] & (episode[:, :, None] == episode[:, None, :])
        for _ in range(self.n_layers):
            x = AttentionBlock(self.n_heads, self.mlp_ratio)(x, mask)
        return carry, jnp.swapaxes(x, 0, 1)


def build_layer(name: str, args: Args):
    """(module, initial carry) for one series."""
    if name in ("s5_parallel", "s5_sequential"):
        scan = "parallel" if name == "s5_parallel" else "sequential"
        config = S5Config(d_model=args.d_model, ssm_size=args.ssm_size, n_layers=args.n_layers, s5_scan=scan)
        return S5Memory(config), S5Memory.initialize_carry(args.batch_size, config)
    if name == "lstm":
        return RNNMemory(hidden_size=args.d_model), RNNMemory.initialize_carry(args.batch_size, args.d_model)
    if name == "attention":
        return AttentionMemory(args.n_layers, args.n_heads, args.mlp_ratio), None
    raise ValueError(f"unknown series {name!r}; choose from {', '.join(SERIES)}")


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
def compiled_bytes(compiled) -> dict | None:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (not every backend implements it)
        return None
    if stats is None:
        return None
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes")
    raw = {f: int(getattr(stats, f)) for f in fields}
    raw["total"] = sum(raw[f] for f in fields[:3]) - raw["alias_size_in_bytes"]  # aliased outputs reuse inputs
    return raw


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()  # None on CPU
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def measure_point(name: str, length: int, args: Args) -> dict:
    """Compile and time one (series, length); returns the point's record (never raises on OOM)."""
    module, carry = build_layer(name, args)
    key_x, key_r, key_p = jax.random.split(jax.random.fold_in(jax.random.key(args.seed), length), 3)
    x = jax.random.normal(key_x, (length, args.batch_size, args.d_model))
    resets = (jax.random.uniform(key_r, (length, args.batch_size)) < args.reset_prob).at[0].set(True)
    params = jax.jit(module.init)(key_p, carry, x[:1], resets[:1])  # parameters do not depend on T
    n_params = sum(p.size for p in jax.tree.leaves(params))

    def loss(params, carry, x, resets):
        _, y = module.apply(params, carry, x, resets)
        return jnp.mean(y**2)

    point = {"length": length, "n_params": int(n_params)}
    t = time.perf_counter()
    try:
        # gradients for the parameters and the input (in a network the memory sits after an encoder)
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 2))).lower(params, carry, x, resets).compile()
    except Exception as error:  # noqa: BLE001 (XLA reports OOM at compile time on some backends)
        return {**point, "status": "does not fit", "error": str(error).splitlines()[0][:300]}
    point["compile_s"] = time.perf_counter() - t
    point["compiled_bytes"] = compiled_bytes(compiled)
    if point["compiled_bytes"] and point["compiled_bytes"]["total"] > args.max_memory_gb * 2**30:
        return {**point, "status": "over memory budget"}
    try:
        t = time.perf_counter()
        jax.block_until_ready(compiled(params, carry, x, resets))  # warm-up (allocations)
        first = time.perf_counter() - t
        times = []
        if first <= args.time_cap:
            for _ in range(args.repeats):
                t = time.perf_counter()
                jax.block_until_ready(compiled(params, carry, x, resets))
                times.append(time.perf_counter() - t)
    except Exception as error:  # noqa: BLE001 (allocation failure at run time)
        return {**point, "status": "does not fit", "error": str(error).splitlines()[0][:300]}
    point["times_s"] = times or [first]
    point["time_s"] = statistics.median(point["times_s"])
    point["device_peak_bytes"] = device_peak_bytes()
    point["peak_bytes"] = point["device_peak_bytes"] or (point["compiled_bytes"] or {}).get("total")
    point["status"] = "over time cap" if point["time_s"] > args.time_cap else "ok"
    return point


def scaling_exponent(points: list[dict], key: str, last: int = 3) -> float | None:
    """Slope of log(key) against log(length) over the last `last` measured points (1: linear, 2: quadratic)."""
    timed = [p for p in points if p.get(key)][-last:]
    if len(timed) < 2:
        return None
    slope = np.polyfit(np.log2([p["length"] for p in timed]), np.log2([p[key] for p in timed]), 1)[0]
    return float(slope)


def lengths(args: Args) -> list[int]:
    out, n = [], args.min_length
    while n <= args.max_length:
        out.append(n)
        n *= 2
    return out


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "-"
    if b < 2**20:
        return f"{b / 2**10:.0f} KiB"
    return f"{b / 2**20:.0f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def point_memory(p: dict) -> int | None:
    return p.get("peak_bytes") or (p.get("compiled_bytes") or {}).get("total")


def point_cells(p: dict | None) -> tuple[str, str]:
    """(time, memory) table cells of one point; a stopped point shows why instead of a time."""
    if p is None:
        return "", ""
    if "time_s" not in p:
        return p["status"], fmt_bytes(point_memory(p))
    return fmt_time(p["time_s"]) + (" (cap)" if p["status"] != "ok" else ""), fmt_bytes(point_memory(p))


def markdown(results: dict, args: Args, machine: dict, memory_source: str) -> str:
    all_lengths = sorted({p["length"] for pts in results.values() for p in pts})
    names = list(results)
    params = {n: next((p["n_params"] for p in results[n]), None) for n in names}
    lines = [
        f"Forward+backward (value_and_grad of mean(y^2) over the parameters and the input) per batch of "
        f"{args.batch_size} sequences, width {args.d_model}: S5 {args.n_layers} layers, P={args.ssm_size}; "
        f"LSTM 1 cell; attention {args.n_layers} blocks, {args.n_heads} heads, MLP x{args.mlp_ratio}. "
        f"jit, compile excluded, median of {args.repeats}. Memory: {memory_source}. {machine_line(machine)}",
        "",
        "Parameters: " + ", ".join(f"{n} {params[n]:,}" for n in names if params[n] is not None) + ".",
        "",
        "| length | " + " | ".join(f"{n} time" for n in names) + " | " + " | ".join(f"{n} memory" for n in names) + " |",
        "|---:|" + "---:|" * (2 * len(names)),
    ]
    for length in all_lengths:
        cells = [point_cells(next((p for p in results[n] if p["length"] == length), None)) for n in names]
        lines.append(f"| {length} | " + " | ".join(c[0] for c in cells) + " | " + " | ".join(c[1] for c in cells) + " |")
    slopes = [scaling_exponent(results[n], key) for key in ("time_s", "peak_bytes") for n in names]
    lines.append("| slope, last 3 lengths | " + " | ".join("-" if e is None else f"{e:.2f}" for e in slopes) + " |")
    lines += ["", "Slope: of log(time) and log(memory) against log(length) over each series' last three "
              "measured lengths (1 = linear, 2 = quadratic)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: dict, args: Args, machine: dict, path: Path, memory_source: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in results.items():
        timed = [p for p in points if "time_s" in p]
        if timed:
            ax_t.plot([p["length"] for p in timed], [p["time_s"] for p in timed], "o-", label=name)
            ax_m.plot([p["length"] for p in timed], [p["peak_bytes"] / 2**20 for p in timed], "o-", label=name)
    for ax, ylabel in ((ax_t, "forward+backward time per batch (s)"), (ax_m, f"peak memory (MiB, {memory_source})")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"batch {args.batch_size}, width {args.d_model}, {args.n_layers} S5 layers / attention blocks, LSTM 1 cell; "
        f"{machine['backend']}: {machine['cpu'] if machine['backend'] == 'cpu' else machine['jax_devices'][0]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: Args) -> dict:
    if args.quick:
        args = dataclasses.replace(
            args, d_model=16, ssm_size=16, n_layers=1, n_heads=2, batch_size=2, min_length=64, max_length=128, repeats=1
        )
    if min(args.batch_size, args.d_model, args.ssm_size, args.n_layers, args.n_heads, args.mlp_ratio, args.min_length,
           args.repeats) < 1 or args.time_cap <= 0 or args.max_memory_gb <= 0:  # fmt: skip
        raise SystemExit("sizes, --repeats, --time-cap and --max-memory-gb must be positive")
    if args.d_model % args.n_heads:
        raise SystemExit(f"--d-model {args.d_model} must be divisible by --n-heads {args.n_heads}")
    unknown = [s for s in args.series if s not in SERIES]
    if unknown:
        raise SystemExit(f"--series: unknown {unknown}; choose from {', '.join(SERIES)}")
    out_name = args.out_name or ("bench_memory_layers_quick" if args.quick else "bench_memory_layers")
    machine = machine_info()
    on_gpu = device_peak_bytes() is not None
    memory_source = (
        "device.memory_stats()['peak_bytes_in_use'] (process high-water mark)"
        if on_gpu
        else "compiled memory_analysis(): temp + argument + output - alias bytes"
    )
    print(f"{machine['cpu']}, {machine['cores']} cores, jax {machine['jax']} on {machine['backend']}; "
          f"load {machine['load_average_at_start']}", flush=True)  # fmt: skip

    results = {}

    def report_and_table() -> tuple[dict, str]:
        report = {
            "machine": machine, "args": dataclasses.asdict(args), "unix_time": time.time(),
            "memory_source": "device_peak_bytes" if on_gpu else "compiled_bytes.total", "memory_note": memory_source,
            "results": results,
            "scaling_exponent_last3": {
                n: {"time": scaling_exponent(pts, "time_s"), "memory": scaling_exponent(pts, "peak_bytes")}
                for n, pts in results.items()
            },
        }  # fmt: skip
        return report, markdown(results, args, machine, memory_source)

    for name in args.series:
        results[name] = []
        for length in lengths(args):
            point = measure_point(name, length, args)
            point["load_average"] = load_average()
            results[name].append(point)
            print(f"{name:>14} T={length:>6}: {point['status']:>18}  {fmt_time(point.get('time_s')):>10}  "
                  f"{fmt_bytes(point_memory(point)):>9}  (compile {point.get('compile_s', float('nan')):.1f} s, "
                  f"load {point['load_average']})", flush=True)  # fmt: skip
            if point["status"] != "ok":
                break
        write_results(args.out_dir, out_name, *report_and_table())  # partial results survive a crash
    machine["load_average_at_end"] = load_average()

    report, table = report_and_table()
    out = write_results(args.out_dir, out_name, report, table)
    plot(results, args, machine, out / f"{out_name}.png", "device peak" if on_gpu else "compiled")
    written = written_files(out, out_name, machine["backend"], args.figure)
    print("\n" + table)
    print("wrote " + ", ".join(str(p) for p in written))
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
