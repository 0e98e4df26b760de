"""Model and dataset names of the Hugging Face Hub, wherever a model or data path is accepted.

    resolve_model("Qwen/Qwen2.5-VL-7B-Instruct")     # -> the snapshot directory in the HF cache
    resolve_data_file("ORG/NAME/data/train.parquet")  # -> that file of dataset ORG/NAME, cached
    resolve_dataset("TIGER-Lab/ViRL39K")               # -> the dataset's snapshot directory

A local path that exists, and any URL (gs://...), is returned unchanged: a local path always
wins over a Hub name. A path that no Hub name can be (absolute, ./ or ../ in front; for
a data file also one without ORG/NAME/ in front, or under a directory that exists here) and
that does not exist stops at once: "no such file", without asking the Hub. Anything else is
looked up through huggingface_hub, as transformers does: its cache (HF_HOME, HF_HUB_CACHE)
first, the Hub when it is reachable, only the cache with HF_HUB_OFFLINE=1. A name that
resolves nowhere raises HubLookupError naming what was looked for, where, and what to do.
"""

from __future__ import annotations

import os

from vppo_jax.errors import InputError
from vppo_jax.io import paths

# What a model directory needs (config, weights, tokenizer and processor files); the Hub
# repositories of Qwen2.5-VL hold nothing else we read, and no PyTorch .bin copies.
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja"]


class HubLookupError(InputError, FileNotFoundError):
    """A name is neither a local path nor something the Hugging Face cache or Hub holds."""


def resolve_model(name_or_path: str, allow_patterns: list[str] = MODEL_FILES) -> str:
    """A model directory: the path itself, or the cached snapshot of Hub model `name_or_path`
    (the files matching `allow_patterns`: by default all a model directory needs)."""
    if _is_path(name_or_path):
        return name_or_path
    _refuse_missing_local_path(name_or_path, "directory", _looks_local(name_or_path))
    return _lookup(
        "model", name_or_path, lambda hub: hub.snapshot_download(name_or_path, allow_patterns=allow_patterns)
    )


def resolve_dataset(name_or_path: str, allow_patterns: list[str] | None = None) -> str:
    """A dataset directory: the path itself, or the cached snapshot of Hub dataset `name_or_path`
    (only the files matching `allow_patterns`, e.g. ["*.parquet"], when given)."""
    if _is_path(name_or_path):
        return name_or_path
    _refuse_missing_local_path(name_or_path, "directory", _looks_local(name_or_path))
    return _lookup(
        "dataset",
        name_or_path,
        lambda hub: hub.snapshot_download(name_or_path, repo_type="dataset", allow_patterns=allow_patterns),
    )


def resolve_data_file(path: str) -> str:
    """A data file: the path itself, or file FILE of Hub dataset ORG/NAME for "ORG/NAME/FILE"
    (FILE may have folders), downloaded alone into the cache."""
    if _is_path(path):
        return path
    org, _, rest = path.partition("/")
    name, _, filename = rest.partition("/")
    # A Hub file has ORG/NAME/ in front; "data/train.parquet", or "data/x/train.parquet" where
    # ./data exists, is a local file that is missing.
    _refuse_missing_local_path(path, "file", _looks_local(path) or not filename or os.path.isdir(org))
    repo_id = f"{org}/{name}"
    return _lookup(
        "dataset",
        repo_id,
        lambda hub: hub.hf_hub_download(repo_id, filename, repo_type="dataset"),
        what=f"file {filename!r} of dataset {repo_id!r}",
    )


def _is_path(name_or_path: str) -> bool:
    return not paths.is_local(name_or_path) or os.path.exists(name_or_path)


def _looks_local(path: str) -> bool:
    """Whether `path` is written as no Hub name can be: absolute, or ./ or ../ in front."""
    return os.path.isabs(path) or path.startswith(("./", "../"))


def _refuse_missing_local_path(path: str, kind: str, local: bool):
    """Raises HubLookupError "no such file" for a missing `path` that is `local`: the Hub is not asked."""
    if local:
        hint = "; a file of a Hugging Face Hub dataset is named ORG/NAME/FILE" if kind == "file" else ""
        raise HubLookupError(f"{path}: no such {kind} ({os.path.abspath(path)} does not exist){hint}.")


def _lookup(kind: str, repo_id: str, fetch, what: str | None = None) -> str:
    """`fetch(huggingface_hub)`, its failures turned into one HubLookupError that says where we looked."""
    import huggingface_hub  # imported here: only names that are not paths need it
    from huggingface_hub import constants, errors
    from huggingface_hub.utils import validate_repo_id

    what = what or f"{kind} {repo_id!r}"
    where = f"the Hugging Face cache {constants.HF_HUB_CACHE}"
    try:
        validate_repo_id(repo_id)
    except errors.HFValidationError:
        raise HubLookupError(
            f"{repo_id!r} is not a local path ({os.path.abspath(repo_id)} does not exist) "
            "and not a Hub name (ORG/NAME)."
        ) from None
    try:
        return fetch(huggingface_hub)
    except errors.LocalEntryNotFoundError as error:  # offline, or the Hub unreachable, and not cached
        offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        download = f"hf download {repo_id}" + (" --repo-type dataset" if kind == "dataset" else "")
        raise HubLookupError(
            f"{repo_id!r} is not a local path, and {where} has no complete copy of {what} ({offline}). "
            f"Download it where the Hub is reachable (`{download}`, with HF_HOME pointing at the cache this run "
            "uses), or pass a local path."
        ) from error
    except (errors.RepositoryNotFoundError, errors.EntryNotFoundError, errors.RevisionNotFoundError) as error:
        raise HubLookupError(
            f"{repo_id!r} is not a local path, and neither {where} nor the Hugging Face Hub has {what} "
            f"({type(error).__name__}). Check the name; a private or gated repository needs `hf auth login`."
        ) from error
