"""WavLink Large: the paper's recipe (AdamW lr 1e-4, cosine with 5% warm-up, bf16, global batch 768, 3 epochs per stage).

    python -m wavlink_jax.train --config configs/wavlink_large.py:stage=1,data_dir=D --workdir W1
    python -m wavlink_jax.train --config configs/wavlink_large.py:stage=2,data_dir=D,stage1_workdir=W1 --workdir W2

Arguments and keys: see configs/common.py (`paper_config`, `base_config`).
"""

from configs import common


def get_config(arg: str | None = None):
    config = common.paper_config("large", arg)
    config.remat = "full"  # 32 + 12 layers at batch 768: recompute each block in the backward pass
    return config
