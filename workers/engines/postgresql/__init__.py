"""Everything PostgreSQL-specific: base backups, differentials, WAL, point-in-time restore, dumps, scratch
clusters."""
