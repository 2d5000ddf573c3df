"""Evaluation metrics with the standard protocols: retrieval, zero-shot classification, multiple choice, Matryoshka.

Every metric here is computed from embeddings (numpy, on the host) so that it can be checked against a
brute-force reference and reused by the standalone CLI and by the trainer's periodic evaluation.

Scores are dot products of the given embeddings: pass L2-normalised embeddings to rank by cosine similarity
(the model's `embed_audio` / `embed_text` already are; `truncate_normalize` re-normalises Matryoshka prefixes).

**Ties are broken pessimistically.** A query's ranked list orders items by descending score and, among
items with equal scores, puts every wrong item before every correct one. So the rank of a single correct item is
`1 + #(wrong items with score >= its score)`. With several correct items (audio→text, one clip and its
captions), the k-th best correct item (k = 1, 2, ...; correct items tied with each other take consecutive
places, and their order among themselves changes no metric) has rank `k + #(wrong items with score >= its
score)`. Ranks are 1-based. A model that outputs a constant embedding therefore scores at the bottom, never
at the top. Equal embeddings must get equal scores for this: a float32 matrix product can give two copies of one
vector scores a unit in the last place apart, by their columns' places in BLAS's blocks. So scores are computed in
float64 and rounded to float32 (`scores_of`), where that noise vanishes.
"""

from __future__ import annotations

import argparse
import collections.abc
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from wavlink_jax import audio, cli, sharding
from wavlink_jax.files import replace_text, replaced
from wavlink_jax.waveform_layout import LONG_CLIPS, clips_window_plan

# Work arrays in the ranking loops hold at most this many elements (float32 scores or booleans, and the float64
# product they are rounded from), so a 5k-clip × 25k-caption evaluation runs in a few hundred MB whatever the sizes.
DEFAULT_CHUNK_ELEMENTS = 1 << 25

RECALL_AT = (1, 5, 10)
MAP_AT = 10


# ---------------------------------------------------------------------------------------------------------------
# Input checks


def _as_embeddings(x: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(x)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (items, dim) array; got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    elif array.dtype != np.float64:
        array = array.astype(np.float32)  # bf16/fp16 model outputs: rank in fp32
    if not np.all(np.isfinite(array)):
        bad = np.flatnonzero(~np.all(np.isfinite(array), axis=1))
        raise ValueError(f"{name} has non-finite values in rows {bad[:10].tolist()} ({bad.size} rows in all)")
    return array


def _as_indices(x: Sequence[int] | np.ndarray, name: str, length: int, upper: int, upper_name: str) -> np.ndarray:
    array = np.asarray(x)
    if array.ndim != 1 or array.shape[0] != length:
        raise ValueError(f"{name} must be 1-D with {length} entries; got shape {array.shape}")
    if length and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer indices; got dtype {array.dtype}")
    array = array.astype(np.int64)
    if length and (array.min() < 0 or array.max() >= upper):
        bad = np.flatnonzero((array < 0) | (array >= upper))
        raise ValueError(
            f"{name} has entries outside [0, {upper}) ({upper_name}) at positions {bad[:10].tolist()}"
        )
    return array


def _rows_per_chunk(row_elements: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, row_elements))


def scores_of(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """`queries @ gallery.T` as float32, equal wherever the embeddings are equal (the product is taken in float64,
    whose rounding differences lie far below float32's; see the module docstring). A float64 `gallery` is used as
    it is: the ranking loops convert theirs once, not in every chunk."""
    return (queries.astype(np.float64) @ gallery.T.astype(np.float64, copy=False)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Ranks


def single_target_ranks(
    queries: np.ndarray, gallery: np.ndarray, targets: np.ndarray, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> np.ndarray:
    """1-based pessimistic rank of `gallery[targets[i]]` when query i ranks the whole gallery by dot product.

    Serves text→audio retrieval (query = caption, target = its clip) and classification (query = clip,
    gallery = class embeddings, target = label).
    """
    ranks = np.empty(queries.shape[0], np.int64)
    step = _rows_per_chunk(gallery.shape[0], chunk_elements)
    gallery = gallery.astype(np.float64)  # once, for every chunk's `scores_of`
    for start in range(0, queries.shape[0], step):
        scores = scores_of(queries[start : start + step], gallery)
        rows = np.arange(scores.shape[0])
        correct = scores[rows, targets[start : start + step]]
        # Counts the target itself once, plus every other item scoring at least as high.
        ranks[start : start + step] = np.count_nonzero(scores >= correct[:, None], axis=1)
    return ranks


def _group_by_owner(owner: np.ndarray, num_owners: int) -> tuple[np.ndarray, np.ndarray]:
    """(num_owners, max_count) item indices per owner, padded with 0, and the matching validity mask."""
    counts = np.bincount(owner, minlength=num_owners)
    order = np.argsort(owner, kind="stable")
    width = max(1, int(counts.max(initial=0)))
    slot = np.arange(owner.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    items = np.zeros((num_owners, width), np.int64)
    items[owner[order], slot] = order
    mask = np.arange(width)[None, :] < counts[:, None]
    return items, mask


def multi_target_ranks(
    queries: np.ndarray,
    gallery: np.ndarray,
    targets: np.ndarray,
    target_mask: np.ndarray,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> np.ndarray:
    """Pessimistic 1-based ranks of each query's correct gallery items, best first.

    `targets[q, j]` is the j-th correct gallery index of query q where `target_mask[q, j]`; the result has the
    same shape, sorted ascending along the last axis per query, with `np.iinfo(int64).max` in unused slots.
    """
    num_queries, width = targets.shape
    ranks = np.full((num_queries, width), np.iinfo(np.int64).max, np.int64)
    step = _rows_per_chunk(gallery.shape[0] * width, chunk_elements)
    gallery = gallery.astype(np.float64)  # once, for every chunk's `scores_of`
    for start in range(0, num_queries, step):
        stop = min(start + step, num_queries)
        scores = scores_of(queries[start:stop], gallery)
        mask = target_mask[start:stop]
        correct = np.take_along_axis(scores, targets[start:stop], axis=1)
        correct = np.where(mask, correct, -np.inf)
        order = np.argsort(-correct, axis=1, kind="stable")
        correct = np.take_along_axis(correct, order, axis=1)  # descending; unused slots (-inf) last
        mask = np.take_along_axis(mask, order, axis=1)
        at_least_all = np.count_nonzero(scores[:, None, :] >= correct[:, :, None], axis=2)
        at_least_correct = np.count_nonzero(correct[:, None, :] >= correct[:, :, None], axis=2)
        place = np.arange(1, width + 1)[None, :]
        ranks[start:stop] = np.where(mask, place + at_least_all - at_least_correct, ranks[start:stop])
    return ranks


# ---------------------------------------------------------------------------------------------------------------
# Retrieval


def retrieval_metrics(
    audio_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_audio: Sequence[int] | np.ndarray,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> dict[str, float]:
    """Text→audio and audio→text retrieval metrics (AudioCaps / Clotho protocol), R and mAP in percent.

    `audio_emb` (num_clips, dim), `text_emb` (num_captions, dim), `text_to_audio[i]` = clip index of caption i.
    Text→audio: each caption ranks all clips; `t2a_mAP@10` = mean of 1/rank (0 beyond rank 10).
    Audio→text: each clip ranks all captions; R@k is a hit when any of its captions is in the top k; medR is
    the median rank of its best caption; mAP@10 averages over clips
    `sum(precision at each of its captions ranked <= 10) / min(#its captions, 10)`.
    Every clip must have at least one caption (an uncaptioned clip has no defined audio→text rank).
    """
    audio = _as_embeddings(audio_emb, "audio_emb")
    text = _as_embeddings(text_emb, "text_emb")
    if audio.shape[1] != text.shape[1]:
        raise ValueError(f"audio_emb dim {audio.shape[1]} != text_emb dim {text.shape[1]}")
    if audio.shape[0] == 0 or text.shape[0] == 0:
        raise ValueError(f"empty evaluation set: {audio.shape[0]} clips, {text.shape[0]} captions")
    owner = _as_indices(text_to_audio, "text_to_audio", text.shape[0], audio.shape[0], "number of clips")
    counts = np.bincount(owner, minlength=audio.shape[0])
    if np.any(counts == 0):
        empty = np.flatnonzero(counts == 0)
        raise ValueError(
            f"{empty.size} clips have no caption (first: {empty[:10].tolist()}); audio→text retrieval needs "
            "at least one caption per clip: drop those clips from audio_emb and re-index text_to_audio"
        )

    t2a = single_target_ranks(text, audio, owner, chunk_elements=chunk_elements)
    captions, mask = _group_by_owner(owner, audio.shape[0])
    a2t = multi_target_ranks(audio, text, captions, mask, chunk_elements=chunk_elements)

    metrics: dict[str, float] = {}
    for k in RECALL_AT:
        metrics[f"t2a_R@{k}"] = 100.0 * float(np.mean(t2a <= k))
    metrics[f"t2a_mAP@{MAP_AT}"] = 100.0 * float(np.mean(np.where(t2a <= MAP_AT, 1.0 / t2a, 0.0)))
    metrics["t2a_medR"] = float(np.median(t2a))

    best = a2t[:, 0]
    for k in RECALL_AT:
        metrics[f"a2t_R@{k}"] = 100.0 * float(np.mean(best <= k))
    place = np.arange(1, a2t.shape[1] + 1)[None, :]
    precision = np.where(a2t <= MAP_AT, place / a2t, 0.0)
    metrics[f"a2t_mAP@{MAP_AT}"] = 100.0 * float(np.mean(precision.sum(axis=1) / np.minimum(counts, MAP_AT)))
    metrics["a2t_medR"] = float(np.median(best))
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot classification

# Prompt templates averaged in embedding space (CLIP's prompt ensembling). "the sound of a {}" is the paper's
# example; "this is a sound of {}" is LAION-CLAP's zero-shot prompt and "this is the sound of {}" MS-CLAP's; the
# bare class name keeps labels that read badly inside a sentence usable.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "the sound of a {}",
    "this is a sound of {}",
    "this is the sound of {}",
    "a sound of {}",
    "{}",
)


def normalize_rows(x: np.ndarray, name: str) -> np.ndarray:
    """`x` L2-normalised along its last axis; an all-zero vector is an error naming `name` (what `x` holds)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{name} has all-zero vectors, which cannot be L2-normalised")
    return x / norms


def class_embeddings(template_emb: np.ndarray) -> np.ndarray:
    """(classes, templates, dim) prompt embeddings → (classes, dim): normalise each, average, re-normalise."""
    template_emb = np.asarray(template_emb, np.float32)
    if template_emb.ndim != 3:
        raise ValueError(f"template embeddings must be (classes, templates, dim); got shape {template_emb.shape}")
    return normalize_rows(normalize_rows(template_emb, "template embeddings").mean(axis=1), "class embeddings")


def check_templates(templates: Sequence[str]) -> None:
    """Each zero-shot prompt template holds exactly one `{}`, where the class name goes."""
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"prompt template {template!r} must contain exactly one '{{}}' for the class name")
        try:  # other braces ("{x}", "{0}", a lone "{") failed in str.format only after the model had embedded the audio
            template.format("")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"prompt template {template!r} must contain exactly one '{{}}' for the class name and no other "
                f"braces (write a literal brace as '{{{{' or '}}}}'); str.format says: {err!r}"
            ) from None


def prompt_texts(class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
    """Every class name in every template, class-major: `(classes × templates)` texts."""
    check_templates(templates)
    return [template.format(name) for name in class_names for template in templates]


def zero_shot_classifier(
    embed_text_fn: Callable[[list[str]], np.ndarray],
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> np.ndarray:
    """(classes, dim) L2-normalised class embeddings: every class name in every template, averaged per class.

    `embed_text_fn` maps a list of strings to their (n, dim) embeddings (it does its own batching).
    """
    if not class_names or not templates:
        raise ValueError(f"need at least one class name and one template; got {len(class_names)} and {len(templates)}")
    texts = prompt_texts(class_names, templates)
    embedded = np.asarray(embed_text_fn(texts))
    if embedded.ndim != 2 or embedded.shape[0] != len(texts):
        raise ValueError(f"embed_text_fn returned shape {embedded.shape} for {len(texts)} texts; expected (n, dim)")
    return class_embeddings(embedded.reshape(len(class_names), len(templates), -1))


def zero_shot_metrics(
    audio_emb: np.ndarray, labels: Sequence[int] | np.ndarray, class_emb: np.ndarray
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) of nearest-class prediction; ties with a wrong class count as misses."""
    audio = _as_embeddings(audio_emb, "audio_emb")
    classes = _as_embeddings(class_emb, "class_emb")
    if audio.shape[1] != classes.shape[1]:
        raise ValueError(f"audio_emb dim {audio.shape[1]} != class_emb dim {classes.shape[1]}")
    if audio.shape[0] == 0:
        raise ValueError("zero-shot evaluation got no clips")
    targets = _as_indices(labels, "labels", audio.shape[0], classes.shape[0], "number of classes")
    ranks = single_target_ranks(audio, classes, targets)
    return {"top1": 100.0 * float(np.mean(ranks <= 1)), "top5": 100.0 * float(np.mean(ranks <= 5))}


def fold_average(per_fold_results: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean over folds of each metric (ESC-50: 5 folds, UrbanSound8K: 10): every fold must report the same keys."""
    if not per_fold_results:
        raise ValueError("fold_average needs at least one fold's results")
    keys = set(per_fold_results[0])
    for index, result in enumerate(per_fold_results):
        if set(result) != keys:
            raise ValueError(f"fold {index} reports metrics {sorted(result)}, fold 0 reports {sorted(keys)}")
    return {key: float(np.mean([result[key] for result in per_fold_results])) for key in per_fold_results[0]}


def zero_shot_by_fold(
    audio_emb: np.ndarray, labels: Sequence[int] | np.ndarray, class_emb: np.ndarray, folds: Sequence | np.ndarray
) -> dict[str, float]:
    """Zero-shot accuracy computed on each fold's clips separately, then averaged over folds (ESC-50, US8K)."""
    folds = np.asarray(folds)
    audio = np.asarray(audio_emb)
    labels = np.asarray(labels)
    if folds.shape != (audio.shape[0],):
        raise ValueError(f"folds must give one fold per clip ({audio.shape[0]}); got shape {folds.shape}")
    return fold_average(
        [zero_shot_metrics(audio[folds == fold], labels[folds == fold], class_emb) for fold in np.unique(folds)]
    )


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice (AIR-Bench foundation)


def multiple_choice_metrics(
    audio_emb: np.ndarray,
    choice_emb: np.ndarray,
    choice_mask: np.ndarray,
    answers: Sequence[int] | np.ndarray,
    tasks: Sequence[str],
) -> dict[str, float]:
    """Accuracy (percent) of picking the choice embedding nearest to the question's audio embedding.

    `choice_emb` (questions, max_choices, dim) with `choice_mask` marking real choices; `answers[q]` indexes
    the correct choice; `tasks[q]` names the question's task. A tie between the answer and a wrong choice is a
    miss. Returns `acc/<task>` per task, `average` (mean over tasks, the benchmark's headline) and `overall`
    (over all questions).
    """
    audio = _as_embeddings(audio_emb, "audio_emb")
    choices = np.asarray(choice_emb, np.float32)
    mask = np.asarray(choice_mask, bool)
    num_questions = audio.shape[0]
    if choices.ndim != 3 or choices.shape[0] != num_questions or choices.shape[2] != audio.shape[1]:
        raise ValueError(f"choice_emb must be ({num_questions}, choices, {audio.shape[1]}); got {choices.shape}")
    if mask.shape != choices.shape[:2]:
        raise ValueError(f"choice_mask shape {mask.shape} != choice_emb leading shape {choices.shape[:2]}")
    if not np.all(np.isfinite(choices[mask])):
        raise ValueError("choice_emb has non-finite values in real (masked-in) choices")
    if len(tasks) != num_questions or num_questions == 0:
        raise ValueError(f"need one task name per question ({num_questions} questions, {len(tasks)} tasks)")
    answer = _as_indices(answers, "answers", num_questions, choices.shape[1], "number of choice slots")
    if not np.all(mask[np.arange(num_questions), answer]):
        bad = np.flatnonzero(~mask[np.arange(num_questions), answer])
        raise ValueError(f"answers point at masked-out choices for questions {bad[:10].tolist()}")

    scores = np.einsum("qd,qcd->qc", audio, choices)
    correct_score = scores[np.arange(num_questions), answer]
    wrong = mask.copy()
    wrong[np.arange(num_questions), answer] = False
    hit = ~np.any(wrong & (scores >= correct_score[:, None]), axis=1)

    tasks = np.asarray(tasks)
    metrics = {f"acc/{task}": 100.0 * float(np.mean(hit[tasks == task])) for task in sorted(set(tasks.tolist()))}
    metrics["average"] = float(np.mean(list(metrics.values())))
    metrics["overall"] = 100.0 * float(np.mean(hit))
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Matryoshka


def truncate_normalize(embeddings: np.ndarray, dim: int) -> np.ndarray:
    """The first `dim` coordinates of each embedding (last axis), L2-normalised again: a Matryoshka level."""
    embeddings = np.asarray(embeddings, np.float32)
    if not 1 <= dim <= embeddings.shape[-1]:
        raise ValueError(f"Matryoshka dim {dim} is outside [1, {embeddings.shape[-1]}] (the embedding size)")
    return normalize_rows(embeddings[..., :dim], f"the {dim}-dim prefix")


def matryoshka_table(
    metric_fn: Callable[..., Mapping[str, float]],
    embeddings: Mapping[str, np.ndarray],
    dims: Sequence[int],
    *,
    plot_path: str | None = None,
    plot_keys: Sequence[str] | None = None,
) -> dict[int, dict[str, float]]:
    """`{dim: metric_fn(**prefixes)}` where each embedding array is cut to `dim` and re-normalised.

    `embeddings` holds full-size embeddings (any leading shape, the embedding on the last axis), e.g.
    `{"audio_emb": a, "text_emb": t}` for `functools.partial(retrieval_metrics, text_to_audio=...)`.
    With `plot_path`, also writes a PNG of the headline metrics (see `plot_matryoshka`) against dimension.
    """
    if not dims:
        raise ValueError("matryoshka_table needs at least one dimension")
    table = {
        int(dim): dict(metric_fn(**{name: truncate_normalize(value, dim) for name, value in embeddings.items()}))
        for dim in sorted(dims, reverse=True)
    }
    if plot_path is not None:
        plot_matryoshka(table, plot_path, keys=plot_keys)
    return table


def is_headline_metric(key: str) -> bool:
    """R@1 of either direction, top-1 accuracy and multiple-choice average: the metrics plotted by default."""
    name = key.rsplit("/", 1)[-1]
    return name.endswith("R@1") or name in ("top1", "average")


def plot_matryoshka(table: Mapping[int, Mapping[str, float]], path: str, keys: Sequence[str] | None = None) -> None:
    """PNG line plot of `keys` (default: the headline metrics) against the Matryoshka dimension."""
    from matplotlib.figure import Figure  # object API: no global pyplot backend, safe in headless jobs

    dims = sorted(table)
    available = list(table[dims[0]])
    keys = [key for key in available if is_headline_metric(key)] if keys is None else list(keys)
    missing = [key for key in keys if any(key not in table[dim] for dim in dims)]
    if not keys or missing:
        raise ValueError(f"nothing to plot: keys {keys} (missing {missing}); available metrics: {available}")
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axes = figure.add_subplot()
    for key in keys:
        axes.plot(dims, [table[dim][key] for dim in dims], marker="o", label=key)
    axes.set_xscale("log", base=2)
    axes.set_xticks(dims, [str(dim) for dim in dims])
    axes.set_xlabel("embedding dimension (Matryoshka prefix)")
    axes.set_ylabel("percent")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------------------------
# Embedding an evaluation set on the mesh


def _to_host(array: jax.Array) -> np.ndarray:
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def check_eval_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    """Evaluation batches are split over the mesh's batch axes like training batches."""
    divisor = sharding.batch_divisor(mesh)
    if batch_size <= 0 or batch_size % divisor:
        raise ValueError(
            f"eval batch size {batch_size} (config.eval.batch_size / --batch-size) must be a positive multiple of "
            f"{divisor} (the devices on the mesh's batch axes {sharding.BATCH_AXES})"
        )


class ClipWindows(collections.abc.Sequence):
    """`long_clips="mean"`'s windows over `clips` (`waveform_layout.window_plan`), with the clip each belongs to
    (`owners`) and its weight: a sequence of `(window_samples,)` float32 windows, each cut and zero-padded when it
    is read, so that `embed_in_batches`, slicing a batch at a time, holds no more than a batch of them beside the
    clips. `mean` turns the windows' embeddings into the clips'."""

    def __init__(self, clips: Sequence[np.ndarray], window_samples: int):
        self.clips, self.window_samples = clips, window_samples
        plan = clips_window_plan([len(clip) for clip in clips], window_samples)
        self.starts = [(index, start) for index, start, _ in plan]
        self.owners = np.array([index for index, _, _ in plan])
        self.weights = np.array([weight for _, _, weight in plan], np.float64)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, rows: int | slice) -> np.ndarray:
        if isinstance(rows, slice):
            return np.stack([self._window(index, start) for index, start in self.starts[rows]])
        return self._window(*self.starts[rows])

    def _window(self, index: int, start: int) -> np.ndarray:
        return audio.pad_or_trim(np.asarray(self.clips[index][start:], np.float32), self.window_samples)

    def mean(self, embeddings: np.ndarray) -> np.ndarray:
        """Each clip's embedding from its windows' `(len(self), E)` unit-length embeddings: their mean weighted by
        `weights`, L2-normalised."""
        pooled = np.zeros((len(self.clips), embeddings.shape[1]), np.float64)
        np.add.at(pooled, self.owners, np.asarray(embeddings) * self.weights[:, None])
        return normalize_rows(pooled, "the mean of a clip's window embeddings").astype(np.float32)


def embed_in_batches(
    fn: Callable[[Any], Any],
    inputs: Any,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    *,
    desc: str = "embedding",
    progress: bool = True,
) -> np.ndarray:
    """`fn` applied to `inputs` in global batches split over the mesh's batch axes; (N, ...) numpy result.

    `inputs` is a pytree whose leaves have the same leading size N and support slicing along it (numpy arrays,
    memmaps, or lazy array-likes that load on `leaf[start:stop]`); every process passes the same inputs.
    `fn` maps a batch (the same pytree of `(batch_size, ...)` global arrays) to per-example outputs, and must
    treat rows independently (a jitted `embed_audio` / `embed_text`). The last partial batch is padded by
    repeating its last example and the padded rows are dropped, so every example is embedded exactly once and
    one compiled shape serves the whole set. `batch_size` must be a multiple of the batch-axis device count.
    """
    leaves, treedef = jax.tree_util.tree_flatten(inputs)
    if not leaves:
        raise ValueError("embed_in_batches got no input arrays")
    sizes = {len(leaf) for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(f"embed_in_batches: inputs have different leading sizes {sorted(sizes)}")
    (total,) = sizes
    if total == 0:
        raise ValueError("embed_in_batches: the evaluation set is empty")
    check_eval_batch_size(batch_size, mesh)
    placement = sharding.batch_sharding(mesh)

    def place(start: int) -> Any:
        arrays = []
        for leaf in leaves:
            chunk = np.asarray(leaf[start : start + batch_size])
            if len(chunk) < batch_size:  # last batch: repeat the final example; its outputs are dropped below
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
            arrays.append(jax.make_array_from_callback(chunk.shape, placement, lambda index, c=chunk: c[index]))
        return jax.tree_util.tree_unflatten(treedef, arrays)

    outputs: list[np.ndarray] = []
    with tqdm(total=total, desc=desc, unit="ex", disable=not progress or jax.process_index() != 0) as bar:
        pending = None  # one batch in flight: the next batch is read and placed while the device computes
        for start in range(0, total, batch_size):
            result = fn(place(start))
            if pending is not None:
                outputs.append(_to_host(pending[1])[: pending[0]])
                bar.update(pending[0])
            pending = (min(batch_size, total - start), result)
        outputs.append(_to_host(pending[1])[: pending[0]])
        bar.update(pending[0])
    return np.concatenate(outputs)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation inside training


def metric_records(name: str, table: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """`{dim: metrics}` of one data set → flat log keys: `eval/<name>/<metric>` at the full (largest) size,
    `eval/<name>/<dim>/<metric>` at each smaller Matryoshka size."""
    full = max(table)
    records = {}
    for dim, metrics in table.items():
        prefix = f"eval/{name}/" if dim == full else f"eval/{name}/{dim}/"
        records.update({prefix + key: float(value) for key, value in metrics.items()})
    return records


def evaluate_during_training(
    embedder: Any, eval_sets: Sequence[Any], dims: Sequence[int], *, templates: Sequence[str] = DEFAULT_TEMPLATES
) -> dict[str, float]:
    """Score every `eval_tasks.EvalData` (decoded once, before training) with the current model.

    `embedder` is an `eval_tasks.SupportsEmbedding` over the current parameters; `dims` the model's Matryoshka sizes.
    Returns the flat records of `metric_records` for `metrics.jsonl`, e.g. `eval/clotho/t2a_R@1`, and what
    they were measured on: `eval/<set>/clips` (and `captions`, `classes`, `questions` where the set has them)
    and `eval/<set>/skipped/<reason>` for every reason the set counts, zeros included, so that a set's keys
    are the same at every evaluation.
    """
    from wavlink_jax import eval_tasks  # eval_tasks builds on this module's metrics

    records: dict[str, float] = {}
    for data in eval_sets:
        records.update(metric_records(data.name, eval_tasks.evaluate_data(embedder, data, dims, templates=templates)))
        records.update({f"eval/{data.name}/{key}": float(n) for key, n in data.sizes().items()})
        records.update({f"eval/{data.name}/skipped/{reason}": float(n) for reason, n in data.skipped.items()})
    return records


# ---------------------------------------------------------------------------------------------------------------
# Command line: python -m wavlink_jax.evaluate --workdir W --datasets ... --out results.json


def open_dataset(entry: str, args: argparse.Namespace) -> tuple[str, Callable[..., Any]]:
    """One `--datasets` entry → its name and `decode(window_seconds=..., long_clips=...)`, which returns its
    `eval_tasks.EvalData`.

    The entry's source is opened here (a manifest read and checked, a prepared data set's split found, AIR-Bench's
    metadata parsed and its audio files found), so that a bad entry stops the run before the model is loaded
    and before any other set is evaluated. Decoding waits for the model's window.
    """
    from wavlink_jax import eval_tasks
    from wavlink_jax.data.sources import open_source

    name, _, manifest = entry.partition("=")
    if not name:
        raise ValueError(f"--datasets entry {entry!r} has no name: write NAME=path/to/manifest.jsonl")
    if manifest:
        spec: Any = manifest
    elif name == "airbench":
        if not args.airbench_dir:
            raise ValueError("--datasets airbench needs --airbench-dir (the folder holding Foundation_meta.json)")
        tasks = args.airbench_tasks.split(",") if args.airbench_tasks else None
        eval_tasks.load_airbench_foundation(args.airbench_dir, tasks=tasks)  # metadata parsed, audio files exist
        return name, functools.partial(
            eval_tasks.load_airbench_data,
            args.airbench_dir,
            tasks=tasks,
            choices_with_question=args.airbench_choices_with_question,
            max_questions=args.max_clips,
        )
    elif name == "synthetic":
        spec = str(Path(args.synthetic_dir) / "eval.jsonl")
    elif name in eval_tasks.PAPER_SETS:
        if not args.data_dir:
            raise ValueError(f"--datasets {name} needs --data-dir (where wavlink_jax.data.tfds_builders prepared it)")
        prepared, split = eval_tasks.PAPER_SETS[name]
        spec = {"kind": "tfds", "name": prepared, "data_dir": args.data_dir, "split": split}
    else:
        known = sorted([*eval_tasks.PAPER_SETS, "airbench", "synthetic"])
        raise ValueError(f"unknown data set {name!r}: use one of {known} or NAME=path/to/manifest.jsonl")
    open_source(spec)
    return name, functools.partial(eval_tasks.load_eval_data, name, spec, max_clips=args.max_clips)


def format_table(name: str, table: Mapping[int, Mapping[str, float]]) -> str:
    """A plain-text table of one data set's metrics: one row per metric, one column per dimension."""
    dims = sorted(table, reverse=True)
    keys = list(table[dims[0]])
    width = max(len(key) for key in keys) + 2
    lines = [f"{name:<{width}}" + "".join(f"{dim:>9}" for dim in dims)]
    lines += [f"{key:<{width}}" + "".join(f"{table[dim][key]:>9.2f}" for dim in dims) for key in keys]
    return "\n".join(lines)


def _write_results(
    results: dict[str, Any], combined: Mapping[int, Mapping[str, float]], args: argparse.Namespace
) -> None:
    """`--out` and, with several sizes, the Matryoshka plot (results first: a plot that fails loses no figures),
    each replaced whole, never left half-written."""
    if jax.process_index() != 0:
        return
    out = Path(args.out)
    plot = (Path(args.plot) if args.plot else out.with_suffix(".png")) if len(combined) > 1 else None
    if plot is not None:
        results["plot"] = str(plot.absolute())  # absolute: a later run from another folder finds the same file
    else:
        _remove_earlier_plot(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_text(out, json.dumps(results, indent=1) + "\n")
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        with replaced(plot) as partial:
            plot_matryoshka(combined, str(partial))


def _remove_earlier_plot(out: Path) -> None:
    """A one-size run draws no plot, so the plot an earlier run recorded in `out` (about to be replaced) would
    stay beside the new results, showing other figures: it is removed, and the run says so. Only an absolute
    path is trusted (a relative one was relative to the earlier run's folder)."""
    try:
        earlier = json.loads(out.read_text()).get("plot")
    except (OSError, ValueError, AttributeError):  # no earlier results, or not ours
        return
    if isinstance(earlier, str) and Path(earlier).is_absolute() and Path(earlier).is_file():
        Path(earlier).unlink()
        print(f"removed {earlier}, the plot of an earlier run into {out}: one size has nothing to plot", flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate a workdir's checkpoint (or an exported model) on the requested data sets; returns what is
    written to `--out`.

    Every data set is opened and every template checked before the model is loaded (a typo in any entry costs
    seconds), and `--out` is written again after each set, so a set that fails later keeps the finished sets'
    results.
    """
    from wavlink_jax import eval_tasks, inference

    templates = tuple(args.template) if args.template else DEFAULT_TEMPLATES
    check_templates(templates)
    datasets = [open_dataset(entry, args) for entry in args.datasets.split(",")]
    eval_tasks.check_set_names([name for name, _ in datasets], "--datasets")

    embedder = inference.load(
        args.model,
        args.step,
        batch_size=args.batch_size,
        dtype=args.dtype,
        progress=True,
        window_seconds=args.window_seconds,
    )
    trained = list(embedder.config.matryoshka_dims)
    dims = args.dims or trained
    if not set(dims) <= set(trained):  # before any set is decoded
        given = ",".join(map(str, dims))
        raise ValueError(f"--dims {given}: this model was trained at the sizes {trained}; choose among them")
    if args.plot and len(dims) < 2:
        raise ValueError(f"--plot draws the metrics against the Matryoshka size, and this run has one ({dims[0]}): "
                         f"give --dims with two or more of {trained}, or leave --plot out")
    window_seconds = embedder.window_seconds  # the model's training window unless --window-seconds

    results: dict[str, Any] = {
        "model": embedder.loaded.source,
        "step": embedder.loaded.step,
        "dims": sorted(dims, reverse=True),
        "window_seconds": window_seconds,
        "long_clips": args.long_clips,
        "templates": list(templates),
        "datasets": {},
    }
    combined: dict[int, dict[str, float]] = {dim: {} for dim in dims}
    for name, decode in datasets:
        data = decode(window_seconds=window_seconds, long_clips=args.long_clips)
        table = eval_tasks.evaluate_data(embedder, data, dims, templates=templates)
        if jax.process_index() == 0:
            print(format_table(name, table), flush=True)
        results["datasets"][name] = {**data.summary(), "metrics": {str(d): m for d, m in table.items()}}
        for dim, metrics in table.items():
            combined[dim].update({f"{name}/{key}": value for key, value in metrics.items()})
        _write_results(results, combined, args)
    return results


def size_list(text: str) -> list[int]:
    """argparse type of --dims: comma-separated distinct positive whole numbers."""
    sizes = [cli.positive_int(part.strip()) for part in text.split(",")]
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a size")
    return sizes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m wavlink_jax.evaluate",
        description="Retrieval, zero-shot and AIR-Bench evaluation of a trained model at every Matryoshka size.",
    )
    parser.add_argument(
        "--workdir",
        "--model",
        dest="model",
        required=True,
        type=os.path.expanduser,
        help="training run directory (config.json, checkpoints/) or a directory written by wavlink_jax.export",
    )
    parser.add_argument("--step", type=int, help="checkpoint step of a workdir (default: the latest)")
    parser.add_argument(
        "--datasets",
        required=True,
        help="comma-separated: clotho, audiocaps, esc50, us8k, vggsound (prepared in --data-dir), airbench "
        "(--airbench-dir), synthetic (--synthetic-dir), or NAME=path/to/manifest.jsonl",
    )
    parser.add_argument(
        "--out", required=True, type=cli.output_file,
        help="results JSON file (the Matryoshka plot goes beside it)",
    )
    parser.add_argument(
        "--data-dir", type=os.path.expanduser,
        help="TFDS data dir of the data sets prepared by wavlink_jax.data.tfds_builders",
    )
    parser.add_argument(
        "--synthetic-dir", default="data/synthetic", type=os.path.expanduser,
        help="the generated data set (eval.jsonl)",
    )
    parser.add_argument(
        "--airbench-dir", type=os.path.expanduser,
        help="AIR-Bench's Foundation folder (Foundation_meta.json + audio)",
    )
    parser.add_argument("--airbench-tasks", help="comma-separated AIR-Bench task names to keep (default: all)")
    parser.add_argument(
        "--airbench-choices-with-question",
        action="store_true",
        help='embed each AIR-Bench choice as "{question} {choice}" (default: the choice text alone, as in the paper)',
    )
    parser.add_argument(
        "--batch-size", type=cli.positive_int, default=64, help="per forward pass, over all local devices"
    )
    parser.add_argument(  # float16: refused in training; on a CPU it failed after loading, in XLA's words
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype of the towers"
    )
    parser.add_argument(
        "--dims", type=size_list, help="comma-separated Matryoshka sizes, among the model's (default: all of them)"
    )
    parser.add_argument("--template", action="append", help="zero-shot prompt template with {} (repeatable)")
    parser.add_argument(
        "--max-clips", type=cli.positive_int,
        help="evaluate the first N clips (AIR-Bench: questions) of each set only (smoke tests)",
    )
    parser.add_argument(
        "--window-seconds",
        type=float,
        help="the audio window: the head crop of every clip, or with --long-clips mean the length of each of its "
        "windows (default: the model's training window; at most the audio tower's 30 s)",
    )
    parser.add_argument(
        "--long-clips", choices=LONG_CLIPS, default="head",
        help="a clip longer than the window: 'head' scores its first window (default), 'mean' decodes it whole and "
        "scores the mean of the embeddings of its consecutive windows, weighted by the audio in each",
    )
    parser.add_argument(
        "--plot", type=cli.output_file,
        help="PNG of the headline metrics against dimension (default: OUT with .png)",
    )
    args = parser.parse_args(argv)
    with cli.user_errors(out_of_memory=cli.LOWER_BATCH_SIZE_ADVICE):
        run(args)


if __name__ == "__main__":
    main()
