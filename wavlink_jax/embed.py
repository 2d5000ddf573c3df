"""Embed and search from the command line, with a training workdir or an exported directory as the model.

    # similarity matrix (cosine) of audio files × texts
    python -m wavlink_jax.embed --model M --audio a.wav b.flac --text "a dog barks" "rain on a roof"
    # embed every audio file under FOLDER into an index
    python -m wavlink_jax.embed --model M --index FOLDER --out index.npz
    # the top-k clips of an index for a text query (the model is the one the index was built with)
    python -m wavlink_jax.embed --index-file index.npz --query "a dog barks" --top-k 5

Only audio files, by extension (`AUDIO_EXTENSIONS`), are indexed; a file that cannot be decoded (truncated,
not audio, empty) is skipped and listed with its reason, and the count is printed. Clips are cut to the
head of the model's window or zero-padded, as `wavlink_jax.inference` does; with `--long-clips mean` a longer
clip is decoded whole and embedded as the mean of its windows (`inference.Embedder.embed_audio`). `--dim D`
uses the Matryoshka size D everywhere (the index keeps full-size embeddings, so it serves every size).

The index is a NumPy `.npz`: `embeddings` (N, E) float32 L2-normalised, `paths` (relative to `folder`),
`folder`, `model` (absolute path), `step` (the workdir checkpoint step that was read, the latest unless `--step`;
-1 for an exported directory), `long_clips` ("head" or "mean"), `skipped` ("path<TAB>reason: message" lines, one
per unreadable file), `probe_audio` and `probe_text` (the model's embeddings of a fixed tone and text) and
`probe_setting` (the compute dtype and window they were made with): a search refuses a model that embeds them
otherwise, i.e. other weights, even of the same size (a workdir and its export embed them alike), or at another
setting, where they cannot be compared (the command line loads every model at float32 and its own window; an index
built from Python at other settings is searched from Python with the model loaded as it was).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import sys
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from wavlink_jax import cli, inference
from wavlink_jax.data.audio_io import BadAudio, load_audio
from wavlink_jax.evaluate import scores_of, truncate_normalize
from wavlink_jax.files import replaced
from wavlink_jax.waveform_layout import LONG_CLIPS, check_long_clips, window_plan

AUDIO_EXTENSIONS = frozenset(
    {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd", ".w64", ".caf", ".rf64"}
)
DECODE_THREADS = 4
PROBE_TEXT = "a probe of the model an index was built with"
PROBE_TOLERANCE = 1e-3  # the same weights agree to ~1e-7 (workdir vs its export); one LoRA step moved them 2e-2


@dataclasses.dataclass
class IndexReport:
    indexed: int
    skipped: list[tuple[str, str]]  # (path relative to the folder, reason: message)
    ignored: int  # files without an audio extension


@dataclasses.dataclass
class Hit:
    rank: int
    score: float
    path: str


def audio_files(folder: str | os.PathLike) -> tuple[list[Path], int]:
    """Audio files under `folder` (recursively, sorted) and the number of other files left out. Links are
    followed into folders, each folder walked once, by the first of its paths in sorted order (a link to a folder
    above it ends there); a link to a file that is gone is listed, to be skipped as missing and counted (`rglob`
    left out both without a word). Not files: FIFOs and sockets (opening one would wait for a writer)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory")
    files, walked = [], set()
    for root, folders, names in os.walk(folder, followlinks=True):
        folders.sort()  # walked in order, so that which path reaches a folder first is the same on any machine
        if os.path.realpath(root) in walked:
            folders[:] = []
            continue
        walked.add(os.path.realpath(root))
        files += [path for path in (Path(root) / name for name in names) if _file_or_dangling(path)]
    files.sort()
    audio = [path for path in files if path.suffix.lower() in AUDIO_EXTENSIONS]
    return audio, len(files) - len(audio)


def _file_or_dangling(path: Path) -> bool:
    """A file, a link to nothing (skipped as missing when decoded), or one that cannot be looked at (no search
    permission: skipped and counted when decoded); not a FIFO or socket."""
    try:
        return path.is_file() or not path.exists()
    except OSError:
        return True


def _decode(path: Path, window_samples: int | None) -> np.ndarray | BadAudio:
    try:
        return load_audio(path, window_samples=window_samples)
    except BadAudio as err:
        return err


def decode_files(paths: Sequence[Path], window_samples: int | None) -> list[np.ndarray | BadAudio]:
    """Each file at 16 kHz, its head window (zero-padded) or whole (`window_samples=None`), or the `BadAudio` it
    raised; decoded in threads."""
    with concurrent.futures.ThreadPoolExecutor(DECODE_THREADS) as pool:
        return list(pool.map(lambda path: _decode(path, window_samples), paths))


def _decoded_length(embedder: inference.Embedder, long_clips: str) -> int | None:
    """What `decode_files` needs of each file: the head window, or the whole clip for `long_clips="mean"`."""
    check_long_clips(long_clips)
    return embedder.window_samples if long_clips == "head" else None


def _probe_setting(embedder: inference.Embedder) -> str:
    return f"{embedder.config.audio.dtype} {embedder.window_samples}"


def probe_embeddings(embedder: inference.Embedder) -> dict[str, np.ndarray]:
    """The model's full-size embeddings of a fixed 440 Hz tone (its window long) and of `PROBE_TEXT`: what
    identifies the weights an index was built with, both towers (one may have been frozen in training). They
    depend on the dtype and window too (`_probe_setting`)."""
    tone = 0.1 * np.sin(2 * np.pi * 440 * np.arange(embedder.window_samples) / 16000).astype(np.float32)
    return {"probe_audio": embedder.embed_audio([tone])[0], "probe_text": embedder.embed_text([PROBE_TEXT])[0]}


def check_same_model(index: dict[str, np.ndarray], embedder: inference.Embedder) -> None:
    """Refuse to search `index` with a model other than the one it was built with: one whose probe embeddings
    differ, or that embeds in another dtype or window (the probes cannot be compared then; the command line loads
    every model at its own, so that is another model). Not checked: indexes written before the probes existed."""
    if "probe_setting" not in index:
        return
    if str(index["probe_setting"]) != _probe_setting(embedder):
        raise ValueError(
            f"the index was built with a model embedding at {index['probe_setting']} (dtype, window in samples), "
            f"this one embeds at {_probe_setting(embedder)}: another model, or one loaded otherwise; search with "
            f"the model the index was built with ({index['model']}), loaded as it was (from Python: "
            "inference.load(..., dtype=..., window_seconds=...) and embed.search)"
        )
    probes = probe_embeddings(embedder)
    difference = max(float(np.max(np.abs(index[name] - value))) for name, value in probes.items())
    if difference > PROBE_TOLERANCE:
        step = int(index["step"])
        raise ValueError(
            f"the index was built with another model ({index['model']}{'' if step < 0 else f', step {step}'}): "
            f"this one embeds the probe tone and text {difference:.3f} apart; search with that model (leave out "
            "--model and --step), or rebuild the index with this one"
        )


def build_index(
    embedder: inference.Embedder,
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    long_clips: str = "head",
    progress: bool = True,
) -> IndexReport:
    """Embed every audio file under `folder` and save the index to `out` (see the module docstring).

    Decoded files are embedded once they hold a batch of windows. Head windows are decoded a batch of files at a
    time; whole files (`long_clips="mean"`) `DECODE_THREADS` at a time, so that memory holds about a batch of
    windows' audio beside the last few files, however long the files are."""
    folder = Path(folder).resolve()
    files, ignored = audio_files(folder)
    decoded_length = _decoded_length(embedder, long_clips)
    group_size = embedder.batch_size if long_clips == "head" else DECODE_THREADS
    embeddings, paths, skipped = [], [], []
    pending: list[np.ndarray] = []  # decoded, not yet embedded

    def embed_pending() -> None:
        if pending:
            embeddings.append(embedder.embed_audio(pending, long_clips=long_clips))
            pending.clear()

    with tqdm(total=len(files), desc="indexing", unit="file", disable=not progress) as bar:
        for start in range(0, len(files), group_size):
            group = files[start : start + group_size]
            for path, result in zip(group, decode_files(group, decoded_length)):
                relative = str(path.relative_to(folder))
                if isinstance(result, BadAudio):
                    skipped.append((relative, f"{result.reason}: {result}"))
                else:
                    pending.append(result)
                    paths.append(relative)
            if sum(len(window_plan(len(clip), embedder.window_samples)) for clip in pending) >= embedder.batch_size:
                embed_pending()
            bar.update(len(group))
        embed_pending()
    if not paths:
        raise ValueError(f"{folder}: no readable audio files ({len(skipped)} unreadable, {ignored} not audio)")
    loaded = embedder.loaded
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Replaced whole (an index cut short by a full disk destroyed the previous one); a file object, since np.savez
    # would otherwise append ".npz" to the name.
    with replaced(out) as partial, open(partial, "wb") as handle:
        np.savez(
            handle,
            embeddings=np.concatenate(embeddings).astype(np.float32),
            paths=np.array(paths),
            folder=np.array(str(folder)),
            model=np.array(str(loaded.path.resolve())),
            step=np.array(-1 if loaded.step is None else loaded.step),
            long_clips=np.array(long_clips),
            skipped=np.array([f"{path}\t{reason}" for path, reason in skipped], dtype=str),
            **probe_embeddings(embedder),
            probe_setting=np.array(_probe_setting(embedder)),
        )
    return IndexReport(indexed=len(paths), skipped=skipped, ignored=ignored)


def read_index(index_file: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an index written by `--index`; anything else is a ValueError naming the file."""
    try:
        archive = np.load(index_file)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{index_file}: no such index file; write one with --index FOLDER --out FILE") from err
    except (ValueError, EOFError, zipfile.BadZipFile) as err:  # numpy's own words ("pickled data") mislead here
        raise ValueError(f"{index_file}: not an index written by --index (not an .npz archive: {err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{index_file}: not an index written by --index (a single .npy array, not an .npz archive)")
    with archive as data:
        missing = {"embeddings", "paths", "folder", "model", "step"} - set(data.files)
        if missing:
            raise ValueError(f"{index_file}: not an index written by --index (missing {sorted(missing)})")
        return {name: data[name] for name in data.files}


def search(
    index: dict[str, np.ndarray],
    embedder: inference.Embedder,
    queries: Sequence[str],
    top_k: int,
    dim: int | None = None,
) -> list[list[Hit]]:
    """For each query, the `top_k` clips of `index` most similar to it (cosine), best first. `embedder` must be the
    model the index was built with (checked once: the embedding size, and the probes where the index has them)."""
    clips = index["embeddings"]
    if clips.shape[1] != embedder.config.embed_dim:
        raise ValueError(
            f"the index holds {clips.shape[1]}-d embeddings but the model makes {embedder.config.embed_dim}-d ones; "
            "query with the model the index was built with"
        )
    check_same_model(index, embedder)
    query_embeddings = embedder.embed_text(list(queries), dim=dim)  # refuses a dim that is not a trained size
    # Copies of one clip score equally, so they keep the index's order.
    all_scores = scores_of(query_embeddings, clips if dim is None else truncate_normalize(clips, dim))
    paths = index["paths"]
    orders = np.argsort(-all_scores, axis=1, kind="stable")[:, :top_k]
    return [
        [Hit(rank=rank + 1, score=float(scores[i]), path=str(paths[i])) for rank, i in enumerate(order)]
        for scores, order in zip(all_scores, orders)
    ]


def similarity(
    embedder: inference.Embedder,
    audio: Sequence[str],
    texts: Sequence[str],
    dim: int | None = None,
    *,
    long_clips: str = "head",
) -> tuple[np.ndarray, list[str], list[str]]:
    """Cosine similarities of the audio files and texts: (matrix, row labels, column labels).

    Audio × text when both are given, otherwise the one kind against itself.
    """
    embedded = []
    if audio:
        decoded = decode_files([Path(p) for p in audio], _decoded_length(embedder, long_clips))
        bad = [f"{path}: {result.reason}: {result}" for path, result in zip(audio, decoded) if isinstance(result, BadAudio)]
        if bad:
            raise ValueError("cannot read " + "; ".join(bad))
        embedded.append((embedder.embed_audio(decoded, dim=dim, long_clips=long_clips), list(audio)))
    if texts:
        embedded.append((embedder.embed_text(list(texts), dim=dim), list(texts)))
    if not embedded:
        raise ValueError("nothing to embed: give --audio and/or --text")
    (rows, row_labels), (columns, column_labels) = embedded[0], embedded[-1]
    return rows @ columns.T, row_labels, column_labels


def format_matrix(matrix: np.ndarray, rows: Sequence[str], columns: Sequence[str], width: int = 24) -> str:
    """A plain-text table: one row per row label, columns numbered and listed underneath."""
    def clip(text: str) -> str:
        return text if len(text) <= width else "…" + text[-(width - 1) :]

    lines = [" " * width + "".join(f"{f'[{j}]':>9}" for j in range(len(columns)))]
    lines += [f"{clip(label):<{width}}" + "".join(f"{v:9.3f}" for v in row) for label, row in zip(rows, matrix)]
    lines += [f"[{j}] {label}" for j, label in enumerate(columns)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m wavlink_jax.embed",
        description="Embed audio files and texts with a WavLink model (a training workdir or an exported "
        "directory): similarity matrix, folder index, text search.",
    )
    parser.add_argument(
        "--model", type=os.path.expanduser,
        help="training workdir or exported directory (for --index-file: defaults to the model the index was "
        "built with)",
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir (default: latest)")
    parser.add_argument("--audio", nargs="+", default=[], type=os.path.expanduser, help="audio files")
    parser.add_argument("--text", nargs="+", default=[], help="texts")
    parser.add_argument(
        "--index", metavar="FOLDER", type=os.path.expanduser, help="embed every audio file under FOLDER into --out"
    )
    parser.add_argument("--out", metavar="INDEX.npz", type=cli.output_file, help="index file written by --index")
    parser.add_argument(
        "--index-file", metavar="INDEX.npz", type=os.path.expanduser, help="index to search with --query"
    )
    parser.add_argument("--query", action="append", default=[], help="text query (repeatable)")
    parser.add_argument("--top-k", type=cli.positive_int, default=10, help="results per query (default 10)")
    parser.add_argument("--dim", type=int, default=None, help="Matryoshka embedding size (default: full)")
    parser.add_argument(
        "--long-clips", choices=LONG_CLIPS, default=None,
        help="a clip longer than the model's window: 'head' embeds its first window (the default), 'mean' the "
        "mean of the embeddings of its consecutive windows, weighted by the audio in each (--audio, --index)",
    )
    parser.add_argument("--batch-size", type=cli.positive_int, default=32,
                        help="clips or texts per forward pass over all local devices, rounded up to a multiple of "
                             "their number (default 32)")
    args = parser.parse_args(argv)

    blank = next((f"--{option} {text!r}" for option in ("text", "query") for text in getattr(args, option)
                  if not text.strip()), None)
    if blank:  # evaluation drops blank captions; here one was embedded and ranked as if it said something
        parser.error(f"{blank} is blank: give words to embed")
    modes = [bool(args.audio or args.text), bool(args.index or args.out), bool(args.index_file or args.query)]
    if sum(modes) != 1:
        parser.error("choose one of: --audio/--text (similarity), --index FOLDER --out INDEX.npz, "
                     "or --index-file INDEX.npz --query TEXT")
    with cli.user_errors(out_of_memory=cli.LOWER_BATCH_SIZE_ADVICE):
        if args.index or args.out:
            if not (args.index and args.out and args.model):
                parser.error("--index needs --model and --out")
            if args.dim is not None:
                parser.error("--dim applies to searching and --audio/--text; an index keeps full-size embeddings")
            audio_files(args.index)  # a folder that is not there is refused before the model is loaded
            embedder = inference.load(args.model, args.step, batch_size=args.batch_size)
            report = build_index(embedder, args.index, args.out, long_clips=args.long_clips or "head")
            for path, reason in report.skipped:
                print(f"skipped {path}: {reason}", file=sys.stderr)
            print(f"indexed {report.indexed} clips into {args.out}; skipped {len(report.skipped)} unreadable "
                  f"files; ignored {report.ignored} files that are not audio")
        elif args.index_file or args.query:
            if not (args.index_file and args.query):
                parser.error("searching needs --index-file and --query")
            if args.long_clips:
                parser.error("--long-clips applies to --audio and --index: a search embeds only its queries")
            index = read_index(args.index_file)
            if args.step is not None and not args.model:
                built = f"{index['model']}, step {int(index['step'])}"
                parser.error(f"--step needs --model (the index was built with {built})")
            step = args.step if args.model else (None if int(index["step"]) < 0 else int(index["step"]))
            embedder = inference.load(args.model or str(index["model"]), step, batch_size=args.batch_size)
            for query, hits in zip(args.query, search(index, embedder, args.query, args.top_k, args.dim)):
                print(f"query: {query}")
                for hit in hits:
                    print(f"{hit.rank:4d}  {hit.score:7.4f}  {hit.path}")
        else:
            if not args.model:
                parser.error("--audio/--text need --model")
            if args.long_clips and not args.audio:
                parser.error("--long-clips applies to --audio and --index: texts have no windows")
            embedder = inference.load(args.model, args.step, batch_size=args.batch_size)
            matrix = similarity(embedder, args.audio, args.text, args.dim, long_clips=args.long_clips or "head")
            print(format_matrix(*matrix))


if __name__ == "__main__":
    main()
