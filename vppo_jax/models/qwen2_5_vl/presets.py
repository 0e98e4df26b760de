"""Named model sizes: each architecture the code builds without a config.json, written once.

    from vppo_jax.models.qwen2_5_vl.presets import preset
    config = preset("7b")                                    # Qwen2.5-VL-7B's architecture
    config = preset("small", image_token_id=4000)             # a field overridden
    config = preset("test", text=dict(num_hidden_layers=4))   # a text (or vision) field overridden
    config = preset("tiny", text=dict(vocab_size=512), special_tokens=ids)   # ids from a tokenizer

Parameters are fp32 unless overridden (`param_dtype`, `dtype`, or `.with_precision` after).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from vppo_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig, VisionConfig

# The config fields holding the ids of Qwen's vision tokens, and the tokens.
SPECIAL_TOKEN_FIELDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


@dataclasses.dataclass(frozen=True)
class Preset:
    about: str
    vision: Mapping[str, Any]  # VisionConfig's fields
    text: Mapping[str, Any]  # TextConfig's fields; vocab_size None: the caller gives it (from a tokenizer)
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # Qwen2_5_VLConfig's own fields
    ids_from_tokenizer: bool = False  # the special-token ids too


# fmt: off
def _vision(depth: int, hidden: int, mlp: int, heads: int, out: int, full_attention: tuple[int, ...]) -> dict:
    return dict(depth=depth, hidden_size=hidden, intermediate_size=mlp, num_heads=heads, out_hidden_size=out,
                fullatt_block_indexes=full_attention)


def _text(vocab: int | None, hidden: int, mlp: int, layers: int, heads: int, kv_heads: int,
          mrope: tuple[int, int, int]) -> dict:
    """A Qwen2.5 decoder (RMSNorm eps 1e-6, rope theta 1e6, as every released size)."""
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6, rope_theta=1e6,
                mrope_section=mrope)


def _qwen(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, about: str) -> Preset:
    """A released Qwen2.5-VL: the same vision tower, a text decoder of the given size."""
    return Preset(about=about, vision=_vision(32, 1280, 3420, 16, hidden, (7, 15, 23, 31)),
                  text=_text(152064, hidden, mlp, layers, heads, kv_heads, (16, 24, 24)),
                  fields=dict(tie_word_embeddings=False))


# Vision-token ids of the models whose vocabulary is ours (no tokenizer): above the text ids tests draw.
SYNTHETIC_IDS = dict(image_token_id=1000, video_token_id=1003, vision_start_token_id=1001, vision_end_token_id=1002)

PRESETS: dict[str, Preset] = {
    "7b": _qwen(3584, 28, 28, 4, 18944, "Qwen2.5-VL-7B(-Instruct)"),
    "32b": _qwen(5120, 64, 40, 8, 27648, "Qwen2.5-VL-32B(-Instruct)"),
    "tiny": Preset(
        about="the embedded default policy (vppo_jax.embedded.tiny_model): vocabulary and special-token ids "
        "from its tokenizer",
        vision=_vision(2, 64, 128, 2, 128, (1,)), text=_text(None, 128, 384, 2, 4, 2, (4, 6, 6)),
        fields=dict(tie_word_embeddings=True), ids_from_tokenizer=True,
    ),
    "test": Preset(
        about="the tests' model: tests/hf_reference.py's transformers model, every sharded dimension dividing 8 "
        "(model 64, 4 heads of 16, 2 kv heads, MLP 128, vocabulary 1024)",
        vision=_vision(2, 32, 64, 2, 64, (1,)), text=_text(1024, 64, 128, 2, 4, 2, (2, 3, 3)),
        fields=dict(tie_word_embeddings=False, **SYNTHETIC_IDS),
    ),
    "small": Preset(
        about="the speed benchmarks' model (benchmarks/rollout.py, step.py): text hidden 256 x 4 layers, "
        "vocabulary 4096, vision depth 2",
        vision=_vision(2, 64, 128, 2, 256, (1,)), text=_text(4096, 256, 768, 4, 4, 2, (8, 12, 12)),
        fields=dict(tie_word_embeddings=False, **SYNTHETIC_IDS),
    ),
    "medium": Preset(
        about="the conversion memory benchmark's model (benchmarks/convert_memory.py): about 1B parameters, "
        "a 2 GB checkpoint in bf16 at 18 text layers",
        vision=_vision(4, 1024, 2816, 16, 2048, (3,)), text=_text(32000, 2048, 5632, 18, 16, 4, (16, 24, 24)),
        fields=dict(tie_word_embeddings=False),
    ),
}
# fmt: on


def preset(
    name: str,
    *,
    text: Mapping[str, Any] | None = None,
    vision: Mapping[str, Any] | None = None,
    special_tokens: Mapping[str, int] | None = None,
    **fields,
) -> Qwen2_5_VLConfig:
    """The config of the preset `name` (see PRESETS), with `text` and `vision` fields and the
    config's own `fields` overridden. `special_tokens` maps Qwen's vision tokens
    ("<|image_pad|>", ...) to their ids, as a tokenizer's token_to_id gives them; the "tiny"
    preset needs it and text=dict(vocab_size=...)."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; the presets are {sorted(PRESETS)}.")
    spec = PRESETS[key]
    text_fields = {**spec.text, **(text or {})}
    config_fields = {**spec.fields}
    if special_tokens is not None:
        missing = sorted(set(SPECIAL_TOKEN_FIELDS.values()) - set(special_tokens))
        if missing:
            raise ValueError(f"preset {name!r}: special_tokens lacks {missing}.")
        config_fields.update({field: int(special_tokens[token]) for field, token in SPECIAL_TOKEN_FIELDS.items()})
    config_fields.update(fields)
    unset = ([] if text_fields.get("vocab_size") is not None else ["text=dict(vocab_size=...)"]) + (
        ["special_tokens={token: id}"]
        if spec.ids_from_tokenizer and not set(SPECIAL_TOKEN_FIELDS) <= set(config_fields)
        else []
    )
    if unset:
        raise ValueError(f"preset {name!r} ({spec.about}) takes these from its tokenizer: pass {', '.join(unset)}.")
    try:
        return Qwen2_5_VLConfig(
            vision=VisionConfig(**{**spec.vision, **(vision or {})}), text=TextConfig(**text_fields), **config_fields
        )
    except TypeError as e:  # a misspelt override
        raise ValueError(f"preset {name!r}: {e}") from e
