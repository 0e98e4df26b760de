"""Host-side data: grain pipelines from ViRL39K-style files to per-example `Prompt` records."""

from vppo_jax.data.pipeline import RowToPrompt, prompt_dataset, prompt_iterator
from vppo_jax.data.rows import Row, RowSource
from vppo_jax.data.skips import SkipCounter

__all__ = ["Row", "RowSource", "RowToPrompt", "SkipCounter", "prompt_dataset", "prompt_iterator"]
