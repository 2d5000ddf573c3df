"""scripts/hlo_traffic.py: bytes read and written per launch of a compiled program, grouped."""

import gzip
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
    assert "| GEMM |" in text and "outside GEMMs and custom calls" in text


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
