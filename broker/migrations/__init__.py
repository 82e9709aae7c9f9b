"""Sentinel's schema migrations (Alembic). store.migrate() runs them; `encloud sentinel
migrate` runs them by hand. A new migration goes in versions/, never an edit of an old one."""
