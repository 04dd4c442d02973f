-- What a Supabase database already has and the migrations rely on, created on a
-- plain PostgreSQL only where missing: the API roles, auth.uid(), and the
-- supabase_realtime publication. Idempotent.

do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'anon') then
        create role anon nologin noinherit;
    end if;
    if not exists (select 1 from pg_roles where rolname = 'authenticated') then
        create role authenticated nologin noinherit;
    end if;
    if not exists (select 1 from pg_roles where rolname = 'service_role') then
        create role service_role nologin noinherit bypassrls;
    end if;
end
$$;

create schema if not exists auth;
grant usage on schema auth to anon, authenticated, service_role;
grant usage on schema public to anon, authenticated, service_role;

-- Supabase's auth.uid(): the `sub` claim of the request's JWT, as PostgREST sets it.
do $$
begin
    if not exists (select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                    where n.nspname = 'auth' and p.proname = 'uid') then
        create function auth.uid() returns uuid
        language sql stable
        as $fn$
            select coalesce(
                nullif(current_setting('request.jwt.claim.sub', true), ''),
                nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'
            )::uuid
        $fn$;
        grant execute on function auth.uid() to anon, authenticated, service_role;
    end if;
end
$$;

-- Supabase's auth.jwt(): the request's JWT claims as jsonb (app_metadata and all).
do $$
begin
    if not exists (select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                    where n.nspname = 'auth' and p.proname = 'jwt') then
        create function auth.jwt() returns jsonb
        language sql stable
        as $fn$
            select coalesce(
                nullif(current_setting('request.jwt.claim', true), ''),
                nullif(current_setting('request.jwt.claims', true), '')
            )::jsonb
        $fn$;
        grant execute on function auth.jwt() to anon, authenticated, service_role;
    end if;
end
$$;

do $$
begin
    if not exists (select 1 from pg_publication where pubname = 'supabase_realtime') then
        create publication supabase_realtime;
    end if;
end
$$;

-- Supabase Realtime's objects in the database (supabase/realtime's tenant migrations, as
-- its tenant schema export shows them): realtime.messages, the table Broadcast from the
-- database writes to and Realtime's private-channel authorisation probes with RLS; and
-- realtime.topic() and realtime.send() on it. Created only where missing; a realtime
-- schema created here is marked 'agent-bridge compat' so that the migrations can tell it
-- from a Supabase project's. The daily partitions of realtime.messages are the Realtime
-- server's to make (its janitor: yesterday to three days ahead); the tests' Realtime
-- stand-in makes them (tests/fakes/realtime.py). Without one, realtime.send only warns.
do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'supabase_realtime_admin') then
        create role supabase_realtime_admin nologin noinherit noreplication;
    end if;
    if to_regnamespace('realtime') is null then
        create schema realtime;
        comment on schema realtime is 'agent-bridge compat';
        grant usage on schema realtime to anon, authenticated, service_role;
        grant create, usage on schema realtime to supabase_realtime_admin with grant option;
    end if;
end
$$;

do $$
begin
    if to_regclass('realtime.messages') is null then
        create table realtime.messages (
            topic text not null,
            extension text not null,
            payload jsonb,
            event text,
            private boolean default false,
            updated_at timestamp without time zone not null default now(),
            inserted_at timestamp without time zone not null default now(),
            id uuid not null default gen_random_uuid(),
            binary_payload bytea,
            constraint messages_pkey primary key (id, inserted_at)
        ) partition by range (inserted_at);
        alter table realtime.messages add constraint messages_payload_exclusive
            check (payload is null or binary_payload is null) not valid;
        -- Replay's index (private broadcasts of a topic, newest first).
        create index messages_inserted_at_topic_index on realtime.messages
            (inserted_at desc, topic) where extension = 'broadcast' and private is true;
        alter table realtime.messages enable row level security;
        alter table realtime.messages owner to supabase_realtime_admin;
        grant select, insert, update on table realtime.messages
            to anon, authenticated, service_role;
    end if;
end
$$;

-- The channel's topic while Realtime checks a join (and while realtime.send inserts):
-- what policies on realtime.messages compare the topic with.
do $$
begin
    if to_regprocedure('realtime.topic()') is null then
        create function realtime.topic() returns text
        language sql stable
        as $fn$ select nullif(current_setting('realtime.topic', true), '')::text $fn$;
        alter function realtime.topic() owner to supabase_realtime_admin;
    end if;
end
$$;

-- Broadcast from the database: a row in realtime.messages, which Realtime delivers once the
-- transaction commits. As Supabase's: security invoker (the caller must be allowed to
-- insert: an owner, a role that bypasses RLS, or an insert policy), the payload gets an
-- `id` (the row's) unless it has one, and a failure is a WARNING, never an error.
do $$
begin
    if to_regprocedure('realtime.send(jsonb, text, text, boolean)') is null then
        create function realtime.send(payload jsonb, event text, topic text,
                                      private boolean default true)
        returns void
        language plpgsql
        as $fn$
        declare
            message_id uuid;
            body jsonb;
        begin
            begin
                message_id := gen_random_uuid();
                body := case when payload ? 'id' then payload
                             else jsonb_set(payload, '{id}', to_jsonb(message_id)) end;
                execute format('set local realtime.topic to %L', topic);
                insert into realtime.messages (id, payload, event, topic, private, extension)
                values (message_id, body, event, topic, private, 'broadcast');
            exception when others then
                raise warning 'WarnSendingBroadcastMessage: %', sqlerrm;
            end;
        end
        $fn$;
        alter function realtime.send(jsonb, text, text, boolean)
            owner to supabase_realtime_admin;
    end if;
    if to_regprocedure('realtime.send_binary(bytea, text, text, boolean)') is null then
        create function realtime.send_binary(payload bytea, event text, topic text,
                                             private boolean default true)
        returns void
        language plpgsql
        as $fn$
        declare
            message_id uuid;
        begin
            begin
                message_id := gen_random_uuid();
                execute format('set local realtime.topic to %L', topic);
                insert into realtime.messages (id, binary_payload, event, topic, private,
                                               extension)
                values (message_id, payload, event, topic, private, 'broadcast');
            exception when others then
                raise warning 'WarnSendingBroadcastMessage: %', sqlerrm;
            end;
        end
        $fn$;
        alter function realtime.send_binary(bytea, text, text, boolean)
            owner to supabase_realtime_admin;
    end if;
end
$$;
