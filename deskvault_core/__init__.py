"""Configuration, the base error, schedules and log redaction: what every layer may import."""
