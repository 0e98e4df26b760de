"""Loading the policy to train: model and tokenizer from an HF directory or a converted checkpoint."""

from __future__ import annotations

import dataclasses
import os

import jax
from flax import nnx
from tokenizers import Tokenizer

from vppo_jax.data import prompts
from vppo_jax.io import hub, paths
from vppo_jax.models.qwen2_5_vl import from_pretrained
from vppo_jax.models.qwen2_5_vl.checkpoint import HF_DIR, PARAMS_DIR, load_model
from vppo_jax.models.qwen2_5_vl.image_processor import ImageProcessor

TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass
class Policy:
    model: object
    tokenizer: Tokenizer
    hf_dir: str  # where config.json and the tokenizer files live

    def token_id(self, token: str) -> int:
        found = self.tokenizer.token_to_id(token)
        if found is None:
            raise ValueError(f"The tokenizer in {self.hf_dir} has no {token} token; it is not a Qwen tokenizer.")
        return found


def load_policy(path: str, dtype: str, param_dtype: str | None = None) -> Policy:
    """An HF directory (config.json + safetensors) or a scripts/convert_hf_to_jax.py output, local
    or in a bucket, or a Hub name; computing in `dtype` with parameters held in `param_dtype`
    (default: `dtype`)."""
    path = hub.resolve_model(path)
    if paths.is_dir(os.path.join(path, PARAMS_DIR)):
        model, hf_dir = load_model(path, dtype, param_dtype), os.path.join(path, HF_DIR)
    elif paths.is_file(os.path.join(path, "config.json")):
        model, hf_dir = from_pretrained(path, dtype, param_dtype), path
    else:
        raise FileNotFoundError(
            f"model.path={path!r} is neither an HF model directory (config.json + *.safetensors) nor a "
            "checkpoint written by scripts/convert_hf_to_jax.py."
        )
    tokenizer_path = os.path.join(hf_dir, TOKENIZER_FILE)
    if not paths.is_file(tokenizer_path):
        raise FileNotFoundError(
            f"{hf_dir} has no {TOKENIZER_FILE}; copy the tokenizer files of the original model there."
        )
    return Policy(model=model, tokenizer=Tokenizer.from_str(paths.read_text(tokenizer_path)), hf_dir=hf_dir)


def compute_model(graphdef: nnx.GraphDef, params, config):
    """The model for sampling and evaluation: `params` (the master weights a train state holds)
    cast once to the compute dtype, instead of at every use of every decode step."""
    return nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(config.jnp_dtype), params))


def prompt_builder(
    policy: Policy,
    max_prompt_length: int,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    template: str = "reference",
) -> prompts.PromptBuilder:
    """Prompts for this policy: its tokenizer, image processor and vision token ids; `min/max_pixels`
    is the recipe's image budget (None: none); `template` a name or file (`prompts.prompt_template`)."""
    config = policy.model.config
    return prompts.PromptBuilder(
        policy.tokenizer,
        ImageProcessor.from_pretrained(policy.hf_dir),
        image_token_id=config.image_token_id,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
        max_prompt_length=max_prompt_length,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        template=prompts.prompt_template(template),
    )
