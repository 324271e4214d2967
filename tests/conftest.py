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
