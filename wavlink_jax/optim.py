"""Optimiser, learning-rate schedule and the regex rules that decide which parameters train, and how fast.

Parameters are addressed by their path string, e.g. `audio/encoder/layers/3/attn/query/kernel`. Rules are
Python regular expressions matched with `re.search` against that string:

* `optim.freeze`: parameters matching any pattern get no gradient and no optimizer state.
* `optim.lr_rules`: `(pattern, multiplier)` pairs; the first match scales that parameter's learning rate.
* `optim.no_decay`: parameters matching any pattern, and all parameters with fewer than two dimensions
  (biases, LayerNorm scales, scalar loss temperatures), get no weight decay.

A pattern that matches no parameter is an error (likely a typo); so is an `lr_rules` or `no_decay` pattern that
matches only frozen parameters (`train_step.build` checks both).

The paper's training modes (`optim.mode` projector | lora | full, `optim.towers` audio | both) are presets
that add freeze patterns and choose where LoRA adapters go; see `training_mode`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
from typing import Any, Callable, Collection, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

Tree = dict

SCHEDULES = ("cosine", "linear", "constant")
MODES = ("full", "lora", "projector")
TOWERS = ("both", "audio")

# Parameter paths of the WavLink model (wavlink_jax.models.wavlink) the presets are written in: the towers
# live under `audio/` and `text/`; the heads (`audio_projection`, `text_projection`), the loss scalars and the
# audio tower's new `audio/global_token` always train.
TOWER_BODY = {
    "audio": r"^audio/(?!global_token$)(?!.*/lora_[ab]$)",
    "text": r"^text/(?!.*/lora_[ab]$)",
}
LORA_PROJECTIONS = r"layers/\d+/(attn/(query|key|value|out)|fc1|fc2)/kernel$"


class SettingRange(NamedTuple):
    """The allowed values of a numeric `config.optim` setting: from `low` to `high`, each end included or not."""

    low: float
    high: float
    low_included: bool
    high_included: bool
    meaning: str

    def holds(self, value: float) -> bool:
        above = self.low <= value if self.low_included else self.low < value
        below = value <= self.high if self.high_included else value < self.high
        return above and below

    def interval(self) -> str:
        """E.g. `[0, 1)`."""
        return f"{'[' if self.low_included else '('}{self.low:g}, {self.high:g}{']' if self.high_included else ')'}"


# The allowed range of each numeric `config.optim` setting. Outside it training still runs, wrongly: a negative
# end fraction ends in gradient ascent, a warm-up fraction above 1 never reaches the peak, a negative weight decay
# grows the weights.
SETTING_RANGES: dict[str, SettingRange] = {
    "learning_rate": SettingRange(0.0, math.inf, False, False, "the peak learning rate"),
    "warmup_fraction": SettingRange(0.0, 1.0, True, True, "the fraction of the steps spent warming up"),
    "end_lr_fraction": SettingRange(0.0, 1.0, True, True, "the final learning rate as a fraction of the peak"),
    "b1": SettingRange(0.0, 1.0, True, False, "Adam's first-moment decay"),
    "b2": SettingRange(0.0, 1.0, True, False, "Adam's second-moment decay"),
    "eps": SettingRange(0.0, math.inf, False, False, "Adam's epsilon"),
    "weight_decay": SettingRange(0.0, math.inf, True, False, "decoupled weight decay"),
    "grad_clip_norm": SettingRange(0.0, math.inf, True, False, "the global gradient norm clipped to; 0 = no clipping"),
}
SCHEDULE_SETTINGS = ("learning_rate", "warmup_fraction", "end_lr_fraction")


def flatten(tree: Tree) -> dict[str, Any]:
    """Nested dict → `{"a/b/kernel": leaf}`."""
    return {"/".join(map(str, key)): leaf for key, leaf in traverse_util.flatten_dict(tree).items()}


def unflatten(flat: Mapping[str, Any]) -> Tree:
    """`{"a/b/kernel": leaf}` → nested dict; the inverse of `flatten`."""
    return traverse_util.unflatten_dict({tuple(key.split("/")): leaf for key, leaf in flat.items()})


def _compile(patterns: Sequence[str], what: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"{what}: invalid regular expression {pattern!r}: {err}") from err
    return compiled


def nearest(pattern: str, paths: Sequence[str], count: int = 3) -> list[str]:
    """The `count` paths sharing the most characters, in order, with `pattern` (its regex syntax dropped), shorter
    first among equals: what a mistyped pattern probably meant."""
    plain = re.sub(r"[\^$\\.*+?()\[\]{}|]", "", pattern)

    def shared(path: str) -> int:
        blocks = difflib.SequenceMatcher(None, plain, path, autojunk=False).get_matching_blocks()
        return sum(block.size for block in blocks)

    return sorted(paths, key=lambda path: (-shared(path), len(path), path))[:count]


def matching(
    paths: Sequence[str], patterns: Sequence[str], what: str, trainable: Collection[str] | None = None
) -> set[str]:
    """The paths that match at least one pattern; a pattern that matches nothing is an error (likely a typo).

    With `trainable` (the paths that train), a pattern that matches only frozen parameters is an error too: a
    rule on how parameters train (lr_rules, no_decay) would change nothing.
    """
    compiled = _compile(patterns, what)
    matched = set()
    for pattern in compiled:
        hits = {path for path in paths if pattern.search(path)}
        if not hits:
            raise ValueError(
                f"{what}: pattern {pattern.pattern!r} matches no parameter; the nearest: "
                f"{nearest(pattern.pattern, paths)}"
            )
        if trainable is not None and hits.isdisjoint(trainable):
            raise ValueError(
                f"{what}: pattern {pattern.pattern!r} matches only frozen parameters ({len(hits)}, e.g. "
                f"{sorted(hits)[:3]}), so it would change nothing; they are frozen by config.optim.mode, "
                "config.optim.towers or config.optim.freeze"
            )
        matched |= hits
    return matched


@dataclasses.dataclass(frozen=True)
class TrainingMode:
    """What a preset freezes and where it puts LoRA adapters (both as regex patterns on parameter paths)."""

    freeze: tuple[str, ...]
    lora: tuple[str, ...]


def training_mode(mode: str, towers: str) -> TrainingMode:
    """The paper's presets.

    full: every parameter of the adapted towers trains. lora: the adapted towers' weights are frozen and
    rank-r adapters on their attention/MLP projections train. projector: the adapted towers' transformer
    weights are frozen. In every mode the heads (projectors, the audio global token) and the loss
    temperature/bias train. towers="audio" additionally freezes the whole text tower (LiT-style locked text;
    its projector still trains); towers="both" adapts the text tower the same way as the audio tower.
    """
    if mode not in MODES:
        raise ValueError(f"config.optim.mode must be one of {MODES}, got {mode!r}")
    if towers not in TOWERS:
        raise ValueError(f"config.optim.towers must be one of {TOWERS}, got {towers!r}")
    adapted = ["audio", "text"] if towers == "both" else ["audio"]
    frozen_towers = ["text"] if towers == "audio" else []
    if mode != "full":
        frozen_towers += adapted
    freeze = [TOWER_BODY[tower] for tower in ("audio", "text") if tower in frozen_towers]
    lora = [f"^{tower}/.*{LORA_PROJECTIONS}" for tower in adapted] if mode == "lora" else []
    return TrainingMode(freeze=tuple(freeze), lora=tuple(lora))


def trainable_mask(params: Tree, freeze: Sequence[str]) -> Tree:
    """Same-structured tree of bools: True = the parameter trains."""
    flat = flatten(params)
    frozen = matching(list(flat), freeze, "config.optim.freeze")
    return unflatten({path: path not in frozen for path in flat})


def partition(params: Tree, mask: Tree) -> tuple[Tree, Tree]:
    """Split into (trainable, frozen) nested dicts with disjoint keys; `combine` undoes it."""
    flat, flat_mask = flatten(params), flatten(mask)
    trainable = {k: v for k, v in flat.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
    return unflatten(trainable), unflatten(frozen)


def combine(trainable: Tree, frozen: Tree) -> Tree:
    """One nested dict of both trees' leaves: undoes `partition` (the trainer also adds LoRA adapters beside
    the parameters with it). On a path present in both trees, `trainable`'s leaf wins."""
    return unflatten({**flatten(frozen), **flatten(trainable)})


def weight_decay_mask(params: Tree, no_decay: Sequence[str]) -> Tree:
    """True where weight decay applies: parameters with ≥ 2 dimensions not matched by `no_decay`."""
    flat = flatten(params)
    compiled = _compile(no_decay, "config.optim.no_decay")
    return unflatten(
        {path: jnp.ndim(leaf) >= 2 and not any(p.search(path) for p in compiled) for path, leaf in flat.items()}
    )


def lr_rules(rules: Sequence[Any]) -> list[tuple[str, float]]:
    """`config.optim.lr_rules` checked: `(pattern, multiplier)` pairs, each multiplier a finite number ≥ 0."""
    checked = []
    for rule in rules:
        if isinstance(rule, str) or not isinstance(rule, Sequence) or len(rule) != 2:
            raise ValueError(
                f"config.optim.lr_rules: each rule is (pattern, multiplier), got {rule!r} (the rules are a sequence "
                "of pairs: one rule is written ((pattern, multiplier),))"
            )
        pattern, multiplier = rule
        if isinstance(multiplier, bool) or not isinstance(multiplier, numbers.Real) or not 0 <= multiplier < math.inf:
            raise ValueError(
                f"config.optim.lr_rules: rule {tuple(rule)!r}: the multiplier must be a finite number ≥ 0 "
                "(0 = not updated; a negative one ascends the gradient)"
            )
        checked.append((pattern, float(multiplier)))
    return checked


def lr_multipliers(params: Tree, rules: Sequence[Any]) -> Tree:
    """Per-parameter learning-rate multiplier: the first matching `(pattern, multiplier)` rule, else 1."""
    rules = lr_rules(rules)
    patterns = _compile([pattern for pattern, _ in rules], "config.optim.lr_rules")
    compiled = list(zip(patterns, [multiplier for _, multiplier in rules]))
    flat = flatten(params)

    def multiplier(path: str) -> float:
        return next((mult for pattern, mult in compiled if pattern.search(path)), 1.0)

    return unflatten({path: multiplier(path) for path in flat})


def check_settings(optim: Any, keys: Sequence[str] = tuple(SETTING_RANGES)) -> None:
    """A ValueError naming the first of `keys` (`SETTING_RANGES`) whose `config.optim` value is out of its range."""
    for key in keys:
        allowed, value = SETTING_RANGES[key], optim[key]
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not (number and allowed.holds(value)):
            raise ValueError(f"config.optim.{key} = {value!r}: must be in {allowed.interval()} ({allowed.meaning})")


def learning_rate_schedule(optim: Any, total_steps: int) -> optax.Schedule:
    """Warm-up (linear from 0) for `warmup_fraction` of the steps (to the nearest step), then cosine / linear decay
    or constant."""
    check_settings(optim, SCHEDULE_SETTINGS)
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"config.optim.schedule must be one of {SCHEDULES}, got {optim.schedule!r}")
    peak = float(optim.learning_rate)
    # The nearest step, halves up; rounded to 9 places first, so that 0.29 × 50 = 14.499999999999998 is a half.
    warmup = math.floor(round(optim.warmup_fraction * total_steps, 9) + 0.5)
    end = peak * float(optim.end_lr_fraction)
    decay_steps = max(total_steps - warmup, 1)
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.end_lr_fraction)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(
    optim: Any, trainable: Tree, total_steps: int, norm: Callable[[Tree], jax.Array] = optax.tree.norm
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW over the trainable parameters: clip → Adam → decoupled weight decay (masked) → −lr·multiplier.

    Returns the transformation and the learning-rate schedule (for logging). Settings out of their range
    (`SETTING_RANGES`) are refused. `norm` is the gradients' global norm for the clipping (on a mesh,
    `sharding.tree_norm` of the trainable parameters' shardings).
    """
    schedule = learning_rate_schedule(optim, total_steps)  # checks the schedule's settings
    check_settings(optim, [key for key in SETTING_RANGES if key not in SCHEDULE_SETTINGS])
    multipliers = lr_multipliers(trainable, optim.lr_rules)
    # Clipping off keeps its (empty) place in the chain, so the optimizer state's keys, which the checkpoints
    # hold, stay those of a run with it on (a run resumed with `grad_clip_norm = 0` was refused, its Adam
    # moments moved from opt_state/1 to opt_state/0).
    parts = [clip_by_global_norm(float(optim.grad_clip_norm), norm) if optim.grad_clip_norm else optax.identity()]
    # The multipliers live inside the learning-rate step (same state as optax's), not in a fifth, stateless entry
    # of the chain: orbax keeps the chain as a list, so an extra entry made a run resumed with lr_rules added or
    # removed fail with orbax's "tree structures do not match" (its EmptyState holds no array to compare).
    parts += [
        optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
        optax.add_decayed_weights(float(optim.weight_decay), mask=weight_decay_mask(trainable, optim.no_decay)),
        _scale_by_learning_rate(schedule, multipliers),
    ]
    return optax.chain(*parts), schedule


def clip_by_global_norm(
    max_norm: float, norm: Callable[[Tree], jax.Array] = optax.tree.norm
) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` (updates scaled by max_norm / ‖updates‖ when that norm exceeds `max_norm`,
    the same empty state) with the norm computed by `norm`."""

    def clip(updates: Tree, params: Tree | None) -> Tree:
        del params
        total = norm(updates)
        return jax.tree.map(lambda t: jnp.where(total < max_norm, t, (t / total.astype(t.dtype)) * max_norm), updates)

    return optax.stateless(clip)


def _scale_by_learning_rate(schedule: optax.Schedule, multipliers: Tree) -> optax.GradientTransformation:
    """`optax.scale_by_learning_rate(schedule)` (the same state), each update then scaled by its parameter's
    `lr_rules` multiplier (skipped when every multiplier is 1)."""
    base = optax.scale_by_learning_rate(schedule)
    if all(m == 1.0 for m in jax.tree.leaves(multipliers)):
        return base

    def update(updates: Tree, state: Any, params: Tree | None = None) -> tuple[Tree, Any]:
        updates, state = base.update(updates, state, params)
        return jax.tree.map(lambda update, mult: update * mult, updates, multipliers), state

    return optax.GradientTransformation(base.init, update)

