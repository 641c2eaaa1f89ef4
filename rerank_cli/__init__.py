"""The ``rerank`` command line."""
