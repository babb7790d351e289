"""Database engines: the interface every engine implements (`base`), the registry that picks one by name,
and one package per engine."""
