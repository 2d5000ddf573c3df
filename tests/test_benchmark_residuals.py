"""scripts/benchmark_residuals.py: the audio tower's saved residuals, custom-VJP GELU vs autodiff of the formula."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import benchmark_residuals  # noqa: E402
from wavlink_jax.models import layers  # noqa: E402


def test_custom_gelu_saves_two_fewer_tensors_per_gelu_than_autodiff(capsys):
    """The tiny tower (global_only: one full-length MLP, plus the two stem convolutions): autodiff of the
    formula saves 0.5·x, erfc, exp (and the output where the next op needs it) per GELU; the custom VJP only
    its input — 2 fewer tensors at each of the three GELUs. The patch is undone afterwards."""
    argv = ["--tiny", "--batch", "2", "--window", "1"]
    autodiff = benchmark_residuals.main([*argv, "--gelu", "autodiff"])
    assert layers.ACTIVATIONS["gelu"] is layers.gelu_exact
    custom = benchmark_residuals.main(argv)
    def count(table, op):  # bf16 only: the attention's softmax also saves an exp, in fp32
        return sum(
            n for (kind, source), (n, _) in table.items() if kind.startswith("bfloat16") and source == f"output of {op}"
        )

    assert count(autodiff, "erfc") == count(autodiff, "exp") == 3 and count(autodiff, "custom_vjp_call") == 0
    assert count(custom, "erfc") == count(custom, "exp") == 0 and count(custom, "custom_vjp_call") == 2
    assert sum(n for n, _ in autodiff.values()) - sum(n for n, _ in custom.values()) == 6
    assert "GELU autodiff: " in capsys.readouterr().out
