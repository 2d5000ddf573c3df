"""`inference.load` (workdir at a step, or exported directory; LoRA merged; batched and padded) and the
`python -m wavlink_jax.embed` CLI (similarity matrix, folder index with an unreadable file, top-k search).

The workdir is the tiny trainer fixture trained 2 steps in LoRA mode, so adapters are non-zero and must be
merged. fp32; the batched path is compared with a direct unbatched call of the model (1e-5: same maths,
different batch shapes).
"""

import dataclasses
import os
import re
import shutil
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from test_export import sample_inputs, train_workdir

from wavlink_jax import audio, checkpoint, embed, export, files, inference
from wavlink_jax.convert.common import CheckpointError
from wavlink_jax.data.audio_io import load_audio
from wavlink_jax.models import lora
from wavlink_jax.models.wavlink import WavLink
from wavlink_jax.optim import flatten

BATCH_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(LoRA workdir with checkpoints 2 and 3, data dir)."""
    return train_workdir(tmp_path_factory.mktemp("lora"), "--config.optim.mode=lora")


@pytest.fixture(scope="module")
def embedder(run):
    return inference.load(run[0], batch_size=3)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    return export.export(run[0], tmp_path_factory.mktemp("export") / "wavlink")


@pytest.fixture(scope="module")
def clips(run, tmp_path_factory):
    """A folder of 5 generated clips (one in a sub-folder), one truncated FLAC and one text file."""
    folder = tmp_path_factory.mktemp("clips")
    sources = sorted((run[1] / "audio" / "train").glob("*.flac"))
    (folder / "sub").mkdir()
    for index, source in enumerate(sources[:5]):
        shutil.copyfile(source, folder / ("sub" if index == 4 else "") / f"clip{index}.flac")
    (folder / "broken.flac").write_bytes(sources[5].read_bytes()[:2000])
    (folder / "notes.txt").write_text("not audio")
    return folder


def test_lora_adapters_are_merged(run, embedder):
    items, config, step = checkpoint.read_workdir_state(run[0])
    raw = flatten(items["params"])
    adapters = [path for path in raw if lora.is_adapter(path)]
    assert step == 3 and config["optim"]["mode"] == "lora" and adapters
    query = "audio/encoder/layers/0/attn/query"
    assert np.abs(raw[f"{query}/lora_b"]).max() > 0  # trained: the merge changes the kernel
    scale = config["lora"]["alpha"] / config["lora"]["rank"]
    expected = raw[f"{query}/kernel"] + scale * raw[f"{query}/lora_a"] @ raw[f"{query}/lora_b"]
    merged = embedder.loaded.model.audio.encoder.layers[0].attn.query.kernel.get_value()
    np.testing.assert_allclose(np.asarray(merged), expected, atol=1e-6)
    # A config without the LoRA settings is refused (inference failed with AttributeError 'lora', init_from merged
    # at a made-up scale of 1); parameters without adapters need none.
    without_lora = {key: value for key, value in config.items() if key != "lora"}
    with pytest.raises(CheckpointError, match=r"^c.json: the checkpoint holds LoRA adapters but this config has no"):
        checkpoint.merged_params(items["params"], without_lora, config_file=Path("c.json"))
    plain = {"kernel": np.ones(2)}
    assert checkpoint.merged_params(plain, without_lora, config_file=Path("c.json")) is plain


def test_float32_embeddings_use_full_precision_matmuls_whatever_the_default(embedder):
    """On GPUs (TF32) and TPUs jax's default matmul precision is below float32; a float32 embedder asks for
    HIGHEST in every matmul and convolution, so its embeddings match the exported PyTorch model's there too (read
    in the program under the default precision: a CPU computes float32 either way)."""
    waveforms = embedder.prepare_waveforms([np.zeros(800, np.float32)] * embedder.batch_size)
    tokens = dict(zip(("input_ids", "attention_mask"), embedder.tokenizer(["a dog"] * embedder.batch_size)))
    with jax.default_matmul_precision("default"):
        programs = [embedder._audio_fn.lower(embedder._state, waveforms, dim=None).as_text(),
                    embedder._text_fn.lower(embedder._state, tokens, dim=None).as_text()]
    for program in programs:
        ops = re.findall(r"stablehlo\.(?:dot_general|convolution)[^\n]*", program)
        lower = [op for op in ops if op.count("HIGHEST") != 2]  # one precision per operand
        assert ops and not lower, lower[:2]


def test_batched_padded_embeddings_match_direct_calls(embedder):
    waves, texts = sample_inputs()
    model, window = embedder.loaded.model, embedder.window_samples
    assert embedder.batch_size == 8  # 3 rounded up to the 8 CPU devices of the tests
    got = embedder.embed_audio(waves)
    # Each clip alone, brought to the 1 s window by hand: head crop / zero padding.
    by_hand = np.stack([np.pad(w[:window], (0, max(0, window - len(w)))) for w in waves])
    direct = np.asarray(nnx.jit(lambda m, x: m.embed_audio(audio.log_mel_spectrogram(x)))(model, by_hand))
    assert np.abs(got - direct).max() <= BATCH_TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    # More examples than one batch (padded last batch), one waveform alone, and a 2-D batch.
    many = [w for _ in range(4) for w in waves]
    assert np.abs(embedder.embed_audio(many) - np.tile(direct, (4, 1))).max() <= BATCH_TOLERANCE
    assert np.abs(embedder.embed_audio(waves[0]) - direct[:1]).max() <= BATCH_TOLERANCE
    assert np.abs(embedder.embed_audio(by_hand) - direct).max() <= BATCH_TOLERANCE

    ids, mask = embedder.tokenizer(texts)
    direct_text = np.asarray(nnx.jit(lambda m, i, k: m.embed_text(i, k))(model, ids, mask))
    assert np.abs(embedder.embed_text(texts) - direct_text).max() <= BATCH_TOLERANCE
    short = embedder.embed_text(texts, dim=16)
    expected = direct_text[:, :16] / np.linalg.norm(direct_text[:, :16], axis=1, keepdims=True)
    assert short.shape == (len(texts), 16) and np.abs(short - expected).max() <= BATCH_TOLERANCE


def test_batch_size_is_rounded_up_to_a_multiple_of_the_device_count(embedder):
    """A batch of 8 on the tests' 8 devices stays 8 (one clip per device), not 16; 9 becomes 16."""
    sizes = {n: inference.Embedder(embedder.loaded, batch_size=n).batch_size for n in (1, 8, 9, 16)}
    assert sizes == {1: 8, 8: 8, 9: 16, 16: 16}


def test_a_128_mel_model_gets_128_mel_spectrograms(embedder):
    """Whisper large-v3's audio tower reads 128 mel bins, the others 80 (the log-mel default): the spectrogram
    is computed with the model's `n_mels`."""
    config = embedder.config
    config = dataclasses.replace(config, audio=dataclasses.replace(config.audio, n_mels=128))
    # The trained weights, but a first convolution with 128 input channels (initialising a model takes seconds).
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WavLink(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    trained = nnx.to_pure_dict(nnx.state(embedder.loaded.model))
    nnx.replace_by_pure_dict(state, jax.tree.map(
        lambda new, old: old if new.shape == old.shape else 0.1 * rng.standard_normal(new.shape, np.float32),
        nnx.to_pure_dict(state), trained))
    loaded = dataclasses.replace(embedder.loaded, model=nnx.merge(graphdef, state))
    assert loaded.model.audio.conv1.kernel.shape[1] == 128
    waves, window = sample_inputs()[0][:2], embedder.window_samples
    by_hand = np.stack([np.pad(w[:window], (0, max(0, window - len(w)))) for w in waves])
    direct = nnx.jit(lambda m, x: m.embed_audio(audio.log_mel_spectrogram(x, 128)))(loaded.model, by_hand)
    got = inference.Embedder(loaded, batch_size=8).embed_audio(waves)
    assert np.abs(got - np.asarray(direct)).max() <= BATCH_TOLERANCE


def test_dtype_reaches_both_towers(run, exported, embedder):
    """`dtype=` is the compute dtype of both towers, from a workdir and from an export; a bfloat16 embedder's
    embeddings are near the float32 ones but not the same."""
    for path in (run[0], exported):
        config = inference.read_model(path, dtype="bfloat16").model.config
        assert (config.audio.dtype, config.text.dtype) == ("bfloat16", "bfloat16"), path
    texts = sample_inputs()[1]
    half, full = inference.load(exported, dtype="bfloat16").embed_text(texts), embedder.embed_text(texts)
    assert half.dtype == np.float32 and 0 < np.abs(half - full).max() < 0.05


def test_window_override(run, embedder):
    """`window_seconds` replaces the training window (1 s) by any window the position table covers (the tiny
    model's covers exactly 1 s: 50 positions); clips are cut to it and embedded at that length."""
    model = embedder.loaded.model
    longest = model.config.audio.max_window_seconds
    waves = [np.random.default_rng(i).uniform(-0.5, 0.5, int(1.7 * audio.SAMPLE_RATE)).astype(np.float32) for i in range(3)]
    for seconds in (0.5, longest):
        windowed = inference.Embedder(embedder.loaded, batch_size=3, window_seconds=seconds)
        window = int(round(seconds * audio.SAMPLE_RATE))
        assert windowed.window_samples == window
        by_hand = np.stack([w[:window] for w in waves])
        direct = np.asarray(nnx.jit(lambda m, x: m.embed_audio(audio.log_mel_spectrogram(x)))(model, by_hand))
        assert np.abs(windowed.embed_audio(waves) - direct).max() <= BATCH_TOLERANCE
    with pytest.raises(ValueError, match=rf"window_seconds = 9 s: .* at most {longest:g} s"):
        inference.load(run[0], window_seconds=9)


def test_export_and_steps_load_the_same_model(run, embedder, exported, monkeypatch):
    waves, texts = sample_inputs()
    from_export = inference.load(exported)
    assert from_export.loaded.step is None and embedder.loaded.step == 3
    assert np.abs(from_export.embed_audio(waves) - embedder.embed_audio(waves)).max() <= 1e-6
    assert np.abs(from_export.embed_text(texts, dim=16) - embedder.embed_text(texts, dim=16)).max() <= 1e-6
    monkeypatch.chdir(run[0].parent)  # a relative workdir path (orbax itself wants absolute ones)
    earlier = inference.read_workdir(run[0].name, step=2)
    assert earlier.step == 2
    assert np.abs(np.asarray(earlier.model.audio.global_token.get_value())
                  - np.asarray(embedder.loaded.model.audio.global_token.get_value())).max() > 0


def test_bad_requests(run, embedder, exported, tmp_path):
    with pytest.raises(CheckpointError, match="steps available"):
        inference.load(run[0], step=5)
    with pytest.raises(ValueError, match=r"--step 2\) applies to training workdirs only"):  # not ignored
        inference.load(exported, step=2)
    with pytest.raises(CheckpointError, match="neither a training workdir"):
        inference.load(tmp_path)
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1, got 0"):
        inference.Embedder(embedder.loaded, batch_size=0)
    with pytest.raises(ValueError, match="not a trained size"):
        embedder.embed_audio(sample_inputs()[0], dim=8)
    with pytest.raises(ValueError, match="expected 1-D mono"):
        embedder.embed_audio([np.zeros((2, 100), np.float32)])
    with pytest.raises(TypeError, match="list of strings"):
        embedder.embed_text("a dog")


def test_embed_cli_similarity_matrix(run, embedder, clips, capsys):
    files = [str(clips / "clip0.flac"), str(clips / "sub" / "clip4.flac")]
    texts = ["a burst of noise", "a tone"]
    embed.main(["--model", str(run[0]), "--audio", *files, "--text", *texts])
    lines = capsys.readouterr().out.splitlines()
    printed = np.array([[float(v) for v in line.split()[-2:]] for line in lines[1:3]])
    decoded = embed.decode_files([clips / "clip0.flac", clips / "sub" / "clip4.flac"], embedder.window_samples)
    expected = embedder.embed_audio(decoded) @ embedder.embed_text(texts).T
    np.testing.assert_allclose(printed, expected, atol=5e-4)  # printed with 3 decimals
    assert lines[3:] == ["[0] a burst of noise", "[1] a tone"]
    # --dim: both kinds at that Matryoshka size.
    embed.main(["--model", str(run[0]), "--audio", *files, "--text", *texts, "--dim", "16"])
    lines = capsys.readouterr().out.splitlines()
    printed = np.array([[float(v) for v in line.split()[-2:]] for line in lines[1:3]])
    expected = embedder.embed_audio(decoded, dim=16) @ embedder.embed_text(texts, dim=16).T
    np.testing.assert_allclose(printed, expected, atol=5e-4)


def test_embed_cli_index_and_search(run, embedder, exported, clips, tmp_path, capsys, monkeypatch):
    index_file = tmp_path / "clips.npz"
    embed.main(["--model", str(run[0]), "--index", str(clips), "--out", str(index_file)])
    captured = capsys.readouterr()
    assert "indexed 5 clips" in captured.out and "skipped 1 unreadable files" in captured.out
    assert "ignored 1 files that are not audio" in captured.out
    assert "skipped broken.flac: truncated" in captured.err

    index = embed.read_index(index_file)
    assert list(index["paths"]) == ["clip0.flac", "clip1.flac", "clip2.flac", "clip3.flac", "sub/clip4.flac"]
    assert [line.split("\t")[0] for line in index["skipped"]] == ["broken.flac"]
    assert str(index["long_clips"]) == "head"
    decoded = embed.decode_files([clips / p for p in index["paths"]], embedder.window_samples)
    assert np.abs(index["embeddings"] - embedder.embed_audio(decoded)).max() <= BATCH_TOLERANCE

    query = "a burst of pink noise"
    embed.main(["--index-file", str(index_file), "--query", query, "--top-k", "3", "--dim", "16"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"query: {query}" and len(lines) == 4
    prefix = index["embeddings"][:, :16]  # the 16-d Matryoshka level of each clip, re-normalised
    scores = (prefix / np.linalg.norm(prefix, axis=1, keepdims=True)) @ embedder.embed_text([query], dim=16)[0]
    best = np.argsort(-scores, kind="stable")[:3]
    for rank, (line, i) in enumerate(zip(lines[1:], best), start=1):
        got_rank, got_score, got_path = line.split()
        assert (int(got_rank), got_path) == (rank, index["paths"][i])
        assert abs(float(got_score) - scores[i]) < 1e-4

    # The model is checked by its embeddings of a probe tone and text: the run's export is the same model, the
    # run's step 2 (one LoRA step earlier, the same embedding size) is not, and was searched without a word.
    full_scores = index["embeddings"] @ embedder.embed_text([query])[0]
    expected = [index["paths"][i] for i in np.argsort(-full_scores, kind="stable")[:3]]
    assert [hit.path for hit in embed.search(index, inference.load(exported), [query], 3)[0]] == expected
    with pytest.raises(SystemExit, match=rf"^error: the index was built with another model \({run[0]}, step 3\)"):
        embed.main(["--index-file", str(index_file), "--model", str(run[0]), "--step", "2", "--query", query])
    with pytest.raises(SystemExit):  # --step alone would be ignored: the index names its model and step
        embed.main(["--index-file", str(index_file), "--step", "2", "--query", query])
    assert "--step needs --model (the index was built with" in capsys.readouterr().err

    # An index is replaced whole: a write that fails part way (a full disk) keeps the previous one.
    before = index_file.read_bytes()

    def full_disk(handle, **arrays):
        handle.write(b"PK\x03\x04 cut short")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(OSError, match="No space left"):
        embed.build_index(embedder, clips, index_file, progress=False)
    assert index_file.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["clips.npz"]


def test_embed_cli_long_clips_mean_embeds_each_file_whole(run, embedder, clips, tmp_path, capsys):
    """`--long-clips mean` decodes each file whole and embeds it as the mean of its windows (1 s here; the clips
    are 1-1.5 s), in an index (which records the choice) and in the similarity matrix; a search refuses it."""
    index_file = tmp_path / "mean.npz"
    embed.main(["--model", str(run[0]), "--index", str(clips), "--out", str(index_file), "--long-clips", "mean"])
    assert "indexed 5 clips" in capsys.readouterr().out
    index = embed.read_index(index_file)
    assert str(index["long_clips"]) == "mean"
    whole = [load_audio(clips / path) for path in index["paths"]]
    assert {len(waveform) for waveform in whole} == {24000}  # two windows each, the second half full
    expected = embedder.embed_audio(whole, long_clips="mean")
    assert np.abs(index["embeddings"] - expected).max() <= BATCH_TOLERANCE
    assert (np.abs(expected - embedder.embed_audio(whole)).max(axis=1) > 10 * BATCH_TOLERANCE).all()  # not the heads

    texts = ["a burst of noise", "a tone"]
    chosen = [clips / path for path in index["paths"][:2]]
    embed.main(["--model", str(run[0]), "--audio", *map(str, chosen), "--text", *texts, "--long-clips", "mean"])
    lines = capsys.readouterr().out.splitlines()
    printed = np.array([[float(v) for v in line.split()[-2:]] for line in lines[1 : 1 + len(chosen)]])
    mean = embedder.embed_audio([load_audio(path) for path in chosen], long_clips="mean")
    np.testing.assert_allclose(printed, mean @ embedder.embed_text(texts).T, atol=5e-4)  # 3 decimals

    for texts_only in (["--index-file", str(index_file), "--query", "a tone"], ["--model", str(run[0]), "--text", "a"]):
        with pytest.raises(SystemExit):  # the option would change nothing
            embed.main([*texts_only, "--long-clips", "mean"])
        assert "--long-clips applies to --audio and --index" in capsys.readouterr().err


def test_embed_cli_usage_errors(run, tmp_path):
    with pytest.raises(SystemExit):
        embed.main(["--model", str(run[0])])  # no mode
    with pytest.raises(SystemExit, match="no readable audio files"):
        (tmp_path / "empty").mkdir()
        embed.main(["--model", str(run[0]), "--index", str(tmp_path / "empty"), "--out", str(tmp_path / "x.npz")])
    np.savez(tmp_path / "bogus.npz", embeddings=np.zeros((1, 32)))
    with pytest.raises(SystemExit, match="not an index written by --index"):
        embed.main(["--index-file", str(tmp_path / "bogus.npz"), "--query", "a dog"])
    with pytest.raises(SystemExit, match=r"^error: .*nope.npz: no such index file; write one with --index FOLDER"):
        embed.main(["--index-file", str(tmp_path / "nope.npz"), "--query", "a dog"])  # was errno's words alone



def test_embed_cli_refuses_a_blank_query_or_text(capsys):
    """A blank query was ranked against the index (a blank --text in the matrix) as if it said something, where
    evaluation drops blank captions; refused before anything is read or loaded."""
    for argv in (["--index-file", "x.npz", "--query", "a dog", "--query", "  "], ["--model", "m", "--text", ""]):
        with pytest.raises(SystemExit):
            embed.main(argv)
        assert capsys.readouterr().err.splitlines()[-1].endswith("is blank: give words to embed")


@pytest.mark.parametrize("option", ["--top-k", "--batch-size"])
def test_embed_cli_counts_must_be_positive(capsys, option):
    """--top-k -1 listed every clip but the last; --batch-size 0 ran with one clip per device."""
    for value in ("-1", "0"):
        with pytest.raises(SystemExit):
            embed.main(["--index-file", "x.npz", "--query", "a dog", option, value])
        assert capsys.readouterr().err.splitlines()[-1].endswith(
            f"error: argument {option}: {value!r} is not a positive whole number")


def test_embed_cli_checks_the_index_file_before_loading_the_model(tmp_path, monkeypatch, capsys):
    """An --out that cannot be written is refused first (it failed only after the whole folder was embedded)."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(inference, "load", load)
    (tmp_path / "file").write_text("")
    for out, message in ((tmp_path / "file" / "x.npz", f"{tmp_path / 'file'} is a file, not a folder"),
                         (tmp_path, "is a directory; give the name of a file in it")):
        with pytest.raises(SystemExit):
            embed.main(["--model", str(tmp_path), "--index", str(tmp_path), "--out", str(out)])
        assert capsys.readouterr().err.splitlines()[-1].endswith(message)
    with pytest.raises(SystemExit, match=rf"{tmp_path / 'gone'}: not a directory"):  # the folder, too
        embed.main(["--model", str(tmp_path), "--index", str(tmp_path / "gone"), "--out", str(tmp_path / "x.npz")])


def test_check_same_model_compares_both_probes():
    """An index whose audio probe alone differs (text tower frozen in training) is still another model."""
    class Stub:  # what check_same_model reads of an Embedder; no model needed
        config = types.SimpleNamespace(audio=types.SimpleNamespace(dtype="float32"))
        window_samples = 160

        def embed_audio(self, clips):
            return np.ones((len(clips), 4), np.float32)

        def embed_text(self, texts):
            return np.full((len(texts), 4), 2.0, np.float32)

    stub = Stub()
    index = {"probe_setting": np.array(embed._probe_setting(stub)), "step": np.array(-1), "model": np.array("m"),
             **embed.probe_embeddings(stub)}
    embed.check_same_model(index, stub)  # the same model passes
    index["probe_audio"] = index["probe_audio"] + 0.5
    with pytest.raises(ValueError, match="the index was built with another model"):
        embed.check_same_model(index, stub)
    # A model embedding at another window (or dtype) was passed unchecked: the probes are not comparable then.
    stub.window_samples = 320
    settings = r"at float32 160 \(dtype, window in samples\), this one embeds at float32 320:"
    with pytest.raises(ValueError, match=settings):
        embed.check_same_model(index, stub)


def test_audio_files_are_found_by_extension_in_any_case(tmp_path):
    """`.WAV` and `.Flac` are audio files too (cameras and recorders write upper-case names)."""
    (tmp_path / "deep").mkdir()
    for name in ("a.WAV", "deep/b.Flac", "c.mp3", "notes.txt", "wav"):
        (tmp_path / name).write_bytes(b"")
    found, ignored = embed.audio_files(tmp_path)
    assert [str(path.relative_to(tmp_path)) for path in found] == ["a.WAV", "c.mp3", "deep/b.Flac"] and ignored == 2


def test_audio_files_follow_links_and_list_a_link_to_nothing(tmp_path):
    """A link to a folder is walked (once: a link back up ends there); a link to a file that is gone is listed,
    so that the index skips it as missing and counts it; both were left out without a word."""
    for name in ("real/one.wav", "elsewhere/two.wav", "elsewhere/three.flac"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    root = tmp_path / "real"
    (root / "linked.wav").symlink_to(root / "one.wav")
    (root / "gone.wav").symlink_to(tmp_path / "nowhere.wav")
    (root / "more").symlink_to(tmp_path / "elsewhere")
    (root / "more" / "up").symlink_to(root)  # a loop
    (root / "zz_same").symlink_to(tmp_path / "elsewhere")  # a second path to a folder: the first in order is kept
    os.mkfifo(root / "pipe.wav")  # not a file: opening it would wait for a writer
    found, ignored = embed.audio_files(root)
    assert [str(path.relative_to(root)) for path in found] == [
        "gone.wav", "linked.wav", "more/three.flac", "more/two.wav", "one.wav"
    ] and ignored == 0


def test_an_index_of_more_files_than_one_batch_holds_every_file(embedder, clips, tmp_path):
    """Files are decoded and embedded a batch at a time (8 here): 11 files, an unreadable one among them, give
    10 rows in order, each the embedding of its own file."""
    folder = tmp_path / "many"
    folder.mkdir()
    sources = sorted(clips.glob("clip*.flac")) + [clips / "sub" / "clip4.flac"]
    for index in range(10):
        shutil.copyfile(sources[index % 5], folder / f"{index:02d}.flac")
    shutil.copyfile(clips / "broken.flac", folder / "05b.flac")
    report = embed.build_index(embedder, folder, tmp_path / "many.npz", progress=False)
    index = embed.read_index(tmp_path / "many.npz")
    assert report.indexed == 10 and [path for path, _ in report.skipped] == ["05b.flac"]
    assert list(index["paths"]) == [f"{i:02d}.flac" for i in range(10)]
    decoded = embed.decode_files([folder / p for p in index["paths"]], embedder.window_samples)
    assert np.abs(index["embeddings"] - embedder.embed_audio(decoded)).max() <= BATCH_TOLERANCE


def test_an_index_of_whole_files_embeds_them_a_batch_of_windows_at_a_time(embedder, clips, tmp_path, monkeypatch):
    """With `long_clips="mean"` files are decoded whole, `DECODE_THREADS` (4) at a time, and embedded once they hold
    a batch of windows (8 here; each 1.5 s file has two 1 s windows), not a batch of files at a time: 6 files are
    embedded as 4 and 2, and each row is its own file's mean."""
    folder = tmp_path / "whole"
    folder.mkdir()
    for index in range(6):
        shutil.copyfile(clips / f"clip{index % 4}.flac", folder / f"{index}.flac")
    calls = []
    embed_audio = embedder.embed_audio
    monkeypatch.setattr(embedder, "embed_audio", lambda waves, **options: calls.append(len(waves)) or (
        embed_audio(waves, **options)))
    embed.build_index(embedder, folder, tmp_path / "whole.npz", long_clips="mean", progress=False)
    index = embed.read_index(tmp_path / "whole.npz")
    assert calls == [4, 2, 1] and embedder.batch_size == 8  # the files, then the probe tone
    expected = embed_audio([load_audio(folder / path) for path in index["paths"]], long_clips="mean")
    assert np.abs(index["embeddings"] - expected).max() <= BATCH_TOLERANCE


def test_clip_windows_of_another_window_are_refused(embedder):
    """`evaluate.ClipWindows` reach the model as they are, so windows cut for another window length are refused
    (they were cut or padded again, and weighted by the wrong length), and so is averaging them a second time."""
    from wavlink_jax.evaluate import ClipWindows

    clips = [np.zeros(24000, np.float32)]
    with pytest.raises(ValueError, match=r"^windows of 8000 samples given to an embedder whose window is 16000"):
        embedder.embed_audio(ClipWindows(clips, 8000))
    with pytest.raises(ValueError, match=r"^ClipWindows are windows already"):
        embedder.embed_audio(ClipWindows(clips, 16000), long_clips="mean")
    assert embedder.embed_audio(ClipWindows(clips, 16000)).shape == (2, 32)


def test_a_search_without_model_uses_the_model_and_step_the_index_names(run, exported, clips, tmp_path, capsys,
                                                                        monkeypatch):
    """An index records its model as an absolute path (built here from a relative one) with the step that was
    read (2, not the latest 3) or -1 for an export; a search without --model, from another folder, loads that
    model at that step (the latest step is another model, whose probes the search would refuse)."""
    query = "a burst of pink noise"
    monkeypatch.chdir(run[0].parent)
    embed.main(["--model", run[0].name, "--step", "2", "--index", str(clips), "--out", str(tmp_path / "two.npz")])
    embed.build_index(inference.load(exported), clips, tmp_path / "export.npz", progress=False)
    monkeypatch.chdir(tmp_path)
    for name, model, step in (("two.npz", run[0], 2), ("export.npz", exported, None)):
        index = embed.read_index(tmp_path / name)
        assert (str(index["model"]), int(index["step"])) == (str(model.resolve()), -1 if step is None else step)
        capsys.readouterr()
        embed.main(["--index-file", name, "--query", query, "--top-k", "1"])  # another model would be refused
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == f"query: {query}" and lines[1].split()[2] in index["paths"]


def test_replaced_writes_beside_the_target_with_its_suffix(tmp_path):
    """`files.replaced` hands out a path in the target's folder (one rename, never a copy across file systems)
    with the target's suffix, so a writer that adds a missing suffix (np.save) writes where it is told; a failed
    write keeps the old file and leaves nothing behind."""
    target = tmp_path / "index.npy"
    target.write_bytes(b"old")
    with files.replaced(target) as partial:
        assert partial.parent == target.parent and partial.name.startswith(".")
        np.save(partial, np.arange(3))
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    with pytest.raises(RuntimeError, match="disk full"), files.replaced(target) as partial:
        partial.write_bytes(b"cut")
        raise RuntimeError("disk full")
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    assert [path.name for path in tmp_path.iterdir()] == ["index.npy"]
