"""Entrypoints for ``ray job submit``: they drive the running application over its HTTP API."""
