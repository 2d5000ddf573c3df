"""Evaluation metrics against brute-force references (explicit loops over small sets) and constructed cases."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import statistics
import types
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wavlink_jax import eval_tasks, sharding
from wavlink_jax import evaluate as ev


# ---------------------------------------------------------------------------------------------------------------
# Brute-force reference: explicit loops, each query sorts its items by (score desc, wrong before correct).


def _ranked_correct_positions(scores: list[float], correct: list[bool]) -> list[int]:
    """1-based positions of the correct items in the pessimistic ranked list."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], correct[j]))
    return [position + 1 for position, j in enumerate(order) if correct[j]]


def _dot(u: np.ndarray, v: np.ndarray) -> float:
    return sum(float(x) * float(y) for x, y in zip(u, v))


def brute_force_retrieval(audio: np.ndarray, text: np.ndarray, text_to_audio: list[int]) -> dict[str, float]:
    t2a_ranks = []
    for i in range(len(text)):
        scores = [_dot(text[i], audio[j]) for j in range(len(audio))]
        correct = [j == text_to_audio[i] for j in range(len(audio))]
        (rank,) = _ranked_correct_positions(scores, correct)
        t2a_ranks.append(rank)
    best_ranks, average_precisions = [], []
    for a in range(len(audio)):
        scores = [_dot(audio[a], text[i]) for i in range(len(text))]
        correct = [text_to_audio[i] == a for i in range(len(text))]
        positions = _ranked_correct_positions(scores, correct)
        best_ranks.append(positions[0])
        hits = [(k + 1) / position for k, position in enumerate(positions) if position <= 10]
        average_precisions.append(sum(hits) / min(len(positions), 10))
    out = {}
    for k in (1, 5, 10):
        out[f"t2a_R@{k}"] = 100.0 * sum(rank <= k for rank in t2a_ranks) / len(t2a_ranks)
        out[f"a2t_R@{k}"] = 100.0 * sum(rank <= k for rank in best_ranks) / len(best_ranks)
    out["t2a_mAP@10"] = 100.0 * sum(1.0 / rank if rank <= 10 else 0.0 for rank in t2a_ranks) / len(t2a_ranks)
    out["a2t_mAP@10"] = 100.0 * sum(average_precisions) / len(average_precisions)
    out["t2a_medR"] = float(statistics.median(t2a_ranks))
    out["a2t_medR"] = float(statistics.median(best_ranks))
    return out


def _quantized(rng: np.random.Generator, shape: tuple[int, ...], levels: int) -> np.ndarray:
    """Small-integer embeddings: every dot product is exact in float32, so ties are real ties."""
    return rng.integers(-levels, levels + 1, size=shape).astype(np.float32)


def _assert_metrics_equal(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], abs=1e-9), key


# ---------------------------------------------------------------------------------------------------------------
# Retrieval


@pytest.mark.parametrize(
    "captions_per_clip, levels",
    [(1, 50), (5, 50), ("variable", 50), (1, 1), (5, 1), ("variable", 1)],
    ids=["1cap", "5cap", "varcap", "1cap-ties", "5cap-ties", "varcap-ties"],
)
def test_retrieval_matches_brute_force(captions_per_clip, levels):
    rng = np.random.default_rng(list(f"{captions_per_clip}/{levels}".encode()))  # the same seed in every run
    num_clips, dim = 23, 6 if levels > 1 else 3  # levels=1, dim 3: only 27 distinct vectors, ties everywhere
    counts = rng.integers(1, 14, num_clips) if captions_per_clip == "variable" else np.full(num_clips, captions_per_clip)
    text_to_audio = rng.permutation(np.repeat(np.arange(num_clips), counts))
    audio = _quantized(rng, (num_clips, dim), levels)
    text = audio[text_to_audio] + _quantized(rng, (len(text_to_audio), dim), levels)
    expected = brute_force_retrieval(audio, text, text_to_audio.tolist())
    _assert_metrics_equal(ev.retrieval_metrics(audio, text, text_to_audio), expected)
    # Small work chunks (several clips/captions per chunk, uneven last chunk) give identical results.
    _assert_metrics_equal(ev.retrieval_metrics(audio, text, text_to_audio, chunk_elements=200), expected)


def test_retrieval_planted_ties_are_pessimistic():
    # Clip 1 duplicates clip 0; caption 0 (of clip 0) and caption 2 (of clip 1) tie across both clips.
    audio = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    text = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    text_to_audio = [0, 2, 1, 2]
    metrics = ev.retrieval_metrics(audio, text, text_to_audio)
    # T2A: captions 0 and 2 rank their clip 2nd (tied with the duplicate); captions 1 and 3 rank 1st.
    assert metrics["t2a_R@1"] == 50.0
    assert metrics["t2a_medR"] == 1.5
    assert metrics["t2a_mAP@10"] == pytest.approx(100 * (0.5 + 1 + 0.5 + 1) / 4)
    # A2T: clip 0 ties captions 0 (its own) and 2 → its caption ranks 2nd; clip 1 likewise; clip 2 has captions
    # 1 and 3 tied with each other and above everything else → ranks 1 and 2, AP = 1.
    assert metrics["a2t_R@1"] == pytest.approx(100 / 3)
    assert metrics["a2t_mAP@10"] == pytest.approx(100 * (0.5 + 0.5 + 1.0) / 3)
    _assert_metrics_equal(metrics, brute_force_retrieval(audio, text, text_to_audio))


@pytest.mark.parametrize("captions_per_clip", [1, 5])
def test_retrieval_perfect_embeddings(captions_per_clip):
    num_clips = 12
    audio = np.eye(num_clips, dtype=np.float32)
    text_to_audio = np.repeat(np.arange(num_clips), captions_per_clip)[::-1].copy()
    metrics = ev.retrieval_metrics(audio, audio[text_to_audio], text_to_audio)
    for key, value in metrics.items():
        assert value == (1.0 if key.endswith("medR") else 100.0), key


def test_retrieval_constant_embeddings_rank_last():
    audio = np.ones((8, 4), np.float32)
    text_to_audio = np.repeat(np.arange(8), 5)
    metrics = ev.retrieval_metrics(audio, np.ones((40, 4), np.float32), text_to_audio)
    assert metrics["t2a_R@1"] == 0.0 and metrics["t2a_medR"] == 8.0
    # Each clip's 5 captions sit behind the 35 wrong ones: best rank 36.
    assert metrics["a2t_R@10"] == 0.0 and metrics["a2t_medR"] == 36.0


def test_float_duplicates_tie_whatever_their_places_in_the_matrix_product():
    """Copies of one float vector tie, so ties count against the model with real embeddings too.

    A float32 BLAS product gives copies in different columns scores a unit in the last place apart, which
    would settle the ties by rounding.
    """
    rng = np.random.default_rng(0)
    num_clips, dim = 1037, 512

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    audio = unit(rng.normal(size=(num_clips, dim)))
    audio[-1] = audio[0]  # the same clip twice in the set
    text = unit(np.repeat(audio, 5, axis=0) + 0.5 * rng.normal(size=(5 * num_clips, dim)))
    text_to_audio = np.repeat(np.arange(num_clips), 5)
    ranks = ev.single_target_ranks(text, audio, text_to_audio)
    assert ranks[:5].min() >= 2 and ranks[-5:].min() >= 2  # each copy's captions tie with the other copy
    # A collapsed model (one vector for every clip, another for every caption) is at the bottom.
    collapsed = ev.retrieval_metrics(
        np.repeat(audio[:1], num_clips, axis=0), np.repeat(text[:1], 5 * num_clips, axis=0), text_to_audio
    )
    assert collapsed["t2a_R@10"] == 0.0 and collapsed["t2a_medR"] == num_clips
    assert collapsed["a2t_R@10"] == 0.0 and collapsed["a2t_medR"] == 5 * num_clips - 4


def test_retrieval_rejects_bad_input():
    audio = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="1 clips have no caption.*\\[2\\]"):
        ev.retrieval_metrics(audio, audio[:2], [0, 1])
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        ev.retrieval_metrics(audio, audio, [0, 1, 3])
    with pytest.raises(ValueError, match="non-finite"):
        ev.retrieval_metrics(np.full((3, 3), np.nan, np.float32), audio, [0, 1, 2])
    with pytest.raises(ValueError, match="dim"):
        ev.retrieval_metrics(audio, np.eye(3, 4, dtype=np.float32), [0, 1, 2])


def test_retrieval_ranks_fp16_embeddings_in_fp32():
    """fp16 model outputs are ranked in fp32 (`_as_embeddings`): scores 1 ± 2^-13 are distinct in fp32 but both
    round to 1.0 in fp16, where the pessimistic tie-break would rank every correct item below its rival."""
    audio = np.array([[1.0, 0.0], [1.0, 2.0**-4]], np.float16)
    text = np.array([[1.0, 2.0**-9], [1.0, -(2.0**-9)]], np.float16)  # caption 0 → clip 1, caption 1 → clip 0
    text_to_audio = [1, 0]
    assert np.all(text @ audio.T == 1.0)  # near ties: every score is 1.0 in fp16 arithmetic
    expected = ev.retrieval_metrics(audio.astype(np.float32), text.astype(np.float32), text_to_audio)
    assert expected["t2a_R@1"] == 100.0  # and not ties in fp32
    assert ev.retrieval_metrics(audio, text, text_to_audio) == expected


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot classification


def test_zero_shot_classifier_averages_normalised_templates():
    rng = np.random.default_rng(0)
    table = {}

    def embed_text(texts):
        for text in texts:
            table.setdefault(text, rng.normal(size=4) * rng.uniform(0.1, 10))
        return np.stack([table[text] for text in texts])

    templates = ("a {}", "the sound of {}")
    classes = ["dog bark", "siren", "rain"]
    class_emb = ev.zero_shot_classifier(embed_text, classes, templates)
    for index, name in enumerate(classes):
        vectors = [table[t.format(name)] / np.linalg.norm(table[t.format(name)]) for t in templates]
        mean = np.mean(vectors, axis=0)
        np.testing.assert_allclose(class_emb[index], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        ev.zero_shot_classifier(embed_text, classes, ("no slot",))


def test_zero_shot_metrics_constructed():
    class_emb = np.eye(6, dtype=np.float32)
    # Scores per clip are the rows themselves: the label's place among the 6 classes is chosen by construction.
    audio = np.array(
        [
            [6, 5, 4, 3, 2, 1],  # label 0: rank 1
            [6, 5, 4, 3, 2, 1],  # label 4: rank 5
            [6, 5, 4, 3, 2, 1],  # label 5: rank 6
            [1, 3, 3, 0, 0, 0],  # label 1: tied with class 2 → rank 2 (pessimistic)
        ],
        np.float32,
    )
    metrics = ev.zero_shot_metrics(audio, [0, 4, 5, 1], class_emb)
    assert metrics == {"top1": 25.0, "top5": 75.0}


def test_negative_indices_are_refused_not_read_from_the_end():
    """A label, caption owner or answer of -1 (e.g. "unknown" in a hand-made label column) is an error: numpy
    indexing would read it as the last class / clip / choice and score the example against a target nobody gave."""
    class_emb = np.eye(3, dtype=np.float32)
    audio = class_emb[[0, 2]]  # clip 1 is nearest to class 2, the last one: label -1 would count as a hit
    outside = r"has entries outside \[0, 3\) \({}\) at positions \[1\]"
    with pytest.raises(ValueError, match="labels " + outside.format("number of classes")):
        ev.zero_shot_metrics(audio, [0, -1], class_emb)
    with pytest.raises(ValueError, match=r"text_to_audio has entries outside \[0, 2\) \(number of clips\) at .*\[2\]"):
        ev.retrieval_metrics(audio, audio[[0, 1, 1]], [0, 1, -1])
    choices = np.stack([class_emb, class_emb])  # 2 questions × 3 choices
    with pytest.raises(ValueError, match="answers " + outside.format("number of choice slots")):
        ev.multiple_choice_metrics(audio, choices, np.ones((2, 3), bool), [0, -1], ["a", "a"])


def test_fold_average_and_zero_shot_by_fold():
    assert ev.fold_average([{"top1": 50.0, "top5": 100.0}, {"top1": 100.0, "top5": 100.0}]) == {
        "top1": 75.0,
        "top5": 100.0,
    }
    with pytest.raises(ValueError, match="fold 1 reports"):
        ev.fold_average([{"top1": 1.0}, {"top5": 1.0}])
    class_emb = np.eye(2, dtype=np.float32)
    audio = np.array([[1, 0], [1, 0], [1, 0], [1, 0], [0, 1]], np.float32)
    labels = np.array([0, 1, 1, 1, 1])
    folds = np.array([1, 1, 1, 1, 2])  # fold 1: 1/4 right; fold 2: 1/1 right
    metrics = ev.zero_shot_by_fold(audio, labels, class_emb, folds)
    assert metrics["top1"] == pytest.approx((25.0 + 100.0) / 2)  # per-fold mean, not the pooled 40%
    assert ev.zero_shot_metrics(audio, labels, class_emb)["top1"] == pytest.approx(40.0)


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice


def test_multiple_choice_metrics():
    audio = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], np.float32)
    choices = np.zeros((4, 4, 3), np.float32)
    choices[0, :2] = [[0, 1, 0], [1, 0, 0]]  # 2 choices, answer 1 nearest → hit
    choices[1] = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0.5, 0]]  # answer 3 is second → miss
    choices[2, :3] = [[0, 0, 1], [0, 0, 1], [1, 0, 0]]  # answer 0 tied with choice 1 → miss
    choices[3, :3] = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]  # answer 0 → hit; masked slot 3 (zeros) ignored
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]], bool)
    metrics = ev.multiple_choice_metrics(audio, choices, mask, [1, 3, 0, 0], ["a", "a", "b", "b"])
    assert metrics == {"acc/a": 50.0, "acc/b": 50.0, "average": 50.0, "overall": 50.0}
    metrics = ev.multiple_choice_metrics(audio, choices, mask, [1, 3, 0, 0], ["a", "b", "b", "b"])
    assert metrics["average"] == pytest.approx((100 + 100 / 3) / 2) and metrics["overall"] == 50.0
    with pytest.raises(ValueError, match="masked-out"):
        ev.multiple_choice_metrics(audio, choices, mask, [2, 3, 0, 0], ["a"] * 4)


# ---------------------------------------------------------------------------------------------------------------
# Matryoshka


def test_matryoshka_uses_truncated_renormalised_prefixes(tmp_path):
    # In 2-D prefixes clip 1 points exactly along caption 0, clip 0 only at 45°; at full size (and with
    # un-normalised prefixes) clip 1's large 3rd coordinate keeps it far from caption 0.
    audio = np.array([[1, 1, 0, 0], [0.5, 0, 3, 0]], np.float32)
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    text = np.array([[1, 0, 0, 0], [0.1, -0.1, 1, 0]], np.float32)
    text_to_audio = [0, 1]
    metric_fn = functools.partial(ev.retrieval_metrics, text_to_audio=text_to_audio)
    plot = tmp_path / "matryoshka.png"
    table = ev.matryoshka_table(metric_fn, {"audio_emb": audio, "text_emb": text}, [2, 4], plot_path=str(plot))
    assert list(table) == [4, 2]
    assert table[4]["t2a_R@1"] == 100.0
    assert metric_fn(audio_emb=audio[:, :2], text_emb=text[:, :2])["t2a_R@1"] == 100.0  # raw prefixes
    assert table[2]["t2a_R@1"] == 50.0
    assert table[2] == metric_fn(audio_emb=ev.truncate_normalize(audio, 2), text_emb=ev.truncate_normalize(text, 2))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="outside"):
        ev.truncate_normalize(audio, 5)


def test_plot_matryoshka_default_keys(tmp_path):
    table = {64: {"clotho/t2a_R@1": 10.0, "esc50/top1": 50.0, "esc50/top5": 80.0}, 512: {"clotho/t2a_R@1": 20.0, "esc50/top1": 60.0, "esc50/top5": 90.0}}
    assert [key for key in table[64] if ev.is_headline_metric(key)] == ["clotho/t2a_R@1", "esc50/top1"]
    ev.plot_matryoshka(table, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0
    with pytest.raises(ValueError, match="missing"):
        ev.plot_matryoshka(table, str(tmp_path / "q.png"), keys=["nope"])


# ---------------------------------------------------------------------------------------------------------------
# AIR-Bench foundation metadata


def _airbench_item(uid, task, dataset, path, question, choices, answer):
    item = {"path": path, "question": question, "answer_gt": answer, "task_name": task, "dataset_name": dataset}
    item.update({f"choice_{letter}": choice for letter, choice in zip("abcd", choices)})
    item["uniq_id"] = uid
    return item


def _write_airbench(root, items, audio=True):
    root.mkdir(parents=True, exist_ok=True)
    (root / "Foundation_meta.json").write_text(json.dumps(items))
    if audio:
        for item in items:
            path = item["path"][:-3] + "flac" if item["task_name"] == "Audio_Grounding" else item["path"]
            target = root / f"{item['task_name']}_{item['dataset_name']}" / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"")
    return root


AIRBENCH_ITEMS = [
    _airbench_item(1, "Sound_AQA", "clotho", "a.wav", "What is heard?", ["a dog", "a car", "rain", "a bell"], "rain"),
    _airbench_item(2, "Speaker_Gender_Recognition", "common_voice", "s/b.wav", "Who speaks?", ["man", "woman"], "woman"),
    _airbench_item(3, "Audio_Grounding", "audiogrounding", "g.wav", "When?", ["0-1s", "2-3s", "4-5s"], "0-1s"),
]


def test_airbench_parsing(tmp_path):
    root = _write_airbench(tmp_path / "Foundation", AIRBENCH_ITEMS)
    questions = eval_tasks.load_airbench_foundation(root)
    assert [q.task for q in questions] == [
        "Sound_AQA_clotho",
        "Speaker_Gender_Recognition_common_voice",
        "Audio_Grounding_audiogrounding",
    ]
    assert [q.answer for q in questions] == [2, 1, 0]
    assert [len(q.choices) for q in questions] == [4, 2, 3]
    assert questions[0].audio == str(root / "Sound_AQA_clotho" / "a.wav")
    assert questions[2].audio == str(root / "Audio_Grounding_audiogrounding" / "g.flac")
    assert questions[1].choice_texts() == ["man", "woman"]  # the paper: the choice text alone
    assert questions[1].choice_texts(with_question=True) == ["Who speaks? man", "Who speaks? woman"]
    assert [q.id for q in eval_tasks.load_airbench_foundation(root, tasks=["Sound_AQA", "Audio_Grounding_audiogrounding"])] == ["1", "3"]
    with pytest.raises(ValueError, match="unknown AIR-Bench tasks \\['Nope'\\]"):
        eval_tasks.load_airbench_foundation(root, tasks=["Nope"])

    # The embedded choices line up with the questions; padded slots are never scored.
    table = {}
    rng = np.random.default_rng(0)

    def embed_text(texts):
        for text in texts:
            table.setdefault(text, rng.normal(size=5).astype(np.float32))
        return np.stack([table[text] for text in texts])

    choices, mask = eval_tasks.choice_embeddings(questions, embed_text)
    assert choices.shape == (3, 4, 5) and mask.sum(axis=1).tolist() == [4, 2, 3]
    np.testing.assert_array_equal(choices[1, 1], table["woman"])
    np.testing.assert_array_equal(choices[1, 3], table["man"])
    prefixed, _ = eval_tasks.choice_embeddings(questions, embed_text, with_question=True)
    np.testing.assert_array_equal(prefixed[1, 1], table["Who speaks? woman"])
    audio = np.stack([choices[0, 2], choices[1, 0], choices[2, 0]])  # right, wrong, right
    metrics = ev.multiple_choice_metrics(audio, choices, mask, [q.answer for q in questions], [q.task for q in questions])
    assert metrics["overall"] == pytest.approx(200 / 3) and metrics["acc/Speaker_Gender_Recognition_common_voice"] == 0.0


def test_airbench_empty_choices_are_not_choices(tmp_path):
    """A two-choice question whose metadata holds `choice_c: ""` / `choice_d: null` has two choices, not four
    (an empty text would be embedded and could be picked)."""
    item = _airbench_item(1, "Sound_AQA", "clotho", "a.wav", "What?", ["a dog", "rain", "", None], "rain")
    (question,) = eval_tasks.load_airbench_foundation(_write_airbench(tmp_path / "Foundation", [item]))
    assert question.choices == ("a dog", "rain") and question.answer == 1


def test_airbench_a_repeated_choice_is_one_choice(tmp_path):
    """Choices ["dog", "dog", "cat", "bird"] with answer "dog": the second "dog" tied with the first and the
    question always counted as missed (ties count against the model), where AIR-Bench grades the answer's text."""
    item = _airbench_item(1, "Sound_AQA", "clotho", "a.wav", "What?", ["dog", "cat", "dog", "bird"], "dog")
    (question,) = eval_tasks.load_airbench_foundation(_write_airbench(tmp_path / "Foundation", [item]))
    assert question.choices == ("dog", "cat", "bird") and question.answer == 0


def test_airbench_bad_metadata(tmp_path):
    bad_answer = [dict(AIRBENCH_ITEMS[0], answer_gt="a cat")]
    with pytest.raises(ValueError, match=r"Foundation_meta.json\[0\].*answer_gt 'a cat' is none of the choices"):
        eval_tasks.load_airbench_foundation(_write_airbench(tmp_path / "a", bad_answer))
    no_question = [{k: v for k, v in AIRBENCH_ITEMS[1].items() if k != "question"}]
    with pytest.raises(ValueError, match=r"uniq_id 2.*\['question'\]"):
        eval_tasks.load_airbench_foundation(_write_airbench(tmp_path / "b", no_question))
    with pytest.raises(FileNotFoundError, match="3 of 3 AIR-Bench audio files are missing"):
        eval_tasks.load_airbench_foundation(_write_airbench(tmp_path / "c", AIRBENCH_ITEMS, audio=False))
    with pytest.raises(FileNotFoundError, match="Foundation_meta.json not found"):
        eval_tasks.load_airbench_foundation(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------------------------
# Batched embedding on the mesh


def test_embed_in_batches_pads_and_drops_the_last_batch():
    mesh = sharding.create_mesh({"data": 4, "fsdp": 2})
    rng = np.random.default_rng(0)
    inputs = {"x": rng.normal(size=(37, 3)).astype(np.float32), "n": np.arange(37, dtype=np.int32)}
    seen = []

    @jax.jit
    def embed(batch):
        return jnp.concatenate([batch["x"] * 2.0, batch["n"][:, None].astype(jnp.float32)], axis=1)

    def fn(batch):
        assert batch["x"].shape == (16, 3) and batch["x"].sharding == sharding.batch_sharding(mesh)
        seen.append(np.asarray(batch["n"]).tolist())
        return embed(batch)

    out = ev.embed_in_batches(fn, inputs, 16, mesh, progress=False)
    np.testing.assert_array_equal(out[:, :3], inputs["x"] * 2.0)
    np.testing.assert_array_equal(out[:, 3], np.arange(37))  # each example once, in order
    assert seen[-1] == list(range(32, 37)) + [36] * 11  # 37 = 16 + 16 + 5: the last batch padded with copies
    with pytest.raises(ValueError, match="multiple of 8"):
        ev.embed_in_batches(fn, inputs, 12, mesh, progress=False)
    with pytest.raises(ValueError, match="different leading sizes"):
        ev.embed_in_batches(fn, {"x": inputs["x"], "n": inputs["n"][:5]}, 16, mesh, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Scoring an evaluation set with a model


class _KeywordEmbedder:
    """A fake model: clip i's waveform holds i; a text 'clip i ...' embeds like clip i, a text naming a class
    like the mean of that class's clips; anything else is random. Optionally noisy."""

    def __init__(self, classes: dict[str, list[int]], dim: int = 8, noise: float = 0.0):
        self.classes, self.dim, self.noise = classes, dim, noise
        self.rng = np.random.default_rng(0)
        self.calls = []

    def _clip(self, i: int) -> np.ndarray:
        return np.eye(self.dim, dtype=np.float32)[i] + self.noise * self.rng.normal(size=self.dim).astype(np.float32)

    def embed_audio(self, waveforms):
        self.calls.append(("audio", len(waveforms)))
        out = np.stack([self._clip(int(w[0])) for w in waveforms])
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def embed_text(self, texts):
        self.calls.append(("text", len(texts)))
        rows = []
        for text in texts:
            words = text.split()
            if words[0] == "clip":
                rows.append(self._clip(int(words[1])))
            else:
                (name,) = [c for c in self.classes if c in text]
                rows.append(np.mean([self._clip(i) for i in self.classes[name]], axis=0))
        out = np.stack(rows)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _toy_data() -> eval_tasks.EvalData:
    text_to_audio = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5, 5])
    questions = [
        eval_tasks.MultipleChoiceQuestion("q0", "t1", "x", "what is it?", ("a siren", "a dog"), 1),
        eval_tasks.MultipleChoiceQuestion("q1", "t1", "y", "what is it?", ("a dog", "a siren", "rain"), 1),
        eval_tasks.MultipleChoiceQuestion("q2", "t2", "z", "what is it?", ("rain", "a dog"), 0),
    ]
    return eval_tasks.EvalData(
        name="toy",
        waveforms=np.repeat(np.arange(6, dtype=np.float32)[:, None], 4, axis=1),
        captions=[f"clip {i} caption {k}" for k, i in enumerate(text_to_audio)],
        text_to_audio=text_to_audio,
        labels=["dog", "dog", "siren", "siren", "rain", "rain"],
        folds=np.array([1, 2, 1, 2, 1, 2]),
        questions=questions,
        question_audio=np.array([0, 3, 5]),
    )


def test_evaluate_data_perfect_model():
    data = _toy_data()
    embedder = _KeywordEmbedder({"dog": [0, 1], "siren": [2, 3], "rain": [4, 5]})
    table = eval_tasks.evaluate_data(embedder, data, [8], templates=("the sound of a {}", "{}"))
    metrics = table[8]
    for key in ("t2a_R@1", "a2t_R@1", "a2t_mAP@10", "top1", "top5", "acc/t1", "acc/t2", "average", "overall"):
        assert metrics[key] == 100.0, key
    # Each text embedded in one call per kind: audio once, captions once, 3 classes × 2 templates, 7 choices.
    assert embedder.calls == [("audio", 6), ("text", 10), ("text", 6), ("text", 7)]


def test_evaluate_data_matches_metrics_on_prefixes():
    data = _toy_data()
    embedder = _KeywordEmbedder({"dog": [0, 1], "siren": [2, 3], "rain": [4, 5]}, noise=0.6)
    table = eval_tasks.evaluate_data(embedder, data, [8, 4], templates=("the sound of a {}", "{}"))
    # Same embeddings again (the fake's noise is seeded), scored by hand at 4 dims.
    embedder = _KeywordEmbedder({"dog": [0, 1], "siren": [2, 3], "rain": [4, 5]}, noise=0.6)
    audio = ev.truncate_normalize(embedder.embed_audio(data.waveforms), 4)
    text = ev.truncate_normalize(embedder.embed_text(data.captions), 4)
    prompts = embedder.embed_text(ev.prompt_texts(["dog", "rain", "siren"], ("the sound of a {}", "{}")))
    class_emb = ev.class_embeddings(ev.truncate_normalize(prompts.reshape(3, 2, -1), 4))
    choices, mask = eval_tasks.choice_embeddings(data.questions, embedder.embed_text)
    expected = ev.retrieval_metrics(audio, text, data.text_to_audio)
    expected.update(ev.zero_shot_by_fold(audio, [0, 0, 2, 2, 1, 1], class_emb, data.folds))
    expected.update(
        ev.multiple_choice_metrics(audio[[0, 3, 5]], ev.truncate_normalize(choices, 4), mask, [1, 1, 0], ["t1", "t1", "t2"])
    )
    assert table[4] == expected
    assert table[4] != table[8]


def test_evaluate_data_averages_zero_shot_over_unequal_folds():
    """A set with folds reports the mean of the per-fold accuracies, not the accuracy over all clips pooled: the
    folds here differ in size (4 and 2 clips) and fold 1 holds a miss (clip 1, labelled siren, embeds like a dog)."""
    data = dataclasses.replace(
        _toy_data(), labels=["dog", "siren", "siren", "siren", "rain", "rain"], folds=np.array([1, 1, 1, 1, 2, 2])
    )
    embedder = _KeywordEmbedder({"dog": [0, 1], "siren": [2, 3], "rain": [4, 5]})
    metrics = eval_tasks.evaluate_data(embedder, data, [8], templates=("{}",))[8]
    assert metrics["top1"] == pytest.approx((75.0 + 100.0) / 2)  # fold 1: 3 of 4; fold 2: 2 of 2
    assert metrics["top1"] != pytest.approx(100.0 * 5 / 6)  # pooled: 5 of 6
    assert metrics["top5"] == 100.0


class _RecordingEmbedder(_KeywordEmbedder):
    def embed_text(self, texts):
        # The last call's texts and embeddings: the choices, embedded after the captions and prompts.
        self.texts, self.embedded = list(texts), super().embed_text(texts)
        return self.embedded


@pytest.mark.parametrize("with_question", [False, True])
def test_evaluate_data_choice_texts(with_question):
    """Multiple choice embeds each choice's text alone (MISSION: "choice text embedded"), or after its question
    when the set asks for it; the scores are those of the embedded texts."""
    data = dataclasses.replace(_toy_data(), choices_with_question=with_question)
    embedder = _RecordingEmbedder({"dog": [0, 1], "siren": [2, 3], "rain": [4, 5]}, noise=0.6)
    table = eval_tasks.evaluate_data(embedder, data, [8], templates=("{}",))
    choices = [choice for q in data.questions for choice in q.choices]
    assert embedder.texts == ([f"what is it? {c}" for c in choices] if with_question else choices)
    assert data.summary()["choice_text"] == ("{question} {choice}" if with_question else "{choice}")
    # The same choice embeddings, scored by hand.
    flat = embedder.embedded
    slots = np.array([[0, 1, 0], [2, 3, 4], [5, 6, 5]])  # unused slots repeat the question's first choice
    mask = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 0]], bool)
    audio = np.asarray(_RecordingEmbedder(embedder.classes, noise=0.6).embed_audio(data.waveforms))[[0, 3, 5]]
    expected = ev.multiple_choice_metrics(audio, flat[slots], mask, [1, 1, 0], ["t1", "t1", "t2"])
    assert {key: table[8][key] for key in expected} == expected


def test_evaluate_data_refuses_a_set_with_nothing_to_score():
    data = eval_tasks.EvalData(name="bare", waveforms=_toy_data().waveforms)
    with pytest.raises(ValueError, match="'bare' has no captions, labels or questions: nothing to score"):
        eval_tasks.evaluate_data(_KeywordEmbedder({}), data, [8])


def test_evaluate_during_training_keys():
    data = _toy_data()
    embedder = _KeywordEmbedder({"dog": [0, 1], "siren": [2, 3], "rain": [4, 5]}, noise=0.05)
    records = ev.evaluate_during_training(embedder, [data], [8, 4])
    assert records["eval/toy/t2a_R@1"] == 100.0 and "eval/toy/4/t2a_R@1" in records
    assert records["eval/toy/acc/t1"] == 100.0 and "eval/toy/4/top5" in records
    assert records["eval/toy/clips"] == 6 and records["eval/toy/captions"] == 10
    assert records["eval/toy/classes"] == 3 and records["eval/toy/questions"] == 3
    assert len(records) == 2 * len(eval_tasks.evaluate_data(embedder, data, [8])[8]) + 4  # no skip counts: none kept


def test_evaluate_during_training_reports_what_was_measured(tmp_path):
    """metrics.jsonl says on how many clips and captions R@1 was measured, and what was skipped (every reason
    the set counts, zeros too, so a set logs the same keys at every evaluation)."""
    from wavlink_jax.data.audio_io import SKIP_REASONS
    from wavlink_jax.data.sources import write_manifest

    for i in range(3):
        _write_clip(tmp_path / f"clip{i}.wav", 0.5, value=0.1 * (i + 1))
    (tmp_path / "clip3.wav").write_text("not audio")
    entries = [{"audio": f"clip{i}.wav", "captions": [f"clip {i} a", f"clip {i} b"]} for i in range(3)]
    entries += [{"audio": "clip3.wav", "captions": ["x"]}, {"audio": "gone.wav", "captions": ["y"]}]
    data = eval_tasks.load_eval_data("mine", write_manifest(tmp_path / "eval.jsonl", entries), window_seconds=1.0)
    model = _fake_model()
    records = ev.evaluate_during_training(model, [data], [8, 4])
    skipped = {key.rsplit("/", 1)[1]: n for key, n in records.items() if key.startswith("eval/mine/skipped/")}
    assert set(SKIP_REASONS) <= set(skipped)  # zeros too (the set may count more, e.g. blank captions)
    assert {reason: n for reason, n in skipped.items() if n} == {"missing": 1.0, "not_audio": 1.0}
    expected = ev.metric_records("mine", eval_tasks.evaluate_data(model, data, [8, 4]))
    expected.update({"eval/mine/clips": 3.0, "eval/mine/captions": 6.0})
    assert {key: n for key, n in records.items() if not key.startswith("eval/mine/skipped/")} == expected


# ---------------------------------------------------------------------------------------------------------------
# Loading evaluation sets from files


def _write_clip(path, seconds, rate=22050, value=0.1):
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.full(int(seconds * rate), value, np.float32), rate)


def test_load_eval_data_from_manifest(tmp_path):
    from wavlink_jax.data.sources import write_manifest

    for i in range(3):
        _write_clip(tmp_path / f"clip{i}.wav", 0.5 + i, value=0.1 * (i + 1))
    entries = [
        {"audio": "clip0.wav", "captions": ["a", "b"], "label": "dog"},
        {"audio": "missing.wav", "captions": ["c"], "label": "dog"},
        {"audio": "clip1.wav", "captions": ["d"], "label": "rain"},
        {"audio": "clip2.wav", "captions": ["e", "f", "g"], "label": "dog"},
    ]
    data = eval_tasks.load_eval_data("toy", write_manifest(tmp_path / "eval.jsonl", entries), window_seconds=1.0)
    assert data.waveforms.shape == (3, 16000)
    assert data.captions == ["a", "b", "d", "e", "f", "g"] and data.text_to_audio.tolist() == [0, 0, 1, 2, 2, 2]
    assert data.labels == ["dog", "rain", "dog"] and data.folds is None
    assert data.summary() == {"clips": 3, "captions": 6, "classes": 2, "skipped": {"missing": 1}}
    np.testing.assert_allclose(data.waveforms[0, 8000:], 0.0)  # 0.5 s clip zero-padded to the window

    # The offending clip is named by its id (here its path), not by its position among the decoded clips
    # (0 here: the missing.wav line before it is skipped).
    partly = [entries[1], {"audio": "clip2.wav", "captions": ["e"]}, entries[2]]
    with pytest.raises(ValueError, match=r"'toy': 1 of 2 clips have no label \(first: clip2\.wav\)"):
        eval_tasks.load_eval_data("toy", write_manifest(tmp_path / "partly.jsonl", partly), window_seconds=1.0)
    # Fold-less clips among folded ones would be averaged as one more fold: refused, naming the first.
    some_folds = [{"audio": "clip0.wav", "captions": [], "label": "dog", "fold": 1},
                  {"audio": "clip1.wav", "captions": [], "label": "rain"},
                  {"audio": "clip2.wav", "captions": [], "label": "dog", "fold": 2}]
    with pytest.raises(ValueError, match=r"'toy': 1 of 3 clips have no fold \(first: clip1\.wav\)"):
        eval_tasks.load_eval_data("toy", write_manifest(tmp_path / "some_folds.jsonl", some_folds), window_seconds=1.0)
    some_folds[1]["fold"] = 2
    folded = eval_tasks.load_eval_data("toy", write_manifest(tmp_path / "folds.jsonl", some_folds), window_seconds=1.0)
    assert folded.folds.tolist() == [1, 2, 2]
    # Checked when the set is loaded (before training), not when it is scored.
    uncaptioned = entries[:2] + [{"audio": "clip1.wav", "captions": [], "label": "rain", "id": "rain-1"}]
    with pytest.raises(ValueError, match=r"'toy': 1 of 2 clips have no caption \(first: rain-1\)"):
        eval_tasks.load_eval_data("toy", write_manifest(tmp_path / "uncaptioned.jsonl", uncaptioned), window_seconds=1.0)
    uncaptioned[2]["captions"] = ["  ", ""]  # captions there, but blank: the error says why the clip has none
    with pytest.raises(ValueError, match=r"\(first: rain-1, blank captions being dropped \(2 in this set\)\)"):
        eval_tasks.load_eval_data("toy", write_manifest(tmp_path / "blank.jsonl", uncaptioned), window_seconds=1.0)


def test_load_airbench_data_decodes_each_file_once(tmp_path):
    items = [
        _airbench_item(1, "Sound_AQA", "clotho", "a.wav", "What?", ["x", "y"], "x"),
        _airbench_item(2, "Sound_AQA", "clotho", "a.wav", "Which?", ["x", "y"], "y"),
        _airbench_item(3, "Sound_AQA", "clotho", "b.wav", "What?", ["x", "y"], "y"),
        _airbench_item(4, "Audio_Grounding", "audiogrounding", "g.wav", "When?", ["0-1s", "2-3s"], "0-1s"),
        _airbench_item(5, "Sound_AQA", "clotho", "b.wav", "Which?", ["x", "y"], "x"),
    ]
    root = _write_airbench(tmp_path / "Foundation", items)
    _write_clip(root / "Sound_AQA_clotho" / "a.wav", 1.0)
    (root / "Sound_AQA_clotho" / "b.wav").write_text("not audio")
    _write_clip(root / "Audio_Grounding_audiogrounding" / "g.flac", 2.0)
    data = eval_tasks.load_airbench_data(root, window_seconds=1.0)
    assert data.waveforms.shape == (2, 16000) and data.long_clips == "head"
    whole = eval_tasks.load_airbench_data(root, window_seconds=1.0, long_clips="mean")
    assert [len(w) for w in whole.waveforms] == [32000, 16000] and whole.long_clips == "mean"
    assert whole.window_samples == 16000
    assert [q.id for q in data.questions] == ["1", "2", "4"]
    assert data.question_audio.tolist() == [1, 1, 0]  # files in sorted path order: Audio_Grounding first
    # One unreadable file, two questions about it: both dropped questions counted (not the one file).
    assert data.summary()["skipped"] == {"not_audio": 1, "questions_dropped": 2}


def test_airbench_max_clips_keeps_the_first_questions_and_decodes_only_their_audio(tmp_path):
    """`--max-clips N` reaches AIR-Bench too: the first N questions, and only their audio is decoded (the later
    questions' files are not audio, so decoding them would count a skip)."""
    items = [
        _airbench_item(1, "Sound_AQA", "clotho", "a.wav", "What?", ["x", "y"], "x"),
        _airbench_item(2, "Sound_AQA", "clotho", "b.wav", "Which?", ["x", "y"], "y"),
        _airbench_item(3, "Sound_AQA", "clotho", "c.wav", "What?", ["x", "y"], "y"),
        _airbench_item(4, "Sound_AQA", "clotho", "d.wav", "What?", ["x", "y"], "y"),
    ]
    root = _write_airbench(tmp_path / "Foundation", items)
    for name in ("a", "b"):
        _write_clip(root / "Sound_AQA_clotho" / f"{name}.wav", 1.0)
    for name in ("c", "d"):
        (root / "Sound_AQA_clotho" / f"{name}.wav").write_text("not audio")
    name, decode = ev.open_dataset("airbench", _cli_args(tmp_path, airbench_dir=str(root), max_clips=2))
    data = decode(window_seconds=1.0)
    assert [q.id for q in data.questions] == ["1", "2"] and data.waveforms.shape == (2, 16000)
    assert data.summary()["skipped"] == {}
    whole = ev.open_dataset("airbench", _cli_args(tmp_path, airbench_dir=str(root)))[1](window_seconds=1.0)
    assert whole.summary()["skipped"] == {"not_audio": 2, "questions_dropped": 2}  # without the limit: all decoded
    with pytest.raises(ValueError, match=r"max_questions=-1: give a number ≥ 1"):  # would drop the last question
        eval_tasks.load_airbench_data(root, window_seconds=1.0, max_questions=-1)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _cli_args(tmp_path, **overrides) -> argparse.Namespace:
    values = dict(data_dir=None, airbench_dir=None, airbench_tasks=None, airbench_choices_with_question=False,
                  synthetic_dir=str(tmp_path), max_clips=None)
    return argparse.Namespace(**{**values, **overrides})


def test_cli_dataset_errors(tmp_path):
    args = _cli_args(tmp_path)
    with pytest.raises(ValueError, match="unknown data set 'nope'.*NAME=path/to/manifest.jsonl"):
        ev.open_dataset("nope", args)
    with pytest.raises(ValueError, match="clotho needs --data-dir"):
        ev.open_dataset("clotho", args)
    with pytest.raises(ValueError, match="airbench needs --airbench-dir"):
        ev.open_dataset("airbench", args)
    with pytest.raises(ValueError, match="has no name"):
        ev.open_dataset("=x.jsonl", args)


def test_cli_max_clips_reaches_a_manifest_set(tmp_path):
    """`--max-clips N` keeps the first N clips of a NAME=manifest set (and of the named sets read the same way)."""
    manifest = _good_manifest(tmp_path)  # 3 clips
    name, decode = ev.open_dataset(f"good={manifest}", _cli_args(tmp_path, max_clips=2))
    data = decode(window_seconds=1.0)
    assert name == "good" and data.waveforms.shape == (2, 16000) and data.captions == ["clip 0", "clip 1"]
    assert ev.open_dataset(f"good={manifest}", _cli_args(tmp_path))[1](window_seconds=1.0).waveforms.shape[0] == 3


@pytest.mark.parametrize("flag", [False, True])
def test_cli_airbench_choice_text_option(tmp_path, monkeypatch, flag):
    from wavlink_jax import inference

    items = [_airbench_item(1, "Sound_AQA", "clotho", "a.wav", "What?", ["a dog", "rain"], "rain")]
    root = _write_airbench(tmp_path / "Foundation", items, audio=False)
    _write_clip(root / "Sound_AQA_clotho" / "a.wav", 1.0)
    args = _cli_args(tmp_path, airbench_dir=str(root), airbench_choices_with_question=flag)
    name, decode = ev.open_dataset("airbench", args)
    assert name == "airbench" and decode(window_seconds=1.0).choices_with_question is flag

    texts = []
    model = _fake_model()
    embed_text = model.embed_text
    model.embed_text = lambda batch: texts.extend(batch) or embed_text(batch)
    monkeypatch.setattr(inference, "load", lambda *args, **kwargs: model)
    out = tmp_path / "air.json"
    argv = ["--model", "M", "--datasets", "airbench", "--airbench-dir", str(root), "--out", str(out)]
    ev.main(argv + ["--airbench-choices-with-question"] * flag)
    assert texts == (["What? a dog", "What? rain"] if flag else ["a dog", "rain"])
    summary = json.loads(out.read_text())["datasets"]["airbench"]
    assert summary["choice_text"] == ("{question} {choice}" if flag else "{choice}") and summary["questions"] == 1


def _fake_model(dims=(8, 4)):
    """What `evaluate.run` uses of `inference.load`'s result, with deterministic pseudo-random embeddings."""

    def unit_rows(keys):
        rows = np.stack([np.random.default_rng(zlib.crc32(key)).normal(size=dims[0]) for key in keys])
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    return types.SimpleNamespace(
        config=types.SimpleNamespace(matryoshka_dims=dims),
        window_seconds=1.0,
        loaded=types.SimpleNamespace(source="fake", step=3),
        embed_audio=lambda waveforms: unit_rows(w.tobytes() for w in waveforms),
        embed_text=lambda texts: unit_rows(text.encode() for text in texts),
    )


def _good_manifest(tmp_path):
    from wavlink_jax.data.sources import write_manifest

    for i in range(3):
        _write_clip(tmp_path / f"c{i}.wav", 0.5, value=0.1 * (i + 1))
    entries = [{"audio": f"c{i}.wav", "captions": [f"clip {i}"], "label": f"l{i % 2}"} for i in range(3)]
    return write_manifest(tmp_path / "good.jsonl", entries)


@pytest.mark.parametrize(
    "bad_entry, options, message",
    [
        ("typo=TMP/evl.jsonl", [], "evl.jsonl: manifest not found"),
        ("nope", [], "unknown data set 'nope'"),
        ("airbench", ["--airbench-dir", "TMP/nowhere"], "Foundation_meta.json not found"),
        ("clotho", ["--data-dir", "TMP"], "no prepared data set 'clotho'"),
        ("good=TMP/good.jsonl", [], r"names \['good'\] more than once"),
        ("good2=TMP/good.jsonl", ["--template", "the sound of a"], r"template 'the sound of a' must contain exactly"),
        ("good2=TMP/good.jsonl", ["--template", "the {} of {x}"], r"template 'the \{\} of \{x\}' .* no other braces"),
    ],
)
def test_cli_checks_every_data_set_before_loading_the_model(tmp_path, monkeypatch, bad_entry, options, message):
    from wavlink_jax import inference

    manifest = _good_manifest(tmp_path)
    loads = []
    monkeypatch.setattr(inference, "load", lambda *args, **kwargs: loads.append(args) or _fake_model())
    out = tmp_path / "res.json"
    argv = ["--workdir", "W", "--datasets", f"good={manifest},{bad_entry.replace('TMP', str(tmp_path))}"]
    argv += [option.replace("TMP", str(tmp_path)) for option in options] + ["--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        ev.main(argv)
    assert str(exit_info.value.code).startswith("error: ") and "\n" not in str(exit_info.value.code)
    assert re.search(message, str(exit_info.value.code))
    assert loads == [] and not out.exists()  # refused before the model was loaded and anything evaluated


def test_cli_keeps_finished_sets_when_a_later_set_fails(tmp_path, monkeypatch):
    from wavlink_jax import inference
    from wavlink_jax.data.sources import write_manifest

    manifest = _good_manifest(tmp_path)
    unreadable = write_manifest(tmp_path / "gone.jsonl", [{"audio": "gone.wav", "captions": ["x"]}])
    monkeypatch.setattr(inference, "load", lambda *args, **kwargs: _fake_model())
    out = tmp_path / "res" / "res.json"
    with pytest.raises(SystemExit, match=r"^error: evaluation manifest .*gone.jsonl: no usable clip"):
        ev.main(["--workdir", "W", "--datasets", f"good={manifest},gone={unreadable}", "--out", str(out)])
    results = json.loads(out.read_text())  # written after the first set, before the second failed
    assert list(results["datasets"]) == ["good"] and results["step"] == 3
    assert results["datasets"]["good"]["clips"] == 3 and set(results["datasets"]["good"]["metrics"]) == {"8", "4"}
    assert (tmp_path / "res" / "res.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.parent.iterdir()) == ["res.json", "res.png"]  # no partial file left


def test_a_one_size_rerun_removes_the_earlier_plot_and_refuses_plot(tmp_path, monkeypatch, capsys):
    """Evaluated at 8 and 4, then again at 8 alone into the same --out: the first run's plot, which the new
    results would no longer mention, is removed and the run says so (a PNG the results never named stays).
    --plot with one size is refused before any set is scored."""
    from wavlink_jax import inference

    manifest = _good_manifest(tmp_path)
    monkeypatch.setattr(inference, "load", lambda *args, **kwargs: _fake_model())
    out = tmp_path / "res" / "res.json"
    argv = ["--workdir", "W", "--datasets", f"good={manifest}", "--out", str(out)]
    ev.main(argv)
    assert json.loads(out.read_text())["plot"] == str(out.with_suffix(".png")) and out.with_suffix(".png").exists()
    unrelated = tmp_path / "res" / "other.png"
    unrelated.write_bytes(b"mine")
    capsys.readouterr()
    ev.main([*argv, "--dims", "8"])
    assert "plot" not in json.loads(out.read_text()) and not out.with_suffix(".png").exists()
    assert f"removed {out.with_suffix('.png')}, the plot of an earlier run into {out}" in capsys.readouterr().out
    assert unrelated.read_bytes() == b"mine"
    # A relative path recorded by an older version names a file relative to that run's folder: left alone.
    out.write_text(json.dumps({"plot": "other.png"}))
    monkeypatch.chdir(unrelated.parent)
    ev.main([*argv, "--dims", "8"])
    assert unrelated.read_bytes() == b"mine"
    with pytest.raises(SystemExit, match=r"^error: --plot draws the metrics against the Matryoshka size, and this "
                                         r"run has one \(8\): give --dims with two or more of \[8, 4\]"):
        ev.main([*argv, "--dims", "8", "--plot", str(tmp_path / "p.png")])
    assert not (tmp_path / "p.png").exists()


def test_cli_window_seconds_reaches_the_model_and_the_crops(tmp_path, monkeypatch):
    from wavlink_jax import inference

    manifest = _good_manifest(tmp_path)  # clips of 0.5 s
    requested, lengths = [], []
    model = _fake_model()
    embed_audio = model.embed_audio
    model.embed_audio = lambda waveforms: lengths.extend({len(w) for w in waveforms}) or embed_audio(waveforms)

    def load(*args, window_seconds=None, **kwargs):
        requested.append(window_seconds)
        model.window_seconds = 1.0 if window_seconds is None else window_seconds
        return model

    monkeypatch.setattr(inference, "load", load)
    out = tmp_path / "res.json"
    for flag, seconds in (([], 1.0), (["--window-seconds", "0.25"], 0.25)):
        ev.main(["--workdir", "W", "--datasets", f"good={manifest}", "--out", str(out), *flag])
        assert json.loads(out.read_text())["window_seconds"] == seconds and lengths[-1] == int(seconds * 16000)
    assert requested == [None, 0.25]


def test_cli_long_clips_mean_gives_the_model_every_window_of_every_clip(tmp_path, monkeypatch):
    """`--long-clips mean` decodes each clip whole (0.5 s here) and gives the model its 0.25 s windows, two a clip,
    as `ClipWindows` (cut as they are read); the results record the choice. By default the model gets the clips'
    head windows."""
    from wavlink_jax import inference

    manifest = _good_manifest(tmp_path)
    model = _fake_model()
    model.window_seconds = 0.25
    embed_audio, given = model.embed_audio, []
    model.embed_audio = lambda waveforms: given.append(waveforms) or embed_audio(waveforms)
    monkeypatch.setattr(inference, "load", lambda *args, **kwargs: model)
    out = tmp_path / "res.json"
    for flag, recorded in (([], "head"), (["--long-clips", "mean"], "mean")):
        ev.main(["--workdir", "W", "--datasets", f"good={manifest}", "--out", str(out), *flag])
        assert json.loads(out.read_text())["long_clips"] == recorded
    head, windows = given
    assert head.shape == (3, 4000)
    assert isinstance(windows, ev.ClipWindows) and windows.window_samples == 4000 and len(windows) == 6
    assert windows.owners.tolist() == [0, 0, 1, 1, 2, 2] and windows.weights.tolist() == [4000] * 6
    np.testing.assert_array_equal(windows[1:3], np.stack([windows.clips[0][4000:], windows.clips[1][:4000]]))


def test_long_clips_settings_are_checked_before_anything_is_decoded(tmp_path):
    """A `long_clips` or window that cannot work is refused by name: before decoding (the manifest does not even
    exist), and when an `EvalData` is made by hand."""
    missing = tmp_path / "missing.jsonl"
    for window, long_clips, words in ((None, "mean", "window_seconds = None: give the window in seconds"),
                                      (0.0, "head", "window_seconds = 0.0"),
                                      (1.0, "avg", "long_clips = 'avg': choose 'head'")):
        with pytest.raises(ValueError, match=re.escape(words)):
            eval_tasks.load_eval_data("toy", missing, window_seconds=window, long_clips=long_clips)
    with pytest.raises(ValueError, match=re.escape("long_clips = 'avg': choose 'head'")):
        eval_tasks.EvalData("toy", [np.zeros(10, np.float32)], long_clips="avg")
    with pytest.raises(ValueError, match=r"'toy': long_clips='mean' needs the windows' length, window_samples = 0"):
        eval_tasks.EvalData("toy", [np.zeros(10, np.float32)], long_clips="mean")


def test_format_table():
    text = ev.format_table("clotho", {512: {"t2a_R@1": 17.6, "t2a_medR": 7.0}, 64: {"t2a_R@1": 16.95, "t2a_medR": 8.0}})
    assert text.splitlines() == [
        "clotho          512       64",
        "t2a_R@1       17.60    16.95",
        "t2a_medR       7.00     8.00",
    ]


def _write_tone(path, seconds, value, rate=16000):
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(path, (value * np.sin(2 * np.pi * 300 * (1 + value) * t)).astype(np.float32), rate)


@pytest.mark.slow
def test_cli_evaluates_a_workdir(tmp_path):
    from tests.train_fixtures import tiny_config
    from wavlink_jax import checkpoint, train, train_step
    from wavlink_jax.data import pipeline
    from wavlink_jax.data.sources import write_manifest
    from wavlink_jax.tokenizer import load_tokenizer, train_tokenizer

    labels = ["hum", "beep", "hum", "click", "beep", "click", "hum"]
    entries = []
    for i, label in enumerate(labels):
        _write_tone(tmp_path / f"c{i}.wav", 0.6 + 0.1 * i, 0.1 * (i + 1))
        captions = [f"a {label} number {i}", f"{label} {i}"][: 1 + i % 2]
        entries.append({"audio": f"c{i}.wav", "captions": captions, "label": label})
    manifest = write_manifest(tmp_path / "eval.jsonl", entries)
    train_tokenizer([c for e in entries for c in e["captions"]], tmp_path / "tok", vocab_size=600)

    config = tiny_config(str(tmp_path))
    config.data.sources = ({"kind": "manifest", "path": str(manifest)},)
    config.data.tokenizer = str(tmp_path / "tok")
    workdir = tmp_path / "wd"
    train.write_config(config, str(workdir))
    mesh = sharding.create_mesh({"data": -1})
    setup = train_step.build(config, mesh, 1)
    state = train_step.init_state(setup, seed=3)
    data = pipeline.make_train_iterator(config.data, global_batch_size=8, seed=0)
    saver = checkpoint.Checkpoints(workdir, keep=1, every=1, async_save=False)
    saver.save(7, state, data, force=True)
    saver.close()

    out = tmp_path / "res" / "results.json"
    ev.main(["--workdir", str(workdir), "--datasets", f"toy={manifest}", "--batch-size", "8", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["step"] == 7 and results["dims"] == [32, 16]
    toy = results["datasets"]["toy"]
    assert toy["clips"] == 7 and toy["captions"] == 10 and toy["classes"] == 3
    assert (tmp_path / "res" / "results.png").read_bytes()[:4] == b"\x89PNG"

    # The same numbers from the in-memory state: the restore and the batched embedding lose nothing.
    tokenizer = load_tokenizer(config.data.tokenizer, max_length=config.data.max_text_length)
    embedder = train_step.StateEmbedder(setup, tokenizer, 8).use(state)
    loaded = eval_tasks.load_eval_data("toy", manifest, window_seconds=config.data.window_seconds)
    expected = eval_tasks.evaluate_data(embedder, loaded, [32, 16])
    assert {int(d): m for d, m in toy["metrics"].items()} == expected

    from wavlink_jax import export

    with pytest.raises(SystemExit, match=r"^error: .*no finished checkpoint of step 5; steps available: \[7\]"):
        ev.main(["--workdir", str(workdir), "--step", "5", "--datasets", f"toy={manifest}", "--out", str(out)])

    # An exported model gives the same results as its workdir.
    export.export(workdir, tmp_path / "exported")
    exported_out = tmp_path / "res" / "exported.json"
    ev.main(["--model", str(tmp_path / "exported"), "--datasets", f"toy={manifest}", "--out", str(exported_out)])
    exported = json.loads(exported_out.read_text())
    assert exported["step"] is None and exported["datasets"]["toy"]["metrics"] == toy["metrics"]


@pytest.mark.parametrize("option", ["--max-clips", "--batch-size"])
@pytest.mark.parametrize("value", ["-1", "0", "two"])
def test_cli_counts_must_be_positive(tmp_path, capsys, option, value):
    """--max-clips -1 silently dropped each set's last clip (AIR-Bench: its last question), 0 failed with 'no usable
    clip among 0'; --batch-size 0 or -64 ran with one clip per device. All are refused by the parser, before
    anything is loaded, in one line."""
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--workdir", "W", "--datasets", "synthetic", "--out", str(tmp_path / "res.json"), option, value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"error: argument {option}: {value!r} is not a positive whole number")


@pytest.mark.parametrize("value, message", [("64,a", "'a' is not a positive whole number"), ("64,64", "'64,64' repeats a size"),
                                            ("0", "'0' is not a positive whole number")])
def test_cli_dims_are_checked_by_the_parser(tmp_path, capsys, value, message):
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--workdir", "W", "--datasets", "synthetic", "--out", str(tmp_path / "res.json"), "--dims", value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: argument --dims: {message}")


def test_cli_dims_must_be_trained_sizes(tmp_path, monkeypatch):
    """A size the model was not trained at is refused once the model is loaded, before any set is decoded (the
    library's `embed_*(dim=...)` refuses it too); a subset of the trained sizes is scored."""
    from wavlink_jax import inference

    manifest = _good_manifest(tmp_path)
    monkeypatch.setattr(inference, "load", lambda *args, **kwargs: _fake_model())
    out = tmp_path / "res.json"
    with pytest.raises(SystemExit, match=r"^error: --dims 8,6: this model was trained at the sizes \[8, 4\]"):
        ev.main(["--workdir", "W", "--datasets", f"good={manifest}", "--out", str(out), "--dims", "8,6"])
    assert not out.exists()
    ev.main(["--workdir", "W", "--datasets", f"good={manifest}", "--out", str(out), "--dims", "4"])
    results = json.loads(out.read_text())
    assert results["dims"] == [4] and set(results["datasets"]["good"]["metrics"]) == {"4"}


@pytest.mark.parametrize("flag", ["--out", "--plot"])
def test_cli_output_files_are_checked_by_the_parser(tmp_path, capsys, flag):
    """An --out or --plot that is a folder, or under a file, failed only after the first set had been scored."""
    (tmp_path / "file").write_text("")
    for path, message in ((tmp_path, f"{tmp_path} is a directory; give the name of a file in it"),
                          (tmp_path / "file" / "x", f"{tmp_path / 'file' / 'x'}: {tmp_path / 'file'} is a file, not a folder")):
        argv = ["--workdir", "W", "--datasets", "synthetic", "--out", str(tmp_path / "res.json"), flag, str(path)]
        with pytest.raises(SystemExit) as exit_info:
            ev.main(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: argument {flag}: {message}")


def test_cli_writes_the_results_before_the_plot(tmp_path, monkeypatch):
    """A plot that fails (a full disk, a broken font cache) loses no figures, and leaves no partial file."""
    from wavlink_jax import inference

    manifest = _good_manifest(tmp_path)
    monkeypatch.setattr(inference, "load", lambda *args, **kwargs: _fake_model())

    def broken(table, path, keys=None):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError("No space left on device")

    monkeypatch.setattr(ev, "plot_matryoshka", broken)
    out = tmp_path / "res" / "res.json"
    with pytest.raises(SystemExit, match="No space left on device"):
        ev.main(["--workdir", "W", "--datasets", f"good={manifest}", "--out", str(out), "--plot", str(tmp_path / "p" / "m.png")])
    assert set(json.loads(out.read_text())["datasets"]) == {"good"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["res.json"] and not any((tmp_path / "p").iterdir())
