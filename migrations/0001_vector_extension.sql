-- pgvector powers coach memory (semantic search over embeddings).
create extension if not exists vector;
