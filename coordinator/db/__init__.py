"""The coordinator database: typed models, engine set-up and Alembic migrations."""
