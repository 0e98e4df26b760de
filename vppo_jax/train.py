"""Train a Qwen2.5-VL policy with VPPO (or a GRPO/DAPO baseline) from an experiment config.

    python -m vppo_jax.train --config=configs/vppo_7b.py --workdir=runs/vppo_7b --config.model.path=...
    python -m vppo_jax.train --config=configs/tiny.py --workdir=runs/tiny_vppo   # the embedded default

The loop itself is vppo_jax/trainer/trainer.py. A config with a `synthetic` section (the
embedded default, configs/tiny.py) and no model or data gets them made first, in
workdir/embedded (vppo_jax/embedded/assets.py); any other config must name its model and data.

Exit statuses (vppo_jax/io/cli.py): 0 done, 1 unexpected error (traceback), 2 bad input at
start-up (one line; --debug adds the traceback), 3 collapsed policy, 4 checkpoint write failed,
75 preempted (SIGTERM or SIGINT: the last finished step is checkpointed; rerun to resume).
"""

from __future__ import annotations

import os
import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

from vppo_jax.embedded.assets import is_embedded_default, prepare_embedded_default
from vppo_jax.io.cli import run_program
from vppo_jax.parallel import distributed
from vppo_jax.trainer.trainer import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for the run's config, metrics and checkpoints (or gs://...)."
)
# Multi-process runs off TPU (vppo_jax/parallel/distributed.py); on a Cloud TPU pod JAX finds its workers itself.
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 in a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index in [0, num_processes).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; the progress bar says enough
    # Modules the config names (a reward of one's own) may sit next to the config file.
    sys.path.append(os.path.dirname(os.path.abspath(config_flags.get_config_filename(flags.FLAGS["config"]))))
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = _CONFIG.value
    if is_embedded_default(config):
        # Made once, by process 0, before the others look for them.
        if jax.process_index() == 0:
            config = prepare_embedded_default(config, _WORKDIR.value)
        distributed.barrier("embedded default ready")
        config = prepare_embedded_default(config, _WORKDIR.value)
    Trainer(config, _WORKDIR.value).train()


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    run_program(main)
