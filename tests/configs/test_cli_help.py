"""Every ``everyprompt-*`` command in pyproject.toml's [project.scripts] (and every ``everyprompt-bench <name>``)
answers ``--help`` with exit 0 and a one-line explanation for each option it lists, and a bad option or an
unknown ``key=value`` exits 2 with an error that names it.

Each command runs in a subprocess from its entry point ("module:function"), so the console scripts need not be
installed; ``--help`` must not wait for torch where that can be avoided (a bench loads it only once it runs).
"""

import os
import re
import subprocess
import sys
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.cli import BENCHES

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def run(command: str, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``command *args`` as its console script would run it, from an empty folder; and what it left there."""
    module, _, func = SCRIPTS[command].partition(":")
    code = f"import sys; from {module} import {func} as main; sys.argv[0] = {command!r}; sys.exit(main())"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=50)
        return proc, os.listdir(cwd)


def options_without_help(help_text: str) -> list[str]:
    """The entries of argparse's "positional arguments" and "options" sections that carry no explanation."""
    missing, entry, explained, section = [], None, True, False
    for line in help_text.splitlines() + [""]:
        if re.match(r"\S", line):  # a heading (or the description): argparse's own sections hold the options
            section = line in ("positional arguments:", "options:", "optional arguments:")
            continue
        if not section:
            continue
        starts = re.match(r"^  (\S.*?)(?:\s{2,}(\S.*))?$", line)
        if starts or not line.strip():
            if entry is not None and not explained:
                missing.append(entry)
            entry, explained = (starts.group(1), bool(starts.group(2))) if starts else (None, True)
        elif entry is not None and line.startswith("    "):
            explained = True
    return missing


HELPS = [(c, ()) for c in SCRIPTS] + [("everyprompt-bench", (name,)) for name in sorted(BENCHES)]
REQUIRED = {"everyprompt-rollout-worker": ("--endpoint", "tcp://127.0.0.1:1", "--config", "c.yaml", "--init", "m"),
            "everyprompt-filter-pool": ("--out", "pool.jsonl"),
            "everyprompt-eval": ("path/to/model",)}  # the required arguments: the error is about the bad option alone
BAD = [(c, (*REQUIRED.get(c, ()), "--bogus"), "--bogus") for c in SCRIPTS] + [
    ("everyprompt-bench", ("codec", "--bogus"), "--bogus"),
    ("everyprompt-bench", ("nosuch",), "'nosuch'"),
    ("everyprompt-train", ("train.num_stepz=1",), "'train.num_stepz'"),
]


@pytest.fixture(scope="module")
def ran() -> dict:
    """Every command line of this module, run side by side (most of the time is the interpreters starting)."""
    lines = [(c, (*s, "--help")) for c, s in HELPS] + [(c, a) for c, a, _ in BAD]
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(lines, pool.map(lambda line: run(line[0], *line[1]), lines)))


@pytest.mark.parametrize("command, sub", HELPS, ids=[" ".join((c, *s)) for c, s in HELPS])
def test_help_lists_every_option_with_an_explanation(command, sub, ran):
    proc, _ = ran[command, (*sub, "--help")]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {' '.join((command, *sub))}")
    assert "--help" in proc.stdout and options_without_help(proc.stdout) == []


@pytest.mark.parametrize("command, args, named", BAD, ids=[" ".join((c, *a)) for c, a, _ in BAD])
def test_a_bad_option_exits_2_naming_it(command, args, named, ran):
    proc, left = ran[command, args]
    assert proc.returncode == 2, (proc.stdout[-1000:], proc.stderr[-2000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{command}") and named in last, proc.stderr[-2000:]
    assert left == []  # stopped before writing anything


@pytest.mark.parametrize("text, missing", [
    ("usage: x\n\noptions:\n  -h, --help  show this\n  --a A       an a\n  --b B\n  --c C\n"
     "                        wrapped\n                        help\n  --d D\n", ["--b B", "--d D"]),
    ("usage: x\n\npositional arguments:\n  {p,q}\n                        the choice\n  args\n\noptions:\n"
     "  -h, --help  show this\n", ["args"]),
])
def test_the_checker_finds_a_missing_help(text, missing):
    assert options_without_help(text) == missing


def test_parsing_needs_no_torch():
    """The modules behind --help import torch only once a command runs."""
    modules = sorted({v.partition(":")[0] for v in [*SCRIPTS.values(), *BENCHES.values()]})
    code = f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert proc.stdout.strip() == "False", (modules, proc.stderr[-2000:])
