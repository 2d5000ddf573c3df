"""Memory traffic of a compiled XLA program, read from its optimised HLO text: where a step's element-wise time goes.

    python scripts/benchmark.py --model base --dump-hlo /tmp/base.hlo     # on the GPU (or any backend)
    python scripts/hlo_traffic.py /tmp/base.hlo.gz --bandwidth 4.0         # anywhere; .gz is read as is
    python scripts/hlo_traffic.py /tmp/base.hlo.gz --by source             # the same bytes by line of Python

For every kernel-launching instruction of the entry computation (fusions, custom calls, copies, ...), the bytes
it reads (its operands) and writes (its result), grouped by kind: GEMMs (cuBLAS calls and XLA's GEMM fusions),
each other custom call by target (cuDNN attention, convolutions), collectives between devices by op, and every
other fusion by its name without the number, forward or backward (XLA marks the backward pass's ops
`transpose(jvp(...))` in their metadata). `collectives` reads a program of several devices' collectives
themselves: the array each moves, its group of devices and the bytes each device sends.
Bytes ÷ bandwidth is the time such a kernel needs at least if it is memory-bound, which element-wise and
reduction fusions are: their total against the profile's "other" time says whether the kernels are slow or the
program simply moves too much. A bitcast, tuple or parameter moves nothing and is not counted. Only the entry
computation is read: the bodies of `while`, `conditional` and `call` instructions (a scanned or microbatched
step) are not counted, and the report names each such instruction. The launches XLA's rematerialisation pass
added (`NAME.remat`: values recomputed because the program was near the device's memory) are also totalled apart.

`--by source` groups the same launches by the call site in our Python that made them, forward or backward:
`backward wavlink_jax/models/layers.py:278:60 EncoderBlock.__call__ > Linear.__call__` is line 278, column 60
(from 1), where `EncoderBlock.__call__` calls flax's `Linear.__call__`. It reads the stack frames jax records in
the module (the `FileNames` ... `StackFrames` tables and each instruction's `stack_frame_id`) and names the
innermost frame in the project's own files (`wavlink_jax/`, `scripts/`) and the function called there, since our
line that called flax or optax says more than the line inside them; a launch with no such frame gets its
innermost frame. A fusion is one launch with one frame, the one XLA kept for the fused instructions (or, where it
kept none, the last one inside that has one), so ops fused into it from other lines count on that line. GEMMs
and custom calls keep their kind in brackets, apart from the element-wise traffic of the same line.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Sequence

BYTES_PER_ELEMENT = {
    "pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}
ARRAY_TYPE = re.compile(r"\b(" + "|".join(BYTES_PER_ELEMENT) + r")\[([0-9,]*)\]")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<type>\(.*?\)|\S+) (?P<op>[\w\-]+)\((?P<args>.*)$")
# Ops that launch no kernel of their own (views, bookkeeping) or whose bytes belong to someone else.
NO_TRAFFIC = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element", "after-all", "partition-id",
              "replica-id", "iota", "opt-barrier", "send", "recv", "send-done", "recv-done", "copy-start",
              "copy-done", "async-start", "async-done", "async-update", "all-gather-done", "all-reduce-done",
              "reduce-scatter-done", "all-to-all-done", "collective-permute-done"}
# Collectives between devices (each also an instruction `OP-start` + `OP-done` when XLA runs it asynchronously),
# with the bytes each device sends per byte of the array it moves (the gathered result, the scattered operand,
# the reduced array, the exchanged buffers) over a group of n devices, by the ring and direct algorithms.
WIRE_FACTOR = {
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: (n - 1) / n,
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1.0,
}
# Instructions whose work happens in other computations, which this count does not enter.
NOT_ENTERED = {"while", "conditional", "call"}
# The names XLA's rematerialisation pass gives the instructions it clones (see `rematerialised`).
REMATERIALISED = re.compile(r"\.remat\d*(?:\.\d+)?$")
# Top-level directories of the project's own code, whose frames are named in preference to flax's or optax's.
PROJECT_DIRS = {"wavlink_jax", "scripts"}
PROJECT_ROOT = Path(__file__).resolve().parents[1]
NO_STACK_FRAME = "(no stack frame)"
NO_STACK_FRAMES = (
    "the program has no stack frames (no `StackFrames` table, no `stack_frame_id` in its metadata), so its traffic "
    "cannot be grouped by source line: dump it again with jax's source locations on, as they are by default (jax "
    "0.10.2's `compiled.as_text()` carries them on every backend) unless JAX_TRACEBACK_IN_LOCATIONS_LIMIT=0; or "
    "use --by kind"
)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel-launching instruction: its name, group and bytes read and written."""

    name: str
    group: str
    read: int
    written: int
    op_name: str
    source: str = ""  # its group for `--by source` (see `source_of`); "" when the module has no stack frames


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of the entry computation: the array it moves and the group of devices it spans."""

    name: str
    op: str  # a key of WIRE_FACTOR
    group_size: int
    array_bytes: int  # the larger of its operands and results: the whole array gathered, scattered or reduced
    arrays: str  # its result type (a tuple where XLA combined several arrays into one collective)
    source: str  # forward or backward and our line that made it (see `source_of`); "" without stack frames

    @property
    def wire_bytes(self) -> float:
        """Bytes each device of the group sends (and receives) for it."""
        return self.array_bytes * WIRE_FACTOR[self.op](self.group_size)


def array_bytes(hlo_type: str) -> int:
    """Bytes of an HLO type: one array (`bf16[128,1501,512]{2,1,0}`) or a tuple of them."""
    total = 0
    for dtype, dims in ARRAY_TYPE.findall(hlo_type):
        elements = 1
        for dim in filter(None, dims.split(",")):
            elements *= int(dim)
        total += elements * BYTES_PER_ELEMENT[dtype]
    return total


def computation(hlo_text: str, header: str) -> list[str]:
    """The lines of the computation whose first line starts with `header` (`ENTRY `, `%fused_add.3 `); [] if none."""
    start = hlo_text.find("\n" + header)
    if start < 0:
        return []
    end = hlo_text.find("\n}", start)
    return hlo_text[start + 1 : end if end >= 0 else len(hlo_text)].split("\n")[1:]


def entry_computation(hlo_text: str) -> list[str]:
    """The lines of the program's ENTRY computation."""
    if "\nENTRY " not in hlo_text:
        raise ValueError("no ENTRY computation in this text: expected an optimised HLO module (`compiled.as_text()`)")
    return computation(hlo_text, "ENTRY ")


def entry_instructions(hlo_text: str) -> Iterator[tuple[re.Match, str]]:
    """(`INSTRUCTION` match, line) for each instruction of the entry computation."""
    for line in entry_computation(hlo_text):
        match = INSTRUCTION.match(line)
        if match:
            yield match, line


def op_name_of(line: str) -> str:
    """The `op_name` of an instruction's metadata (jax's `jit(step)/transpose(jvp())/mul`); "" if it has none."""
    found = re.search(r'op_name="([^"]+)"', line)
    return found[1] if found else ""


def direction(op_name: str) -> str:
    """`backward` for an op of the backward pass (jax names them `transpose(jvp(...))`), else `forward`."""
    return "backward" if "transpose(" in op_name else "forward"


def is_elementwise(group: str) -> bool:
    """Whether a launch of `group` is a fusion or other XLA kernel rather than a GEMM, a library call or a
    collective."""
    return group != "GEMM" and not group.startswith(("custom call", "collective"))


def group_of(name: str, op: str, line: str, op_name: str) -> str:
    """The group a launch is counted in (see the module docstring); `op_name` is its metadata's."""
    target = re.search(r'custom_call_target="([^"]+)"', line)
    if op == "dot" or (target and re.search(r"gemm|matmul|cublas", target.group(1), re.I)) \
            or "gemm_fusion" in name or '"__triton_gemm"' in line or '"kind":"__cublas' in line:
        return "GEMM"
    if target:
        return f"custom call {target.group(1)}"
    if op.removesuffix("-start") in WIRE_FACTOR:
        return f"collective {op.removesuffix('-start')}"
    kind = re.sub(r"\.\d+$", "", name) if op == "fusion" else op
    return f"{direction(op_name)} {kind}"


def stack_frame_table(hlo_text: str, title: str) -> dict[int, str]:
    """The rows `N rest` of one of the module's stack frame tables (`FileNames`, `FunctionNames`, `FileLocations`,
    `StackFrames`, printed before its computations), by N; {} when the module has none."""
    block = re.search(rf"^{title}\n((?:\d+ .*\n?)*)", hlo_text, re.M)
    return {int(row): rest for row, rest in re.findall(r"^(\d+) (.*)$", block[1], re.M)} if block else {}


def relative_path(file_name: str) -> str:
    """`file_name` from the project's root (`wavlink_jax/...`, `scripts/...`) when that file is part of this
    checkout, or from site-packages (`flax/nnx/nn/normalization.py`), so that dumps from different machines read
    alike; else as it is (a folder merely named `wavlink_jax` or `scripts` does not make a file ours)."""
    installed = re.split(r"/(?:site|dist)-packages/", file_name)
    if len(installed) > 1:
        return installed[-1]
    parts = file_name.split("/")
    roots = [
        i for i, part in enumerate(parts[:-1])
        if part in PROJECT_DIRS and (PROJECT_ROOT / "/".join(parts[i:])).is_file()
    ]
    return "/".join(parts[roots[-1] :]) if roots else file_name


def source_lines(hlo_text: str) -> dict[int, str]:
    """`path:line:column function[ > callee]` for each stack frame id of the module, naming the frame of its chain
    that the module docstring says; {} when the module has no stack frame tables."""
    files = {row: relative_path(name.strip('"')) for row, name in stack_frame_table(hlo_text, "FileNames").items()}
    functions = {row: name.strip('"') for row, name in stack_frame_table(hlo_text, "FunctionNames").items()}
    locations = {}
    for row, fields in stack_frame_table(hlo_text, "FileLocations").items():
        field = {key: int(value) for key, value in re.findall(r"(\w+)=(-?\d+)", fields)}
        locations[row] = (files.get(field.get("file_name_id"), "?"), field.get("line", 0),
                          field.get("column", -1) + 1, functions.get(field.get("function_name_id"), "?"))
    frames = {}
    for row, fields in stack_frame_table(hlo_text, "StackFrames").items():
        found = re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", fields)
        if found:  # XLA prints a frame's parent id plus one (hlo_module.cc), so a root frame's parent reads 1
            frames[row] = (int(found[1]), int(found[2]) - 1)
    sources = {}
    for frame_id in frames:
        chain, current = [], frame_id  # innermost first
        while current in frames and len(chain) <= len(frames):  # the bound stops a malformed cycle
            location, current = frames[current]
            chain.append(locations.get(location, ("?", 0, 0, "?")))
        named = next((i for i, (path, *_) in enumerate(chain) if path.split("/")[0] in PROJECT_DIRS), 0)
        path, line, column, function = chain[named]
        sources[frame_id] = f"{path}:{line}:{column} {function}" + (f" > {chain[named - 1][3]}" if named else "")
    return sources


def source_of(hlo_text: str, line: str, group: str, sources: dict[int, str], op_name: str | None = None) -> str:
    """A launch's group for `--by source`: forward or backward (by `op_name`, default the line's own) and the
    source line of its stack frame, from its own metadata or, where XLA left that without one (a fusion whose root
    is a reduce), from the last instruction with one in the computation it calls; a GEMM or custom call adds its
    `group` in brackets."""
    called = re.search(r"calls=%([\w.\-]+)", line)
    if "stack_frame_id=" not in line and called:
        inside = computation(hlo_text, f"%{called[1]} ")
        line = next((fused for fused in reversed(inside) if "stack_frame_id=" in fused), line)
    frame = re.search(r"stack_frame_id=(\d+)", line)
    site = sources.get(int(frame[1]), NO_STACK_FRAME) if frame else NO_STACK_FRAME
    return f"{direction(op_name_of(line) if op_name is None else op_name)} {site}" + (
        "" if is_elementwise(group) else f" [{group}]"
    )


def not_entered(hlo_text: str) -> list[str]:
    """`name (op)` of each instruction of the entry computation whose body this count leaves out."""
    return [f"{match['name']} ({match['op']})" for match, _ in entry_instructions(hlo_text) if match["op"] in NOT_ENTERED]


def operands_of(match: re.Match) -> list[str]:
    """The names of an `INSTRUCTION` match's operands."""
    return re.findall(r"%([\w.\-]+)", match["args"].split("), ")[0])


def done_types(instructions: Sequence[tuple[re.Match, str]]) -> dict[str, str]:
    """{`OP-start` instruction: the type of its `OP-done`}: an asynchronous op's result (the start's own type is a
    tuple that repeats its operands)."""
    return {operands_of(match)[0]: match["type"] for match, _ in instructions if match["op"].endswith("-done")}


def launches(hlo_text: str) -> list[Launch]:
    """Every kernel-launching instruction of the entry computation with its bytes read and written."""
    result_bytes: dict[str, int] = {}
    sources = source_lines(hlo_text)
    instructions = list(entry_instructions(hlo_text))
    results = done_types(instructions)
    found = []
    for match, line in instructions:
        name, op = match["name"], match["op"]
        result_bytes[name] = array_bytes(match["type"])
        if op in NO_TRAFFIC or op in NOT_ENTERED:
            continue
        read = sum(result_bytes.get(operand, 0) for operand in operands_of(match))
        op_name = op_name_of(line)
        group = group_of(name, op, line, op_name)
        source = source_of(hlo_text, line, group, sources) if sources else ""
        found.append(Launch(name, group, read, array_bytes(results.get(name, match["type"])), op_name, source))
    return found


def group_size(hlo_text: str, line: str) -> int:
    """How many devices the collective instruction `line` spans: one group of its `replica_groups` (listed, iota
    `[groups,size]<=[...]`, or over named mesh axes, with or without `device_ids`), the module's `num_partitions`
    for an empty list (every device), 2 for a `collective-permute` (device to device). A ValueError for a form
    this does not read."""
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if listed:
        return len(listed[1].split(","))
    iota = re.search(r"replica_groups=\[(?:\d+,)*(\d+)\]<=", line)
    if iota:
        return int(iota[1])
    over_axes = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\S+)? \{([^}]*)\}", line)
    if over_axes:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", over_axes[1]))
        # A whole axis ('fsdp') or a sub-axis of it ('fsdp':(1)2: size 2 starting at 1), as XLA writes them.
        named = re.findall(r"'(\w+)'(?::\(\d+\)(\d+))?", over_axes[2])
        return math.prod(int(size) if size else int(sizes[axis]) for axis, size in named)
    if "source_target_pairs=" in line:  # each device sends to one other
        return 2
    every = re.search(r"num_partitions=(\d+)", hlo_text[: hlo_text.find("\n")])
    if re.search(r"replica_groups=\{\}", line) and every:
        return int(every[1])
    raise ValueError(f"cannot read the device groups of this collective: {line.strip()[:300]}")


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of the entry computation (an asynchronous pair counted once), with its array and group.
    One that XLA made by combining several keeps no metadata; it is forward or backward as its operands are."""
    instructions = list(entry_instructions(hlo_text))
    types = {match["name"]: match["type"] for match, _ in instructions}
    op_names = {match["name"]: op_name_of(line) for match, line in instructions}
    results = done_types(instructions)
    sources = source_lines(hlo_text)
    found = []
    for match, line in instructions:
        op = match["op"].removesuffix("-start")
        if op not in WIRE_FACTOR:
            continue
        operands = operands_of(match)
        result = results.get(match["name"], match["type"])
        moved = max(sum(array_bytes(types.get(operand, "")) for operand in operands), array_bytes(result))
        op_name = op_names[match["name"]] or next(filter(None, (op_names.get(o, "") for o in operands)), "")
        source = source_of(hlo_text, line, "", sources, op_name) if sources else ""
        found.append(Collective(match["name"], op, group_size(hlo_text, line), moved, result, source))
    return found


def collective_totals(found: Sequence[Collective]) -> dict[str, dict[str, float]]:
    """{op: {count, array_bytes, wire_bytes}} over `found`."""
    by_op: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0, "array_bytes": 0, "wire_bytes": 0.0})
    for collective in found:
        row = by_op[collective.op]
        row["count"] += 1
        row["array_bytes"] += collective.array_bytes
        row["wire_bytes"] += collective.wire_bytes
    return dict(by_op)


def read_hlo(path: Path) -> str:
    """The HLO text of `path`, gunzipped when it ends in .gz."""
    return gzip.open(path, "rt").read() if path.suffix == ".gz" else path.read_text()


def write_hlo(path: Path, hlo_text: str) -> None:
    """Write HLO text to `path`, gzipped when it ends in .gz (as `read_hlo` reads it)."""
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as file:
            file.write(hlo_text)
    else:
        path.write_text(hlo_text)


def totals(found: Sequence[Launch], by: str = "kind") -> list[tuple[str, int, int]]:
    """(group, bytes read + written, launches) per group of `found` — by kind or by source line — largest
    first. A ValueError for `by="source"` when the program has no stack frames."""
    if by == "source" and any(not launch.source for launch in found):
        raise ValueError(NO_STACK_FRAMES)
    by_group: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for launch in found:
        group = by_group[launch.source if by == "source" else launch.group]
        group[0] += launch.read + launch.written
        group[1] += 1
    return sorted(((name, nbytes, count) for name, (nbytes, count) in by_group.items()), key=lambda row: -row[1])


def rematerialised(found: Sequence[Launch]) -> list[Launch]:
    """The launches XLA's rematerialisation pass added (`NAME.remat`, `NAME.remat2`, `NAME.remat.3`): values it
    recomputes in the backward pass instead of keeping them, which it does only when the program would not
    otherwise fit the device's memory."""
    return [launch for launch in found if REMATERIALISED.search(launch.name)]


def rematerialisation_line(launches: int, nbytes: int, memory: str = "device") -> str:
    """The sentence that reports `rematerialised` launches (`launches` of them moving `nbytes`), near the memory
    of `memory` (the device, or a card compiled for); `report` and hlo_audit's compiled report both print it."""
    return (
        f"XLA's rematerialisation (the program is near the {memory}'s memory): {launches} launches recompute values "
        f"instead of keeping them, moving {nbytes / 1e9:.1f} GB"
    )


def report(
    found: list[Launch], bandwidth_tb_s: float, top: int, left_out: Sequence[str] = (), by: str = "kind"
) -> str:
    """The table by group (`by` kind or by source line), the total outside GEMMs, custom calls and collectives,
    and the `top` largest of those; `left_out` (from `not_entered`) is named first, since its bodies' traffic is
    missing from every figure. A ValueError for `by="source"` when the program has no stack frames."""
    groups = totals(found, by)
    ms = lambda nbytes: nbytes / (bandwidth_tb_s * 1e12) * 1e3  # noqa: E731
    elementwise = [x for x in found if is_elementwise(x.group)]
    moved = sum(x.read + x.written for x in elementwise)
    lines = [f"NOT COUNTED: the bodies of {', '.join(left_out)}"] if left_out else []
    lines.append(
        f"{len(found)} launches; outside GEMMs, custom calls and collectives: {len(elementwise)} launches moving "
        f"{moved / 1e9:.1f} GB = {ms(moved):.1f} ms at {bandwidth_tb_s} TB/s"
    )
    recomputed = rematerialised(found)
    if recomputed:
        nbytes = sum(x.read + x.written for x in recomputed)
        lines.append(f"{rematerialisation_line(len(recomputed), nbytes)} = {ms(nbytes):.1f} ms")
    lines += [
        "",
        "| group | launches | GB read + written | ms at the bandwidth |",
        "|---|---:|---:|---:|",
    ]
    for group, nbytes, count in groups:
        lines.append(f"| {group} | {count} | {nbytes / 1e9:.2f} | {ms(nbytes):.2f} |")
    labelled = "source line" if by == "source" else "op"
    lines += [
        "", f"largest {top} outside GEMMs, custom calls and collectives (GB read, written; instruction; {labelled}):"
    ]
    for x in sorted(elementwise, key=lambda x: -(x.read + x.written))[:top]:
        label = x.source if by == "source" else x.op_name[:100]
        lines.append(f"  {x.read / 1e9:6.2f} {x.written / 1e9:6.2f}  {x.name:36s} {label}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hlo", type=Path, help="optimised HLO text (`--dump-hlo` of scripts/benchmark.py), .gz or plain")
    parser.add_argument("--bandwidth", type=float, default=4.0, help="TB/s to convert bytes into ms (H200: ~4)")
    parser.add_argument("--top", type=int, default=20, help="how many of the largest element-wise launches to list")
    parser.add_argument("--by", choices=("kind", "source"), default="kind",
                        help="group by kind of kernel, or by the line of Python that made it (see above)")
    args = parser.parse_args(argv)
    if not args.hlo.is_file():
        parser.error(f"{args.hlo}: no such file (write one with scripts/benchmark.py --dump-hlo FILE)")
    hlo_text = read_hlo(args.hlo)
    try:
        print(report(launches(hlo_text), args.bandwidth, args.top, not_entered(hlo_text), args.by))
    except ValueError as error:
        parser.error(f"{args.hlo}: {error}")


if __name__ == "__main__":
    main()
