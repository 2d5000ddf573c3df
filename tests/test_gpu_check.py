"""scripts/gpu_check.sh's bookkeeping, with stand-ins for the benchmark and the parity check: the budget, the
record of failed and skipped runs, and the resume that lets one time-boxed GPU session be spent in two calls."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
RUNS = [  # gpu_check.sh's labels, in its order
    "large-30s-b16", "large-30s-b64-remat", "base-30s-b128-vs-compile", "large-30s-b16-vs-compile-regional",
    "medium-30s-b32-vs-compile-regional", "small-30s-b64-vs-compile", "base-10s-b128", "base-30s-b128-vs-eager",
]

STAND_IN_BENCHMARK = '''
import json, os, sys
args = sys.argv[1:]
label, jsonl = args[args.index("--label") + 1], args[args.index("--jsonl") + 1]
with open(os.environ["CALLS"], "a") as calls:
    calls.write(f"{label}:{args[args.index('--attention') + 1]}\\n")
if label in os.environ.get("FAIL", "").split():
    sys.exit(3)
row = dict(label=label, device="stand-in", matmul_peak_tflops=800.0, samples_per_s=10.0, step_time_s=0.1,
           tflops_model=300.0, fraction_of_peak_model=0.375, tflops_cost_analysis=None, peak_memory_bytes=2**30,
           init_s=1.0, compile_s=2.0, baseline=None, ratio=None, profile=None)
with open(jsonl, "a") as out:
    out.write(json.dumps(row) + "\\n")
'''
STAND_IN_PARITY = '''
import os, sys
open(os.environ["CALLS"], "a").write("parity\\n")
sys.exit(1 if "parity" in os.environ.get("FAIL", "").split() else 0)  # silent either way
'''


def gpu_check(tmp_path: Path, out: str, budget_s: int, fail: str = "") -> tuple[list[str], list[dict], str]:
    """Run a copy of gpu_check.sh whose scripts are the stand-ins; returns (calls made, bench.jsonl rows, log)."""
    root = tmp_path / "repository"
    if not root.exists():
        (root / "scripts").mkdir(parents=True)
        shutil.copy(REPOSITORY / "scripts" / "gpu_check.sh", root / "scripts")
        (root / "scripts" / "benchmark.py").write_text(STAND_IN_BENCHMARK)
        (root / "scripts" / "attention_parity.py").write_text(STAND_IN_PARITY)
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "python3").symlink_to(sys.executable)
    calls = tmp_path / f"calls-{out}.txt"
    calls.touch()
    env = dict(
        os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", OUT=str(tmp_path / out), BUDGET_S=str(budget_s),
        STATE_DIR=str(tmp_path / "state"), CALLS=str(calls), FAIL=fail, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
    )
    subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], env=env, check=True, capture_output=True, timeout=120)
    rows = [json.loads(line) for line in (tmp_path / out / "bench.jsonl").read_text().splitlines()]
    return calls.read_text().split(), rows, (tmp_path / out / "log.txt").read_text()


def test_a_second_call_runs_only_what_the_first_did_not_finish(tmp_path):
    calls, rows, log = gpu_check(tmp_path, "first", budget_s=10_000, fail="small-30s-b64-vs-compile")
    assert calls == ["parity", *(f"{label}:cudnn" for label in RUNS)]  # a silent, passing check keeps cuDNN
    assert [row["label"] for row in rows] == RUNS
    # recorded, not done (the seconds depend on the machine's load)
    assert re.fullmatch(r"exit 3 after \d+ s", rows[RUNS.index("small-30s-b64-vs-compile")]["error"])
    assert "| large-30s-b16 | 10.0 | 100.0 | 300 (38%)" in log  # the summary table

    calls, rows, log = gpu_check(tmp_path, "second", budget_s=10_000)
    assert calls == ["small-30s-b64-vs-compile:cudnn"]  # neither the parity check nor a finished run again
    assert [row["label"] for row in rows] == ["small-30s-b64-vs-compile"]
    assert "attention implementation from this machine's earlier call: cudnn" in log
    assert "== large-30s-b16: done in an earlier call on this machine" in log


def test_a_failed_attention_check_switches_every_run_to_xla(tmp_path):
    calls, _, log = gpu_check(tmp_path, "first", budget_s=10_000, fail="parity")
    assert calls == ["parity", *(f"{label}:xla" for label in RUNS)]
    assert "cuDNN attention failed or disagreed" in log


def test_runs_that_would_not_fit_the_budget_are_skipped_and_recorded(tmp_path):
    """With 100 s, only the two runs estimated at ≤ 100 s start (the 10 s window, the eager baseline); the
    others are recorded as skipped, so the next call runs them."""
    calls, rows, _ = gpu_check(tmp_path, "short", budget_s=100)
    assert calls == ["parity", "base-10s-b128:cudnn", "base-30s-b128-vs-eager:cudnn"]
    skipped = [row["label"] for row in rows if row.get("error", "").startswith("skipped")]
    assert skipped == RUNS[:6]
    calls, _, _ = gpu_check(tmp_path, "rest", budget_s=10_000)
    assert calls == [f"{label}:cudnn" for label in RUNS[:6]]
