"""What every config file shares: the full set of keys the trainer reads, with defaults, and argument parsing.

A config file's `get_config(arg)` calls `base_config(...)` and changes what differs. Every key is listed here,
so `--config.some.key=value` on the command line can only change a key that exists (ml_collections refuses
unknown keys), and the config is locked, so a config file cannot add one either (a typo is an error). Keys (see
the README section "Configs" for more):

    seed, batch_size (global), total_steps (0 = from epochs), epochs, accum_steps
    log_every_steps, checkpoint_every_steps, eval_every_steps (0 = only at the end), keep_checkpoints
    progress_bar, compilation_cache_dir ("auto" | a folder | "off": compiled steps reused across runs)
    distributed ("auto" | True | False), mesh {data, fsdp, tensor}, sharding_rules ((logical, mesh axes), ...)
    dtype (compute), remat, attention_implementation  -- applied to both towers
    model          wavlink_jax.models.wavlink.WavLinkConfig fields (audio / text tower sizes, embed_dim, ...)
    loss           clip_weight, sigmoid_weight, impl ("dense" | "ring"), clip_max_scale (cap on exp(clip
                   log-scale) after every update, CLIP's 100; inf = no cap)
    optim          AdamW, schedule, freeze / lr_rules / no_decay regexes, mode + towers (training-mode preset)
    lora           rank, alpha (used when optim.mode = "lora")
    data           wavlink_jax.data.pipeline.DataConfig fields (sources, window_seconds, tokenizer, ...)
    init_from      workdir (a stage-1 run) | audio, text (converted or Hugging Face tower checkpoints)
    eval           sets ({"name": ..., "source": <a data source spec>, "window_seconds": optional window (head
                   crop, or with "mean" each window's length), "long_clips": optional "head" | "mean"}, ...) scored
                   every eval_every_steps, batch_size, max_clips (0 = all)
"""

from __future__ import annotations

import ast

import ml_collections

from wavlink_jax import sharding
from wavlink_jax.data.pipeline import default_data_config
from wavlink_jax.models.wavlink import WavLinkConfig
from wavlink_jax.train_step import TOWER_RUNTIME_FIELDS


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """`"stage=2,size=base"` → ConfigDict of `defaults` updated from `arg`. A value takes its default's type: text
    as written for a string (a path such as `2024.10` stays that), a whole number for an int, a number for a
    float, True/False for a bool (a Python literal, or text, where the default is None). A name not in
    `defaults`, or a value not of its type (`steps=2.5`, `stage=abc`), is an error naming it."""
    result = ml_collections.ConfigDict(defaults)
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"config argument {item!r} is not name=value (full argument: {arg!r})")
        if name not in defaults:
            raise ValueError(f"unknown config argument {name!r}; known: {sorted(defaults)}")
        result[name] = _argument_value(name, text, defaults[name])
    return result


def _argument_value(name: str, text: str, default: object) -> object:
    if isinstance(default, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if default is None:
        return value
    kinds = {bool: (bool,), int: (int,), float: (int, float)}[type(default)]
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        raise ValueError(f"config argument {name}={text!r}: expected {type(default).__name__} (like {default!r})")
    return type(default)(value)


def model_section(model: WavLinkConfig) -> ml_collections.ConfigDict:
    """A WavLinkConfig as the `config.model` section (tower runtime fields left to the top-level keys;
    `matryoshka_dims` a tuple, which `--config.model.matryoshka_dims='(512, 128)'` can override)."""
    fields = model.to_dict()
    for tower in ("audio", "text"):
        for name in TOWER_RUNTIME_FIELDS:
            fields[tower].pop(name)
    fields["matryoshka_dims"] = tuple(fields["matryoshka_dims"])
    return ml_collections.ConfigDict(fields)


def base_config(model: WavLinkConfig) -> ml_collections.ConfigDict:
    """Every key with the paper's recipe as defaults (AdamW lr 1e-4, cosine with 5% warm-up, bf16, global
    batch 768, 3 epochs, CLIP + sigmoid losses, full fine-tuning of both towers).

    Every default has a type the command line can override (`--config.KEY=VALUE`): sequences are tuples (a list
    cannot be overridden), and a key whose default is None is a typed placeholder."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch_size = 768
    config.total_steps = 0
    config.epochs = 3.0
    config.accum_steps = 1
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.eval_every_steps = 2000
    config.keep_checkpoints = 3
    config.progress_bar = True
    # Compiled programs kept across runs: "auto" = JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/wavlink_jax/xla;
    # a folder (on a multi-host run, one all hosts share) or "off" (train.use_compilation_cache).
    config.compilation_cache_dir = "auto"

    config.distributed = "auto"
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.sharding_rules = sharding.DEFAULT_RULES

    config.dtype = "bfloat16"
    config.remat = "none"
    config.attention_implementation = "auto"  # the fastest that applies: cuDNN on a GPU in bf16/fp16, else XLA
    config.model = model_section(model)

    config.loss = ml_collections.ConfigDict(
        {"clip_weight": 1.0, "sigmoid_weight": 1.0, "impl": "dense", "clip_max_scale": 100.0}
    )
    config.optim = ml_collections.ConfigDict(
        {
            "learning_rate": 1e-4,
            "schedule": "cosine",
            "warmup_fraction": 0.05,
            "end_lr_fraction": 0.0,
            "b1": 0.9,
            "b2": 0.98,
            "eps": 1e-6,
            "weight_decay": 0.1,
            "grad_clip_norm": 1.0,
            "mode": "full",
            "towers": "both",
            "freeze": (),
            "lr_rules": (),
            "no_decay": (),
        }
    )
    config.lora = ml_collections.ConfigDict({"rank": 8, "alpha": 16.0})
    config.data = default_data_config()
    config.init_from = ml_collections.ConfigDict({"workdir": "", "audio": "", "text": ""})
    config.eval = ml_collections.ConfigDict({"sets": (), "batch_size": 64, "max_clips": 0})
    config.lock()  # a config file's typo (config.optim.learing_rate = ...) is an error, not a key nothing reads
    return config


# The paper's sizes: pretrained tower checkpoints (Hugging Face hub ids, or local directories) and defaults.
PAPER_TOWERS = {
    "base": ("openai/whisper-base.en", "openai/clip-vit-base-patch32"),
    "small": ("openai/whisper-small.en", "openai/clip-vit-base-patch32"),
    "large": ("openai/whisper-large-v3", "openai/clip-vit-large-patch14"),
}


def paper_config(size: str, arg: str | None) -> ml_collections.ConfigDict:
    """The paper's two-stage recipe for one model size.

    Arguments (`configs/wavlink_SIZE.py:name=value,...`):
      stage           1: Auto-ACD + AudioSetCaps, towers from the pretrained Whisper / CLIP checkpoints;
                      2: AudioCaps + Clotho training splits, initialised from the stage-1 workdir
      data_dir        where `python -m wavlink_jax.data.tfds_builders build ...` prepared the data sets
      stage1_workdir  the stage-1 run (stage 2 only)
      audio_init, text_init   tower checkpoints for stage 1 (hub id or local directory)
    """
    audio_init, text_init = PAPER_TOWERS[size]
    args = parse_arg(
        arg, stage=1, data_dir="~/tensorflow_datasets", stage1_workdir="", audio_init=audio_init, text_init=text_init
    )
    if args.stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {args.stage}")
    config = base_config(WavLinkConfig.preset(size))

    def tfds(name: str, split: str) -> dict:
        return {"kind": "tfds", "name": name, "split": split, "data_dir": args.data_dir}

    # Training sources weighted by their sizes ("size", the pipeline's default): each stage's sources are mixed
    # in proportion to their number of clips, so `epochs` (3, the paper's "3 epochs per stage") is 3 epochs of
    # each source.
    def training(name: str) -> dict:
        return {**tfds(name, "train"), "weight": "size"}

    if args.stage == 1:
        config.data.sources = (training("autoacd"), training("audiosetcaps"))
        config.init_from.audio, config.init_from.text = args.audio_init, args.text_init
    else:
        if not args.stage1_workdir:
            raise ValueError(f"configs/wavlink_{size}.py:stage=2 needs stage1_workdir=<the stage-1 run's workdir>")
        config.data.sources = (training("audiocaps"), training("clotho"))
        config.init_from.workdir = args.stage1_workdir
    config.data.tokenizer = args.text_init  # CLIP checkpoints ship their tokenizer
    config.data.window_seconds = 10.0
    config.data.num_workers = 8
    config.eval.sets = tuple({"name": name, "source": tfds(name, "test")} for name in ("audiocaps", "clotho"))
    config.eval.batch_size = 256
    return config

