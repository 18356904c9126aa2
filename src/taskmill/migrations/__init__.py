"""Alembic migrations of taskmill's schema."""
