"""Mesh construction from config and logical-axis rules → PartitionSpecs (8 host CPU devices)."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from wavlink_jax import audio, sharding

RULES = sharding.rules_dict([("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", None)])


def test_mesh_resolves_minus_one_and_is_auto():
    mesh = sharding.create_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert sharding.batch_divisor(mesh) == 8
    assert dict(sharding.create_mesh({"data": 1}, devices=jax.devices()[:1]).shape)["data"] == 1


@pytest.mark.parametrize(
    "axes,message",
    [({"data": 3}, "needs 3 devices"), ({"data": -1, "fsdp": -1}, "at most one"), ({"model": 8}, "unknown axes"),
     ({"data": -1, "fsdp": 3}, "not divisible")],
)
def test_mesh_errors(axes, message):
    with pytest.raises(ValueError, match=message):
        sharding.create_mesh(axes)


def test_logical_to_spec():
    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.logical_to_spec(("embed", "heads"), (8, 8), RULES, mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("vocab", "embed"), (10, 8), RULES, mesh) == P(None, "fsdp")
    # Not divisible → replicated on that dimension; the same mesh axis is used once per array.
    assert sharding.logical_to_spec(("embed", "mlp"), (7, 8), RULES, mesh) == P(None, "tensor")
    assert sharding.logical_to_spec(("heads", "mlp"), (8, 8), RULES, mesh) == P("tensor", None)
    # Size-1 mesh axes are dropped.
    single = sharding.create_mesh({"data": 8})
    assert sharding.logical_to_spec(("embed", "heads"), (8, 8), RULES, single) == P(None, None)
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.logical_to_spec(("embed", "kv"), (8, 8), RULES, mesh, name="x/kernel")
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.rules_dict([("embed", "model")])


def test_tree_shardings_on_nested_dicts():
    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    logical = {"a": {"kernel": ("embed", "mlp"), "bias": ("mlp",)}, "scale": ()}
    shapes = {"a": {"kernel": jax.ShapeDtypeStruct((4, 6), "float32"), "bias": jax.ShapeDtypeStruct((6,), "float32")},
              "scale": jax.ShapeDtypeStruct((), "float32")}
    result = sharding.tree_shardings(logical, shapes, RULES, mesh)
    assert result["a"]["kernel"].spec == P("fsdp", "tensor")
    assert result["a"]["bias"].spec == P("tensor")
    assert result["scale"].spec == P()


def test_log_mel_of_a_sharded_batch_stays_on_each_device():
    # XLA replicates an FFT's operand: plain jit all-gathers every device's STFT frames.
    mesh = sharding.create_mesh({"data": 4, "fsdp": 2})
    waveform = np.random.default_rng(0).standard_normal((16, 4000)).astype(np.float32)
    waveform = jax.device_put(waveform, sharding.batch_sharding(mesh))
    local = jax.jit(sharding.per_device_rows(lambda w: audio.log_mel_spectrogram(w, 80), mesh))
    program = local.lower(waveform).compile().as_text()
    assert not re.findall(r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter", program)
    result = local(waveform)
    assert result.sharding.spec == P(sharding.BATCH_AXES)
    np.testing.assert_allclose(np.asarray(result), np.asarray(audio.log_mel_spectrogram(np.asarray(waveform))), atol=1e-6)
