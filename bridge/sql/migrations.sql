-- The migration history, kept exactly as the Supabase CLI keeps it (supabase/cli,
-- pkg/migration/history.go), so `agent-bridge migrate` and `supabase db push` /
-- `supabase migration list` agree in either order. Same format as queries.sql.

-- create_history --
-- The CLI's schema and table, created the way the CLI creates and upgrades them.
create schema if not exists supabase_migrations; create table if not exists supabase_migrations.schema_migrations (version text not null primary key); alter table supabase_migrations.schema_migrations add column if not exists statements text[]; alter table supabase_migrations.schema_migrations add column if not exists name text

-- applied_versions --
-- The versions recorded as applied, in order (the CLI's LIST_MIGRATION_VERSION).
select version from supabase_migrations.schema_migrations order by version

-- reload_schema --
-- Tell PostgREST (Supabase's Data API) to reload its schema cache: new and changed
-- functions are invisible to rpc() until then. Sent on commit.
notify pgrst, 'reload schema'

-- record_version --
-- Record one applied migration file (the CLI's INSERT_MIGRATION_VERSION).
insert into supabase_migrations.schema_migrations (version, name, statements) values (%(version)s, %(name)s, %(statements)s::text[])
