"""``dmoe node`` flags: bad values exit 2 with one line naming the problem; --help documents units."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # real processes


def run_node(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dmoe", "node", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args,needle", [
    (["--experts", "ffn.[4:2]"], "empty range"),
    (["--experts", "ffn"], "PREFIX"),
    (["--experts", "ffn.0", "--expert-cls", "nope"], "unknown expert class"),
    (["--experts", "ffn.0", "--hidden-dim", "-3"], "positive integer"),
    (["--experts", "ffn.0", "--max-batch-delay-ms", "soon"], "expected a number"),
    ([], "--experts"),
])
def test_bad_flags_exit_2_with_one_line(args, needle):
    result = run_node(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert not result.stdout.strip()


def test_help_documents_units():
    result = run_node("--help")
    assert result.returncode == 0
    for text in ("--max-batch-delay-ms", "ms", "seconds", "MiB", "--announce-port", "--checkpoint-interval"):
        assert text in result.stdout
