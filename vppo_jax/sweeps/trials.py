"""A sweep file -> its trials: a name, a config file and overrides each; the training command of each."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import re

from vppo_jax.io import paths
from vppo_jax.trainer.checkpoints import CONFIG_FILE, complete_steps

DEFAULT_METRICS = ("eval/avg@8", "eval/pass@8")
CONFIG_KEY = "config"  # a trial entry that names its config file instead of overriding a field


@dataclasses.dataclass(frozen=True)
class Trial:
    name: str
    config: str  # config file, ":arg" allowed
    overrides: dict  # dotted config field -> value

    def train_args(self, workdir: str) -> list[str]:
        """The arguments after `python`: the trainer on this trial's config, in `workdir`."""
        flags = [f"--config.{field}={flag_value(value)}" for field, value in self.overrides.items()]
        return ["-m", "vppo_jax.train", f"--config={self.config}", f"--workdir={workdir}", *flags]


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    trials: list[Trial]
    swept: dict[str, dict]  # trial name -> the values that set it apart ({"algo.tgf_k": 0.2, ...})
    grid: tuple[str, ...]  # the GRID's fields, in order; () for named TRIALS
    metrics: tuple[str, ...]

    def workdir(self, root: str, trial: Trial) -> str:
        return os.path.join(root, self.name, trial.name)


def flag_value(value) -> str:
    """The command-line spelling ml_collections parses back into `value`: strings bare, tuples
    (and lists) as Python literals with double-quoted strings, so that a shell-quoted command
    stays readable."""
    if isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)):
        return "(" + "".join(f"{json.dumps(v) if isinstance(v, str) else repr(v)}," for v in value) + ")"
    return repr(value)


def trial_name(values: dict) -> str:
    """ "tgf_k=0.2_beta_min=0.8" from {"algo.tgf_k": 0.2, "algo.beta_min": 0.8}: short, and safe in a path.
    A field is named by its last part unless another field ends the same way."""
    last = [field.rsplit(".", 1)[-1] for field in values]
    parts = [
        f"{short if last.count(short) == 1 else field}={value}" for (field, value), short in zip(values.items(), last)
    ]
    return re.sub(r"[^\w.=+-]", "-", "_".join(parts))


def load_sweep(path: str) -> Sweep:
    spec = importlib.util.spec_from_file_location("sweep_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    name = os.path.splitext(os.path.basename(path))[0]
    grid, named = getattr(module, "GRID", None), getattr(module, "TRIALS", None)
    if not hasattr(module, "CONFIG") or (grid is None) == (named is None):
        raise ValueError(f"{path}: a sweep file sets CONFIG and exactly one of GRID or TRIALS (see vppo_jax/sweeps).")
    if grid is not None:
        fields = list(grid)
        combos = [dict(zip(fields, values)) for values in itertools.product(*grid.values())]
        named = {trial_name(combo): combo for combo in combos}
        if len(named) < len(combos):
            raise ValueError(
                f"{path}: GRID gives several trials the same name (values alike once made safe for a "
                "path); name the trials with TRIALS instead."
            )
    unsafe = [trial for trial in named if not re.fullmatch(r"[\w.=+-]+", trial)]
    if unsafe:
        raise ValueError(f"{path}: trial names {unsafe} are not safe in a path; use letters, digits and . = + - _")
    fixed = getattr(module, "FIXED", {})
    trials = []
    for trial, values in named.items():
        overrides = {**fixed, **values}
        trials.append(Trial(trial, overrides.pop(CONFIG_KEY, module.CONFIG), overrides))
    return Sweep(
        name,
        trials,
        swept=dict(named),
        grid=tuple(grid or ()),
        metrics=tuple(getattr(module, "METRICS", DEFAULT_METRICS)),
    )


def finished(workdir: str) -> bool:
    """Whether the run in `workdir` saved its final checkpoint complete (the trainer always saves
    at its last step)."""
    try:
        steps = paths.read_json(os.path.join(workdir, CONFIG_FILE))["train"]["steps"]
    except FileNotFoundError:
        return False
    return steps in complete_steps(workdir)
