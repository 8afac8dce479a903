"""Retrieval for the cloud tier: embedder, chunking, corpora, knowledge base store and vector index."""
