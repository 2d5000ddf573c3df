"""Checkpoints: round trip with the data position, restore onto another mesh, strict refusal, leftovers."""

import json
import logging
import os
import re

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from wavlink_jax import checkpoint, sharding
from wavlink_jax.convert.common import CheckpointError
from wavlink_jax.data.pipeline import PositionUnreadable


def make_state(mesh):
    params = {"layer": {"kernel": jnp.arange(64.0).reshape(8, 8), "bias": jnp.arange(8.0)}, "scale": jnp.float32(2.5)}
    tx = optax.adamw(1e-3)
    state = {"step": jnp.int32(7), "params": params, "opt_state": tx.init(params), "rng": jax.random.PRNGKey(3)}
    spec = {"layer": {"kernel": P("fsdp", "tensor"), "bias": P("tensor")}, "scale": P()}

    def place(x, path_spec=None):
        return jax.device_put(x, NamedSharding(mesh, path_spec if path_spec is not None else P()))

    state["params"] = jax.tree.map(place, params, spec)
    return state


def abstract_on(state, mesh, spec_fn):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec_fn(x))), state)


def data_iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=1).to_iter_dataset())


def test_round_trip_onto_another_mesh_with_data_position(tmp_path):
    mesh_a = sharding.create_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    mesh_b = sharding.create_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    state = make_state(mesh_a)
    iterator = data_iterator()
    seen = [next(iterator) for _ in range(5)]
    manager = checkpoint.Checkpoints(tmp_path, keep=2, every=1)
    assert manager.save(7, state, iterator)
    expected_next = [next(iterator) for _ in range(3)]
    manager.close()

    manager = checkpoint.Checkpoints(tmp_path, keep=2, every=1)
    assert manager.latest_step() == 7
    fresh = data_iterator()
    abstract = abstract_on(state, mesh_b, lambda x: P("tensor") if x.ndim == 2 and x.shape[0] == 8 else P())
    restored = manager.restore(abstract, fresh)
    assert [next(fresh) for _ in range(3)] == expected_next and len(seen) == 5
    kernel = restored["params"]["layer"]["kernel"]
    assert kernel.sharding.mesh.shape == mesh_b.shape and kernel.sharding.spec == P("tensor")
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    manager.close()


def test_a_save_in_one_process_compiles_nothing(tmp_path):
    """One process holds every replica of the state, so `Checkpoints` saves without orbax's replica-parallel
    slicing (`register_array_handler`), which compiled and ran a slicing program for each replica's part of each
    replicated array (80 programs at the first save of the tiny test model on 8 devices)."""
    state = make_state(sharding.create_mesh({"data": 2, "fsdp": 4, "tensor": 1}))
    compiles = []

    def count(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    manager = checkpoint.Checkpoints(tmp_path, keep=1, every=1)
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        assert manager.save(7, state, data_iterator())
        manager.wait()
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
        manager.close()
    assert not compiles, f"the save compiled {len(compiles)} programs"


def test_keeps_last_k_and_interval(tmp_path):
    mesh = sharding.create_mesh({"data": -1})
    state, iterator = make_state(mesh), data_iterator()
    manager = checkpoint.Checkpoints(tmp_path, keep=2, every=2)
    saved = [step for step in range(1, 8) if manager.save(step, state, iterator)]
    assert manager.save(9, state, iterator, force=True)
    manager.close()
    assert saved == [2, 4, 6]
    assert sorted(int(p) for p in os.listdir(checkpoint.checkpoint_dir(tmp_path)) if p.isdigit()) == [6, 9]


def test_refuses_mismatched_tree_listing_every_key(tmp_path):
    mesh = sharding.create_mesh({"data": -1})
    state = make_state(mesh)
    manager = checkpoint.Checkpoints(tmp_path, keep=1, every=1)
    manager.save(1, state, data_iterator())
    manager.wait()
    other = jax.eval_shape(lambda: state)
    other["params"] = {"layer": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.float32)},
                       "scale": other["params"]["scale"], "new": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with pytest.raises(CheckpointError) as err:
        manager.restore(other, data_iterator())
    message = str(err.value)
    # `missing` = in the model, not in the checkpoint; `unexpected` = in the checkpoint, not in the model.
    assert "the checkpoint does not fit the model of this config" in message  # the model differs, not only AdamW's
    assert "missing keys (1): ['params/new']" in message
    assert "unexpected keys (1): ['params/layer/bias']" in message
    assert "params/layer/kernel: checkpoint (8, 8) vs model (8, 4)" in message
    # Only the optimizer state differs (e.g. optim.freeze changed what trains): said so, with the ways out (it
    # said the checkpoint did not fit the model, and listed the optimizer's keys).
    other = jax.eval_shape(lambda: {**state, "opt_state": optax.adamw(1e-3).init({"scale": state["params"]["scale"]})})
    with pytest.raises(CheckpointError, match=(
            r"the model fits, its optimizer state does not: .*optim\.freeze.*Resume with the settings it was saved "
            rf"with, or start a new workdir with --config\.init_from\.workdir={tmp_path} .*; unexpected keys \(4\): "
            r"\['opt_state/0/mu/layer/bias'")):  # fmt: skip
        manager.restore(other, data_iterator())
    # optim.mode changed to "lora": adapters beside the kernels are new, and the optimizer state changes with them;
    # the same message and way out (it said the checkpoint did not fit the model).
    adapters = {
        "lora_a": jax.ShapeDtypeStruct((8, 2), jnp.float32), "lora_b": jax.ShapeDtypeStruct((2, 8), jnp.float32)
    }
    lora_params = {**state["params"], "layer": {**state["params"]["layer"], **adapters}}
    other = jax.eval_shape(lambda: {**state, "params": lora_params, "opt_state": optax.adamw(1e-3).init(adapters)})
    with pytest.raises(CheckpointError, match=r"the model fits, its optimizer state does not: .*optim\.mode.*"
                                              r"--config\.init_from\.workdir="):
        manager.restore(other, data_iterator())
    # A chain of another length whose extra entry holds no array (optax's EmptyState: as in a checkpoint written
    # with optim.lr_rules before they moved into the learning-rate step): orbax's "tree structures do not match".
    other = jax.eval_shape(lambda: {**state, "opt_state": (*state["opt_state"], optax.EmptyState())})
    with pytest.raises(CheckpointError, match=r"the model fits, its optimizer state does not: .*; opt_state has "
                                              r"3 entries in the checkpoint, 4 in this optimizer"):
        manager.restore(other, data_iterator())
    manager.close()


def test_unfinished_save_is_ignored_and_cleaned(tmp_path):
    mesh = sharding.create_mesh({"data": -1})
    state = make_state(mesh)
    manager = checkpoint.Checkpoints(tmp_path, keep=3, every=1)
    manager.save(1, state, data_iterator())
    manager.close()
    # What a save killed half-way leaves: orbax's temporary directory, never renamed to its step.
    leftover = os.path.join(checkpoint.checkpoint_dir(tmp_path), "2.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(leftover, "state"))
    manager = checkpoint.Checkpoints(tmp_path, keep=3, every=1)
    assert manager.latest_step() == 1
    manager.save(2, state, data_iterator())  # the leftover is deleted before the next save starts
    manager.close()
    assert not os.path.exists(leftover) and manager.latest_step() == 2


def test_read_workdir_state(tmp_path, caplog):
    mesh = sharding.create_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    state = make_state(mesh)
    # One AdamW update with the parameters as gradients: count 1, mu = 0.1 g, nu = 0.001 g² (distinct values).
    state["opt_state"] = optax.adamw(1e-3).update(state["params"], state["opt_state"], state["params"])[1]
    manager = checkpoint.Checkpoints(tmp_path, keep=1, every=1)
    manager.save(3, state, data_iterator())
    manager.close()
    with pytest.raises(CheckpointError, match="config.json"):
        checkpoint.read_workdir_state(tmp_path, items=("params",))
    (tmp_path / "config.json").write_text(json.dumps({"seed": 1}))
    with caplog.at_level(logging.INFO):
        items, config, step = checkpoint.read_workdir_state(tmp_path, items=("params",))
    # A finished checkpoint reads without orbax warnings (it warned of a missing _CHECKPOINT_METADATA, read
    # from the item folder instead of the step folder that holds it).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    params = items["params"]
    assert step == 3
    assert config == {"seed": 1}
    np.testing.assert_array_equal(params["layer"]["kernel"], np.arange(64.0).reshape(8, 8))
    assert isinstance(params["layer"]["kernel"], np.ndarray)

    # Every item of the train state reads, the optimizer state too (orbax refused it: "Type mismatch at key path
    # ('opt_state',)"), as orbax stores optax's chain: a list of per-transformation states, as dicts of fields.
    items, _, _ = checkpoint.read_workdir_state(tmp_path, items=("step", "opt_state", "rng"))
    assert int(items["step"]) == 7
    np.testing.assert_array_equal(items["rng"], np.asarray(state["rng"]))
    adam = items["opt_state"][0]
    assert int(adam["count"]) == 1
    np.testing.assert_allclose(adam["mu"]["layer"]["kernel"], 0.1 * np.arange(64.0).reshape(8, 8), rtol=1e-6)
    np.testing.assert_allclose(adam["nu"]["layer"]["kernel"], 0.001 * np.arange(64.0).reshape(8, 8) ** 2, rtol=1e-5)
    expected = jax.tree.leaves(jax.device_get(state["opt_state"]))
    assert len(jax.tree.leaves(items["opt_state"])) == len(expected)
    for got, want in zip(jax.tree.leaves(items["opt_state"]), expected):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"items \['parms'\] are not in a train state; it holds \['step', 'params'"):
        checkpoint.read_workdir_state(tmp_path, items=("parms",))


def test_read_workdir_state_defaults_to_the_numerically_latest_step(tmp_path):
    # Steps 9 and 10: sorted by name, "9" > "10" and the older step would be read.
    mesh = sharding.create_mesh({"data": -1})
    state = make_state(mesh)
    manager = checkpoint.Checkpoints(tmp_path, keep=2, every=1)
    manager.save(9, state, data_iterator())
    state["params"]["scale"] = state["params"]["scale"] + 1.0
    manager.save(10, state, data_iterator())
    manager.close()
    (tmp_path / "config.json").write_text(json.dumps({"seed": 1}))
    (tmp_path / "checkpoints" / "100").write_text("")  # a stray file named like a step is no step (it was read)
    items, _, step = checkpoint.read_workdir_state(tmp_path, items=("params",))
    assert step == 10 and float(items["params"]["scale"]) == 3.5


def test_a_data_position_of_another_layout_is_damage():
    """What the data iterator raises for a position of another layout, wrapped by orbax, is a damaged step."""
    wrapped = Exception("orbax's words")
    wrapped.__cause__ = PositionUnreadable("not a data position this pipeline saves (KeyError: 'pipeline')")
    assert checkpoint.read_failure(wrapped) == (
        "PositionUnreadable: not a data position this pipeline saves (KeyError: 'pipeline')"
    )


def test_a_step_is_read_with_the_config_it_was_saved_with(tmp_path, caplog):
    """A step keeps the config of the run that saved it (a resumed run with other settings rewrites config.json);
    a step saved without one (before steps kept theirs) is read with config.json; a step's config cut short or
    gone is a damaged step (never read with config.json, which may be a later run's)."""
    state = make_state(sharding.create_mesh({"data": -1}))
    for step, config in ((1, None), (2, {"seed": 2})):
        manager = checkpoint.Checkpoints(tmp_path, keep=3, every=1, config=config)
        manager.save(step, state, data_iterator())
        manager.close()
    (tmp_path / "config.json").write_text(json.dumps({"seed": 3}))
    with caplog.at_level(logging.WARNING):
        configs = [checkpoint.read_workdir_state(tmp_path, step, items=("step",))[1] for step in (1, 2)]
    assert configs == [{"seed": 3}, {"seed": 2}]
    assert [record.getMessage() for record in caplog.records] == []  # orbax: the config item "cannot be restored"
    step_config = tmp_path / "checkpoints" / "2" / "config" / "config.json"
    assert [checkpoint.step_config_file(tmp_path, step) for step in (1, 2)] == [tmp_path / "config.json", step_config]
    damaged = rf"^{re.escape(str(step_config.parents[1]))}: checkpoint step 2 is damaged: "
    step_config.write_text('{"seed"')
    with pytest.raises(CheckpointError, match=damaged + r".*not valid JSON.*other steps: \[1\]"):
        checkpoint.read_workdir_state(tmp_path, items=("step",))
    step_config.unlink()
    with pytest.raises(CheckpointError, match=damaged + r"config/config.json is gone; other steps: \[1\]"):
        checkpoint.read_workdir_state(tmp_path, items=("step",))


def test_init_from_lists_every_mismatch_at_once(tmp_path):
    """A Whisper checkpoint whose parameters, fixed position table and settings all differ from the run's audio
    tower: one error names all three kinds of problem (not one kind per run)."""
    import transformers
    from train_fixtures import tiny_config

    from wavlink_jax import train_step

    config = tiny_config()
    audio = config.model.audio
    transformers.WhisperModel(transformers.WhisperConfig(
        num_mel_bins=audio.n_mels, d_model=audio.width, encoder_layers=audio.num_layers,
        encoder_attention_heads=audio.num_heads, decoder_layers=1, decoder_attention_heads=audio.num_heads,
        decoder_ffn_dim=8, vocab_size=64, max_target_positions=8, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        decoder_start_token_id=0,
        encoder_ffn_dim=audio.mlp_dim + 32, max_source_positions=audio.max_positions - 10, activation_function="relu",
    )).save_pretrained(tmp_path / "whisper")  # fmt: skip
    config.init_from.audio = str(tmp_path / "whisper")
    setup = train_step.build(config, sharding.create_mesh({"data": 1}, devices=jax.devices()[:1]), total_steps=2)
    with pytest.raises(CheckpointError) as err:
        checkpoint.apply_init_from(train_step.init_state(setup, seed=0), setup)
    message = str(err.value)
    assert "audio/encoder/layers/0/fc1/kernel: checkpoint (32, 96) vs model (32, 64)" in message  # parameters
    assert "audio/position_embedding: checkpoint (40, 32) vs model (50, 32)" in message  # buffers
    assert "activation: checkpoint 'relu' vs config 'gelu'" in message  # settings
    assert "mlp_dim: checkpoint 96 vs config 64" in message and "--config.model.audio.activation=relu" in message


@pytest.mark.parametrize("damage", ["array_files", "data_json", "data_gone"])
def test_a_step_damaged_inside_is_named_with_the_way_out(tmp_path, damage):
    """Files that orbax's restore itself reads, not the metadata checked first: array data cut short (tensorstore's
    OUT_OF_RANGE, wrapped by orbax in a bare Exception) or the data iterator's position cut short (a JSON error).
    The trainer's resume names the step and says which to delete (it printed a 150-line traceback, or the bare
    JSON message); readers name it too, or read the state when only the data position is damaged."""
    mesh = sharding.create_mesh({"data": -1})
    state = make_state(mesh)
    big = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)  # not inlined, not compressible
    state["params"]["big"] = jnp.asarray(big)
    manager = checkpoint.Checkpoints(tmp_path, keep=3, every=1)
    for step in (1, 2):
        manager.save(step, state, data_iterator())
    manager.close()
    (tmp_path / "config.json").write_text("{}")
    step_dir = tmp_path / "checkpoints" / "2"
    if damage == "array_files":
        data_files = list((step_dir / "state").glob("ocdbt.process_*/d/*"))
        assert data_files
        for path in data_files:
            path.write_bytes(path.read_bytes()[:100])
        problem = "orbax cannot read it (OUT_OF_RANGE: "
    elif damage == "data_json":
        position = step_dir / "data" / "process_0-of-1.json"
        position.write_bytes(position.read_bytes()[:10])
        problem = "orbax cannot read it (JSONDecodeError: "
    else:  # it said "File ... does not exist." and nothing more
        (step_dir / "data" / "process_0-of-1.json").unlink()
        problem = "data/process_0-of-1.json (a data position) is gone"
    damaged = re.escape(f"{step_dir}: checkpoint step 2 is damaged: {problem}")

    manager = checkpoint.Checkpoints(tmp_path, keep=3, every=1)
    abstract = abstract_on(state, mesh, lambda x: P())
    try:
        way_out = re.escape(f"; other steps: [1]; delete {step_dir} to resume from step 1")
        with pytest.raises(CheckpointError, match=f"^{damaged}.*{way_out}$"):
            manager.restore(abstract, data_iterator())
        with pytest.raises(AttributeError, match="set_state"):  # not damage: raised as it is
            manager.restore(abstract, iter(range(3)), step=1)
    finally:
        manager.close()
    if damage == "array_files":
        way_out = re.escape("; other steps: [1]; read one of them (e.g. step=1, or --step 1 on the command line), "
                            f"or delete {step_dir}")
        with pytest.raises(CheckpointError, match=f"^{damaged}.*{way_out}$"):
            checkpoint.read_workdir_state(tmp_path, items=("params",))
    else:  # readers need no data position
        items, _, step = checkpoint.read_workdir_state(tmp_path, items=("params",))
        assert step == 2 and np.array_equal(items["params"]["big"], big)


def test_a_data_position_saved_with_other_num_workers_names_the_way_out(tmp_path):
    """Resuming with another data.num_workers ended in grain's bare KeyError 'next_index' (2 → 0). It is one
    CheckpointError naming the step and the two ways out, not a damaged step; a checkpoint written before the
    count was recorded is refused the same way, and resumes exactly with its own count."""
    from train_fixtures import tiny_config

    from wavlink_jax.data import pipeline, synthetic

    synthetic.generate(tmp_path / "data", num_train=16, num_eval=1, max_seconds=1.5, captions_per_clip=1)
    data_config = tiny_config(str(tmp_path / "data")).data

    def batches(num_workers):
        data_config.num_workers = num_workers
        return pipeline.make_train_iterator(data_config, global_batch_size=4, seed=0, process_index=0, process_count=1)

    mesh = sharding.create_mesh({"data": -1})
    state, saved = make_state(mesh), batches(2)
    next(saved)
    manager = checkpoint.Checkpoints(tmp_path / "run", keep=1, every=1)
    manager.save(1, state, saved)
    manager.wait()
    expected = next(saved)["waveform"]
    saved.close()
    step_dir = tmp_path / "run" / "checkpoints" / "1"
    refusal = re.escape(
        f"{step_dir}: the data position of step 1 was saved with num_workers=2 (this run has 0); resume with "
        f"--config.data.num_workers=2, or start a new workdir with --config.init_from.workdir={tmp_path / 'run'} to "
        "change it (parameters only; optimizer and step start afresh)"
    )
    abstract = abstract_on(state, mesh, lambda x: P())
    position = step_dir / "data" / "process_0-of-1.json"
    try:
        with pytest.raises(CheckpointError, match=f"^{refusal}$"):
            manager.restore(abstract, batches(0))
        earlier = json.loads(position.read_text())
        del earlier["num_workers"]
        position.write_text(json.dumps(earlier))
        with pytest.raises(CheckpointError, match=f"^{refusal}$"):
            manager.restore(abstract, batches(0))
        resumed = batches(2)
        manager.restore(abstract, resumed)
        np.testing.assert_array_equal(next(resumed)["waveform"], expected)
        resumed.close()
    finally:
        manager.close()
