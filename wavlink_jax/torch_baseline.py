"""The PyTorch training step that `scripts/benchmark.py` times against ours.

The model is our PyTorch WavLink (`wavlink_jax.torch_model.WavLinkModel`: `transformers`' `WhisperEncoder`
with the appended global token and `CLIPTextModelWithProjection`, SDPA attention, the two heads), built from
the same `WavLinkConfig` through the exporter's config mapping, with random weights. The step is what a
PyTorch user would write for it: Whisper's log-mel from the raw waveform on the device (`torch.stft`), both
towers under bf16 autocast, the two heads and CLIP + sigmoid losses at every Matryoshka level (the same
formulas as `wavlink_jax.losses`) in fp32 with autocast switched off, as ours computes them, global-norm
gradient clipping and fused AdamW.

Windows shorter than 30 s: `transformers`' `WhisperEncoder.forward` insists on `2 * max_source_positions`
(3000) mel frames, but `WavLinkModel.encode_audio` calls the encoder's submodules itself and takes the first
rows of the position table, so a 10 s window runs on 500 positions with no padding.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wavlink_jax import torch_model
from wavlink_jax.models.wavlink import WavLinkConfig


def build_torch_wavlink(config: WavLinkConfig, *, window_seconds: float, text_length: int) -> torch_model.WavLinkModel:
    """The PyTorch twin of our model (random weights; created on the current default device)."""
    from wavlink_jax.export import hf_tower_configs

    audio_config, text_config = hf_tower_configs(
        config, bos_token_id=config.text.vocab_size - 2, pad_token_id=0
    )
    return torch_model.WavLinkModel(
        torch_model.WavLinkConfig(
            audio_config=audio_config,
            text_config=text_config,
            embed_dim=config.embed_dim,
            matryoshka_dims=list(config.matryoshka_dims),
            window_seconds=window_seconds,
            max_text_length=text_length,
        )
    )


def matryoshka_contrastive_loss(
    za: torch.Tensor,
    zt: torch.Tensor,
    levels: Sequence[int],
    clip_scale: torch.Tensor,
    sigmoid_scale: torch.Tensor,
    sigmoid_bias: torch.Tensor,
    *,
    clip_weight: float,
    sigmoid_weight: float,
) -> torch.Tensor:
    """Mean over Matryoshka prefixes of `clip_weight · CLIP + sigmoid_weight · sigmoid`, in fp32 when called
    outside autocast (`TrainingLoss.forward` switches it off; under it the matmuls would run in bf16).

    CLIP: mean of the two cross-entropies with the diagonal as target; sigmoid: per row the sum over all
    columns of −log σ(±logit), mean over rows. A loss whose weight is 0 is not computed.
    """
    za, zt = za.float(), zt.float()
    labels = torch.arange(za.shape[0], device=za.device)
    signs = 2.0 * torch.eye(za.shape[0], device=za.device) - 1.0
    total = za.new_zeros(())
    for dim in levels:
        similarity = F.normalize(za[:, :dim], dim=-1) @ F.normalize(zt[:, :dim], dim=-1).T
        if clip_weight:
            logits = clip_scale.exp() * similarity
            total = total + clip_weight * 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        if sigmoid_weight:
            logits = sigmoid_scale.exp() * similarity + sigmoid_bias
            total = total + sigmoid_weight * -F.logsigmoid(signs * logits).sum() / za.shape[0]
    return total / len(levels)


class TrainingLoss(nn.Module):
    """`forward(mel, input_ids, attention_mask)` → the scalar training loss of `model` (the part compiled)."""

    def __init__(self, model: torch_model.WavLinkModel, *, clip_weight: float, sigmoid_weight: float):
        super().__init__()
        self.model = model
        self.clip_weight = clip_weight
        self.sigmoid_weight = sigmoid_weight

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """Whisper's log-mel of a waveform batch, fp32 even under autocast (as ours). Kept out of
        `torch.compile`: inductor has no complex-number kernels, and the filter bank is cached per device."""
        with torch.autocast(waveform.device.type, enabled=False):
            return torch_model.log_mel_spectrogram(waveform, self.model.config.audio_config.num_mel_bins)

    def forward(self, mel: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model = self.model
        audio = model.encode_audio(mel)
        text = model.text(input_ids=input_ids, attention_mask=attention_mask).text_embeds
        # The heads and the loss in fp32 whatever autocast the towers run under, as ours (Precision.HIGHEST).
        with torch.autocast(mel.device.type, enabled=False):
            return matryoshka_contrastive_loss(
                model.audio_projection(audio.float()),
                model.text_projection(text.float()),
                model.config.matryoshka_dims,
                model.clip_logit_scale,
                model.sigmoid_logit_scale,
                model.sigmoid_logit_bias,
                clip_weight=self.clip_weight,
                sigmoid_weight=self.sigmoid_weight,
            )


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and gradient clipping as in the trainer's config (`config.optim`)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0  # 0 = no clipping


@dataclass
class TorchTiming:
    """What one timed PyTorch run measured."""

    step_time_s: float
    compile_s: float
    peak_memory_bytes: int | None
    final_loss: float


COMPILE_MODES = ("full", "regional")


def compiled_forward(loss_module: TrainingLoss, mode: str | None) -> nn.Module:
    """The forward to time: eager (`None`), or `torch.compile`d.

    `full`: the whole forward (both towers, heads, loss) is one compiled region. `regional`: each transformer
    block is compiled in place and the rest runs eagerly — PyTorch's recipe for models of repeated blocks
    ("regional compilation"): one compilation serves every block of a tower, so compile time stays flat
    with depth (chosen for the 24- and 32-layer baselines in a short GPU session), at the cost of fusions
    across block boundaries and in the small eager remainder.
    """
    if mode is None:
        return loss_module
    if mode == "full":
        return torch.compile(loss_module)
    if mode != "regional":
        raise ValueError(f"unknown compile mode {mode!r}; expected None or one of {COMPILE_MODES}")
    model = loss_module.model
    for block in (*model.audio.layers, *model.text.text_model.encoder.layers):
        block.compile()
    return loss_module


def time_torch_step(
    loss_module: TrainingLoss,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    warmup: int,
    bf16: bool,
    compile: str | None,
    optimizer: OptimizerSettings = OptimizerSettings(),
) -> TorchTiming:
    """Train for `warmup` then `steps` steps over `batches` (waveform, ids, mask; already on the device),
    timing the latter.

    The step is zero_grad → log-mel (eager) → towers under bf16 autocast, heads and loss in fp32
    (`torch.compile`d as `compile` says, see `compiled_forward`) → backward → clip the global gradient norm →
    AdamW (fused on CUDA; weight decay on ≥ 2-d parameters, as our optimizer). The clock is read after a device
    synchronisation before and after the timed loop; nothing inside the loop syncs with the host.
    """
    device = batches[0][0].device
    cuda = device.type == "cuda"
    params = [p for p in loss_module.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": optimizer.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=optimizer.lr,
        betas=optimizer.betas,
        eps=optimizer.eps,
        fused=cuda,
    )
    forward = compiled_forward(loss_module, compile)

    def step(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        waveform, input_ids, attention_mask = batch
        adamw.zero_grad(set_to_none=True)
        mel = loss_module.log_mel(waveform)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = forward(mel, input_ids, attention_mask)
        loss.backward()
        if optimizer.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(params, optimizer.grad_clip_norm, foreach=True)
        adamw.step()
        return loss.detach()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    loss = step(batches[0])
    sync()
    compile_s = time.perf_counter() - start
    print(f"torch: first step (compilation) {compile_s:.1f} s", file=sys.stderr, flush=True)
    for i in range(1, warmup):
        loss = step(batches[i % len(batches)])
    sync()
    start = time.perf_counter()
    for i in range(steps):
        loss = step(batches[i % len(batches)])
    sync()
    step_time = (time.perf_counter() - start) / steps
    final_loss = float(loss)
    if not math.isfinite(final_loss):
        raise FloatingPointError(f"the PyTorch baseline's loss is {final_loss} after {warmup + steps} steps")
    return TorchTiming(
        step_time_s=step_time,
        compile_s=compile_s,
        peak_memory_bytes=int(torch.cuda.max_memory_allocated(device)) if cuda else None,
        final_loss=final_loss,
    )
