"""The trainer: `python -m wavlink_jax.train --config configs/F.py[:arg] --workdir W [--config.key=value ...]`.

The story of a run (`train`): join the other hosts → build the mesh → open the data → build the model, its
shardings and the optimizer → decode the evaluation sets → resume from the workdir's latest checkpoint, or
initialise (from `init_from` if set) → write the resolved config (only now that every start-up check has
passed) → loop: step, log, evaluate, checkpoint → final checkpoint and evaluation. Re-running the same
command after a crash or preemption continues where the last checkpoint left off; the data iterator resumes at
the same position, so the run's metrics are those of an uninterrupted run. SIGTERM (a preemption) ends the run
after its current step with a checkpoint of that step (`Preempted`, exit status 143).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from ml_collections import config_flags

from wavlink_jax import checkpoint, cli, eval_tasks, evaluate, metrics_log, optim, sharding, train_step
from wavlink_jax.convert.common import read_json
from wavlink_jax.data import pipeline
from wavlink_jax.data.sources import open_source
from wavlink_jax.files import replace_text
from wavlink_jax.tokenizer import load_tokenizer
from wavlink_jax.waveform_layout import check_long_clips

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/wavlink_base.py:stage=1")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: config.json, metrics.jsonl, checkpoints/")


class NonFiniteLoss(RuntimeError):
    """The loss or gradient became NaN/Inf: the run stops without saving the broken state."""


class Preempted(RuntimeError):
    """The job was asked to stop (SIGTERM): the run saved a checkpoint at the step it had reached and stopped;
    the same command resumes there."""


# What a user can change when the step or an evaluation does not fit (`cli.user_errors`): XLA's message only says
# how many bytes it could not allocate.
OUT_OF_MEMORY_ADVICE = (
    "the step does not fit the accelerator. Each device holds config.batch_size / (config.mesh data × fsdp) "
    "clips: lower batch_size, or raise accum_steps (the same update, one micro-batch's activations at a time); "
    "recompute blocks in the backward pass (config.remat, e.g. full); split parameters and AdamW state over "
    "devices (mesh.fsdp); evaluation holds config.eval.batch_size clips. jax takes 75% of each accelerator "
    "unless XLA_PYTHON_CLIENT_MEM_FRACTION says more. scripts/hlo_audit.py --target h100|h200 gives a choice's "
    "memory on that card from any machine"
)
PREEMPTED_EXIT_STATUS = 143  # 128 + SIGTERM: what a process ended by the signal reports, so schedulers requeue it


class PreemptionWatch:
    """Whether the job was asked to stop, as preemptible TPU/GPU machines and schedulers do with SIGTERM. In a job
    of several processes, jax's preemption service (started by `jax.distributed`) agrees on one step for all, through
    orbax; a process alone notes the signal itself from creation to `close` (which restores the previous handler)."""

    def __init__(self):
        self.signalled, self._previous = False, None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int, checkpoints: checkpoint.Checkpoints) -> bool:
        """Whether to save and stop after `step` (every process gets the same answer at the same step)."""
        return self.signalled or (jax.process_count() > 1 and checkpoints.manager.reached_preemption(step))


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """WORKDIR/config.json: the resolved config of this run (every key, after overrides). A resumed run whose
    config differs from the one on disk says which keys changed (the new config is written)."""
    if jax.process_index() != 0:
        return
    path = Path(workdir) / "config.json"
    text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    if path.exists() and path.read_text() != text:
        old, new = optim.flatten(read_json(path)), optim.flatten(json.loads(text))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        _say(f"note: the config differs from {path} in {changed}; continuing with the new values")
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, text)


SCHEDULE_FILE = "schedule.json"  # {"total_steps": N}: the number of steps the run's schedule was made for


def recorded_total_steps(workdir: str, start_step: int) -> int | None:
    """The number of steps WORKDIR/schedule.json says the run resumed at `start_step` was made for (None for a new
    run, one without the file, or a process other than 0, which would read it while process 0 replaces it). A
    damaged file is an error naming it."""
    path = Path(workdir) / SCHEDULE_FILE
    if jax.process_index() != 0 or not start_step or not path.exists():
        return None
    recorded = read_json(path)  # a file cut short is named, not a bare JSON error
    before = recorded.get("total_steps") if isinstance(recorded, dict) else None
    if not isinstance(before, int):
        raise ValueError(f'{path}: no integer "total_steps"; write {{"total_steps": N}} with the number of steps '
                         f"the resumed run was made for, or remove the file")
    return before


def keep_schedule(
    config: ml_collections.ConfigDict, workdir: str, total_steps: int, start_step: int, before: int | None
) -> None:
    """Record the run's resolved number of steps in WORKDIR/schedule.json; a resumed run whose number differs from
    `before` (`recorded_total_steps`: total_steps changed, or `epochs` over sources that grew or shrank, which
    config.json cannot show) says what its learning rate becomes: the schedule is stretched or squeezed from the
    resumed step on."""
    if jax.process_index() != 0:  # the other processes would read it while process 0 replaces it
        return
    if before is not None and before != total_steps:
        old, new = (float(optim.learning_rate_schedule(config.optim, n)(start_step)) for n in (before, total_steps))
        _say(
            f"note: this run has {total_steps} steps, the run it resumes {before}: the learning-rate schedule "
            f"changes (at step {start_step}: {old:.3g} → {new:.3g})"
        )
    replace_text(Path(workdir) / SCHEDULE_FILE, json.dumps({"total_steps": total_steps}) + "\n")


def resolve_total_steps(config: ml_collections.ConfigDict) -> int:
    """`total_steps` if set, else `epochs` × (clips in all training sources) / `batch_size`."""
    if config.total_steps > 0:
        return int(config.total_steps)
    clips = sum(len(open_source(spec)) for spec in config.data.sources)
    steps = int(math.ceil(config.epochs * clips / config.batch_size))
    if steps < 1:
        raise ValueError(f"config.epochs={config.epochs} over {clips} clips gives no steps; set total_steps")
    return steps


def check_intervals(config: ml_collections.ConfigDict) -> None:
    """Step intervals that the loop divides by must be positive, and eval_every_steps, eval.max_clips and
    total_steps not negative (0 = evaluate only at the end, every clip, steps from `epochs`)."""
    limits = {
        "log_every_steps": (config.log_every_steps, 1, ""),
        "checkpoint_every_steps": (config.checkpoint_every_steps, 1, ""),
        "keep_checkpoints": (config.keep_checkpoints, 1, ""),
        "eval_every_steps": (config.eval_every_steps, 0, "0 = only at the end"),
        "eval.max_clips": (config.eval.max_clips, 0, "0 = every clip"),
        "total_steps": (config.total_steps, 0, "0 = from epochs"),
    }
    bad = [
        f"{key}={value} (must be ≥ {least}{': ' + meaning if meaning else ''})"
        for key, (value, least, meaning) in limits.items() if value < least
    ]
    if bad:
        raise ValueError(f"config: {'; '.join(bad)}")


def check_attention_backend(config: ml_collections.ConfigDict, backend: str | None = None) -> None:
    """cuDNN attention (`config.attention_implementation` "cudnn" / "cudnn_unpadded") needs an NVIDIA GPU: on
    another backend the first step failed inside jax ("cuDNN is not detected") after config.json was written."""
    backend = jax.default_backend() if backend is None else backend
    if config.attention_implementation.startswith("cudnn") and backend != "gpu":
        raise ValueError(
            f"config.attention_implementation = {config.attention_implementation!r} needs an NVIDIA GPU (cuDNN); "
            f"this run's devices are {backend}: use 'auto' or 'xla'"
        )


def check_tokenizer(config: ml_collections.ConfigDict, tokenizer) -> None:
    """Refuse a tokenizer the text tower cannot read: more ids than its vocabulary, longer captions than its
    positions, or an end-of-text id its pooling rule (`config.model.text.eos_token_id`) would not find — the
    tower would then pool another position of every caption, silently."""
    text = config.model.text
    eos = tokenizer.eos_token_id
    if text.eos_token_id == 2 and eos != tokenizer.vocab_size - 1:
        raise ValueError(
            f"config.model.text.eos_token_id is 2, Hugging Face's legacy rule (pool at the largest token id), but "
            f"the end-of-text id of the tokenizer in {config.data.tokenizer} is {eos}, not its largest id "
            f"{tokenizer.vocab_size - 1}; set --config.model.text.eos_token_id={eos}"
        )
    if text.eos_token_id != 2 and text.eos_token_id != eos:
        raise ValueError(
            f"config.model.text.eos_token_id is {text.eos_token_id} but the end-of-text id of the tokenizer in "
            f"{config.data.tokenizer} is {eos}: the text tower would pool another position; set "
            f"--config.model.text.eos_token_id={eos}"
        )
    if tokenizer.vocab_size > text.vocab_size:
        raise ValueError(
            f"the tokenizer in {config.data.tokenizer} has {tokenizer.vocab_size} tokens but the text tower "
            f"config.model.text.vocab_size is {text.vocab_size}"
        )
    if tokenizer.max_length > text.max_positions:
        raise ValueError(
            f"config.data.max_text_length {tokenizer.max_length} exceeds config.model.text.max_positions "
            f"{text.max_positions}"
        )


class Evaluator:
    """Scores `config.eval.sets` (decoded once, at start) with the current train state, through
    `wavlink_jax.evaluate.evaluate_during_training`: records `eval/<set>/<metric>` (full size) and
    `eval/<set>/<dim>/<metric>` (Matryoshka sizes), and what each set was measured on: `eval/<set>/clips` (and
    `captions`, `classes`, `questions` where the set has them) and `eval/<set>/skipped/<reason>` (records left
    out when the set was decoded, zeros included).

    Each set is head-cropped to the training window, or to its own `window_seconds` (e.g. 30 to score long
    clips whole with a model trained on 10 s crops); with `long_clips: "mean"` its clips are kept whole (in
    memory, for the run) and each is scored as the mean of the embeddings of its windows of that length
    (`evaluate.ClipWindows`), as `python -m wavlink_jax.evaluate --long-clips mean` scores them."""

    SET_KEYS = ("name", "source", "window_seconds", "long_clips")

    def __init__(self, config: ml_collections.ConfigDict, setup: train_step.TrainSetup, tokenizer):
        self.dims = setup.model_config.matryoshka_dims
        self.embedder = train_step.StateEmbedder(setup, tokenizer, config.eval.batch_size)
        # Every set's settings are checked before any set is decoded (decoding a large one takes minutes).
        windows = [self._window_seconds(index, dict(spec), config, setup) for index, spec in enumerate(config.eval.sets)]
        eval_tasks.check_set_names([spec["name"] for spec in config.eval.sets], "config.eval.sets")
        self.sets = [
            eval_tasks.load_eval_data(
                spec["name"],
                dict(spec["source"]),
                window_seconds=window,
                long_clips=spec.get("long_clips") or "head",
                max_clips=config.eval.max_clips or None,
            )
            for spec, window in zip(config.eval.sets, windows)
        ]

    @classmethod
    def _window_seconds(
        cls, index: int, spec: dict, config: ml_collections.ConfigDict, setup: train_step.TrainSetup
    ) -> float:
        """The window of `config.eval.sets[index]`, after checking the set's keys, its `long_clips` and that window."""
        unknown, missing = sorted(set(spec) - set(cls.SET_KEYS)), sorted({"name", "source"} - set(spec))
        if unknown or missing:
            raise ValueError(
                f"config.eval.sets[{index}] has unknown keys {unknown} / lacks {missing}; an evaluation set is "
                f"{{'name': ..., 'source': <a data source spec>, 'window_seconds': (optional), 'long_clips': "
                "(optional) 'head' or 'mean'}"
            )
        if spec.get("long_clips") is not None:
            check_long_clips(spec["long_clips"], f"config.eval.sets[{index}] ({spec['name']}) long_clips")
        seconds = float(config.data.window_seconds if spec.get("window_seconds") is None else spec["window_seconds"])
        setup.model_config.audio.check_window(seconds, f"config.eval.sets[{index}] ({spec['name']}) window_seconds")
        return seconds

    def __call__(self, state: dict) -> dict[str, float]:
        return evaluate.evaluate_during_training(self.embedder.use(state), self.sets, self.dims)


def skipped_by_all_hosts(counts: dict[str, int], share: tuple[int, int]) -> dict[str, int]:
    """The job's records skipped so far, by reason, from this host's `counts`: each host counts the records it
    skipped in its share of the data; hosts that read the same share (`sharding.process_batch_share`) count
    it once. A collective: every process calls it at the same step."""
    local = np.array([share[0], *counts.values()], np.int32)
    rows = multihost_utils.process_allgather(local) if jax.process_count() > 1 else local[None]
    per_share = {int(row[0]): row[1:] for row in np.asarray(rows)}
    return dict(zip(counts, map(int, np.sum(list(per_share.values()), axis=0))))


DEFAULT_COMPILATION_CACHE = "~/.cache/wavlink_jax/xla"


def use_compilation_cache(setting: str) -> str | None:
    """Point jax's persistent compilation cache at the folder `setting` (`config.compilation_cache_dir`) names,
    so that a resumed or repeated run loads its compiled programs instead of compiling them again (the train
    step of base took 45 s to compile on an H200). "auto": JAX_COMPILATION_CACHE_DIR if
    set, else DEFAULT_COMPILATION_CACHE; "off": none. jax stores only programs that took ≥ 1 s to compile
    (`jax_persistent_cache_min_compile_time_secs`). Returns the folder (None when off)."""
    if setting == "off":
        folder = None
    elif setting == "auto":
        folder = jax.config.jax_compilation_cache_dir or os.path.expanduser(DEFAULT_COMPILATION_CACHE)
    elif setting:
        folder = os.path.expanduser(setting)
    else:
        raise ValueError('config.compilation_cache_dir is empty; give a folder, "auto" or "off"')
    if folder != jax.config.jax_compilation_cache_dir:
        compilation_cache.set_cache_dir(folder)
        compilation_cache.reset_cache()  # jax opens its cache once per process: make it open this one
    return folder


def _say(text: str, file: TextIO | None = None) -> None:
    """A line for the user (process 0 only; absl INFO logs are off by default), on stdout or `file`."""
    if jax.process_index() == 0:
        print(text, file=file, flush=True)


def initial_state(
    setup: train_step.TrainSetup, checkpoints: checkpoint.Checkpoints, data: pipeline.TrainIterator
) -> dict:
    """The latest checkpoint of the workdir (data iterator moved to its position), else a fresh state (with
    `init_from`'s weights); says which."""
    if checkpoints.latest_step() is not None:
        _say(f"resuming from {checkpoints.directory}/{checkpoints.latest_step()}")
        return checkpoints.restore(setup.abstract_state, data)
    state = checkpoint.apply_init_from(train_step.init_state(setup, setup.config.seed), setup)
    init = setup.config.init_from
    loaded = [f"init_from.{key}={init[key]}" for key in ("workdir", "audio", "text") if init[key]]
    _say(f"initialised from {', '.join(loaded)}" if loaded else "initialised afresh (no init_from)")
    return state


def _finite_or_stop(step: int, metrics: dict[str, float], checkpoints: checkpoint.Checkpoints) -> None:
    bad = {key: metrics[key] for key in ("loss", "grad_norm") if not math.isfinite(metrics[key])}
    if bad:
        checkpoints.wait()
        last = checkpoints.latest_step()
        kept = (
            "No checkpoint was saved before it (re-running starts afresh)." if last is None else
            f"The last good checkpoint is step {last} in {checkpoints.directory} (kept; nothing later was saved)."
        )
        raise NonFiniteLoss(
            f"{bad} at step {step}: training stopped. {kept} Lower config.optim.learning_rate, keep "
            "config.optim.grad_clip_norm on, or look for bad input."
        )


def _save_checked(
    step: int, state: dict, metrics: dict, data: pipeline.TrainIterator, checkpoints: checkpoint.Checkpoints, *,
    force: bool,
) -> None:
    """Save `state` after `step` (if due, or `force`); a step whose loss or gradient norm is not finite is never
    saved: NonFiniteLoss is raised instead."""
    _finite_or_stop(step, jax.device_get(metrics), checkpoints)
    checkpoints.save(step, state, data, force=force)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Run (or resume) training; returns the last logged metrics (with the final evaluation)."""
    workdir = checkpoint.workdir_path(workdir)
    existing_config = Path(workdir) / "config.json"
    if existing_config.exists():  # an export's would be overwritten
        checkpoint.check_not_exported(Path(workdir), read_json(existing_config))
    sharding.initialize_distributed(config.distributed)
    check_intervals(config)
    cache = use_compilation_cache(config.compilation_cache_dir)
    _say(f"compiled programs are kept in {cache}" if cache else "no compilation cache (compilation_cache_dir=off)")

    mesh = sharding.create_mesh(config.mesh)
    check_attention_backend(config)
    train_step.check_batch_size(config, mesh)
    tokenizer = load_tokenizer(config.data.tokenizer, max_length=config.data.max_text_length)
    check_tokenizer(config, tokenizer)
    share = sharding.process_batch_share(mesh)  # this host reads only the rows its devices hold
    data = pipeline.make_train_iterator(
        config.data,
        global_batch_size=config.batch_size,
        seed=config.seed,
        tokenizer=tokenizer,
        process_index=share[0],
        process_count=share[1],
    )
    total_steps = resolve_total_steps(config)

    setup = train_step.build(config, mesh, total_steps)
    warning = train_step.unsharded_warning(setup)
    if warning:
        _say(warning, file=sys.stderr)
    # Evaluation sets are decoded (and their settings checked) before the state is built or compiled.
    evaluator = Evaluator(config, setup, tokenizer) if config.eval.sets else None
    checkpoints = checkpoint.Checkpoints(
        workdir,
        keep=config.keep_checkpoints,
        every=config.checkpoint_every_steps,
        config=json.loads(config.to_json_best_effort()),
    )
    state = initial_state(setup, checkpoints, data)
    start_step = int(jax.device_get(state["step"]))
    final_record, final_evaluation_missing = None, False
    if start_step >= total_steps:  # config.json stays that of the run that made the checkpoints
        # A run stopped by its final evaluation (its last step was saved first) has it done by running it again.
        if evaluator is not None:
            final_record = metrics_log.last_record(workdir, start_step) or {"step": start_step}
            final_evaluation_missing = not any(key.startswith("eval/") for key in final_record)
        then = "nothing to do" if not final_evaluation_missing else "metrics.jsonl has no evaluation of it: evaluating"
        _say(f"{workdir} already holds the final checkpoint (step {start_step} of {total_steps}); {then}")
    else:
        # Only now that every start-up check has passed (init_from and a resumed checkpoint fit the model too, and
        # schedule.json and metrics.jsonl are readable): a refused config leaves no config.json in a new workdir,
        # and a resumed run's as it was.
        scheduled_before = recorded_total_steps(workdir, start_step)
        metrics_log.keep_records_through(workdir, start_step)
        write_config(config, workdir)
        keep_schedule(config, workdir, total_steps, start_step, scheduled_before)
    step_fn = train_step.make_train_step(setup)
    param_norm = train_step.make_param_norm(setup)
    log = metrics_log.MetricsLogger(
        workdir, total_steps=total_steps, start_step=start_step, progress=config.progress_bar
    )

    last: dict[str, float] = {}
    pending = None  # (step, metrics) of the previous step: checked for NaN/Inf while the next step runs
    window_start, window_steps = time.perf_counter(), 0
    preemption = PreemptionWatch()  # from here on, SIGTERM saves and stops after the current step
    try:
        if final_evaluation_missing:
            evaluation = evaluator(state)
            log.write(start_step, evaluation, add_to_last=True)
            last = {key: value for key, value in {**final_record, **evaluation}.items() if key != "step"}
        for step in range(start_step + 1, total_steps + 1):
            local_batch = next(data)
            batch = pipeline.to_global_batch(
                {key: local_batch[key] for key in train_step.BATCH_KEYS}, mesh, sharding.BATCH_AXES
            )
            state, metrics = step_fn(state, batch)
            if pending is not None:
                _finite_or_stop(pending[0], jax.device_get(pending[1]), checkpoints)
            pending = (step, metrics)
            window_steps += 1
            log.advance()

            is_last = step == total_steps
            eval_due = evaluator is not None and (
                is_last or (config.eval_every_steps and step % config.eval_every_steps == 0)
            )
            record: dict[str, float] = {}
            if step % config.log_every_steps == 0 or is_last or eval_due:  # every record has the train metrics
                record = {key: float(value) for key, value in jax.device_get(metrics).items()}
                _finite_or_stop(step, record, checkpoints)
                record["param_norm"] = float(param_norm(state["params"]))
                elapsed = time.perf_counter() - window_start
                record["samples_per_second"] = window_steps * config.batch_size / elapsed
                skipped = skipped_by_all_hosts(data.skip_counts, share)
                record.update({f"data/skipped/{reason}": n for reason, n in skipped.items()})
            if eval_due:
                try:
                    record.update(evaluator(state))
                except Exception:  # a failing evaluation loses no training, nor the step's training record
                    log.write(step, record)
                    _save_checked(step, state, metrics, data, checkpoints, force=True)
                    raise
            if record:
                log.write(step, record)
                last = record
                window_start, window_steps = time.perf_counter(), 0
            stop = not is_last and preemption.reached(step, checkpoints)
            if step % config.checkpoint_every_steps == 0 or is_last or stop:
                _save_checked(step, state, metrics, data, checkpoints, force=is_last or stop)
            if stop:
                checkpoints.wait()
                raise Preempted(
                    f"stopped at step {step} of {total_steps} on SIGTERM (preemption); checkpoint {step} is in "
                    f"{checkpoints.directory}: re-run the same command to resume"
                )
    finally:
        preemption.close()
        checkpoints.close()
        log.close()
        data.close()
    return last


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config, --workdir, --config.KEY=VALUE")
    if _WORKDIR.value is None or _CONFIG.value is None:
        raise app.UsageError("--config and --workdir are required")
    if not FLAGS["verbosity"].present:  # orbax logs every save at INFO; --verbosity=0 shows it
        absl_logging.set_verbosity(absl_logging.WARNING)
    with cli.user_errors(NonFiniteLoss, out_of_memory=OUT_OF_MEMORY_ADVICE):  # one `error:` line; every process stops
        try:
            train(_CONFIG.value, _WORKDIR.value)
        except Preempted as stop:
            _say(str(stop), file=sys.stderr)
            sys.exit(PREEMPTED_EXIT_STATUS)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_absl_flags)
