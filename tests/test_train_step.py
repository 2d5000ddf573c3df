"""The jitted train step: sharded meshes match one device, accumulation matches the full batch, training modes.

All in fp32 with `highest` matmul precision (conftest). Tolerances are stated at each comparison.
"""

import re

import jax
import numpy as np
import pytest
from train_fixtures import random_batch, tiny_config

from wavlink_jax import audio, losses, optim, sharding, train_step
from wavlink_jax.data.pipeline import to_global_batch
from wavlink_jax.models import lora

STEPS = 3


def run_steps(config, mesh, steps=STEPS, batch_size=8, same_batch=False):
    """`steps` steps from the seed-0 state on batches 0, 1, 2, ... (or batch 0 every time): the setup, the final
    state and every step's metrics as floats."""
    setup = train_step.build(config, mesh, total_steps=10)
    state = train_step.init_state(setup, seed=0)
    step_fn = train_step.make_train_step(setup)
    history = []
    for index in range(steps):
        batch = to_global_batch(random_batch(0 if same_batch else index, batch_size), mesh, sharding.BATCH_AXES)
        state, metrics = step_fn(state, batch)
        history.append({key: float(value) for key, value in metrics.items()})
    return setup, jax.device_get(state), history


def assert_metrics_match(history, reference):
    """Every metric of every step agrees with the one-device run. Not just the loss and the parameters: Adam is
    invariant to a constant factor on the gradients, so only grad_norm shows gradients that are 4x too large.
    Tolerance: fp32 sums in a different order (observed: at most 6.8e-7 relative, grad_norm under accumulation;
    2.6e-7 on the sharded meshes)."""
    assert len(history) == len(reference)
    for step, (ours, expected) in enumerate(zip(history, reference)):
        assert ours.keys() == expected.keys()
        for key, value in expected.items():
            assert ours[key] == pytest.approx(value, rel=1e-5), f"step {step}: {key}"


def one_device_mesh():
    return sharding.create_mesh({"data": 1}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def reference():
    return run_steps(tiny_config(), one_device_mesh())


def max_param_diff(a, b):
    flat_a, flat_b = optim.flatten(a["params"]), optim.flatten(b["params"])
    assert flat_a.keys() == flat_b.keys()
    return max(float(np.max(np.abs(flat_a[k] - flat_b[k]))) for k in flat_a)


@pytest.mark.parametrize(
    "axes,impl",
    [((8, 1, 1), "dense"), ((2, 4, 1), "ring"), ((2, 2, 2), "dense")],
    ids=["data8", "data2-fsdp4-ring", "data2-fsdp2-tensor2"],
)
def test_sharded_meshes_match_one_device(reference, axes, impl):
    _, ref_state, ref_history = reference
    mesh = sharding.create_mesh(dict(zip(sharding.MESH_AXES, axes)))
    setup, state, history = run_steps(tiny_config(**{"loss.impl": impl}), mesh)
    assert_metrics_match(history, ref_history)
    # fp32 rounding (observed: parameters 5.5e-7); 3 AdamW steps of lr 1e-3 move each parameter by up to 3e-3.
    assert max_param_diff(state, ref_state) < 5e-6
    # Parameters really are split as the rules say (not silently replicated).
    kernel = setup.shardings["params"]["audio"]["encoder"]["layers"]["0"]["fc1"]["kernel"]
    expected = {"fsdp": "fsdp" if axes[1] > 1 else None, "tensor": "tensor" if axes[2] > 1 else None}
    assert tuple(kernel.spec) == (expected["fsdp"], expected["tensor"])


def test_accumulation_equals_full_batch(reference):
    _, ref_state, ref_history = reference
    mesh = sharding.create_mesh({"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:2])
    _, state, history = run_steps(tiny_config(accum_steps=4), mesh)
    # Same loss over the whole batch (every negative kept), the same gradients and the same update: fp32
    # rounding only (observed: parameters 3e-7).
    assert_metrics_match(history, ref_history)
    assert max_param_diff(state, ref_state) < 5e-6


# Unequal loss weights, so that swapped weights (or scales) show.
WEIGHTED = {"loss.clip_weight": 0.7, "loss.sigmoid_weight": 1.3}


@pytest.fixture(scope="module")
def same_batch():
    """Three steps on batch 0 every time, one device, unequal loss weights (one compile for two tests)."""
    return run_steps(tiny_config(**WEIGHTED), one_device_mesh(), same_batch=True)


def _logsumexp(x, axis):
    top = x.max(axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.exp(x - top).sum(axis=axis))


def numpy_matryoshka_loss(audio, text, dims, clip_scale, sigmoid_scale, bias, clip_weight, sigmoid_weight):
    """The Matryoshka CLIP + sigmoid loss written out in float64: (total, {clip/d, sigmoid/d, loss/d})."""
    parts = {}
    for d in dims:
        a, t = (x[:, :d] / np.linalg.norm(x[:, :d], axis=1, keepdims=True) for x in (audio, text))
        cosine = a @ t.T
        logits = np.exp(clip_scale) * cosine
        diagonal = np.diag(logits)
        audio_to_text = np.mean(_logsumexp(logits, 1) - diagonal)
        text_to_audio = np.mean(_logsumexp(logits, 0) - diagonal)
        parts[f"clip/{d}"] = (audio_to_text + text_to_audio) / 2
        signed = (2 * np.eye(len(cosine)) - 1) * (np.exp(sigmoid_scale) * cosine + bias)
        parts[f"sigmoid/{d}"] = np.mean(np.sum(np.logaddexp(0.0, -signed), axis=1))  # −log σ(z) = log(1 + e^−z)
        parts[f"loss/{d}"] = clip_weight * parts[f"clip/{d}"] + sigmoid_weight * parts[f"sigmoid/{d}"]
    return np.mean([parts[f"loss/{d}"] for d in dims]), parts


def test_first_step_metrics_match_numpy(same_batch):
    """The first step's loss, its parts, the `embed/*` metrics and grad_norm, recomputed from the model's head outputs
    on the same batch and the parameters the step started from (the seed-0 state): the loss in float64 numpy, the
    gradients by `jax.grad` of the model and `losses` (not the train step's code)."""
    setup, _, history = same_batch
    metrics = history[0]
    start = jax.device_get(train_step.init_state(setup, seed=0))
    params = start["params"]
    batch = random_batch(0, 8)
    dims = setup.model_config.matryoshka_dims
    assert len(dims) > 1 and setup.config.loss.clip_weight != setup.config.loss.sigmoid_weight

    def loss(params):
        model = setup.spec.module(params, start["buffers"])
        mel = audio.log_mel_spectrogram(batch["waveform"], setup.model_config.audio.n_mels)
        heads = model.project_audio(mel), model.project_text(batch["input_ids"], batch["attention_mask"])
        value, _ = losses.matryoshka_loss(
            *heads, dims=dims, logit_scale_clip=params["clip_logit_scale"],
            logit_scale_sigmoid=params["sigmoid_logit_scale"], logit_bias=params["sigmoid_logit_bias"],
            clip_weight=setup.config.loss.clip_weight, sigmoid_weight=setup.config.loss.sigmoid_weight,
        )
        return value, heads

    grads, heads = jax.jit(jax.grad(loss, has_aux=True))(params)
    heads = [np.asarray(h, np.float64) for h in heads]
    total, parts = numpy_matryoshka_loss(
        *heads,
        dims,
        *(float(params[k]) for k in ("clip_logit_scale", "sigmoid_logit_scale", "sigmoid_logit_bias")),
        setup.config.loss.clip_weight,
        setup.config.loss.sigmoid_weight,
    )
    # fp32 heads and logits vs float64 (observed: at most 1e-7 relative).
    for key, value in {"loss": total, **parts}.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), key
    for kind in ("clip", "sigmoid"):
        assert metrics[f"{kind}/mean"] == pytest.approx(np.mean([parts[f"{kind}/{d}"] for d in dims]), rel=1e-5)

    norms = [np.linalg.norm(h, axis=1) for h in heads]
    unit = [h / n[:, None] for h, n in zip(heads, norms)]
    expected = {
        "embed/audio_norm": norms[0].mean(),
        "embed/text_norm": norms[1].mean(),
        "embed/positive_cosine": np.sum(unit[0] * unit[1], axis=1).mean(),
        "embed/audio_mean_norm": np.linalg.norm(unit[0].mean(axis=0)),
        "embed/text_mean_norm": np.linalg.norm(unit[1].mean(axis=0)),
    }
    assert not np.allclose(norms, 1.0, atol=0.05)  # the heads' outputs are not unit length: the norms say something
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), key

    # The norm of the trainable parameters' gradients, not of the updates (observed: 4e-8 relative; Adam's first
    # update is about lr·sign(g), so its norm is orders of magnitude off).
    trainable_grads = jax.tree.leaves(optim.partition(grads, setup.trainable)[0])
    grad_norm = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in trainable_grads))
    assert metrics["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)


def test_logged_learning_rate_and_temperatures_are_the_steps(same_batch):
    """`learning_rate` is the schedule at the step taken (a decaying one: its value differs at every step), and
    the temperatures and bias are those of the parameters the step ends with (1/exp of the log-scales)."""
    setup, state, history = same_batch
    rates = [float(setup.schedule(step)) for step in range(len(history))]
    assert len(set(rates)) == len(rates), rates
    assert [metrics["learning_rate"] for metrics in history] == pytest.approx(rates, rel=1e-6)
    params, last = state["params"], history[-1]
    assert last["clip/temperature"] == pytest.approx(1 / np.exp(float(params["clip_logit_scale"])), rel=1e-6)
    assert last["sigmoid/temperature"] == pytest.approx(1 / np.exp(float(params["sigmoid_logit_scale"])), rel=1e-6)
    assert last["sigmoid/bias"] == float(params["sigmoid_logit_bias"])


def test_training_goes_downhill(same_batch):
    """The same batch three times: the loss falls at every step (a sign error in the update would climb)."""
    _, _, history = same_batch
    losses = [metrics["loss"] for metrics in history]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.5 * losses[0], losses  # observed: 16.47, 6.56, 6.10 (0.37x)


def test_accumulation_rejects_indivisible_batch():
    mesh = sharding.create_mesh({"data": 2}, devices=jax.devices()[:2])
    setup = train_step.build(tiny_config(accum_steps=3), mesh, total_steps=10)
    with pytest.raises(ValueError, match="multiple of accum_steps"):
        train_step.make_train_step(setup)
    for batch_size in (0, -8):  # 0 failed inside the data pipeline; -8 passed, and training hung
        with pytest.raises(ValueError, match=rf"config.batch_size {batch_size} must be a positive multiple"):
            train_step.check_batch_size(tiny_config(batch_size=batch_size), mesh)


def changed(before, after):
    flat_before, flat_after = optim.flatten(before["params"]), optim.flatten(after["params"])
    return {k for k in flat_before if not np.array_equal(flat_before[k], flat_after[k])}


HEADS = {"audio/global_token", "audio_projection/kernel", "text_projection/kernel", "clip_logit_scale"}


def test_lora_mode_trains_adapters_and_heads_only_and_merges_for_export():
    config = tiny_config(**{"optim.mode": "lora", "optim.towers": "audio"})
    mesh = one_device_mesh()
    setup = train_step.build(config, mesh, total_steps=10)
    before = jax.device_get(train_step.init_state(setup, seed=0))
    _, after, _ = run_steps(config, mesh, steps=2)
    updated = changed(before, after)
    adapters = {k for k in optim.flatten(after["params"]) if lora.is_adapter(k)}
    assert adapters and all(k.startswith("audio/encoder/layers/") for k in adapters)
    assert {k for k in adapters if k.endswith("lora_b")} <= updated  # B starts at 0 and moves
    assert HEADS <= updated
    tower_updates = {k for k in updated - adapters - HEADS if k.startswith(("audio/", "text/"))}
    assert not tower_updates  # the towers' own weights are frozen
    # Frozen parameters get no optimizer state: only heads + adapters are in Adam's moments.
    mu = optim.flatten(after["opt_state"][1].mu)
    assert set(mu) == {k for k, v in optim.flatten(setup.trainable).items() if v}

    # Export: merged kernels W + (alpha/r)·A·B in a tree shaped exactly like a plain model's.
    merged = lora.merge(after["params"], lora.scale(config.lora.rank, config.lora.alpha))
    plain = jax.eval_shape(lambda: train_step.init_state(train_step.build(tiny_config(), mesh, 10), 0))
    assert jax.tree.structure(merged) == jax.tree.structure(plain["params"])
    base = optim.flatten(after["params"])
    kernel = "audio/encoder/layers/0/attn/query/kernel"
    delta = base[kernel.replace("kernel", "lora_a")] @ base[kernel.replace("kernel", "lora_b")]
    assert np.abs(delta).max() > 0
    np.testing.assert_allclose(optim.flatten(merged)[kernel], base[kernel] + 2.0 * delta, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "mode,towers,audio_body,text_body",
    [("full", "both", True, True), ("full", "audio", True, False), ("projector", "both", False, False)],
)
def test_training_mode_masks(mode, towers, audio_body, text_body):
    config = tiny_config(**{"optim.mode": mode, "optim.towers": towers})
    setup = train_step.build(config, one_device_mesh(), total_steps=10)
    mask = optim.flatten(setup.trainable)
    assert all(mask[k] for k in HEADS)
    assert mask["audio/encoder/layers/0/fc1/kernel"] == audio_body
    assert mask["text/encoder/layers/0/fc1/kernel"] == text_body
    assert mask["text/text_projection/kernel"] == text_body  # CLIP's own projection belongs to the tower


def test_model_config_applies_runtime_fields():
    config = tiny_config(dtype="bfloat16", remat="full")
    model = train_step.model_config(config)
    assert model.audio.dtype == model.text.dtype == "bfloat16"
    assert model.audio.remat == model.text.remat == "full"


@pytest.mark.parametrize("max_scale", [100.0, pytest.param(float("inf"), marks=pytest.mark.slow)])  # inf: test-all
def test_clip_temperature_is_capped_after_each_update(max_scale):
    """CLIP's cap: exp(clip_logit_scale) is clamped to [1, clip_max_scale] after the update; inf disables it."""
    mesh = one_device_mesh()
    setup = train_step.build(tiny_config(**{"loss.clip_max_scale": max_scale}), mesh, total_steps=10)
    state = train_step.init_state(setup, seed=0)
    state["params"]["clip_logit_scale"] = jax.numpy.asarray(8.0)  # exp(8) ≈ 2981; one AdamW step moves it ~1e-3
    step_fn = train_step.make_train_step(setup)
    batch = to_global_batch(random_batch(0, 8), mesh, sharding.BATCH_AXES)
    state, _ = step_fn(state, batch)
    scale = float(state["params"]["clip_logit_scale"])
    if max_scale == float("inf"):
        assert 7.9 < scale < 8.1
    else:
        assert scale == pytest.approx(np.log(100.0), abs=1e-6)
    # The lower bound, with or without a cap: exp(-1) < 1 is raised to a multiplier of exactly 1.
    state["params"] = {**state["params"], "clip_logit_scale": jax.numpy.asarray(-1.0)}
    state, _ = step_fn(state, batch)
    assert float(state["params"]["clip_logit_scale"]) == 0.0


@pytest.mark.parametrize(
    "overrides,message",
    [({"loss.clip_max_scale": 0.5}, r"config\.loss\.clip_max_scale must be ≥ 1 .* got 0\.5"),
     ({"loss.clip_max_scale": float("nan")}, r"config\.loss\.clip_max_scale must be ≥ 1 .* got nan"),
     ({"loss.clip_weight": float("nan")}, r"finite, ≥ 0 .*config\.loss\.clip_weight=nan"),
     ({"loss.sigmoid_weight": -1.0}, r"finite, ≥ 0 .*config\.loss\.sigmoid_weight=-1\.0"),
     ({"loss.sigmoid_weight": float("inf")}, r"finite, ≥ 0 .*config\.loss\.sigmoid_weight=inf"),
     ({"loss.clip_weight": 0.0, "loss.sigmoid_weight": 0.0}, r"not both 0"),
     ({"accum_steps": 0}, r"config\.accum_steps = 0: must be ≥ 1"),
     ({"optim.lr_rules": ((r"^audio_projection/", -1.0),)}, r"lr_rules: rule .*audio_projection.*finite number ≥ 0"),
     ({"optim.lr_rules": ((r"^audio_projection/", float("nan")),)}, r"lr_rules: rule .*nan.*finite number ≥ 0"),
     ({"optim.lr_rules": ((r"^audio_projection/", float("inf")),)}, r"lr_rules: rule .*inf.*finite number ≥ 0"),
     # One rule without the outer tuple, and a rule of three: "too many values to unpack (expected 2)".
     ({"optim.lr_rules": (r"^audio_projection/", 0.5)}, r"each rule is \(pattern, multiplier\), got '\^audio_proj"),
     ({"optim.lr_rules": ((r"^audio/", 0.5, 2),)},
      r"each rule is \(pattern, multiplier\), got \('\^audio/', 0\.5, 2\)"),
     # alpha 0: the adapters never get a gradient; rank 0 failed with a message naming no key.
     ({"optim.mode": "lora", "lora.alpha": 0.0}, r"config\.lora\.alpha = 0\.0: must be a finite number other than 0"),
     ({"optim.mode": "lora", "lora.rank": 0}, r"config\.lora\.rank = 0: must be a whole number ≥ 1"),
     # Above the cap: the first step ran uncapped, then the clamp moved the scalar (even a frozen one).
     ({"model.clip_logit_scale_init": 5.0}, r"clip_logit_scale_init = 5 .*clip_max_scale = 100")],
)
def test_loss_accumulation_and_multiplier_settings_are_refused_by_build(overrides, message):
    """Settings that would train wrongly (a NaN loss, gradient ascent on a parameter, a temperature clamped to
    nonsense) or fail deep inside the step are refused by `build`, before the trainer writes anything."""
    with pytest.raises(ValueError, match=message):
        train_step.build(tiny_config(**overrides), one_device_mesh(), total_steps=10)


@pytest.mark.parametrize("max_scale", [1.0, float("inf")])
def test_clip_max_scale_at_the_ends_of_its_range_is_accepted(max_scale):
    """1 (the temperature multiplier held at exactly 1) and inf (no cap) are allowed: the check is ≥ 1, not > 1."""
    train_step.check_loss_settings(tiny_config(**{"loss.clip_max_scale": max_scale}).loss)


@pytest.mark.parametrize(
    "key,value,nearest",
    [("optim.lr_rules", ((r"^audoi/", 0.1),), "audio/"),
     ("optim.no_decay", ("posiiton_embedding",), "text/position_embedding'")],
)
def test_parameter_patterns_that_match_nothing_are_refused(key, value, nearest):
    """A typo in a regex rule would otherwise silently change nothing; the error shows what it probably meant."""
    with pytest.raises(ValueError, match=rf"config.{key}: pattern .* matches no parameter; the nearest: \['{nearest}"):
        train_step.build(tiny_config(**{key: value}), one_device_mesh(), total_steps=10)


def test_optimizer_settings_out_of_range_are_refused_before_anything_is_built():
    """A negative end fraction would end training in gradient ascent; the trainer's one `error:` line says why."""
    with pytest.raises(ValueError, match=r"config\.optim\.end_lr_fraction = -1\.0: must be in \[0, 1\]"):
        train_step.build(tiny_config(**{"optim.end_lr_fraction": -1.0}), one_device_mesh(), total_steps=10)


@pytest.mark.parametrize(
    "key,value,example",
    [("optim.lr_rules", ((r"^audio/encoder/", 10.0),), "audio/encoder/layers/0/attn/key/kernel"),
     ("optim.no_decay", (r"^text/token_embedding",), "text/token_embedding/embedding")],
)
def test_parameter_patterns_that_match_only_frozen_parameters_are_refused(key, value, example):
    """In projector mode the towers are frozen: a rule on them would silently change nothing."""
    config = tiny_config(**{key: value, "optim.mode": "projector"})
    with pytest.raises(ValueError, match=rf"config.{key}: pattern .* matches only frozen parameters .*'{example}'"):
        train_step.build(config, one_device_mesh(), total_steps=10)
    config.optim.mode = "full"  # the same pattern where those parameters train
    train_step.build(config, one_device_mesh(), total_steps=10)


@pytest.mark.parametrize(
    "shape,names,axis_type,message",
    [((8,), ("data",), "Auto", r"lacks the axes \['fsdp', 'tensor'\].*create_mesh\(\{'data': 8\}\)"),
     ((8, 1, 1), sharding.MESH_AXES, "Explicit", r"of type \['Explicit'\], not Auto")],
)
def test_a_mesh_the_trainer_cannot_use_is_refused_naming_what_it_needs(shape, names, axis_type, message):
    """Library users build their own meshes: one without the fsdp/tensor axes gave `KeyError: 'fsdp'`, one with
    Explicit axes (jax.make_mesh's default) a ShardingTypeError deep inside the step's trace."""
    mesh = jax.make_mesh(shape, names, axis_types=(getattr(jax.sharding.AxisType, axis_type),) * len(names))
    with pytest.raises(ValueError, match=message):
        train_step.build(tiny_config(), mesh, total_steps=10)


def test_float32_evaluation_uses_full_precision_matmuls_whatever_the_default():
    """Evaluation during training embeds as `inference.Embedder` (and so `python -m wavlink_jax.evaluate`) does: a
    float32 run asks for HIGHEST in every matmul and convolution, which GPUs (TF32) and TPUs do not by default, so
    its eval/... metrics are those of the same checkpoint evaluated later (read in the program under the default
    precision: a CPU computes float32 either way)."""
    config = tiny_config(dtype="float32")
    setup = train_step.build(config, one_device_mesh(), total_steps=10)
    embedder = train_step.StateEmbedder(setup, tokenizer=None, batch_size=8)
    params, buffers = setup.abstract_state["params"], setup.abstract_state["buffers"]
    waveforms = jax.ShapeDtypeStruct((8, int(config.data.window_seconds * 16000)), np.float32)
    tokens = {key: jax.ShapeDtypeStruct((8, config.data.max_text_length), np.int32)
              for key in ("input_ids", "attention_mask")}
    with jax.default_matmul_precision("default"):
        programs = [embedder._audio_fn.lower(params, buffers, waveforms).as_text(),
                    embedder._text_fn.lower(params, buffers, tokens).as_text()]
    for program in programs:
        ops = re.findall(r"stablehlo\.(?:dot_general|convolution)[^\n]*", program)
        lower = [op for op in ops if op.count("HIGHEST") != 2]  # one precision per operand
        assert ops and not lower, lower[:2]
    assert train_step.embedding_matmul_precision("bfloat16") is None  # jax's default, as the train step's
