"""Kill-and-resume: a run killed by SIGKILL (between saves, and in the middle of a save) resumes from its
last complete checkpoint and ends with exactly the metrics of a run that was never stopped."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from wavlink_jax.data import synthetic
from xla_flags import host_devices

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
ENV = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": host_devices(2), "JAX_PLATFORMS": "cpu"}

# Runs the trainer, but SIGKILLs the process between saves: once the step-2 checkpoint is committed, when step 4
# would be saved (a kill from outside at that moment raced the trainer: on a loaded machine the run could finish
# before the poller saw the checkpoint).
KILL_BETWEEN_SAVES = textwrap.dedent(
    """
    import os, signal
    from absl import app
    from wavlink_jax import checkpoint, train

    save = checkpoint.Checkpoints.save

    def save_then_die(self, step, *args, **kwargs):
        if step == 4:
            self.wait()  # the step-2 checkpoint is complete
            os.kill(os.getpid(), signal.SIGKILL)
        return save(self, step, *args, **kwargs)

    checkpoint.Checkpoints.save = save_then_die
    app.run(train.main)
    """
)

# Runs the trainer, but SIGKILLs the process inside its first checkpoint save: after orbax has started
# writing the state (asynchronously) into the step's temporary directory, while the data item is written.
KILL_IN_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import grain
    from absl import app
    from wavlink_jax import train

    def killed_save(self, directory, item=None, args=None):
        os.kill(os.getpid(), signal.SIGKILL)

    grain.checkpoint.CheckpointHandler.save = killed_save
    app.run(train.main)
    """
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(root, num_train=48, num_eval=1, max_seconds=1.5, captions_per_clip=2)
    return root


def command(workdir, data_dir, program=("-m", "wavlink_jax.train")):
    # The launches compile the same programs: a compilation cache (fresh for each data set) saves the repeats.
    return [sys.executable, *program, "--config", f"tests/train_fixtures.py:data_dir={data_dir},steps={STEPS}",
            "--workdir", str(workdir), "--config.checkpoint_every_steps=2",
            f"--config.compilation_cache_dir={data_dir.parent / 'jax_cache'}"]


def losses(workdir):
    records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}, [r["step"] for r in records]


def finished_steps(workdir):
    directory = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def run_script(name: str, source: str, workdir: Path, data_dir: Path) -> subprocess.CompletedProcess:
    """The trainer run through `source` (a script that patches it and calls `train.main`), saved as `name`.py."""
    script = workdir.parent / f"{name}.py"
    script.write_text(source)
    return subprocess.run(command(workdir, data_dir, program=(str(script),)), cwd=REPO, env=ENV,
                          capture_output=True, text=True)


# Runs the trainer, and sends it SIGTERM (what a preemption or a scheduler sends) during its first step.
TERM_IN_FIRST_STEP = textwrap.dedent(
    """
    import os, signal
    from absl import app
    from wavlink_jax import train, train_step

    make = train_step.make_train_step

    def make_terminated(setup):
        step_fn, calls = make(setup), []

        def step(*args):
            calls.append(1)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return step_fn(*args)

        return step

    train_step.make_train_step = make_terminated
    app.run(train.main)
    """
)


@pytest.mark.slow  # four launches (~1 min of the 2 cores); test_train's SIGTERM test resumes in-process
def test_killed_runs_resume_exactly(tmp_path, data_dir):
    reference = tmp_path / "reference"
    subprocess.run(command(reference, data_dir), cwd=REPO, env=ENV, check=True, capture_output=True)
    expected, steps = losses(reference)
    assert steps == list(range(1, STEPS + 1))

    workdir = tmp_path / "killed"
    # 1. SIGKILL between saves, mid-training (after step 4, with step 2 the last complete checkpoint).
    result = run_script("kill_between_saves", KILL_BETWEEN_SAVES, workdir, data_dir)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    killed_at = finished_steps(workdir)[-1]
    assert killed_at == 2

    # 2. Resume, and get killed again inside the next save: that checkpoint must not count.
    result = run_script("kill_in_save", KILL_IN_SAVE, workdir, data_dir)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    assert finished_steps(workdir)[-1] == killed_at  # the half-written checkpoint is not a checkpoint
    leftovers = [p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
    assert leftovers, "the kill did not happen during a save"

    # 3. Resume, and get SIGTERM (a preemption) in the first step: the run saves that step off the interval, says
    # so and exits with 143 (128 + SIGTERM) instead of being killed by the signal and losing the step.
    result = run_script("term_in_step", TERM_IN_FIRST_STEP, workdir, data_dir)
    assert result.returncode == 143, result.stderr[-3000:]
    assert f"stopped at step 3 of {STEPS} on SIGTERM (preemption); checkpoint 3 is in" in result.stderr
    assert finished_steps(workdir)[-1] == 3

    # 4. Resume again and finish: every step's loss equals the uninterrupted run's.
    result = subprocess.run(command(workdir, data_dir), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, steps = losses(workdir)
    assert steps == list(range(1, STEPS + 1))  # records logged after the last checkpoint were dropped
    for step in range(1, STEPS + 1):
        assert abs(resumed[step] - expected[step]) <= 1e-6, (step, resumed[step], expected[step])
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
