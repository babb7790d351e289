"""One handler module per event: what a pool does with each event it consumes."""
