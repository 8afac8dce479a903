"""Bounded load tests against a local cluster on 127.0.0.1 (see README.md here)."""
