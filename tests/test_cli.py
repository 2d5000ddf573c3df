"""Every command-line tool ends a user's mistake with one `error: ...` line on stderr and exit status 1, never a
traceback (wavlink_jax.cli); WAVLINK_JAX_TRACEBACK=1 brings the traceback back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wavlink_jax import cli, sharding

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ("wavlink_jax.train", "--workdir", "W")


def run_tool(*args: str, traceback: bool = False) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != cli.TRACEBACK_ENV}
    if traceback:
        env[cli.TRACEBACK_ENV] = "1"
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def assert_one_error_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ("--config", "tests/train_fixtures.py", "--config.optim.learnig_rate=1e-3"),
            """error: --config.optim.learnig_rate: the config has no key 'learnig_rate'; did you mean "learning_rate"?""",
        ),
        (
            ("--config", "configs/wavlink_base.py:stage=3"),
            "error: flag --config=configs/wavlink_base.py:stage=3: stage must be 1 or 2, got 3",
        ),
        (
            ("--config", "configs/nowhere.py"),
            "error: --config=configs/nowhere.py: cannot load the config file: [Errno 2] No such file or directory",
        ),
        (  # with an override the file is loaded while flags are parsed: that was a traceback
            ("--config", "configs/nowhere.py:stage=1", "--config.total_steps=1"),
            "error: --config=configs/nowhere.py:stage=1: cannot load the config file: [Errno 2] No such file",
        ),
        (("--config", "tests/train_fixtures.py", "--config.seed=1.5"), "error: flag --config.seed=1.5: invalid literal"),
        (
            ("--config", "tests/train_fixtures.py", "--config.data.fenêtre=3"),
            "error: --config.data.fenêtre: the config has no key 'fenêtre'",
        ),
        (  # a key inside a plain value: was a TypeError traceback (str) or a garbled KeyError line (int)
            ("--config", "tests/train_fixtures.py", "--config.loss.impl.x=ring"),
            "error: --config.loss.impl.x: --config.loss.impl is a value (str), not a group of keys",
        ),
        (
            ("--config=tests/train_fixtures.py:steps=2", "--config.seed.x=1"),
            "error: --config.seed.x: --config.seed is a value (int), not a group of keys",
        ),
    ],
    ids=["unknown-key", "config-file-error", "missing-config-file", "missing-config-file-with-an-override",
         "wrong-type", "unknown-non-ascii-key",
         "key-inside-a-string", "key-inside-a-number"],
)
def test_train_config_mistakes(args, message):
    assert_one_error_line(run_tool(*TRAIN, *args), message)


def test_evaluate(tmp_path):
    missing = tmp_path / "gone.jsonl"
    result = run_tool("wavlink_jax.evaluate", "--workdir", str(tmp_path), "--datasets", f"x={missing}",
                      "--out", str(tmp_path / "out.json"))
    assert_one_error_line(result, f"error: {missing}: manifest not found")


def test_embed(tmp_path):
    index = tmp_path / "index.npz"
    np.savez(index, something=np.zeros(2))
    result = run_tool("wavlink_jax.embed", "--index-file", str(index), "--query", "a dog barks")
    assert_one_error_line(result, "not an index written by --index")
    index.write_text("embeddings of my clips")
    result = run_tool("wavlink_jax.embed", "--index-file", str(index), "--query", "a dog barks")
    assert_one_error_line(result, f"error: {index}: not an index written by --index (not an .npz archive")


def test_export(tmp_path):
    result = run_tool("wavlink_jax.export", "--workdir", str(tmp_path), "--out", str(tmp_path / "out"))
    assert_one_error_line(result, f"error: {tmp_path}: no config.json")


def test_convert(tmp_path):
    result = run_tool("wavlink_jax.convert", "whisper", str(tmp_path), "--out", str(tmp_path / "out"))
    assert_one_error_line(result, f"error: {tmp_path}: no config.json")


def test_data_check(tmp_path):
    manifest = tmp_path / "train.jsonl"
    manifest.write_text(json.dumps({"audio": "a.wav", "captions": ["x"], "fold": "one"}) + "\n")
    result = run_tool("wavlink_jax.data", "check", str(manifest))
    assert_one_error_line(result, f"error: {manifest}:1: \"fold\" must be an integer")
    shown = run_tool("wavlink_jax.data", "check", str(manifest), traceback=True)
    assert shown.returncode == 1 and "Traceback" in shown.stderr and "ManifestError" in shown.stderr


def test_data_set_tools(tmp_path):
    missing = tmp_path / "gone.jsonl"
    result = run_tool("wavlink_jax.data.tfds_builders", "manifest", "--manifest", str(missing), "--name", "x",
                      "--data-dir", str(tmp_path / "data"), "--num-workers", "0")
    assert_one_error_line(result, f"error: {missing}: manifest not found")
    (tmp_path / "file").write_text("")
    result = run_tool("wavlink_jax.data.synthetic", "--out", str(tmp_path / "file" / "data"), "--num-train", "2")
    assert_one_error_line(result, f"error: {tmp_path / 'file' / 'data'}: {tmp_path / 'file'} is a file, not a folder")


def test_user_errors_in_process(monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    with pytest.raises(SystemExit, match=r"^error: config.mesh: unknown axes \['bogus'\]; expected .*\]$"):
        with cli.user_errors():
            sharding.create_mesh({"bogus": 2})  # raised by wavlink_jax: its message is all there is to say
    with pytest.raises(SystemExit, match=rf"^error: Expecting .* \({cli.TRACEBACK_ENV}=1 shows the traceback\)$"):
        with cli.user_errors():
            json.loads("{")  # raised outside wavlink_jax: the line says how to see where

    class Stop(RuntimeError):
        pass

    with pytest.raises(SystemExit, match="^error: stopped"):
        with cli.user_errors(Stop):
            raise Stop("stopped")
    with pytest.raises(RuntimeError, match="a bug"):  # not a user error: the traceback stays
        with cli.user_errors():
            raise RuntimeError("a bug")
    monkeypatch.setenv(cli.TRACEBACK_ENV, "0")  # off, as unset
    with pytest.raises(SystemExit, match=r"^error: config.mesh: unknown axes"):
        with cli.user_errors():
            sharding.create_mesh({"bogus": 2})
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="unknown axes"):
        with cli.user_errors():
            sharding.create_mesh({"bogus": 2})


def test_out_of_memory_is_one_line_with_what_to_change(monkeypatch):
    """XLA's RESOURCE_EXHAUSTED, raised deep inside jax, ends with its first line and the tool's advice; a real
    one: a 64 TiB array on this machine. Other jax errors keep their traceback."""
    import jax
    import jax.numpy as jnp

    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    too_large = jax.jit(lambda: jnp.ones((2**22, 2**22), jnp.float32))
    with pytest.raises(SystemExit, match=r"^error: RESOURCE_EXHAUSTED: Out of memory allocating \d+ bytes: lower it$"):
        with cli.user_errors(out_of_memory="lower it"):
            too_large().block_until_ready()
    with pytest.raises(SystemExit, match=rf"^error: RESOURCE_EXHAUSTED: .*: {cli.OUT_OF_MEMORY_ADVICE}$"):
        with cli.user_errors():
            too_large().block_until_ready()
    with pytest.raises(jax.errors.JaxRuntimeError, match="INVALID_ARGUMENT"):  # not a user's mistake
        with cli.user_errors():
            raise jax.errors.JaxRuntimeError("INVALID_ARGUMENT: a bug")
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        with cli.user_errors():
            too_large().block_until_ready()


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("def get_config(arg=None)\n    return None\n", (), "{file}:1: def get_config(arg=None): expected ':'"),
        (
            "import no_such_module\n\n\ndef get_config():\n    return None\n",
            ("--config.seed=1",),
            "{file}:1: import no_such_module: No module named 'no_such_module'",
        ),
        (
            "def get_config():\n    config = {}\n",
            (),
            "--config={file}: get_config() returned NoneType, not an ml_collections.ConfigDict",
        ),
    ],
    ids=["syntax-error", "import-error-with-an-override", "no-config-returned"],
)
def test_a_config_file_that_does_not_load_is_one_error_line(tmp_path, text, overrides, message):
    """A syntax error, a failing import or a get_config() without its return: each was a traceback (or, for the
    last, "--config and --workdir are required", both being given)."""
    config_file = tmp_path / "broken.py"
    config_file.write_text(text)
    result = run_tool(*TRAIN, "--config", str(config_file), *overrides)
    assert_one_error_line(result, "error: " + message.format(file=config_file))


def test_a_typo_in_a_config_file_is_one_error_line(tmp_path):
    """A mistyped key in a config file made a new key that nothing read (the run trained at the default learning
    rate): the configs are locked, and the error names the file, its line and the key meant."""
    config_file = tmp_path / "my_config.py"
    config_file.write_text(
        "from configs import quickstart\n\n\ndef get_config(arg=None):\n"
        "    config = quickstart.get_config(arg)\n    config.optim.learing_rate = 3e-4\n    return config\n"
    )
    result = run_tool(*TRAIN, "--config", str(config_file))
    assert_one_error_line(result, f"error: {config_file}:6: config.optim.learing_rate = 3e-4: the config has no key "
                                  """'learing_rate'; did you mean "learning_rate"?""")
