"""Files of a load run: per-request records and the plan history.

* records (``--records FILE``): one record per request (:func:`services.loadgen.report.
  request_record`); JSON lines, or CSV when the file name ends in ``.csv`` (empty cell =
  None);
* plan history (``--plan-history FILE``): a JSON list of samples
  (:mod:`services.loadgen.plan_history`). :func:`read_plan_history` also takes a ``--json``
  report (its ``plan_history`` key) or JSON lines.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable, Sequence

from services.loadgen.report import RECORD_FIELDS


def write_records(path: str | Path, records: Iterable[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".csv":
            w = csv.DictWriter(f, fieldnames=list(RECORD_FIELDS), extrasaction="ignore")
            w.writeheader()
            for r in records:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in RECORD_FIELDS})
        else:
            for r in records:
                f.write(json.dumps(r, sort_keys=True) + "\n")
    return path


def _cell(value: str):
    if value == "":
        return None
    if value in ("True", "False"):
        return value == "True"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


_TEXT_FIELDS = {"outcome", "variant_path", "message"}


def _text(key: str, value: str) -> str | None:
    return value if value or key == "message" else None   # a message is "" when there is none


def read_records(path: str | Path) -> list[dict]:
    """Records written by :func:`write_records` (JSON lines or CSV)."""
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".csv":
            return [{k: _text(k, v) if k in _TEXT_FIELDS else _cell(v) for k, v in row.items()}
                    for row in csv.DictReader(f)]
        out = []
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not a JSON record: {exc}") from None
        return out


def write_plan_history(path: str | Path, samples: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(samples), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_plan_history(path: str | Path) -> list[dict]:
    """A plan history file, a ``--json`` report (its ``plan_history``), or JSON lines."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(doc, dict):
        if "plan_history" not in doc:
            raise ValueError(f"{path}: a JSON object without 'plan_history'")
        doc = doc["plan_history"]
    if not isinstance(doc, list):
        raise ValueError(f"{path}: expected a list of plan samples")
    return doc
