"""Entrypoints for `ray job submit` and the k8s/ RayJobs: batch evaluation and the TPOT sweep drive the running
application over its HTTP API; ingestion embeds through Ray Data and publishes a knowledge-base snapshot."""
