"""How a tower config's fields correspond to a Hugging Face `transformers` config's keys.

Each tower module holds one `HFFields` table next to its config class; the class's `from_hf` (import:
reading a checkpoint's `config.json`) and `to_hf` (export: writing one) are both driven by it, so the
correspondence is written once. Fields with no `transformers` counterpart are listed in `not_in_hf` with
the reason, so that every config field is accounted for (the tower tests check this).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


# The tower fields that are run settings (how to compute), not part of the model: no `transformers` key holds them.
RUN_SETTINGS_NOT_IN_HF: Mapping[str, str] = {
    "dtype": "a run setting (compute dtype), not part of the model",
    "attention_implementation": "a run setting (attention kernel), not part of the model",
    "remat": "a run setting (rematerialisation policy), not part of the model",
}


@dataclasses.dataclass(frozen=True)
class HFField:
    """Our config field `ours` is the `transformers` config key `hf`; `default` is what `transformers` assumes
    when a `config.json` lacks the key (its config class's default)."""

    ours: str
    hf: str
    default: Any


@dataclasses.dataclass(frozen=True)
class HFFields:
    """One tower's correspondence: the mapped fields, and `{field: reason}` for fields `transformers` cannot hold."""

    fields: tuple[HFField, ...]
    not_in_hf: Mapping[str, str]

    def read(self, hf_config: Mapping[str, Any]) -> dict[str, Any]:
        """`{our field: value}` from a `transformers` config dict; missing keys take `transformers`' defaults."""
        return {field.ours: hf_config.get(field.hf, field.default) for field in self.fields}

    def write(self, config: Any, extra: Mapping[str, Any]) -> dict[str, Any]:
        """`{hf key: value}` of the dataclass `config`, plus `extra` (keys outside the table: settings the
        caller adds, such as dropout rates or special token ids)."""
        mapped = {field.hf: getattr(config, field.ours) for field in self.fields}
        clashes = sorted(set(extra) & set(mapped))
        if clashes:
            raise ValueError(
                f"{type(config).__name__}.to_hf: {clashes} come from the config's own fields; change the config "
                "(dataclasses.replace) instead of passing them as extra settings"
            )
        return {**mapped, **extra}
