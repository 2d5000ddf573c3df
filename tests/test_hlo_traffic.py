"""scripts/hlo_traffic.py: bytes read and written per launch of a compiled program, grouped."""

import gzip
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import hlo_traffic  # noqa: E402


def test_array_bytes_of_arrays_and_tuples():
    assert hlo_traffic.array_bytes("bf16[128,1501,512]{2,1,0}") == 128 * 1501 * 512 * 2
    assert hlo_traffic.array_bytes("(bf16[2,3]{1,0}, f32[4]{0}, pred[])") == 12 + 16 + 1


def test_a_compiled_step_is_counted_by_launch_with_its_forward_and_backward(tmp_path):
    """An element-wise function of a 256×256 f32 array reads and writes 256 KiB each; its gradient's ops are
    grouped as backward; a matmul is a GEMM; a gzipped dump reads the same."""
    x = jnp.ones((256, 256), jnp.float32)
    elementwise = jax.jit(lambda x: jnp.exp(x) * 2.0).lower(x).compile().as_text()
    [launch] = hlo_traffic.launches(elementwise)
    assert (launch.read, launch.written) == (256 * 256 * 4, 256 * 256 * 4)
    assert launch.group.startswith("forward ")

    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    step = jax.jit(jax.grad(loss)).lower(x, x).compile().as_text()
    groups = {launch.group for launch in hlo_traffic.launches(step)}
    assert "GEMM" in groups
    assert any(group.startswith("backward ") for group in groups), groups

    dump = tmp_path / "step.hlo.gz"
    with gzip.open(dump, "wt") as file:
        file.write(step)
    assert hlo_traffic.launches(hlo_traffic.read_hlo(dump)) == hlo_traffic.launches(step)
    text = hlo_traffic.report(hlo_traffic.launches(step), bandwidth_tb_s=4.0, top=5)
    assert "| GEMM |" in text and "outside GEMMs, custom calls and collectives" in text


def test_text_without_an_entry_computation_is_refused():
    with pytest.raises(ValueError, match="no ENTRY computation"):
        hlo_traffic.launches("module { func.func @main() }")


def test_loop_bodies_are_named_as_not_counted():
    """A step with a loop (scanned layers, microbatches) keeps its work in the loop's body, which is not read:
    the report says so instead of silently showing only the entry computation's copies."""
    x = jnp.ones((64, 64), jnp.float32)
    looped = jax.jit(lambda x: jax.lax.fori_loop(0, 10, lambda i, x: jnp.sin(x) * 2 + 1, x)).lower(x).compile()
    left_out = hlo_traffic.not_entered(looped.as_text())
    assert len(left_out) == 1 and left_out[0].endswith("(while)")
    assert hlo_traffic.report(hlo_traffic.launches(looped.as_text()), 4.0, 3, left_out).startswith(
        f"NOT COUNTED: the bodies of {left_out[0]}"
    )
    assert hlo_traffic.not_entered(jax.jit(jnp.sin).lower(x).compile().as_text()) == []


# A module as XLA prints it (the tables' format copied from a GPU dump): a LayerNorm of flax called from our
# layers.py, our GELU forward and backward, a reduce fusion whose own metadata XLA left empty, an optax update with
# no frame of ours, a GEMM, and a copy with no stack frame. XLA prints a frame's parent id plus one (1: none).
STACK_FRAMES = """
FileNames
1 "/home/me/wavlink-jax/scripts/benchmark.py"
2 "/home/me/wavlink-jax/wavlink_jax/models/layers.py"
3 "/opt/venv/lib/python3.12/site-packages/flax/nnx/nn/normalization.py"
4 "/opt/venv/lib/python3.12/site-packages/optax/_src/transform.py"

FunctionNames
1 "main"
2 "EncoderBlock.__call__"
3 "LayerNorm.__call__"
4 "gelu_exact"
5 "scale_by_adam.<locals>.update_fn"

FileLocations
1 {file_name_id=1 function_name_id=1 line=524 end_line=524 column=11 end_column=47}
2 {file_name_id=2 function_name_id=2 line=276 end_line=276 column=29 end_column=50}
3 {file_name_id=3 function_name_id=3 line=180 end_line=180 column=8 end_column=30}
4 {file_name_id=2 function_name_id=4 line=40 end_line=40 column=11 end_column=60}
5 {file_name_id=4 function_name_id=5 line=300 end_line=300 column=4 end_column=40}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=3}
4 {file_location_id=4 parent_frame_id=3}
5 {file_location_id=5 parent_frame_id=1}
"""
COMPUTATIONS = """
%fused_reduce (param_0.1: bf16[8192,8192]) -> f32[8192] {
  %param_0.1 = bf16[8192,8192]{1,0} parameter(0), metadata={scheduling_name="param_0.1"}
  %convert.1 = f32[8192,8192]{1,0} convert(%param_0.1), metadata={op_name="jit(step)/transpose(jvp())/convert_element_type" stack_frame_id=3}
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[8192]{0} reduce(%convert.1, %constant.1), dimensions={0}, to_apply=%region_add, metadata={scheduling_name="reduce.1"}
}

ENTRY %main.1 (x.1: bf16[8192,8192], g.1: f32[8192]) -> (bf16[8192,8192], f32[8192]) {
  %x.1 = bf16[8192,8192]{1,0} parameter(0), metadata={op_name="x"}
  %g.1 = f32[8192]{0} parameter(1), metadata={op_name="g"}
  %loop_norm_fusion = bf16[8192,8192]{1,0} fusion(%x.1), kind=kLoop, calls=%fused_norm, metadata={op_name="jit(step)/jvp()/mul" stack_frame_id=3}
  %gemm.1 = bf16[8,8]{1,0} custom-call(%x.1, %x.1), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/jvp()/dot_general" stack_frame_id=2}
  %loop_gelu_fusion = bf16[8192,8192]{1,0} fusion(%loop_norm_fusion), kind=kLoop, calls=%fused_gelu, metadata={op_name="jit(step)/jvp()/erf" stack_frame_id=4}
  %loop_gelu_grad_fusion = bf16[8192,8192]{1,0} fusion(%loop_gelu_fusion), kind=kLoop, calls=%fused_gelu_grad, metadata={op_name="jit(step)/transpose(jvp())/mul" stack_frame_id=4}
  %input_reduce_fusion = f32[8192]{0} fusion(%loop_gelu_grad_fusion), kind=kInput, calls=%fused_reduce, metadata={deduplicated_name="input_reduce_fusion" scheduling_name="input_reduce_fusion"}
  %loop_adam_fusion = f32[8192]{0} fusion(%g.1, %input_reduce_fusion), kind=kLoop, calls=%fused_adam, metadata={op_name="jit(step)/mul" stack_frame_id=5}
  %copy.1 = f32[8192]{0} copy(%g.1), metadata={scheduling_name="copy.1"}
  ROOT %tuple = (bf16[8192,8192]{1,0}, f32[8192]{0}) tuple(%loop_gelu_grad_fusion, %loop_adam_fusion)
}
"""
HEADER = (
    "HloModule jit_step, is_scheduled=true, "
    "entry_computation_layout={(bf16[8192,8192]{1,0}, f32[8192]{0})->(bf16[8192,8192]{1,0}, f32[8192]{0})}\n"
)
WITH_FRAMES = HEADER + STACK_FRAMES + COMPUTATIONS
WITHOUT_FRAMES = HEADER + re.sub(r" stack_frame_id=\d+", "", COMPUTATIONS)


def test_what_xla_rematerialised_is_reported_apart():
    """Instructions XLA's rematerialisation pass cloned (`NAME.remat`, `.remat2`, `bitcast.remat.3`) are values
    recomputed because the program was near the device's memory: listed with their traffic, and only they."""
    remat = WITH_FRAMES.replace("%loop_gelu_fusion", "%loop_gelu_fusion.remat").replace("%copy.1", "%copy.1.remat2")
    found = hlo_traffic.launches(remat)
    assert [x.name for x in hlo_traffic.rematerialised(found)] == ["loop_gelu_fusion.remat", "copy.1.remat2"]
    moved = 2 * 8192 * 8192 * 2 + 2 * 8192 * 4  # the GELU reads and writes a bf16 [8192, 8192], the copy f32 [8192]
    report = hlo_traffic.report(found, 4.0, 3)
    assert f"2 launches recompute values instead of keeping them, moving {moved / 1e9:.1f} GB" in report
    assert hlo_traffic.rematerialised(hlo_traffic.launches(WITH_FRAMES)) == []
    names = ["bitcast.remat.3", "wrapped_convert.7.remat", "fusion.remat12", "remat_fusion.2", "loop_fusion.rematch"]
    assert [bool(hlo_traffic.REMATERIALISED.search(name)) for name in names] == [True, True, True, False, False]
    assert "rematerialisation" not in hlo_traffic.report(hlo_traffic.launches(WITH_FRAMES), 4.0, 3)


def test_each_launch_is_attributed_to_our_line_else_its_innermost_frame():
    """Our line that called flax is named (with the callee), not flax's; our GELU line forward and backward; a
    fusion with empty metadata takes its fused instructions' frame; an optax frame with no caller of ours is
    named itself; a GEMM keeps its kind apart; a copy with no frame says so."""
    sources = {launch.name: launch.source for launch in hlo_traffic.launches(WITH_FRAMES)}
    assert sources == {
        "loop_norm_fusion": "forward wavlink_jax/models/layers.py:276:30 EncoderBlock.__call__ > LayerNorm.__call__",
        "gemm.1": "forward wavlink_jax/models/layers.py:276:30 EncoderBlock.__call__ [GEMM]",
        "loop_gelu_fusion": "forward wavlink_jax/models/layers.py:40:12 gelu_exact",
        "loop_gelu_grad_fusion": "backward wavlink_jax/models/layers.py:40:12 gelu_exact",
        "input_reduce_fusion": "backward wavlink_jax/models/layers.py:276:30 EncoderBlock.__call__ > LayerNorm.__call__",
        "loop_adam_fusion": "forward optax/_src/transform.py:300:5 scale_by_adam.<locals>.update_fn",
        "copy.1": "forward (no stack frame)",
    }
    text = hlo_traffic.report(hlo_traffic.launches(WITH_FRAMES), 4.0, 3, by="source")
    assert "| backward wavlink_jax/models/layers.py:40:12 gelu_exact | 1 | 0.27 | 0.07 |" in text  # 2 × 8192² bf16
    largest = text.split("largest 3 outside GEMMs, custom calls and collectives (GB read, written; instruction; source line):\n")[1]
    assert "wavlink_jax/models/layers.py:40:12 gelu_exact" in largest  # the list names the same groups
    # the total outside GEMMs leaves out the GEMM's 0.27 GB (with it: 1.2 GB = 0.3 ms)
    assert text.startswith(
        "7 launches; outside GEMMs, custom calls and collectives: 6 launches moving 0.9 GB = 0.2 ms at 4.0 TB/s\n"
    )


# A fusion whose own metadata XLA left empty, fused from two lines (LayerNorm's, then our GELU's): it is named after
# the last instruction inside with a frame, the one nearest its root.
TWO_FRAMES_FUSED = """
%fused_two (param_0.2: f32[64]) -> f32[] {
  %param_0.2 = f32[64]{0} parameter(0)
  %multiply.2 = f32[64]{0} multiply(%param_0.2, %param_0.2), metadata={op_name="jit(step)/jvp()/mul" stack_frame_id=3}
  %exponential.2 = f32[64]{0} exponential(%multiply.2), metadata={op_name="jit(step)/jvp()/exp" stack_frame_id=4}
  %constant.2 = f32[] constant(0)
  ROOT %reduce.2 = f32[] reduce(%exponential.2, %constant.2), dimensions={0}, to_apply=%region_add
}

ENTRY %main.3 (p.3: f32[64]) -> f32[] {
  %p.3 = f32[64]{0} parameter(0), metadata={op_name="p"}
  ROOT %input_reduce_fusion.2 = f32[] fusion(%p.3), kind=kInput, calls=%fused_two, metadata={scheduling_name="r"}
}
"""


def test_a_fusion_without_a_frame_is_named_after_the_last_instruction_inside_with_one():
    [launch] = hlo_traffic.launches(HEADER + STACK_FRAMES + TWO_FRAMES_FUSED)
    assert launch.source == "forward wavlink_jax/models/layers.py:40:12 gelu_exact"


# Views and bookkeeping (a bitcast, a tuple and its elements) launch nothing; two numbered copies of a fusion are one
# kind, each forward or backward; a fusion of XLA's GEMM emitter is a GEMM by its name alone.
VIEWS_AND_FUSIONS = """
ENTRY %main.4 (x.4: bf16[64,64]) -> (bf16[4096], bf16[64,64]) {
  %x.4 = bf16[64,64]{1,0} parameter(0), metadata={op_name="x"}
  %bitcast.4 = bf16[4096]{0} bitcast(%x.4)
  %loop_add_fusion.3 = bf16[4096]{0} fusion(%bitcast.4), kind=kLoop, calls=%f3, metadata={op_name="jvp()/add"}
  %loop_add_fusion.7 = bf16[4096]{0} fusion(%bitcast.4), kind=kLoop, calls=%f7, metadata={op_name="transpose(jvp())"}
  %gemm_fusion_dot.2 = bf16[64,64]{1,0} fusion(%x.4, %x.4), kind=kCustom, calls=%g, metadata={op_name="jvp()/dot"}
  %tuple.4 = (bf16[4096]{0}, bf16[64,64]{1,0}) tuple(%loop_add_fusion.7, %gemm_fusion_dot.2)
  %get-tuple-element.4 = bf16[4096]{0} get-tuple-element(%tuple.4), index=0
  %get-tuple-element.5 = bf16[64,64]{1,0} get-tuple-element(%tuple.4), index=1
  ROOT %tuple.5 = (bf16[4096]{0}, bf16[64,64]{1,0}) tuple(%get-tuple-element.4, %get-tuple-element.5)
}
"""


def test_only_kernels_are_launches_and_a_fusion_s_kind_is_its_name_without_the_number():
    found = hlo_traffic.launches(HEADER + VIEWS_AND_FUSIONS)
    array = 64 * 64 * 2
    assert [(x.name, x.group, x.read, x.written) for x in found] == [
        ("loop_add_fusion.3", "forward loop_add_fusion", array, array),  # the bitcast's bytes, read through the view
        ("loop_add_fusion.7", "backward loop_add_fusion", array, array),
        ("gemm_fusion_dot.2", "GEMM", 2 * array, array),
    ]
    assert [row[0] for row in hlo_traffic.totals(found)] == [
        "GEMM", "forward loop_add_fusion", "backward loop_add_fusion",
    ]


@pytest.mark.parametrize("file_name, shown", [
    ("/home/me/wavlink_jax/wavlink_jax/models/layers.py", "wavlink_jax/models/layers.py"),
    ("/work/main/scripts/benchmark.py", "scripts/benchmark.py"),
    ("/opt/venv/lib/python3.12/site-packages/flax/nnx/nn/linear.py", "flax/nnx/nn/linear.py"),
    ("/usr/lib/python3/dist-packages/wavlink_jax/audio.py", "wavlink_jax/audio.py"),
    ("/work/main/tests/test_x.py", "/work/main/tests/test_x.py"),
    ("/home/me/wavlink_jax/tests/test_hlo_traffic.py", "/home/me/wavlink_jax/tests/test_hlo_traffic.py"),
    ("/home/me/scripts/other/tool.py", "/home/me/scripts/other/tool.py"),
])
def test_paths_are_shown_from_the_project_or_site_packages(file_name, shown):
    assert hlo_traffic.relative_path(file_name) == shown


def test_a_dump_without_stack_frames_reports_by_kind_and_refuses_by_source(tmp_path, capsys):
    """The kind report does not depend on the tables; `--by source` says what is missing and how to get it."""
    plain = hlo_traffic.launches(WITHOUT_FRAMES)
    assert all(launch.source == "" for launch in plain)
    assert hlo_traffic.report(plain, 4.0, 5) == hlo_traffic.report(hlo_traffic.launches(WITH_FRAMES), 4.0, 5)
    dump = tmp_path / "plain.hlo"
    dump.write_text(WITHOUT_FRAMES)
    with pytest.raises(SystemExit):
        hlo_traffic.main([str(dump), "--by", "source"])
    error = capsys.readouterr().err
    assert "has no stack frames" in error and "JAX_TRACEBACK_IN_LOCATIONS_LIMIT" in error and "Traceback" not in error


def scaled_exp(x: jax.Array) -> jax.Array:
    return jnp.exp(x) * 2.0  # the line the launch is attributed to


def test_a_compiled_function_is_attributed_to_its_line_in_this_file():
    """jax 0.10.2's CPU `as_text()` carries the stack frame tables: with no frame in wavlink_jax/ or scripts/, the
    launch is named by its innermost frame, this file's line (jax's own frames are not recorded)."""
    compiled = jax.jit(scaled_exp).lower(jnp.ones((64, 64), jnp.float32)).compile().as_text()
    [launch] = hlo_traffic.launches(compiled)
    line = scaled_exp.__code__.co_firstlineno + 1
    assert launch.source.startswith(f"forward {Path(__file__).resolve()}:{line}:"), launch.source
    assert launch.source.endswith(" scaled_exp")


def test_collectives_are_read_with_their_arrays_groups_and_wire_bytes():
    """One of each collective on a 2 × 4 mesh of this machine's CPU devices: the array it moves (the gathered
    result, the scattered operand, the reduced or exchanged array), the devices in its group, and what each
    device sends for it; none of them counts as element-wise traffic."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("pair", "quad"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def exchange(x, y):
        return (
            jax.lax.all_gather(x, "quad", axis=0, tiled=True),
            jax.lax.psum(y, "pair"),
            jax.lax.psum_scatter(y, "quad", scatter_dimension=0, tiled=True),
            jax.lax.all_to_all(y, "quad", 0, 1, tiled=True),
            jax.lax.ppermute(y, "quad", [(i, (i + 1) % 4) for i in range(4)]),
        )

    program = jax.jit(jax.shard_map(
        exchange, mesh=mesh, in_specs=(P("quad"), P()), out_specs=(P(), P(), P("quad"), P("quad"), P("quad")),
        check_vma=False,
    ))
    hlo = program.lower(jnp.ones((16, 8), jnp.float32), jnp.ones((8, 8), jnp.float32)).compile().as_text()
    found = {c.op: c for c in hlo_traffic.collectives(hlo)}
    array = 8 * 8 * 4  # each collective moves a [8, 8] f32 array: 16 × 8 gathered from 4 × 8 per device for the first
    assert {op: (c.group_size, c.array_bytes) for op, c in found.items()} == {
        "all-gather": (4, 2 * array), "all-reduce": (2, array), "reduce-scatter": (4, array),
        "all-to-all": (4, array), "collective-permute": (2, array),
    }
    assert found["all-gather"].wire_bytes == 2 * array * 3 / 4  # the 3 quarters it does not have
    assert found["all-reduce"].wire_bytes == array  # 2 (n - 1) / n of the array for n = 2
    assert found["collective-permute"].wire_bytes == array
    assert all(c.source.endswith("exchange") and "test_hlo_traffic.py" in c.source for c in found.values())
    assert not any(
        hlo_traffic.is_elementwise(launch.group) for launch in hlo_traffic.launches(hlo)
        if launch.group.startswith("collective")
    ) and {f"collective {op}" for op in found} <= {launch.group for launch in hlo_traffic.launches(hlo)}


@pytest.mark.parametrize(
    "groups, size",
    [
        ("replica_groups={{0,1,2,3},{4,5,6,7}}", 4),
        ("replica_groups=[2,4]<=[8]", 4),
        ("replica_groups=[4,2]<=[2,4]T(1,0)", 2),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", 4),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=2] {'axis_0','axis_2'}", 4),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4], device_ids=([2,2,2]T(1,0,2)) {'axis_0'}", 2),
        ("replica_groups=mesh['data'=2,'fsdp'=4] {'fsdp':(1)2}", 2),
        ("replica_groups=mesh['data'=2,'fsdp'=4] {'data','fsdp':(2)2}", 4),
        ("replica_groups={}", 8),
    ],
)
def test_every_form_of_device_groups_is_read(groups, size):
    line = f"  %all-reduce-start = f32[8]{{0}} all-reduce-start(%p), channel_id=1, {groups}, to_apply=%add"
    assert hlo_traffic.group_size("HloModule m, num_partitions=8\n", line) == size


def test_device_groups_it_cannot_read_are_refused():
    with pytest.raises(ValueError, match="cannot read the device groups of this collective: %ar = f32"):
        hlo_traffic.group_size("HloModule m\n", "  %ar = f32[8]{0} all-reduce(%p), replica_groups={}, to_apply=%add")


ASYNC_COLLECTIVES = """
ENTRY %main.2 (x.2: bf16[64,8]) -> (bf16[8,8], bf16[64,8]) {
  %x.2 = bf16[64,8]{1,0} parameter(0), metadata={op_name="x"}
  %grad_fusion = bf16[64,8]{1,0} fusion(%x.2), kind=kLoop, calls=%fused_grad, metadata={op_name="jit(step)/transpose(jvp())/mul" stack_frame_id=2}
  %reduce-scatter-start = ((bf16[64,8]{1,0}), bf16[8,8]{1,0}) reduce-scatter-start(%grad_fusion), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, to_apply=%add, metadata={scheduling_name="reduce-scatter-start"}
  %reduce-scatter-done = bf16[8,8]{1,0} reduce-scatter-done(%reduce-scatter-start), metadata={scheduling_name="reduce-scatter-done"}
  %all-gather-start = ((bf16[8,8]{1,0}), bf16[64,8]{1,0}) all-gather-start(%reduce-scatter-done), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, metadata={op_name="jit(step)/jvp()/all_gather" stack_frame_id=2}
  %all-gather-done = bf16[64,8]{1,0} all-gather-done(%all-gather-start), metadata={op_name="jit(step)/jvp()/all_gather" stack_frame_id=2}
  ROOT %tuple.2 = (bf16[8,8]{1,0}, bf16[64,8]{1,0}) tuple(%reduce-scatter-done, %all-gather-done)
}
"""


def test_asynchronous_collectives_count_once_with_their_results_and_their_operands_direction():
    """A GPU's collectives are `-start`/`-done` pairs, and one that XLA combined from several keeps no metadata
    (the gradients' reduce-scatters): the pair is one launch whose result is the `-done`'s (not the start's tuple,
    which repeats the operands), and the combined one is backward as its operands are."""
    hlo = HEADER + STACK_FRAMES + ASYNC_COLLECTIVES
    scatter, gather = hlo_traffic.collectives(hlo)
    assert (scatter.op, scatter.group_size, scatter.array_bytes, scatter.arrays) == ("reduce-scatter", 8, 1024, "bf16[8,8]{1,0}")
    assert scatter.source == f"backward {hlo_traffic.NO_STACK_FRAME}"
    assert (gather.op, gather.array_bytes) == ("all-gather", 1024)
    assert gather.source == "forward wavlink_jax/models/layers.py:276:30 EncoderBlock.__call__"
    found = {launch.name: launch for launch in hlo_traffic.launches(hlo)}
    assert "reduce-scatter-done" not in found and "all-gather-done" not in found
    assert (found["reduce-scatter-start"].read, found["reduce-scatter-start"].written) == (1024, 128)
    assert (found["all-gather-start"].read, found["all-gather-start"].written) == (128, 1024)
    assert found["all-gather-start"].group == "collective all-gather"
