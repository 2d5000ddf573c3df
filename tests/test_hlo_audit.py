"""scripts/hlo_audit.py: FLOPs and kernels read from a lowered program, and the GPU program of our real step."""

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

    def program(x, w, kernel, signal):
        y = projection(projection(x, w), w)
        conv = jax.lax.conv_general_dilated(signal, kernel, (2,), [(1, 1)], dimension_numbers=("NWC", "WIO", "NWC"))
        return y, conv

    args = (
        jnp.zeros((6, 40), jnp.bfloat16),
        jnp.zeros((40, 40), jnp.bfloat16),
        jnp.zeros((3, 5, 7), jnp.float32),  # width 3, 5 in, 7 out
        jnp.zeros((2, 30, 5), jnp.float32),
    )
    text = jax.jit(program).lower(*args).as_text()
    assert text.count("call @") >= 2 and text.count("stablehlo.dot_general") == 1  # the case this test is for
    result = hlo_audit.audit_text(text)
    assert result["dot_flops"] == {"bf16 x bf16 -> bf16": 2 * (2 * 6 * 40 * 40)}
    assert result["dot_counts"] == {"bf16 x bf16 -> bf16": 2}
    conv_flops = 2 * (2 * 15 * 7) * (3 * 5)  # 2 × outputs (batch 2, 15 positions, 7 features) × taps × inputs
    assert result["convolution_flops"] == {"f32 -> f32": conv_flops}
    assert result["total_flops"] == 2 * (2 * 6 * 40 * 40) + conv_flops
    assert result["bf16_dot_share"] == 1.0


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
    # The benchmark's TFLOP/s rest on model_flops; the program does 1.1% more (cuDNN's padding 1501 → 1504 and
    # 77 → 80, the mel filter bank). Dropping the backward pass, attention or a block from the count fails this.
    assert 1.0 < r["lowered_over_analytic"] < 1.02


def test_cpu_program_matches_the_analytic_flop_count_too():
    r = hlo_audit.run(hlo_audit.parse_args(["--model", "base", "--batch", "2", "--window", "10", "--platform", "cpu"]))
    assert r["cudnn_calls"] == {"forward": 0, "backward": 0}
    # XLA's attention: logits in fp32, so about a sixth of the matmul FLOPs are not bf16 × bf16 on this path.
    assert 0.8 < r["bf16_dot_share"] < 0.95
    assert 1.0 < r["lowered_over_analytic"] < 1.02
