"""Shared pytest setup: the repository root on sys.path so tests import the scripts as modules, and XLA's CPU
backend at LLVM -O0 for every JAX program of the suite (in this process and, through the environment, in the scripts
it launches). The tests compile many small programs and run each for a few steps: at -O0 a tiny ppo_s5_metarl run
compiles in 20 s instead of 50 s on 2 cores, with the same results to the printed digits. Every comparison in the
suite is between programs compiled with the same flags (or against numpy / popgym within a tolerance)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# read when JAX starts its CPU backend, which no test has done yet at this point
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# `python -m pytest tests -m quick`: a subset for a quick check (a few minutes on 2 cores) of the scan, GAE, a few env
# differentials against popgym, one end-to-end run per script and the documented commands. The full suite stays the CI
# command. An entry selects the test with that node id (relative to the repository root) and everything under it: a
# file, a test with all its parameters, or one parametrised case.
QUICK = (
    "tests/test_s5_scan.py::test_scan_equals_sequential_loop_float64",
    "tests/test_s5_scan.py::test_reset_operator_is_associative",
    "tests/test_s5_scan.py::test_reset_gives_same_output_as_fresh_carry",
    "tests/test_s5_scan.py::test_memory_one_step_at_a_time_equals_parallel_pass[paper]",
    "tests/test_ppo_s5_popgym.py::test_gae_equals_python_loop",
    "tests/test_ppo_lstm_popgym.py::test_gae_equals_python_loop",
    "tests/test_ppo_s5_metarl.py::test_gae_bootstraps_across_inner_episodes_and_masks_trial_ends",
    "tests/test_envs_basic.py::test_card_env_matches_popgym_step_by_step[RepeatPrevious-Easy-make]",
    "tests/test_envs_basic.py::test_card_env_matches_popgym_step_by_step[RepeatPrevious-Easy-make_vec]",
    "tests/test_envs_basic.py::test_cartpole_matches_popgym_step_by_step[PositionOnlyCartPole-Easy-make]",
    "tests/test_envs_cards.py::test_step_by_step_equals_popgym[CountRecallEasy-make]",
    "tests/test_envs_control.py::test_pendulum_matches_popgym_float64",
    "tests/test_envs_grid.py::test_minesweeper_matches_popgym_step_by_step[make-Easy]",
    "tests/test_envs_grid.py::test_labyrinth_matches_popgym_step_by_step[make-LabyrinthEscape-Easy]",
    "tests/test_ppo_s5_popgym.py::test_load_model_and_evaluation_reproduce_the_trained_policy",
    "tests/test_ppo_lstm_popgym.py::test_cli_run_equals_single_seed_runs_and_its_model_evaluates",
    "tests/test_ppo_s5_memory.py::test_sweep_writes_table_plot_json_and_tensorboard",
    "tests/test_ppo_s5_metarl.py::test_non_finite_loss_stops_the_run_and_summary_is_strict_json",
    "tests/test_ppo_loss.py::test_ppo_loss_equals_reference_float64",
    "tests/test_s5_layer.py::test_s5_layer_equals_the_papers_equations_float64",
    "tests/test_incontext.py::test_meta_cartpole_equals_reference",
    "tests/test_console.py::test_stderr_filter_drops_exactly_the_cache_load_noise",
    "tests/test_resume_rules.py",
    "tests/test_docs.py",
)


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: the quick subset (`python -m pytest tests -m quick`), see QUICK")


def pytest_collection_modifyitems(config, items):
    matched = set()
    for item in items:
        path, _, rest = item.nodeid.partition("::")
        node_id = os.path.relpath(str(item.path), ROOT).replace(os.sep, "/") + ("::" + rest if rest else "")
        entries = [e for e in QUICK if node_id == e or node_id.startswith((e + "::", e + "["))]
        if entries:
            item.add_marker("quick")
            matched.update(entries)
    collected = {os.path.relpath(str(item.path), ROOT).replace(os.sep, "/") for item in items}
    stale = [e for e in QUICK if e not in matched and e.split("::")[0] in collected]
    if stale and "quick" in (config.getoption("markexpr", "") or ""):  # a renamed test would leave the subset silently
        import warnings

        warnings.warn(f"tests/conftest.py QUICK entries that select no collected test: {', '.join(stale)}")
