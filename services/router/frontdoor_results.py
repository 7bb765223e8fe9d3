"""What the front door makes of a pipeline's result tree: the client's error when a stage
failed (a generic message of its status, never an address from inside the cluster), the
variant path, and the answer's lines (OCR lines with their text, or one line per region).

Messages leave the system at the front door only. What a client reads is written here or
in services/router/frontdoor_plane.py (or is a validation message of
services/common/oip.py about its own request); failure messages from inside the cluster
(they name worker and router addresses) go to the log only."""
from __future__ import annotations

import re

from services.common import oip
from services.common.errors import (DeadlineMissed, InvalidInput, NotFound, ServingError, Shed,
                                    Unavailable)
from services.common.logging import get_logger
from services.gen import pipeserve_pb2 as pb

log = get_logger(__name__)

INTERNAL_MESSAGE = "internal error while serving the request (details in the server log)"
_GENERIC = {
    "DEADLINE_EXCEEDED": "the pipeline could not answer within the request's deadline; dropped",
    "RESOURCE_EXHAUSTED": "the pipeline is over capacity; request shed, retry later",
    "UNAVAILABLE": "a pipeline stage is unavailable; retry later",
    "INVALID_ARGUMENT": "input 'image': the image could not be decoded (corrupt or truncated data)",
    "NOT_FOUND": "unknown model",
}
LEAK = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b|\[[0-9a-fA-F:.]*:[0-9a-fA-F:.]*\]|"
                  r"\b[A-Za-z][\w.-]*:\d{2,5}\b|Traceback|File \"")
"""What a message that must not reach a client looks like: an address or a traceback."""
_STATUS_CODE = {pb.DROPPED_DEADLINE: "DEADLINE_EXCEEDED", pb.SHED: "RESOURCE_EXHAUSTED",
                pb.INVALID: "INVALID_ARGUMENT", pb.UNAVAILABLE: "UNAVAILABLE"}
_ERROR_OF_CODE = {"DEADLINE_EXCEEDED": DeadlineMissed, "RESOURCE_EXHAUSTED": Shed,
                  "INVALID_ARGUMENT": InvalidInput, "UNAVAILABLE": Unavailable, "NOT_FOUND": NotFound}


def client_error(code: str, stage: str = "") -> ServingError:
    """The generic error a client gets for an internal failure of status ``code``; the
    spec's name of the ``stage`` it happened at, when known, is added (never an address)."""
    cls = _ERROR_OF_CODE.get(code)
    if cls is None or code not in _GENERIC:
        return ServingError(INTERNAL_MESSAGE)
    return cls(_GENERIC[code] + (f" (at stage {stage!r})" if stage and code != "NOT_FOUND" else ""))


def _failure_of(result: pb.QueryResult) -> tuple[int, str] | None:
    """The first non-OK status in a result tree, depth first."""
    if result.status != pb.OK:
        return result.status, result.message or pb.QueryStatus.Name(result.status)
    for c in result.children:
        f = _failure_of(c)
        if f is not None:
            return f
    return None


def _failed_stage(result: pb.QueryResult) -> str:
    """The task of the first non-OK result in a result tree, depth first."""
    if result.status != pb.OK:
        return result.task
    for c in result.children:
        t = _failed_stage(c)
        if t:
            return t
    return ""


def failure_error(result: pb.QueryResult) -> ServingError | None:
    """The client's error for a result tree with a failed query (None when every query
    succeeded): the first failure's status as a generic message naming its stage; its
    detail goes to the log (``request_failed_inside``)."""
    failure = _failure_of(result)
    if failure is None:
        return None
    status, message = failure
    code = _STATUS_CODE.get(status, "INTERNAL")
    if code == "INVALID_ARGUMENT" and result.status == pb.OK:
        code = "INTERNAL"   # a crop we made was rejected: our fault, not the client's
    (log.error if code == "INTERNAL" else log.info)(
        "request_failed_inside", status=pb.QueryStatus.Name(status), detail=message)
    return client_error(code, _failed_stage(result))


def variant_path(result: pb.QueryResult) -> str:
    """The variants that served a request: the root's, then its children's (sorted, ``+``)."""
    parts = [result.variant]
    if result.children:
        parts.append("+".join(sorted({c.variant for c in result.children if c.variant})))
    return "/".join(p for p in parts if p)


def has_orientation(spec) -> bool:
    """An ``ocr_lines`` pipeline whose root has a second child: that child classifies each
    line's orientation (pipelines/ocr_tree.yaml: det -> (rec, cls))."""
    return spec.output == "ocr_lines" and len(spec.root.children) > 1


def format_ocr_lines(result: pb.QueryResult, orientation: bool = False) -> list[oip.OcrLine]:
    """One line per detected region: text and confidence from the first child task's
    result, and with ``orientation`` the label and confidence of the second child's
    (``result.children[j * n_regions + i]`` is child task j's result for region i)."""
    lines = []
    n = len(result.regions)
    for i, region in enumerate(result.regions):
        text, conf = ("", 0.0)
        if i < len(result.children) and result.children[i].regions:
            text, conf = result.children[i].regions[0].text, result.children[i].regions[0].confidence
        label, lconf = (None, None)
        if orientation:
            label, lconf = "", 0.0
            if n + i < len(result.children) and result.children[n + i].regions:
                label, lconf = result.children[n + i].regions[0].label, result.children[n + i].regions[0].confidence
        lines.append(oip.OcrLine(text, tuple(region.points), conf, label, lconf))
    return lines


def answer_lines(spec, result: pb.QueryResult, orientation: bool) -> list[oip.OcrLine]:
    """The answer's lines: OCR lines for an ``ocr_lines`` pipeline, else one line per
    region of the root's result (its label or text, its box when it has one, its score)."""
    if spec.output == "ocr_lines":
        return format_ocr_lines(result, orientation)
    return [oip.OcrLine(r.label or r.text, tuple(r.points) if len(r.points) == 8 else (0.0,) * 8, r.score)
            for r in result.regions]
