"""A Hugging Face hub cache laid out by hand, and huggingface_hub pointed at it offline: how
the tests resolve Hub names without a network."""

import os
import shutil

from huggingface_hub import constants

REVISION = "0123456789abcdef0123456789abcdef01234567"  # the commit a snapshot is stored under


def cache_repo(cache, kind: str, repo_id: str, files: dict[str, str]) -> str:
    """Lays `files` ({path in the repo: local file}) out as the hub cache holds a download of
    `repo_id` at main; returns the snapshot directory."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    for name, source in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return str(snapshot)


def go_offline(monkeypatch, home: str):
    """No network, the cache in `home`/hub: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE
    when imported, so this process gets its settings patched and subprocesses the environment."""
    monkeypatch.setenv("HF_HOME", home)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", os.path.join(home, "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
