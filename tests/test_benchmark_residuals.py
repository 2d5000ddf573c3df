"""scripts/benchmark_residuals.py: the audio tower's saved residuals, custom VJPs (GELU, LayerNorm) vs autodiff."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import benchmark_residuals  # noqa: E402
from wavlink_jax.models import layers  # noqa: E402

TINY = ["--tiny", "--batch", "2", "--window", "1"]  # 2 layers, 64 wide; 50 frames + the global token


def _count(table: dict, kind: str, op: str) -> int:
    """How many residuals of a type prefix (`bfloat16`, `float32[2,51,64]`) the op `op` produced."""
    return sum(n for (shape, source), (n, _) in table.items() if shape.startswith(kind) and source == f"output of {op}")


def test_custom_gelu_saves_two_fewer_tensors_per_gelu_than_autodiff(capsys):
    """The tiny tower (global_only: one full-length MLP, plus the two stem convolutions): autodiff of the
    formula saves 0.5·x, erfc, exp (and the output where the next op needs it) per GELU; the custom VJP only
    its input — 2 fewer tensors at each of the three GELUs. The patch is undone afterwards."""
    autodiff = benchmark_residuals.main([*TINY, "--autodiff", "gelu"])
    assert layers.ACTIVATIONS["gelu"] is layers.gelu_exact
    custom = benchmark_residuals.main(TINY)
    # bf16 only: the attention's softmax also saves an exp, in fp32
    assert _count(autodiff, "bfloat16", "erfc") == _count(autodiff, "bfloat16", "exp") == 3
    assert _count(autodiff, "bfloat16", "custom_vjp_call") == 0
    assert _count(custom, "bfloat16", "erfc") == _count(custom, "bfloat16", "exp") == 0
    assert _count(custom, "bfloat16", "custom_vjp_call") == 2
    assert sum(n for n, _ in autodiff.values()) - sum(n for n, _ in custom.values()) == 6
    # the arguments are not the forward's residuals (fc1's fp32 kernels, saved for the input's gradient, are large
    # enough to be listed)
    assert not [op for _, op in custom if op.startswith("from the argument")]
    # the full-length MLP's GELU input is kept as fc1's product, its bias added inside the custom VJP
    assert _count(custom, "bfloat16[2,51,256]", "dot_general") == 1 and _count(custom, "bfloat16[2,51,256]", "add") == 0
    assert "autodiff for gelu: " in capsys.readouterr().out


def test_custom_layer_norm_saves_its_bf16_input_instead_of_two_fp32_tensors(capsys):
    """The tiny tower's three full-length LayerNorms (both attention norms, the first MLP norm; the last MLP
    norm sees only the global token's row): autodiff of the same arithmetic saves x − mean and a product per
    norm, each an fp32 [2, 51, 64]; the custom VJP saves only the bf16 input. The patch is undone afterwards."""
    custom_vjp = layers._layer_norm
    autodiff = benchmark_residuals.main([*TINY, "--autodiff", "layer_norm"])
    assert layers._layer_norm is custom_vjp
    custom = benchmark_residuals.main(TINY)
    full_length = "float32[2,51,64]"
    assert _count(autodiff, full_length, "sub") == 3 and _count(autodiff, full_length, "mul") == 3
    assert not any(shape.startswith(full_length) for shape, _ in custom)
    inputs = _count(custom, "bfloat16[2,51,64]", "add") + _count(custom, "bfloat16[2,51,64]", "concatenate")
    assert inputs == 3 and _count(autodiff, "bfloat16[2,51,64]", "add") == 0
    assert "autodiff for layer_norm: " in capsys.readouterr().out
