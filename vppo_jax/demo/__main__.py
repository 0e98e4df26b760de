"""python -m vppo_jax.demo --config=configs/tiny.py --workdir=runs/tiny: the embedded default
end to end (vppo_jax/demo/run.py), ending with the report's summary and its path."""

from absl import flags, logging
from ml_collections import config_flags

from vppo_jax.demo.run import run_demo
from vppo_jax.io.cli import run_program

_CONFIG = config_flags.DEFINE_config_file("config", None, "The demo's config (configs/tiny.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the assets, the runs and the report.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    print(f"report: {run_demo(_CONFIG.value, _WORKDIR.value)}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    run_program(main)
