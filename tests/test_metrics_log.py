"""metrics_log: the TensorBoard tags of the logged keys, read back from the event file, are the ones the README
names (metrics.jsonl keeps the public keys, e.g. retrieval_metrics' `t2a_R@1`); TensorBoard shows a resumed run
without what a killed run logged after its checkpoint; the logger does not import torch."""

import json
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2

from wavlink_jax.metrics_log import MetricsLogger, tensorboard_tag

README = Path(__file__).resolve().parents[1] / "README.md"


def event_tags(folder: Path) -> list[str]:
    """The scalar tags of the TFRecord event file in `folder`, in the order written (length, crc, data, crc)."""
    (path,) = folder.glob("events.out.tfevents.*")
    data, tags, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
        tags += [value.tag for value in event.summary.value]
        offset += 12 + length + 4
    return tags


def test_tensorboard_tags_are_the_keys_the_readme_names(tmp_path):
    keys = ["loss", "eval/x/t2a_R@1", "eval/x/16/a2t_mAP@10", "eval/air/acc/Sound_AQA clotho", "data/skipped/not_audio",
            "eval/clotho_v2.1/t2a_R@1"]  # a set's name may hold a dot, which a tag keeps
    log = MetricsLogger(tmp_path, total_steps=1, start_step=0, progress=False)
    log.write(1, {key: 1.0 for key in keys})
    log.close()
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert list(record) == ["step", *keys]  # the public keys, unchanged
    tags = event_tags(tmp_path / "tensorboard")
    # The README's rule: every character other than a letter, digit, _, -, . or / becomes _ ...
    assert tags == [re.sub(r"[^\w\-./]", "_", key) for key in keys]
    # ... and its example.
    example = re.search(r"`eval/<set>/t2a_R@1` is\s+the tag `([^`]+)`", README.read_text())
    assert example, "README.md no longer says which TensorBoard tag eval/<set>/t2a_R@1 becomes"
    assert example.group(1).replace("<set>", "x") == tags[1] == "eval/x/t2a_R_1"
    # ... and, as in TensorFlow's writers, leading slashes go.
    assert tensorboard_tag("/loss") == "loss" and tensorboard_tag("//eval/x") == "eval/x"


def test_tensorboard_shows_a_resumed_run_without_what_the_killed_run_logged_after_its_checkpoint(tmp_path):
    first = MetricsLogger(tmp_path, total_steps=4, start_step=0, progress=False)
    for step in range(1, 5):  # killed after step 4, its last checkpoint step 2
        first.write(step, {"loss": float(step), "eval/x/t2a_R@1": 0.5})
    first.close()
    # TensorBoard reads a run's files in name order, and a name starts with the second the file was opened in: a
    # resumed run, a new process, opens its file seconds later (in the same second the order falls to a counter).
    time.sleep(1.01 - time.time() % 1)
    resumed = MetricsLogger(tmp_path, total_steps=4, start_step=2, progress=False)
    for step in (3, 4):
        resumed.write(step, {"loss": 10.0 * step})
    resumed.close()
    seen = EventAccumulator(str(tmp_path / "tensorboard"))  # TensorBoard's reader, as the viewer loads a run
    seen.Reload()
    assert [(point.step, point.value) for point in seen.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [point.step for point in seen.Scalars("eval/x/t2a_R_1")] == [1, 2]


def test_figures_added_to_a_steps_record(tmp_path):
    """`add_to_last`: the figures join the step's record, records after it (a killed run's) are dropped, and a
    file without the step's record, or no file at all, gets a record of the figures alone."""
    log = MetricsLogger(tmp_path, total_steps=2, start_step=2, progress=False)
    log.write(2, {"eval/x": 0.5}, add_to_last=True)  # no metrics.jsonl yet
    path = tmp_path / "metrics.jsonl"
    assert path.read_text() == '{"step": 2, "eval/x": 0.5}\n'
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n{"step": 3, "loss": 0.5}\n')
    log.write(2, {"eval/x": 0.25}, add_to_last=True)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0, "eval/x": 0.25}\n'
    log.close()


def test_the_trainer_and_its_logger_do_not_import_torch(tmp_path):
    """tensorboardX, the writer before, imported torch (2.3 s and its memory in every training process)."""
    script = (
        "import sys; from wavlink_jax import train; from wavlink_jax.metrics_log import MetricsLogger; "
        f"MetricsLogger({str(tmp_path)!r}, total_steps=1, start_step=0, progress=False).close(); "
        "print(sorted(name for name in ('torch', 'tensorboardX', 'tensorflow') if name in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "[]", done.stdout
