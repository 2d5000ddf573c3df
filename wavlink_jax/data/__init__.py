"""Audio–text data: sources (manifest JSONL, TFDS array_record), the grain pipeline, the generated data set.

- `sources.py`: the record format every source yields, the manifest source, `open_source(spec)`.
- `audio_io.py`: decode → mono → resample to 16 kHz → crop/pad, and the bad-input reasons.
- `pipeline.py`: training iterator and evaluation set (`make_train_iterator`, `make_eval_set`).
- `synthetic.py`: the generated captioned-audio data set of the quickstart.
- `python -m wavlink_jax.data check SOURCE`: decode every clip whole and report the bad ones.

Submodules are imported on demand, so `import wavlink_jax.data` stays cheap (grain workers import it).
"""
