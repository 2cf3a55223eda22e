"""Request bodies: read once, parsed and validated in one pass (pydantic-core's JSON parser), errors as 400s.

Routes parse bodies themselves instead of letting FastAPI do it, so that a wrong type is a 400 in the OpenAI
shape (never FastAPI's 422) and JSON never goes through the slower stdlib parser. ``body_schema`` puts the
model into the OpenAPI document all the same.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.server.http.errors import from_validation_error

M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, model: type[M]) -> M:
    raw = await request.body()
    if not raw.strip():
        raise InvalidRequestError(f"request body is empty; send a JSON object ({model.__name__})")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose body is ``model``; app.py registers the component schemas."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}
