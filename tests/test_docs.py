"""The documentation cannot rot silently: every command it names runs, every link resolves.

- Every `python -m vppo_jax...` / `benchmarks...` module and every `python scripts/*.py` or
  `benchmarks/*.py` named in README.md and docs/*.md runs with `--helpshort` (one subprocess
  per module), and every flag the docs give it is one the program defines; every
  `--config.<field>` override names a field of the config it is given.
- Every sweep launch named runs as a dry run, and the paper-reproduction block (README and
  docs/experiments.md) is checked as written: the launch runs, on every worker, the venv's
  python that the block's install step made, from the directory it cloned into, on the model
  and data paths its earlier steps wrote there.
- Every relative link and #anchor in README.md and docs/, and every docs/*.md#anchor a source
  file names, resolves.
"""

from __future__ import annotations

import ast
import concurrent.futures
import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs")))]
DOCS = [path for path in DOCS if path.endswith(".md")]
SOURCE_DIRS = ("vppo_jax", "configs", "experiments", "benchmarks", "scripts", "tests")

# `python -m vppo_jax.train ...`, `.venv/bin/python scripts/convert_hf_to_jax.py ...`: the program and what follows.
COMMAND = re.compile(
    r"(?<![\w/-])(?:\S*/)?python3?\s+(?:-m\s+((?:vppo_jax|benchmarks)[\w.]*)|((?:scripts|benchmarks)/\w+\.py))"
)
FLAG = re.compile(r"(?<![\w-])--([A-Za-z_][\w.]*)")
HELP_FLAG = re.compile(r"^\s+--(?:\[no\])?([\w.]+):", re.MULTILINE)
LAUNCH = "vppo_jax.sweeps.launch"
ABSENT_BUCKET = os.path.join(tempfile.gettempdir(), "vppo_jax_docs_test_no_bucket")  # stands for gs://...


def read(path: str) -> str:
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def logical_lines(text: str) -> list[str]:
    """The text's lines with shell continuations (a trailing backslash) joined."""
    return re.sub(r"\s*\\\n\s*", " ", text).splitlines()


@functools.cache
def documented_commands() -> list[tuple[str, str, str]]:
    """(doc, program, the command's text after the program) for every command the docs name;
    the text ends where the shell command does (&&, ;, |, a quote, a backtick or a comment)."""
    commands = []
    for doc in DOCS:
        for line in logical_lines(read(doc)):
            for match in COMMAND.finditer(line):
                rest = re.split(r"&&|;|\||`|\"|\s#\s", line[match.end() :])[0]
                commands.append((doc, match.group(1) or match.group(2), rest))
    return commands


def run_program(program: str, args: list[str]) -> subprocess.CompletedProcess:
    prefix = [sys.executable, program] if program.endswith(".py") else [sys.executable, "-m", program]
    return subprocess.run([*prefix, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def source_file(program: str) -> str:
    """The file that `python PROGRAM` or `python -m PROGRAM` runs, relative to the repository."""
    if program.endswith(".py"):
        return program
    module = program.replace(".", "/")
    return f"{module}.py" if os.path.isfile(os.path.join(REPO, f"{module}.py")) else f"{module}/__main__.py"


def help_text(program: str) -> str:
    """`PROGRAM --helpshort`'s output; "" for a program that takes no flags (it would run at
    once), which is imported instead."""
    if "flags.DEFINE" in read(source_file(program)):
        result = run_program(program, ["--helpshort"])
        output = result.stdout + result.stderr
        ok = "Traceback" not in output and "--helpfull" in output  # absl's help ends by naming --helpfull
    else:
        module = program.removesuffix(".py").replace("/", ".")
        result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True)
        output, ok = "", result.returncode == 0
    assert ok, f"{program} does not run:\n{(result.stdout + result.stderr)[-2000:]}"
    return output


def test_every_documented_program_runs_and_defines_the_flags_the_docs_give_it():
    commands = documented_commands()
    programs = sorted({program for _, program, _ in commands})
    assert {"vppo_jax.train", "vppo_jax.demo", "vppo_jax.plan", "vppo_jax.eval", LAUNCH} <= set(programs)
    assert "scripts/convert_hf_to_jax.py" in programs
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        helps = dict(zip(programs, pool.map(help_text, programs)))
    problems = []
    for doc, program, rest in commands:
        defined = set(HELP_FLAG.findall(helps[program]))
        for flag in FLAG.findall(rest):
            if not flag.startswith("config.") and flag not in defined and flag not in ("helpshort", "helpfull"):
                problems.append(f"{doc}: `{program}` is given --{flag}, which it does not define")
    assert not problems, "\n".join(problems)


def load_config(argument: str | None):
    """The config that `--config=FILE[:ARG]` names, or the defaults every config starts from."""
    from vppo_jax.trainer.config import default_config

    path, _, arg = (argument or "").partition(":")
    if not os.path.isfile(os.path.join(REPO, path)):
        return default_config()
    spec = importlib.util.spec_from_file_location("documented_config", os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_every_documented_config_override_names_a_field():
    problems, checked = [], 0
    for doc, program, rest in documented_commands():
        overrides = [flag for flag in FLAG.findall(rest) if flag.startswith("config.")]
        if not overrides:
            continue
        config_file = re.search(r"--config=([^\s\]]+)", rest)
        config = load_config(config_file.group(1) if config_file else None)
        for override in overrides:
            node = config
            for part in override.split(".")[1:]:
                if part not in node:
                    problems.append(f"{doc}: `{program}` overrides --{override}: the config has no {part!r}")
                    break
                node = node[part]
            checked += 1
    assert checked >= 10
    assert not problems, "\n".join(problems)


def shell_variables(text: str) -> dict[str, str]:
    """NAME=value assignments on a line of their own (`POD=my-v5p-32 ZONE=us-east5-a ...`)."""
    variables = {}
    for line in text.splitlines():
        words = line.split()
        if words and all(re.fullmatch(r"[A-Z_]+=\S+", word) for word in words):
            variables.update(word.split("=", 1) for word in words)
    return variables


@functools.cache
def dry_run(launch_args: str, doc: str) -> list[list[str]]:
    """The launcher's dry run of a launch that `doc` names, with the shell variables the doc sets:
    each trial's printed command, as words. Buckets become a local directory that does not
    exist, so the launcher's check for finished trials stays on this machine and finds none."""
    for name, value in shell_variables(read(doc)).items():
        launch_args = launch_args.replace(f"${name}", value)
    launch_args = re.sub(r"gs://[\w.-]+", ABSENT_BUCKET, launch_args)
    args = [word for word in shlex.split(launch_args.replace("[", " ").replace("]", " ")) if word != "--dry_run"]
    result = run_program(LAUNCH, [*args, "--dry_run"])
    assert result.returncode == 0, f"{LAUNCH} {' '.join(args)} --dry_run failed:\n{result.stdout}{result.stderr}"
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def test_every_documented_sweep_launch_dry_runs():
    launches = [(doc, rest) for doc, program, rest in documented_commands() if program == LAUNCH]
    assert len(launches) >= 4
    for doc, rest in launches:
        sweep = load_sweep_of(rest)
        printed = dry_run(rest, doc)
        assert len(printed) == len(sweep.trials), (doc, rest, printed)
        assert all("vppo_jax.train" in " ".join(words) for words in printed), printed


def load_sweep_of(launch_args: str):
    from vppo_jax.sweeps.trials import load_sweep

    sweep_file = next(word for word in launch_args.split() if word.startswith("experiments/"))
    return load_sweep(os.path.join(REPO, sweep_file))


def worker_commands(lines: list[str]) -> list[str]:
    """The commands `gcloud compute tpus tpu-vm ssh ... --worker=all --command="..."` runs on every worker."""
    commands = []
    for line in lines:
        if line.strip().startswith("gcloud ") and "tpu-vm ssh" in line and "--worker=all" in line:
            words = shlex.split(line.strip())
            commands += [word.removeprefix("--command=") for word in words if word.startswith("--command=")]
    return commands


@pytest.mark.parametrize("doc", ["README.md", "docs/experiments.md"])
def test_the_paper_reproduction_block_runs_as_written(doc):
    lines = logical_lines(read(doc))
    launch_at = next(i for i, line in enumerate(lines) if "experiments/table1_7b.py" in line and "--pod=$POD" in line)
    setup = worker_commands(lines[:launch_at])
    install = next(command for command in setup if "git clone" in command)
    repo = re.search(r"git clone \S+ (\S+)", install).group(1)
    venv = re.search(r"python3 -m venv (\S+)", install).group(1)
    python = f"{venv}/bin/python"
    assert install.startswith(f"git clone REPO {repo} && cd {repo} && "), install
    assert f"{venv}/bin/pip install" in install and "-r requirements-tpu.txt" in install, install
    for requirements in re.findall(r"-r (\S+)", install):
        assert os.path.isfile(os.path.join(REPO, requirements)), f"{doc} installs {requirements}, which does not exist"
    written = set()  # the paths the setup steps write on every worker, relative to the repository
    for command in setup[setup.index(install) + 1 :]:
        assert command.startswith(f"cd {repo} && "), command
        for step in command.split("&&")[1:]:
            words = shlex.split(step)
            assert words[0] == python, f"{doc}: a setup step runs {words[0]}, not the venv's {python}"
            if words[1:2] == ["scripts/convert_hf_to_jax.py"]:
                written |= {word.removeprefix("--out=") for word in words if word.startswith("--out=")}
            if words[1:3] == ["-m", "vppo_jax.data.prepare"]:
                out = next(word.removeprefix("--out=") for word in words if word.startswith("--out="))
                written.add(f"{out}/{words[3]}.parquet")
    launch_args = next(rest for d, program, rest in documented_commands() if d == doc and "--pod=$POD" in rest)
    printed = dry_run(launch_args, doc)
    assert len(printed) == 3  # grpo, dapo, vppo
    for words in printed:
        assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in words, words
        remote = next(word.removeprefix("--command=") for word in words if word.startswith("--command="))
        cd, train = remote.split(" && ", 1)
        assert cd == f"cd {repo}", remote
        train = shlex.split(train)
        assert train[:3] == [python, "-m", "vppo_jax.train"], f"{doc}: the workers run {train[:3]}"
        overrides = dict(word[len("--config.") :].split("=", 1) for word in train if word.startswith("--config."))
        assert overrides["model.path"] in written, f"{doc}: model.path {overrides['model.path']} is not made first"
        for data_file in ast.literal_eval(overrides["data.train_files"]):
            assert data_file in written, f"{doc}: {data_file} is not made before the launch ({sorted(written)})"


def github_anchors(markdown: str) -> set[str]:
    """The #anchors GitHub gives the headings of a markdown file (code blocks are not headings)."""
    anchors, seen, fenced = set(), {}, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"#{1,6} (.*)", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def broken(target: str, relative_to: str) -> str | None:
    """Why `target` (path#anchor, relative to the directory `relative_to`) does not resolve; None if it does."""
    path, _, anchor = target.partition("#")
    file = os.path.normpath(os.path.join(REPO, relative_to, path)) if path else None
    if file and not os.path.exists(file):
        return "no such file"
    if anchor and anchor not in github_anchors(read(file)):
        return f"no heading with anchor #{anchor}"
    return None


def test_every_internal_link_and_anchor_resolves():
    problems, checked = [], 0
    for doc in DOCS:
        text = re.sub(r"^(?: {4}|\t).*$", "", read(doc), flags=re.MULTILINE)  # indented code is not markdown
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            target = target if target.partition("#")[0] else os.path.basename(doc) + target
            reason = broken(target, os.path.dirname(doc))
            checked += 1
            if reason:
                problems.append(f"{doc}: ({target}): {reason}")
    assert checked >= 50
    assert not problems, "\n".join(problems)


def test_every_docs_anchor_named_in_the_source_resolves():
    problems, checked = [], 0
    for top in SOURCE_DIRS:
        for directory, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(directory, name)) as f:
                        for target in re.findall(r"docs/\w+\.md(?:#[\w-]+)?", f.read()):
                            checked += 1
                            reason = broken(target, "")
                            if reason:
                                problems.append(
                                    f"{os.path.relpath(os.path.join(directory, name), REPO)}: {target}: {reason}"
                                )
    assert checked >= 5
    assert not problems, "\n".join(problems)
