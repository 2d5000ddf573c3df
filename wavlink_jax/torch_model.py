"""WavLink in PyTorch: the model a `python -m wavlink_jax.export` directory loads into, with `transformers` only.

This file imports torch and transformers (5.x: 4.x has no `PreTrainedConfig`), never jax: the exporter copies it
into the exported directory as `modeling_wavlink.py` (with `waveform_layout.py`, which it imports relatively),
and `config.json`'s `auto_map` points there, so

    from transformers import AutoModel
    model = AutoModel.from_pretrained("exported/", trust_remote_code=True)
    audio = model.embed_audio([waveform_16k])            # (1, E) L2-normalised torch.float32
    text = model.embed_text(["a dog barks"], dim=128)    # (1, 128): a Matryoshka prefix, re-normalised

The towers are `transformers`' own modules, so the weights sit under their exact names:

* `audio.*`: a `WhisperEncoder` (`audio.conv1.weight`, `audio.layers.0.self_attn.k_proj.weight`,
  `audio.embed_positions.weight`, `audio.layer_norm.weight`, ...);
* `text.*`: a `CLIPTextModelWithProjection` (`text.text_model.…`, `text.text_projection.weight`);
* `audio_global_token` `(D,)`: WavLink's learned token, appended after the positional add; it gets no
  position of its own. A window shorter than 30 s uses the first rows of the position table.
* `audio_projection`, `text_projection`: the heads into the shared space of size `embed_dim`;
* `clip_logit_scale`, `sigmoid_logit_scale`, `sigmoid_logit_bias`: the losses' learned scalars.

audio: waveform → Whisper log-mel (computed here, in torch) → conv stem → + positions → [append token] →
encoder layers → final LayerNorm → last position → `audio_projection` → L2 normalise.
text: tokenizer (the one saved beside the weights) → CLIP text model → pooled end-of-text state →
CLIP's `text_projection` → `text_projection` head → L2 normalise.

It computes what the JAX model (`wavlink_jax.models.wavlink.WavLink`) computes; `tests/test_export.py`
checks the two agree to 1e-4.
"""

import functools
import math
import os
from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoTokenizer, CLIPTextConfig, PreTrainedConfig, PreTrainedModel, WhisperConfig
from transformers.audio_utils import mel_filter_bank
from transformers.models.clip.modeling_clip import CLIPTextModelWithProjection
from transformers.models.whisper.modeling_whisper import WhisperEncoder

# Relative: the exporter copies waveform_layout.py beside this file (JAX inference applies the same rules).
from .waveform_layout import (
    check_batch_size,
    check_finite_samples,
    check_float_samples,
    check_long_clips,
    check_not_channels_last,
    checked_texts,
    clips_window_plan,
)

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
SUB_CONFIGS = {"audio_config": WhisperConfig, "text_config": CLIPTextConfig}
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))  # either makes a CLIP tokenizer


class WavLinkConfig(PreTrainedConfig):
    r"""
    audio_config (`dict` or `WhisperConfig`): the Whisper encoder (only its encoder fields are used).
    text_config (`dict` or `CLIPTextConfig`): the CLIP text tower, with `projection_dim` and `eos_token_id`.
    embed_dim (`int`): size of the shared embedding space.
    matryoshka_dims (`list[int]`): the trained embedding sizes, largest first, the largest being `embed_dim`
        (`dim=` accepts these).
    window_seconds (`float`): the audio window: longer waveforms are cut to its head (or, with
        `embed_audio(..., long_clips="mean")`, covered by consecutive windows), shorter ones zero-padded.
    max_text_length (`int`): token sequence length (captions are cut / padded to it, as in training).
    """

    model_type = "wavlink"
    # Newer transformers (5.24) turn nested dicts into these classes themselves (`sub_configs_defaults`);
    # older 5.x releases (5.17) only read `sub_configs` and leave the dicts as dicts, so `__post_init__`
    # converts them on every version.
    if hasattr(PreTrainedConfig, "sub_configs_defaults"):
        sub_configs_defaults = dict(SUB_CONFIGS)
    else:
        sub_configs = dict(SUB_CONFIGS)

    audio_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    embed_dim: int = 512
    matryoshka_dims: list[int] | None = None
    window_seconds: float = 30.0
    max_text_length: int = 77

    def __post_init__(self, **kwargs):
        for key, config_class in SUB_CONFIGS.items():
            value = getattr(self, key)
            if value is None or isinstance(value, dict):
                setattr(self, key, config_class(**(value or {})))
        dims = list(self.matryoshka_dims or [self.embed_dim])  # None: the full size only
        if len(set(dims)) != len(dims) or min(dims) < 1 or max(dims) != self.embed_dim:
            # The JAX WavLinkConfig's rule: the trained sizes include the full one, which `dim=None` serves.
            example = sorted({self.embed_dim, *(d for d in dims if 0 < d < self.embed_dim)}, reverse=True)
            raise ValueError(
                f"WavLinkConfig.matryoshka_dims {self.matryoshka_dims} must be distinct sizes in 1..embed_dim "
                f"({self.embed_dim}) whose largest is embed_dim; set matryoshka_dims to the sizes the model was "
                f"trained at, e.g. {example}"
            )
        super().__post_init__(**kwargs)

    @property
    def window_samples(self) -> int:
        return int(round(self.window_seconds * SAMPLE_RATE))


@functools.lru_cache(maxsize=None)
def _mel_filters(n_mels: int, device: torch.device) -> torch.Tensor:
    """Whisper's Slaney mel filter bank `(n_mels, N_FFT // 2 + 1)`, 0–8 kHz (WhisperFeatureExtractor's), on
    `device`. Cached per device: a host → GPU copy on every call would synchronise the CUDA stream each time."""
    bank = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(bank.T.copy()).to(device=device, dtype=torch.float32)


def log_mel_spectrogram(waveform: torch.Tensor, n_mels: int) -> torch.Tensor:
    """16 kHz waveform `(B, samples)` → Whisper's normalised log-mel `(B, n_mels, samples // 160)`, float32.

    Centred STFT (reflect padding, periodic Hann window of 400, hop 160) without its last frame, power
    spectrum, Slaney mel filters, then log10(max(·, 1e-10)) → max(x, x.max() − 8) → (x + 4) / 4 with the
    max per example over the whole window.
    """
    waveform = waveform.to(torch.float32)
    window = torch.hann_window(N_FFT, device=waveform.device, dtype=torch.float32)
    spectrum = torch.stft(
        waveform, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True
    )[..., :-1]
    power = spectrum.real**2 + spectrum.imag**2
    mel = _mel_filters(n_mels, waveform.device) @ power
    log_mel = torch.clamp(mel, min=1e-10).log10()
    peak = log_mel.amax(dim=(-2, -1), keepdim=True)
    return (torch.maximum(log_mel, peak - 8.0) + 4.0) / 4.0


def l2_normalize(z: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (as the JAX model: rows of norm < 1e-6 are scaled by 1e6, not NaN)."""
    return z * torch.rsqrt(torch.clamp((z * z).sum(dim=-1, keepdim=True), min=1e-12))


class WavLinkModel(PreTrainedModel):
    """WavLink's audio and text towers with their heads; `embed_audio` / `embed_text` are the entry points."""

    config_class = WavLinkConfig
    base_model_prefix = "wavlink"
    main_input_name = "input_features"
    _no_split_modules = ["WhisperEncoderLayer", "CLIPEncoderLayer"]

    def __init__(self, config: WavLinkConfig):
        super().__init__(config)
        width = config.audio_config.d_model
        self.audio = WhisperEncoder(config.audio_config)
        self.audio_global_token = nn.Parameter(torch.zeros(width))
        self.text = CLIPTextModelWithProjection(config.text_config)
        self.audio_projection = nn.Linear(width, config.embed_dim)
        self.text_projection = nn.Linear(config.text_config.projection_dim, config.embed_dim)
        self.clip_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.sigmoid_logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.sigmoid_logit_bias = nn.Parameter(torch.tensor(-10.0))
        self._tokenizer = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:  # the JAX model's initialisation of the new parameters
            with torch.no_grad():
                self.audio_global_token.normal_(0.0, 0.02)
                self.clip_logit_scale.fill_(math.log(1 / 0.07))
                self.sigmoid_logit_scale.fill_(math.log(10.0))
                self.sigmoid_logit_bias.fill_(-10.0)

    # ----------------------------------------------------------------------------------------------- audio
    def encode_audio(self, input_features: torch.Tensor) -> torch.Tensor:
        """log-mel `(B, n_mels, frames)` → the final-LayerNorm state at the global token `(B, D)`."""
        encoder = self.audio
        hidden = nn.functional.gelu(encoder.conv1(input_features.to(self.audio_global_token.dtype)))
        hidden = nn.functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
        positions = hidden.shape[1]
        if positions > encoder.embed_positions.num_embeddings:
            raise ValueError(
                f"{input_features.shape[-1]} mel frames need {positions} positions but the encoder holds "
                f"{encoder.embed_positions.num_embeddings}; cut the waveform to {self.config.window_seconds} s"
            )
        hidden = hidden + encoder.embed_positions.weight[:positions]
        token = self.audio_global_token.expand(hidden.shape[0], 1, -1)
        hidden = torch.cat([hidden, token], dim=1)
        for layer in encoder.layers:
            hidden = layer(hidden, None)
        return encoder.layer_norm(hidden)[:, -1]

    def audio_embeds(self, input_features: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """log-mel `(B, n_mels, frames)` → L2-normalised `(B, dim or embed_dim)` audio embeddings."""
        return self._finish(self.audio_projection(self.encode_audio(input_features)), dim)

    def _checked_clips(self, waveforms) -> list[torch.Tensor]:
        """One waveform or a sequence / batch of them (16 kHz float; numpy or torch) → float32 1-D tensors, with
        the JAX embedder's rules and words for `(samples, channels)` arrays, integer PCM, other shapes and NaN or
        infinite samples."""
        if not isinstance(waveforms, (list, tuple)):
            tensor = torch.as_tensor(waveforms)
            check_not_channels_last(tensor.shape)
            waveforms = [tensor] if tensor.dim() == 1 else list(tensor)
        clips = []
        for index, waveform in enumerate(waveforms):
            waveform = torch.as_tensor(waveform)
            check_float_samples(index, waveform.dtype, waveform.is_floating_point())
            if waveform.dim() != 1:
                raise ValueError(
                    f"waveform {index} has shape {tuple(waveform.shape)}; expected 1-D mono 16 kHz samples"
                )
            clip = waveform.to(torch.float32)
            check_finite_samples(index, bool(torch.isfinite(clip).all()))  # in float32: 1e39 in float64 is infinite
            clips.append(clip)
        if not clips:
            raise ValueError("embed_audio got no waveforms")
        return clips

    def _window(self, clip: torch.Tensor) -> torch.Tensor:
        """The head of `clip`, cut or zero-padded to the model's window."""
        window = self.config.window_samples
        return nn.functional.pad(clip[:window], (0, max(0, window - clip.shape[0])))

    def prepare_waveforms(self, waveforms) -> torch.Tensor:
        """One waveform or a sequence / batch of them (16 kHz float; numpy or torch) → `(B, window_samples)`:
        each cut to the head of the model's window or zero-padded at the end, as in evaluation."""
        return torch.stack([self._window(clip) for clip in self._checked_clips(waveforms)])

    @torch.no_grad()
    def embed_audio(
        self, waveforms, dim: int | None = None, batch_size: int = 32, long_clips: str = "head"
    ) -> torch.Tensor:
        """16 kHz waveforms (one 1-D array, a list of them of any lengths, or a `(B, samples)` batch) →
        L2-normalised float32 `(B, dim or embed_dim)`; `dim` is a Matryoshka size of the model. A waveform longer
        than the window is cut to its head (`long_clips="head"`), or embedded window by window and the windows'
        embeddings averaged, weighted by the audio each holds, and re-normalised (`"mean"`: a `(B, samples)`
        batch's rows count to their end, zeros too; `dim` then takes the prefix of that mean, re-normalised), as
        the JAX embedder does. Windows are cut a batch at a time."""
        check_long_clips(long_clips)
        check_batch_size(batch_size)
        if long_clips == "head":
            batch = self.prepare_waveforms(waveforms)
            return self._embed_batches((batch[i : i + batch_size] for i in range(0, len(batch), batch_size)), dim)
        self._served_dim(dim)  # refused before any window is embedded
        clips = self._checked_clips(waveforms)
        plan = clips_window_plan([clip.shape[0] for clip in clips], self.config.window_samples)
        batches = (
            torch.stack([self._window(clips[index][start:]) for index, start, _ in plan[i : i + batch_size]])
            for i in range(0, len(plan), batch_size)
        )
        embeddings = self._embed_batches(batches, None)
        owners = torch.tensor([index for index, _, _ in plan], device=embeddings.device)
        weights = torch.tensor([weight for _, _, weight in plan], dtype=embeddings.dtype, device=embeddings.device)
        pooled = embeddings.new_zeros(len(clips), embeddings.shape[1])
        return self._finish(pooled.index_add_(0, owners, embeddings * weights[:, None]), dim)

    def _embed_batches(self, batches, dim: int | None) -> torch.Tensor:
        """`(b, window_samples)` waveform batches → their embeddings, concatenated."""
        n_mels = self.config.audio_config.num_mel_bins
        return torch.cat(
            [self.audio_embeds(log_mel_spectrogram(batch.to(self.device), n_mels), dim).float() for batch in batches]
        )

    # ------------------------------------------------------------------------------------------------ text
    @property
    def tokenizer(self):
        """The tokenizer saved beside the weights (loaded on first use from the model's directory)."""
        if self._tokenizer is None:
            directory = self.config.name_or_path
            if not directory:
                raise ValueError(
                    "this model was not loaded with from_pretrained, so it has no tokenizer; set model.tokenizer"
                )
            if os.path.isdir(directory) and not any(
                all(os.path.exists(os.path.join(directory, name)) for name in files) for files in TOKENIZER_FILE_SETS
            ):
                raise FileNotFoundError(
                    f"{directory}: no tokenizer beside the model (tokenizer.json, or vocab.json + merges.txt); "
                    "save_pretrained writes the model only: copy the tokenizer files from the exported directory it "
                    "came from, or set model.tokenizer"
                )
            # The directory is trusted already: its code is running. Without the flag, transformers asks on stdin.
            self._tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts → `input_ids` / `attention_mask` `(B, max_text_length)`, right-padded, cut as in training."""
        return self.tokenizer(
            checked_texts(texts),
            padding="max_length",
            truncation=True,
            max_length=self.config.max_text_length,
            return_tensors="pt",
        )

    def text_embeds(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, dim: int | None = None
    ) -> torch.Tensor:
        """Token ids `(B, L)` (+ mask, right padding) → L2-normalised `(B, dim or embed_dim)` text embeddings."""
        clip_embeds = self.text(input_ids=input_ids, attention_mask=attention_mask).text_embeds
        return self._finish(self.text_projection(clip_embeds), dim)

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str], dim: int | None = None, batch_size: int = 256) -> torch.Tensor:
        """Texts → L2-normalised float32 `(len(texts), dim or embed_dim)`; `dim` is a Matryoshka size."""
        check_batch_size(batch_size)
        tokens = self.tokenize(texts)
        outputs = []
        for start in range(0, tokens["input_ids"].shape[0], batch_size):
            ids = tokens["input_ids"][start : start + batch_size].to(self.device)
            mask = tokens["attention_mask"][start : start + batch_size].to(self.device)
            outputs.append(self.text_embeds(ids, mask, dim).float())
        return torch.cat(outputs)

    # ------------------------------------------------------------------------------------------------ both
    def forward(
        self,
        input_features: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        dim: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """`{"audio_embeds", "text_embeds"}` for whichever inputs are given (log-mel and/or token ids)."""
        outputs = {}
        if input_features is not None:
            outputs["audio_embeds"] = self.audio_embeds(input_features, dim)
        if input_ids is not None:
            outputs["text_embeds"] = self.text_embeds(input_ids, attention_mask, dim)
        return outputs

    def _served_dim(self, dim: int | None) -> int | None:
        """A requested embedding size → None for the full size, else `dim` if it is a trained Matryoshka size."""
        if dim is None or dim == self.config.embed_dim:
            return None
        if dim not in (self.config.matryoshka_dims or ()):
            raise ValueError(
                f"embedding dim {dim} is not a trained size of this model; choose one of "
                f"{self.config.matryoshka_dims} or None for the full {self.config.embed_dim}"
            )
        return dim

    def _finish(self, projected: torch.Tensor, dim: int | None) -> torch.Tensor:
        dim = self._served_dim(dim)
        return l2_normalize(projected if dim is None else projected[..., :dim])
