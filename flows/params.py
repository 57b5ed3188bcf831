"""Orchestration: the types of flow parameters as operators see them in the Prefect run form.

Prefect builds each deployment's form from the flow's signature (types, bounds) and the
docstring's ``Args:`` section (descriptions; Prefect drops a description given in an
``Annotated`` Field). An optional value (``str | None``) would show as a choice of types, one
of them "None"; ``Optional`` below shows the plain type instead, and a field left empty still
means None (the default). tests/test_operator_forms.py reads every deployment's schema.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, WithJsonSchema


def _plain(schema: dict[str, Any]) -> WithJsonSchema:
    return WithJsonSchema(schema)


# The gravl-dr config file; empty: $GRAVL_DR_CONFIG, then ./gravl-dr.yaml in the working directory.
ConfigPath = Annotated[str | None, _plain({"type": "string"})]
# A backup id as `gravl-dr list` prints it, or "latest".
BackupRef = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^(latest|[0-9A-Za-z][0-9A-Za-z._-]*)$")
]

BackupKind = Literal["physical", "logical"]

OptionalTime = Annotated[datetime | None, _plain({"type": "string", "format": "date-time"})]
OptionalText = Annotated[str | None, _plain({"type": "string"})]
OptionalTextList = Annotated[list[str] | None, _plain({"type": "array", "items": {"type": "string"}})]


OptionalPort = Annotated[
    int | None, Field(ge=1, le=65535), _plain({"type": "integer", "minimum": 1, "maximum": 65535})
]
