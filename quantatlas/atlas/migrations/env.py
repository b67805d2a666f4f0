"""Alembic environment: run programmatically by quantatlas.atlas.db.migrate on a connection
that is already inside a write transaction (so concurrent openers serialise)."""
from alembic import context
from sqlalchemy import text

from quantatlas.atlas.db import VERSION_TABLE
from quantatlas.atlas.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("quantatlas migrations run through quantatlas.atlas.db.migrate (they need a connection)")

if connection.dialect.name == "postgresql":
    # two processes migrating a fresh PostgreSQL ledger at once: the second waits here
    connection.execute(text("SELECT pg_advisory_xact_lock(7260421913)"))

context.configure(connection=connection, target_metadata=Base.metadata, transactional_ddl=True,
                  version_table=VERSION_TABLE, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
