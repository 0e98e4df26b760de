"""The embedded default's assets: the synthetic task, the tiny model and its warm start.

With no model and no data in the config (configs/tiny.py), the trainer calls
`prepare_embedded_default` to make them in workdir/embedded once and point the config at them.
"""
from __future__ import annotations

import os

import ml_collections

from vppo_jax.data import synthetic
from vppo_jax.tiny import write_tiny_model
from vppo_jax.warm_start import warm_start


def prepare_embedded_default(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """With no model and no data given, make the synthetic task, the tiny model and its
    supervised warm start in workdir/embedded (once; a restarted run reuses them) and point
    the config at them."""
    if config.model.path and config.data.train_files[0]:
        return config
    s = config.synthetic
    assets = os.path.join(workdir, "embedded")
    files = synthetic.split_paths(assets)
    if not all(os.path.exists(f) for f in files.values()):
        synthetic.write_splits(assets, s.train, s.val, s.seed, teacher_noise=s.teacher_noise)
    model_dir = os.path.join(assets, "tiny_model")
    if not os.path.exists(model_dir):
        write_tiny_model(model_dir, synthetic.tokenizer_corpus(files["train"]), seed=config.train.seed)
    if s.warm_start_steps:
        warm_dir, model_dir = model_dir, os.path.join(assets, "warm_start")
        if not os.path.exists(model_dir):
            warm_start(warm_dir, files["train"], model_dir, s.warm_start_steps, s.warm_start_batch, s.warm_start_lr,
                       seed=config.train.seed)
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.path = config.model.path or model_dir
    if not config.data.train_files[0]:
        config.data.train_files, config.data.val_files = (files["train"],), (files["val"],)
    return config
