"""Optimiser rules: schedules, weight-decay mask, freezing, lr multipliers, the training-mode presets, LoRA."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from wavlink_jax import optim
from wavlink_jax.models import lora

# The layout of WavLink's parameter tree (wavlink_jax.models.wavlink), in miniature.
PARAMS = {
    "audio": {
        "global_token": jnp.ones((4,)),
        "conv1": {"kernel": jnp.ones((3, 2, 4))},
        "encoder": {
            "layers": {"0": {"attn": {"query": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))},
                                      "key": {"kernel": jnp.ones((4, 4))}, "value": {"kernel": jnp.ones((4, 4))},
                                      "out": {"kernel": jnp.ones((4, 4))}},
                             "fc1": {"kernel": jnp.ones((4, 8))}, "fc2": {"kernel": jnp.ones((8, 4))},
                             "attn_norm": {"scale": jnp.ones((4,))}}},
        },
    },
    "text": {"encoder": {"layers": {"0": {"fc2": {"kernel": jnp.ones((8, 4))}}}},
             "text_projection": {"kernel": jnp.ones((4, 4))}},
    "audio_projection": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))},
    "text_projection": {"kernel": jnp.ones((4, 3))},
    "clip_logit_scale": jnp.zeros(()),
}


HEADS = ["audio/global_token", "audio_projection/kernel", "text_projection/kernel", "clip_logit_scale"]
AUDIO_BODY = ["audio/conv1/kernel", "audio/encoder/layers/0/fc1/kernel"]
TEXT_BODY = ["text/encoder/layers/0/fc2/kernel", "text/text_projection/kernel"]
# Every projection of the attention (query, key, value, out) and of the MLP (fc1, fc2) gets an adapter.
AUDIO_LORA = [
    f"audio/encoder/layers/0/{name}/kernel"
    for name in ("attn/query", "attn/key", "attn/value", "attn/out", "fc1", "fc2")
]


def optim_config(**overrides):
    config = ml_collections.ConfigDict(
        dict(learning_rate=1e-2, schedule="cosine", warmup_fraction=0.1, end_lr_fraction=0.0, b1=0.9, b2=0.98,
             eps=1e-6, weight_decay=0.1, grad_clip_norm=1.0, lr_rules=[], no_decay=[r"position"])
    )
    config.update(overrides)
    return config


def closed_form_lr(step, kind, end_fraction, peak=1e-2, warmup=10, total=100):
    """Linear warm-up from 0 to `peak`, then cosine or linear decay to `end_fraction · peak` at `total`."""
    if step < warmup:
        return peak * step / warmup
    progress = min((step - warmup) / (total - warmup), 1.0)
    shape = (1 + np.cos(np.pi * progress)) / 2 if kind == "cosine" else 1 - progress
    end = end_fraction * peak
    return end + (peak - end) * shape


@pytest.mark.parametrize("end_fraction", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_warmup_then_decay_to_end(kind, end_fraction):
    schedule = optim.learning_rate_schedule(optim_config(schedule=kind, end_lr_fraction=end_fraction), 100)
    assert float(schedule(0)) == 0.0
    # Warm-up, peak, 30% of the decay (where cosine and linear differ), midpoint, end, and past the end.
    for step in (5, 10, 37, 55, 100, 120):
        expected = closed_form_lr(step, kind, end_fraction)
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-9, err_msg=f"step {step}")
    np.testing.assert_allclose(float(schedule(100)), end_fraction * 1e-2, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="schedule"):
        optim.learning_rate_schedule(optim_config(schedule="exp"), 10)


@pytest.mark.parametrize(
    "fraction, total, warmup_steps", [(0.05, 10, 1), (0.05, 30, 2), (0.05, 50, 3), (0.05, 70, 4), (0.29, 50, 15)]
)
def test_warmup_steps_are_rounded_halves_up(fraction, total, warmup_steps):
    """5% of 10, 50 or 70 steps is a half step: Python's round() (halves to even) gave 0, 2 and 4 warm-up steps.
    29% of 50 is 14.499999999999998 in floating point, which rounded to 14."""
    schedule = optim.learning_rate_schedule(optim_config(warmup_fraction=fraction), total)
    assert float(schedule(warmup_steps - 1)) < float(schedule(warmup_steps)) == pytest.approx(1e-2, rel=1e-6)


@pytest.mark.parametrize(
    "key,value,allowed",
    [("learning_rate", 0.0, "(0, inf)"), ("learning_rate", -1e-4, "(0, inf)"), ("warmup_fraction", -0.1, "[0, 1]"),
     ("warmup_fraction", 1.5, "[0, 1]"), ("end_lr_fraction", -1.0, "[0, 1]"), ("end_lr_fraction", 2.0, "[0, 1]"),
     ("weight_decay", -0.1, "[0, inf)"), ("b1", 1.0, "[0, 1)"), ("b2", -0.5, "[0, 1)"), ("b2", 1.0, "[0, 1)"),
     ("eps", 0.0, "(0, inf)"),
     ("grad_clip_norm", -1.0, "[0, inf)"), ("learning_rate", float("nan"), "(0, inf)")],
)
def test_settings_out_of_range_are_refused(key, value, allowed):
    """Such values train, wrongly (end_lr_fraction -1 ends in gradient ascent, a warm-up fraction of 1.5 never
    reaches the peak), so the optimizer refuses them, naming the key, the value and the range."""
    message = rf"config\.optim\.{key} = {re.escape(repr(value))}: must be in {re.escape(allowed)}"
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(optim_config(**{key: value}), PARAMS, 100)
    if key in optim.SCHEDULE_SETTINGS:
        with pytest.raises(ValueError, match=message):
            optim.learning_rate_schedule(optim_config(**{key: value}), 100)


@pytest.mark.parametrize(
    "key,value", [("warmup_fraction", 0.0), ("warmup_fraction", 1.0), ("end_lr_fraction", 1.0), ("weight_decay", 0.0),
                  ("grad_clip_norm", 0.0), ("b1", 0.0)],
)
def test_settings_at_the_closed_ends_of_their_ranges_are_accepted(key, value):
    optim.make_optimizer(optim_config(**{key: value}), PARAMS, 100)


def test_weight_decay_mask_skips_vectors_scalars_and_named():
    mask = optim.flatten(optim.weight_decay_mask(PARAMS, [r"conv1"]))
    assert mask["audio_projection/kernel"] and mask["text/text_projection/kernel"]
    assert not mask["audio_projection/bias"]
    assert not mask["audio/encoder/layers/0/attn_norm/scale"]
    assert not mask["clip_logit_scale"]
    assert not mask["audio/global_token"]
    assert not mask["audio/conv1/kernel"]  # named by a no_decay pattern


def test_freeze_and_partition_roundtrip():
    mask = optim.trainable_mask(PARAMS, [r"^text/", r"conv1"])
    trainable, frozen = optim.partition(PARAMS, mask)
    assert set(optim.flatten(frozen)) == {"audio/conv1/kernel", *TEXT_BODY}
    assert jax.tree.structure(optim.combine(trainable, frozen)) == jax.tree.structure(PARAMS)
    with pytest.raises(ValueError, match="matches no parameter"):
        optim.trainable_mask(PARAMS, [r"^txt/"])


def test_lr_multipliers_first_match_wins_and_scale_updates():
    rules = [(r"^audio/encoder/", 0.1), (r"^audio", 2.0)]
    mults = optim.flatten(optim.lr_multipliers(PARAMS, rules))
    assert mults["audio/encoder/layers/0/fc1/kernel"] == 0.1
    assert mults["audio_projection/kernel"] == 2.0 and mults["text_projection/kernel"] == 1.0
    # The update of a multiplied parameter is exactly the multiple of the plain update (no clipping/decay).
    config = optim_config(schedule="constant", warmup_fraction=0.0, weight_decay=0.0, grad_clip_norm=0.0)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)
    plain_tx, _ = optim.make_optimizer(config, PARAMS, 10)
    config.lr_rules = rules
    scaled_tx, _ = optim.make_optimizer(config, PARAMS, 10)
    plain = optim.flatten(plain_tx.update(grads, plain_tx.init(PARAMS), PARAMS)[0])
    scaled = optim.flatten(scaled_tx.update(grads, scaled_tx.init(PARAMS), PARAMS)[0])
    for path, mult in mults.items():
        np.testing.assert_allclose(scaled[path], mult * plain[path], rtol=1e-6)


def test_lr_multiplier_zero_is_accepted_and_freezes_the_parameter_exactly():
    """0 = "not updated" (while the parameter keeps its optimizer state): no update at all, even with weight
    decay, over several steps."""
    config = optim_config(schedule="constant", warmup_fraction=0.0, lr_rules=[(r"^audio_projection/kernel$", 0.0)])
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)
    tx, _ = optim.make_optimizer(config, PARAMS, 10)
    state, params = tx.init(PARAMS), PARAMS
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        assert not np.any(optim.flatten(updates)["audio_projection/kernel"])
        assert np.any(optim.flatten(updates)["audio_projection/bias"])  # the rule's neighbour still trains
    np.testing.assert_array_equal(params["audio_projection"]["kernel"], PARAMS["audio_projection"]["kernel"])


def test_a_rule_matching_frozen_and_trainable_parameters_is_accepted():
    """README's `("^audio/", 0.5)` in projector mode: the audio tower's body is frozen, its global token trains, so
    the rule changes something and is accepted (only a rule that matches frozen parameters alone is refused)."""
    mask = optim.flatten(optim.trainable_mask(PARAMS, optim.training_mode("projector", "both").freeze))
    paths, trainable = list(mask), {path for path, trains in mask.items() if trains}
    hits = optim.matching(paths, [r"^audio/"], "config.optim.lr_rules", trainable)
    assert "audio/global_token" in hits & trainable and set(AUDIO_BODY) <= hits - trainable
    with pytest.raises(ValueError, match="matches only frozen parameters"):
        optim.matching(paths, [r"^audio/encoder/"], "config.optim.lr_rules", trainable)


def test_adamw_matches_optax_adamw_with_mask_and_clipping():
    config = optim_config(schedule="constant", warmup_fraction=0.0)
    tx, _ = optim.make_optimizer(config, PARAMS, 10)
    reference = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(1e-2, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1,
                    mask=optim.weight_decay_mask(PARAMS, config.no_decay)),
    )
    grads = jax.tree.map(lambda p: jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape) + 1.0, PARAMS)
    ours, ref = tx.init(PARAMS), reference.init(PARAMS)
    params_ours = params_ref = PARAMS
    for _ in range(3):
        update, ours = tx.update(grads, ours, params_ours)
        params_ours = optax.apply_updates(params_ours, update)
        update, ref = reference.update(grads, ref, params_ref)
        params_ref = optax.apply_updates(params_ref, update)
    for a, b in zip(jax.tree.leaves(params_ours), jax.tree.leaves(params_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_adamw_matches_optax_adamw_over_changing_gradients():
    """Gradients that change direction and size from step to step, clipped at 0.5 on some steps and not on others:
    with one gradient repeated, as above, Adam's bias-corrected moments are that gradient whatever b1 and b2 (b1 and
    b2 swapped passed), and every other test clips at 1 (a make_optimizer clipping at 1 whatever grad_clip_norm
    says passed)."""
    config = optim_config(schedule="constant", warmup_fraction=0.0, grad_clip_norm=0.5)
    tx, _ = optim.make_optimizer(config, PARAMS, 10)
    reference = optax.chain(
        optax.clip_by_global_norm(0.5),
        optax.adamw(1e-2, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1,
                    mask=optim.weight_decay_mask(PARAMS, config.no_decay)),
    )
    ours, ref = tx.init(PARAMS), reference.init(PARAMS)
    params_ours = params_ref = PARAMS
    norms = []
    for step, size in enumerate([3.0, 0.01, 1.0, 0.02]):
        grads = jax.tree.map(lambda p: size * np.sin(np.arange(p.size, dtype=np.float32) * (step + 1)).reshape(p.shape),
                             PARAMS)
        norms.append(float(optax.tree.norm(grads)))
        update, ours = tx.update(grads, ours, params_ours)
        params_ours = optax.apply_updates(params_ours, update)
        update, ref = reference.update(grads, ref, params_ref)
        params_ref = optax.apply_updates(params_ref, update)
    assert min(norms) < 0.5 < max(norms), norms  # clipped on some steps only
    for a, b in zip(jax.tree.leaves(params_ours), jax.tree.leaves(params_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_the_optimizer_state_keeps_its_keys_whatever_the_clipping_and_lr_rules():
    """A checkpoint's opt_state keys do not depend on `grad_clip_norm` (0 dropped the clip's place in the chain,
    so a run resumed with clipping turned off was refused for 'missing keys' of the model) or on `lr_rules`;
    with clipping off the updates are optax's AdamW without it."""

    def keys(**overrides):
        tx, _ = optim.make_optimizer(optim_config(**overrides), PARAMS, 10)
        state = tx.init(PARAMS)
        # The structure too: an entry without arrays (optax's EmptyState) is invisible among the leaves, but orbax
        # stores the chain as a list and refuses a restore into a list of another length.
        paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(state)]
        return str(jax.tree.structure(state)), paths

    assert keys() == keys(grad_clip_norm=0.0) == keys(lr_rules=[(r"^audio/", 0.1)])
    config = optim_config(schedule="constant", warmup_fraction=0.0, grad_clip_norm=0.0)
    tx, _ = optim.make_optimizer(config, PARAMS, 10)
    reference = optax.adamw(1e-2, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1,
                            mask=optim.weight_decay_mask(PARAMS, config.no_decay))
    grads = jax.tree.map(lambda p: 1e3 * jnp.ones_like(p), PARAMS)  # far above any clipping norm
    ours = tx.update(grads, tx.init(PARAMS), PARAMS)[0]
    theirs = reference.update(grads, reference.init(PARAMS), PARAMS)[0]
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 3.0])  # not 1: a clip that forgets to multiply by max_norm would pass
@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_clipping_is_optaxs_with_its_state_whatever_the_norm(scale, max_norm):
    """`optim.clip_by_global_norm` with optax's norm is `optax.clip_by_global_norm`, value for value, below and
    above the threshold, with the same (empty) state, so checkpoints restore as before; the norm it is given
    is the one it uses."""
    grads = jax.tree.map(lambda p: scale * jnp.sin(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape), PARAMS)
    ours, theirs = optim.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    assert jax.tree.structure(ours.init(PARAMS)) == jax.tree.structure(theirs.init(PARAMS))
    got, expected = ours.update(grads, ours.init(PARAMS))[0], theirs.update(grads, theirs.init(PARAMS))[0]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    doubled = optim.clip_by_global_norm(max_norm, lambda tree: 2 * optax.tree.norm(tree))
    halved = doubled.update(grads, doubled.init(PARAMS))[0]
    if scale > 1:  # clipped to a norm of max_norm against a norm counted twice: a norm of max_norm/2
        assert float(optax.tree.norm(halved)) == pytest.approx(max_norm / 2, rel=1e-6)


@pytest.mark.parametrize(
    "mode,towers,trains,frozen,lora_on",
    [
        ("full", "both", HEADS + AUDIO_BODY + TEXT_BODY, [], []),
        ("full", "audio", HEADS + AUDIO_BODY, TEXT_BODY, []),
        ("projector", "both", HEADS, AUDIO_BODY + TEXT_BODY, []),
        ("projector", "audio", HEADS, AUDIO_BODY + TEXT_BODY, []),
        ("lora", "audio", HEADS, AUDIO_BODY + TEXT_BODY, AUDIO_LORA),
        ("lora", "both", HEADS, AUDIO_BODY + TEXT_BODY, AUDIO_LORA + ["text/encoder/layers/0/fc2/kernel"]),
    ],
)
def test_training_mode_presets(mode, towers, trains, frozen, lora_on):
    preset = optim.training_mode(mode, towers)
    mask = optim.flatten(optim.trainable_mask(PARAMS, preset.freeze))
    assert all(mask[p] for p in trains), {p: mask[p] for p in trains}
    assert not any(mask[p] for p in frozen), {p: mask[p] for p in frozen}
    targets = lora.targets(PARAMS, preset.lora) if preset.lora else []
    assert targets == sorted(lora_on)


def test_lora_merge_starts_at_base_and_adds_scaled_product():
    preset = optim.training_mode("lora", "both")
    targets = lora.targets(PARAMS, preset.lora)
    adapters = lora.init(jax.random.key(0), PARAMS, targets, rank=2)
    flat = {**optim.flatten(PARAMS), **optim.flatten(adapters)}
    assert flat["audio/encoder/layers/0/attn/query/lora_a"].shape == (4, 2)
    assert flat["audio/encoder/layers/0/attn/query/lora_b"].shape == (2, 4)
    # Adapters train even though the preset freezes the tower bodies.
    mask = optim.flatten(optim.trainable_mask(optim.unflatten(flat), preset.freeze))
    assert all(mask[path] for path in flat if lora.is_adapter(path))
    merged = lora.merge(optim.unflatten(flat), scale=2.0)
    assert jax.tree.structure(merged) == jax.tree.structure(PARAMS)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(PARAMS)):
        np.testing.assert_array_equal(a, b)  # B = 0 at init
    flat["audio/encoder/layers/0/attn/query/lora_b"] = jnp.ones((2, 4))
    merged = optim.flatten(lora.merge(optim.unflatten(flat), scale=2.0))
    expected = 1.0 + 2.0 * flat["audio/encoder/layers/0/attn/query/lora_a"].sum(axis=1, keepdims=True)
    np.testing.assert_allclose(
        merged["audio/encoder/layers/0/attn/query/kernel"], np.broadcast_to(expected, (4, 4)), rtol=1e-6
    )
    kernel_axes = {"audio": {"encoder": {"layers": {"0": {"attn": {"query": {"kernel": ("embed", "heads")}}}}}}}
    query = optim.unflatten({k: v for k, v in optim.flatten(adapters).items() if "query" in k})
    axes = optim.flatten(lora.logical_axes(kernel_axes, query))
    assert axes["audio/encoder/layers/0/attn/query/lora_a"] == ("embed", None)
    assert axes["audio/encoder/layers/0/attn/query/lora_b"] == (None, "heads")
    with pytest.raises(ValueError, match="2-D Linear kernels"):
        lora.targets(PARAMS, [r"conv1/kernel"])


def test_lora_a_init_is_fan_in_scaled_and_differs_per_adapter():
    # A ~ N(0, 1/fan_in): without the scaling A @ B would grow with the layer width.
    fan_in = 256
    params = {"one": {"kernel": jnp.zeros((fan_in, 8))}, "two": {"kernel": jnp.zeros((fan_in, 8))}}
    adapters = lora.init(jax.random.key(0), params, ["one/kernel", "two/kernel"], rank=16)
    a_one, a_two = adapters["one"]["lora_a"], adapters["two"]["lora_a"]
    assert abs(float(jnp.std(a_one)) * np.sqrt(fan_in) - 1.0) < 0.2
    assert not np.allclose(a_one, a_two)  # each adapter gets its own random draw
