"""Alembic environment: runs against the engine medlake hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from medlake.index.schema import metadata

config = context.config
engine = config.attributes.get("engine")
if engine is None:  # `alembic` run from the command line with -x url=...
    engine = create_engine(context.get_x_argument(as_dictionary=True)["url"])

with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
