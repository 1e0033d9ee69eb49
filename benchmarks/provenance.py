"""Where and with what a benchmark ran: the machine, and the commit (marked when the work tree differs)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import torch

from vitkit.runtime import cpu_flags, cpu_model_name


def machine() -> dict:
    cpu = cpu_model_name() or "unknown"
    # the instruction sets the bf16 and int8 modes' speed depends on
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni", "amx_int8")
    isa = [f for f in wanted if f in cpu_flags()]
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": isa, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform()}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def tree_is_dirty() -> bool:
    """True when the work tree differs from the commit (the run then used uncommitted code or recipes)."""
    try:
        return bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return False


def revision() -> str:
    """The commit, with "+uncommitted changes" when the run used code or recipes that differ from it."""
    return git_commit() + ("+uncommitted changes" if tree_is_dirty() else "")


def provenance(started: datetime) -> dict:
    """What every results file records of its run: the command, the start, the commit and the machine."""
    return {"command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "date": started.isoformat(timespec="seconds"), "commit": revision(), "machine": machine()}


def header_lines(record: dict) -> list[str]:
    """The lines a report lists first under its title: the command, the date and commit, and the machine (its CPU,
    the instruction sets the bf16 and int8 modes depend on, torch and its threads)."""
    m = record["machine"]
    return [f"- command: `{record['command']}`", f"- date: {record['date']}, commit {record['commit']}",
            f"- machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['isa']) or 'no AVX-512'}), torch {m['torch']} "
            f"with {m['torch_threads']} threads"]


def result_base(out: str | Path, name: str, started: datetime) -> Path:
    """OUT/<name>_<YYYY-MM-DD_HHMM> without a suffix, OUT made if missing: the path a run's .json, .md and plots
    share, stamped with the run's start."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{name}_{started.strftime('%Y-%m-%d_%H%M')}"


def write_json(record: dict, base: Path) -> None:
    """`record` as <base>.json, indented for reading."""
    base.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
