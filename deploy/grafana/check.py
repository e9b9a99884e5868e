#!/usr/bin/env python3
"""Checks the Grafana dashboard (deploy/grafana/callapi-dashboard.json) offline.

- it is valid JSON, with panels, and every panel id is unique (rows and panels inside rows too);
- every panel other than a row has a gridPos, a datasource using the `${datasource}` variable
  and at least one target with a non-empty `expr` (targets naming a datasource use it too);
- every metric a query uses (tokens starting `callapi_`, with `_bucket`, `_sum` and `_count`
  stripped), in panel targets and in the template variables' queries, is listed in
  docs/operations.md's metrics table (the one under "Metrics (all prefixed `callapi_`)", where
  names are written without the prefix, one or more per row).

Prints what it checked; exits 1 with one line per problem otherwise. Python 3.11, stdlib only.

    python3 deploy/grafana/check.py [--dashboard PATH] [--docs PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_DASHBOARD = HERE / "callapi-dashboard.json"
DEFAULT_DOCS = REPO / "docs" / "operations.md"

DATASOURCE_REFS = {"${datasource}", "$datasource"}
TABLE_HEADING = "Metrics (all prefixed `callapi_`)"
PREFIX = "callapi_"
METRIC_TOKEN = re.compile(r"(?<![A-Za-z0-9_:])callapi_[A-Za-z0-9_:]+")
SUFFIXES = ("_bucket", "_sum", "_count")


class Failed(Exception):
    """A problem that stops the check before the others can run."""


def documented_metrics(docs: Path) -> set[str]:
    """The metric names (with the `callapi_` prefix) in the table under TABLE_HEADING."""
    try:
        lines = docs.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise Failed(f"cannot read {docs}: {err}") from err
    start = next((i for i, line in enumerate(lines) if TABLE_HEADING in line), None)
    if start is None:
        raise Failed(f"{docs}: no line with {TABLE_HEADING!r}: where is the metrics table?")
    names: set[str] = set()
    in_table = False
    for line in lines[start + 1 :]:
        stripped = line.strip()
        if not stripped.startswith("|"):
            if in_table:
                break  # the end of the table
            if stripped:
                raise Failed(f"{docs}: expected the metrics table right after {TABLE_HEADING!r}, found {stripped!r}")
            continue
        cells = [cell.strip() for cell in stripped.strip("|").split("|")]
        if not in_table:
            in_table = True  # the header row
            continue
        if all(re.fullmatch(r":?-+:?", cell) for cell in cells if cell):
            continue  # the separator row
        for name in re.findall(r"`([A-Za-z0-9_:]+)`", cells[0]):
            names.add(name if name.startswith(PREFIX) else PREFIX + name)
    if not names:
        raise Failed(f"{docs}: the metrics table under {TABLE_HEADING!r} lists no metric")
    return names


def all_panels(panels: list) -> list[dict]:
    """Every panel, rows' nested panels (collapsed rows) included."""
    found = []
    for panel in panels:
        if not isinstance(panel, dict):
            continue
        found.append(panel)
        found.extend(all_panels(panel.get("panels") or []))
    return found


def uses_variable(datasource: object) -> bool:
    if isinstance(datasource, dict):
        return datasource.get("uid") in DATASOURCE_REFS
    return datasource in DATASOURCE_REFS


def metrics_in(expr: str) -> set[str]:
    found = set()
    for token in METRIC_TOKEN.findall(expr):
        for suffix in SUFFIXES:
            if token.endswith(suffix):
                token = token[: -len(suffix)]
                break
        found.add(token)
    return found


def check(dashboard_path: Path, docs_path: Path) -> int:
    errors: list[str] = []
    try:
        dashboard = json.loads(dashboard_path.read_text(encoding="utf-8"))
    except OSError as err:
        raise Failed(f"cannot read {dashboard_path}: {err}") from err
    except json.JSONDecodeError as err:
        raise Failed(f"{dashboard_path}: not valid JSON: {err}") from err
    if not isinstance(dashboard, dict) or not isinstance(dashboard.get("panels"), list):
        raise Failed(f"{dashboard_path}: not a dashboard JSON model (no `panels` list)")
    print(f"dashboard {dashboard_path}: valid JSON, title {dashboard.get('title')!r}, uid {dashboard.get('uid')!r}")

    variables = {v.get("name"): v for v in (dashboard.get("templating") or {}).get("list", []) if isinstance(v, dict)}
    ds_var = variables.get("datasource")
    if not ds_var or ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
        errors.append("template variable `datasource` missing, or not of type datasource over prometheus")

    panels = all_panels(dashboard["panels"])
    ids: dict[object, str] = {}
    used: dict[str, list[str]] = {}  # metric -> where it is used
    rows = queried = n_targets = 0
    for panel in panels:
        title = panel.get("title") or "(untitled)"
        pid = panel.get("id")
        where = f"panel {pid} {title!r}"
        if not isinstance(pid, int):
            errors.append(f"{where}: no integer id")
        elif pid in ids:
            errors.append(f"{where}: id {pid} also used by {ids[pid]!r}")
        else:
            ids[pid] = title
        grid = panel.get("gridPos")
        if not isinstance(grid, dict) or not all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")):
            errors.append(f"{where}: no gridPos with integer x, y, w, h")
        elif grid["x"] < 0 or grid["w"] <= 0 or grid["x"] + grid["w"] > 24:
            errors.append(f"{where}: gridPos outside the 24 columns: {grid}")
        if panel.get("type") == "row":
            rows += 1
            continue
        queried += 1
        if not uses_variable(panel.get("datasource")):
            errors.append(f"{where}: datasource {panel.get('datasource')!r} does not use ${{datasource}}")
        targets = panel.get("targets")
        if not isinstance(targets, list) or not targets:
            errors.append(f"{where}: no targets")
            continue
        for target in targets:
            ref = target.get("refId", "?")
            if "datasource" in target and not uses_variable(target["datasource"]):
                errors.append(f"{where} target {ref}: datasource {target['datasource']!r} does not use ${{datasource}}")
            expr = target.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                errors.append(f"{where} target {ref}: no expr")
                continue
            n_targets += 1
            for metric in metrics_in(expr):
                used.setdefault(metric, []).append(where)
    for name, variable in variables.items():
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        for metric in metrics_in(str(query or "")):
            used.setdefault(metric, []).append(f"variable {name!r}")

    print(f"panels: {len(panels)} ({rows} rows, {queried} with queries), ids unique: {'yes' if len(ids) == len(panels) else 'NO'}")
    print(f"datasource and targets checked on the {queried} panels with queries: {n_targets} queries in all")

    documented = documented_metrics(docs_path)
    print(f"docs {docs_path}: {len(documented)} metrics in the table under {TABLE_HEADING!r}")
    for metric in sorted(used):
        ok = metric in documented
        uses = len(used[metric])
        print(f"  {'ok     ' if ok else 'UNKNOWN'} {metric} ({uses} use{'' if uses == 1 else 's'})")
        if not ok:
            errors.append(
                f"metric {metric} is not in {docs_path.name}'s metrics table "
                f"(used by {', '.join(sorted(set(used[metric])))})"
            )
    if not used:
        errors.append("no query uses any callapi_ metric")

    if errors:
        print(f"FAILED: {len(errors)} problem(s) with {dashboard_path}:", file=sys.stderr)
        for error in errors:
            print(f"  - {error}", file=sys.stderr)
        return 1
    print(f"OK: {len(used)} metrics used, all documented")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dashboard", type=Path, default=DEFAULT_DASHBOARD, help="the dashboard JSON model")
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="the page with the metrics table")
    args = parser.parse_args()
    try:
        return check(args.dashboard, args.docs)
    except Failed as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
