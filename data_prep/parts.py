"""The state of an output folder: its plan, which chunks are complete, and what each complete part holds.

Shared by `write` (what is left to do), `merge` (is everything there) and `verify` (does it all agree).
Small files are fetched with a thread pool: on S3 a dataset of ~1,300 parts means ~1,300 GETs.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from data_prep.chunk import ChunkResult
from data_prep.errors import PrepError
from data_prep.plan import Plan
from dip_scale.data.layout import DONE_FILE, INDEX_FILE, PLAN_FILE, part_name
from dip_scale.storage import Store

_DONE_NAME = re.compile(r"^part-(\d{5,})/" + re.escape(DONE_FILE) + "$")
_FETCH_THREADS = 16


def read_plan(out: Store) -> Plan | None:
    """The plan stored in `out`, or None when there is none yet."""
    if not out.exists(PLAN_FILE):
        return None
    return Plan.from_json(out.read_json(PLAN_FILE), out.url_of(PLAN_FILE))


def done_chunks(out: Store) -> set[int]:
    """Chunks whose part folder carries a done.json (complete: index and shards are all in place)."""
    return {int(match.group(1)) for name in out.list("part-") if (match := _DONE_NAME.match(name))}


def _fetch_json(out: Store, names: list[str]) -> list[Any]:
    with ThreadPoolExecutor(_FETCH_THREADS) as pool:
        return list(pool.map(out.read_json, names))


def read_results(out: Store, chunks: list[int]) -> dict[int, ChunkResult]:
    """The completion records of `chunks` (all must be complete)."""
    names = [f"{part_name(c)}/{DONE_FILE}" for c in chunks]
    results = {}
    for chunk, name, obj in zip(chunks, names, _fetch_json(out, names)):
        result = ChunkResult.from_json(obj, out.url_of(name))
        if result.chunk != chunk:
            raise PrepError(f"{out.url_of(name)} records chunk {result.chunk}, expected {chunk}")
        results[chunk] = result
    return results


def read_part_indexes(out: Store, chunks: list[int]) -> dict[int, dict[str, Any]]:
    """Streaming's index.json of each part in `chunks`."""
    names = [f"{part_name(c)}/{INDEX_FILE}" for c in chunks]
    return dict(zip(chunks, _fetch_json(out, names)))


def require_plan(out: Store) -> Plan:
    plan = read_plan(out)
    if plan is None:
        raise PrepError(f"no {PLAN_FILE} in {out.url}: not the output of `dip-prep write`")
    return plan


def missing_chunks(plan: Plan, done: set[int]) -> list[int]:
    return [c for c in range(plan.num_chunks) if c not in done]


def describe_chunks(chunks: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(c) for c in chunks[:limit])
    return shown + (f", ... ({len(chunks)} in all)" if len(chunks) > limit else "")
