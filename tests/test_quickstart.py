"""scripts/quickstart.py deletes its workdir to start fresh: only folders it may delete are accepted."""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import quickstart  # noqa: E402


def test_only_missing_empty_default_or_marked_workdirs_are_replaceable(tmp_path):
    assert quickstart.replaceable(tmp_path / "new")
    assert quickstart.replaceable(tmp_path)  # empty
    (tmp_path / "notes.txt").write_text("someone's work")
    assert not quickstart.replaceable(tmp_path)
    (tmp_path / quickstart.MARKER).write_text("")
    assert quickstart.replaceable(tmp_path)
    assert not quickstart.replaceable(tmp_path / "notes.txt")  # a file, not a folder
    assert quickstart.replaceable(quickstart.DEFAULT_WORKDIR)  # `make quickstart`'s own folder, marked or not


def test_a_foreign_workdir_is_refused_and_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("someone's work")
    result = subprocess.run(
        [sys.executable, str(quickstart.REPO / "scripts" / "quickstart.py"), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert f"--workdir {tmp_path} exists, is not empty and is no quickstart workdir" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_steps_must_be_a_positive_whole_number():
    """--steps 0 trained the config's 500 steps; -5 ended in a traceback from the trainer's config check."""
    for steps in ("0", "-5", "2.5"):
        result = subprocess.run(
            [sys.executable, str(quickstart.REPO / "scripts" / "quickstart.py"), "--steps", steps],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"argument --steps: {steps!r} is not a positive whole number" in result.stderr


def test_the_data_set_is_complete_only_with_the_generators_marker(tmp_path):
    """A generator killed while writing the tokenizer left train.jsonl, eval.jsonl and tokenizer/, which passed
    for a complete data set and was never generated again."""
    from wavlink_jax.data import synthetic

    (tmp_path / "tokenizer").mkdir()
    for name, clips in (("train.jsonl", quickstart.NUM_TRAIN), ("eval.jsonl", quickstart.NUM_EVAL)):
        (tmp_path / name).write_text("{}\n" * clips)
    assert quickstart.needs_data(tmp_path)
    (tmp_path / synthetic.MARKER).write_text("{}\n")
    assert not quickstart.needs_data(tmp_path)
    (tmp_path / "eval.jsonl").write_text("{}\n")  # of other sizes
    assert quickstart.needs_data(tmp_path)


def test_a_foreign_data_dir_is_refused_and_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("someone's work")
    result = subprocess.run(
        [sys.executable, str(quickstart.REPO / "scripts" / "quickstart.py"), "--data-dir", str(tmp_path),
         "--workdir", str(tmp_path / "workdir")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {tmp_path} exists and is no data set made by this generator" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
