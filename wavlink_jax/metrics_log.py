"""Training metrics: `WORKDIR/metrics.jsonl`, TensorBoard event files and a progress bar with rate and ETA.

Only process 0 writes. On resume the JSONL keeps the records up to the restored step and drops the ones a
killed run logged after its last checkpoint (`keep_records_through`), so the file reads as if the run had never
stopped.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Mapping

import jax
import tqdm
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from wavlink_jax.files import replace_text

FLUSH_SECONDS = 2  # TensorBoard events reach the disk within this (see MetricsLogger)
_NOT_IN_A_TAG = re.compile(r"[^\w\-./]")  # what TensorBoard's summary names may not hold (tensorboard_tag)


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a metrics key: every character other than a letter, digit, `_`, `-`, `.` or `/`
    becomes `_` and leading slashes go (the rule of TensorFlow's and tensorboardX's summary names, so tags read as
    they would from those writers): `eval/clotho/t2a_R@1` is `eval/clotho/t2a_R_1`."""
    return _NOT_IN_A_TAG.sub("_", key).lstrip("/")


def _read_records(path: Path) -> list[tuple[str, dict]]:
    """metrics.jsonl's lines and records, in order. A last line cut short by a killed run is dropped; a damaged line
    elsewhere is an error naming it."""
    try:
        lines = [line for line in path.read_text().splitlines() if line]
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err}); repair or remove it") from err
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # the append the run was killed in
                break
            raise ValueError(f"{path}: line {number} is not a JSON record ({err}); repair or remove it") from err
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}: line {number} has no integer \"step\" ({line[:80]}); repair or remove it")
        records.append((line, record))
    return records


def keep_records_through(workdir: str | os.PathLike, step: int) -> None:
    """Keep WORKDIR/metrics.jsonl's records up to `step` (the checkpoint a run resumes from; process 0 only). A last
    line cut short by a killed run is dropped; a damaged line elsewhere is an error naming it. The file is replaced
    in one rename, so a run killed while it is rewritten loses no record."""
    path = Path(workdir) / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists():
        return
    kept = [line for line, record in _read_records(path) if record["step"] <= step]
    replace_text(path, "".join(line + "\n" for line in kept))


def last_record(workdir: str | os.PathLike, step: int) -> dict | None:
    """WORKDIR/metrics.jsonl's last record of `step` (None: it has none). Every process may read it (e.g. to agree
    on whether all of them evaluate), so only where process 0 is not rewriting the file."""
    path = Path(workdir) / "metrics.jsonl"
    records = [record for _, record in _read_records(path) if record["step"] == step] if path.exists() else []
    return records[-1] if records else None


class MetricsLogger:
    """Writes one JSON object per logged step (`{"step": s, "loss": ..., ...}`) and the same scalars to TensorBoard
    under `tensorboard_tag`s of the JSON keys, which are the public names (`evaluate.retrieval_metrics`).

    The event file is written by TensorBoard's own writer (the package of the `tensorboard` viewer). tensorboardX,
    used before, imports torch when it is installed, as it is here for the converter: 2.3 s and the memory of
    torch in every training process (2-core CPU, 2026-11-28), against 0.4 s for this writer (BENCHMARKS.md,
    "Starting and checkpointing a run")."""

    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, start_step: int, progress: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._writer = None
        self._bar = None
        if not self.enabled:
            return
        # Written to disk within FLUSH_SECONDS. Without TensorFlow each event is appended to the file as it comes;
        # with it, TensorBoard writes through tf.io.gfile, which buffers until a flush, and the writer's default,
        # 120 s, would lose that much of a run ended without close (a process stopped by another one's failure,
        # sharding.stop_job, exits at once).
        self._writer = EventFileWriter(str(Path(workdir) / "tensorboard"), flush_secs=FLUSH_SECONDS)
        # A (re)start at this step: TensorBoard drops the events of earlier files from this step on, which a
        # killed run logged after the checkpoint this one resumes from (as `keep_records_through` does).
        self._writer.add_event(
            Event(wall_time=time.time(), step=start_step + 1, session_log=SessionLog(status=SessionLog.START))
        )
        if progress:
            self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.1)

    def write(self, step: int, metrics: Mapping[str, float], *, add_to_last: bool = False) -> None:
        """Append one record (non-finite floats are written as strings "nan"/"inf", JSON has no literal). With
        `add_to_last` (a final evaluation done after the step's record was written, by a run that evaluation
        stopped), records after `step` (a killed run's, past its last checkpoint) are dropped and `metrics` join
        `step`'s record if it is there; the file is replaced in one rename."""
        if not self.enabled:
            return
        record = {"step": int(step)}
        scalars = []
        for key, value in metrics.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else str(value)
            scalars.append(Summary.Value(tag=tensorboard_tag(key), simple_value=value))
        self._writer.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=scalars)))
        if add_to_last:
            records = _read_records(self.path) if self.path.exists() else []
            kept = [(line, saved) for line, saved in records if saved["step"] <= step]
            lines = [line for line, _ in kept]
            if kept and kept[-1][1]["step"] == step:
                lines[-1] = json.dumps({**kept[-1][1], **record})
            else:
                lines.append(json.dumps(record))
            replace_text(self.path, "".join(line + "\n" for line in lines))
        else:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self._bar is not None and "loss" in metrics:
            self._bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", refresh=False)

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar (rate and ETA come from tqdm)."""
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
