"""Evaluation data sets: the paper's benchmarks, AIR-Bench's multiple-choice metadata, and scoring a model on them.

`EvalData` is one decoded evaluation set (waveforms plus captions / labels / questions); `evaluate_data`
embeds it with any `SupportsEmbedding` model (full-size embeddings, computed once) and scores every protocol
the set supports at every Matryoshka size, with the metrics of `wavlink_jax.evaluate`.

AIR-Bench (Yang et al., ACL 2024, github.com/OFA-Sys/AIR-Bench) releases its foundation benchmark as a folder

    ROOT/Foundation_meta.json                        a JSON list of questions
    ROOT/{task_name}_{dataset_name}/{path}           the audio of each question

where each question is an object with `path`, `question`, `choice_a`, `choice_b`, optional `choice_c`,
`choice_d` (some tasks have two or three choices), `answer_gt` (the text of the correct choice),
`task_name`, `dataset_name` and `uniq_id`. As in AIR-Bench's own inference script, the audio of the
`Audio_Grounding` task is the `.flac` file named like `path` (whose metadata says `.wav`). Questions are scored
per `{task_name}_{dataset_name}` (AIR-Bench's `score_foundation.py` key).

An embedding model answers by embedding each choice's text and picking the choice nearest to the clip's audio
embedding (`evaluate.multiple_choice_metrics`), as the WavLink paper describes. The question is left out by
default; `choices_with_question=True` embeds `"{question} {choice}"` instead (a variant, not the paper's protocol).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from wavlink_jax import evaluate
from wavlink_jax.data import audio_io, pipeline
from wavlink_jax.waveform_layout import check_long_clips

AIRBENCH_METADATA = "Foundation_meta.json"
_CHOICE_FIELDS = ("choice_a", "choice_b", "choice_c", "choice_d")
_REQUIRED_FIELDS = ("path", "question", "choice_a", "choice_b", "answer_gt", "task_name", "dataset_name", "uniq_id")


@dataclasses.dataclass(frozen=True)
class MultipleChoiceQuestion:
    """One AIR-Bench foundation question; `answer` indexes `choices`."""

    id: str
    task: str
    audio: str
    question: str
    choices: tuple[str, ...]
    answer: int

    def choice_texts(self, with_question: bool = False) -> list[str]:
        """The texts embedded for the choices: each choice alone (the paper's protocol), or, `with_question`,
        the question and the choice joined by a space."""
        return [f"{self.question} {choice}" if with_question else choice for choice in self.choices]


def _parse_question(item: Any, root: Path, where: str) -> MultipleChoiceQuestion:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    missing = [field for field in _REQUIRED_FIELDS if item.get(field) in (None, "")]
    if missing:
        raise ValueError(f"{where} (uniq_id {item.get('uniq_id')!r}): missing or empty fields {missing}")
    # One choice per text: AIR-Bench grades by the answer's text, and a second copy of the answer tied with it
    # counted the question as missed (ties count against the model).
    choices = tuple(dict.fromkeys(str(item[field]) for field in _CHOICE_FIELDS if item.get(field) not in (None, "")))
    answer = str(item["answer_gt"])
    if answer not in choices:
        raise ValueError(f"{where} (uniq_id {item['uniq_id']!r}): answer_gt {answer!r} is none of the choices {choices}")
    path = str(item["path"])
    if item["task_name"] == "Audio_Grounding":
        path = str(Path(path).with_suffix(".flac"))
    task = f"{item['task_name']}_{item['dataset_name']}"
    return MultipleChoiceQuestion(
        id=str(item["uniq_id"]),
        task=task,
        audio=str(root / task / path),
        question=str(item["question"]),
        choices=choices,
        answer=choices.index(answer),
    )


def load_airbench_foundation(
    root: str | os.PathLike, *, tasks: Sequence[str] | None = None, check_audio: bool = True
) -> list[MultipleChoiceQuestion]:
    """The questions of AIR-Bench's foundation benchmark in `root` (the folder holding `Foundation_meta.json`).

    `tasks` keeps only questions whose `task_name` or `{task_name}_{dataset_name}` is listed (an unknown name
    is an error listing the available ones). With `check_audio`, a question whose audio file is absent is an
    error (listing the first missing files) rather than a silently smaller benchmark.
    """
    root = Path(root).expanduser()
    metadata = root / AIRBENCH_METADATA
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} not found: point --airbench-dir at AIR-Bench's Foundation folder")
    try:
        items = json.loads(metadata.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{metadata}: not valid JSON ({err})") from err
    if not isinstance(items, list) or not items:
        raise ValueError(f"{metadata}: expected a non-empty JSON list of questions")
    questions = [_parse_question(item, root, f"{metadata}[{index}]") for index, item in enumerate(items)]
    if tasks is not None:
        names = {q.task for q in questions} | {str(item["task_name"]) for item in items}
        unknown = sorted(set(tasks) - names)
        if unknown:
            raise ValueError(f"{metadata}: unknown AIR-Bench tasks {unknown}; available: {sorted(names)}")
        keep = set(tasks)
        questions = [q for q, item in zip(questions, items) if q.task in keep or str(item["task_name"]) in keep]
    if check_audio:
        absent = [q.audio for q in questions if not os.path.isfile(q.audio)]
        if absent:
            raise FileNotFoundError(
                f"{len(absent)} of {len(questions)} AIR-Bench audio files are missing under {root}, e.g. "
                f"{absent[:3]}; download the Foundation audio folders or restrict the tasks"
            )
    return questions


def choice_embeddings(
    questions: Sequence[MultipleChoiceQuestion],
    embed_text_fn: Callable[[list[str]], np.ndarray],
    *,
    with_question: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed every choice text (`MultipleChoiceQuestion.choice_texts(with_question)`) once: `(questions,
    max_choices, dim)` embeddings and the `(questions, max_choices)` mask of real choices. Unused slots repeat
    the question's first choice (never scored), so every slot stays a unit vector that Matryoshka truncation
    can re-normalise."""
    if not questions:
        raise ValueError("no multiple-choice questions to embed")
    texts = [text for q in questions for text in q.choice_texts(with_question)]
    flat = np.asarray(embed_text_fn(texts), np.float32)
    if flat.ndim != 2 or flat.shape[0] != len(texts):
        raise ValueError(f"embed_text_fn returned shape {flat.shape} for {len(texts)} texts; expected (n, dim)")
    counts = np.array([len(q.choices) for q in questions])
    width = int(counts.max())
    mask = np.arange(width)[None, :] < counts[:, None]
    starts = np.cumsum(counts) - counts
    # Unused slot j of question q points back at that question's first choice.
    index = np.where(mask, starts[:, None] + np.arange(width)[None, :], starts[:, None])
    return flat[index], mask


# ---------------------------------------------------------------------------------------------------------------
# Evaluation data sets: decoded once, embedded by any model, scored with the protocols of `evaluate`

# The paper's benchmarks as prepared by `wavlink_jax.data.tfds_builders`: name → (prepared data set, split).
PAPER_SETS: dict[str, tuple[str, str]] = {
    "audiocaps": ("audiocaps", "test"),  # AudioCaps test: 975 clips × 5 captions (~4.9k captions)
    "clotho": ("clotho", "test"),  # Clotho v2.1 evaluation split: 1045 clips × 5 captions
    "esc50": ("esc50", "train"),  # all 2000 clips; accuracy per fold (1-5), then averaged
    "us8k": ("us8k", "train"),  # all 8732 clips; accuracy per fold (1-10), then averaged
    "vggsound": ("vggsound", "test"),  # VGGSound test split, 309 classes
}


class SupportsEmbedding(Protocol):
    """What evaluation needs from a model: full-size, L2-normalised numpy embeddings (e.g.
    `inference.Embedder`, `train_step.StateEmbedder`)."""

    def embed_audio(self, waveforms: np.ndarray | evaluate.ClipWindows) -> np.ndarray:
        """(N, samples) float32 16 kHz windows, an array or `evaluate.ClipWindows` (which `embed_in_batches`
        slices) → (N, E)."""

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """N strings → (N, E)."""


@dataclasses.dataclass
class EvalData:
    """One evaluation set decoded in memory, scored by every protocol its content allows.

    Retrieval when it has captions (`text_to_audio[i]` = clip of caption i), zero-shot classification when
    its clips have labels (classes = its distinct labels; per-fold accuracy averaged when `folds` is given),
    multiple choice when it has `questions` (question i is about clip `question_audio[i]`; each choice's
    text embedded alone, or after its question with `choices_with_question`). `long_clips` says how its clips
    are embedded: "head", `waveforms` holds their head windows `(N, window_samples)`; "mean", it holds the whole
    clips (a list), each embedded as the mean of its `window_samples` windows' embeddings (`evaluate.ClipWindows`).
    """

    name: str
    waveforms: np.ndarray | list[np.ndarray]
    captions: list[str] = dataclasses.field(default_factory=list)
    text_to_audio: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    labels: list[str] = dataclasses.field(default_factory=list)
    folds: np.ndarray | None = None
    questions: list[MultipleChoiceQuestion] = dataclasses.field(default_factory=list)
    question_audio: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    choices_with_question: bool = False
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    long_clips: str = "head"
    window_samples: int = 0  # "mean": the windows' length ("head": the rows' length)

    def __post_init__(self):
        check_long_clips(self.long_clips)
        if self.long_clips == "mean" and self.window_samples < 1:
            raise ValueError(f"evaluation set {self.name!r}: long_clips='mean' needs the windows' length, "
                             f"window_samples = {self.window_samples}")

    @property
    def class_names(self) -> list[str]:
        return sorted(set(self.labels))

    def sizes(self) -> dict[str, int]:
        """What the metrics were measured on: `clips`, and `captions` / `classes` / `questions` where present."""
        out = {"clips": int(len(self.waveforms))}
        if self.captions:
            out["captions"] = len(self.captions)
        if any(self.labels):
            out["classes"] = len(self.class_names)
        if self.questions:
            out["questions"] = len(self.questions)
        return out

    def summary(self) -> dict[str, Any]:
        """Sizes, the multiple-choice text format (with questions) and skipped inputs (reasons that occurred),
        for the results file."""
        out: dict[str, Any] = self.sizes()
        if self.questions:
            out["choice_text"] = "{question} {choice}" if self.choices_with_question else "{choice}"
        out["skipped"] = {reason: n for reason, n in self.skipped.items() if n}
        return out


def check_set_names(names: Sequence[str], where: str) -> None:
    """Refuse a name given to several evaluation sets: their metrics, keyed by the name (`eval/<name>/...`, the
    results file), would overwrite each other's. `where` names the setting (`--datasets`, `config.eval.sets`)."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"{where} names {repeated} more than once; give each evaluation set its own name (its metrics are "
            "recorded under it)"
        )


def _check_labels(name: str, labels: Sequence[str], ids: Sequence[str]) -> list[str]:
    """All clips labelled, or none (an unlabelled clip among labelled ones has no zero-shot target). `ids` name
    the clips in errors (a position would count only the clips that decoded)."""
    unlabelled = [i for i, label in enumerate(labels) if not label]
    if unlabelled and len(unlabelled) < len(labels):
        raise ValueError(
            f"evaluation set {name!r}: {len(unlabelled)} of {len(labels)} clips have no label (first: "
            f"{ids[unlabelled[0]]}); zero-shot classification needs a label on every clip: give every clip a "
            "label, or none (a retrieval-only set)"
        )
    return list(labels) if not unlabelled else []


def _check_folds(name: str, folds: np.ndarray | None, ids: Sequence[str]) -> None:
    """A fold on every clip, or on none: fold-less clips (fold 0) among folded ones would be scored as one more
    fold, weighted like a whole fold in the per-fold average."""
    if folds is None:
        return
    foldless = np.flatnonzero(folds == 0)
    if len(foldless):
        raise ValueError(
            f"evaluation set {name!r}: {len(foldless)} of {len(folds)} clips have no fold (first: {ids[foldless[0]]}); "
            "zero-shot accuracy averaged over folds needs a fold (1, 2, ...) on every clip, or on none (one accuracy "
            "over all clips)"
        )


def _check_captions(name: str, text_to_audio: np.ndarray, ids: Sequence[str], blank: int) -> None:
    """All clips captioned, or none (an uncaptioned clip among captioned ones has no audio→text rank). `ids`
    name the clips in errors (a position would count only the clips that decoded); `blank`: the set's blank
    captions, dropped before this (a clip whose captions were all blank has none)."""
    uncaptioned = np.flatnonzero(np.bincount(text_to_audio, minlength=len(ids)) == 0)
    if len(text_to_audio) and len(uncaptioned):
        dropped = f", blank captions being dropped ({blank} in this set)" if blank else ""
        raise ValueError(
            f"evaluation set {name!r}: {len(uncaptioned)} of {len(ids)} clips have no caption (first: "
            f"{ids[uncaptioned[0]]}{dropped}); retrieval needs a caption on every clip: keep the captioned and the "
            "labelled-only clips in separate sets"
        )


def _decoded_window(window_seconds: float, long_clips: str) -> float | None:
    """What `pipeline.make_eval_set` keeps of each clip: the head window, or all of it (None) for "mean"; the
    settings are checked before anything is decoded."""
    check_long_clips(long_clips)
    if isinstance(window_seconds, bool) or not isinstance(window_seconds, numbers.Real) or not window_seconds > 0:
        raise ValueError(f"window_seconds = {window_seconds!r}: give the window in seconds, more than 0 (with "
                         "long_clips='mean' it is the length of each window)")
    return window_seconds if long_clips == "head" else None


def load_eval_data(
    name: str,
    source: Mapping[str, Any] | str | os.PathLike,
    *,
    window_seconds: float,
    long_clips: str = "head",
    max_clips: int | None = None,
    read_threads: int = 4,
) -> EvalData:
    """Decode a source (a `DataConfig.sources` spec: manifest, prepared TFDS data set, ...) for evaluation.

    Clips are head-cropped to `window_seconds` (shorter ones zero-padded), or with `long_clips="mean"` kept whole,
    to be embedded as the means of their windows of `window_seconds`; unreadable clips are skipped and counted in
    `skipped` (by reason), never silently. `max_clips` keeps the first clips only (quick checks during training;
    never for reported numbers).
    """
    data = pipeline.make_eval_set(
        source,
        window_seconds=_decoded_window(window_seconds, long_clips),
        require_captions=False,
        max_clips=max_clips,
        read_threads=read_threads,
    )
    _check_captions(name, np.asarray(data.text_to_audio), data.ids, data.skip_counts.get("blank_captions", 0))
    labels = _check_labels(name, data.labels, data.ids)
    if labels:
        _check_folds(name, data.folds, data.ids)
    return EvalData(
        name=name,
        waveforms=data.waveforms,
        captions=list(data.captions),
        text_to_audio=np.asarray(data.text_to_audio, np.int64),
        labels=labels,
        folds=data.folds,
        skipped=dict(data.skip_counts),
        long_clips=long_clips,
        window_samples=audio_io.samples(window_seconds),
    )


def load_airbench_data(
    root: str | os.PathLike,
    *,
    window_seconds: float,
    long_clips: str = "head",
    tasks: Sequence[str] | None = None,
    choices_with_question: bool = False,
    max_questions: int | None = None,
    read_threads: int = 4,
) -> EvalData:
    """AIR-Bench foundation questions with their audio decoded (each distinct file once), head-cropped to
    `window_seconds` or whole (`long_clips="mean"`), as `load_eval_data` decodes clips.

    A question whose audio cannot be decoded is dropped and counted in `skipped["questions_dropped"]` (its
    clip's reason is counted too). Each choice is scored by its text alone (the paper's protocol), or by
    `"{question} {choice}"` with `choices_with_question`. `max_questions` keeps the first questions only, and
    decodes only their audio (quick checks; never for reported numbers).
    """
    pipeline.check_count_limit("max_questions", max_questions)
    questions = load_airbench_foundation(root, tasks=tasks)[:max_questions]
    paths = sorted({q.audio for q in questions})
    records = [{"id": path, "audio": path, "sample_rate": 0, "captions": [], "label": ""} for path in paths]
    data = pipeline.make_eval_set(
        {"kind": "source", "source": records},
        window_seconds=_decoded_window(window_seconds, long_clips),
        require_captions=False,
        read_threads=read_threads,
    )
    row = {clip_id: index for index, clip_id in enumerate(data.ids)}
    kept = [q for q in questions if q.audio in row]
    return EvalData(
        name="airbench",
        waveforms=data.waveforms,
        questions=kept,
        question_audio=np.array([row[q.audio] for q in kept], np.int64),
        choices_with_question=choices_with_question,
        skipped={**data.skip_counts, "questions_dropped": len(questions) - len(kept)},
        long_clips=long_clips,
        window_samples=audio_io.samples(window_seconds),
    )


def _score(
    audio_emb: np.ndarray,
    text_emb: np.ndarray | None = None,
    template_emb: np.ndarray | None = None,
    choice_emb: np.ndarray | None = None,
    *,
    data: EvalData,
    choice_mask: np.ndarray | None = None,
) -> dict[str, float]:
    """Every protocol `data` supports, at the size of the given embeddings."""
    metrics: dict[str, float] = {}
    if text_emb is not None:
        metrics.update(evaluate.retrieval_metrics(audio_emb, text_emb, data.text_to_audio))
    if template_emb is not None:
        class_emb = evaluate.class_embeddings(template_emb)
        index = {name: i for i, name in enumerate(data.class_names)}
        labels = np.array([index[label] for label in data.labels])
        if data.folds is None:
            metrics.update(evaluate.zero_shot_metrics(audio_emb, labels, class_emb))
        else:
            metrics.update(evaluate.zero_shot_by_fold(audio_emb, labels, class_emb, data.folds))
    if choice_emb is not None:
        metrics.update(
            evaluate.multiple_choice_metrics(
                audio_emb[data.question_audio],
                choice_emb,
                choice_mask,
                [q.answer for q in data.questions],
                [q.task for q in data.questions],
            )
        )
    return metrics


def evaluate_data(
    embedder: SupportsEmbedding,
    data: EvalData,
    dims: Sequence[int],
    *,
    templates: Sequence[str] = evaluate.DEFAULT_TEMPLATES,
) -> dict[int, dict[str, float]]:
    """Embed `data` once at full size and score it at every Matryoshka size in `dims` ({dim: metrics})."""
    if data.long_clips == "head":
        audio_emb = np.asarray(embedder.embed_audio(data.waveforms))
    else:
        windows = evaluate.ClipWindows(data.waveforms, data.window_samples)
        audio_emb = windows.mean(embedder.embed_audio(windows))
    embeddings = {"audio_emb": audio_emb}
    if data.captions:
        embeddings["text_emb"] = np.asarray(embedder.embed_text(data.captions))
    if data.labels:
        prompts = evaluate.prompt_texts(data.class_names, templates)
        template_emb = np.asarray(embedder.embed_text(prompts))
        embeddings["template_emb"] = template_emb.reshape(len(data.class_names), len(templates), -1)
    choice_mask = None
    if data.questions:
        embeddings["choice_emb"], choice_mask = choice_embeddings(
            data.questions, embedder.embed_text, with_question=data.choices_with_question
        )
    if len(embeddings) == 1:
        raise ValueError(f"evaluation set {data.name!r} has no captions, labels or questions: nothing to score")
    metric_fn = functools.partial(_score, data=data, choice_mask=choice_mask)
    return evaluate.matryoshka_table(metric_fn, embeddings, dims)
