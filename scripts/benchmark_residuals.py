"""What the audio tower's forward saves for its backward: residual tensors by shape and producing op, on any machine.

    python scripts/benchmark_residuals.py --model base --batch 8 --window 30
    python scripts/benchmark_residuals.py --model base --batch 8 --autodiff gelu --autodiff layer_norm   # before

The Whisper encoder of a benchmark size (`scripts/benchmark.py`'s models) in the compute `--dtype`, applied as
the training step applies it (`global_only=True`), is traced with abstract arrays and jax's `saved_residuals`
lists the values its backward reads (nothing is allocated or run). Reported: the residuals of at least
`--min-elements` elements (default: one [batch, frames/2, width] activation), grouped by (type, producing
op), with counts and bytes. This is the jaxpr's view, before XLA fuses or rematerialises anything, and on
the platform's attention path (XLA's on a CPU: its softmax probabilities; cuDNN keeps only log-sum-exps).

`--autodiff NAME` (repeatable) puts back what a custom VJP replaced, to compare: `gelu`, jax's autodiff of
`jax.nn.gelu(approximate=False)` for `layers.gelu_exact`; `layer_norm`, jax's autodiff of `layers.LayerNorm`'s
own arithmetic (its custom VJP's forward). `saved_residuals` is a private jax function (jax 0.10.x).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import sys
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

sys.path.insert(0, str(Path(__file__).resolve().parents[0]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmark  # noqa: E402
from wavlink_jax.models import layers  # noqa: E402
from wavlink_jax.models.whisper import WhisperEncoder  # noqa: E402

# What `--autodiff NAME` patches in: the function or module its custom VJP replaced.
AUTODIFF = {
    "gelu": lambda: mock.patch.dict(layers.ACTIVATIONS, {"gelu": lambda x: jax.nn.gelu(x, approximate=False)}),
    "layer_norm": lambda: mock.patch.object(
        layers, "_layer_norm", lambda *args: layers._layer_norm_forward(*args)[0]  # its arithmetic, autodiffed
    ),
}


def residual_table(
    encoder: WhisperEncoder, mel: jax.ShapeDtypeStruct, min_elements: int
) -> dict[tuple[str, str], tuple[int, int]]:
    """(type, producing op) → (count, bytes of one), over the residuals of `min_elements` or more elements
    (the arguments — parameters, position table, input — excluded)."""
    graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)

    def loss(params, rest, mel):
        return nnx.merge(graphdef, params, rest)(mel, global_only=True).global_state.astype(jnp.float32).sum()

    counts: collections.Counter = collections.Counter()
    sizes = {}
    for aval, source in saved_residuals(loss, params, rest, mel):
        if aval.size >= min_elements and not source.startswith("from the argument"):
            key = (aval.str_short(), source.split(" from ")[0])
            counts[key] += 1
            sizes[key] = aval.size * aval.dtype.itemsize
    return {key: (n, sizes[key]) for key, n in counts.items()}


def main(argv: list[str] | None = None) -> dict[tuple[str, str], tuple[int, int]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=benchmark.MODELS, default="base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--window", type=float, default=30.0, help="audio window in seconds")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype")
    parser.add_argument(
        "--autodiff", action="append", choices=sorted(AUTODIFF), default=[],
        help="use autodiff instead of this custom VJP (repeatable)",
    )
    parser.add_argument("--min-elements", type=int, help="smallest residual listed (default batch·frames/2·width)")
    parser.add_argument("--tiny", action="store_true", help="the benchmark's 2-layer, 64-wide tower")
    args = parser.parse_args(argv)
    config = dataclasses.replace(benchmark.wavlink_config(args.model, args.tiny).audio, dtype=args.dtype)
    frames = int(args.window * benchmark.FRAMES_PER_SECOND)
    mel = jax.ShapeDtypeStruct((args.batch, config.n_mels, frames), jnp.float32)
    min_elements = args.min_elements or args.batch * (frames // 2) * config.width
    with contextlib.ExitStack() as patches:
        for replaced in args.autodiff:
            patches.enter_context(AUTODIFF[replaced]())
        encoder = nnx.eval_shape(lambda: WhisperEncoder(config, rngs=nnx.Rngs(0)))
        table = residual_table(encoder, mel, min_elements)
    count = sum(n for n, _ in table.values())
    total = sum(n * size for n, size in table.values())
    name = "tiny" if args.tiny else args.model
    autodiff = ", ".join(sorted(set(args.autodiff))) or "none"
    print(f"{name} audio tower, batch {args.batch}, {args.window:g} s, {args.dtype}, autodiff for {autodiff}: "
          f"{count} residuals of >= {min_elements} elements, {total / 2**20:.1f} MiB")
    for (kind, op), (n, size) in sorted(table.items()):
        print(f"  {n:3d} x {kind:28s} {n * size / 2**20:9.1f} MiB  {op}")
    return table


if __name__ == "__main__":
    main()
