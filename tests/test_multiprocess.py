"""Multi-host training rehearsed on one machine: the real trainer (`python -m wavlink_jax.train`) as 2 OS
processes × 4 CPU devices joined by `jax.distributed` (gloo collectives), against 1 process × 8 devices with the
same config and mesh. The global batches are the same for any number of processes, so every step's metrics,
the evaluation, the checkpoint and a resume must agree with the single-process run.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
import pytest

from wavlink_jax import checkpoint, optim, sharding, train
from wavlink_jax.convert.common import CheckpointError
from wavlink_jax.data import synthetic
from xla_flags import host_devices

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
TIMEOUT_S = 600  # per launch; a healthy one takes 20-80 s on 2 busy cores
GRACE_S = 15  # once one process failed, how long the others may take to fail on their own
# The same global batches on the same mesh; only the collectives differ (gloo between the processes,
# in-process otherwise), which can change the last bit. Measured: losses within 2e-7 relative, every metric
# within 1.2e-6.
RTOL = 1e-5
MESH = ("--config.mesh.data=2", "--config.mesh.fsdp=4")  # fsdp inside each process, data across the two
# The constant pieces of gloo's "[Gloo] Rank R is connected to N peer ranks. Expected number of connected peer
# ranks is : N" (the numbers are separate writes).
# What the coordinator (process 0) reports when its port is in use (grpc's and jax's wording, as observed).
PORT_TAKEN = re.compile(r"address already in use|failed to add port|failed to start rpc server", re.IGNORECASE)
GLOO_PIECES = re.compile(
    r"\[Gloo\] Rank | is connected to | peer ranks\. ?|Expected number of connected peer ranks is : ")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def child_env(devices: int) -> dict:
    """The environment of one trainer process: CPU devices, every program cached, no cluster variables
    inherited from wherever the tests run."""
    inherited = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "JAX_", "XLA_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(inherited)}
    return {
        **env,
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": host_devices(devices),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


class Launch:
    """The trainer started as `processes` OS processes with `devices` CPU devices each (a coordinator on a free
    local port when there are several); `wait` returns each process's stdout or fails with every stderr."""

    def __init__(self, workdir: Path, data_dir: Path, overrides=(), *, processes: int, devices: int, cache_dir: Path,
                 eval_every: int = 2, folders: Sequence[Path] | None = None):
        """`folders`: each process's working folder (default: the repository's)."""
        self.workdir, self.logs = workdir, workdir.parent / f"{workdir.name}-logs"
        self.command = [
            sys.executable, "-m", "wavlink_jax.train", "--workdir", str(workdir),
            "--config", f"{REPO}/tests/train_fixtures.py:data_dir={data_dir},steps={STEPS},eval_every={eval_every}",
            f"--config.compilation_cache_dir={cache_dir}", *overrides,
        ]
        self.count, self.devices = processes, devices
        self.folders = folders or [REPO] * processes
        self._start()

    def _start(self) -> None:
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True)
        port = free_port()
        self.processes = []
        for index in range(self.count):
            env = child_env(self.devices)
            if self.count > 1:
                env.update(
                    JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(self.count),
                    JAX_PROCESS_ID=str(index),
                )
            with open(self.logs / f"{index}.out", "w") as out, open(self.logs / f"{index}.err", "w") as err:
                self.processes.append(
                    subprocess.Popen(self.command, cwd=self.folders[index], env=env, stdout=out, stderr=err)
                )

    def finish(self, retries: int = 1) -> list[int]:
        """The processes' exit codes once all have exited; once one has failed, the others get `GRACE_S` to end
        on their own before they are killed (-9). A launch whose coordinator port was taken in the moment between
        `free_port` and the coordinator's bind is started again on another port (`retries` times)."""
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in self.processes) and time.monotonic() < deadline:
            if any(p.returncode for p in self.processes):  # one failed: the others would wait for it
                deadline = min(deadline, time.monotonic() + GRACE_S)
            time.sleep(0.2)
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        if retries and any(p.returncode for p in self.processes) and PORT_TAKEN.search(self.output(0, "err")):
            self._start()
            return self.finish(retries - 1)
        return [p.returncode for p in self.processes]

    def wait(self) -> list[str]:
        """Each process's stdout once all have exited; fails with every process's stderr if one failed."""
        if any(self.finish()):
            report = [f"{self.workdir.name}: exit codes {[p.returncode for p in self.processes]}"]
            for index in range(len(self.processes)):
                lines = self.output(index, "err").splitlines()
                report.append(f"--- process {index} stderr (last 40 lines) ---\n" + "\n".join(lines[-40:]))
            pytest.fail("\n".join(report), pytrace=False)
        return [self.output(index, "out") for index in range(len(self.processes))]

    def output(self, index: int, stream: str) -> str:
        """What process `index` wrote to stdout / stderr, without gloo's connection messages. gloo writes each
        message in pieces from several threads, so pieces of different messages interleave (seen in CI:
        "7\n7 is connected to 7 peer ranks. ..."): the pieces are removed wherever they are, then the lines
        left with nothing but rank numbers and blanks."""
        text = GLOO_PIECES.sub("", (self.logs / f"{index}.{stream}").read_text())
        return "".join(line for line in text.splitlines(keepends=True) if not re.fullmatch(r"[\d\s]*", line))


def records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(got: dict, want: dict, prefix: str = "") -> None:
    keys = {key for key in want if key.startswith(prefix) and key != "samples_per_second"}
    assert keys and keys <= set(got), sorted(keys - set(got))
    for key in sorted(keys):
        assert got[key] == pytest.approx(want[key], rel=RTOL, abs=1e-7), (got["step"], key, got[key], want[key])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(root, num_train=48, num_eval=8, max_seconds=1.5, captions_per_clip=2)
    return root


# The three launches of `runs` are the suite's costliest set-up (~2 min of the 2 cores, a tenth of `make test`):
# the tests that use it are `slow` (`make test-all`). `make test` keeps two processes' failure handling and the
# unit tests below.
@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Three launches: the reference (1 process × 8 devices, 4 steps) and, at the same time, the 2-process run
    (4 steps, checkpoints at 2 and 4, evaluation at 2 and 4); then the 2-process run resumed from step 2 (its
    step-4 checkpoint deleted, as if it had been killed before that save)."""
    root = tmp_path_factory.mktemp("multiprocess")
    cache_dir = root / "jax_cache"  # the resumed launch reuses the first 2-process launch's programs
    reference = Launch(root / "one", data_dir, MESH, processes=1, devices=8, cache_dir=cache_dir)
    two = Launch(root / "two", data_dir, MESH, processes=2, devices=4, cache_dir=cache_dir)
    reference.wait()
    first_outputs = two.wait()
    uninterrupted = records(root / "two")
    shutil.rmtree(root / "two" / "checkpoints" / str(STEPS))
    resumed_outputs = Launch(root / "two", data_dir, MESH, processes=2, devices=4, cache_dir=cache_dir).wait()
    return {
        "reference": records(root / "one"), "uninterrupted": uninterrupted, "resumed": records(root / "two"),
        "workdir": root / "two", "reference_workdir": root / "one", "outputs": (first_outputs, resumed_outputs),
        "cache_dir": cache_dir,
    }


@pytest.mark.slow
def test_two_processes_compute_the_single_process_steps(runs):
    reference, uninterrupted = runs["reference"], runs["uninterrupted"]
    assert [r["step"] for r in reference] == [r["step"] for r in uninterrupted] == list(range(1, STEPS + 1))
    for got, want in zip(uninterrupted, reference):
        assert_same_metrics(got, want)


@pytest.mark.slow
def test_resumed_two_process_run_continues_exactly(runs):
    resumed, uninterrupted, reference = runs["resumed"], runs["uninterrupted"], runs["reference"]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # records after the checkpoint replaced once
    for got, same_layout, one_process in zip(resumed, uninterrupted, reference):
        # The same layout recomputes the same sums: every metric (evaluation included) bitwise.
        assert {k: v for k, v in got.items() if k != "samples_per_second"} == {
            k: v for k, v in same_layout.items() if k != "samples_per_second"
        }
        assert_same_metrics(got, one_process)
    first, second = runs["outputs"]
    assert "resuming from" in second[0] and "resuming from" not in first[0]
    # The compiled programs were kept (`config.compilation_cache_dir`) for the resumed launch to load.
    assert f"compiled programs are kept in {runs['cache_dir']}" in first[0]
    assert any(runs["cache_dir"].iterdir())
    # Process 1 prints none of the trainer's lines (its stdout may hold native libraries' messages).
    for outputs in (first, second):
        assert not set(outputs[1].splitlines()) & set(outputs[0].splitlines()), outputs[1]
        assert "compiled programs" not in outputs[1] and "resuming from" not in outputs[1]


@pytest.mark.slow
def test_evaluation_across_processes_matches(runs):
    # Embeddings are computed over the mesh and gathered from both processes.
    evaluated = {r["step"]: r for r in runs["resumed"] if "eval/synthetic/t2a_R@1" in r}
    reference = {r["step"]: r for r in runs["reference"] if "eval/synthetic/t2a_R@1" in r}
    assert sorted(evaluated) == sorted(reference) == [2, 4]
    for step in evaluated:
        assert_same_metrics(evaluated[step], reference[step], prefix="eval/")
    assert any(key.startswith("eval/synthetic/top1") for key in evaluated[4])  # zero-shot scored too


@pytest.mark.slow
def test_only_process_zero_writes_logs(runs):
    workdir = runs["workdir"]
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per launch
    assert json.loads((workdir / "config.json").read_text())["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.slow
def test_checkpoint_of_two_processes(runs):
    workdir = runs["workdir"]
    for step in (2, STEPS):
        data = workdir / "checkpoints" / str(step) / "data"
        assert sorted(p.name for p in data.glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    # Read on one host (as export and inference do): the parameters of the single-process run.
    params, reference = (
        optim.flatten(checkpoint.read_workdir_state(w, items=("params",))[0]["params"])
        for w in (workdir, runs["reference_workdir"])
    )
    assert params.keys() == reference.keys()
    worst = max(float(np.max(np.abs(params[key] - reference[key]))) for key in params)
    assert worst <= 1e-6, worst
    # Resuming it with another number of processes is refused with a clear error (this test runs 1 process).
    with pytest.raises(CheckpointError, match="saved by 2 processes, this run has 1; resume with 2 processes"):
        checkpoint.check_data_processes(str(workdir / "checkpoints" / str(STEPS) / "data"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        # The batch over 8 devices of both processes, the ring loss passing blocks between them, 2 micro-batches.
        ("--config.mesh.data=8", "--config.loss.impl=ring", "--config.accum_steps=2", "--config.batch_size=16"),
        # Tensor parallel across the processes: the batch is not split, so both processes read all of it.
        ("--config.mesh.data=1", "--config.mesh.tensor=8"),
    ],
    ids=["data8-ring-accum2", "tensor8"],
)
def test_other_meshes_match_one_process(tmp_path, data_dir, overrides):
    launches = [
        Launch(tmp_path / name, data_dir, overrides, processes=processes, devices=8 // processes,
               cache_dir=tmp_path / "jax_cache", eval_every=0)
        for name, processes in (("one", 1), ("two", 2))
    ]
    for launch in launches:
        launch.wait()
    two, one = records(tmp_path / "two"), records(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    for got, want in zip(two, one):
        assert_same_metrics(got, want)


def test_a_process_that_fails_alone_stops_the_whole_job(tmp_path, data_dir):
    """Process 1's copy of the data set lacks its audio (as with a mount missing on one host), so it stops with a
    DataError at its first batch; process 0, which would wait for it in the first step's collectives until the
    runtime's heartbeat timeout, stops at once with process 1's error."""
    good, broken = tmp_path / "host0", tmp_path / "host1" / "data"
    good.mkdir()
    (good / "data").symlink_to(data_dir)
    shutil.copytree(data_dir / "tokenizer", broken / "tokenizer")
    shutil.copy(data_dir / "train.jsonl", broken / "train.jsonl")  # its audio paths lead nowhere from here
    launch = Launch(tmp_path / "w", Path("data"), (*MESH, "--config.data.max_consecutive_skips=20"), processes=2,
                    devices=4, cache_dir=tmp_path / "jax_cache", eval_every=0, folders=[good, broken.parent])
    codes = launch.finish()
    errors = [launch.output(index, "err") for index in range(2)]
    assert codes == [1, 1], (codes, errors[0][-3000:], errors[1][-3000:])  # -9: killed after GRACE_S
    failure = "error: 20 records in a row of the manifest "
    assert failure in errors[1] and "Traceback" not in errors[1]
    assert f"process 1 of the job failed, so process 0 stops too. Its error:\n{failure}" in errors[0]


class FakeStore:
    """The job's key-value store as `sharding.stop_job` uses it: a read of a missing key times out at once."""

    def __init__(self, **values):
        self.values, self.reads = dict(values), []

    def key_value_set(self, key, value):
        if key in self.values:
            raise jax.errors.JaxRuntimeError(f"ALREADY_EXISTS: {key}")
        self.values[key] = value

    def blocking_key_value_get(self, key, timeout_ms):
        self.reads.append(key)
        if key not in self.values:
            raise jax.errors.JaxRuntimeError(f"DEADLINE_EXCEEDED: {key}")
        return self.values[key]


@pytest.mark.parametrize(
    "index, posted_first", [(0, None), (0, 2), (1, None)], ids=["0-first-to-fail", "0-second-to-fail", "1-fails"]
)
def test_a_stopping_process_waits_until_the_others_have_read_the_error(monkeypatch, index, posted_first):
    """A process of 4 fails. It leaves only after every other process has read the error (the one it posted, or
    the one process 2 posted first), else they could miss it. Process 0 serves the key-value store, so it also
    waits until the others have said they are leaving, and a moment more: a process whose store vanishes while it
    waits aborts with SIGABRT instead of exiting with status 1. The others say so before they exit."""
    store = FakeStore(**({sharding.STOP_KEY: f"{posted_first}\nerror: its own"} if posted_first is not None else {}))
    others = [i for i in range(4) if i != index]
    store.values.update({f"{sharding.STOP_KEY}/read/{i}": "" for i in others})
    if index == 0:
        store.values.update({f"{sharding.STOP_KEY}/left/{i}": "" for i in others})
    events = []
    monkeypatch.setattr(sharding, "_watcher", types.SimpleNamespace(stopping=False))
    monkeypatch.setattr(sharding.jax_distributed.global_state, "client", store)
    monkeypatch.setattr(sharding.jax, "process_index", lambda: index)
    monkeypatch.setattr(sharding.jax, "process_count", lambda: 4)
    monkeypatch.setattr(sharding.time, "sleep", lambda seconds: events.append(("sleep", seconds)))

    def exit_(status):
        events.append(("exit", status))
        raise SystemExit(status)

    monkeypatch.setattr(sharding.os, "_exit", exit_)
    with pytest.raises(SystemExit) as stopped:
        sharding.stop_job("error: broken")
    assert stopped.value.code == 1 and sharding._watcher.stopping
    readers = [key.rsplit("/", 1)[1] for key in store.reads if "/read/" in key]
    leavers = [key.rsplit("/", 1)[1] for key in store.reads if "/left/" in key]
    if posted_first is None:
        assert store.values[sharding.STOP_KEY] == f"{index}\nerror: broken" and readers == [str(i) for i in others]
    else:  # process 2's error stands; process 2 itself needs no reading
        assert store.values[sharding.STOP_KEY] == "2\nerror: its own" and readers == ["1", "3"]
    if index == 0:
        assert leavers == ["1", "2", "3"] and events == [("sleep", sharding._LEAVE_GRACE_S), ("exit", 1)]
    else:
        assert leavers == [] and f"{sharding.STOP_KEY}/left/{index}" in store.values and events == [("exit", 1)]


def test_skip_counts_add_up_over_the_shares(monkeypatch):
    # 4 processes, 2 shares: processes 0-1 read share 0 (and skip the same records), 2-3 read share 1.
    rows = np.array([[0, 1, 0], [0, 1, 0], [1, 2, 5], [1, 2, 5]], np.int32)
    monkeypatch.setattr(train.jax, "process_count", lambda: 4)
    monkeypatch.setattr(train.multihost_utils, "process_allgather", lambda local: rows)
    assert train.skipped_by_all_hosts({"missing": 1, "too_short": 0}, (0, 2)) == {"missing": 3, "too_short": 5}


def test_multiprocess_launch_detection():
    assert not sharding.is_multiprocess_launch({})
    assert not sharding.is_multiprocess_launch({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})
    for environ in ({"JAX_COORDINATOR_ADDRESS": "h:1234"}, {"SLURM_NTASKS": "4"}, {"OMPI_COMM_WORLD_SIZE": "2"},
                    {"TPU_WORKER_HOSTNAMES": "a,b"}, {"MEGASCALE_COORDINATOR_ADDRESS": "h:1"}):
        assert sharding.is_multiprocess_launch(environ), environ
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        sharding.is_multiprocess_launch({"JAX_NUM_PROCESSES": "two"})


def test_distributed_mode_from_the_command_line():
    # `--config.distributed=False` arrives as a string (the key's default "auto" is one).
    for mode in (False, "False", "false", "auto"):
        sharding.initialize_distributed(mode, environ={})  # single process: nothing to join
    with pytest.raises(ValueError, match="must be true, false or 'auto', got 'sometimes'"):
        sharding.initialize_distributed("sometimes", environ={})
