"""Time WavLink's real training step on one device, optionally against the same step written in PyTorch.

    python scripts/benchmark.py --model base --batch 128 --window 30                   # ours only
    python scripts/benchmark.py --model small --baseline torch --compile --json        # + torch.compile baseline
    python scripts/benchmark.py --model large --baseline torch --compile regional      # baseline compiled per block
    python scripts/benchmark.py --tiny --steps 2 --json --baseline torch               # seconds on a CPU

What is timed: `wavlink_jax.train_step.make_train_step` — the trainer's own jitted step with donated state —
built from `configs/common.base_config` (the paper's recipe: AdamW, grad clipping, CLIP + sigmoid losses at
every Matryoshka level, full fine-tuning of both towers, bf16 compute over fp32 weights). Each step computes
the log-mel spectrogram from the raw waveform on the device. Batches are random, placed on the device before
timing (two of them, alternated); the loop dispatches `--steps` steps after `--warmup` untimed ones and
synchronises once at the end (`block_until_ready` on the state and metrics).

Figures:
* step time, samples/s;
* model TFLOP/s: the analytic count of `model_flops` (matmuls and convolutions of both towers, heads and
  losses, attention included; backward = 2× forward; rematerialised recomputation NOT counted) per step ÷
  step time — each side's own work: ours computes only the global token's row in the audio tower's last
  block, the PyTorch baseline that whole block (its count is 1.03–1.15× ours at 30 s: base 1.155×, small 1.076×,
  medium 1.037×, large 1.027×);
* cost-analysis TFLOP/s: `compiled.cost_analysis()["flops"]` of our compiled step ÷ step time. XLA counts what
  it executes (element-wise work and remat recomputation included) but not inside custom calls, so on a GPU
  the cuBLAS GEMMs and cuDNN attention and convolutions are missing from it (a CPU-side cross-check only);
* both as a fraction of the bf16 matmul peak measured in the same process (an N×N×N bf16 product in JAX,
  mean of 10 after warm-up; N = 8192 by default);
* peak device memory (`memory_stats()["peak_bytes_in_use"]`; the baseline: `torch.cuda.max_memory_allocated`);
* the jitted log-mel alone on one batch (its share of the step);
* with `--profile N`: N more steps under the jax profiler, device time per step by kind (attention, matmul,
  convolution, FFT, other) and the top kernels — where the time goes; where the device sat idle between kernels
  (by size of gap, and the pairs of kernels with the most idle time between them); and by line of our code that
  made each HLO op (`hlo_traffic`'s `--by source` groups), with the bytes those launches move and the bandwidth
  achieved.

With `--baseline torch` the PyTorch step (`wavlink_jax.torch_baseline`) runs first in the same process, on the
same device, with the same shapes, loss, optimizer settings and clipping, then frees its memory before JAX
allocates. The report gives two ratios: `ratio`, ours/theirs samples/s — the issue's comparison with a plain
PyTorch trainer, which runs the whole last block and so does more work per sample — and `ratio_equal_work`,
ours/theirs model TFLOP/s, each side's own FLOP count ÷ its step time: the speed at equal work, with our
skipped rows taken out of the comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import common  # noqa: E402
from wavlink_jax import cli  # noqa: E402
from wavlink_jax.models.clip_text import CLIPTextConfig  # noqa: E402
from wavlink_jax.models.wavlink import WavLinkConfig  # noqa: E402
from wavlink_jax.models.whisper import WhisperConfig  # noqa: E402

import hlo_traffic  # noqa: E402  (scripts/, this file's folder, is on sys.path)

MODELS = ("base", "small", "medium", "large")
# The batch sizes of the performance issue's PyTorch table (30 s windows, one H100/H200).
DEFAULT_BATCH = {"base": 128, "small": 64, "medium": 32, "large": 16}
SAMPLE_RATE = 16_000
FRAMES_PER_SECOND = 100  # Whisper's hop of 160 samples
TEXT_LENGTH = 77
# The `--xla-option` that turns XLA's command buffers (CUDA graphs) off: an empty list of what may go into one.
# GPU run 5 (BENCHMARKS.md): without them base's step took 98.1 ms instead of 87.5, and XLA's default stays.
NO_COMMAND_BUFFERS = ("xla_gpu_enable_command_buffer", "")
TINY = dict(window=1.0, text_length=16, batch=4, steps=2, warmup=1, matmul_size=256)


def wavlink_config(name: str, tiny: bool) -> WavLinkConfig:
    """The model of a benchmark size: the paper's presets, plus `medium` (Whisper medium + CLIP B/32 text)."""
    if tiny:
        return WavLinkConfig(
            audio=WhisperConfig(n_mels=80, width=64, num_layers=2, num_heads=4, mlp_dim=256, max_positions=50),
            text=CLIPTextConfig(
                vocab_size=1000, width=64, num_layers=2, num_heads=4, mlp_dim=256,
                max_positions=TINY["text_length"], projection_dim=64,
            ),
            embed_dim=64,
        )
    if name == "medium":
        return WavLinkConfig(
            audio=WhisperConfig.preset("medium.en"), text=CLIPTextConfig.preset("vit-b-32"), embed_dim=512
        )
    return WavLinkConfig.preset(name)


# ------------------------------------------------------------------------------------------------------------
# FLOP accounting


def encoder_layer_flops(tokens: int, width: int, mlp_dim: int, queries: int | None = None) -> int:
    """One pre-LN transformer block, forward, one sequence: q/k/v/out and MLP matmuls, QKᵀ and AV.

    `queries`: rows whose output is computed (default all `tokens`); keys and values always span every
    token. Causal attention is counted in full (what the XLA path computes)."""
    queries = tokens if queries is None else queries
    key_value = 2 * tokens * 2 * width * width
    per_query_row = 2 * (2 * width * width + 2 * width * mlp_dim) + 2 * 2 * tokens * width
    return key_value + queries * per_query_row


def model_flops(model: WavLinkConfig, batch: int, frames: int, text_length: int, *, global_only: bool = True) -> int:
    """Analytic FLOPs of one training step (forward + backward, 2 per multiply-add) over the whole batch.

    Counted: conv stem, transformer blocks (attention included), CLIP text projection, both heads, the
    similarity matmuls of each Matryoshka level and loss kind. Backward is 2× forward except for the first
    convolution, whose input (the log-mel) needs no gradient. Not counted: the log-mel (FFT, mel matmul),
    embeddings, LayerNorms, element-wise work, the optimizer, remat recomputation.

    `global_only=True` is our step: the audio tower's last block computes only the global token's row (its
    keys and values still cover every position), since only that row is read. `False` is the PyTorch
    baseline, which runs the last block for every position, as a plain PyTorch trainer does.
    """
    a, t = model.audio, model.text
    positions = frames // 2 + 1  # + the global token
    conv1 = 2 * frames * a.n_mels * 3 * a.width
    last_block = encoder_layer_flops(positions, a.width, a.mlp_dim, queries=1 if global_only else None)
    audio = (
        2 * (frames // 2) * 3 * a.width * a.width
        + (a.num_layers - 1) * encoder_layer_flops(positions, a.width, a.mlp_dim)
        + last_block
        + 2 * a.width * model.embed_dim
    )
    text = (
        t.num_layers * encoder_layer_flops(text_length, t.width, t.mlp_dim)
        + 2 * t.width * t.projection_dim
        + 2 * t.projection_dim * model.embed_dim
    )
    per_sample_forward = conv1 + audio + text
    losses = 2 * sum(2 * batch * batch * dim for dim in model.matryoshka_dims)  # clip + sigmoid logits
    return 3 * (batch * per_sample_forward + losses) - batch * conv1


# ------------------------------------------------------------------------------------------------------------
# The two steps


def progress(message: str) -> None:
    """A time-stamped line on stderr, so a log cut short still shows where the time went."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def random_batch(rng, batch: int, samples: int, text_length: int, vocab_size: int) -> dict[str, Any]:
    """Waveform noise and captions of random length (≥ 8 tokens) ending in the end-of-text id (vocab − 1)."""
    import numpy as np

    lengths = rng.integers(8, text_length + 1, size=batch)
    positions = np.arange(text_length)[None, :]
    ids = rng.integers(1, vocab_size - 1, size=(batch, text_length))
    ids = np.where(positions == lengths[:, None] - 1, vocab_size - 1, ids)
    ids = np.where(positions < lengths[:, None], ids, 0)
    return {
        "waveform": (0.1 * rng.standard_normal((batch, samples))).astype(np.float32),
        "input_ids": ids.astype(np.int32),
        "attention_mask": (positions < lengths[:, None]).astype(np.int32),
    }


def odd_lengths_unpadded(model: WavLinkConfig, frames: int, text_length: int, dtype: str) -> dict[str, bool]:
    """With `--attention cudnn_unpadded`: for each tower whose sequence is odd, whether cuDNN got it unpadded
    (`layers.cudnn_trains_unpadded`: the question the towers' stacks ask of this jax) or padded."""
    import jax.numpy as jnp

    from wavlink_jax.models import layers

    towers = {  # name: (length, config, causal, kv_lengths given)
        "audio": (frames // 2 + int(model.audio.global_token), model.audio, False, False),
        "text": (text_length, model.text, True, True),
    }
    return {
        name: layers.cudnn_trains_unpadded(
            length, tower.num_heads, tower.width // tower.num_heads, jnp.dtype(dtype), causal, lengths
        )
        for name, (length, tower, causal, lengths) in towers.items()
        if length % 2
    }


def bench_config(args: argparse.Namespace, model: WavLinkConfig):
    """The trainer's config for this run: the paper's recipe with the benchmark's batch and runtime knobs."""
    config = common.base_config(model)
    config.batch_size = args.batch
    config.data.window_seconds = args.window
    config.total_steps = 1000
    config.dtype = args.dtype
    config.remat = args.remat
    config.attention_implementation = args.attention
    config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    return config


def run_torch(args: argparse.Namespace, model: WavLinkConfig, config, host_batches) -> dict[str, Any]:
    """Build and time the PyTorch twin of our step; frees every CUDA buffer it used before returning."""
    import torch

    from wavlink_jax import torch_baseline as tb

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    progress(f"torch {torch.__version__}: building the baseline on {device}")
    with device:  # parameters are created (and randomly initialised) directly on the device
        net = tb.TrainingLoss(
            tb.build_torch_wavlink(model, window_seconds=args.window, text_length=args.text_length),
            clip_weight=config.loss.clip_weight,
            sigmoid_weight=config.loss.sigmoid_weight,
        )
    net = net.to(device)
    batches = [
        (
            torch.from_numpy(b["waveform"]).to(device),
            torch.from_numpy(b["input_ids"]).long().to(device),
            torch.from_numpy(b["attention_mask"]).long().to(device),
        )
        for b in host_batches
    ]
    optim = config.optim
    timing = tb.time_torch_step(
        net,
        batches,
        steps=args.steps,
        warmup=args.warmup,
        bf16=args.dtype == "bfloat16",
        compile=args.compile,
        optimizer=tb.OptimizerSettings(
            lr=optim.learning_rate, betas=(optim.b1, optim.b2), eps=optim.eps,
            weight_decay=optim.weight_decay, grad_clip_norm=optim.grad_clip_norm,
        ),
    )
    result = {
        "name": "torch",
        "compile": args.compile,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        **dataclasses.asdict(timing),
    }
    del net, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return result


def run_torch_in_child(argv: list[str]) -> dict[str, Any]:
    """The baseline in a child process (`--separate-baseline`): for machines where torch and JAX cannot
    share one process's GPU. Its memory is the driver's again when the child exits."""
    import subprocess

    child_args, value_follows = [], False
    for arg in argv:  # this process's own options left out: flags, and options with a value (`--opt V`, `--opt=V`)
        name = arg.split("=", 1)[0]
        if value_follows or arg in ("--separate-baseline", "--json"):
            value_follows = False
        elif name in ("--jsonl", "--dump-hlo", "--save-trace"):
            value_follows = "=" not in arg
        else:
            child_args.append(arg)
    child_args.append("--baseline-only")
    done = subprocess.run([sys.executable, __file__, *child_args], stdout=subprocess.PIPE, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"name": "torch", "error": f"baseline process exited with {done.returncode}"}
    return json.loads(lines[-1])


def measure_matmul_peak(size: int, repeats: int = 10) -> float:
    """TFLOP/s of a size³ bf16 matmul in JAX on the default device: mean over `repeats` after warm-up."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(1))
    a = jax.random.normal(ka, (size, size), jnp.bfloat16)
    b = jax.random.normal(kb, (size, size), jnp.bfloat16)
    matmul = jax.jit(jnp.matmul)
    for _ in range(3):
        matmul(a, b).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = matmul(a, b)
    out.block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def program_memory(compiled: Any) -> dict[str, int]:
    """A compiled program's device memory by XLA's buffer assignment (`memory_analysis()`): arguments,
    temporaries, outputs, the outputs aliased to donated arguments, and the program's total (arguments +
    temporaries + outputs not aliased). Next to the allocator's measured peak it calibrates the same figure
    from a compile without the device (`hlo_audit.py --target`)."""
    memory = compiled.memory_analysis()
    figures = {
        "argument_bytes": memory.argument_size_in_bytes,
        "temporary_bytes": memory.temp_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "aliased_bytes": memory.alias_size_in_bytes,
    }
    figures["program_bytes"] = (
        figures["argument_bytes"] + figures["temporary_bytes"] + figures["output_bytes"] - figures["aliased_bytes"]
    )
    return figures


def cost_analysis_flops(compiled) -> float | None:
    """`flops` of a compiled executable's cost analysis (a dict, or a one-element list in older jax)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


# Kernel-name patterns → what the time went to (first match wins; searched in lower-cased names).
# cuDNN convolutions run "implicit gemm" kernels named fprop/dgrad/wgrad: checked before the matmuls. XLA's
# element-wise fusions are named after their ops ("loop_convert_fusion"): "conv" alone would count those
# type conversions as convolutions (the first H200 profile did: 23 of its 26 "convolution" ms were converts).
KERNEL_KINDS = (
    ("attention", re.compile(r"fmha|flash|attention|sdpa")),
    ("convolution", re.compile(r"conv(?!ert)|fprop|dgrad|wgrad|winograd")),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|gemv|matmul|triton_dot")),
    ("fft", re.compile(r"fft")),
)


def kernel_kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(lower)), "other")


def summed(times: Iterable[tuple[Any, Sequence[float]]]) -> dict[Any, list]:
    """key → [microseconds, launches] added up over (key, [microseconds, launches]) pairs: a trace's events, a
    kernel's launches under several names."""
    total: dict[Any, list] = {}
    for key, (us, launches) in times:
        entry = total.setdefault(key, [0.0, 0])
        entry[0] += us
        entry[1] += launches
    return total


def ms_per_step(us: float, steps: int) -> float:
    """Microseconds over `steps` steps as milliseconds per step, to the microsecond."""
    return round(us / steps / 1e3, 3)


# Sizes of the device's idle gaps between kernels: launch latency (a few µs, what CUDA graphs shorten; the profiler
# runs without them, see `idle_table`), then longer waits (the host behind the device, a synchronisation).
GAP_SIZES_US = ((5.0, "< 5 µs"), (50.0, "5–50 µs"), (float("inf"), "≥ 50 µs"))


def idle_gaps(kernels: list[tuple[float, float, str]], steps: int, top: int = 10) -> dict[str, Any]:
    """Where the device waited: the gaps in the union of `kernels` ((start, end, name) in µs, any order, on all
    of the device's streams), per step. Their total (the profiled span less the busy time, the waits between the
    profiled steps included), by size (`GAP_SIZES_US`: ms and gaps per step), and the `top` pairs of kernels with
    the most idle time between them: [kernel before, kernel after, ms per step, gaps per step]."""
    by_size = {label: [0.0, 0] for _, label in GAP_SIZES_US}
    by_pair: dict[tuple[str, str], list[float]] = {}
    end, last = None, ""
    for start, stop, name in sorted(kernels):
        if end is not None and start > end:
            gap = start - end
            size = by_size[next(label for limit, label in GAP_SIZES_US if gap < limit)]
            size[0] += gap
            size[1] += 1
            pair = by_pair.setdefault((last[:80], name[:80]), [0.0, 0])
            pair[0] += gap
            pair[1] += 1
        if end is None or stop > end:
            end, last = stop, name
    longest = sorted(by_pair.items(), key=lambda item: -item[1][0])[:top]
    return {
        "idle_ms_per_step": ms_per_step(sum(us for us, _ in by_size.values()), steps),
        "idle_by_size_ms_per_step": {
            label: [ms_per_step(us, steps), round(count / steps, 1)] for label, (us, count) in by_size.items()
        },
        "top_gaps_ms_per_step": [
            [before, after, ms_per_step(us, steps), round(count / steps, 1)] for (before, after), (us, count) in longest
        ],
    }


def summarize_trace(trace_file: Path, steps: int, top: int = 25) -> dict[str, Any]:
    """Device time per step from a jax profiler trace (Chrome/perfetto JSON): by kind, by kernel and by HLO op.

    Kernels are the complete events on the device's `Stream` lines. XLA gives identical fusions one kernel, so
    one kernel name can stand for many HLO ops (e.g. every layer's GELU): each kernel comes with its launches
    per step, and the HLO instruction of each launch gives the same time by op (not added to the totals). That
    instruction is the event's name on a derived `XLA Ops` line where the trace has one; otherwise (jax 0.11.2
    on an H200 wrote only the Stream line) the `hlo_op` argument of each kernel event. That argument can name
    no instruction: 0.11.2 names a kernel that runs inside one of XLA's command buffers (a CUDA graph, made after
    the HLO) after the buffer (`command_buffer_18`), so `kernels_of_op_us` splits each such op's time by kernel
    for `time_by_source`, which names those kernels' instructions by the kernels' names. A trace without device
    lines (CPU) gives empty tables, and `idle_gaps` says where between the kernels the device waited.
    `op_time_us` holds every op's [microseconds, launches] over the `steps`
    (the `top_` tables keep the longest only), and `kernel_time_us` every kernel's, for `time_by_source`;
    `kernel_arguments`, the argument names the kernel events carry, says what a trace offered when it named
    no op."""
    import gzip

    with gzip.open(trace_file) as file:
        data = json.load(file)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    device_lines = {
        key: name
        for key, name in threads.items()
        if processes.get(key[0], "").startswith("/device:") or "GPU" in processes.get(key[0], "")
    }
    # Kernel lines are the streams; where a trace names none so, every device line but the derived ones.
    kernel_lines = {key for key, name in device_lines.items() if name.startswith("Stream")} or {
        key for key, name in device_lines.items() if not any(d in name for d in ("XLA Modules", "XLA Ops", "Steps"))
    }
    op_lines = {key for key, name in device_lines.items() if name == "XLA Ops"}

    def complete(lines: set) -> list[dict]:
        """The complete ("X") events on `lines`."""
        return [event for event in events if event.get("ph") == "X" and (event.get("pid"), event.get("tid")) in lines]

    def totals(chosen: list[dict], key: Callable[[dict], Any] = lambda event: event["name"]) -> dict[Any, list]:
        """key → [microseconds, launches] over the `chosen` events that `key` keys (None: left out)."""
        keyed = ((key(event), [float(event.get("dur", 0.0)), 1]) for event in chosen)
        return summed((name, times) for name, times in keyed if name is not None)

    kernels = complete(kernel_lines)
    by_kernel = totals(kernels)
    by_op = totals(complete(op_lines))
    kernels_of_op: dict[str, dict[str, list[float]]] = {}  # hlo_op → kernel → [µs, launches]
    if not by_op:  # no XLA Ops line: the kernels' hlo_op arguments
        for (op, kernel), times in totals(kernels, lambda event: (event.get("args", {}).get("hlo_op"),
                                                                  event["name"])).items():
            if op is not None:
                kernels_of_op.setdefault(op, {})[kernel] = times
        by_op = summed((op, times) for op, kernels in kernels_of_op.items() for times in kernels.values())
    kernel_arguments = sorted({name for event in kernels for name in event.get("args", {})})
    total_us = sum(us for us, _ in by_kernel.values())
    by_kind: dict[str, float] = {}
    for name, (us, _) in by_kernel.items():
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + us

    def ranked(by_name: dict[str, list[float]]) -> list[list]:
        """[name, ms per step, launches per step] for the `top` names with the most time."""
        items = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
        return [[name[:120], ms_per_step(us, steps), round(launches / steps, 2)] for name, (us, launches) in items]

    spans = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e["name"]) for e in kernels]
    return {
        "lines": sorted(device_lines[key] for key in kernel_lines),
        "device_busy_ms_per_step": ms_per_step(total_us, steps),
        **idle_gaps(spans, steps),
        "by_kind_ms_per_step": {
            kind: ms_per_step(us, steps) for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1])
        },
        "top_kernels_ms_per_step": ranked(by_kernel),
        "top_ops_ms_per_step": ranked(by_op),
        "op_time_us": by_op,
        "kernels_of_op_us": kernels_of_op,
        "kernel_time_us": by_kernel,
        "kernel_arguments": kernel_arguments,
    }


NOT_IN_HLO = "(op not in the HLO)"


def ops_from_kernel_names(kernel_time_us: dict[str, list[float]], found: list[hlo_traffic.Launch]) -> dict:
    """Kernel times keyed by the HLO instruction each kernel is named after, for kernels the trace names no op
    of: XLA names a fusion's kernel after the fusion, '.' and '-' written '_' (`loop_add_fusion.4` runs
    `loop_add_fusion_4`), and identical fusions (every layer's GELU) reuse the first one's kernel, so its
    launches are theirs too. A kernel named after no instruction (cuBLAS, cuDNN) keeps its own name."""
    instruction_of = {re.sub(r"[.-]", "_", launch.name): launch.name for launch in found}
    return {instruction_of.get(kernel, kernel): times for kernel, times in kernel_time_us.items()}


def time_by_source(
    op_time_us: dict[str, list[float]], found: list[hlo_traffic.Launch], steps: int, busy_ms: float, top: int = 25,
    kernel_time_us: dict[str, list[float]] | None = None, kernel_arguments: Sequence[str] = (),
    kernels_of_op_us: dict[str, dict[str, list[float]]] | None = None,
) -> dict[str, Any]:
    """Device time per step by line of our code, with the bytes its launches move and the bandwidth achieved
    (GB/ms = TB/s), so that a slow kernel and a heavy line show up at once.

    `op_time_us` is `summarize_trace`'s time per op, named after the HLO instructions of the compiled step (a
    leading '%' is dropped). Where the trace named no op, each kernel of `kernel_time_us` stands for the
    instruction it is named after (`ops_from_kernel_names`), and `kernel_arguments`, the argument names of its
    kernel events, go into the note; so does an op that is no instruction but whose kernels `kernels_of_op_us`
    gives (a command buffer's), whose time goes to its kernels' instructions. `found` is `hlo_traffic.launches`
    of that step, which groups each launch by source line (by kind where the program has no stack frames). A
    launch of the entry computation runs once per step, so a line's bytes per step are those of its launches the
    trace ran. Time of ops that are no launch of the entry computation (another naming, a loop's body) is counted
    under NOT_IN_HLO and named in the note, never dropped. Returns the `top` rows [source, ms per step, launches
    per step, GB per step, TB/s] by time, the total attributed against `busy_ms` (the kernels' time per step),
    and a note ("" when there is nothing to say)."""
    named_by_kernels = not op_time_us and bool(kernel_time_us)
    if named_by_kernels:
        op_time_us = ops_from_kernel_names(kernel_time_us, found)
    launch_of = {launch.name: launch for launch in found}
    buffers = sorted(op for op in op_time_us if op.lstrip("%") not in launch_of and op in (kernels_of_op_us or {}))
    if buffers:  # a kernel run both inside a buffer and on its own adds up
        op_time_us = summed([
            *((op, times) for op, times in op_time_us.items() if op not in buffers),
            *(item for op in buffers for item in ops_from_kernel_names(kernels_of_op_us[op], found).items()),
        ])
    groups: dict[str, list] = {}  # source → [µs, launches, {instruction that ran: its launches}]
    not_found: dict[str, float] = {}  # op name → µs
    for name, (us, launches) in op_time_us.items():
        launch = launch_of.get(name.lstrip("%"))
        if launch is None:
            not_found[name] = us
        group = groups.setdefault(NOT_IN_HLO if launch is None else launch.source or launch.group, [0.0, 0, {}])
        group[0] += us
        group[1] += launches
        if launch:
            group[2][launch] = group[2].get(launch, 0) + launches

    def row(source: str, us: float, launches: int, ran: dict[hlo_traffic.Launch, int]) -> list:
        """[source, ms per step, launches per step, GB per step, TB/s (None without bytes or time)]: each
        instruction's bytes as many times per step as it was launched (once, but for a kernel that stands for
        identical fusions)."""
        nbytes = sum((launch.read + launch.written) * n / steps for launch, n in ran.items())
        tb_s = round(nbytes / 1e9 / (us / steps / 1e3), 2) if nbytes and us else None
        return [source[:160], ms_per_step(us, steps), round(launches / steps, 2), round(nbytes / 1e9, 3), tb_s]

    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    attributed = [group for source, group in ranked if source != NOT_IN_HLO]
    ran = {launch: n for group in attributed for launch, n in group[2].items()}
    _, ms, launches, gb, tb_s = row("", sum(g[0] for g in attributed), sum(g[1] for g in attributed), ran)
    notes = []
    if named_by_kernels:
        notes.append("ops named after their kernels (the trace names no HLO op: no XLA Ops line, no hlo_op "
                     "argument): a kernel that serves identical fusions counts, with their launches, under the one "
                     "it is named after; cuBLAS and cuDNN kernels are no HLO names; its kernel events' arguments: "
                     f"{', '.join(kernel_arguments) or 'none'}")
    elif not op_time_us:
        notes.append("the trace has no device kernels (a CPU trace has no device lines): no device time by source")
    if buffers:
        notes.append(f"kernels run in ops that are no HLO instruction (XLA's command buffers, {len(buffers)}: "
                     f"{', '.join(buffers[:5])}) are named after their kernels; cuBLAS and cuDNN kernels are no "
                     "HLO names")
    if not_found:
        longest = ", ".join(sorted(not_found, key=lambda name: -not_found[name])[:5])
        notes.append(f"ops of the trace that are no launch of the HLO's entry computation ({len(not_found)}): "
                     f"{longest}")
    if found and not found[0].source:
        notes.append("the program has no stack frames: the rows are hlo_traffic's kinds, not source lines")
    return {
        "by_source_ms_per_step": [row(source, *group) for source, group in ranked[:top]],
        "by_source_total": {
            "attributed_ms_per_step": ms,
            "launches_per_step": launches,
            "GB_per_step": gb,
            "TB_s": tb_s,
            "not_in_hlo_ms_per_step": ms_per_step(sum(not_found.values()), steps),
            "device_busy_ms_per_step": busy_ms,
            "fraction_of_device_busy": round(ms / busy_ms, 3) if busy_ms else None,
        },
        "by_source_note": "; ".join(notes),
    }


def profile_steps(
    compiled, hlo_text: str, state, batches, steps: int, save_trace: Path | None = None
) -> tuple[dict[str, Any], Any]:
    """Run `steps` more steps under the jax profiler and summarise the device trace, with its time by source line
    of `hlo_text`, `compiled`'s optimised HLO (`time_by_source`, in place of the per-op times); returns (summary,
    state). `save_trace` keeps a copy of the trace (gzipped perfetto JSON) for reading elsewhere."""
    import shutil
    import tempfile

    import jax

    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for i in range(steps):
                state, metrics = compiled(state, batches[i % len(batches)])
            jax.block_until_ready((state, metrics))
        trace = next(Path(directory).rglob("perfetto_trace.json.gz"))
        if save_trace is not None:
            shutil.copyfile(trace, save_trace)
        summary = summarize_trace(trace, steps)
    return with_time_by_source(summary, hlo_traffic.launches(hlo_text), steps), state


def with_time_by_source(summary: dict[str, Any], found: list[hlo_traffic.Launch], steps: int) -> dict[str, Any]:
    """`summarize_trace`'s `summary` with its per-op and per-kernel times (which only `time_by_source` reads)
    replaced by the time by source line of `found`, the step's launches."""
    raw = {key: summary[key] for key in ("op_time_us", "kernel_time_us", "kernel_arguments", "kernels_of_op_us")}
    profile = {key: value for key, value in summary.items() if key not in raw}
    profile.update(time_by_source(
        raw["op_time_us"], found, steps, summary["device_busy_ms_per_step"], kernel_time_us=raw["kernel_time_us"],
        kernel_arguments=raw["kernel_arguments"], kernels_of_op_us=raw["kernels_of_op_us"],
    ))
    return profile


def time_log_mel(waveform, n_mels: int, repeats: int = 5) -> float:
    """Seconds per call of the jitted log-mel on one batch (its share of the step)."""
    import jax

    from wavlink_jax import audio

    log_mel = jax.jit(lambda w: audio.log_mel_spectrogram(w, n_mels))
    log_mel(waveform).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = log_mel(waveform)
    out.block_until_ready()
    return (time.perf_counter() - start) / repeats


def run_ours(args: argparse.Namespace, config, host_batches) -> dict[str, Any]:
    """Build the trainer's state and step on one device, compile, warm up and time it."""
    import jax

    from wavlink_jax import sharding, train_step

    device = jax.devices()[0]
    mesh = sharding.create_mesh(dict(config.mesh), devices=[device])
    start = time.perf_counter()
    setup = train_step.build(config, mesh, config.total_steps)
    state = jax.block_until_ready(train_step.init_state(setup, config.seed))
    init_s = time.perf_counter() - start
    progress(f"ours: state initialised in {init_s:.1f} s")
    step = train_step.make_train_step(setup)
    batch_sharding = sharding.batch_sharding(mesh)
    batches = [jax.device_put(b, batch_sharding) for b in host_batches]

    progress(f"ours: compiling on {device.device_kind}")
    start = time.perf_counter()
    lowered = step.lower(state, batches[0])
    try:
        compiled = lowered.compile(compiler_options=dict(args.xla_option) or None)
    except jax.errors.JaxRuntimeError as error:  # XLA's own words name the option and what is wrong
        if args.xla_option and "option" in str(error):
            raise ValueError(f"--xla-option: {str(error).splitlines()[0]}") from error
        raise
    compile_s = time.perf_counter() - start
    progress(f"ours: compiled in {compile_s:.1f} s")
    hlo_text = compiled.as_text() if args.dump_hlo or args.profile else ""  # seconds for a large model: once
    if args.dump_hlo:
        hlo_traffic.write_hlo(Path(args.dump_hlo), hlo_text)  # gzipped for a .gz name, as hlo_traffic reads it
    flops = cost_analysis_flops(compiled)
    memory = program_memory(compiled)

    for i in range(args.warmup):
        state, metrics = compiled(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for i in range(args.steps):
        state, metrics = compiled(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    step_time = (time.perf_counter() - start) / args.steps
    final_loss = float(metrics["loss"])
    if not math.isfinite(final_loss):
        raise FloatingPointError(f"our loss is {final_loss} after {args.warmup + args.steps} steps")

    progress(f"ours: {1e3 * step_time:.1f} ms/step")
    stats = device.memory_stats() or {}
    log_mel_s = time_log_mel(batches[0]["waveform"], config.model.audio.n_mels)
    profile = None
    if args.profile:
        try:
            save_trace = Path(args.save_trace) if args.save_trace else None
            profile, state = profile_steps(compiled, hlo_text, state, batches, args.profile, save_trace)
            progress(f"ours: profile {json.dumps(profile)}")
        except Exception as error:  # noqa: BLE001 - the timings above stand; the profile is extra
            progress(f"ours: profiling failed: {error!r}")
            profile = {"error": repr(error)[:2000]}
    del state, batches
    return {
        "log_mel_s": log_mel_s,
        "profile": profile,
        "init_s": init_s,
        "compile_s": compile_s,
        "step_time_s": step_time,
        "flops_per_step_cost_analysis": flops,
        "peak_memory_bytes": stats.get("peak_bytes_in_use"),
        "program_memory": memory,
        "final_loss": final_loss,
    }


# ------------------------------------------------------------------------------------------------------------
# Command line


def xla_option(text: str) -> tuple[str, str | bool]:
    """argparse type of --xla-option: NAME=VALUE, an XLA option's name (`xla_...`) and its value, true/false (any
    case) as a boolean; XLA itself refuses a name or value it does not know when the step compiles."""
    name, equals, value = text.partition("=")
    if not equals or not name.startswith("xla_"):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE with an XLA option's name (xla_...)")
    return name, {"true": True, "false": False}.get(value.lower(), value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="base", help="audio tower size (text: CLIP B/32, L/14 for large)")
    parser.add_argument(
        "--batch", type=cli.positive_int, help="global batch (default: base 128, small 64, medium 32, large 16)"
    )
    parser.add_argument("--window", type=float, choices=(30.0, 10.0), default=30.0, help="audio window in seconds")
    parser.add_argument("--baseline", choices=("torch",), help="also time the equivalent PyTorch step")
    parser.add_argument(
        "--compile", nargs="?", const="full", choices=("full", "regional"),
        help="torch.compile the baseline: the whole forward (full, the default) or each transformer block (regional)",
    )
    parser.add_argument(
        "--separate-baseline", action="store_true",
        help="run the baseline in a child process instead of this one (if torch and JAX clash on a GPU)",
    )
    parser.add_argument("--baseline-only", action="store_true", help=argparse.SUPPRESS)  # the child's role
    parser.add_argument("--steps", type=cli.positive_int, help="timed steps (default 20; --tiny 2)")
    parser.add_argument("--warmup", type=cli.positive_int, help="untimed steps after compilation (default 2; --tiny 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    parser.add_argument("--tiny", action="store_true", help="2-layer, 64-wide towers on 1 s windows: seconds on a CPU")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype")
    parser.add_argument(
        "--attention", choices=("auto", "cudnn", "cudnn_unpadded", "xla"), default="auto",
        help="attention implementation (auto: cudnn on GPU, xla elsewhere; cudnn_unpadded: cudnn with odd lengths "
        "unpadded where jax trains them so)",
    )
    parser.add_argument(
        "--remat", default="none",
        choices=("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable"),
        help="rematerialisation policy of every transformer block",
    )
    parser.add_argument(
        "--xla-option", type=xla_option, action="append", default=[], metavar="NAME=VALUE",
        help="an XLA option for our step's compile alone (repeatable; true/false for a flag): e.g. "
        "xla_gpu_enable_command_buffer= (no CUDA graphs), xla_gpu_enable_triton_gemm=false",
    )
    parser.add_argument(
        "--matmul-size", type=cli.positive_int, help="N of the N³ bf16 peak matmul (default 8192; --tiny 256)"
    )
    parser.add_argument("--dump-hlo", metavar="FILE", help="write our compiled step's optimised HLO here")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="after timing, trace N more steps with the jax profiler and report device time by kernel",
    )
    parser.add_argument("--save-trace", metavar="FILE", help="with --profile: keep the trace (gzipped JSON) here")
    parser.add_argument("--jsonl", metavar="FILE", help="also append the JSON object as one line to FILE")
    parser.add_argument("--label", default="", help="a name for this run, kept in the JSON")
    args = parser.parse_args(argv)

    defaults = TINY if args.tiny else dict(
        window=args.window, text_length=TEXT_LENGTH, batch=DEFAULT_BATCH[args.model], steps=20, warmup=2,
        matmul_size=8192,
    )
    args.window = defaults["window"] if args.tiny else args.window
    args.text_length = defaults["text_length"]
    args.frames = int(args.window * FRAMES_PER_SECOND)
    for name in ("batch", "steps", "warmup", "matmul_size"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.compile and not args.baseline:
        parser.error("--compile applies to the baseline: add --baseline torch")
    if args.save_trace and not args.profile:
        parser.error("--save-trace keeps the profiler's trace: add --profile N (the steps to trace)")
    return args


def versions() -> dict[str, str | None]:
    from importlib import metadata

    found = {}
    for package in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # jax takes 75% of a GPU unless told otherwise, too little for large at batch 64 without remat (GPU run 4:
    # 129.9 of an H200's 140 GiB, given 95%). The step is all this process runs on the device: the PyTorch
    # baseline, run first, frees its memory before JAX starts. (Read when JAX first touches the GPU, below.)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
    import numpy as np

    model = wavlink_config(args.model, args.tiny)
    # `auto` is resolved once jax is up (below); the torch baseline does not depend on it.
    config = bench_config(args, model)
    rng = np.random.default_rng(0)
    host_batches = [
        random_batch(rng, args.batch, int(args.window * SAMPLE_RATE), args.text_length, model.text.vocab_size)
        for _ in range(2)
    ]
    # The baseline runs before JAX touches the device: JAX reserves most of the GPU's memory when it starts.
    # A failing baseline (e.g. a torch.compile error) is reported in the result; ours is still measured.
    baseline = None
    if args.baseline and args.separate_baseline:
        baseline = run_torch_in_child(argv if argv is not None else sys.argv[1:])
    elif args.baseline:
        try:
            baseline = run_torch(args, model, config, host_batches)
        except Exception as error:  # noqa: BLE001 - reported, not hidden
            progress(f"torch baseline failed: {error!r}")
            baseline = {"name": "torch", "compile": args.compile, "error": repr(error)[:2000]}
    if args.baseline_only:
        print(json.dumps(baseline))
        return baseline

    import jax

    device = jax.devices()[0]
    if args.attention == "auto":
        args.attention = "cudnn" if device.platform == "gpu" else "xla"
    config.attention_implementation = args.attention
    peak_tflops = measure_matmul_peak(args.matmul_size)
    ours = run_ours(args, config, host_batches)

    flops_model = model_flops(model, args.batch, args.frames, args.text_length)
    result: dict[str, Any] = {
        "label": args.label,
        "model": "tiny" if args.tiny else args.model,
        "batch": args.batch,
        "window_s": args.window,
        "frames": args.frames,
        "text_length": args.text_length,
        "dtype": args.dtype,
        "attention": args.attention,
        "odd_lengths_unpadded": (
            odd_lengths_unpadded(model, args.frames, args.text_length, args.dtype)
            if args.attention == "cudnn_unpadded"
            else None
        ),
        "remat": args.remat,
        "xla_options": dict(args.xla_option),
        "platform": device.platform,
        "device": device.device_kind,
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions(),
        "steps": args.steps,
        "warmup": args.warmup,
        "matmul_size": args.matmul_size,
        "matmul_peak_tflops": peak_tflops,
        "flops_per_step_model": flops_model,
        **ours,
    }
    step_time = ours["step_time_s"]
    result["samples_per_s"] = args.batch / step_time
    result["tflops_model"] = flops_model / step_time / 1e12
    result["fraction_of_peak_model"] = result["tflops_model"] / peak_tflops
    cost_flops = ours["flops_per_step_cost_analysis"]
    result["tflops_cost_analysis"] = cost_flops / step_time / 1e12 if cost_flops else None
    result["fraction_of_peak_cost_analysis"] = (
        result["tflops_cost_analysis"] / peak_tflops if cost_flops else None
    )
    if baseline is not None and "error" not in baseline:
        # The baseline's own count: its last Whisper block runs for every position.
        baseline["flops_per_step_model"] = model_flops(
            model, args.batch, args.frames, args.text_length, global_only=False
        )
        baseline["samples_per_s"] = args.batch / baseline["step_time_s"]
        baseline["tflops_model"] = baseline["flops_per_step_model"] / baseline["step_time_s"] / 1e12
        baseline["fraction_of_peak_model"] = baseline["tflops_model"] / peak_tflops
        result["ratio"] = result["samples_per_s"] / baseline["samples_per_s"]
        result["ratio_equal_work"] = result["tflops_model"] / baseline["tflops_model"]
    result["baseline"] = baseline
    result.setdefault("ratio", None)
    result.setdefault("ratio_equal_work", None)

    print(json.dumps(result) if args.json else report(result))
    if args.jsonl:
        with open(args.jsonl, "a") as file:
            file.write(json.dumps(result) + "\n")
    return result


def gib(value: int | None, digits: int = 1) -> str:
    """Bytes as GiB for a report ("n/a" for None)."""
    return "n/a" if value is None else f"{value / 2**30:.{digits}f} GiB"


def idle_table(profile: dict[str, Any], step_time_s: float, xla_options: dict[str, Any]) -> list[str]:
    """The lines of a profile's idle gaps (`idle_gaps`); none for a profile without them or without any.

    XLA runs its command buffers (CUDA graphs) kernel by kernel while a profiler is on (its flag
    `xla_enable_command_buffers_during_profiling` is off by default), so the profile's gaps are those of separate
    launches; what the timed step (`step_time_s`, compiled with `xla_options`, which may turn the graphs off)
    leaves idle is its time less the profile's busy time. That is the figure to read: the profiler's gaps miss the
    host falling behind the card (GPU run 5: base without graphs left 12.5 ms of its step idle, its profile 1.0)."""
    if not profile.get("idle_ms_per_step"):
        return []
    sizes = ", ".join(f"{label} {ms:.2f} ({n:g}×)" for label, (ms, n) in profile["idle_by_size_ms_per_step"].items())
    idle = profile["idle_ms_per_step"]
    timed_idle = 1e3 * step_time_s - profile["device_busy_ms_per_step"]
    if NO_COMMAND_BUFFERS not in xla_options.items():
        how = ("under the profiler, which launches the kernels of XLA's command buffers one by one; the timed step, "
               "in CUDA graphs,")
    else:
        how = "under the profiler; the timed step, without command buffers,"
    lines = [
        f"  idle between kernels {idle:.2f} ms/step {how} leaves {timed_idle:.2f} ms not busy (the figure to read)",
        f"  the profile's gaps: {sizes}; longest (ms/step, gaps/step):",
    ]
    gaps = profile["top_gaps_ms_per_step"]
    return lines + [f"    {ms:8.2f} ms {n:6.1f}×  {before} → {after}" for before, after, ms, n in gaps]


def source_table(profile: dict[str, Any]) -> list[str]:
    """The lines of a profile's time by source line (`time_by_source`): each row, the total, the note."""
    total = profile["by_source_total"]
    lines = ["    by source line (ms/step, launches/step, GB/step, TB/s):"] if profile["by_source_ms_per_step"] else []
    for source, ms, n, gb, tb_s in profile["by_source_ms_per_step"]:
        bandwidth = "-" if tb_s is None else f"{tb_s:.2f}"
        lines.append(f"    {ms:8.2f} ms {n:6.1f}× {gb:8.2f} GB {bandwidth:>5} TB/s  {source}")
    if total["fraction_of_device_busy"] is not None:
        lines.append(
            f"    attributed {total['attributed_ms_per_step']:.2f} of {total['device_busy_ms_per_step']:.2f} ms device "
            f"busy ({100 * total['fraction_of_device_busy']:.0f}%), {total['GB_per_step']:.2f} GB at "
            f"{total['TB_s'] or 0:.2f} TB/s; {total['not_in_hlo_ms_per_step']:.2f} ms in ops not in the HLO"
        )
    return lines + ([f"    by source: {profile['by_source_note']}"] if profile["by_source_note"] else [])


def xla_options_text(xla_options: dict[str, Any]) -> str:
    """", XLA options a=False, b=''" for the report's first line; "" without any."""
    if not xla_options:
        return ""
    return ", XLA options " + ", ".join(f"{name}={value!r}" for name, value in xla_options.items())


def unpadded_text(unpadded: dict[str, bool] | None) -> str:
    """` (audio unpadded, text padded)`: which towers' odd lengths cuDNN got as they are; "" when not asked."""
    if unpadded is None:
        return ""
    return " (" + ", ".join(f"{name} {'unpadded' if value else 'padded'}" for name, value in unpadded.items()) + ")"


def report(r: dict[str, Any]) -> str:
    """The human-readable summary of `main`'s result."""
    cost = (
        f"{r['tflops_cost_analysis']:.3g} TFLOP/s ({100 * r['fraction_of_peak_cost_analysis']:.0f}%)"
        if r["tflops_cost_analysis"] is not None
        else "n/a"
    )
    lines = [
        f"WavLink {r['model']}, batch {r['batch']}, {r['window_s']:g} s window, {r['dtype']}, attention "
        f"{r['attention']}{unpadded_text(r['odd_lengths_unpadded'])}, remat {r['remat']}"
        f"{xla_options_text(r['xla_options'])} on {r['device']} ({r['platform']}), "
        f"{r['date']}",
        "  versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v),
        f"  bf16 matmul peak ({r['matmul_size']}³, mean of 10): {r['matmul_peak_tflops']:.3g} TFLOP/s",
        f"  ours:  {1e3 * r['step_time_s']:.2f} ms/step, {r['samples_per_s']:.1f} samples/s, model "
        f"{r['tflops_model']:.3g} TFLOP/s ({100 * r['fraction_of_peak_model']:.0f}% of peak), cost analysis {cost}, "
        f"peak memory {gib(r['peak_memory_bytes'])} (program {gib(r['program_memory']['program_bytes'])}), "
        f"compile {r['compile_s']:.1f} s",
    ]
    lines.append(
        f"  log-mel alone: {1e3 * r['log_mel_s']:.2f} ms ({100 * r['log_mel_s'] / r['step_time_s']:.1f}% of the step)"
    )
    profile = r["profile"]
    if profile and "error" in profile:
        lines.append(f"  profile failed: {profile['error']}")
    elif profile:
        kinds = ", ".join(f"{kind} {ms:.2f}" for kind, ms in profile["by_kind_ms_per_step"].items())
        lines.append(f"  device busy {profile['device_busy_ms_per_step']:.2f} ms/step: {kinds or 'no device lines'}")
        lines += idle_table(profile, r["step_time_s"], r["xla_options"])
        for title, key in (("kernels", "top_kernels_ms_per_step"), ("HLO ops", "top_ops_ms_per_step")):
            if profile[key]:
                lines.append(f"    {title} (ms/step, launches/step):")
                lines += [f"    {ms:8.2f} ms {n:6.1f}×  {name}" for name, ms, n in profile[key]]
        lines += source_table(profile)
    b = r["baseline"]
    if b is not None and "error" in b:
        lines.append(f"  torch baseline failed: {b['error']}")
    elif b is not None:
        kind = f"torch.compile {b['compile']}" if b["compile"] else "eager"
        lines += [
            f"  torch ({kind}): {1e3 * b['step_time_s']:.2f} ms/step, {b['samples_per_s']:.1f} samples/s, model "
            f"{b['tflops_model']:.3g} TFLOP/s ({100 * b['fraction_of_peak_model']:.0f}% of peak), peak memory "
            f"{gib(b['peak_memory_bytes'])}, first step {b['compile_s']:.1f} s",
            f"  ours / torch throughput: {r['ratio']:.2f}× (samples/s); {r['ratio_equal_work']:.2f}× at equal work "
            "(each side's own FLOP count / time)",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    with cli.user_errors(out_of_memory=f"{cli.OUT_OF_MEMORY_ADVICE}: lower --batch, or recompute blocks (--remat)"):
        main()
