"""simsearch: image similarity search with ResNet embeddings, FAISS and SQLite."""

__version__ = "0.1.0"
