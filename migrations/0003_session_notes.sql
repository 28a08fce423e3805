-- Coaching notes generated at the end of a realtime session or from a raw transcript.
create table if not exists session_notes (
    id uuid primary key,
    session_id text,
    user_id text not null,
    coach_id text not null,
    summary text not null,
    key_points jsonb not null default '[]'::jsonb,
    action_items jsonb not null default '[]'::jsonb,
    created_at timestamptz not null default now()
);

create index if not exists session_notes_user_idx on session_notes (user_id, created_at desc);
create index if not exists session_notes_session_idx on session_notes (session_id) where session_id is not null;
