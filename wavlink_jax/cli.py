"""How every command-line tool ends on a user's mistake: one `error: <message>` line on stderr, exit status 1.

User errors are ValueError (ManifestError, DataError, CheckpointError, TokenizerError and the config checks are
ValueErrors) and OSError (a missing file, an output that exists already, ...), plus what a tool adds (the
trainer's NonFiniteLoss). Their messages say what to do, so a traceback would only hide them. So is an
accelerator out of memory (XLA's RESOURCE_EXHAUSTED, raised deep inside jax): its line adds what the tool's user
can change. In a job of several processes (`sharding.has_peers`) any error ends the whole job through
`sharding.stop_job`, an unexpected one with its traceback. `WAVLINK_JAX_TRACEBACK=1` re-raises user errors with
their traceback (e.g. a ValueError that a bug provoked inside jax); the error line names the variable when the
error was raised outside wavlink_jax.

    with cli.user_errors():                               # argparse tools, around the body of main
    app.run(main, flags_parser=cli.parse_absl_flags)      # absl tools (the trainer): --config mistakes
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import os
import re
import sys
import sysconfig
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from absl import flags
import ml_collections
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import is_config_flag

TRACEBACK_ENV = "WAVLINK_JAX_TRACEBACK"
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
OUT_OF_MEMORY_ADVICE = "the work does not fit the accelerator's memory"
# The advice of the tools whose only memory knob is their --batch-size (evaluate, embed).
LOWER_BATCH_SIZE_ADVICE = f"{OUT_OF_MEMORY_ADVICE}: lower --batch-size"
_PACKAGE = Path(__file__).resolve().parent


def show_tracebacks() -> bool:
    """Whether the user asked for tracebacks instead of one-line errors (WAVLINK_JAX_TRACEBACK=1)."""
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def _raised_outside_package(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and not Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)


def error_line(err: BaseException) -> str:
    """`error: <message>`; errors raised outside wavlink_jax (whose messages may not say what to do) also say
    how to see where they came from."""
    hint = f" ({TRACEBACK_ENV}=1 shows the traceback)" if _raised_outside_package(err) else ""
    return f"error: {err}{hint}"


def _out_of_memory(err: BaseException) -> bool:
    """Whether `err` is XLA finding no memory for a program or buffer (jax is imported if it raised it)."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(err, jax.errors.JaxRuntimeError) and str(err).startswith("RESOURCE_EXHAUSTED")


@contextlib.contextmanager
def user_errors(*extra: type[BaseException], out_of_memory: str = OUT_OF_MEMORY_ADVICE) -> Iterator[None]:
    """Turn user errors (`USER_ERRORS` and `extra`) raised in the block into one `error: ...` line and exit
    status 1; in a job of several processes, stop every process (any exception: the others must not wait).
    An accelerator out of memory gives XLA's first line and then `out_of_memory`, the tool's advice."""
    from wavlink_jax import sharding  # here: tools that import jax only when they need it stay quick to start

    try:
        yield
    except (*USER_ERRORS, *extra) as err:
        if show_tracebacks():
            raise
        sharding.stop_job(error_line(err))
    except Exception as err:
        if _out_of_memory(err) and not show_tracebacks():
            sharding.stop_job(f"error: {str(err).splitlines()[0].rstrip('.')}: {out_of_memory}")
        if sharding.has_peers():
            sharding.stop_job(traceback.format_exc())
        raise


def positive_int(text: str) -> int:
    """argparse type of counts (--max-clips, --steps, ...): a whole number ≥ 1 (0 and -1 meant "all" or dropped an
    item without a word where such counts were plain ints)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def output_file(text: str) -> str:
    """argparse type of a file a command writes (--out, --plot): ~ expanded, and refused at once if it is a folder
    or a file stands where one of its folders would be (such a path failed only after the model had loaded and the
    work was done). Folders that do not exist yet are made when it is written."""
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give the name of a file in it")
    in_the_way = file_in_the_way(path)
    if in_the_way is not None:
        raise argparse.ArgumentTypeError(f"{text}: {in_the_way} is a file, not a folder")
    return str(path)


def file_in_the_way(path: Path) -> Path | None:
    """The file that stands where one of `path`'s folders would be (so nothing can be written there), if any."""
    existing = next((folder for folder in path.absolute().parents if folder.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def _fail(message: str) -> NoReturn:
    sys.exit(f"error: {message}")


def _config_file_error(message: str) -> str:
    """absl's message for an exception raised in a config file (ml_collections puts the file's traceback into
    it) → `flag --config=F: <the exception's message>`."""
    head, _, trace = message.partition("Error whilst parsing config file:")
    lines = trace.strip().splitlines()
    # The exception's own lines follow the last frame line (frames and their source lines are indented).
    last_frame = max((i for i, line in enumerate(lines) if line.startswith(" ")), default=-1)
    text = "\n".join(lines[last_frame + 1 :]).strip()
    text = re.sub(r"^[\w.]+: ", "", text)  # "ValueError: ..." → "..."
    return f"{head.strip()} {text}"


def _no_such_key(err: BaseException) -> tuple[str, str]:
    """(the key, `the config has no key ...; did you mean ...?`) of ml_collections' error for a key a config lacks:
    a KeyError/AttributeError whose message is the key's last name or, from a locked config, `Key "name" does not
    exist and cannot be added ...`, sometimes with a did-you-mean."""
    # The message is a repr of a repr: undo one level of escapes, keeping the characters that are not escaped.
    text = codecs.decode(str(err).encode("latin-1", "backslashreplace"), "unicode_escape")
    key = re.search(r"""Key "([^"]+)" does not exist""", text) or re.match(r"""^['"\\]*([^'"\\\n]+)""", text)
    name = key.group(1) if key else text
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    tail = f'; did you mean "{suggestion.group(1)}"?' if suggestion else ""
    return name, f"the config has no key {name!r}{tail}"


def _unknown_key_error(err: BaseException, argv: Sequence[str]) -> str:
    """An override of a key the config lacks → the override as typed, and ml_collections' suggestion."""
    name, problem = _no_such_key(err)
    override = re.compile(rf"^--?(no)?config\.(.*\.)?{re.escape(name)}([.=]|$)")
    overrides = [arg.split("=", 1)[0] for arg in argv if override.match(arg)]
    where = overrides[-1] if overrides else f"--config.…{name}"
    return f"{where}: {problem}"


def _config_file_line(err: BaseException) -> str | None:
    """`FILE:LINE: the line: what is wrong` when `err` was raised by a config file's own code (the deepest frame
    outside the standard library, the installed packages (absl, ml_collections), the import machinery and this
    module), e.g. a locked config refusing a mistyped key; None when absl or ml_collections raised it applying an
    override."""
    folders = sysconfig.get_paths()
    libraries = {Path(folders[key]).resolve() for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        path = Path(frame.filename).resolve()
        if frame.filename.startswith("<") or path == Path(__file__).resolve():
            continue
        if any(path.is_relative_to(library) for library in libraries):
            continue
        problem = _no_such_key(err)[1] if "does not exist" in str(err) else str(err)
        return f"{frame.filename}:{frame.lineno}: {frame.line}: {problem}"
    return None


def _flag_argument(name: str, argv: Sequence[str]) -> str | None:
    """What `--name=VALUE` or `--name VALUE` in `argv` gives flag `name` (the last, as absl takes it; none after
    a bare `--`), or None."""
    value = None
    for arg, following in zip(argv, [*argv[1:], None]):
        if arg == "--":
            break
        given = re.match(rf"^--?{re.escape(name)}(?:=(.*))?$", arg)
        if given:
            value = given.group(1) if given.group(1) is not None else following
    return value


def _config_of(name: str, argv: Sequence[str]):
    """The config that `--name=FILE[:ARG]` in `argv` loads (through the flag's own parser: the flag holds no
    value while its overrides are being applied), or None."""
    argument = _flag_argument(name, argv)
    with contextlib.suppress(Exception):  # a file that cannot be loaded is reported elsewhere
        return None if argument is None else flags.FLAGS[name].parser.parse(argument)
    return None


def _override_into_value(argv: Sequence[str]) -> str | None:
    """An override that reaches inside a plain value (`--config.seed.x=1`: seed is a number, not a group of keys)
    → what is wrong with it; None when every override's path walks through groups as far as its keys exist
    (ml_collections reports such an override as a TypeError or a garbled KeyError)."""
    for name in flags.FLAGS:
        if not is_config_flag(flags.FLAGS[name]):
            continue
        config = _config_of(name, argv)
        for arg in argv if hasattr(config, "keys") else ():
            override = re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
            node, walked = config, [name]
            for key in override.group(1).split(".") if override else ():
                if not hasattr(node, "keys"):
                    value = f"--{'.'.join(walked)} is a value ({type(node).__name__})"
                    return f"--{name}.{override.group(1)}: {value}, not a group of keys"
                if key not in node:
                    break
                node = node[key]
                walked.append(key)
    return None


def _config_filename(name: str, argv: Sequence[str]) -> str:
    """`FILE[:ARG]` as config flag `name` was given it: in `argv` (the flag's own record is not kept when its
    overrides fail), else the flag's record (a default)."""
    given = _flag_argument(name, argv)
    if given is not None:
        return given
    with contextlib.suppress(Exception):
        return config_flags.get_config_filename(flags.FLAGS[name])
    return "?"


def _load_error(name: str, err: Exception, argv: Sequence[str]) -> str | None:
    """What stopped config flag `name`'s file from loading, as one line: its syntax error or the line of its own
    code that raised (`FILE:LINE: ...`), or a file that cannot be read; None when `err` did not come from
    loading the file."""
    if isinstance(err, SyntaxError) and err.filename:
        return f"{err.filename}:{err.lineno}: {(err.text or '').strip()}: {err.msg}"
    in_config_file = _config_file_line(err)
    if in_config_file:
        return in_config_file
    if isinstance(err, OSError):
        cause = str(err.__cause__ or err).strip().splitlines()[-1].strip()
        return f"--{name}={_config_filename(name, argv)}: cannot load the config file: {cause}"
    return None


def _config_flags() -> list[str]:
    return [name for name in flags.FLAGS if is_config_flag(flags.FLAGS[name])]


def parse_absl_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=parse_absl_flags)`) that reports mistakes in `--config`
    and its overrides as one `error:` line: an exception in the config file, or a syntax error in it (where, and
    its message, not the file's traceback), an override of a key the config lacks (with ml_collections'
    did-you-mean) or of a key inside a plain value, a value of the wrong type, a config file that cannot be
    loaded, a `get_config` that returns no ConfigDict."""
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as err:
        if show_tracebacks():
            raise
        message = str(err)
        _fail(_config_file_error(message) if "Error whilst parsing config file:" in message else message)
    except (AttributeError, KeyError, TypeError) as err:
        if show_tracebacks():
            raise
        in_config_file = _config_file_line(err)
        if in_config_file:
            _fail(in_config_file)
        into_value = _override_into_value(argv)
        if into_value is None and isinstance(err, TypeError):
            raise  # not an override's mistake
        _fail(into_value or _unknown_key_error(err, argv))
    except Exception as err:  # with overrides, the file is loaded while they are parsed
        problem = next(filter(None, (_load_error(name, err, argv) for name in _config_flags())), None)
        if problem is None or show_tracebacks():
            raise
        _fail(problem)
    for name in _config_flags():
        flag = flags.FLAGS[name]
        try:  # a config file not loaded yet is an object that loads it, or raises, on first use
            value = flag.value
            getattr(value, "keys", None)
        except Exception as err:
            problem = _load_error(name, err, argv)
            if problem is None or show_tracebacks():
                raise
            _fail(problem)
        if value is None and not flag.present:  # not given, and no default: the program says if it needs one
            continue
        if not isinstance(value, ml_collections.ConfigDict):
            _fail(
                f"--{name}={_config_filename(name, argv)}: get_config() returned "
                f"{type(value).__name__}, not an ml_collections.ConfigDict (see configs/common.py)"
            )
    return remaining
