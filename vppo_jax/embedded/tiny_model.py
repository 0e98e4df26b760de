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

from vppo_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, init_model, preset, save_pretrained

# The Qwen chat and vision tokens; the tiny tokenizer numbers them from 0 in this order.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
VOCAB_SIZE = 512


def train_tokenizer(corpus: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def tiny_config(tokenizer: Tokenizer | None = None) -> Qwen2_5_VLConfig:
    """The "tiny" preset with the vocabulary size and special-token ids of `tokenizer`; without
    one, those a tokenizer from `train_tokenizer` has (its special tokens numbered from 0 in
    SPECIAL_TOKENS order, VOCAB_SIZE tokens): the architecture, for instance to plan with."""
    if tokenizer is None:
        ids, vocab_size = {token: i for i, token in enumerate(SPECIAL_TOKENS)}, VOCAB_SIZE
    else:
        ids, vocab_size = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}, tokenizer.get_vocab_size()
    return preset("tiny", text=dict(vocab_size=vocab_size), special_tokens=ids)


def write_tiny_model(path: str, corpus: list[str], seed: int = 0) -> str:
    """Writes a random tiny Qwen2.5-VL with its tokenizer as an HF directory at `path`."""
    tokenizer = train_tokenizer(corpus)
    with tempfile.TemporaryDirectory() as assets:  # save_pretrained copies tokenizer files from here
        tokenizer.save(os.path.join(assets, "tokenizer.json"))
        config = dataclasses.replace(tiny_config(tokenizer), source_dir=assets)
        save_pretrained(init_model(config, seed), path)
    return path
