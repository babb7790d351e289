"""Who consumes: the worker pools, their machinery, and the domain packages their handlers call."""
