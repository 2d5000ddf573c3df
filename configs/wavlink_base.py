"""WavLink Base: the paper's recipe (AdamW lr 1e-4, cosine with 5% warm-up, bf16, global batch 768, 3 epochs per stage).

    python -m wavlink_jax.train --config configs/wavlink_base.py:stage=1,data_dir=D --workdir W1
    python -m wavlink_jax.train --config configs/wavlink_base.py:stage=2,data_dir=D,stage1_workdir=W1 --workdir W2

Arguments and keys: see configs/common.py (`paper_config`, `base_config`).
"""

from configs import common


def get_config(arg: str | None = None):
    return common.paper_config("base", arg)
