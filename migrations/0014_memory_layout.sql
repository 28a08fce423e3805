-- Issue 14: the index layout of coach_memory, chosen by measurement at 10k, 100k and 1M rows
-- (BENCHMARKS.md, "Coach memory"). No vector index by default: every search is per (user, coach)
-- pair, an exact scan of that pair's rows through coach_memory_owner with a top-N sort, while every
-- insert into an HNSW graph costs milliseconds of CPU. coachd builds coach_memory_embedding_hnsw at
-- start-up only with COACHD_MEMORY_HNSW=on (and drops it with off), so 0002's note that the first
-- start creates it no longer holds. The tables need no change (0002's btrees serve the exact scan);
-- these comments record the layout where the schema is read.
comment on table coach_memory is
    'Coach memories. Vector index: none by default (exact per-pair scan through coach_memory_owner); '
    'coach_memory_embedding_hnsw exists only with COACHD_MEMORY_HNSW=on, built and dropped by coachd at start-up.';
comment on index coach_memory_owner is
    'Lists, clears and erasures, and the exact per-pair similarity search.';
