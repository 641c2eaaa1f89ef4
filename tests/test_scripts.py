"""scripts/setup installs only when something it installs changed, and quietly.

The real script runs in a copy of the repository's layout whose ``.venv/bin/python`` is a stub
that records each call instead of running pip, so the test takes milliseconds and no network.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# pip's calls print $STUB_NOISE warning lines, as a first install does, and exit $STUB_PIP_EXIT.
STUB_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../calls.log"
case "$*" in *"pip install"*)
    i=0
    while [ "$i" -lt "${STUB_NOISE:-0}" ]; do echo "WARNING: Location 'file:///wheels/$i/' is ignored"; i=$((i + 1)); done
    exit "${STUB_PIP_EXIT:-0}";;
esac
exit 0
"""


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A folder with scripts/setup, a pyproject.toml, and a .venv whose python only logs calls."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup", tmp_path / "scripts" / "setup")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text(STUB_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    (bin_dir / "activate").write_text(f'PATH="{bin_dir}:$PATH"\n')
    return tmp_path


def setup(checkout: Path, *args: str, torch_spec: str | None = None) -> list[str]:
    """Run scripts/setup; the pip commands it ran (empty when it skipped installing)."""
    log = checkout / ".venv" / "calls.log"
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_SPEC"}
    if torch_spec:
        env["TORCH_SPEC"] = torch_spec
    result = subprocess.run(["bash", str(checkout / "scripts" / "setup"), *args], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line for line in log.read_text().splitlines() if "pip install" in line] if log.exists() else []


def test_setup_installs_once_until_pyproject_extras_or_torch_spec_change(checkout):
    assert setup(checkout, "test")[-1] == "-m pip install --quiet -e .[test]"
    assert setup(checkout, "test") == []  # nothing changed
    assert setup(checkout) == []  # the base install is part of what `test` installed
    stamp = (checkout / ".venv" / ".setup-stamp").read_text().split()
    assert len(stamp) == 2 and stamp[1] == "test"

    with open(checkout / "pyproject.toml", "a") as f:
        f.write("\n# a changed dependency list\n")
    assert setup(checkout)[-1] == "-m pip install --quiet -e ."  # pyproject.toml changed
    assert setup(checkout) == []
    assert setup(checkout, "test")[-1] == "-m pip install --quiet -e .[test]"  # an extra not installed yet
    assert setup(checkout, "test") == [] and setup(checkout) == []

    assert setup(checkout, "test", torch_spec="torch==2.13.0+cpu") != []  # another torch build asked for
    assert setup(checkout, "test", torch_spec="torch==2.13.0+cpu") == []

    (checkout / ".venv" / ".setup-stamp").unlink()  # the documented way to force a reinstall
    assert setup(checkout, "test", torch_spec="torch==2.13.0+cpu") != []


def run_setup(checkout: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(checkout / "scripts" / "setup"), "test"], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


def test_setup_keeps_pips_output_in_its_log(checkout):
    result = run_setup(checkout, STUB_NOISE="150")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == "scripts/setup: installing the project with [test] into .venv (pip's output: .venv/setup.log)\n"
    log = (checkout / ".venv" / "setup.log").read_text().splitlines()
    assert len(log) == 2 * 150 and log[0] == "WARNING: Location 'file:///wheels/0/' is ignored"  # pip, then the project
    assert run_setup(checkout, STUB_NOISE="150").stderr == ""  # up to date: nothing installed, nothing said


def test_a_failed_install_shows_the_end_of_the_log_and_fails(checkout):
    result = run_setup(checkout, STUB_NOISE="150", STUB_PIP_EXIT="1")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[1] == "scripts/setup: 'pip install --quiet --upgrade pip' failed; the end of .venv/setup.log:"
    assert lines[2:] == [f"WARNING: Location 'file:///wheels/{i}/' is ignored" for i in range(130, 150)]
    assert not (checkout / ".venv" / ".setup-stamp").exists()  # the next run tries again
