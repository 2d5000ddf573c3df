"""Config files: every key can be overridden from the command line, the README documents every key, the stage is
the config file's argument, and a key naming one of a few choices is checked before anything is traced."""

import functools
import re
from pathlib import Path

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags
from train_fixtures import tiny_config

from wavlink_jax import sharding, train_step

ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILES = [
    "configs/quickstart.py",
    "configs/wavlink_base.py:stage=1",
    "configs/wavlink_base.py:stage=2,stage1_workdir=W1",
    "configs/wavlink_small.py:stage=1",
    "configs/wavlink_small.py:stage=2,stage1_workdir=W1",
    "configs/wavlink_large.py:stage=1",
    "configs/wavlink_large.py:stage=2,stage1_workdir=W1",
    "tests/train_fixtures.py:data_dir=D,eval_every=3",
]
# Keys whose default is None (a typed placeholder: the command line can only give them a value) and the value the
# override test gives each; none today.
NONE_EXAMPLES: dict[str, str] = {}


def parse(config_file: str, *overrides: str) -> ml_collections.ConfigDict:
    """The config as `python -m wavlink_jax.train --config FILE --config.KEY=VALUE ...` resolves it."""
    argv = ["train", f"--config={ROOT / config_file}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def leaves(config: ml_collections.ConfigDict, prefix: str = ""):
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def command_line_text(value) -> str:
    """How a user writes `value` after `--config.KEY=`."""
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else repr(value)


def another_value(value):
    """A value of the kind a user would write in place of `value` (a float that is no whole number for a float, a
    longer text for a text): overriding with the default itself would pass if overrides were ignored."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + (1 if isinstance(value, int) else 0.25)
    if isinstance(value, str):
        return value + "_x"
    return value  # sequences: test_sequences_and_placeholders_take_new_values


@pytest.mark.parametrize("config_file", CONFIG_FILES)
def test_every_key_can_be_overridden_from_the_command_line(config_file):
    config = parse(config_file)
    expected = ml_collections.ConfigDict(config.to_dict())
    overrides = []
    for key, value in leaves(config):
        if value is None:
            assert key in NONE_EXAMPLES, f"{key}: a None default must be a typed placeholder (config_dict.placeholder)"
            value = NONE_EXAMPLES[key]
        else:
            value = another_value(value)
        *parents, leaf = key.split(".")
        functools.reduce(lambda group, name: group[name], parents, expected)[leaf] = value
        overrides.append(f"--config.{key}={command_line_text(value)}")
    assert parse(config_file, *overrides).to_dict() == expected.to_dict()


def test_sequences_and_placeholders_take_new_values():
    config = parse(
        "tests/train_fixtures.py:data_dir=D",
        "--config.model.matryoshka_dims=(32, 8)",
        "--config.data.sources=({'kind': 'manifest', 'path': 'x.jsonl'},)",
        "--config.attention_implementation=cudnn",
        "--config.optim.freeze=('^audio/',)",
    )
    assert config.model.matryoshka_dims == (32, 8)
    assert config.data.sources == ({"kind": "manifest", "path": "x.jsonl"},)
    assert config.attention_implementation == "cudnn"
    assert config.optim.freeze == ("^audio/",)
    setup = train_step.model_config(config)  # the consumers take the tuples
    assert setup.matryoshka_dims == (32, 8) and setup.audio.attention_implementation == "cudnn"


def test_attention_auto_is_the_towers_fastest_and_other_words_are_refused():
    config = parse("tests/train_fixtures.py:data_dir=D")
    assert config.attention_implementation == "auto"
    setup = train_step.model_config(config)
    assert setup.audio.attention_implementation is None and setup.text.attention_implementation is None
    config = parse("tests/train_fixtures.py:data_dir=D", "--config.attention_implementation=None")
    choices = r"\('auto', 'xla', 'cudnn', 'cudnn_unpadded'\)"
    with pytest.raises(ValueError, match=r"config.attention_implementation = 'None' is not one of " + choices):
        train_step.check_choices(config)


def test_float16_compute_is_not_offered_for_training():
    """float16 was a choice: on a CPU its attention failed inside XLA's lowering, and on a GPU its gradients would
    underflow without the loss scaling this trainer does not do."""
    config = parse("tests/train_fixtures.py:data_dir=D", "--config.dtype=float16")
    with pytest.raises(ValueError, match=r"^config.dtype = 'float16' is not one of \('float32', 'bfloat16'\)$"):
        train_step.check_choices(config)


def test_the_stage_is_the_config_files_argument():
    stage1, stage2 = (parse(f"configs/wavlink_base.py:{arg}") for arg in ("stage=1", "stage=2,stage1_workdir=W1"))
    assert "stage" not in stage1 and "stage" not in stage2  # no key that nothing reads
    assert [s["name"] for s in stage1.data.sources] == ["autoacd", "audiosetcaps"] and not stage1.init_from.workdir
    assert [s["name"] for s in stage2.data.sources] == ["audiocaps", "clotho"] and stage2.init_from.workdir == "W1"
    with pytest.raises(flags.IllegalFlagValueError, match="stage must be 1 or 2, got 3"):
        parse("configs/wavlink_base.py:stage=3")
    with pytest.raises(AttributeError, match="stage"):
        parse("configs/wavlink_base.py:stage=2,stage1_workdir=W1", "--config.stage=1")


def test_config_arguments_take_their_defaults_types():
    """Text stays as written (a data_dir of 2024.10 became 2024.1, and 1_000 became 1000); a number that is not
    of the argument's type is refused by name (stage=1.9 ran stage 1, steps=2.5 two steps)."""
    from configs import common, quickstart

    assert quickstart.get_config("data_dir=2024.10,steps=7").data.tokenizer == "2024.10/tokenizer"
    assert quickstart.get_config("data_dir=1_000").data.tokenizer == "1_000/tokenizer"
    for arg, message in (("steps=2.5", r"steps='2\.5': expected int \(like 500\)"),
                         ("steps=True", r"steps='True': expected int"),
                         ("steps=abc", r"steps='abc': expected int")):
        with pytest.raises(ValueError, match=message):
            quickstart.get_config(arg)
    with pytest.raises(ValueError, match=r"stage='1\.9': expected int \(like 1\)"):
        common.paper_config("base", "stage=1.9")
    assert common.parse_arg("rate=3", rate=0.5).rate == 3.0 and common.parse_arg("on=False", on=True).on is False


# The paper configs' recipe as README.md's Configs table states it ("paper configs" column, and the paragraph
# after it): the optimizer's values are not in the paper, so nothing else pins them.
PAPER_RECIPE = {
    "batch_size": 768, "total_steps": 0, "epochs": 3.0, "accum_steps": 1, "dtype": "bfloat16",
    "log_every_steps": 50, "eval_every_steps": 2000, "checkpoint_every_steps": 1000, "keep_checkpoints": 3,
    "optim.learning_rate": 1e-4, "optim.schedule": "cosine", "optim.warmup_fraction": 0.05,
    "optim.end_lr_fraction": 0.0, "optim.b1": 0.9, "optim.b2": 0.98, "optim.eps": 1e-6, "optim.weight_decay": 0.1,
    "optim.grad_clip_norm": 1.0, "optim.mode": "full", "optim.towers": "both", "lora.rank": 8, "lora.alpha": 16.0,
    "loss.clip_weight": 1.0, "loss.sigmoid_weight": 1.0, "loss.impl": "dense", "loss.clip_max_scale": 100.0,
    "data.window_seconds": 10.0,
}


@pytest.mark.parametrize("config_file", [name for name in CONFIG_FILES if name.startswith("configs/wavlink_")])
def test_the_paper_configs_hold_the_readmes_recipe(config_file):
    """Each stage mixes its two training sources by size (so 3 epochs are 3 epochs of each; equal weights would
    give Clotho ~20) and is scored on the AudioCaps and Clotho test splits."""
    config = dict(leaves(parse(config_file)))
    assert {key: config[key] for key in PAPER_RECIPE} == PAPER_RECIPE
    sources = config["data.sources"]
    assert len(sources) == 2 and all(source["weight"] == "size" and source["split"] == "train" for source in sources)
    assert [(s["name"], s["source"]["name"], s["source"]["split"]) for s in config["eval.sets"]] == [
        ("audiocaps", "audiocaps", "test"), ("clotho", "clotho", "test")]


def readme_configs_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("\n## Configs\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_documents_every_key():
    """Every key of base_config (each part of its dotted name) appears in backticks in the README's Configs
    section (alone or in a dotted name)."""
    section = readme_configs_section()
    named = {word for quoted in re.findall(r"`([^`]*)`", section) for word in re.findall(r"\w+", quoted)}
    config = parse("configs/wavlink_large.py:stage=1")
    missing = sorted(key for key, _ in leaves(config) if not set(key.split(".")) <= named)
    assert not missing, f"README.md's Configs section does not name {missing}"


def mesh():
    return sharding.create_mesh({"data": -1})


@pytest.mark.parametrize("config_file", CONFIG_FILES)
def test_config_files_hold_valid_choices(config_file):
    train_step.check_choices(parse(config_file))


@pytest.mark.parametrize("key", sorted(train_step.CONFIG_CHOICES))
def test_a_bad_choice_is_refused_before_anything_is_traced(key):
    config = tiny_config()
    *parents, leaf = key.split(".")
    target = config
    for name in parents:
        target = target[name]
    target[leaf] = "nonsense"
    allowed = re.escape(repr(train_step.CONFIG_CHOICES[key]))
    with pytest.raises(ValueError, match=rf"^config\.{re.escape(key)} = 'nonsense' is not one of {allowed}$"):
        train_step.build(config, mesh(), total_steps=4)
