"""scripts/hlo_audit.py: FLOPs and kernels read from a lowered program, and the GPU program of our real step."""

import functools
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import hlo_audit  # noqa: E402


def test_counts_matmuls_convolutions_and_repeated_calls_exactly():
    @jax.jit
    def projection(x, w):  # a nested jit: lowered once as a private function, called twice below
        return x @ w

    def strided(signal, kernel):
        return jax.lax.conv_general_dilated(signal, kernel, (2,), [(1, 1)], dimension_numbers=("NWC", "WIO", "NWC"))

    def program(x, w, kernel, signal):
        y = projection(projection(x, w), w)
        conv, input_gradient = jax.vjp(lambda s: strided(s, kernel), signal)
        return y, conv, input_gradient(conv)  # the gradient: a transposed convolution over a 2× dilated input

    args = (
        jnp.zeros((6, 40), jnp.bfloat16),
        jnp.zeros((40, 40), jnp.bfloat16),
        jnp.zeros((3, 5, 7), jnp.float32),  # width 3, 5 in, 7 out
        jnp.zeros((2, 30, 5), jnp.float32),
    )
    text = jax.jit(program).lower(*args).as_text()
    assert text.count("call @") >= 2 and text.count("stablehlo.dot_general") == 1  # the cases this test is for
    assert text.count("lhs_dilate = [1]") == 1 and text.count("lhs_dilate = [2]") == 1
    result = hlo_audit.audit_text(text)
    assert result["dot_flops"] == {"bf16 x bf16 -> bf16": 2 * (2 * 6 * 40 * 40)}
    assert result["dot_counts"] == {"bf16 x bf16 -> bf16": 2}
    conv_flops = 2 * (2 * 15 * 7) * (3 * 5)  # 2 × outputs (batch 2, 15 positions, 7 features) × taps × inputs
    # The input gradient: 2 × 30 positions × 5 features, each from 3 taps × 7 features over an input with a zero
    # between values (so half of them multiply one): the forward's count, not twice it.
    assert result["convolution_flops"] == {"f32 -> f32": 2 * conv_flops}
    assert result["total_flops"] == 2 * (2 * 6 * 40 * 40) + 2 * conv_flops
    assert result["bf16_dot_share"] == 1.0


def test_a_function_called_by_a_repeated_call_runs_once_per_call_of_its_caller():
    """A helper that a function calls twice, itself called twice, runs four times."""
    @jax.jit
    def inner(x, w):
        return x @ w

    @jax.jit
    def outer(x, w):
        return inner(inner(x, w), w)

    x, w = jnp.zeros((6, 40), jnp.bfloat16), jnp.zeros((40, 40), jnp.bfloat16)
    text = jax.jit(lambda x, w: outer(outer(x, w), w)).lower(x, w).as_text()
    assert hlo_audit.multiplicities(hlo_audit.functions(text)) == {"main": 1, "outer": 2, "inner": 4}
    assert hlo_audit.audit_text(text)["dot_flops"] == {"bf16 x bf16 -> bf16": 4 * (2 * 6 * 40 * 40)}


def test_refuses_programs_with_loops():
    text = jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda i, v: v @ v, x)).lower(jnp.eye(4)).as_text()
    with pytest.raises(ValueError, match="loops"):
        hlo_audit.audit_text(text)


@pytest.fixture(scope="module")
def base_on_gpu():
    return hlo_audit.run(hlo_audit.parse_args(["--model", "base", "--batch", "2"]))


def test_gpu_program_runs_every_full_attention_layer_in_cudnn(base_on_gpu):
    """What GPU run 1 lacked: the step lowered for cuda has one cuDNN flash-attention call per full-length layer
    (5 audio + 12 text for base; the last audio block's single global row stays in XLA), forward and backward,
    in bf16, at padded even lengths, with the padding (and, for text, causal) mask."""
    r = base_on_gpu
    assert r["cudnn_calls"] == {"forward": 17, "backward": 17} == {"forward": r["cudnn_expected"], "backward": 17}
    shapes = {(a["kernel"], tuple(a["q"]), a["kv_length"], a["dtype"], a["mask"]) for a in r["cudnn_attention"]}
    assert shapes == {
        (kernel, q, kv, "bf16", mask)
        for kernel in ("forward", "backward")
        for q, kv, mask in (((2, 1504, 8, 64), 1504, "PADDING"), ((2, 80, 8, 64), 80, "PADDING_CAUSAL"))
    }


def test_gpu_program_matmuls_are_bf16_and_match_the_analytic_flop_count(base_on_gpu):
    r = base_on_gpu
    # Not bf16: only the fp32 mel filter bank, the heads and loss logits, and the global row's attention.
    assert r["bf16_dot_share"] > 0.999
    # The benchmark's TFLOP/s rest on model_flops; the program does 0.6% more (cuDNN's padding 1501 → 1504 and
    # 77 → 80, the mel filter bank). Dropping the backward pass, attention or a block from the count fails this.
    assert 1.0 < r["lowered_over_analytic"] < 1.01


def test_cudnn_unpadded_lowers_odd_lengths_as_they_are_where_jax_trains_them(monkeypatch):
    """`--attention cudnn_unpadded`: the pinned jax refuses odd lengths for training (the zero-size bias it passes
    when there is none counts as a bias), so the program is the padded one; a jax whose check sees no bias (as
    GPU run 1's 0.11.2 trained Whisper's 1501 positions) gets each full-length layer at the tower's own length,
    the audio tower's with no mask at all (no padding mode), the text's with its caption lengths, causal."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    from wavlink_jax.models import layers

    def shapes(r):
        return {(a["kernel"], tuple(a["q"]), a["kv_length"], a["mask"]) for a in r["cudnn_attention"]}

    def fresh_answers():  # jax's answers remembered by this test alone
        monkeypatch.setattr(layers, "cudnn_trains_unpadded", functools.cache(layers.cudnn_trains_unpadded.__wrapped__))

    argv = ["--model", "base", "--batch", "2", "--attention", "cudnn_unpadded"]
    fresh_answers()
    pinned = hlo_audit.run(hlo_audit.parse_args(argv))
    assert pinned["attention"] == "cudnn_unpadded"
    assert {(q[1], kv, mask) for _, q, kv, mask in shapes(pinned)} == {
        (1504, 1504, "PADDING"), (80, 80, "PADDING_CAUSAL")
    }
    check = fused.check_is_flash_attention
    monkeypatch.setattr(
        fused, "check_is_flash_attention",
        lambda query, key, value, layout, version, has_bias, *rest, **kwargs: check(
            query, key, value, layout, version, False, *rest, **kwargs
        ),
    )
    fresh_answers()
    unpadded = hlo_audit.run(hlo_audit.parse_args(argv))
    assert unpadded["cudnn_calls"] == {"forward": 17, "backward": 17}
    assert shapes(unpadded) == {
        (kernel, q, kv, mask)
        for kernel in ("forward", "backward")
        for q, kv, mask in (((2, 1501, 8, 64), 1501, "NO_MASK"), ((2, 77, 8, 64), 77, "PADDING_CAUSAL"))
    }
    # The padded rows' FLOPs are gone: only the mel filter bank's (0.04%) lie beyond the analytic count.
    assert 1.0 < unpadded["lowered_over_analytic"] < 1.001 < pinned["lowered_over_analytic"]


def test_cpu_program_matches_the_analytic_flop_count_too():
    r = hlo_audit.run(hlo_audit.parse_args(["--model", "base", "--batch", "2", "--window", "10", "--platform", "cpu"]))
    assert r["cudnn_calls"] == {"forward": 0, "backward": 0}
    # XLA's attention: logits in fp32, so about a sixth of the matmul FLOPs are not bf16 × bf16 on this path.
    assert 0.8 < r["bf16_dot_share"] < 0.95
    # No padding on this path: the program's only arithmetic beyond model_flops is the mel filter bank (0.04%).
    assert 1.0 < r["lowered_over_analytic"] < 1.001


# `--target`: the step compiled for a GPU card on a machine without one.


def test_target_without_jaxs_cuda_plugin_says_what_to_install(monkeypatch):
    """No CUDA plugin (as in the project's own .venv): a SystemExit naming `make gpu-compile-env`, not jax's
    'topology not implemented for cuda'."""
    from jax.experimental import topologies

    def no_plugin(*args, **kwargs):
        raise NotImplementedError("topology not implemented for cuda")

    monkeypatch.setattr(topologies, "get_topology_desc", no_plugin)
    with pytest.raises(SystemExit, match=r"--target h200 needs jax's CUDA plugin.*make gpu-compile-env"):
        hlo_audit.run(hlo_audit.parse_args(["--model", "base", "--batch", "2", "--target", "h200"]))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target", "h100", "--platform", "cpu"], "--target compiles for a GPU"),
        (["--attention", "cudnn_unpadded", "--platform", "cpu"], "--attention chooses among cuDNN's forms"),
        (["--compiled-hlo", "x.hlo"], "--compiled-hlo needs --target"),
        (["--target", "a100"], "invalid choice"),
        (["--target", "h200", "--top", "0"], "--top must be ≥ 1"),
        (["--target", "h200", "--compiled-hlo", "/no/such/folder/x.hlo.gz"], "the folder /no/such/folder does not exist"),
        (["--hlo", "/no/such/folder/x.mlir"], "the folder /no/such/folder does not exist"),
        (["--mesh", "fsdp=8"], "--mesh needs --target"),
        (["--target", "h100", "--mesh", "fsdp=8,pipeline=2"], "'pipeline=2': expected AXIS=N with AXIS one of data"),
        (["--target", "h100", "--mesh", "fsdp=0"], "'fsdp=0': expected AXIS=N"),
        (["--target", "h100", "--mesh", "fsdp=2,fsdp=4"], "'fsdp' is given twice"),
        (["--target", "h100", "--mesh", "data=2,fsdp=3", "--batch", "8"], "it must divide over data×fsdp = 6"),
        (["--memory-fraction", "0.95"], "--memory-fraction needs --target"),
        (["--target", "h200", "--memory-fraction", "1.5"], "--memory-fraction 1.5 is not a share of the card"),
        (["--target", "h200", "--memory-fraction", "0"], "--memory-fraction 0.0 is not a share of the card"),
    ],
)
def test_target_arguments_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        hlo_audit.parse_args(argv)
    assert message in capsys.readouterr().err


def test_every_target_describes_its_card():
    """The compile-only device descriptions: an H100 (80 GB) and an H200 (141 GB), compute capability 9.0."""
    assert hlo_audit.TARGETS == ("h100", "h200")
    for name, memory, description in (("h100", 84942979072, "H100 80GB"), ("h200", 150754820096, "H200 141GB")):
        text = (hlo_audit.TARGETS_DIR / f"{name}.txtpb").read_text()
        assert f"device_memory_size: {memory}" in text and description in text
        assert "major: 9" in text and "core_count: 132" in text
        assert hlo_audit.card_memory_bytes(name) == memory


def test_the_compile_plans_for_the_share_of_the_card_jax_is_given():
    """XLA plans a compile-only device's program for 80% of its described memory, a card's for what the
    allocator holds (XLA_PYTHON_CLIENT_MEM_FRACTION of it): the description handed to XLA scales the memory by
    fraction / 80% and nothing else; jax's default fraction, 75%, unless told."""
    card = (hlo_audit.TARGETS_DIR / "h200.txtpb").read_text()
    planned = hlo_audit.planned_description(card, 0.95)
    scaled = int(150754820096 * 0.95 / 0.8)
    assert planned == card.replace("device_memory_size: 150754820096", f"device_memory_size: {scaled}")
    assert hlo_audit.planned_description(card, 0.8) == card
    assert hlo_audit.parse_args(["--target", "h200"]).memory_fraction == 0.75


def test_compiled_program_report_reads_memory_and_traffic(tmp_path):
    """`compile_for_target` on this machine's own compiler (what it does for a card, minus the card), on a small
    training update of our GELU with donated weights: memory figures that add up, the donated weights aliased,
    element-wise traffic by source line that sums to at most the total, and the optimised HLO written gzipped
    and read back by hlo_traffic to the same launches."""
    from wavlink_jax.models import layers

    def step(weights, x):
        def loss_of(w):
            return jnp.sum(layers.gelu_exact(x @ w["in"]) @ w["out"])

        loss, grads = jax.value_and_grad(loss_of)(weights)
        return jax.tree.map(lambda w, g: w - 0.1 * g, weights, grads), loss

    weights = {"in": jnp.ones((64, 256)), "out": jnp.ones((256, 64))}
    lowered = jax.jit(step, donate_argnums=0).lower(weights, jnp.ones((128, 64)))
    out = tmp_path / "update.hlo.gz"
    c = hlo_audit.compile_for_target(lowered, "cpu", str(out), top=3)
    assert c["program_bytes"] == (
        c["argument_bytes"] + c["temporary_bytes"] + c["output_bytes"] - c["aliased_bytes"]
    ) > 0
    assert c["aliased_bytes"] == 2 * 64 * 256 * 4  # both weights updated in place
    assert c["elementwise_grouped_by"] == "source" and c["card_memory_bytes"] is None  # no card file for "cpu"
    rows = c["elementwise_groups"]
    assert 0 < len(rows) <= 3 and [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
    assert 0 < sum(r[1] for r in rows) <= c["elementwise_bytes"]
    assert any("wavlink_jax/models/layers.py" in r[0] for r in rows)
    assert len(hlo_audit.hlo_traffic.launches(hlo_audit.hlo_traffic.read_hlo(out))) == c["launches"]
    report = "\n".join(hlo_audit.compiled_report(c))
    assert "device memory" in report and rows[0][0] in report
    assert c["collectives"] == {} and "collectives (count" not in report  # one device
    assert c["rematerialised_launches"] == 0 and "rematerialisation" not in report  # far from any memory limit
    near_the_limit = {**c, "rematerialised_launches": 58, "rematerialised_bytes": 45.8e9}  # large b64 for an H200
    assert "58 launches recompute values instead of keeping them, moving 45.8 GB" in "\n".join(
        hlo_audit.compiled_report(near_the_limit)
    )
    assert c["memory_fraction"] == 0.75 and "planned for" not in report  # no card: no verdict
    on_a_card = {**c, "card_memory_bytes": 100 * 2**30, "program_bytes": 80 * 2**30}
    assert hlo_audit.fit_lines(on_a_card) == [
        "  planned for the 75% of the card JAX is given (75.00 GiB, XLA_PYTHON_CLIENT_MEM_FRACTION=0.75): the program "
        "does NOT fit it: give JAX more of the card (XLA_PYTHON_CLIENT_MEM_FRACTION, --memory-fraction), recompute "
        "blocks (--remat) or lower the batch"
    ]
    assert hlo_audit.fit_lines({**on_a_card, "memory_fraction": 0.95})[0].endswith("=0.95): the program fits it")
    all_of_it = {**on_a_card, "program_bytes": 75 * 2**30}
    assert hlo_audit.fit_lines(all_of_it)[0].endswith("the program fits it")


def test_compiled_program_on_several_devices_reports_its_collectives():
    """The same report for a data-parallel update on 8 of this machine's CPU devices: the gradient is summed
    over the devices (all-reduce of the [64, 256] weight, 64 KiB), listed by kind and as the largest, with the
    line that made it."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step(w, x):
        return w - 0.1 * jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w)

    lowered = jax.jit(step, in_shardings=(whole, rows), out_shardings=whole).lower(
        jnp.ones((64, 256)), jnp.ones((128, 64))
    )
    c = hlo_audit.compile_for_target(lowered, "cpu", None, top=3)
    [(op, row)] = c["collectives"].items()
    assert (op, row["count"], row["array_bytes"]) == ("all-reduce", 1, 64 * 256 * 4)
    assert row["wire_bytes"] == 64 * 256 * 4 * 2 * 7 / 8
    [largest] = c["largest_collectives"]
    assert largest["devices"] == 8 and "test_hlo_audit.py" in largest["source"]
    report = "\n".join(hlo_audit.compiled_report(c))
    assert "all-reduce" in report and "cuDNN flash attention: 0 forward, 0 backward calls" in report


def test_calls_partitioned_by_jax_are_counted_and_named():
    """On a mesh, jax lowers cuDNN attention as a `custom_partitioning` call whose kernel the lowered text does
    not name: the audit counts such calls and says that their FLOPs are missing, instead of reporting a step
    with no attention."""
    from jax.experimental.custom_partitioning import custom_partitioning

    @custom_partitioning
    def double(x):
        return 2 * x

    double.def_partition(
        infer_sharding_from_operands=lambda mesh, arg_shapes, result_shape: arg_shapes[0].sharding,
        partition=lambda mesh, arg_shapes, result_shape: (mesh, lambda x: 2 * x, arg_shapes[0].sharding,
                                                          (arg_shapes[0].sharding,)),
        sharding_rule="i j -> i j",
    )
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    text = jax.jit(lambda x: double(double(x)), in_shardings=rows).lower(jnp.ones((16, 4))).as_text()
    assert hlo_audit.audit_text(text)["partitioned_calls"] == 2


@pytest.mark.slow
def test_h200_program_keeps_no_fp32_intermediates_and_one_kernel_per_layer_norm_pass(tmp_path):
    """With jax's CUDA plugin installed (`make gpu-compile-env`; skipped without): base at batch 128 compiled
    for an H200 materialises no fp32 [batch, frames, width or mlp] tensor. XLA's CSE had merged the GELU's and
    LayerNorm's backward recomputation with their forwards before the optimization barriers: 5 fp32 GELU and 11
    fp32 LayerNorm tensors. (At batch 2 XLA fuses differently and keeps some anyway: not the case to test.)

    And each full-length LayerNorm is one Triton kernel forward and one backward (row reductions and dx
    together), with no column reduction for dγ, dβ (`LayerNorm.project`). Given its row reductions on a [rows,
    width] view of the GEMM's output and the rest on [batch, frames, width], XLA made them a separate pass
    (1732 launches, 72.5 GB of element-wise traffic; one kernel each: 1611, 66.4 GB). With E[x²] − E[x]² for
    σ² the forward was a statistics kernel and a normalising kernel (one each: 1543, 64.2 GB)."""
    pytest.importorskip(
        "jax_plugins.xla_cuda13", reason="needs jax's CUDA plugin: make gpu-compile-env, then .venv-gpu-compile/bin/python -m pytest"
    )
    hlo_audit.run(hlo_audit.parse_args(
        ["--model", "base", "--batch", "128", "--target", "h200", "--compiled-hlo", str(tmp_path / "b.hlo.gz")]
    ))
    hlo = hlo_audit.hlo_traffic.read_hlo(tmp_path / "b.hlo.gz")
    instructions = list(hlo_audit.hlo_traffic.entry_instructions(hlo))
    assert any("__cudnn$fmhaSoftmax" in line for _, line in instructions)
    full_length_fp32 = [
        array for match, _ in instructions for array in re.findall(r"f32\[128,1504,\d+\]", match["type"])
    ]
    assert full_length_fp32 == []
    activation = 128 * 1504 * 512 * 2
    launches = hlo_audit.hlo_traffic.launches(hlo)
    layer_norm_backward = [
        launch.group for launch in launches
        if launch.source.startswith("backward") and launch.source.endswith("LayerNorm.normalise")
        and launch.read >= 2 * activation
    ]
    assert len(layer_norm_backward) == 10 and set(layer_norm_backward) == {"backward fusion"}  # Triton's kind
    layer_norm_forward = [
        launch.group for launch in launches
        if launch.source.startswith("forward") and launch.read >= activation
        and launch.source.endswith(("_layer_norm_forward", "_row_statistics"))
    ]
    assert len(layer_norm_forward) == 11 and set(layer_norm_forward) == {"forward fusion"}


@pytest.mark.slow
def test_large_at_batch_64_fits_an_h200_without_remat():
    """With jax's CUDA plugin (skipped without): WavLink-Large at batch 64, 30 s, no remat, compiled for an
    H200 given 95% of it (XLA_PYTHON_CLIENT_MEM_FRACTION, as `scripts/gpu_check.sh` gives that run; jax's default
    75% is too little), fits that share. GPU run 4 measured 129.78 GiB there; this compile, planned for the same
    share, gave 129.78 GiB with the card's XLA (0.11.2) and 127.10 GiB with the pinned 0.10.2."""
    pytest.importorskip(
        "jax_plugins.xla_cuda13", reason="needs jax's CUDA plugin: make gpu-compile-env, then .venv-gpu-compile/bin/python -m pytest"
    )
    c = hlo_audit.run(hlo_audit.parse_args(
        ["--model", "large", "--batch", "64", "--target", "h200", "--memory-fraction", "0.95"]
    ))["compiled"]
    assert c["cudnn_calls"] == {"forward": 43, "backward": 43}  # no forward recomputed
    assert c["program_bytes"] < 0.95 * c["card_memory_bytes"]


@pytest.mark.slow
def test_fsdp_program_for_8_h100s_moves_parameters_not_activations():
    """With jax's CUDA plugin (skipped without): base under `--mesh fsdp=8` at global batch 16, compiled for 8
    H100s, runs every full-length attention layer in cuDNN on each device, all-gathers parameters and
    reduce-scatters gradients, and moves no `[16 rows, sequence, ...]` activation of the whole batch (the text
    tower all-reduced 35 of them before `sharding.split_batch`). What remains of activations is small and
    per-device: all-to-alls of the text embedding's output and its gradient between the embedding's column
    split and the blocks' row split, the pooled text rows gathered in the backward (`[16, 512]`, `[16, 77]`),
    and the last audio block's global query (`[16, 4, 512]`, 64 KB)."""
    pytest.importorskip(
        "jax_plugins.xla_cuda13", reason="needs jax's CUDA plugin: make gpu-compile-env, then .venv-gpu-compile/bin/python -m pytest"
    )
    r = hlo_audit.run(hlo_audit.parse_args(
        ["--model", "base", "--batch", "16", "--target", "h100", "--mesh", "fsdp=8", "--top", "1000"]
    ))
    c = r["compiled"]
    assert r["partitioned_calls"] == 34 and c["cudnn_calls"] == {"forward": 17, "backward": 17}
    assert {"all-gather", "reduce-scatter"} <= set(c["collectives"])
    activations = [
        x for x in c["largest_collectives"] if re.search(r"(?:f32|bf16)\[16,\d\d+,", x["arrays"])
    ]
    assert activations == []
