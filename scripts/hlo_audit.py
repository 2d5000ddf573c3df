"""Read the training step's lowered program for a GPU, on any machine: kernels, dtypes and FLOPs.

    python scripts/hlo_audit.py --model base --batch 8                    # lowered for cuda (the default)
    python scripts/hlo_audit.py --model large --batch 4 --platform cpu --json

The step is the benchmark's (`scripts/benchmark.py`: the trainer's own jitted step on the paper's recipe),
traced with abstract arrays and lowered to StableHLO for `--platform` (nothing is allocated, compiled or run,
so a CPU-only machine can read the program a GPU would be given). From that program it reports:

* every `dot_general`'s FLOPs grouped by (lhs, rhs, result) dtype: the share done in bf16, and the largest
  matmuls that are not (those run at a fraction of the tensor-core rate);
* convolutions by dtype;
* cuDNN fused-attention calls (forward, backward) with their (padded) shapes, mask type and dtypes: on a GPU
  every full-length attention layer must be one, or the step silently runs XLA's materialised-softmax path
  (GPU run 1 lost more than half its time that way);
* the total of matmul + convolution + attention FLOPs against `benchmark.model_flops`, the analytic count the
  benchmark's TFLOP/s figures rest on (attention backward counted as its four matmuls, without the
  recomputation of the logits flash attention does, as `model_flops` does).

Ops are counted with the number of times their function is called (the lowered module keeps helpers such
as padding as private functions). A program with loops (`while`: gradient accumulation, scans) is refused,
since their trip counts are not in the text.

Lowering cuDNN attention asks the installed cuDNN for its version, which a machine without CUDA does not
have; for `--platform cuda` the audit answers that query with `--cudnn-version` (default 9.19, the H200
image's). Everything else is jax's own lowering. Assumes the jax pinned in requirements.txt (the query is a
private jax function); a jax without it is reported as such.

`--target h100|h200` goes one stage further and COMPILES the step for that card, still without a GPU: XLA's
GPU compiler runs here on a compile-only device described by `scripts/gpu_targets/<card>.txtpb`, so every
fusion, layout and buffer decision is the one the card's compiler makes (jax's CUDA plugin and its CUDA
libraries are needed, not a GPU or a driver: `make gpu-compile-env` installs them into `.venv-gpu-compile`).
It reports the program's device memory (arguments, temporaries, outputs not aliased to donated arguments),
the bytes every element-wise launch moves by source line (`hlo_traffic.py --by source`) and what XLA
recomputed itself to fit the card (its rematerialisation: large at batch 64 without remat recomputes 23 blocks'
GELU outputs), and `--compiled-hlo FILE` keeps the optimised HLO for `hlo_traffic.py`. What differs from the card: no
autotuning (so XLA's Triton GEMM fusions are switched off and every GEMM is a cuBLAS call, as the profiled
runs' top GEMMs were), and this machine's jax/XLA version. Calibrated on GPU run 2's code: 24.8 GiB and 110
GB of element-wise traffic here against the 28.8 GiB peak measured on the H200 and 121 GB counted in its dump
(BENCHMARKS.md). XLA plans the program for the share of the card JAX is given, `--memory-fraction` (default
0.75, jax's, which the trainer runs with; XLA_PYTHON_CLIENT_MEM_FRACTION on the card; benchmark.py sets 0.90, so
give 0.9 to compare with its runs), which matters near the card's size: large at batch 64
given 0.95 compiles here with the card's XLA version to the 129.78 GiB GPU run 4 measured, and the report says
whether the program fits that share.

    .venv-gpu-compile/bin/python scripts/hlo_audit.py --model base --batch 128 --target h200

`--mesh fsdp=8` (with `--target`; `data`, `fsdp`, `tensor` as in `config.mesh`) compiles the step for that many
cards of one machine, the batch being the global batch: the memory and traffic are then each device's, and the
report adds the collectives by kind (how many, the arrays they move, the bytes each device sends over the
links by the ring algorithm) and the largest of them by source line. That is how activations crossing devices
under FSDP were found (BENCHMARKS.md, "FSDP on 8 GPUs, compiled without them").

    .venv-gpu-compile/bin/python scripts/hlo_audit.py --model large --batch 128 --target h100 --mesh fsdp=8
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[0]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmark  # noqa: E402
import hlo_traffic  # noqa: E402

from wavlink_jax.sharding import BATCH_AXES, MESH_AXES  # noqa: E402

TARGETS_DIR = Path(__file__).resolve().parent / "gpu_targets"
TARGETS = tuple(sorted(path.stem for path in TARGETS_DIR.glob("*.txtpb")))
# XLA options of the compile for a target: without a device XLA cannot autotune, and its untuned Triton GEMM
# tiling fails on some of the step's dots ("Couldn't find output tile sizes"); cuBLAS takes every GEMM.
TARGET_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
# XLA plans a program (its scheduler and rematerialisation aim below a memory limit) for the memory the module's
# config gives, which on a card is what the client's allocator holds: XLA_PYTHON_CLIENT_MEM_FRACTION of the card,
# jax's default 75%. A compile-only device has no allocator, and XLA takes 80% of its described memory instead
# (`GetSchedulerMemoryLimit`, xla/service/gpu/gpu_hlo_schedule.cc). So the description handed to XLA carries the
# card's memory × fraction / 80%, and the compile plans as the card would at that fraction (GPU run 4: large at
# batch 64 given 95%, 129.78 GiB on the card and compiled here by its XLA version).
JAX_DEFAULT_MEMORY_FRACTION = 0.75
COMPILE_ONLY_MEMORY_SHARE = 0.8
_MEMORY_SIZE = re.compile(r"device_memory_size: (\d+)")  # a description's memory in bytes
GPU_COMPILE_ENV = (
    "jax's CUDA plugin with its CUDA libraries: `make gpu-compile-env`, then run this script with "
    ".venv-gpu-compile/bin/python (no GPU or driver needed)"
)

CUDNN_FORWARD = "__cudnn$fmhaSoftmax"
CUDNN_BACKWARD = "__cudnn$fmhaSoftmaxBackward"

# What the benchmark's --attention auto resolves to on each platform.
PLATFORM_ATTENTION = {"cuda": "cudnn", "cpu": "xla"}

_FUNCTION = re.compile(r"^  func\.func (?:public |private )?@([\w$.]+)\(", re.M)
_CALL = re.compile(r"\bcall @([\w$.]+)\(")
_TENSOR = re.compile(r"tensor<([^>]*)>")
_SIGNATURE = re.compile(r" : \(([^)]*)\) -> (.*)$")
_DOT = re.compile(r"stablehlo\.dot_general .*?contracting_dims = \[([\d, ]*)\] x")
_CONV = re.compile(r"stablehlo\.convolution\(.*?\bdim_numbers = \[[^\]]*\]x\[([^\]]*)\]->")
_LHS_DILATE = re.compile(r"\blhs_dilate = \[([\d, ]*)\]")
_CUSTOM = re.compile(r"stablehlo\.custom_call @([\w$.]+)\(")
# A custom call jax partitions itself (`custom_partitioning`, as cuDNN attention on a mesh of several devices):
# lowered, it names a Python callback, not its kernel.
PARTITIONED = "CustomSPMDPartitioning"
_MASK = re.compile(r"\\22mask_type\\22: \\22(\w+)\\22")


def parse_tensor(text: str) -> tuple[tuple[int, ...], str]:
    """`8x1501x512xbf16` → ((8, 1501, 512), "bf16"); a scalar `f32` → ((), "f32")."""
    *dims, dtype = text.split("x")
    return tuple(int(d) for d in dims), dtype


def _signature(line: str) -> tuple[list[tuple[tuple[int, ...], str]], list[tuple[tuple[int, ...], str]]]:
    """Operand and result tensor types of one op line."""
    match = _SIGNATURE.search(line)
    if match is None:
        raise ValueError(f"no type signature in: {line[:200]}")
    operands, results = match.groups()
    return [parse_tensor(t) for t in _TENSOR.findall(operands)], [parse_tensor(t) for t in _TENSOR.findall(results)]


def functions(text: str) -> dict[str, list[str]]:
    """The module's functions, name → its body lines."""
    starts = [(m.start(), m.group(1)) for m in _FUNCTION.finditer(text)]
    bodies = {}
    for (start, name), (end, _) in zip(starts, starts[1:] + [(len(text), "")]):
        bodies[name] = text[start:end].splitlines()[1:]
    return bodies


def multiplicities(bodies: dict[str, list[str]], entry: str = "main") -> dict[str, int]:
    """How many times each function runs per call of `entry` (static calls; loops are refused earlier)."""
    calls = {name: collections.Counter(c for line in lines for c in _CALL.findall(line)) for name, lines in bodies.items()}
    counts: collections.Counter = collections.Counter({entry: 1})
    order, seen = [], set()

    def visit(name: str) -> None:  # callees after callers: a reverse post-order of the call graph
        if name in seen:
            return
        seen.add(name)
        for callee in calls[name]:
            visit(callee)
        order.append(name)

    visit(entry)
    for name in reversed(order):
        for callee, n in calls[name].items():
            counts[callee] += counts[name] * n
    return dict(counts)


def audit_text(text: str) -> dict[str, Any]:
    """Matmuls, convolutions and cuDNN attention calls of a lowered StableHLO module, with FLOPs."""
    bodies = functions(text)
    if "main" not in bodies:
        raise ValueError("not a lowered jax module: no @main function")
    if any("stablehlo.while" in line for lines in bodies.values() for line in lines):
        raise ValueError("the program has loops (gradient accumulation or scans): their trip counts are unknown")
    runs = multiplicities(bodies)
    dots: collections.Counter = collections.Counter()
    dot_counts: collections.Counter = collections.Counter()
    largest_other: list[tuple[int, str]] = []
    convolutions: collections.Counter = collections.Counter()
    attention: list[dict[str, Any]] = []
    partitioned = 0
    for name, lines in bodies.items():
        times = runs.get(name, 0)
        for line in lines:
            if (dot := _DOT.search(line)) is not None:
                ((lhs, lhs_dtype), (_, rhs_dtype)), ((result, result_dtype),) = _signature(line)
                contracted = math.prod(lhs[int(d)] for d in dot.group(1).split(",") if d.strip())
                flops = 2 * math.prod(result) * contracted * times
                key = f"{lhs_dtype} x {rhs_dtype} -> {result_dtype}"
                dots[key] += flops
                dot_counts[key] += times
                if key != "bf16 x bf16 -> bf16":
                    largest_other.append((flops, line.split(" : ")[-1].strip()))
            elif (conv := _CONV.search(line)) is not None:
                operands, results = _signature(line)
                (_, lhs_dtype), (kernel, _) = operands[:2]
                result, result_dtype = results[0]
                kernel_labels = [label.strip() for label in conv.group(1).split(",")]
                per_output = math.prod(size for size, label in zip(kernel, kernel_labels) if label != "o")
                # An lhs-dilated input (a transposed convolution: the input gradient of a strided one) has
                # d − 1 inserted zeros after each value along a dimension dilated by d, which multiply nothing:
                # a window meets on average taps / d values, so that many multiply-adds per output (padding
                # counted as work, as for every convolution here) — for the input gradient of a stride-d
                # convolution, the forward's count.
                dilate = _LHS_DILATE.search(line)
                dilation = math.prod(int(d) for d in dilate.group(1).split(",")) if dilate else 1
                flops = 2 * math.prod(result) * per_output * times // dilation
                convolutions[f"{lhs_dtype} -> {result_dtype}"] += flops
            elif (custom := _CUSTOM.search(line)) is not None and custom.group(1) == PARTITIONED:
                partitioned += times
            elif custom is not None and custom.group(1) in (CUDNN_FORWARD, CUDNN_BACKWARD):
                (q, q_dtype), (k, _) = _signature(line)[0][:2]
                batch, queries, heads, head_dim = q
                matmuls = 2 if custom.group(1) == CUDNN_FORWARD else 4  # QKᵀ, AV; backward dQ, dK, dV, dP
                mask = _MASK.search(line)
                attention.append(
                    {
                        "kernel": "forward" if custom.group(1) == CUDNN_FORWARD else "backward",
                        "q": list(q),
                        "kv_length": k[1],
                        "dtype": q_dtype,
                        "mask": mask.group(1) if mask else None,
                        "calls": times,
                        "flops": 2 * matmuls * batch * heads * queries * k[1] * head_dim * times,
                    }
                )
    dot_total = sum(dots.values())
    largest_other.sort(reverse=True)
    return {
        "dot_flops": dict(dots),
        "dot_counts": dict(dot_counts),
        "bf16_dot_share": dots.get("bf16 x bf16 -> bf16", 0) / dot_total if dot_total else 0.0,
        "largest_non_bf16_dots": [{"flops": f, "types": t} for f, t in largest_other[:8]],
        "convolution_flops": dict(convolutions),
        "cudnn_attention": attention,
        "partitioned_calls": partitioned,
        "total_flops": dot_total + sum(convolutions.values()) + sum(a["flops"] for a in attention),
    }


@contextlib.contextmanager
def cudnn_version_answer(version: int) -> Iterator[None]:
    """Answer jax's cuDNN version query with `version` while lowering for cuda on a machine without cuDNN."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fused
    except ImportError as err:
        raise SystemExit(f"this jax has no cuDNN attention lowering to audit ({err}); use --platform cpu") from err
    if not hasattr(fused, "check_cudnn_version"):
        raise SystemExit("this jax's cuDNN attention has no check_cudnn_version to answer; use --platform cpu")
    original = fused.check_cudnn_version
    fused.check_cudnn_version = lambda *args, **kwargs: version
    try:
        yield
    finally:
        fused.check_cudnn_version = original


def planned_description(description: str, memory_fraction: float) -> str:
    """A card's description (`gpu_targets/<card>.txtpb` text) with its memory scaled so that XLA, compiling
    without the card, plans for `memory_fraction` of it as it does on the card (`COMPILE_ONLY_MEMORY_SHARE`)."""
    planned = int(int(_MEMORY_SIZE.search(description)[1]) * memory_fraction / COMPILE_ONLY_MEMORY_SHARE)
    return _MEMORY_SIZE.sub(f"device_memory_size: {planned}", description, count=1)


def target_devices(name: str, count: int = 1, memory_fraction: float = JAX_DEFAULT_MEMORY_FRACTION) -> list[Any]:
    """`count` compile-only devices of the card `name` (`gpu_targets/<name>.txtpb`) on one machine, for which
    XLA plans `memory_fraction` of the card's memory (`planned_description`): XLA's GPU compiler runs here for
    them; nothing runs on a GPU. A SystemExit saying what to install when jax has no CUDA plugin."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # the plugin's version check needs a driver
    from jax.experimental import topologies

    config = planned_description((TARGETS_DIR / f"{name}.txtpb").read_text(), memory_fraction)
    try:
        # slices x hosts per slice x devices per host
        topology = topologies.get_topology_desc(platform="cuda", target_config=config, topology=f"1x1x{count}")
    except Exception as error:  # noqa: BLE001 - jax's errors here name no remedy
        raise SystemExit(f"--target {name} needs {GPU_COMPILE_ENV}; jax said: {str(error)[:300]}") from error
    return list(topology.devices)


def lower_step(
    model: str,
    batch: int,
    window: float,
    platform: str,
    cudnn_version: int,
    remat: str = "none",
    devices: list[Any] | None = None,
    mesh: dict[str, int] | None = None,
    *,
    attention: str,
) -> Any:
    """The benchmark's train step at global batch `batch`, traced with abstract arrays on `devices` (default: this
    machine's first) arranged as `mesh` (`config.mesh`; default all axes 1) and lowered for `platform` (jax's
    `Lowered`: `.as_text()` is its StableHLO), with `attention` as the implementation of every tower."""
    import jax
    import numpy as np

    from wavlink_jax import sharding, train_step

    config = benchmark.bench_config(
        argparse.Namespace(batch=batch, window=window, dtype="bfloat16", remat=remat, attention=attention),
        benchmark.wavlink_config(model, tiny=False),
    )
    config.mesh = {**config.mesh, **(mesh or {})}
    device_mesh = sharding.create_mesh(dict(config.mesh), devices=devices or jax.devices()[:1])
    setup = train_step.build(config, device_mesh, config.total_steps)
    on_mesh = sharding.batch_sharding(device_mesh)
    text = (batch, benchmark.TEXT_LENGTH)
    abstract_batch = {  # what benchmark.random_batch makes
        "waveform": jax.ShapeDtypeStruct((batch, int(window * benchmark.SAMPLE_RATE)), np.float32, sharding=on_mesh),
        "input_ids": jax.ShapeDtypeStruct(text, np.int32, sharding=on_mesh),
        "attention_mask": jax.ShapeDtypeStruct(text, np.int32, sharding=on_mesh),
    }
    step = train_step.make_train_step(setup)
    guard = cudnn_version_answer(cudnn_version) if platform == "cuda" else contextlib.nullcontext()
    with guard:  # the version is asked while tracing
        return step.trace(setup.abstract_state, abstract_batch).lower(lowering_platforms=(platform,))


def card_memory_bytes(name: str) -> int | None:
    """The device memory of the card `name` as its description gives it (None for a name with no description)."""
    card = TARGETS_DIR / f"{name}.txtpb"
    found = _MEMORY_SIZE.search(card.read_text()) if card.is_file() else None
    return int(found.group(1)) if found else None


def compile_for_target(
    lowered: Any, name: str, compiled_hlo: str | None, top: int, memory_fraction: float = JAX_DEFAULT_MEMORY_FRACTION
) -> dict[str, Any]:
    """Compile `lowered` (traced on `target_devices(name, ..., memory_fraction)`, the share of the card XLA plans
    for, which the result records for the report) and read the program: its device memory and the element-wise
    traffic by source line; the optimised HLO goes to `compiled_hlo` (gzipped for .gz)."""
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options=TARGET_COMPILER_OPTIONS)
    compile_s = time.perf_counter() - start
    hlo = compiled.as_text()
    if compiled_hlo:
        hlo_traffic.write_hlo(Path(compiled_hlo), hlo)
    found = hlo_traffic.launches(hlo)
    elementwise = [launch for launch in found if hlo_traffic.is_elementwise(launch.group)]
    recomputed = hlo_traffic.rematerialised(found)
    exchanged = hlo_traffic.collectives(hlo)
    try:
        by, groups = "source", hlo_traffic.totals(elementwise, "source")
    except ValueError:  # a jax that writes no stack frames
        by, groups = "kind", hlo_traffic.totals(elementwise, "kind")
    return {
        "target": name,
        "card_memory_bytes": card_memory_bytes(name),
        "memory_fraction": memory_fraction,
        "compile_s": compile_s,
        **benchmark.program_memory(compiled),
        "launches": len(found),
        "cudnn_calls": {
            kind: sum(launch.group == f"custom call {target}" for launch in found)
            for kind, target in (("forward", CUDNN_FORWARD), ("backward", CUDNN_BACKWARD))
        },
        "elementwise_launches": len(elementwise),
        "elementwise_bytes": sum(launch.read + launch.written for launch in elementwise),
        "elementwise_grouped_by": by,
        "elementwise_groups": groups[:top],
        "rematerialised_launches": len(recomputed),
        "rematerialised_bytes": sum(launch.read + launch.written for launch in recomputed),
        "not_counted": hlo_traffic.not_entered(hlo),
        "collectives": hlo_traffic.collective_totals(exchanged),
        "largest_collectives": [
            {"op": c.op, "devices": c.group_size, "array_bytes": c.array_bytes, "source": c.source, "arrays": c.arrays}
            for c in sorted(exchanged, key=lambda c: -c.array_bytes)[:top]
        ],
    }


def expected_cudnn_layers(model: str) -> int:
    """Full-length attention layers of the step: all but the audio tower's last (global row only) + text."""
    config = benchmark.wavlink_config(model, tiny=False)
    return config.audio.num_layers - 1 + config.text.num_layers


def run(args: argparse.Namespace) -> dict[str, Any]:
    devices = target_devices(args.target, math.prod(args.mesh.values()), args.memory_fraction) if args.target else None
    start = time.perf_counter()
    lowered = lower_step(
        args.model, args.batch, args.window, args.platform, args.cudnn_version, args.remat, devices, args.mesh,
        attention=args.attention,
    )
    text = lowered.as_text()
    lower_s = time.perf_counter() - start
    result = audit_text(text)
    analytic = benchmark.model_flops(
        benchmark.wavlink_config(args.model, tiny=False),
        args.batch,
        int(args.window * benchmark.FRAMES_PER_SECOND),
        benchmark.TEXT_LENGTH,
    )
    result.update(
        model=args.model,
        batch=args.batch,
        window=args.window,
        platform=args.platform,
        remat=args.remat,
        attention=args.attention,
        mesh=args.mesh,
        lower_s=lower_s,
        analytic_flops=analytic,
        lowered_over_analytic=result["total_flops"] / analytic,
        cudnn_calls={
            kind: sum(a["calls"] for a in result["cudnn_attention"] if a["kernel"] == kind)
            for kind in ("forward", "backward")
        },
        cudnn_expected=expected_cudnn_layers(args.model) if args.platform == "cuda" else 0,
    )
    if args.hlo:
        Path(args.hlo).write_text(text)
    if args.target:
        result["compiled"] = compile_for_target(
            lowered, args.target, args.compiled_hlo, args.top, args.memory_fraction
        )
    return result


def report(r: dict[str, Any]) -> str:
    lines = [
        f"{r['model']}, batch {r['batch']}, {r['window']:g} s, lowered for {r['platform']} in {r['lower_s']:.1f} s"
        f" (remat {r['remat']}, attention {r['attention']}"
        + "".join(f", {axis}={size}" for axis, size in r["mesh"].items())
        + ")",
        "matmuls (dot_general) by dtype:",
    ]
    total = sum(r["dot_flops"].values())
    for key, flops in sorted(r["dot_flops"].items(), key=lambda item: -item[1]):
        lines.append(f"  {key:24s} {r['dot_counts'][key]:5d} ops  {flops / 1e9:10.1f} GFLOP  {flops / total:7.2%}")
    for item in r["largest_non_bf16_dots"]:
        lines.append(f"    not bf16: {item['flops'] / 1e9:8.2f} GFLOP  {item['types']}")
    for key, flops in r["convolution_flops"].items():
        lines.append(f"convolutions {key}: {flops / 1e9:.1f} GFLOP")
    calls = r["cudnn_calls"]
    lines.append(
        f"cuDNN flash attention: {calls['forward']} forward, {calls['backward']} backward calls"
        + (f" (expected {r['cudnn_expected']} each)" if r["platform"] == "cuda" and not r["partitioned_calls"] else "")
    )
    shapes = collections.Counter(
        (a["kernel"], tuple(a["q"]), a["kv_length"], a["dtype"], a["mask"]) for a in r["cudnn_attention"]
    )
    for (kernel, q, kv, dtype, mask), n in sorted(shapes.items()):
        lines.append(f"  {n:3d} × {kernel:8s} q {q} kv {kv} {dtype} mask {mask}")
    if r["partitioned_calls"]:
        lines.append(
            f"  and {r['partitioned_calls']} calls partitioned by jax (cuDNN attention on a mesh): neither their kind "
            "nor their FLOPs can be read before compiling (the compiled program's cuDNN calls are below)"
        )
    lines.append(
        f"FLOPs: lowered {r['total_flops'] / 1e12:.3f} T (matmul + conv + attention) vs analytic "
        f"{r['analytic_flops'] / 1e12:.3f} T: ratio {r['lowered_over_analytic']:.3f}"
        + (" (without the partitioned calls)" if r["partitioned_calls"] else "")
    )
    if "compiled" in r:
        lines += compiled_report(r["compiled"])
    return "\n".join(lines)


def fit_lines(c: dict[str, Any]) -> list[str]:
    """Whether the program fits the share of the card JAX is given, which XLA planned it for (none for a card
    whose memory its description does not give)."""
    if not c["card_memory_bytes"]:
        return []
    given = c["memory_fraction"] * c["card_memory_bytes"]
    verdict = "fits it" if c["program_bytes"] <= given else (
        "does NOT fit it: give JAX more of the card (XLA_PYTHON_CLIENT_MEM_FRACTION, --memory-fraction), recompute "
        "blocks (--remat) or lower the batch"
    )
    return [f"  planned for the {c['memory_fraction']:.0%} of the card JAX is given ({benchmark.gib(given, 2)}, "
            f"XLA_PYTHON_CLIENT_MEM_FRACTION={c['memory_fraction']:g}): the program {verdict}"]


def compiled_report(c: dict[str, Any]) -> list[str]:
    """The lines of `compile_for_target`'s result."""
    gib = functools.partial(benchmark.gib, digits=2)
    lines = [
        f"compiled for {c['target']} on this machine (no GPU) in {c['compile_s']:.1f} s (figures per device):",
        f"  device memory {gib(c['program_bytes'])}"
        + (f" of the card's {gib(c['card_memory_bytes'])}" if c["card_memory_bytes"] else "")
        + f": arguments {gib(c['argument_bytes'])} (donated and aliased {gib(c['aliased_bytes'])}), temporaries "
        f"{gib(c['temporary_bytes'])}, outputs {gib(c['output_bytes'])}",
        *fit_lines(c),
        f"  cuDNN flash attention: {c['cudnn_calls']['forward']} forward, {c['cudnn_calls']['backward']} backward "
        "calls",
        f"  {c['launches']} launches; element-wise (not GEMMs, custom calls or collectives): "
        f"{c['elementwise_launches']} moving {c['elementwise_bytes'] / 1e9:.1f} GB; "
        f"by {c['elementwise_grouped_by']} (launches, GB read + written):",
    ]
    lines += [f"  {count:6d} {nbytes / 1e9:8.2f}  {group}" for group, nbytes, count in c["elementwise_groups"]]
    if c["rematerialised_launches"]:
        recomputed = hlo_traffic.rematerialisation_line(
            c["rematerialised_launches"], c["rematerialised_bytes"], memory="card"
        )
        lines.append(f"  {recomputed}")
    if c["not_counted"]:
        lines.append(f"  NOT COUNTED: the bodies of {', '.join(c['not_counted'])}")
    if c["collectives"]:
        lines.append("  collectives (count, GB of arrays moved, GB each device sends):")
        for op, row in sorted(c["collectives"].items(), key=lambda item: -item[1]["wire_bytes"]):
            lines.append(f"  {op:20s} {row['count']:5d} {row['array_bytes'] / 1e9:8.3f} {row['wire_bytes'] / 1e9:8.3f}")
        lines.append("  largest collectives (MB moved, devices, op, source line, arrays):")
        lines += [
            f"  {x['array_bytes'] / 1e6:8.1f} {x['devices']:3d} {x['op']:18s} {x['source']}  {x['arrays'][:100]}"
            for x in c["largest_collectives"]
        ]
    return lines


def mesh_sizes(text: str) -> dict[str, int]:
    """`--mesh`'s `fsdp=8` or `data=2,fsdp=4` as {axis: size}; an argparse error names a wrong item."""
    sizes = {}
    for item in text.split(","):
        axis, _, size = item.partition("=")
        if axis in sizes:
            raise argparse.ArgumentTypeError(f"{axis!r} is given twice")
        if axis not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected AXIS=N with AXIS one of {', '.join(MESH_AXES)}, N ≥ 1"
            )
        sizes[axis] = int(size)
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=benchmark.MODELS, default="base")
    parser.add_argument("--batch", type=int, default=8, help="global batch (FLOPs scale with it; 8 lowers fast)")
    parser.add_argument("--window", type=float, choices=(30.0, 10.0), default=30.0)
    parser.add_argument("--platform", choices=("cuda", "cpu"), default="cuda", help="lower for this platform")
    parser.add_argument(
        "--cudnn-version", type=int, default=91900, help="cuDNN version to lower for (MAJOR*10000+MINOR*100+PATCH)"
    )
    parser.add_argument(
        "--remat", default="none", choices=("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                                            "nothing_saveable"),
    )
    parser.add_argument(
        "--attention", choices=("cudnn", "cudnn_unpadded"),
        help="for cuda (its default: cudnn): cudnn_unpadded gives cuDNN odd lengths as they are where this jax "
        "trains them so (benchmark.py's option of that name)",
    )
    parser.add_argument("--hlo", metavar="FILE", help="also write the lowered StableHLO text here")
    parser.add_argument(
        "--target", choices=TARGETS,
        help="also compile for this card without it (see above; needs `make gpu-compile-env`): memory and traffic",
    )
    parser.add_argument("--compiled-hlo", metavar="FILE", help="with --target: write the optimised HLO here (.gz: gzipped)")
    parser.add_argument("--top", type=int, default=25, help="with --target: how many source lines to list")
    parser.add_argument(
        "--mesh", type=mesh_sizes, default={}, metavar="AXIS=N[,AXIS=N]",
        help=f"with --target: compile for that many cards, arranged as config.mesh (axes {', '.join(MESH_AXES)})",
    )
    parser.add_argument(
        "--memory-fraction", type=float, metavar="F",
        help=f"with --target: the share of the card JAX is given (XLA_PYTHON_CLIENT_MEM_FRACTION), which XLA plans "
        f"the program for (default {JAX_DEFAULT_MEMORY_FRACTION}, jax's)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be ≥ 1")
    if args.attention and args.platform != "cuda":
        parser.error("--attention chooses among cuDNN's forms: it lowers for --platform cuda")
    args.attention = args.attention or PLATFORM_ATTENTION[args.platform]
    if args.target and args.platform != "cuda":
        parser.error("--target compiles for a GPU: it lowers for --platform cuda")
    if args.compiled_hlo and not args.target:
        parser.error("--compiled-hlo needs --target (the program compiled for that card)")
    if args.top < 1:
        parser.error("--top must be ≥ 1")
    if args.mesh and not args.target:
        parser.error("--mesh needs --target (the cards to compile for)")
    if args.memory_fraction is not None and not args.target:
        parser.error("--memory-fraction needs --target (the card whose memory it shares)")
    if args.memory_fraction is None:
        args.memory_fraction = JAX_DEFAULT_MEMORY_FRACTION
    if not 0 < args.memory_fraction <= 1:
        parser.error(f"--memory-fraction {args.memory_fraction} is not a share of the card: give 0 < F ≤ 1")
    rows = math.prod(args.mesh.get(axis, 1) for axis in BATCH_AXES)
    if args.batch % rows:
        parser.error(f"--batch {args.batch} is the global batch: it must divide over {'×'.join(BATCH_AXES)} = {rows}")
    for flag, path in (("--hlo", args.hlo), ("--compiled-hlo", args.compiled_hlo)):
        if path and not Path(path).resolve().parent.is_dir():  # found before the minutes of lowering and compiling
            parser.error(f"{flag} {path}: the folder {Path(path).resolve().parent} does not exist")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result) if args.json else report(result))
    return result


if __name__ == "__main__":
    main()
