"""A training run's workdir, read back: its config, its finished steps, the model it started
from and its parameters at a step. `python -m vppo_jax.eval` and scripts/convert_jax_to_hf.py
take a run this way.

The trainer (vppo_jax/trainer/checkpoints.py) writes WORKDIR/config.json, the resolved
experiment config, and one orbax checkpoint per saved step in WORKDIR/checkpoints/STEP, whose
item "state" holds the train state: the trained parameters under "params" and the frozen ones
(model.freeze_vision, LoRA's base) under "frozen" (each array under the "value" key of its
nnx.Param), the optimizer state beside them. Only the parameters are read here, one at a time
(orbax's partial load), so reading a run holds one parameter (a LoRA kernel: it and its
adapter, merged), never the optimizer state. The architecture, tokenizer and processor files
come from the model the run started from (model.path): the run changes its weights only.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from vppo_jax.errors import InputError
from vppo_jax.io import hub, paths
from vppo_jax.models.qwen2_5_vl import lora
from vppo_jax.models.qwen2_5_vl.checkpoint import HF_DIR, PARAMS_DIR, StoredParams, open_stored_params
from vppo_jax.trainer import config as config_lib
from vppo_jax.trainer.checkpoints import CONFIG_FILE, checkpoints_dir, complete_steps

STATE_ITEM = "state"
# The embedded default's assets (vppo_jax/embedded/assets.py) live in the run's own workdir.
EMBEDDED_DIR = "embedded"


def is_run_workdir(path: str) -> bool:
    """A training run's workdir holds the resolved experiment config (an HF config.json has no "train")."""
    try:
        return "train" in paths.read_json(os.path.join(path, CONFIG_FILE))
    except (FileNotFoundError, NotADirectoryError):
        return False


def run_and_step(path: str, step: int | None) -> tuple[str, int | None] | None:
    """(workdir, step) when `path` names a training run: its workdir (at `step`), or one of its
    checkpoint directories, WORKDIR/checkpoints/STEP (then `step` is None or the same); None
    when `path` is no run."""
    if is_run_workdir(path):
        return path, step
    parent, name = os.path.split(path.rstrip("/"))
    workdir, folder = os.path.split(parent)
    if not (name.isdigit() and folder == os.path.basename(checkpoints_dir(".")) and is_run_workdir(workdir)):
        return None
    if step not in (None, int(name)):
        raise InputError(f"{path} is checkpoint {name} of {workdir}, but --step={step}: give one of the two.")
    return workdir, int(name)


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config: the defaults, with what the run saved over them (fields added since the
    run was started keep their defaults)."""
    saved = paths.read_json(os.path.join(workdir, CONFIG_FILE))
    # Runs from before the precision modes held their parameters in model.dtype.
    saved["model"].setdefault("param_dtype", saved["model"]["dtype"])
    config = config_lib.default_config()
    config.update(saved)
    return config


def finished_step(workdir: str, step: int | None) -> int:
    """`step`, or the latest finished step when None; a step without a complete checkpoint is refused."""
    steps = complete_steps(workdir)
    if not steps:
        raise InputError(f"{workdir} has no checkpoint yet; a run saves one every checkpoint.every_steps steps.")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise InputError(f"{checkpoints_dir(workdir)} has no checkpoint {step}; it holds steps {steps}.")
    return step


def base_model_dir(workdir: str, config: ml_collections.ConfigDict) -> str:
    """The HF directory (config.json, tokenizer and processor files) of the model the run
    started from. The embedded default's model is found in this workdir, wherever the run was
    started from; any other model.path as the run saw it (a relative one from where it started)."""
    path = config.model.path
    parts = path.split("/")
    if EMBEDDED_DIR in parts:  # .../embedded/warm_start -> WORKDIR/embedded/warm_start
        last = max(i for i, part in enumerate(parts) if part == EMBEDDED_DIR)
        in_workdir = os.path.join(workdir, *parts[last:])
        if paths.is_dir(in_workdir):
            path = in_workdir
    try:
        path = hub.resolve_model(path)
    except hub.HubLookupError as error:
        raise InputError(
            f"{workdir}/{CONFIG_FILE} names model.path={config.model.path!r}, which is not found here ({error}) "
            "A relative model.path is relative to where the run was started: run this command from there."
        ) from error
    return os.path.join(path, HF_DIR) if paths.is_dir(os.path.join(path, PARAMS_DIR)) else path


class RunParams:
    """The model's parameters in a run's checkpoint, as a `StoredParams` gives them (`leaves`,
    `key`, `load`): the trained and the frozen ones, each LoRA adapter merged into its base
    kernel (W + alpha / rank * A @ B, `lora.merged_kernel`) with the run's `lora_scale`."""

    def __init__(self, directory: str, lora_scale: float = 0.0):
        self.directory, self.lora_scale = directory, lora_scale
        self.parts = [StoredParams(directory, STATE_ITEM, (part,), ("value",)) for part in ("params", "frozen")]
        # {parameter path: (the part holding it, (shape, dtype))}; keys are (part, *path, "value").
        self.where = {key[1:-1]: (part, leaf) for part in self.parts for key, leaf in part.leaves().items()}

    def key(self, param_path: tuple) -> tuple:
        return param_path

    def leaves(self) -> dict[tuple, tuple]:
        return {p: shape_dtype for p, (_, shape_dtype) in self.where.items() if "lora" not in p}

    def load(self, param_path: tuple, abstract):
        value = self._read(param_path, abstract)
        adapter = param_path[:-1] + ("lora",)
        if param_path[-1] != "kernel" or adapter + ("lora_a",) not in self.where:
            return value
        a, b = (self._read(adapter + (name,)) for name in ("lora_a", "lora_b"))
        return lora.merged_kernel(value, a, b, self.lora_scale)

    def _read(self, param_path: tuple, abstract=None):
        part, (shape, dtype) = self.where[param_path]
        on_host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        return part.load(param_path, abstract or jax.ShapeDtypeStruct(shape, dtype, sharding=on_host))


def stored_params(workdir: str, step: int) -> RunParams:
    """Where checkpoint `step` of the run holds the parameters."""
    config = run_config(workdir)
    scale = config_lib.lora_config(config).scale if config.model.lora.rank else 0.0
    return RunParams(os.path.join(checkpoints_dir(workdir), str(step)), scale)


def open_run_params(workdir: str, step: int | None, dtype: str | None = None, param_dtype: str | None = None):
    """(config, {parameter path: (shape, dtype)}, load, step) of the run's parameters at `step`
    (the latest finished step if None); `load(p)` reads one parameter, in `param_dtype`
    (`open_stored_params`; default: as the run stored them)."""
    step = finished_step(workdir, step)
    hf_dir = base_model_dir(workdir, run_config(workdir))
    return (*open_stored_params(stored_params(workdir, step), hf_dir, dtype, param_dtype), step)
