"""Mesh construction from config and logical-axis rules → PartitionSpecs (8 host CPU devices)."""

import re
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from wavlink_jax import audio, sharding

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import hlo_traffic  # noqa: E402

RULES = sharding.rules_dict([("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", None)])


def test_mesh_resolves_minus_one_and_is_auto():
    mesh = sharding.create_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert sharding.batch_divisor(mesh) == 8
    assert dict(sharding.create_mesh({"data": 1}, devices=jax.devices()[:1]).shape)["data"] == 1


def test_batch_divisor_counts_the_batch_axes_only():
    """The batch is split over data × fsdp and replicated over tensor: on 2 × 2 × 2 devices a batch of 4 splits
    evenly (counting all 8 devices, the training and evaluation batch checks refused it)."""
    assert sharding.batch_divisor(sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})) == 4
    assert sharding.batch_divisor(sharding.create_mesh({"data": 1, "fsdp": 2, "tensor": 4})) == 2


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
    with pytest.raises(ValueError, match="'embed' has more than one rule"):  # the last won, silently
        sharding.rules_dict([("embed", "fsdp"), ("heads", "tensor"), ("embed", None)])


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


def test_dimensions_the_mesh_does_not_divide_are_reported():
    mesh = sharding.create_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    rules = sharding.rules_dict([("embed", "fsdp"), ("mlp", "tensor"), ("vocab", None)])
    unsharded = []
    spec = sharding.logical_to_spec(("vocab", "embed"), (10, 36), rules, mesh, name="emb", unsharded=unsharded)
    assert spec == P(None, None)
    assert unsharded == [sharding.Unsharded("emb", (10, 36), 1, "embed", ("fsdp",))]
    # Replicated by the rules themselves (None, a size-1 axis), or the axis taken by another dimension: no report.
    unsharded.clear()
    assert sharding.logical_to_spec(("mlp",), (36,), rules, mesh, unsharded=unsharded) == P(None)
    assert sharding.logical_to_spec(("embed", "embed"), (36, 16), rules, mesh, unsharded=unsharded) == P(None, "fsdp")
    assert sharding.logical_to_spec((), (), rules, mesh, unsharded=unsharded) == P()
    assert unsharded == []
    entries = [sharding.Unsharded("a", (36,), 0, "embed", ("fsdp",)),
               sharding.Unsharded("b", (3, 20), 1, "embed", ("fsdp",))]
    assert sharding.dividing_sizes(entries, mesh) == {("fsdp",): [2, 4]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from wavlink_jax.data import synthetic

    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(root, num_train=8, num_eval=1, max_seconds=1.5, captions_per_clip=1)
    return root


@pytest.mark.parametrize("width", [pytest.param(32, marks=pytest.mark.slow), 36])  # 32, no warning: test-all
def test_the_trainer_warns_of_parameters_the_mesh_does_not_divide(tmp_path, data_dir, capsys, width):
    """Towers of width 36 on fsdp=8: every kernel, embedding and position table with an `embed` axis (and Adam's
    two moments of each) is whole on every device; the trainer said nothing of it (an absl INFO log, hidden).
    Width 32 divides, and the biases the rules replicate (`mlp` → tensor of size 1) are no reason to warn. The run
    stops at init_from, after start-up."""
    from train_fixtures import tiny_config

    from wavlink_jax import train

    config = tiny_config(str(data_dir), total_steps=2, **{
        "mesh.data": 1, "mesh.fsdp": 8, "model.audio.width": width, "model.text.width": width,
        "init_from.audio": "/nonexistent/whisper"})  # fmt: skip
    with pytest.raises(ValueError, match="/nonexistent/whisper"):
        train.train(config, str(tmp_path / "run"))
    err = capsys.readouterr().err
    if width == 32:
        assert "warning" not in err
        return
    assert re.search(
        r"^warning: 38 parameter/buffer arrays \(and 74 optimizer-state arrays of theirs\) are kept whole on every "
        r"device along a dimension that config\.sharding_rules shard, because the mesh \{'data': 1, 'fsdp': 8, "
        r"'tensor': 1\} does not divide it: they take [\d.]+ KiB per device instead of about [\d.]+ KiB\. E\.g\. "
        r"params/text/token_embedding/embedding \(1024, 36\): dimension 1 \(embed\) of 36 over fsdp=8; .* On 8 "
        r"devices, fsdp = 2 or 4 would divide every one of them\.", err, re.M), err
    now, sharded = map(float, re.search(r"take ([\d.]+) KiB per device instead of about ([\d.]+) KiB", err).groups())
    assert now / sharded == pytest.approx(8, rel=0.01)  # each of them kept whole instead of split 8 ways


def test_fsdp_gathers_parameters_not_activations():
    """The train step on data = 2 × fsdp = 4, compiled for 8 devices: its collectives move parameters
    (all-gathers) and gradients (reduce-scatters), never a tower's activations over the global batch. Without
    `sharding.split_batch` in the blocks, the text tower ran on all 16 rows on every device with its embed
    dimension split, and all-gathered or all-reduced `[16, 16, width]` and `[16, 16, mlp]` activations (base on
    8 H100s, compiled for them: 3 GB of activations a step that way, 0.3 GB of parameters and gradients after).
    Without `sharding.look_up`, the token embedding's looked-up rows were all-gathered (data = 1 was spared)."""
    from train_fixtures import random_batch, tiny_config

    from wavlink_jax import train_step

    config = tiny_config()
    config.batch_size = 16
    config.mesh = {"data": 2, "fsdp": 4, "tensor": 1}
    mesh = sharding.create_mesh(dict(config.mesh), devices=jax.devices()[:8])
    setup = train_step.build(config, mesh, total_steps=10)
    on_mesh = sharding.batch_sharding(mesh)
    batch = {
        key: jax.ShapeDtypeStruct(np.shape(value), np.asarray(value).dtype, sharding=on_mesh)
        for key, value in random_batch(0, 16).items()
    }
    hlo = train_step.make_train_step(setup).lower(setup.abstract_state, batch).compile().as_text()
    collectives = hlo_traffic.collectives(hlo)
    assert {"all-gather", "reduce-scatter"} <= {c.op for c in collectives}
    # Floating [16 rows, sequence > 1, ...] arrays: activations. (The 16 token ids gathered for the embedding
    # lookup, 1 KB, and the last audio block's single global row per clip are not what this is about.)
    activations = [
        (c.op, array)
        for c in collectives
        for array in re.findall(r"(?:f32|bf16|f16)\[16,(?:[2-9]|\d\d+),[\d,]+\]", c.arrays)
    ]
    assert activations == []


def test_activation_split_leaves_a_mesh_axis_the_rows_already_use():
    """`split_batch` builds its spec with `logical_to_spec`, as for parameters: with a rule sending `mlp` to
    `fsdp`, which the rows already use, the MLP dimension stays whole (a hand-built spec named `fsdp` twice and
    jax refused it), and outside a train step's tracing nothing is constrained."""
    mesh = sharding.create_mesh({"data": 2, "fsdp": 4})
    rules = sharding.rules_dict([("embed", "fsdp"), ("heads", "tensor"), ("mlp", "fsdp"), ("vocab", "tensor")])
    split = jax.jit(lambda x: sharding.split_batch(2 * x, (None, "mlp")))
    x = np.ones((8, 4, 16), np.float32)
    with sharding.batch_split_activations(mesh, rules):
        assert split.lower(x).compile().output_shardings.spec == P(("data", "fsdp"))
    assert sharding.split_batch(x) is x


def test_tree_norm_is_one_reduction_per_big_leaf_and_one_for_the_rest():
    """Six leaves above `SMALL_BLOCK` and ten biases: the compiled norm reduces each big leaf to its row sums and
    everything else in one last reduction, 7 reductions where one per leaf made 16 (on a GPU each is a launch,
    and XLA splits a big leaf's into two). The value is the plain norm's."""
    mesh = sharding.create_mesh({"data": 1}, devices=jax.devices()[:1])
    rows = sharding.SMALL_BLOCK // 128
    shapes = {f"w{i}": (rows, 256) for i in range(6)} | {f"b{i}": (300,) for i in range(10)}
    keys = iter(jax.random.split(jax.random.key(1), len(shapes)))
    tree = {name: jax.random.normal(next(keys), shape) for name, shape in shapes.items()}
    norm = jax.jit(sharding.tree_norm({name: NamedSharding(mesh, P()) for name in shapes}, mesh))
    assert float(norm(tree)) == pytest.approx(float(optax.tree.norm(tree)), rel=1e-6)
    assert norm.lower(tree).compile().as_text().count(" reduce(") == 6 + 1


def test_tree_norm_adds_each_block_once_with_one_all_reduce():
    """`sharding.tree_norm` on a 2 × 2 × 2 mesh, leaves split over one axis, two axes, or none (copies on every
    device): optax's norm of the same arrays, and one scalar all-reduce over all 8 devices in the compiled
    program where optax's norm needs several."""
    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    # No leaf is split over `data`: the devices' sums are equal along it, and the all-reduce still adds them all.
    specs = {"split": P("fsdp"), "two_ways": P(None, ("fsdp", "tensor")), "whole": P()}
    shapes = {"split": (8, 3), "two_ways": (3, 8), "whole": (5,)}
    keys = iter(jax.random.split(jax.random.key(0), 3))
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
    tree = jax.tree.map(
        lambda shape, s: jax.device_put(jax.random.normal(next(keys), shape), s), shapes, shardings,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    norm = jax.jit(sharding.tree_norm(shardings, mesh))
    expected = float(optax.tree.norm(jax.device_get(tree)))
    assert float(norm(tree)) == pytest.approx(expected, rel=1e-6)
    exchanged = hlo_traffic.collectives(norm.lower(tree).compile().as_text())
    assert [(c.op, c.group_size, c.array_bytes) for c in exchanged] == [("all-reduce", 8, 4)]
    assert len(hlo_traffic.collectives(jax.jit(optax.tree.norm).lower(tree).compile().as_text())) > 1
