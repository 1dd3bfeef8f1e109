"""Check a response against the checked-in OpenAPI document."""

from __future__ import annotations

import json
import re
from typing import Any

from openapi_schema_validator import OAS30Validator

from modelfn.runtime.http import openapi_document

DOC = openapi_document()


def operation(method: str, path: str) -> dict[str, Any]:
    for template, item in DOC["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in item:
            return item[method.lower()]
    raise AssertionError(f"{method} {path} is not in the OpenAPI document")


def check_response(method: str, path: str, status: int, body: str) -> Any:
    """Assert the status is documented for the operation and the body fits its schema."""
    op = operation(method, path)
    assert str(status) in op["responses"], f"{method} {path}: {status} is not documented"
    content = op["responses"][str(status)]["content"]["application/json"]["schema"]
    doc = json.loads(body)
    OAS30Validator({**content, "components": DOC["components"]}).validate(doc)
    return doc
