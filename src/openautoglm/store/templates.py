"""Named, versioned prompt templates. Versions are immutable: saving a template under an existing name adds the
next version; a request names a version or gets the latest."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Integer, String, Text, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from openautoglm.protocol.errors import InvalidRequestError, NotFoundError
from openautoglm.store.db import Database
from openautoglm.store.models import Base, now_ts


class PromptTemplateRow(Base):
    __tablename__ = "prompt_templates"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    template: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    variables: Mapped[str] = mapped_column(Text)  # JSON list of the variable names the template uses
    created_at: Mapped[str] = mapped_column(String(32))
    created_by: Mapped[str] = mapped_column(String(200))


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    name: str
    version: int
    template: str
    description: str | None
    variables: list[str]
    created_at: str
    created_by: str

    def public(self, *, with_text: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not with_text:
            out.pop("template")
        return out


def _from_row(row: PromptTemplateRow) -> PromptTemplate:
    return PromptTemplate(
        row.name, row.version, row.template, row.description, json.loads(row.variables), row.created_at, row.created_by
    )


class PromptTemplateRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add_version(
        self, name: str, template: str, variables: list[str], *, description: str | None, created_by: str
    ) -> PromptTemplate:
        """Store ``template`` as the next version of ``name`` (1 for a new name)."""
        try:
            with self.db.session() as s:
                latest = s.scalar(select(func.max(PromptTemplateRow.version)).where(PromptTemplateRow.name == name))
                row = PromptTemplateRow(
                    name=name,
                    version=(latest or 0) + 1,
                    template=template,
                    description=description,
                    variables=json.dumps(variables),
                    created_at=now_ts(),
                    created_by=created_by,
                )
                s.add(row)
                s.flush()
                return _from_row(row)
        except IntegrityError as exc:  # two writers took the same version number at once
            raise InvalidRequestError(
                f"template {name!r} was changed concurrently; save it again", param="name"
            ) from exc

    def get(self, name: str, version: int | None = None) -> PromptTemplate:
        with self.db.session() as s:
            query = select(PromptTemplateRow).where(PromptTemplateRow.name == name)
            query = query.where(PromptTemplateRow.version == version) if version is not None else query
            row = s.scalars(query.order_by(PromptTemplateRow.version.desc()).limit(1)).first()
            if row is None:
                which = f"version {version} of " if version is not None else ""
                raise NotFoundError(
                    f"no prompt template {which}{name!r}", param="prompt_template.name", code="template_not_found"
                )
            return _from_row(row)

    def list(self, name: str | None = None) -> Sequence[PromptTemplate]:
        """Every version of ``name``, or the latest version of every template."""
        with self.db.session() as s:
            if name is not None:
                query = select(PromptTemplateRow).where(PromptTemplateRow.name == name)
                return [_from_row(r) for r in s.scalars(query.order_by(PromptTemplateRow.version))]
            latest = (
                select(PromptTemplateRow.name, func.max(PromptTemplateRow.version).label("v"))
                .group_by(PromptTemplateRow.name)
                .subquery()
            )
            query = select(PromptTemplateRow).join(
                latest, (PromptTemplateRow.name == latest.c.name) & (PromptTemplateRow.version == latest.c.v)
            )
            return [_from_row(r) for r in s.scalars(query.order_by(PromptTemplateRow.name))]
