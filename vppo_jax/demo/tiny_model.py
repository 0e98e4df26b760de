"""The embedded default policy: a tiny Qwen2.5-VL with its own tokenizer, as an HF directory.

It is made by the same code as the 7B (our model class, `save_pretrained`), so every
path of the trainer (loading, sampling, the VPPO step, export) runs unchanged on a CPU.
The tokenizer is a byte-level BPE trained on the synthetic task's text, keeping the Qwen
special tokens, so decoding is exact (\\boxed{} survives) and sequences stay short.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vppo_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, TextConfig, VisionConfig, init_model, save_pretrained

# The Qwen chat and vision tokens; the tiny tokenizer numbers them from 0 in this order.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]
VOCAB_SIZE = 512


def train_tokenizer(corpus: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def tiny_config(tokenizer: Tokenizer) -> Qwen2_5_VLConfig:
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                            fullatt_block_indexes=(1,)),
        text=TextConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=128, intermediate_size=384,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                        rope_theta=1e6, mrope_section=(4, 6, 6)),
        tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def write_tiny_model(path: str, corpus: list[str], seed: int = 0) -> str:
    """Writes a random tiny Qwen2.5-VL with its tokenizer as an HF directory at `path`."""
    tokenizer = train_tokenizer(corpus)
    with tempfile.TemporaryDirectory() as assets:  # save_pretrained copies tokenizer files from here
        tokenizer.save(os.path.join(assets, "tokenizer.json"))
        config = dataclasses.replace(tiny_config(tokenizer), source_dir=assets)
        save_pretrained(init_model(config, seed), path)
    return path
