-- Long-term coach memory. The embedding column is an untyped `vector`: its dimension is a setting
-- (COACHD_EMBEDDING_DIM), recorded in coach_memory_settings on the first start, which then also
-- creates the HNSW index on `embedding::vector(n)` and a check on vector_dims (see memory::pg).
create table coach_memory (
    id uuid primary key,
    user_id text not null,
    coach_id text not null,
    memory_type text not null,
    content text not null,
    -- sha-256 of content: the de-duplication key, small whatever the length of the text.
    content_hash bytea not null,
    metadata jsonb not null default '{}'::jsonb,
    embedding vector not null,
    created_at timestamptz not null default now()
);

-- An exact duplicate of a memory is stored once (insert ... on conflict do nothing).
create unique index coach_memory_dedup on coach_memory (user_id, coach_id, memory_type, content_hash);

-- Lists (newest first), clears, erasures, and the exact per-user search that backs up the HNSW scan.
create index coach_memory_owner on coach_memory (user_id, coach_id, created_at desc, id desc);

-- One row: the embedding dimension and model this database holds.
create table coach_memory_settings (
    singleton boolean primary key default true check (singleton),
    embedding_dim integer not null check (embedding_dim between 1 and 2000),
    embedding_model text not null,
    created_at timestamptz not null default now()
);
