"""The results table: one row per training run, read from CSV or JSONL and validated.

    python -c "from moe.scaling.results import load_results; print(len(load_results('runs/results.csv')))"

Columns (sizes come from the run's config; the fits never re-derive them):

    required  name, kind (dense|moe), n_experts, top_k, params_total, params_active,
              params_active_nonembed, params_total_nonembed, tokens, flops, final_eval_loss
    optional  sparsity (a number, default 1 - top_k/n_experts for moe and 0 for dense; or
              a level name, as moe/scaling/ladder.py writes, used to group runs), maxvio,
              held_out (bool), status (only "done" or empty rows are fitted), group (only
              "grid" or empty rows are fitted)

Validation happens here, before any fitting, and fails with one line naming the file, the
column and the row: a fit that silently drops a NaN or fits a single point produces a number
that looks like a result.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable

__all__ = ["ResultsError", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS", "load_results",
           "validate_rows", "write_results", "chinchilla_rows", "run_group"]

REQUIRED_COLUMNS = ("name", "kind", "n_experts", "top_k", "params_total", "params_active",
                    "params_active_nonembed", "params_total_nonembed", "tokens", "flops",
                    "final_eval_loss")
OPTIONAL_COLUMNS = ("sparsity", "maxvio", "held_out", "status")

# Columns that must be finite and > 0 in every fitted row (logs are taken of all of them).
_POSITIVE = ("params_total", "params_active", "params_active_nonembed",
             "params_total_nonembed", "tokens", "flops", "final_eval_loss")
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"", "0", "false", "no", "n", "f", "none", "null"}


class ResultsError(ValueError):
    """A results table that cannot be fitted; the message is one line naming the problem."""


def _where(source: str, i: int, row: dict) -> str:
    name = row.get("name")
    return f"{source}: row {i + 1}" + (f" (name={name!r})" if name not in (None, "") else "")


def _to_float(v):
    if v is None or (isinstance(v, str) and v.strip() == ""):
        return math.nan
    if isinstance(v, bool):
        return float(v)
    return float(v)


def _to_bool(v) -> bool:
    if isinstance(v, bool):
        return v
    if v is None:
        return False
    if isinstance(v, (int, float)):
        return bool(v) and not math.isnan(v)
    s = str(v).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ValueError(f"not a boolean: {v!r}")


def validate_rows(raw_rows: Iterable[dict], *, source: str = "results",
                  min_points: int = 3, skipped: list | None = None) -> list[dict]:
    """Type-convert and validate raw rows (dicts of strings or numbers); return fit rows.

    Rows whose status is set and not "done" are skipped (a run still training has no final
    loss), and so are rows whose `group` column is set and not "grid" (the ladder's
    fixed-size comparison variants); (name, reason) pairs are appended to `skipped` if given.
    A non-numeric `sparsity` (the ladder writes the level's name) becomes the row's `level`,
    the label it is grouped by; the numeric sparsity is then 1 - top_k/n_experts. Raises ResultsError naming the column and row for: a missing required column,
    a non-numeric / NaN / inf / non-positive size or loss, an unknown kind, top_k > n_experts,
    active > total params, a duplicate name, or fewer than `min_points` usable runs.
    """
    raw_rows = list(raw_rows)
    if not raw_rows:
        raise ResultsError(f"{source}: the table has no rows")
    present = set().union(*(r.keys() for r in raw_rows))
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if missing:
        raise ResultsError(f"{source}: missing required column(s) {', '.join(map(repr, missing))}"
                           f" (required: {', '.join(REQUIRED_COLUMNS)})")
    rows, seen = [], {}
    for i, raw in enumerate(raw_rows):
        where = _where(source, i, raw)
        for c in REQUIRED_COLUMNS:
            if c not in raw:
                raise ResultsError(f"{where}: missing value for column {c!r}")
        status = str(raw.get("status") or "").strip().lower()
        if status not in ("", "done"):
            if skipped is not None:
                skipped.append((str(raw.get("name")), f"status {status!r}"))
            continue
        group = str(raw.get("group") or "").strip().lower()
        if group not in ("", "grid"):
            # The ladder's fixed-size comparison variants (balancing, MTP, ...) share a size
            # and sparsity with a grid run; fitting both would weight that point twice with
            # two different recipes. They are compared elsewhere, not fitted.
            if skipped is not None:
                skipped.append((str(raw.get("name")), f"group {group!r} (not a grid run)"))
            continue
        row = dict(raw)
        row["name"] = str(raw["name"]).strip()
        if not row["name"]:
            raise ResultsError(f"{where}: column 'name' is empty")
        if row["name"] in seen:
            raise ResultsError(f"{where}: duplicate name (also row {seen[row['name']] + 1})")
        seen[row["name"]] = i
        kind = str(raw["kind"]).strip().lower()
        if kind not in ("dense", "moe"):
            raise ResultsError(f"{where}: column 'kind' is {raw['kind']!r}; allowed: dense, moe")
        row["kind"] = kind
        level = ""
        if "sparsity" in raw and isinstance(raw["sparsity"], str):
            try:
                float(raw["sparsity"]) if raw["sparsity"].strip() else None
            except ValueError:
                # The ladder writes its sparsity level's NAME here (e.g. "e8k2"): keep it
                # as the label runs are grouped by; the number is derived below.
                level = raw["sparsity"].strip()
        for c in _POSITIVE + ("n_experts", "top_k", "sparsity", "maxvio"):
            if c not in raw or (c == "sparsity" and level):
                continue
            try:
                v = _to_float(raw[c])
            except (TypeError, ValueError):
                raise ResultsError(f"{where}: column {c!r} is not a number: {raw[c]!r}") from None
            if c in _POSITIVE and not (math.isfinite(v) and v > 0):
                what = "NaN/empty" if math.isnan(v) else ("inf" if math.isinf(v) else str(v))
                raise ResultsError(f"{where}: column {c!r} is {what}; it must be finite and > 0")
            row[c] = v
        for c in ("n_experts", "top_k"):
            v = row[c]
            if math.isnan(v) and kind == "dense":
                row[c] = 1.0  # dense rows may leave expert columns empty
                continue
            if not math.isfinite(v) or v < 0 or v != int(v):
                raise ResultsError(f"{where}: column {c!r} is {raw[c]!r}; it must be an integer >= 0")
        if kind == "dense":
            row["n_experts"], row["top_k"] = max(1.0, row["n_experts"]), max(1.0, row["top_k"])
        else:
            if row["n_experts"] < 2:
                raise ResultsError(f"{where}: a moe run needs n_experts >= 2, got {raw['n_experts']!r}")
            if not 1 <= row["top_k"] <= row["n_experts"]:
                raise ResultsError(f"{where}: column 'top_k' is {raw['top_k']!r}; it must be in "
                                   f"[1, n_experts={int(row['n_experts'])}]")
        for a, t in (("params_active", "params_total"),
                     ("params_active_nonembed", "params_total_nonembed")):
            if row[a] > row[t] * (1 + 1e-9):
                raise ResultsError(f"{where}: column {a!r} ({row[a]:.6g}) exceeds {t!r} ({row[t]:.6g})")
        if level or "sparsity" not in row or not math.isfinite(row["sparsity"]):
            row["sparsity"] = 0.0 if kind == "dense" else 1.0 - row["top_k"] / row["n_experts"]
        row["level"] = level or str(raw.get("level") or "").strip()
        if not math.isfinite(row.get("maxvio", math.nan)):
            row.pop("maxvio", None)
        try:
            row["held_out"] = _to_bool(raw.get("held_out"))
        except ValueError:
            raise ResultsError(f"{where}: column 'held_out' is {raw['held_out']!r}; "
                               "use true/false") from None
        row["status"] = status or "done"
        rows.append(row)
    if len(rows) < min_points:
        raise ResultsError(f"{source}: only {len(rows)} usable run(s) (status done); "
                           f"a fit needs at least {min_points}")
    return rows


def load_results(path, *, min_points: int = 3, skipped: list | None = None) -> list[dict]:
    """Read a results table (.csv, or .jsonl/.json lines) and validate it (`validate_rows`).

    Returns one dict per fitted run with numeric columns as floats, kind in {dense, moe},
    held_out as bool, sparsity filled in. Raises ResultsError (a ValueError) with one line
    naming the file, column and row on any problem; FileNotFoundError if there is no file.
    """
    path = Path(path)
    text = path.read_text()
    src = path.name
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        raw = []
        for ln, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ResultsError(f"{src}: line {ln} is not JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ResultsError(f"{src}: line {ln} is not a JSON object")
            raw.append(obj)
    else:
        reader = csv.DictReader(text.splitlines())
        raw = [dict(r) for r in reader]
        if reader.fieldnames is None:
            raise ResultsError(f"{src}: the file is empty")
        # csv leaves short rows' tail columns as None: treat that as a missing value.
        for i, r in enumerate(raw):
            for c in REQUIRED_COLUMNS:
                if c in r and r[c] is None:
                    raise ResultsError(f"{_where(src, i, r)}: missing value for column {c!r}")
    return validate_rows(raw, source=src, min_points=min_points, skipped=skipped)


def write_results(rows: Iterable[dict], path) -> Path:
    """Write rows as CSV (or JSONL for a .jsonl path), required columns first."""
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    cols = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if any(c in r for r in rows)]
    cols += sorted({k for r in rows for k in r} - set(cols))
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    return path


def chinchilla_rows(drop_highest: int = 5) -> list[dict]:
    """The Chinchilla points in results-table form: dense, params = N, tokens = D, flops 6ND.

    Embedding and non-embedding counts are both set to N (the digitised data has only N).
    """
    from moe.scaling.fits import load_chinchilla_points

    N, D, L = load_chinchilla_points(drop_highest)
    return [{"name": f"chinchilla_{i:03d}", "kind": "dense", "n_experts": 1.0, "top_k": 1.0,
             "params_total": float(n), "params_active": float(n),
             "params_active_nonembed": float(n), "params_total_nonembed": float(n),
             "tokens": float(d), "flops": float(6 * n * d), "final_eval_loss": float(l),
             "sparsity": 0.0, "held_out": False, "status": "done"}
            for i, (n, d, l) in enumerate(zip(N, D, L))]


def run_group(row: dict) -> str:
    """The sparsity-level label a run is fitted with: its `level` (the ladder's sparsity
    name) when set, else 'dense' or 'moe E{n}k{k}'."""
    if row.get("level"):
        return str(row["level"])
    if row["kind"] == "dense":
        return "dense"
    return f"moe E{int(row['n_experts'])}k{int(row['top_k'])}"
