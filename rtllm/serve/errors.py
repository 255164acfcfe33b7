"""Errors in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class OpenAIError(Exception):
    """An error answered to the client with ``status`` and OpenAI's error body.

    Attributes:
        message: What went wrong, for a person.
        status: HTTP status code.
        type: OpenAI's error type (``invalid_request_error``, ``server_error``, ...).
        param: The request parameter at fault, if any.
        code: A machine-readable code (e.g. ``model_not_found``), if any.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    """A 400 ``invalid_request_error``."""
    return OpenAIError(message, status=400, param=param, code=code)


def unsupported(param: str, what: str | None = None) -> OpenAIError:
    """A 400 for a parameter the engine does not support yet."""
    detail = what or f"'{param}'"
    return OpenAIError(
        f"{detail} is not supported by this server yet; leave '{param}' unset (or null)",
        status=400,
        param=param,
        code="unsupported_parameter",
    )


def _loc_to_param(loc: tuple[int | str, ...]) -> str:
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        else:
            param += f".{part}" if param else str(part)
    return param


def from_validation_error(exc: ValidationError) -> OpenAIError:
    """Turn pydantic's first error into a 400 naming the parameter."""
    err = exc.errors(include_url=False)[0]
    kind = err["type"]
    if kind == "json_invalid":
        return invalid(f"request body is not valid JSON: {err['msg']}", code="invalid_json")
    if kind in ("model_type", "model_attributes_type", "dict_type") and not err["loc"]:
        return invalid("request body must be a JSON object", code="invalid_json")
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    param = _loc_to_param(loc)
    if kind == "extra_forbidden":
        return invalid(f"Unrecognized request argument supplied: {param}", param=param,
                       code="unrecognized_argument")
    if kind == "missing":
        return invalid(f"'{param}' is a required parameter", param=param, code="missing_required_parameter")
    given = err.get("input")
    shown = repr(given) if len(repr(given)) <= 80 else repr(given)[:77] + "..."
    return invalid(f"invalid value for '{param}': {err['msg']} (got {shown})", param=param,
                   code="invalid_type" if kind.endswith("_type") else "invalid_value")
