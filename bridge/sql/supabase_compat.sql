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
