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


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "model", "any"}


def _is_union_tag(part: int | str) -> bool:
    # pydantic puts the member type of a union ("str", "list[str]") into an error's loc.
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS or part.startswith("function-"))


def _split_loc(loc: tuple[int | str, ...]) -> tuple[tuple[int | str, ...], str | None]:
    for i, part in enumerate(loc):
        if _is_union_tag(part):
            return loc[:i], str(part)
    return loc, None


def _loc_to_param(loc: tuple[int | str, ...]) -> str:
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        else:
            param += f".{part}" if param else str(part)
    return param


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def from_validation_error(exc: ValidationError) -> OpenAIError:
    """Turn pydantic's first error into a 400 naming the parameter."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    kind = err["type"]
    if kind == "json_invalid":
        return invalid(f"request body is not valid JSON: {err['msg']}", code="invalid_json")
    if kind in ("model_type", "model_attributes_type", "dict_type") and not err["loc"]:
        return invalid("request body must be a JSON object", code="invalid_json")
    loc, tag = _split_loc(tuple(err["loc"]))
    param = _loc_to_param(loc)
    if kind == "extra_forbidden":
        return invalid(f"Unrecognized request argument supplied: {param}", param=param,
                       code="unrecognized_argument")
    if kind == "missing":
        return invalid(f"'{param}' is a required parameter", param=param, code="missing_required_parameter")
    if tag is not None:  # a union: name every accepted type
        tags = list(dict.fromkeys(t for e in errors for p, t in [_split_loc(tuple(e["loc"]))] if p == loc and t))
        return invalid(f"invalid value for '{param}': expected {' or '.join(tags)} (got {_shown(err.get('input'))})",
                       param=param, code="invalid_type")
    return invalid(f"invalid value for '{param}': {err['msg']} (got {_shown(err.get('input'))})", param=param,
                   code="invalid_type" if kind.endswith("_type") else "invalid_value")
