"""The PyTorch training step that `scripts/benchmark.py` times against ours.

It is what a PyTorch user would write for the same model: the `transformers` Whisper encoder with the WavLink
global token appended after the positional embedding, `transformers`' CLIP text model with its projection,
one linear head per tower, CLIP + sigmoid losses at every Matryoshka level, bf16 autocast and fused AdamW.
The waveform → log-mel transform (Whisper's, through `torch.stft`) runs on the device inside the step, as ours
does. Weights are random: only the shapes and the arithmetic matter for timing.

`transformers`' `WhisperEncoder.forward` insists on `2 * max_source_positions` mel frames (3000 for 30 s);
`torch_whisper_config` therefore sizes `max_source_positions` to the window (500 for 10 s) and the forward
below uses the encoder's own submodules, so shorter windows run with no padding and no slicing.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, WhisperConfig
from transformers.audio_utils import mel_filter_bank
from transformers.models.whisper.modeling_whisper import WhisperEncoder

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160


@dataclass(frozen=True)
class TowerShape:
    """One transformer tower's sizes (what the benchmark needs to build a PyTorch twin of our model)."""

    width: int
    layers: int
    heads: int
    mlp_dim: int


def torch_whisper_config(audio: TowerShape, *, n_mels: int, frames: int) -> WhisperConfig:
    """A Whisper config of the given size whose encoder accepts exactly `frames` mel frames."""
    if frames % 2:
        raise ValueError(f"Whisper's stride-2 stem needs an even number of mel frames, got {frames}")
    return WhisperConfig(
        d_model=audio.width,
        encoder_layers=audio.layers,
        encoder_attention_heads=audio.heads,
        encoder_ffn_dim=audio.mlp_dim,
        decoder_layers=1,
        decoder_attention_heads=audio.heads,
        decoder_ffn_dim=audio.mlp_dim,
        num_mel_bins=n_mels,
        max_source_positions=frames // 2,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        attn_implementation="sdpa",
    )


def torch_clip_text_config(text: TowerShape, *, vocab_size: int, context: int, projection_dim: int) -> CLIPTextConfig:
    """A CLIP text config of the given size; end-of-text is the last id (pooled at its first occurrence)."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=text.width,
        intermediate_size=text.mlp_dim,
        num_hidden_layers=text.layers,
        num_attention_heads=text.heads,
        max_position_embeddings=context,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=0,
        attn_implementation="sdpa",
    )


class WhisperLogMel(nn.Module):
    """Whisper's log-mel spectrogram (as `WhisperFeatureExtractor` computes it with torch), kept in fp32."""

    def __init__(self, n_mels: int):
        super().__init__()
        filters = mel_filter_bank(
            num_frequency_bins=1 + N_FFT // 2,
            num_mel_filters=n_mels,
            min_frequency=0.0,
            max_frequency=8000.0,
            sampling_rate=SAMPLE_RATE,
            norm="slaney",
            mel_scale="slaney",
        )
        self.register_buffer("filters", torch.from_numpy(np.asarray(filters.T, np.float32)), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        with torch.autocast(waveform.device.type, enabled=False):
            stft = torch.stft(waveform.float(), N_FFT, HOP_LENGTH, window=self.window, return_complex=True)
            power = stft[..., :-1].abs() ** 2
            log_spec = torch.clamp(self.filters @ power, min=1e-10).log10()
            peak = log_spec.amax(dim=(-2, -1), keepdim=True)
            return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0


class GlobalTokenWhisper(nn.Module):
    """`transformers`' WhisperEncoder with a learnable token appended after the positional embedding."""

    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.encoder = WhisperEncoder(config)
        self.global_token = nn.Parameter(torch.randn(1, 1, config.d_model) * 0.02)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel `(B, n_mels, frames)` → final-LayerNorm output at the appended token `(B, width)`."""
        enc = self.encoder
        h = F.gelu(enc.conv1(mel))
        h = F.gelu(enc.conv2(h)).permute(0, 2, 1)
        h = h + enc.embed_positions.weight[: h.shape[1]]
        h = torch.cat([h, self.global_token.expand(h.shape[0], -1, -1).to(h.dtype)], dim=1)
        for layer in enc.layers:
            h = layer(h, None)
        return enc.layer_norm(h[:, -1])


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
    """Mean over Matryoshka prefixes of `clip_weight * CLIP + sigmoid_weight * sigmoid` (both per-row means)."""
    za, zt = za.float(), zt.float()
    labels = torch.arange(za.shape[0], device=za.device)
    signs = 2.0 * torch.eye(za.shape[0], device=za.device) - 1.0
    total = za.new_zeros(())
    for dim in levels:
        a = F.normalize(za[:, :dim], dim=-1)
        t = F.normalize(zt[:, :dim], dim=-1)
        similarity = a @ t.T
        if clip_weight:
            logits = clip_scale.exp() * similarity
            clip = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
            total = total + clip_weight * clip
        if sigmoid_weight:
            logits = sigmoid_scale.exp() * similarity + sigmoid_bias
            sigmoid = -F.logsigmoid(signs * logits).sum() / za.shape[0]
            total = total + sigmoid_weight * sigmoid
    return total / len(levels)


class TorchWavLink(nn.Module):
    """Both towers, both heads and the loss: `forward(waveform, input_ids, attention_mask)` → scalar loss."""

    def __init__(
        self,
        whisper_config: WhisperConfig,
        clip_config: CLIPTextConfig,
        *,
        embed_dim: int,
        levels: Sequence[int],
        clip_weight: float,
        sigmoid_weight: float,
    ):
        super().__init__()
        self.log_mel = WhisperLogMel(whisper_config.num_mel_bins)
        self.audio = GlobalTokenWhisper(whisper_config)
        self.audio_head = nn.Linear(whisper_config.d_model, embed_dim)
        self.text = CLIPTextModelWithProjection(clip_config)
        self.text_head = nn.Linear(clip_config.projection_dim, embed_dim)
        self.clip_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.sigmoid_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.sigmoid_bias = nn.Parameter(torch.tensor(-10.0))
        self.levels = tuple(levels)
        self.clip_weight = clip_weight
        self.sigmoid_weight = sigmoid_weight

    def forward(self, waveform: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        za = self.audio_head(self.audio(self.log_mel(waveform)))
        zt = self.text_head(self.text(input_ids=input_ids, attention_mask=attention_mask).text_embeds)
        return matryoshka_contrastive_loss(
            za,
            zt,
            self.levels,
            self.clip_scale,
            self.sigmoid_scale,
            self.sigmoid_bias,
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


def time_torch_step(
    model: TorchWavLink,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    warmup: int,
    bf16: bool,
    compile: bool,
    optimizer: OptimizerSettings = OptimizerSettings(),
) -> TorchTiming:
    """Train `model` for `warmup` then `steps` steps over `batches` (already on the device), timing the latter.

    The step is zero_grad → forward under bf16 autocast → backward → clip the global gradient norm → AdamW
    (fused on CUDA; weight decay on ≥ 2-d parameters, as our optimizer). The clock is read
    after a device synchronisation before and after the timed loop; nothing inside the loop syncs with the host.
    """
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optimizer.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optimizer.lr,
        betas=optimizer.betas,
        eps=optimizer.eps,
        fused=cuda,
    )
    forward = torch.compile(model) if compile else model

    def step(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        adamw.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = forward(*batch)
        loss.backward()
        if optimizer.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optimizer.grad_clip_norm, foreach=True)
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
