"""What a request's output must look like: :class:`GuidedDecodingParams`.

The name and the fields follow TensorRT-LLM's ``GuidedDecodingParams`` (``json``,
``regex``, ``grammar``, ``json_object``); ``structural_tag`` is not supported yet.
Exactly one kind of guide is set per request. The parameters are validated here as far
as that is cheap and grammar-independent (types, "exactly one", a JSON schema being JSON);
whether a regex, an EBNF grammar or a JSON schema is *compilable* is only known when
:class:`rtllm.structured.grammar.GrammarBackend` compiles it, which raises a ValueError
naming the field then.
"""

from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass
from typing import Any, Literal

GuideKind = Literal["json", "regex", "grammar", "json_object"]

#: The fields of which exactly one must be set, in the order error messages list them.
GUIDE_FIELDS: tuple[GuideKind, ...] = ("json", "regex", "grammar", "json_object")


def _is_pydantic_model_class(value: Any) -> bool:
    # Imported lazily: pydantic is a dependency, but plain-str users need not pay its import.
    if not isinstance(value, type):
        return False
    try:
        from pydantic import BaseModel
    except ImportError:  # no pydantic installed: nothing can be a pydantic model
        return False

    return issubclass(value, BaseModel)


def _schema_to_str(value: Any) -> str:
    """Normalise ``json`` to a compact JSON schema string (ValueError if it is not one).

    The string form makes the frozen dataclass hashable and is the key of the grammar
    compiler's cache, so equal schemas given as a dict or as a string share one compiled
    grammar. Key order is preserved (never sorted): the grammar emits object properties
    in the schema's declared order.
    """
    if _is_pydantic_model_class(value):
        schema: Any = value.model_json_schema()
    elif isinstance(value, dict):
        schema = value
    elif isinstance(value, str):
        try:
            schema = jsonlib.loads(value)
        except jsonlib.JSONDecodeError as exc:
            raise ValueError(
                f"GuidedDecodingParams.json is not valid JSON ({exc}); expected a JSON schema "
                "as a string, a dict, or a pydantic model class"
            ) from exc
    else:
        raise ValueError(
            "GuidedDecodingParams.json must be a JSON schema given as a str, a dict, or a "
            f"pydantic model class; got {type(value).__name__}"
        )
    if not isinstance(schema, dict):
        raise ValueError(
            "GuidedDecodingParams.json must be a JSON schema object (a JSON/dict mapping), "
            f"got a JSON {type(schema).__name__}"
        )
    try:
        return jsonlib.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"GuidedDecodingParams.json is not JSON-serialisable: {exc}") from exc


@dataclass(frozen=True)
class GuidedDecodingParams:
    """Constrain a request's output to a JSON schema, a regex or an EBNF grammar.

    Exactly one of the fields must be set.

    Attributes:
        json: A JSON schema the output must validate against: a JSON string, a dict, or a
            pydantic model class. Normalised at construction to a compact JSON string
            (property order kept), so after ``__init__`` it is always ``str | None``.
        regex: A regular expression the whole output must match (xgrammar's regex dialect,
            close to ECMAScript/Python: classes, ``\\d``, ``{m,n}``, groups, alternation).
        grammar: An EBNF grammar in xgrammar's GBNF syntax (llama.cpp style, root rule
            ``root``), e.g. ``root ::= "yes" | "no"``.
        json_object: If True, the output is any JSON object (``{...}``), no schema.

    Raises:
        ValueError: if not exactly one field is set, a field has the wrong type, or
            ``json`` is not a JSON object. The message names the field and the choices.
    """

    json: str | dict[str, Any] | type | None = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.json_object, bool):
            raise ValueError(
                f"GuidedDecodingParams.json_object must be a bool, got {self.json_object!r}"
            )
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(
                    f"GuidedDecodingParams.{name} must be a non-empty str, got {value!r}"
                )
        chosen = [name for name in GUIDE_FIELDS if self._is_set(name)]
        if len(chosen) != 1:
            got = "none" if not chosen else " and ".join(chosen)
            raise ValueError(
                "GuidedDecodingParams needs exactly one of "
                f"{', '.join(GUIDE_FIELDS)} (json_object=True counts as set); got {got}"
            )
        if self.json is not None:
            # Frozen dataclass: normalise through object.__setattr__ (only done here).
            object.__setattr__(self, "json", _schema_to_str(self.json))

    def _is_set(self, name: str) -> bool:
        value = getattr(self, name)
        return value is True if name == "json_object" else value is not None

    @property
    def kind(self) -> GuideKind:
        """Which guide is set: ``"json"``, ``"regex"``, ``"grammar"`` or ``"json_object"``."""
        for name in GUIDE_FIELDS:
            if self._is_set(name):
                return name
        raise AssertionError("unreachable: __post_init__ enforces exactly one field")

    @property
    def spec(self) -> str:
        """The guide's text: the schema string, the regex or the grammar (``""`` for
        ``json_object``). ``(kind, spec)`` identifies the compiled grammar."""
        if self.kind == "json_object":
            return ""
        value = getattr(self, self.kind)
        assert isinstance(value, str)  # json was normalised to str in __post_init__
        return value
