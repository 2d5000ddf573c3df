"""Quickstart: small towers trained from scratch on the generated data set, on a CPU in a few minutes.

    python -m wavlink_jax.train --config configs/quickstart.py --workdir workdirs/quickstart
    python -m wavlink_jax.train --config configs/quickstart.py:data_dir=/tmp/synthetic --workdir W

`scripts/quickstart.py` (what `make quickstart` runs) generates the data set into `data_dir` first.
Arguments: data_dir (the generated data set), steps (training steps).
"""

from configs import common
from wavlink_jax.models.clip_text import CLIPTextConfig
from wavlink_jax.models.wavlink import WavLinkConfig
from wavlink_jax.models.whisper import WhisperConfig

WINDOW_SECONDS = 3.0  # 300 mel frames → 150 audio positions
TEXT_LENGTH = 32
VOCAB_SIZE = 1024  # the generated data set's tokenizer (wavlink_jax.data.synthetic, vocab_size=1024)


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, data_dir="data/synthetic", steps=500)
    width = 64
    model = WavLinkConfig(
        audio=WhisperConfig(
            n_mels=80, width=width, num_layers=2, num_heads=4, mlp_dim=4 * width,
            max_positions=int(WINDOW_SECONDS * 50),
        ),
        text=CLIPTextConfig(
            vocab_size=VOCAB_SIZE, width=width, num_layers=2, num_heads=4, mlp_dim=4 * width,
            max_positions=TEXT_LENGTH, projection_dim=width,
        ),
        embed_dim=64,  # Matryoshka sizes 64, 32, 16, 8
    )
    config = common.base_config(model)
    config.batch_size = 64
    config.total_steps = args.steps
    config.log_every_steps = 20
    config.checkpoint_every_steps = 100
    config.eval_every_steps = 0  # evaluated once, at the end
    config.keep_checkpoints = 2
    config.dtype = "float32"  # CPUs have no fast bfloat16 matmuls

    config.optim.learning_rate = 1e-3
    config.optim.warmup_fraction = 0.1
    config.optim.weight_decay = 0.05

    config.data.sources = ({"kind": "manifest", "path": f"{args.data_dir}/train.jsonl"},)
    config.data.tokenizer = f"{args.data_dir}/tokenizer"
    config.data.window_seconds = WINDOW_SECONDS
    config.data.max_text_length = TEXT_LENGTH
    config.data.read_threads = 2
    config.data.prefetch_buffer = 128

    config.eval.sets = ({"name": "synthetic", "source": {"kind": "manifest", "path": f"{args.data_dir}/eval.jsonl"}},)
    config.eval.batch_size = 100
    return config
