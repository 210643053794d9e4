"""Tidy results: every analysis returns a list of dict records (one row each: scalar fields, plus
provenance such as `options` or `versions` as nested dicts), so a notebook can tabulate, filter or
plot them without pandas, and convert them when pandas is installed."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

from scipy.stats import t as student_t

Record = dict[str, Any]


def to_dataframe(records: Sequence[Record] | Sequence[Any] | Mapping[str, Any], *, flatten: bool = False,
                 columns: Sequence[str] | None = None, digits: int | None = None):
    """The records as a pandas DataFrame, one row each (pandas is optional: a clear error if it is
    missing). `records`: dicts (sweeps, `benchmarks.run.rows`), dataclass instances (the leaderboard's
    `Row`), or a result holding them under "rows" (`run_table`'s, `run_planting`'s). `flatten`: nested
    dicts become dotted columns (`target_rate.value`) instead of dict cells. `columns`: these, in
    this order (one no record has is an error naming the fields that exist); `digits`: floats
    rounded for display."""
    try:
        import pandas as pd
    except ImportError as err:
        raise ImportError("to_dataframe needs pandas (`pip install pandas`, or the `notebooks` extra); "
                          "the records are plain dicts") from err  # fmt: skip
    if isinstance(records, Mapping):
        if not isinstance(records.get("rows"), list):
            raise TypeError(f"a result to tabulate needs a 'rows' list; this one has {sorted(records)}")
        records = records["rows"]
    rows = [_record(r) for r in records]
    frame = pd.json_normalize(rows, sep=".") if flatten and rows else pd.DataFrame.from_records(rows)
    if columns is not None:
        if missing := [c for c in columns if c not in frame.columns]:
            raise KeyError(f"no field {missing} in these records; they have {list(frame.columns)}")
        frame = frame[list(columns)]
    return frame if digits is None else frame.round(digits)


def _record(row: Any) -> Record:
    if is_dataclass(row) and not isinstance(row, type):
        return asdict(row)
    if isinstance(row, Mapping):
        return dict(row)
    raise TypeError(f"a record is a dict or a dataclass instance, not a {type(row).__name__}")


def column(records: Iterable[Record], key: str) -> list[Any]:
    """The values of one field, in record order; a clear error names the fields that exist."""
    records = list(records)
    missing = [i for i, r in enumerate(records) if key not in r]
    if missing:
        raise KeyError(f"field {key!r} missing from record {missing[0]}; it has {sorted(records[missing[0]])}")
    return [r[key] for r in records]


def group_mean(
    records: Iterable[Record], by: str | Sequence[str], value: str, confidence: float = 0.95
) -> list[Record]:
    """Mean, standard error and Student-t interval (mean ± t·sem, t for n-1 degrees of freedom:
    honest with 3 seeds, where a normal interval is too narrow) of `value` per group of `by` (e.g.
    over seeds), in first-seen group order; `n` counts the records. One record: NaN sem and bounds."""
    by = (by,) if isinstance(by, str) else tuple(by)
    groups: dict[tuple, list[float]] = {}
    for r in records:
        # None (an undefined ratio, see `metrics.preservation`) averages as NaN: undefined stays undefined
        groups.setdefault(tuple(r[k] for k in by), []).append(math.nan if r[value] is None else float(r[value]))
    out = []
    for key, values in groups.items():
        n = len(values)
        mean = sum(values) / n
        sem = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else math.nan
        half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * sem if n > 1 else math.nan
        out.append({**dict(zip(by, key)), value: mean, f"{value}_sem": sem,
                    f"{value}_low": mean - half, f"{value}_high": mean + half, "n": n})  # fmt: skip
    return out


def where(records: Iterable[Record], predicate: Callable[[Record], bool] | None = None, **equals: Any) -> list[Record]:
    """The records whose fields equal `equals` (and, if given, satisfy `predicate`)."""
    return [r for r in records if all(r.get(k) == v for k, v in equals.items()) and (predicate is None or predicate(r))]


def summarize(
    records: Iterable[Record], by: str | Sequence[str], values: Sequence[str], confidence: float = 0.95
) -> list[Record]:
    """`group_mean` of several fields at once: one row per group of `by` with, per value, the mean
    over the group's records (e.g. seeds), `_sem`, `_low`, `_high`, plus `n` and the `seeds` seen.
    Values missing from the records are skipped."""
    rows = list(records)
    by = (by,) if isinstance(by, str) else tuple(by)
    present = [v for v in values if rows and all(v in r for r in rows)]
    out: list[Record] = []
    for v in present:
        for i, g in enumerate(group_mean(rows, by, v, confidence)):
            if len(out) <= i:
                out.append({k: g[k] for k in by} | {"n": g["n"]})
            out[i].update({k: g[k] for k in (v, f"{v}_sem", f"{v}_low", f"{v}_high")})
    for row in out:
        row["seeds"] = sorted({r.get("seed") for r in rows if all(r[k] == row[k] for k in by)} - {None})
    return out
