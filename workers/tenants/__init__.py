"""Tenants: the registry, their data keys, purge dates, exports and the download endpoint."""
