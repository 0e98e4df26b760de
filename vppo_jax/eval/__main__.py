"""python -m vppo_jax.eval: see vppo_jax/eval/benchmarks.py."""
from vppo_jax.eval.benchmarks import main

if __name__ == "__main__":  # the reward workers are spawned: they re-import this module
    main()
