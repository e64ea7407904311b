"""The results table: one row per training run, read from CSV or JSONL and validated.

    python -c "from moe.scaling.table import load_results; print(len(load_results('runs/results.csv')))"

Any table with these documented columns can be fitted (`moe-testbed fit TABLE`), whether
this testbed's ladder wrote it or another group published it; `--column NAME=SOURCE` (the
`columns` mapping here) reads a documented column from a differently named one.

    required   final_eval_loss (or `loss`): the run's final evaluation loss
               params_active (or `params`): parameters used per token, embeddings included
               tokens: training tokens D (or give `flops` and tokens are C / (6 N_active))
    optional   name (default row<i>), kind (dense|moe; default moe when n_experts > 1),
               n_experts, top_k (default 1: dense), params_total (default params_active;
               required for moe rows), params_active_nonembed, params_total_nonembed (the
               Kaplan counting convention is fitted only when these are present), flops
               (default 6 N_active D), error (downstream error rate in (0, 1), for the
               downstream law), sparsity (a number, default 1 - top_k/n_experts for moe and
               0 for dense; or a level name, as moe/scaling/ladder/results.py writes, used to group
               runs), maxvio, held_out (bool), status (only "done" or empty rows are
               fitted), group ("grid" or empty rows are fitted; "compare" rows are the
               ladder's fixed-size variants and "seed" rows its seed repeats, both reported
               beside the fits, never fitted), repeat_of (the grid run a seed row repeats),
               seed, epochs (tokens / the corpus' training tokens: passes over the data;
               runs above 1 are flagged in the report, repeated data bends the curve)

Sizes come from the run's config; the fits never re-derive them. Validation happens here,
before any fitting, and fails with one line naming the file, the column and the row: a fit
that silently drops a NaN or fits a single point produces a number that looks like a
result.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable

__all__ = ["ALIASES", "ResultsError", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS", "load_results",
           "map_columns", "validate_rows", "write_results", "chinchilla_rows", "run_group"]

#: Columns every table needs (after aliases and --column mappings; tokens may come from flops).
REQUIRED_COLUMNS = ("params_active", "tokens", "final_eval_loss")
#: Documented optional columns, in the order write_results puts them after the required ones.
OPTIONAL_COLUMNS = ("name", "kind", "n_experts", "top_k", "params_total",
                    "params_active_nonembed", "params_total_nonembed", "flops", "error",
                    "sparsity", "maxvio", "held_out", "status", "group", "repeat_of", "seed",
                    "flop_budget", "size", "epochs")
#: Built-in aliases: documented column <- column read when the documented one is absent.
ALIASES = {"final_eval_loss": "loss", "params_active": "params"}

# Columns that must be finite and > 0 wherever present (logs are taken of all of them).
_POSITIVE = ("params_total", "params_active", "params_active_nonembed",
             "params_total_nonembed", "tokens", "flops", "final_eval_loss", "flop_budget")
_KNOWN_GROUPS = ("grid", "compare", "seed")
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


def map_columns(raw_rows: list[dict], columns: dict | None = None, *,
                source: str = "results") -> list[dict]:
    """Copy each row with documented columns filled from `columns` (documented -> source
    column) and the built-in ALIASES. A mapping naming a column the table lacks, or a
    documented column it does not know, raises ResultsError naming it."""
    columns = dict(columns or {})
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    for dst, src in columns.items():
        if dst not in known:
            raise ResultsError(f"--column {dst}={src}: {dst!r} is not a documented column "
                               f"(documented: {', '.join(sorted(known))})")
    present = set().union(*(r.keys() for r in raw_rows)) if raw_rows else set()
    for dst, src in columns.items():
        if src not in present:
            raise ResultsError(f"{source}: --column {dst}={src}: the table has no column {src!r}")
    for dst, src in ALIASES.items():
        if dst not in present and dst not in columns and src in present:
            columns[dst] = src
    if not columns:
        return list(raw_rows)
    return [{**r, **{dst: r.get(src) for dst, src in columns.items()}} for r in raw_rows]


def validate_rows(raw_rows: Iterable[dict], *, source: str = "results",
                  min_points: int = 3, skipped: list | None = None,
                  columns: dict | None = None, side: dict | None = None) -> list[dict]:
    """Type-convert and validate raw rows (dicts of strings or numbers); return fit rows.

    Rows whose status is set and not "done" are skipped (a run still training has no final
    loss), and so are rows whose `group` column is set and not "grid"; (name, reason) pairs
    are appended to `skipped` if given. Done rows of group "compare" (the ladder's
    fixed-size variants) and "seed" (seed repeats of a grid run, `repeat_of`) are validated
    the same way and collected in `side["compare"]` / `side["seed"]` when `side` is a dict.
    A non-numeric `sparsity` (the ladder writes the level's name) becomes the row's `level`,
    the label it is grouped by; the numeric sparsity is then 1 - top_k/n_experts.
    Documented columns missing from the table are filled by the defaults of the module
    docstring. Raises ResultsError naming the column and row for: a missing required
    column, a non-numeric / NaN / inf / non-positive size or loss, an error rate outside
    (0, 1), an unknown kind, top_k > n_experts, active > total params, a moe row without
    params_total, a duplicate name, or fewer than `min_points` usable runs.
    """
    raw_rows = map_columns(list(raw_rows), columns, source=source)
    if not raw_rows:
        raise ResultsError(f"{source}: the table has no rows")
    present = set().union(*(r.keys() for r in raw_rows))
    missing = [c for c in REQUIRED_COLUMNS if c not in present
               and not (c == "tokens" and "flops" in present)]
    if missing:
        alias = {v: k for k, v in ALIASES.items()}
        hint = "; ".join(f"{c} (or {ALIASES[c]!r})" if c in ALIASES else
                         ("tokens (or 'flops')" if c == "tokens" else c) for c in missing)
        raise ResultsError(f"{source}: missing required column(s) {', '.join(map(repr, missing))}"
                           f" - need {hint}; map another column with --column NAME=SOURCE"
                           + (f" (present: {', '.join(sorted(present - set(alias)))})"
                              if len(present) <= 40 else ""))
    rows, seen = [], {}
    for i, raw in enumerate(raw_rows):
        status = str(raw.get("status") or "").strip().lower()
        group = str(raw.get("group") or "").strip().lower()
        if status not in ("", "done"):
            if skipped is not None:
                skipped.append((str(raw.get("name") or f"row{i + 1}"), f"status {status!r}"))
            continue
        if group not in ("", "grid"):
            # The ladder's fixed-size comparison variants (balancing, MTP, ...) and seed
            # repeats share a size and sparsity with a grid run; fitting both would weight
            # that point twice (with two recipes, or one run counted twice). They are
            # reported beside the fits, not fitted.
            if skipped is not None:
                skipped.append((str(raw.get("name") or f"row{i + 1}"),
                                f"group {group!r} (not a grid run)"))
            if side is not None and group in _KNOWN_GROUPS:
                side.setdefault(group, []).append(_validate_row(raw, i, source, status))
            continue
        row = _validate_row(raw, i, source, status)
        if row["name"] in seen:
            raise ResultsError(f"{_where(source, i, raw)}: duplicate name "
                               f"(also row {seen[row['name']] + 1})")
        seen[row["name"]] = i
        rows.append(row)
    if len(rows) < min_points:
        raise ResultsError(f"{source}: only {len(rows)} usable run(s) (status done); "
                           f"a fit needs at least {min_points}")
    return rows


def _validate_row(raw: dict, i: int, source: str, status: str) -> dict:
    """One row: documented columns converted, defaults filled, checked (ResultsError)."""
    where = _where(source, i, raw)
    for c in REQUIRED_COLUMNS:
        v = raw.get(c)
        if c == "tokens" and (v is None or v == "") and raw.get("flops") not in (None, ""):
            continue  # derived from flops below
        if c not in raw or v is None:
            raise ResultsError(f"{where}: missing value for column {c!r}")
    row = dict(raw)
    row["name"] = str(raw.get("name") if raw.get("name") is not None else f"row{i + 1}").strip()
    if not row["name"]:
        raise ResultsError(f"{where}: column 'name' is empty")
    level = ""
    if isinstance(raw.get("sparsity"), str):
        try:
            float(raw["sparsity"]) if raw["sparsity"].strip() else None
        except ValueError:
            # The ladder writes its sparsity level's NAME here (e.g. "e8k2"): keep it as
            # the label runs are grouped by; the number is derived below.
            level = raw["sparsity"].strip()
    for c in _POSITIVE + ("n_experts", "top_k", "sparsity", "maxvio", "error", "epochs"):
        if c not in raw or (c == "sparsity" and level):
            continue
        try:
            v = _to_float(raw[c])
        except (TypeError, ValueError):
            raise ResultsError(f"{where}: column {c!r} is not a number: {raw[c]!r}") from None
        if math.isnan(v) and (c not in REQUIRED_COLUMNS or c == "tokens" and "flops" in raw):
            row.pop(c, None)  # an empty optional cell (or tokens given as flops): absent
            continue
        if c in _POSITIVE and not (math.isfinite(v) and v > 0):
            what = "NaN/empty" if math.isnan(v) else ("inf" if math.isinf(v) else str(v))
            raise ResultsError(f"{where}: column {c!r} is {what}; it must be finite and > 0")
        if c == "epochs" and not (math.isfinite(v) and v >= 0):
            raise ResultsError(f"{where}: column 'epochs' is {raw[c]!r}; it must be finite "
                               "and >= 0")
        if c == "error" and not 0.0 < v < 1.0:
            raise ResultsError(f"{where}: column 'error' is {raw[c]!r}; it must be an error "
                               "rate in (0, 1)")
        row[c] = v
    if "tokens" not in row or not math.isfinite(row.get("tokens", math.nan)):
        if "flops" not in row or not math.isfinite(row.get("flops", math.nan)):
            raise ResultsError(f"{where}: missing value for column 'tokens' (and no 'flops' "
                               "to derive it from)")
        row["tokens"] = row["flops"] / (6.0 * row["params_active"])
    if not math.isfinite(row.get("flops", math.nan)):
        row["flops"] = 6.0 * row["params_active"] * row["tokens"]
    for c in ("n_experts", "top_k"):
        v = row.get(c, math.nan)
        if math.isnan(v):
            row[c] = 1.0  # absent or empty: dense (a moe row is checked below)
            continue
        if not math.isfinite(v) or v < 0 or v != int(v):
            raise ResultsError(f"{where}: column {c!r} is {raw[c]!r}; it must be an integer >= 0")
    kind = str(raw.get("kind") or ("moe" if row["n_experts"] > 1 else "dense")).strip().lower()
    if kind not in ("dense", "moe"):
        raise ResultsError(f"{where}: column 'kind' is {raw['kind']!r}; allowed: dense, moe")
    row["kind"] = kind
    if kind == "dense":
        row["n_experts"], row["top_k"] = max(1.0, row["n_experts"]), max(1.0, row["top_k"])
    else:
        if row["n_experts"] < 2:
            raise ResultsError(f"{where}: a moe run needs n_experts >= 2, got "
                               f"{raw.get('n_experts')!r}")
        if not 1 <= row["top_k"] <= row["n_experts"]:
            raise ResultsError(f"{where}: column 'top_k' is {raw.get('top_k')!r}; it must be in "
                               f"[1, n_experts={int(row['n_experts'])}]")
    if not math.isfinite(row.get("params_total", math.nan)):
        if kind == "moe":
            raise ResultsError(f"{where}: a moe run needs column 'params_total' (total "
                               "parameters, all experts)")
        row["params_total"] = row["params_active"]
    if "params_active_nonembed" in row and "params_total_nonembed" not in row:
        if kind == "moe":
            raise ResultsError(f"{where}: column 'params_total_nonembed' is missing while "
                               "'params_active_nonembed' is given")
        row["params_total_nonembed"] = row["params_active_nonembed"]
    for a, t in (("params_active", "params_total"),
                 ("params_active_nonembed", "params_total_nonembed")):
        if a in row and row[a] > row[t] * (1 + 1e-9):
            raise ResultsError(f"{where}: column {a!r} ({row[a]:.6g}) exceeds {t!r} ({row[t]:.6g})")
    if level or not math.isfinite(row.get("sparsity", math.nan)):
        row["sparsity"] = 0.0 if kind == "dense" else 1.0 - row["top_k"] / row["n_experts"]
    row["level"] = level or str(raw.get("level") or "").strip()
    try:
        row["held_out"] = _to_bool(raw.get("held_out"))
    except ValueError:
        raise ResultsError(f"{where}: column 'held_out' is {raw['held_out']!r}; "
                           "use true/false") from None
    row["status"] = status or "done"
    return row


def load_results(path, *, min_points: int = 3, skipped: list | None = None,
                 columns: dict | None = None, side: dict | None = None) -> list[dict]:
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
    return validate_rows(raw, source=src, min_points=min_points, skipped=skipped,
                         columns=columns, side=side)


def write_results(rows: Iterable[dict], path) -> Path:
    """Write rows as CSV (or JSONL for a .jsonl path), required columns first."""
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    cols = (["name"] if any("name" in r for r in rows) else []) + list(REQUIRED_COLUMNS)
    cols += [c for c in OPTIONAL_COLUMNS if c not in cols and any(c in r for r in rows)]
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
    from moe.scaling.laws.chinchilla import load_chinchilla_points

    from moe.scaling.laws.isoflop import CHINCHILLA_ISOFLOP_BUDGETS, DEFAULT_RTOL

    def budget(c):
        # The figure also holds approach-1 runs between the nine IsoFLOP budgets: only runs
        # within a factor (1 + rtol) of a budget belong to its profile (as fit_isoflop's
        # `nominal` rule); the rest get no flop_budget.
        near = min(CHINCHILLA_ISOFLOP_BUDGETS, key=lambda b: abs(math.log(c / b)))
        return near if abs(math.log(c / near)) <= math.log1p(DEFAULT_RTOL) else ""

    N, D, L = load_chinchilla_points(drop_highest)
    return [{"name": f"chinchilla_{i:03d}", "kind": "dense", "n_experts": 1.0, "top_k": 1.0,
             "params_total": float(n), "params_active": float(n),
             "params_active_nonembed": float(n), "params_total_nonembed": float(n),
             "tokens": float(d), "flops": float(6 * n * d), "final_eval_loss": float(l),
             "flop_budget": budget(6 * n * d), "sparsity": 0.0, "held_out": False,
             "status": "done"}
            for i, (n, d, l) in enumerate(zip(N, D, L))]


def run_group(row: dict) -> str:
    """The sparsity-level label a run is fitted with: its `level` (the ladder's sparsity
    name) when set, else 'dense' or 'moe E{n}k{k}'."""
    if row.get("level"):
        return str(row["level"])
    if row["kind"] == "dense":
        return "dense"
    return f"moe E{int(row['n_experts'])}k{int(row['top_k'])}"
