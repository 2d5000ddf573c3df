"""Tiny trainer configs and batches shared by the trainer tests (1-layer towers of width 32, 1 s windows).

Also a config file for the CLI: `python -m wavlink_jax.train --config tests/train_fixtures.py:data_dir=D,steps=N`
(`eval_every=K`: score D/eval.jsonl every K steps and at the end).
"""

from __future__ import annotations

import numpy as np

from configs import common, quickstart

TEXT_LENGTH = 16
WINDOW_SAMPLES = 16000


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, data_dir="unused", steps=4, eval_every=0)
    config = tiny_config(args.data_dir, total_steps=args.steps)
    if args.eval_every:
        config.eval.sets = ({"name": "synthetic", "source": {"kind": "manifest", "path": f"{args.data_dir}/eval.jsonl"}},)
        config.eval.batch_size = 8
        config.eval_every_steps = args.eval_every
    return config


def tiny_config(data_dir: str = "unused", **overrides):
    """configs/quickstart.py shrunk to a model that compiles and steps in about a second on a CPU."""
    config = quickstart.get_config(f"data_dir={data_dir},steps=4")
    tower = dict(width=32, num_layers=1, num_heads=2, mlp_dim=64)
    config.model.audio.update(max_positions=WINDOW_SAMPLES // 320, **tower)
    config.model.text.update(max_positions=TEXT_LENGTH, projection_dim=32, **tower)
    config.model.embed_dim = 32
    config.model.matryoshka_dims = (32, 16)
    config.data.window_seconds = WINDOW_SAMPLES / 16000
    config.data.max_text_length = TEXT_LENGTH
    config.data.read_threads = 1
    config.data.prefetch_buffer = 16
    config.batch_size = 8
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.progress_bar = False
    config.compilation_cache_dir = "auto"  # the test process's cache (conftest.compilation_cache)
    config.eval.sets = ()
    config.optim.warmup_fraction = 0.0
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def random_batch(seed: int, batch_size: int = 8, vocab_size: int = 1024) -> dict[str, np.ndarray]:
    """Noise waveforms and random captions (end-of-text = the largest id at each row's last valid token)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, TEXT_LENGTH + 1, size=batch_size)
    ids = rng.integers(1, vocab_size - 1, size=(batch_size, TEXT_LENGTH)).astype(np.int32)
    mask = (np.arange(TEXT_LENGTH)[None, :] < lengths[:, None]).astype(np.int32)
    ids[np.arange(batch_size), lengths - 1] = vocab_size - 1
    ids = np.where(mask == 1, ids, vocab_size - 1)
    waveform = (0.1 * rng.standard_normal((batch_size, WINDOW_SAMPLES))).astype(np.float32)
    return {"waveform": waveform, "input_ids": ids, "attention_mask": mask}
