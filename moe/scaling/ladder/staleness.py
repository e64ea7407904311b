"""Which run directories hold results of the run's own config: summaries, checkpoints and
config fingerprints (:func:`moe.config.config_fingerprint`, recorded in
``runs/<run>/fingerprint.json``). A run whose config changed is moved aside to
``runs/<run>.stale-<UTC>`` and trained again; its old results are never reused."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from moe.config import (changed_fields, fingerprint_fields, fingerprint_of_fields,
                        load_config)
from moe.runs import atomic_write
from moe.scaling.ladder.design import Run

DONE = "done"


def read_summary(run_dir: Path) -> Optional[dict]:
    p = run_dir / "summary.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a torn summary is treated as "not done": the run resumes


def has_checkpoint(run_dir: Path) -> bool:
    latest = run_dir / "checkpoints" / "latest"
    return latest.is_file() and (run_dir / "checkpoints" / latest.read_text().strip()).is_dir()


FINGERPRINT_FILE = "fingerprint.json"


def recorded_fingerprint(run_dir: Path) -> tuple[Optional[str], Optional[dict]]:
    """(fingerprint, fields) of the config a run directory was trained with: the ladder's
    record (fingerprint.json), else computed from the trainer's saved config.yaml;
    (None, None) when neither says."""
    try:
        rec = json.loads((run_dir / FINGERPRINT_FILE).read_text())
        return rec["fingerprint"], rec.get("fields")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        import yaml

        fields = fingerprint_fields(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
        return fingerprint_of_fields(fields), fields
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return None, None


def _changed_fields(old: Optional[dict], new: dict) -> str:
    if old is None:
        return "no record of the config it was trained with"
    return changed_fields(old, new, 6)[1] or "fingerprint"


def set_aside_if_stale(run_dir: Path, r: Run, base: Path) -> Optional[Path]:
    """If ``run_dir`` holds results (summary or checkpoint) of a config other than ``r``'s,
    move it to ``<run>.stale-<UTC>`` and return the new path; else None."""
    if not r.fingerprint or not run_dir.is_dir():
        return None
    if not ((run_dir / "summary.json").exists() or has_checkpoint(run_dir)):
        return None  # nothing that could be reused
    fp, fields = recorded_fingerprint(run_dir)
    if fp == r.fingerprint:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = run_dir.with_name(f"{run_dir.name}.stale-{stamp}")
    n = 1
    while dest.exists():
        dest = run_dir.with_name(f"{run_dir.name}.stale-{stamp}-{n}")
        n += 1
    os.rename(run_dir, dest)
    new = fingerprint_fields(load_config(base, r.overrides))
    print(f"ladder: run {r.name} changed since it was trained ({_changed_fields(fields, new)}); "
          f"old results moved to {dest}; retraining", file=sys.stderr, flush=True)
    return dest


def record_fingerprint(run_dir: Path, r: Run, base: Path) -> None:
    try:
        current = json.loads((run_dir / FINGERPRINT_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        current = None
    if not r.fingerprint or current == r.fingerprint:
        return
    fields = fingerprint_fields(load_config(base, r.overrides))
    atomic_write(run_dir / FINGERPRINT_FILE, json.dumps(
        {"run": r.name, "fingerprint": r.fingerprint, "fields": fields}, indent=1) + "\n")
