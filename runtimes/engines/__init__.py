"""The engines: a backend per target runtime and their common base."""
