-- PostgREST (Supabase's Data API) caches the functions it can call and reloads them only
-- when told to: without this, a function created or changed by the migrations above
-- answers PGRST202 ("Could not find the function") or runs with its old signature until
-- PostgREST restarts. Last migration, so it runs after every other change.
notify pgrst, 'reload schema';
