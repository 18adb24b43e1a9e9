"""Persistence: the catalog database, the feature stores and the FAISS vector index.

One id space: the catalog's integer image id is the FAISS id and the feature-store key.
"""
