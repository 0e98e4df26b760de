"""The task benchmarks/peer_trl.py gives TRL and us: one HF model directory, one dataset, one
reward, one prompt format.

- The model: the "small" preset's architecture (text hidden 256 x 4 layers, 4/2 heads, MLP
  768, vocabulary 4096; vision depth 2, hidden 64), random weights made and saved by
  transformers (torch), with a byte-level BPE tokenizer of 4096 tokens keeping the Qwen
  special tokens and a Qwen2.5-VL chat template: both frameworks load this one directory.
- The data: 64 problems of the demo's synthetic shapes task (84 x 84 images: 9 image tokens).
- The reward: 1 when the response contains the answer.
- The prompt: the chat template's default system prompt, then the image, then the problem
  (our `data.prompt_template="plain"`); `check_prompts_match` proves the token ids equal.
"""

from __future__ import annotations

import io
import os
import random
import string

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from vppo_jax.data import prompts
from vppo_jax.embedded import synthetic, tiny_model
from vppo_jax.models.qwen2_5_vl import image_processor, presets
from vppo_jax.models.qwen2_5_vl.hf_io import config_to_hf_dict
from vppo_jax.rollout.rewards.registry import register

PROBLEMS = 64
VOCAB_SIZE = 4096
IMAGE_SIZE = 84  # a multiple of 28 inside both processors' default pixel range: never resized
MAX_PIXELS = 1280 * 28 * 28
MIN_PIXELS = 56 * 56

# Qwen2.5-VL's chat format, written as a Jinja template for transformers' processor: the
# default system prompt when the conversation has none, image blocks as vision tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + prompts.SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@register("contains_answer")
def contains_answer(response: str, answer: str) -> float:
    return float(answer in response)


def paths(directory: str) -> dict[str, str]:
    return {"model": os.path.join(directory, "model"), "data": os.path.join(directory, "train.parquet")}


def tokenizer_corpus(rows: list[dict]) -> list[str]:
    """The problems and enough random words for 4096 BPE merges (a random model emits any token)."""
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(60_000)]
    return [row["problem"] for row in rows] + [" ".join(words[i : i + 20]) for i in range(0, len(words), 20)]


def image_text_processor_class():
    """Qwen2.5-VL's processor without its video processor, which needs torchvision: PyPI's
    torchvision wheels are CUDA builds that do not load beside the CPU torch the tests pin."""
    from transformers import ProcessorMixin, Qwen2_5_VLProcessor

    class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return Qwen2_5_VLImageTextProcessor


def load_processor(model_dir: str):
    """The HF processor of the model directory (its image processor, tokenizer and chat template)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    with open(os.path.join(model_dir, "chat_template.jinja")) as f:
        chat_template = f.read()
    return image_text_processor_class()(
        Qwen2VLImageProcessorPil.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir), chat_template
    )


def write_model(directory: str, rows: list[dict]):
    import torch
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    tokenizer = tiny_model.train_tokenizer(tokenizer_corpus(rows), VOCAB_SIZE)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"the tokenizer learned {tokenizer.get_vocab_size()} tokens, not {VOCAB_SIZE}")
    ids = {token: tokenizer.token_to_id(token) for token in tiny_model.SPECIAL_TOKENS}
    hf_config = config_to_hf_dict(presets.preset("small", special_tokens=ids))
    hf_config["text_config"] |= dict(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_config)).float()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(directory)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(directory)
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(directory)
    with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)


def write_task(directory: str) -> dict[str, str]:
    """Writes the model and the data once; returns their paths."""
    where = paths(directory)
    if not os.path.exists(where["data"]):
        rows = synthetic.generate_rows(PROBLEMS, seed=0, image_size=IMAGE_SIZE)
        write_model(where["model"], rows)
        synthetic.write_parquet([{k: row[k] for k in ("problem", "answer", "images")} for row in rows], where["data"])
    return where


def read_rows(data_path: str) -> list[dict]:
    """(problem, answer, PIL image) of each row."""
    return [
        dict(problem=row["problem"], answer=row["answer"], image=Image.open(io.BytesIO(row["images"][0]["bytes"])))
        for row in pq.read_table(data_path).to_pylist()
    ]


def trl_prompt(problem: str) -> list[dict]:
    """The conversational prompt TRL gets; it puts the row's image before the text itself."""
    return [{"role": "user", "content": problem}]


def check_prompts_match(where: dict[str, str]) -> int:
    """Asserts that every prompt tokenises to the same ids for TRL (the HF processor, as
    GRPOTrainer calls it) and for us (our PromptBuilder); returns the mean prompt length."""
    from trl.data_utils import prepare_multimodal_messages

    processor = load_processor(where["model"])
    tokenizer = prompts.load_tokenizer(where["model"])
    special = prompts.special_tokens(tokenizer)
    builder = prompts.PromptBuilder(
        tokenizer,
        image_processor.ImageProcessor.from_pretrained(where["model"]),
        image_token_id=special.image_pad,
        vision_start_token_id=special.vision_start,
        vision_end_token_id=special.vision_end,
        max_prompt_length=1024,
        min_pixels=None,  # the trainer's data.min_pixels = max_pixels = 0: no recipe budget, as TRL
        max_pixels=None,
        template=prompts.prompt_template("plain"),
    )
    lengths = []
    for index, row in enumerate(read_rows(where["data"])):
        theirs = processor.apply_chat_template(
            [prepare_multimodal_messages(trl_prompt(row["problem"]), [row["image"]])],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"][0]
        ours = builder(index, row["problem"], row["answer"], [row["image"]])
        if ours.skipped or list(ours.prompt_ids) != list(theirs):
            raise AssertionError(f"row {index}: the prompts differ\n ours:   {ours.prompt_ids}\n theirs: {theirs}")
        lengths.append(len(theirs))
    return float(np.mean(lengths))
