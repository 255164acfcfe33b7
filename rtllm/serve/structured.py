"""Structured output in OpenAI requests: ``response_format`` and vLLM's ``guided_*`` options.

Each becomes the engine's :class:`rtllm.structured.GuidedDecodingParams`:

- ``response_format: {"type": "json_object"}`` -> ``json_object=True``;
- ``response_format: {"type": "json_schema", "json_schema": {"name", "schema", ...}}`` and
  ``guided_json`` (a schema as an object or a JSON string) -> ``json=schema``;
- ``guided_regex`` -> ``regex``; ``guided_grammar`` (xgrammar's EBNF) -> ``grammar``;
- ``guided_choice`` (a list of strings) -> an EBNF grammar whose root is the alternation
  of the strings as literals, so the output is exactly one of them.

At most one of them may be given per request. Whether a regex, a grammar or a schema
compiles is only known when the engine compiles it at submission; its ``ValueError``
then names ``GuidedDecodingParams.<field>``, which :func:`guide_param` maps back to the
request parameter.
"""

from __future__ import annotations

from rtllm.serve.errors import invalid
from rtllm.serve.protocol import ChatCompletionRequest, CompletionRequest
from rtllm.structured.params import GuidedDecodingParams

Request = CompletionRequest | ChatCompletionRequest

GUIDE_PARAMS: tuple[str, ...] = (
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)
"""The request parameters that constrain the output, of which at most one is set."""


def _is_set(request: Request, name: str) -> bool:
    value = getattr(request, name)
    if name == "response_format":
        return value is not None and value.type != "text"
    return value is not None


def guide_param(request: Request) -> str | None:
    """The one structured-output parameter of ``request``, None if it has none.

    Raises:
        OpenAIError: (400) two of them are set; the message names both.
    """
    chosen = [name for name in GUIDE_PARAMS if _is_set(request, name)]
    if len(chosen) > 1:
        raise invalid(
            f"{chosen[0]} and {chosen[1]} cannot be used together; give one structured-output "
            f"option ({', '.join(GUIDE_PARAMS)})",
            param=chosen[1],
        )
    return chosen[0] if chosen else None


def _ebnf_literal(text: str) -> str:
    """``text`` as a double-quoted literal of xgrammar's EBNF (GBNF) syntax."""
    out = []
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar matching exactly one of ``choices`` (vLLM's ``guided_choice``)."""
    alternatives = " | ".join(_ebnf_literal(choice) for choice in dict.fromkeys(choices))
    return f"root ::= {alternatives}"


def _response_format_guide(request: Request) -> GuidedDecodingParams | None:
    fmt = request.response_format
    if fmt is None:
        return None
    if fmt.type != "json_schema":
        if fmt.json_schema is not None:
            raise invalid(
                f"response_format.json_schema is only allowed with type 'json_schema', not "
                f"{fmt.type!r}",
                param="response_format.json_schema",
            )
        return GuidedDecodingParams(json_object=True) if fmt.type == "json_object" else None
    if fmt.json_schema is None:
        raise invalid(
            "response_format of type 'json_schema' needs a 'json_schema' object "
            '({"name": ..., "schema": {...}})',
            param="response_format.json_schema",
        )
    if fmt.json_schema.json_schema is None:
        raise invalid(
            "response_format.json_schema needs a 'schema' (the JSON schema of the output)",
            param="response_format.json_schema.schema",
        )
    return GuidedDecodingParams(json=fmt.json_schema.json_schema)


def guided_decoding(request: Request) -> GuidedDecodingParams | None:
    """The engine's guide for ``request`` (None when its output is free text).

    Raises:
        OpenAIError: (400, naming the parameter) two guides, an empty ``guided_choice``,
            or a guide that is not even well-formed (a ``guided_json`` string that is not
            a JSON object, an empty regex, ...).
    """
    param = guide_param(request)
    if param is None:
        _response_format_guide(request)  # {"type": "text"}: its shape is still checked
        return None
    try:
        if param == "response_format":
            return _response_format_guide(request)
        if param == "guided_json":
            return GuidedDecodingParams(json=request.guided_json)
        if param == "guided_regex":
            return GuidedDecodingParams(regex=request.guided_regex)
        if param == "guided_grammar":
            return GuidedDecodingParams(grammar=request.guided_grammar)
        choices = request.guided_choice or []
        if not choices:
            raise invalid("guided_choice must list at least one string", param=param)
        return GuidedDecodingParams(grammar=choice_grammar(choices))
    except ValueError as exc:
        raise invalid(f"invalid {param}: {exc}", param=param) from None
