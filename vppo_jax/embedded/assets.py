"""The embedded default's assets: the synthetic task, the tiny model and its warm start.

A config with a `synthetic` section (configs/tiny.py) and no model or data is the embedded
default: `prepare_embedded_default` makes them in workdir/embedded once and points the
config at them (the demo and `python -m vppo_jax.train` both call it).
"""

from __future__ import annotations

import os

import ml_collections

from vppo_jax.embedded import reasoning, synthetic
from vppo_jax.embedded.tiny_model import write_tiny_model
from vppo_jax.embedded.warm_start import warm_start
from vppo_jax.io import paths


def is_embedded_default(config: ml_collections.ConfigDict) -> bool:
    """Whether the config asks for the embedded default's assets (model or data left empty)."""
    return "synthetic" in config and not (config.model.path and config.data.train_files[0])


def prepare_embedded_default(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """With no model and no data given, make the synthetic task, the tiny model and its
    supervised warm start in workdir/embedded (once; a restarted run reuses them) and point
    the config at them."""
    if not is_embedded_default(config):
        return config
    s = config.synthetic
    assets = os.path.join(workdir, "embedded")
    files = synthetic.split_paths(assets)
    if not all(paths.exists(f) for f in files.values()):
        if s.get("task") == "reasoning":  # configs/tiny_reasoning.py; the shapes task otherwise
            reasoning.write_splits(assets, s.train, s.val, s.seed, teacher_noise=s.teacher_noise, gap=s.gap)
        else:
            synthetic.write_splits(assets, s.train, s.val, s.seed, teacher_noise=s.teacher_noise)
    model_dir = os.path.join(assets, "tiny_model")
    if not paths.exists(model_dir):
        write_tiny_model(model_dir, synthetic.tokenizer_corpus(files["train"]), seed=config.train.seed)
    if s.warm_start_steps:
        warm_dir, model_dir = model_dir, os.path.join(assets, "warm_start")
        if not paths.exists(model_dir):
            warm_start(
                warm_dir,
                files["train"],
                model_dir,
                s.warm_start_steps,
                s.warm_start_batch,
                s.warm_start_lr,
                seed=config.train.seed,
            )
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.path = config.model.path or model_dir
    if not config.data.train_files[0]:
        config.data.train_files, config.data.val_files = (files["train"],), (files["val"],)
    return config
