"""metrics_log: the TensorBoard tags of the logged keys, read back from the event file, are the ones the README
names (metrics.jsonl keeps the public keys, e.g. retrieval_metrics' `t2a_R@1`)."""

import json
import re
import struct
from pathlib import Path

from tensorboardX.proto import event_pb2

from wavlink_jax.metrics_log import MetricsLogger

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
    keys = ["loss", "eval/x/t2a_R@1", "eval/x/16/a2t_mAP@10", "eval/air/acc/Sound_AQA clotho", "data/skipped/not_audio"]
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
