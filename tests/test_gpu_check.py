"""scripts/gpu_check.sh's bookkeeping, with stand-ins for the benchmark and the parity check: the budget, the
record of failed and skipped runs, and the resume that lets one time-boxed GPU session be spent in two calls."""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "scripts"))

import benchmark  # noqa: E402  (for a profile made by its trace functions)

RUNS = [  # gpu_check.sh's labels, in its order
    "large-30s-b16-vs-compile", "medium-30s-b32-vs-compile", "small-30s-b64-vs-compile",
    "small-30s-b64-cudnn-unpadded", "small-30s-b64-no-triton-gemm", "base-10s-b128", "base-30s-b128-vs-compile",
    "base-30s-b128-vs-eager", "large-30s-b64", "large-30s-b16-vs-compile-regional",
]

UNPADDED = "small-30s-b64-cudnn-unpadded"  # the run given its own `--attention`, and only after a cuDNN verdict


def called(labels, attention: str = "cudnn") -> list[str]:
    """The stand-in benchmark's call lines for these runs, each with the attention it was given."""
    return [f"{label}:{'cudnn_unpadded' if label == UNPADDED else attention}" for label in labels]


STAND_IN_BENCHMARK = '''
import functools, importlib.util, json, os, sys


@functools.cache
def real():
    """The real scripts/benchmark.py, for the summary's tables of a profile."""
    sys.path.append(os.path.dirname(os.environ["REAL_BENCHMARK"]))  # its hlo_traffic
    spec = importlib.util.spec_from_file_location("real_benchmark", os.environ["REAL_BENCHMARK"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def idle_table(*args):  # what gpu_check's summary imports from `benchmark`
    return real().idle_table(*args)


def source_table(*args):
    return real().source_table(*args)


def main():
    args = sys.argv[1:]
    label, jsonl = args[args.index("--label") + 1], args[args.index("--jsonl") + 1]
    with open(os.environ["CALLS"], "a") as calls:
        calls.write(f"{label}:{args[len(args) - args[::-1].index('--attention')]}\\n")  # the last, as argparse
    if label in os.environ.get("FAIL", "").split():
        sys.exit(3)
    import signal, time
    if label in os.environ.get("KILLED", "").split():  # as by the OOM killer
        os.kill(os.getpid(), signal.SIGKILL)
    if label in os.environ.get("DEAF", "").split():  # a hung run that ignores TERM: `timeout` KILLs it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(600)
    if label in os.environ.get("HANG", "").split():
        time.sleep(600)
    row = dict(label=label, device="stand-in", matmul_peak_tflops=800.0, samples_per_s=10.0, step_time_s=0.1,
               tflops_model=300.0, fraction_of_peak_model=0.375, tflops_cost_analysis=None, peak_memory_bytes=2**30,
               init_s=1.0, compile_s=2.0, baseline=None, ratio=None, ratio_equal_work=None, profile=None,
               memory_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
               xla_options=dict(args[i + 1].split("=", 1) for i, arg in enumerate(args) if arg == "--xla-option"))
    if "--profile" in args and "PROFILE" in os.environ:  # a profile the test made, as a JSON file
        with open(os.environ["PROFILE"]) as file:
            row.update(profile=json.load(file), log_mel_s=0.001)
    if "--baseline" in args:
        compile = None
        if "--compile" in args:
            following = args[args.index("--compile") + 1:]
            compile = following[0] if following and not following[0].startswith("--") else "full"
        row.update(baseline=dict(compile=compile, samples_per_s=8.0, tflops_model=260.0, peak_memory_bytes=2**31),
                   ratio=1.25, ratio_equal_work=1.15)
    with open(jsonl, "a") as out:
        out.write(json.dumps(row) + "\\n")


if __name__ == "__main__":  # imported by the summary: the functions above only
    main()
'''
STAND_IN_PARITY = '''
import os, sys
call = "probe" if "--unpadded-probe" in sys.argv else "parity"
open(os.environ["CALLS"], "a").write(call + "\\n")
if call == "probe":  # the check's Whisper case, in the form the stand-in's jax gives it
    print(f"  whisper-base-30s (length 1501, 8 heads, {os.environ.get('PROBE_FORM', 'unpadded')}): relative error ...")
sys.exit(1 if call in os.environ.get("FAIL", "").split() else 0)
'''


def run_gpu_check(tmp_path: Path, out: str, budget_s: int, fail: str = "", **env: str) -> subprocess.CompletedProcess:
    """Run a copy of gpu_check.sh whose scripts are the stand-ins, with `env` added to the environment."""
    root = tmp_path / "repository"
    if not root.exists():
        (root / "scripts").mkdir(parents=True)
        shutil.copy(REPOSITORY / "scripts" / "gpu_check.sh", root / "scripts")
        (root / "scripts" / "benchmark.py").write_text(STAND_IN_BENCHMARK)
        (root / "scripts" / "attention_parity.py").write_text(STAND_IN_PARITY)
        (root / "configs").mkdir()  # what gpu_check.sh imports once for every run (the real one: the data stack)
        (root / "configs" / "common.py").write_text("import soundfile, soxr\n")
        (tmp_path / "bin").mkdir(exist_ok=True)
        python = tmp_path / "bin" / "python3"  # this venv's python (a symlink would lose the venv's packages)
        python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        python.chmod(0o755)
    calls = tmp_path / f"calls-{out}.txt"
    calls.touch()
    env = dict(
        os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", OUT=str(tmp_path / out), BUDGET_S=str(budget_s),
        STATE_DIR=str(tmp_path / "state"), CALLS=str(calls), FAIL=fail,
        REAL_BENCHMARK=str(REPOSITORY / "scripts" / "benchmark.py"),
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"), **env,
    )
    return subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=120)


def gpu_check(tmp_path: Path, out: str, budget_s: int, fail: str = "", **env: str) -> tuple[list[str], list[dict], str]:
    """`run_gpu_check`, which must succeed; returns (calls made, bench.jsonl rows, log)."""
    done = run_gpu_check(tmp_path, out, budget_s, fail, **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    calls = tmp_path / f"calls-{out}.txt"
    rows = [json.loads(line) for line in (tmp_path / out / "bench.jsonl").read_text().splitlines()]
    return calls.read_text().split(), rows, (tmp_path / out / "log.txt").read_text()


def test_a_second_call_runs_only_what_the_first_did_not_finish(tmp_path):
    calls, rows, log = gpu_check(tmp_path, "first", budget_s=10_000, fail="large-30s-b16-vs-compile")
    assert calls == ["parity", "probe", *called(RUNS)]  # a silent, passing check keeps cuDNN
    assert [row["label"] for row in rows] == RUNS
    # recorded, not done (the seconds depend on the machine's load)
    assert re.fullmatch(r"exit 3 after \d+ s", rows[RUNS.index("large-30s-b16-vs-compile")]["error"])
    assert "| medium-30s-b32-vs-compile | 10.0 | 100.0 | 300 (38%)" in log  # the summary table
    # large at batch 64 without remat gets 95% of the card (GPU run 4: 129.8 GiB); the rest benchmark.py's default
    fractions = {row["label"]: row["memory_fraction"] for row in rows if row.get("memory_fraction")}
    assert fractions == {"large-30s-b64": "0.95"}
    # the run named for an XLA option, and only it, compiles with it: the others with XLA's defaults (GPU run 5)
    options = {row["label"]: row["xla_options"] for row in rows if row.get("xla_options")}
    assert options == {"small-30s-b64-no-triton-gemm": {"xla_gpu_enable_triton_gemm": "false"}}

    # A new $OUT, as a second device call gets: its bench.jsonl and summary still hold the first call's rows.
    calls, rows, log = gpu_check(tmp_path, "second", budget_s=10_000)
    assert calls == ["large-30s-b16-vs-compile:cudnn"]  # neither the parity check nor a finished run again
    assert [row["label"] for row in rows] == [*RUNS, "large-30s-b16-vs-compile"]  # a label's last row counts
    assert "error" not in rows[-1]
    assert "attention implementation from this machine's earlier call: cudnn" in log
    assert "== medium-30s-b32-vs-compile: done in an earlier call on this machine" in log
    summary = log.split(f"{len(RUNS)} runs on")[-1]
    assert f"\n{len(RUNS)} runs on stand-in" in log
    assert "| medium-30s-b32-vs-compile | 10.0 | 100.0 | 300 (38%)" in summary
    assert "| large-30s-b16-vs-compile | 10.0 |" in summary

    shutil.rmtree(tmp_path / "state")  # a fresh start empties the record
    _, rows, _ = gpu_check(tmp_path, "second", budget_s=10_000)
    assert [row["label"] for row in rows] == RUNS


def test_the_summary_gives_both_ratios_and_marks_regional_compile(tmp_path):
    """ours/torch by samples/s and at equal work; a ratio against `--compile regional` says so, with a note that
    it is not the issue's torch.compile target."""
    _, _, log = gpu_check(tmp_path, "first", budget_s=10_000)
    assert "| ours/torch samples/s | ours/torch at equal work (each side's own FLOP count / time) |" in log
    assert "| 8.0 (260) compile full | 2.0 | 1.25 | 1.15 |" in log  # base and small, full torch.compile
    assert "| 8.0 (260) compile regional | 2.0 | 1.25 vs regional compile* | 1.15 vs regional compile* |" in log
    assert "| 8.0 (260) eager | 2.0 | 1.25 | 1.15 |" in log
    assert "| 1 | 2 |  |  | | |\n" in log  # no baseline: the four torch columns empty
    assert "\n* against `--compile regional`" in log


def test_a_machine_without_the_data_stack_stops_before_any_run(tmp_path):
    """No carried wheels and no grain on the machine: one error line saying what to do, not eight runs dying on
    `import grain`."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text("import sys\nsys.modules['grain'] = sys.modules['soxr'] = None\n")
    done = run_gpu_check(tmp_path, "out", budget_s=10_000, PYTHONPATH=str(hidden))
    assert done.returncode == 1
    assert "error: python3 cannot import configs/common.py (ModuleNotFoundError: import of soxr halted" in done.stdout
    assert "bash scripts/fetch_device_wheels.sh" in done.stdout
    assert (tmp_path / "calls-out.txt").read_text() == ""  # neither the parity check nor a benchmark ran


def test_a_run_that_hangs_is_stopped_at_its_limit_and_goes_last_in_the_next_call(tmp_path):
    """A run may take RUN_LIMIT_PERCENT of its estimate, not the whole call (one that hung took all of what was
    left, and in the next call, started first again, all of that one too). One KILLed before its limit (status
    137, not from `timeout`: the OOM killer) did not run out of time: the next call runs it in its turn."""
    calls, rows, log = gpu_check(tmp_path, "first", budget_s=10_000, fail="large-30s-b16-vs-compile large-30s-b64",
                                 HANG="small-30s-b64-no-triton-gemm", DEAF="base-10s-b128",
                                 KILLED="base-30s-b128-vs-compile",
                                 RUN_LIMIT_PERCENT="4", KILL_AFTER_S="1")  # 50 and 55 s → a limit of 2 s, 150 → 6
    assert calls == ["parity", "probe", *called(RUNS)]  # every run had its turn
    for label in ("small-30s-b64-no-triton-gemm", "base-10s-b128"):  # TERMinated; KILLed a second after ignoring it
        [row] = [row for row in rows if row["label"] == label]
        assert re.fullmatch(r"out of time \(limit 2 s\) after \d+ s", row["error"]), row
    [row] = [row for row in rows if row["label"] == "base-30s-b128-vs-compile"]
    assert re.fullmatch(r"killed \(status 137\) before its limit of 6 s: out of host memory\? after \d+ s",
                        row["error"]), row
    calls, _, _ = gpu_check(tmp_path, "second", budget_s=10_000)
    assert calls == ["large-30s-b16-vs-compile:cudnn", "base-30s-b128-vs-compile:cudnn", "large-30s-b64:cudnn",
                     "small-30s-b64-no-triton-gemm:cudnn", "base-10s-b128:cudnn"]


def test_a_failed_attention_check_switches_every_run_to_xla(tmp_path):
    calls, _, log = gpu_check(tmp_path, "first", budget_s=10_000, fail="parity")
    assert calls == ["parity", *called([label for label in RUNS if label != UNPADDED], "xla")]
    assert "cuDNN attention failed or disagreed" in log


def test_the_unpadded_probe_cannot_change_the_attention_verdict(tmp_path):
    """The probe (with its check of the cudnn_unpadded form) runs in a call of its own after the verdict: its
    failure (a crash, a timeout, a disagreement) is logged, leaves out the cudnn_unpadded run, on this call and the
    next, and every other run keeps cuDNN; with cuDNN refused, it does not run (see the test above)."""
    calls, rows, log = gpu_check(tmp_path, "first", budget_s=10_000, fail="probe")
    others = [label for label in RUNS if label != UNPADDED]
    assert calls == ["parity", "probe", *called(others)]
    assert [row["label"] for row in rows] == others
    assert ("unpadded probe: no answer, or the cudnn_unpadded form disagreed (status 1); its run is left out, the "
            "others go on with cudnn") in log
    calls, _, _ = gpu_check(tmp_path, "second", budget_s=10_000)
    assert calls == []


def test_the_unpadded_run_is_left_out_where_jax_pads_every_odd_length(tmp_path):
    """A probe whose check agrees with every case padded (a jax that refuses odd lengths for training): the
    cudnn_unpadded form is cudnn's program, so its run is left out; a check made again forgets an earlier answer."""
    calls, _, log = gpu_check(tmp_path, "first", budget_s=10_000, PROBE_FORM="padded for cuDNN")
    assert calls == ["parity", "probe", *called([label for label in RUNS if label != UNPADDED])]
    assert "this jax pads every odd length for cuDNN, so cudnn_unpadded is cudnn; its run is left out" in log
    shutil.rmtree(tmp_path / "state")
    calls, _, _ = gpu_check(tmp_path, "again", budget_s=10_000)
    assert calls == ["parity", "probe", *called(RUNS)]
    (tmp_path / "state" / "attention").unlink()  # the parity check asked again, without forgetting the runs
    (tmp_path / "state" / "done.txt").unlink()
    calls, _, _ = gpu_check(tmp_path, "recheck", budget_s=10_000, fail="probe")
    assert calls == ["parity", "probe", *called([label for label in RUNS if label != UNPADDED])]


def test_runs_that_would_not_fit_the_budget_are_skipped_and_recorded(tmp_path):
    """With 60 s, only the four runs estimated at ≤ 60 s start (small unpadded and without Triton GEMMs, the 10 s
    window, the eager baseline); the others are recorded as skipped, so the next call runs them."""
    calls, rows, log = gpu_check(tmp_path, "short", budget_s=60)
    short = (UNPADDED, "small-30s-b64-no-triton-gemm", "base-10s-b128", "base-30s-b128-vs-eager")
    assert calls == ["parity", "probe", *called(short)]
    # each within what was left of the budget, though 150% of 55 s is 82 s
    limits = [int(limit) for limit in re.findall(r"\(limit (\d+) s\)", log)]
    assert len(limits) == 4 and max(limits) <= 60, limits
    skipped = [row["label"] for row in rows if row.get("error", "").startswith("skipped")]
    expected = [label for label in RUNS if label not in short]
    assert skipped == expected
    calls, _, _ = gpu_check(tmp_path, "rest", budget_s=10_000)
    assert calls == called(expected)


def test_a_run_that_needs_more_memory_than_the_card_has_is_skipped_and_recorded(tmp_path):
    """On an H100 (80 GB) large at batch 64 without remat (GPU run 4: 129.8 GiB) is not started: its row says why,
    and every other run goes ahead. Where nvidia-smi gives no size (as here),
    every run is tried."""
    (tmp_path / "bin").mkdir()  # before the stand-ins: run_gpu_check adds python3 beside it
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho 81559\n')  # an H100's memory.total in MiB
    smi.chmod(0o755)
    calls, rows, log = gpu_check(tmp_path, "h100", budget_s=10_000)
    unfit = ("large-30s-b64",)
    assert calls == ["parity", "probe", *called([label for label in RUNS if label not in unfit])]
    for label in unfit:
        [row] = [row for row in rows if row["label"] == label]
        assert row["error"] == "skipped: needs a card of 130 GiB or more, this one has 79 GiB"
    assert "| large-30s-b64 | skipped: needs a card of 130 GiB or more" in log


def test_carried_wheels_are_the_versions_requirements_pins():
    """What gpu_check.sh and BENCHMARKS.md say is carried "as pinned" (optax, ml-collections, the data stack) is
    fetched by scripts/fetch_device_wheels.sh, at requirements.txt's versions."""
    script = (REPOSITORY / "scripts" / "fetch_device_wheels.sh").read_text()
    fetched = dict(re.findall(r"([\w-]+)==([\w.]+)", re.search(r"PACKAGES=\((.*?)\)", script, re.S)[1]))
    pinned = dict(re.findall(r"^([\w-]+)==([\w.]+)", (REPOSITORY / "requirements.txt").read_text(), re.M))
    for package in ("optax", "ml-collections", "grain", "array-record", "soundfile", "soxr"):
        assert fetched.get(package) == pinned[package], package


def test_the_summary_prints_each_profile_with_its_idle_gaps(tmp_path):
    """A profiled run's row (made by the real benchmark's trace functions from a device trace with two 40 µs
    kernels 3 µs apart per 100 µs step) gets its kernels, its gaps under the profiler beside what the timed step
    left idle, and its by-source note in the summary: the part of a GPU run's output no other test reaches."""
    events = [dict(ph="M", name="process_name", pid=1, args=dict(name="/device:GPU:0")),
              dict(ph="M", name="thread_name", pid=1, tid=7, args=dict(name="Stream #7(Compute)"))]
    for step in range(2):
        events += [dict(ph="X", pid=1, tid=7, name=name, ts=100 * step + start, dur=40)
                   for name, start in (("loop_add_fusion", 0), ("sm90_xmma_gemm", 43))]
    with gzip.open(tmp_path / "trace.json.gz", "wt") as file:
        json.dump(dict(traceEvents=events), file)
    profile = benchmark.with_time_by_source(benchmark.summarize_trace(tmp_path / "trace.json.gz", steps=2), [], 2)
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    done = run_gpu_check(tmp_path, "profiled", budget_s=10_000, PROFILE=str(tmp_path / "profile.json"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (tmp_path / "profiled" / "log.txt").read_text()
    summary = log.split("9 runs on stand-in")[-1]
    assert "\nsmall-30s-b64-vs-compile: step 100.0 ms, device busy 0.1 ms (other 0.0, matmul 0.0)" in summary
    assert "      0.04 ms    1.0×  sm90_xmma_gemm" in summary
    # gaps of 3 µs in each step and 17 µs between the two profiled steps; the timed step is 100 ms
    assert ("  idle between kernels 0.01 ms/step under the profiler, which launches the kernels of XLA's command "
            "buffers one by one; the timed step, in CUDA graphs, leaves 99.92 ms not busy (the figure to read)"
            ) in summary
    assert "\nlarge-30s-b16-vs-compile: step 100.0 ms" not in summary  # only small is profiled
    assert "  the profile's gaps: < 5 µs 0.00 (1×), 5–50 µs 0.01 (0.5×), ≥ 50 µs 0.00 (0×)" in summary
    assert "        0.01 ms    0.5×  sm90_xmma_gemm → loop_add_fusion" in summary
    assert "    by source: ops named after their kernels (the trace names no HLO op" in summary
    assert "profile failed" not in summary
