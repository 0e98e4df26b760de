"""The embedded default's assets: a synthetic visual task, a tiny Qwen2.5-VL with its
tokenizer, and its supervised warm start, made from a config alone (configs/tiny.py).

Training (`python -m vppo_jax.train`), the planner and the demo all start from them, so they
live outside the demo package; `assets.prepare_embedded_default` makes them in a workdir.
"""
