"""Rewards by name: `@register("name")` on a module-level `fn(response, answer) -> float`.

Rewards run in worker processes, which receive the function by reference (module and
name) and import it themselves. So a reward must be a module-level function of an
importable module: not a lambda, not a function defined inside another function.

A reward outside this package is named in the config as "module.path:name"; `get_reward`
imports the module, whose `@register` lines then add its rewards. The module is looked up
on PYTHONPATH, in the directory the command runs from, and (for `python -m vppo_jax.train`)
in the directory of the config file.
"""

import importlib

from vppo_jax.errors import InputError, one_line

_REWARDS = {}


def register(name):
    """Decorator adding `fn(response: str, answer: str) -> float` under `name`."""

    def add(fn):
        if "<" in fn.__qualname__:  # <lambda> or <locals>: workers could not import it
            raise TypeError(
                f"reward {name!r}: {fn.__qualname__} is not a module-level function; "
                "worker processes import rewards by module and name"
            )
        existing = _REWARDS.get(name)
        # The same function seen twice (its module imported again) is fine; two are ambiguous.
        if existing is not None and _full_name(existing) != _full_name(fn):
            raise ValueError(f"reward {name!r} is already registered to {_full_name(existing)}")
        _REWARDS[name] = fn
        return fn

    return add


def get_reward(name):
    """The reward registered as `name`, or as "module.path:name" after importing the module.

    Raises InputError (one line) when the module cannot be imported, whatever its code raises
    on import, or when no reward has that name."""
    module, _, short_name = name.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except Exception as error:  # ImportError, or a SyntaxError, NameError, ... in the module's code
            detail = one_line(error)
            raise InputError(
                f"reward {name!r}: cannot import {module} ({detail}). A reward module is found on "
                "PYTHONPATH, in the directory the command runs from, or next to the config file."
            ) from error
    if short_name not in _REWARDS:
        raise InputError(f"unknown reward {name!r}; registered: {', '.join(registered_rewards())}")
    return _REWARDS[short_name]


def registered_rewards():
    return sorted(_REWARDS)


def _full_name(fn):
    return f"{fn.__module__}.{fn.__qualname__}"
