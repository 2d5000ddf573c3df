"""Memory traffic of a compiled XLA program, read from its optimised HLO text: where a step's element-wise time goes.

    python scripts/benchmark.py --model base --dump-hlo /tmp/base.hlo     # on the GPU (or any backend)
    python scripts/hlo_traffic.py /tmp/base.hlo.gz --bandwidth 4.0         # anywhere; .gz is read as is

For every kernel-launching instruction of the entry computation (fusions, custom calls, copies, ...), the bytes
it reads (its operands) and writes (its result), grouped by kind: GEMMs (cuBLAS calls and XLA's GEMM fusions),
each other custom call by target (cuDNN attention, convolutions), and every other fusion by its name without
the number, forward or backward (XLA marks the backward pass's ops `transpose(jvp(...))` in their metadata).
Bytes ÷ bandwidth is the time such a kernel needs at least if it is memory-bound, which element-wise and
reduction fusions are: their total against the profile's "other" time says whether the kernels are slow or the
program simply moves too much. A bitcast, tuple or parameter moves nothing and is not counted. Only the entry
computation is read: the bodies of `while`, `conditional` and `call` instructions (a scanned or microbatched
step) are not counted, and the report names each such instruction.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
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
              "copy-done", "async-start", "async-done", "async-update"}
# Instructions whose work happens in other computations, which this count does not enter.
NOT_ENTERED = {"while", "conditional", "call"}


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel-launching instruction: its name, group and bytes read and written."""

    name: str
    group: str
    read: int
    written: int
    op_name: str


def array_bytes(hlo_type: str) -> int:
    """Bytes of an HLO type: one array (`bf16[128,1501,512]{2,1,0}`) or a tuple of them."""
    total = 0
    for dtype, dims in ARRAY_TYPE.findall(hlo_type):
        elements = 1
        for dim in filter(None, dims.split(",")):
            elements *= int(dim)
        total += elements * BYTES_PER_ELEMENT[dtype]
    return total


def entry_computation(hlo_text: str) -> list[str]:
    """The lines of the program's ENTRY computation."""
    start = hlo_text.find("\nENTRY ")
    if start < 0:
        raise ValueError("no ENTRY computation in this text: expected an optimised HLO module (`compiled.as_text()`)")
    lines = hlo_text[start + 1 :].split("\n")
    end = next((i for i, line in enumerate(lines) if line.startswith("}")), len(lines))
    return lines[1:end]


def entry_instructions(hlo_text: str) -> Iterator[tuple[re.Match, str]]:
    """(`INSTRUCTION` match, line) for each instruction of the entry computation."""
    for line in entry_computation(hlo_text):
        match = INSTRUCTION.match(line)
        if match:
            yield match, line


def group_of(name: str, op: str, line: str, op_name: str) -> str:
    """The group a launch is counted in (see the module docstring); `op_name` is its metadata's."""
    target = re.search(r'custom_call_target="([^"]+)"', line)
    if op == "dot" or (target and re.search(r"gemm|matmul|cublas", target.group(1), re.I)) \
            or "gemm_fusion" in name or '"__triton_gemm"' in line or '"kind":"__cublas' in line:
        return "GEMM"
    if target:
        return f"custom call {target.group(1)}"
    kind = re.sub(r"\.\d+$", "", name) if op == "fusion" else op
    return f"{'backward' if 'transpose(' in op_name else 'forward'} {kind}"


def not_entered(hlo_text: str) -> list[str]:
    """`name (op)` of each instruction of the entry computation whose body this count leaves out."""
    return [f"{match['name']} ({match['op']})" for match, _ in entry_instructions(hlo_text) if match["op"] in NOT_ENTERED]


def launches(hlo_text: str) -> list[Launch]:
    """Every kernel-launching instruction of the entry computation with its bytes read and written."""
    result_bytes: dict[str, int] = {}
    found = []
    for match, line in entry_instructions(hlo_text):
        name, op = match["name"], match["op"]
        result_bytes[name] = array_bytes(match["type"])
        if op in NO_TRAFFIC or op in NOT_ENTERED:
            continue
        operand_list = match["args"].split("), ")[0]
        read = sum(result_bytes.get(operand, 0) for operand in re.findall(r"%([\w.\-]+)", operand_list))
        found_name = re.search(r'op_name="([^"]+)"', line)
        op_name = found_name[1] if found_name else ""
        found.append(Launch(name, group_of(name, op, line, op_name), read, result_bytes[name], op_name))
    return found


def read_hlo(path: Path) -> str:
    """The HLO text of `path`, gunzipped when it ends in .gz."""
    return gzip.open(path, "rt").read() if path.suffix == ".gz" else path.read_text()


def report(found: list[Launch], bandwidth_tb_s: float, top: int, left_out: Sequence[str] = ()) -> str:
    """The table by group, the total outside GEMMs and custom calls, and the `top` largest of those; `left_out`
    (from `not_entered`) is named first, since its bodies' traffic is missing from every figure."""
    by_group: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for launch in found:
        by_group[launch.group][0] += launch.read + launch.written
        by_group[launch.group][1] += 1
    ms = lambda nbytes: nbytes / (bandwidth_tb_s * 1e12) * 1e3  # noqa: E731
    elementwise = [x for x in found if x.group != "GEMM" and not x.group.startswith("custom call")]
    moved = sum(x.read + x.written for x in elementwise)
    lines = [f"NOT COUNTED: the bodies of {', '.join(left_out)}"] if left_out else []
    lines += [
        f"{len(found)} launches; outside GEMMs and custom calls: {len(elementwise)} launches moving "
        f"{moved / 1e9:.1f} GB = {ms(moved):.1f} ms at {bandwidth_tb_s} TB/s",
        "",
        "| group | launches | GB read + written | ms at the bandwidth |",
        "|---|---:|---:|---:|",
    ]
    for group, (nbytes, count) in sorted(by_group.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {group} | {count} | {nbytes / 1e9:.2f} | {ms(nbytes):.2f} |")
    lines += ["", f"largest {top} outside GEMMs and custom calls (GB read, written; instruction; op):"]
    for x in sorted(elementwise, key=lambda x: -(x.read + x.written))[:top]:
        lines.append(f"  {x.read / 1e9:6.2f} {x.written / 1e9:6.2f}  {x.name:36s} {x.op_name[:100]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hlo", type=Path, help="optimised HLO text (`--dump-hlo` of scripts/benchmark.py), .gz or plain")
    parser.add_argument("--bandwidth", type=float, default=4.0, help="TB/s to convert bytes into ms (H200: ~4)")
    parser.add_argument("--top", type=int, default=20, help="how many of the largest element-wise launches to list")
    args = parser.parse_args(argv)
    if not args.hlo.is_file():
        parser.error(f"{args.hlo}: no such file (write one with scripts/benchmark.py --dump-hlo FILE)")
    hlo_text = read_hlo(args.hlo)
    print(report(launches(hlo_text), args.bandwidth, args.top, not_entered(hlo_text)))


if __name__ == "__main__":
    main()
