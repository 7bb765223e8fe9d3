"""One error hierarchy for the whole project, mapped to gRPC status codes in one place.

Core code raises these; servicers (adapters) translate them with ``grpc_status_for``.
The core never imports grpc.
"""
from __future__ import annotations


class ServingError(Exception):
    """Base class. ``code`` names the gRPC status code the error maps to."""

    code = "INTERNAL"


class InvalidInput(ServingError):
    code = "INVALID_ARGUMENT"


class NotFound(ServingError):
    code = "NOT_FOUND"


class Unavailable(ServingError):
    code = "UNAVAILABLE"


class Shed(ServingError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineMissed(ServingError):
    code = "DEADLINE_EXCEEDED"


class SpecError(ValueError):
    """A pipeline spec, plan file or profile is invalid. The message names the field."""

    def __init__(self, source: str, field: str, problem: str) -> None:
        self.source = source
        self.field = field
        self.problem = problem
        super().__init__(f"{source}: field '{field}': {problem}")
