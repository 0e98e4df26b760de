"""vppo_jax: VPPO (Visually-Perceptive Policy Optimization) for Qwen2.5-VL in JAX/Flax."""
