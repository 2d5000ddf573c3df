"""The train state, born sharded, and the one jitted train step (importable: benchmarks time this exact step).

    setup = train_step.build(config, mesh, total_steps)      # shapes, shardings, optimizer; allocates nothing
    state = train_step.init_state(setup, seed)                # parameters + optimizer state, created sharded
    step = train_step.make_train_step(setup)                  # jit, donated state
    state, metrics = step(state, batch)                       # batch: global arrays (see `batch_arrays`)

The state is a pytree of plain nested dicts (string keys, as orbax stores them):

    {"step": int32, "params": {...}, "buffers": {...}, "opt_state": optax state, "rng": uint32[2]}

`params` are the model's `nnx.Param`s, plus LoRA adapters beside their kernels in LoRA mode
(`wavlink_jax.models.lora`); `buffers` the other variables (Whisper's fixed position table); `opt_state`
covers only the trainable parameters (frozen ones get neither gradients nor optimizer memory); `rng` is the
run's base key (the model is deterministic; a stochastic layer would draw `fold_in(rng, step)`).

The step computes the log-mel spectrogram from the waveform batch on the accelerator, both towers, and the
Matryoshka CLIP + sigmoid losses over the global batch. With `accum_steps = k > 1` the loss is still taken
over the whole global batch (every negative kept) while only one micro-batch of activations is alive at a
time: embed all micro-batches without gradients, differentiate the loss with respect to the embeddings, then
re-run each micro-batch and pull its embedding gradient back through the towers (a VJP), summing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from wavlink_jax import audio, losses, optim, sharding
from wavlink_jax.evaluate import check_eval_batch_size, embed_in_batches
from wavlink_jax.models import layers, lora
from wavlink_jax.models.wavlink import WavLink, WavLinkConfig

Tree = dict
BATCH_KEYS = ("waveform", "input_ids", "attention_mask")
# Tower fields set from the config's top-level `dtype`, `remat` and `attention_implementation` keys.
TOWER_RUNTIME_FIELDS = ("dtype", "remat", "attention_implementation")


def model_config(config: ml_collections.ConfigDict) -> WavLinkConfig:
    """`config.model` with the top-level compute dtype / remat policy / attention implementation in both towers
    (the config's attention `"auto"` is the towers' `None`: the fastest that applies)."""
    fields = config.model.to_dict()
    runtime = {name: config[name] for name in TOWER_RUNTIME_FIELDS}
    if runtime["attention_implementation"] == "auto":
        runtime["attention_implementation"] = None
    for tower in ("audio", "text"):
        fields[tower] = {**fields[tower], **runtime}
    return WavLinkConfig.from_dict(fields)


def to_tree(state: nnx.State) -> Tree:
    """An nnx.State → nested dict with string keys (layer indices become "0", "1", ...)."""
    flat = {tuple(str(key) for key in path): variable.get_value() for path, variable in nnx.to_flat_state(state)}
    return optim.unflatten({"/".join(path): value for path, value in flat.items()})


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The static half of the model: turns parameter trees back into a `WavLink` module (inside jit)."""

    graphdef: Any
    param_template: nnx.State
    buffer_template: nnx.State
    lora_scale: float

    def module(self, params: Tree, buffers: Tree) -> WavLink:
        """The WavLink module running with `params` (LoRA adapters merged into their kernels) and `buffers`."""
        param_state = jax.tree.map(lambda x: x, self.param_template)
        nnx.replace_by_pure_dict(param_state, lora.merge(params, self.lora_scale))
        buffer_state = jax.tree.map(lambda x: x, self.buffer_template)
        if buffers:
            nnx.replace_by_pure_dict(buffer_state, buffers)
        return nnx.merge(self.graphdef, param_state, buffer_state)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything static the train step needs, derived from the config (nothing allocated on devices)."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    model_config: WavLinkConfig
    spec: ModelSpec
    trainable: Tree  # bools over state["params"]
    lora_targets: tuple[str, ...]
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    total_steps: int
    abstract_state: Any  # ShapeDtypeStructs carrying their shardings: orbax restores onto these
    shardings: Any  # NamedShardings, same tree as the state
    norm: Callable[[Tree], jax.Array]  # L2 norm of a tree laid out as the trainable parameters (sharding.tree_norm)
    # Dimensions of params/buffers ("params/<path>", "buffers/<path>") that their rule shards but the mesh does not
    # divide: kept whole there (see `unsharded_warning`).
    unsharded: tuple[sharding.Unsharded, ...] = ()


def _init_fn(setup: TrainSetup) -> Callable[[jax.Array], dict]:
    def init(rng: jax.Array) -> dict:
        model_rng, lora_rng, state_rng = jax.random.split(rng, 3)
        model = WavLink(setup.model_config, rngs=nnx.Rngs(params=model_rng))
        _, params, buffers = nnx.split(model, nnx.Param, ...)
        params = to_tree(params)
        if setup.lora_targets:
            params = optim.combine(lora.init(lora_rng, params, setup.lora_targets, setup.config.lora.rank), params)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "buffers": to_tree(buffers),
            "opt_state": setup.tx.init(optim.partition(params, setup.trainable)[0]),
            "rng": state_rng,
        }

    return init


# Keys that name one of a few choices, and the choices: checked before anything is traced (an unknown name would
# otherwise surface deep inside jit's trace of the train step). No float16 compute for training: this trainer has no
# loss scaling, without which float16 gradients underflow, and a CPU cannot run its attention; bfloat16 has
# float32's range.
CONFIG_CHOICES: dict[str, tuple] = {
    "dtype": ("float32", "bfloat16"),
    "remat": ("none", *layers.REMAT_POLICIES),
    "attention_implementation": ("auto", *(name for name in layers.ATTENTION_IMPLEMENTATIONS if name)),
    "loss.impl": losses.IMPLEMENTATIONS,
    "optim.schedule": optim.SCHEDULES,
    "optim.mode": optim.MODES,
    "optim.towers": optim.TOWERS,
    "model.audio.activation": tuple(layers.ACTIVATIONS),
    "model.text.activation": tuple(layers.ACTIVATIONS),
}


def check_choices(config: ml_collections.ConfigDict) -> None:
    """A ValueError naming the first key of `CONFIG_CHOICES` whose value is not one of its choices."""
    for key, allowed in CONFIG_CHOICES.items():
        value = config
        for name in key.split("."):
            value = value[name]
        if value not in allowed:
            raise ValueError(f"config.{key} = {value!r} is not one of {allowed}")


def build(config: ml_collections.ConfigDict, mesh: Mesh, total_steps: int) -> TrainSetup:
    """Shapes, logical-axis shardings, trainable mask and optimizer of the config's model on `mesh` (one with the
    axes `sharding.MESH_AXES`, as `sharding.create_mesh` builds)."""
    sharding.check_mesh(mesh)
    check_choices(config)
    check_loss_settings(config.loss)
    accum_steps(config)
    mconfig = model_config(config)
    mconfig.audio.check_window(config.data.window_seconds, "config.data.window_seconds")
    abstract_model = nnx.eval_shape(lambda: WavLink(mconfig, rngs=nnx.Rngs(0)))
    graphdef, param_template, buffer_template = nnx.split(abstract_model, nnx.Param, ...)
    param_shapes = to_tree(param_template)

    check_scale_init(mconfig, config.loss.clip_max_scale)
    preset = optim.training_mode(config.optim.mode, config.optim.towers)
    if preset.lora:
        check_lora_settings(config.lora)
    targets = tuple(lora.targets(param_shapes, preset.lora)) if preset.lora else ()
    adapters = jax.eval_shape(lambda key: lora.init(key, param_shapes, targets, config.lora.rank), jax.random.key(0))
    all_params = optim.combine(adapters, param_shapes)
    trainable = optim.trainable_mask(all_params, tuple(preset.freeze) + tuple(config.optim.freeze))
    trainable_shapes = optim.partition(all_params, trainable)[0]
    if not trainable_shapes:
        raise ValueError("nothing to train: config.optim.freeze and the training mode freeze every parameter")
    # A pattern that matches no parameter is refused (likely a typo), and so is one that matches only frozen ones.
    flat_trainable = optim.flatten(trainable)
    paths, trainable_paths = list(flat_trainable), {path for path, trains in flat_trainable.items() if trains}
    lr_patterns = [pattern for pattern, _ in optim.lr_rules(config.optim.lr_rules)]
    optim.matching(paths, lr_patterns, "config.optim.lr_rules", trainable_paths)
    optim.matching(paths, config.optim.no_decay, "config.optim.no_decay", trainable_paths)

    rules = sharding.rules_dict(config.sharding_rules)
    axes = sharding.logical_axes_tree(param_template)
    if targets:
        axes = optim.combine(lora.logical_axes(axes, adapters), axes)
    unsharded_params: list[sharding.Unsharded] = []
    unsharded_buffers: list[sharding.Unsharded] = []
    param_shardings = sharding.tree_shardings(axes, all_params, rules, mesh, unsharded_params)
    buffer_shapes = to_tree(buffer_template)
    buffer_shardings = sharding.tree_shardings(
        sharding.logical_axes_tree(buffer_template), buffer_shapes, rules, mesh, unsharded_buffers
    )
    trainable_shardings = optim.partition(param_shardings, trainable)[0]
    norm = sharding.tree_norm(trainable_shardings, mesh)
    tx, schedule = optim.make_optimizer(config.optim, trainable_shapes, total_steps, norm)
    abstract = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": all_params,
        "buffers": buffer_shapes,
        "opt_state": jax.eval_shape(tx.init, trainable_shapes),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    replicated = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract["opt_state"], trainable_shardings, transform_non_params=lambda _: replicated
    )
    shardings = {
        "step": replicated,
        "params": param_shardings,
        "buffers": buffer_shardings,
        "opt_state": opt_shardings,
        "rng": replicated,
    }
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    return TrainSetup(
        config=config,
        mesh=mesh,
        model_config=mconfig,
        spec=ModelSpec(graphdef, param_template, buffer_template, lora.scale(config.lora.rank, config.lora.alpha)),
        trainable=trainable,
        lora_targets=targets,
        tx=tx,
        schedule=schedule,
        total_steps=total_steps,
        abstract_state=abstract,
        shardings=shardings,
        norm=norm,
        unsharded=tuple(
            entry._replace(path=f"{kind}/{entry.path}")
            for kind, entries in (("params", unsharded_params), ("buffers", unsharded_buffers))
            for entry in entries
        ),
    )


def _bytes(count: float) -> str:
    """`count` bytes in KiB, MiB or GiB, for messages."""
    for unit in ("KiB", "MiB"):
        count /= 1024
        if count < 1024:
            return f"{count:.1f} {unit}"
    return f"{count / 1024:.1f} GiB"


def unsharded_warning(setup: TrainSetup) -> str | None:
    """A `warning: ...` about the train state's arrays that config.sharding_rules shard along a dimension the mesh
    does not divide (None when there are none): each is kept whole along it on every device of those mesh axes,
    and so are its optimizer moments (e.g. nearly every kernel of a width-512 model on fsdp=24: ~24× the memory).
    Says how many, the bytes per device they take now and would take sharded, the largest examples, and the mesh
    sizes that would divide them."""
    if not setup.unsharded:
        return None
    mesh, state = setup.mesh, setup.abstract_state
    lost_ways: dict[str, int] = {}
    for entry in setup.unsharded:
        lost_ways[entry.path] = lost_ways.get(entry.path, 1) * math.prod(mesh.shape[a] for a in entry.mesh_axes)
    # Every array of the state with the parameter or buffer it belongs to (an optimizer moment: its parameter).
    arrays = [
        (f"{kind}/{path}", leaf) for kind in ("params", "buffers") for path, leaf in optim.flatten(state[kind]).items()
    ]
    param_paths = optim.unflatten({path: f"params/{path}" for path in optim.flatten(state["params"])})
    moment_paths = optax.tree_map_params(
        setup.tx, lambda _, path: path, state["opt_state"], optim.partition(param_paths, setup.trainable)[0],
        transform_non_params=lambda _: None,
    )
    structure = jax.tree.structure(moment_paths, is_leaf=lambda x: x is None)
    arrays += zip(structure.flatten_up_to(moment_paths), structure.flatten_up_to(state["opt_state"]))

    def per_device(leaf: jax.ShapeDtypeStruct) -> int:
        return math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize

    affected = [(per_device(leaf), lost_ways[source]) for source, leaf in arrays if source in lost_ways]
    now, sharded = sum(size for size, _ in affected), sum(size / ways for size, ways in affected)
    largest = sorted(setup.unsharded, key=lambda entry: -math.prod(entry.shape))[:3]
    examples = "; ".join(
        f"{entry.path} {entry.shape}: dimension {entry.dim} ({entry.logical}) of {entry.shape[entry.dim]} over "
        + "×".join(f"{axis}={mesh.shape[axis]}" for axis in entry.mesh_axes)
        for entry in largest
    )
    divisions = []
    for axes, sizes in sharding.dividing_sizes(setup.unsharded, mesh).items():
        name = "×".join(axes)
        divisions.append(
            f"{name} = {' or '.join(map(str, sizes))} would divide every one of them" if sizes
            else f"no {name} size above 1 divides them all"
        )
    moments = len(affected) - len(lost_ways)
    return (
        f"warning: {len(lost_ways)} parameter/buffer arrays (and {moments} optimizer-state arrays of theirs) are kept "
        f"whole on every device along a dimension that config.sharding_rules shard, because the mesh "
        f"{dict(mesh.shape)} does not divide it: they take {_bytes(now)} per device instead of about "
        f"{_bytes(sharded)}. E.g. {examples}. On {mesh.size} devices, {'; '.join(divisions)}. Change config.mesh "
        "or the model's widths so that they divide, or map the logical axis to None in config.sharding_rules to "
        "replicate it on purpose."
    )


def init_state(setup: TrainSetup, seed: int) -> dict:
    """Fresh parameters and optimizer state, each array created directly in its sharding."""
    return jax.jit(_init_fn(setup), out_shardings=setup.shardings)(jax.random.PRNGKey(seed))


def _log_mel_fn(setup: TrainSetup) -> Callable[[jax.Array], jax.Array]:
    """Waveform batch → log-mel, each device transforming its own rows (`sharding.per_device_rows`)."""
    n_mels = setup.model_config.audio.n_mels
    return sharding.per_device_rows(lambda waveform: audio.log_mel_spectrogram(waveform, n_mels), setup.mesh)


def project_fn(setup: TrainSetup) -> Callable[[Tree, Tree, dict], tuple[jax.Array, jax.Array]]:
    """(params, buffers, batch) → the heads' full-size (audio, text) outputs before normalisation; log-mel
    computed here."""
    log_mel = _log_mel_fn(setup)

    def project(params: Tree, buffers: Tree, batch: dict) -> tuple[jax.Array, jax.Array]:
        model = setup.spec.module(params, buffers)
        mel = log_mel(batch["waveform"])
        with sharding.batch_split_activations(setup.mesh, sharding.rules_dict(setup.config.sharding_rules)):
            return model(mel, batch["input_ids"], batch["attention_mask"])

    return project


def loss_fn(setup: TrainSetup) -> Callable[[Tree, jax.Array, jax.Array], tuple[jax.Array, dict]]:
    """(params, audio head outputs, text head outputs) → (Matryoshka CLIP + sigmoid loss over the global batch,
    per-level/kind parts); each level normalises its prefix."""
    loss_config = setup.config.loss

    def loss(params: Tree, audio_head: jax.Array, text_head: jax.Array) -> tuple[jax.Array, dict]:
        return losses.matryoshka_loss(
            audio_head,
            text_head,
            dims=setup.model_config.matryoshka_dims,
            logit_scale_clip=params["clip_logit_scale"],
            logit_scale_sigmoid=params["sigmoid_logit_scale"],
            logit_bias=params["sigmoid_logit_bias"],
            clip_weight=loss_config.clip_weight,
            sigmoid_weight=loss_config.sigmoid_weight,
            mesh=setup.mesh,
            impl=loss_config.impl,
            batch_axes=sharding.BATCH_AXES,
        )

    return loss


def _micro_batches(tree: Any, k: int, mesh: Mesh) -> Any:
    """(N, ...) → (k, N/k, ...) where micro-batch i holds rows i, i+k, i+2k, ...: each device's rows stay on
    it (every device owns N/k/devices rows of every micro-batch)."""
    spec = NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))

    def split(x):
        x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, spec)

    return jax.tree.map(split, tree)


def _unmicro(x: jax.Array) -> jax.Array:
    """Inverse of `_micro_batches` for one array: (k, N/k, ...) → (N, ...) in the original row order."""
    return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])


def gradients(setup: TrainSetup) -> Callable:
    """(trainable, frozen, buffers, batch) → (loss, its parts, audio and text head outputs, gradients wrt
    `trainable`), over the whole batch at once (`accum_steps = 1`) or micro-batch by micro-batch with every
    negative kept."""
    k = accum_steps(setup.config)
    project, loss = project_fn(setup), loss_fn(setup)

    def full_batch(trainable, frozen, buffers, batch):
        def objective(trainable):
            params = optim.combine(trainable, frozen)
            audio_head, text_head = project(params, buffers, batch)
            value, parts = loss(params, audio_head, text_head)
            return value, (parts, audio_head, text_head)

        (value, (parts, audio_head, text_head)), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        return value, parts, audio_head, text_head, grads

    def accumulated(trainable, frozen, buffers, batch):
        params = optim.combine(trainable, frozen)
        micro = _micro_batches(batch, k, setup.mesh)
        audio_micro, text_micro = jax.lax.map(lambda mb: project(params, buffers, mb), micro)
        audio_head, text_head = _unmicro(audio_micro), _unmicro(text_micro)

        def head(trainable, audio_head, text_head):
            return loss(optim.combine(trainable, frozen), audio_head, text_head)

        (value, parts), (grads, d_audio, d_text) = jax.value_and_grad(head, argnums=(0, 1, 2), has_aux=True)(
            trainable, audio_head, text_head
        )
        cotangents = _micro_batches((d_audio, d_text), k, setup.mesh)

        def pull_back(total, inputs):
            mb, (d_audio_mb, d_text_mb) = inputs
            _, vjp = jax.vjp(lambda t: project(optim.combine(t, frozen), buffers, mb), trainable)
            return jax.tree.map(jnp.add, total, vjp((d_audio_mb, d_text_mb))[0]), None

        grads, _ = jax.lax.scan(pull_back, grads, (micro, cotangents))
        return value, parts, audio_head, text_head, grads

    return full_batch if k == 1 else accumulated


def accum_steps(config: ml_collections.ConfigDict) -> int:
    """`config.accum_steps` (micro-batches per step), refused unless ≥ 1."""
    if config.accum_steps < 1:
        raise ValueError(f"config.accum_steps = {config.accum_steps}: must be ≥ 1 (micro-batches per step)")
    return int(config.accum_steps)


def check_loss_settings(loss: ml_collections.ConfigDict) -> None:
    """`config.loss`'s weights (see `losses.check_loss_weights`) and CLIP's temperature cap, checked before
    anything is built: a cap below 1 (or NaN) would clamp the temperature to nonsense."""
    losses.check_loss_weights(loss.clip_weight, loss.sigmoid_weight, where="config.loss.")
    if not loss.clip_max_scale >= 1.0:
        raise ValueError(
            f"config.loss.clip_max_scale must be ≥ 1 (CLIP uses 100; inf = no cap), got {loss.clip_max_scale}"
        )


def check_lora_settings(settings: ml_collections.ConfigDict) -> None:
    """`config.lora` in LoRA mode: a whole rank ≥ 1 and a finite alpha other than 0 (the adapters are scaled by
    alpha / rank: with alpha 0 they receive no gradient and the towers never change)."""
    rank, alpha = settings.rank, settings.alpha
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"config.lora.rank = {rank!r}: must be a whole number ≥ 1 (the adapters' rank)")
    if not (math.isfinite(alpha) and alpha != 0):
        raise ValueError(
            f"config.lora.alpha = {alpha!r}: must be a finite number other than 0 (the adapters are scaled by "
            "alpha / rank; with 0 they never receive a gradient and the towers do not train)"
        )


def check_scale_init(model: WavLinkConfig, max_scale: float) -> None:
    """CLIP's initial log-scale within the cap `config.loss.clip_max_scale` and ≥ 0 (the cap's range is [1,
    max_scale]): outside it, the first step trained at the uncapped multiplier and the clamp then moved the scalar,
    even a frozen one."""
    init = model.clip_logit_scale_init
    if not 0.0 <= init <= math.log(max_scale):
        multiplier = math.exp(min(init, 709.0))  # (math.exp overflows beyond)
        raise ValueError(
            f"config.model.clip_logit_scale_init = {init:g} (multiplier {multiplier:.4g}) is outside the range "
            f"config.loss.clip_max_scale = {max_scale:g} allows ([0, log {max_scale:g} = {math.log(max_scale):.4g}]); "
            "lower the init or raise the cap"
        )


def check_batch_size(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The global batch must be positive and split evenly into micro-batches and each of those over the batch
    devices (0 failed inside the data pipeline; a negative batch was never filled, and training hung)."""
    unit = sharding.batch_divisor(mesh) * accum_steps(config)
    if config.batch_size < 1 or config.batch_size % unit:
        raise ValueError(
            f"config.batch_size {config.batch_size} must be a positive multiple of accum_steps ({config.accum_steps}) "
            f"× the {sharding.batch_divisor(mesh)} devices on the batch axes {sharding.BATCH_AXES} = {unit}"
        )


def clamp_clip_scale(params: Tree, max_scale: float) -> Tree:
    """Keep the CLIP temperature multiplier exp(clip_logit_scale) in [1, max_scale], as CLIP does after every
    update (it caps it at 100): beyond that the softmax saturates and training can diverge."""
    clamped = jnp.clip(params["clip_logit_scale"], 0.0, math.log(max_scale))
    return {**params, "clip_logit_scale": clamped}


def embedding_metrics(audio_head: jax.Array, text_head: jax.Array) -> dict[str, jax.Array]:
    """What the heads' `(N, E)` outputs say about training: the size the heads learn (mean norm before
    normalisation: a norm drifting to 0 or exploding is a sign of trouble long before the loss shows it), the
    alignment of the pairs, and the spread of the batch (norm of the mean unit embedding: 1 = collapsed)."""
    za, zt = losses.l2_normalize(audio_head), losses.l2_normalize(text_head)
    return {
        "embed/audio_norm": jnp.mean(jnp.linalg.norm(audio_head, axis=-1)),
        "embed/text_norm": jnp.mean(jnp.linalg.norm(text_head, axis=-1)),
        "embed/positive_cosine": jnp.mean(jnp.sum(za * zt, axis=-1)),
        "embed/audio_mean_norm": jnp.linalg.norm(jnp.mean(za, axis=0)),
        "embed/text_mean_norm": jnp.linalg.norm(jnp.mean(zt, axis=0)),
    }


def make_train_step(setup: TrainSetup) -> Callable[[dict, dict], tuple[dict, dict]]:
    """The jitted step `(state, batch) -> (state, metrics)`; `state` is donated, metrics are scalars."""
    check_batch_size(setup.config, setup.mesh)
    compute_gradients = gradients(setup)
    tx, schedule = setup.tx, setup.schedule
    max_clip_scale = float(setup.config.loss.clip_max_scale)  # checked by `build`

    def step(state: dict, batch: dict) -> tuple[dict, dict]:
        trainable, frozen = optim.partition(state["params"], setup.trainable)
        value, parts, audio_head, text_head, grads = compute_gradients(trainable, frozen, state["buffers"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        params = clamp_clip_scale(optim.combine(optax.apply_updates(trainable, updates), frozen), max_clip_scale)
        new_state = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}
        by_kind = {kind: [v for key, v in parts.items() if key.startswith(kind + "/")] for kind in ("clip", "sigmoid")}
        metrics = {
            "loss": value,
            **parts,  # loss/<d>, clip/<d>, sigmoid/<d>
            **{f"{kind}/mean": jnp.mean(jnp.stack(values)) for kind, values in by_kind.items() if values},
            "learning_rate": schedule(state["step"]),
            "grad_norm": setup.norm(grads),
            "clip/temperature": 1.0 / jnp.exp(params["clip_logit_scale"]),
            "sigmoid/temperature": 1.0 / jnp.exp(params["sigmoid_logit_scale"]),
            "sigmoid/bias": params["sigmoid_logit_bias"],
            **embedding_metrics(audio_head, text_head),
        }
        return new_state, metrics

    batch_sharding = sharding.batch_sharding(setup.mesh)
    return jax.jit(
        step,
        in_shardings=(setup.shardings, batch_sharding),
        out_shardings=(setup.shardings, sharding.replicated(setup.mesh)),
        donate_argnums=0,
    )


def make_param_norm(setup: TrainSetup) -> Callable[[dict], jax.Array]:
    """The jitted L2 norm of the trainable parameters of `state["params"]`, logged with the train metrics.

    Outside the train step because only logged steps need it: inside, its per-parameter sums of squares cost ~150
    launches a step (base at batch 128 compiled for an H200: 2233 launches with it, 2084 without; measured with
    optax's norm, which under FSDP also cost ~230 slices of all-reduced partial sums, before `setup.norm`)."""
    return jax.jit(
        lambda params: setup.norm(optim.partition(params, setup.trainable)[0]),
        in_shardings=(setup.shardings["params"],),
        out_shardings=sharding.replicated(setup.mesh),
    )


def embedding_matmul_precision(dtype: Any) -> str | None:
    """The matmul precision embedding (`StateEmbedder`, `inference.Embedder`) runs at for a compute `dtype`:
    "highest" for float32, else None (jax's default). float32 means float32: jax's default on GPUs (TF32) and TPUs
    (bf16 passes) rounds matmul inputs to ~3 significant digits, so the embeddings would differ from the exported
    PyTorch model's, and evaluation during training from `wavlink_jax.evaluate` of the same checkpoint."""
    return "highest" if jnp.dtype(dtype) == jnp.float32 else None


class StateEmbedder:
    """Full-size L2-normalised numpy embeddings from a train state (for evaluation during training).

    Satisfies `wavlink_jax.eval_tasks.SupportsEmbedding`. Waveforms and captions are embedded in batches of
    `batch_size` over the mesh; `use(state)` points it at the current parameters (no copy).
    """

    def __init__(self, setup: TrainSetup, tokenizer: Callable, batch_size: int, progress: bool = False):
        check_eval_batch_size(batch_size, setup.mesh)  # at start-up, not at the first evaluation
        spec, log_mel = setup.spec, _log_mel_fn(setup)
        self._mesh, self._tokenizer, self._batch_size, self._progress = setup.mesh, tokenizer, batch_size, progress
        self._params = self._buffers = None
        precision = embedding_matmul_precision(setup.model_config.audio.dtype)

        def audio_fn(params, buffers, waveform):
            with jax.default_matmul_precision(precision):
                return spec.module(params, buffers).embed_audio(log_mel(waveform))

        def text_fn(params, buffers, tokens):
            with jax.default_matmul_precision(precision):
                return spec.module(params, buffers).embed_text(tokens["input_ids"], tokens["attention_mask"])

        self._audio_fn, self._text_fn = jax.jit(audio_fn), jax.jit(text_fn)

    def use(self, state: dict) -> StateEmbedder:
        self._params, self._buffers = state["params"], state["buffers"]
        return self

    def embed_audio(self, waveforms: np.ndarray) -> np.ndarray:
        fn = lambda batch: self._audio_fn(self._params, self._buffers, batch)  # noqa: E731
        return embed_in_batches(fn, waveforms, self._batch_size, self._mesh, desc="audio", progress=self._progress)

    def embed_text(self, texts) -> np.ndarray:
        input_ids, attention_mask = self._tokenizer(list(texts))
        tokens = {"input_ids": input_ids, "attention_mask": attention_mask}
        fn = lambda batch: self._text_fn(self._params, self._buffers, batch)  # noqa: E731
        return embed_in_batches(fn, tokens, self._batch_size, self._mesh, desc="text", progress=self._progress)
