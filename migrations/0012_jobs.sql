-- Jobs (issue 12): coachd's own record of every job, for the job API. The queue itself (leases,
-- heartbeats, re-enqueueing of a dead worker's jobs) is apalis-postgres' schema `apalis`, set up by
-- its own migrations at start-up; this table says what the API shows: status, progress, result.
create table if not exists coachd_jobs (
    id uuid primary key,
    kind text not null,
    queue text not null,
    user_id text not null,
    coach_id text not null,
    session_id text,
    status text not null default 'queued'
        check (status in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    progress real not null default 0,
    stage text,
    attempts integer not null default 0,
    max_attempts integer not null,
    options jsonb not null default '{}'::jsonb,
    input jsonb not null default '{}'::jsonb,
    result jsonb,
    error jsonb,
    idempotency_key text,
    parent_id uuid references coachd_jobs (id) on delete cascade,
    worker text,
    event_seq bigint not null default 0,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    started_at timestamptz,
    finished_at timestamptz
);

create unique index if not exists coachd_jobs_idempotency_idx
    on coachd_jobs (user_id, idempotency_key) where idempotency_key is not null;
create index if not exists coachd_jobs_user_idx on coachd_jobs (user_id, created_at desc);
create index if not exists coachd_jobs_queue_status_idx on coachd_jobs (queue, status);
create index if not exists coachd_jobs_parent_idx on coachd_jobs (parent_id) where parent_id is not null;
create index if not exists coachd_jobs_finished_idx on coachd_jobs (finished_at) where finished_at is not null;

-- A job's progress events, numbered per job (`seq`, the SSE `id:`), kept for replay.
create table if not exists coachd_job_events (
    job_id uuid not null references coachd_jobs (id) on delete cascade,
    seq bigint not null,
    event jsonb not null,
    created_at timestamptz not null default now(),
    primary key (job_id, seq)
);

-- The uploaded file of a job: its bytes here (`data`) or in COACHD_JOBS_UPLOAD_DIR (`path`),
-- never in Redis; deleted with its job, or earlier when it expires.
create table if not exists coachd_job_uploads (
    job_id uuid primary key references coachd_jobs (id) on delete cascade,
    filename text,
    content_type text,
    size bigint not null,
    data bytea,
    path text,
    created_at timestamptz not null default now(),
    expires_at timestamptz not null
);

create index if not exists coachd_job_uploads_expiry_idx on coachd_job_uploads (expires_at);
