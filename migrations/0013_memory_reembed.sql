-- A re-embed in progress (`coachd memory reembed`): the embedder being moved to and the id up to
-- which memories already hold its vectors (ids are UUIDv7, so new rows sort after the cursor).
-- All null when none runs; start-up refuses to serve while one is unfinished.
alter table coach_memory_settings
    add column reembed_model text,
    add column reembed_dim integer check (reembed_dim between 1 and 2000),
    add column reembed_after uuid;
