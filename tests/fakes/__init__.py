"""Stand-ins for the servers that cannot run here, each faithful to the real one's
behaviour (status codes, error bodies, limits, wire protocol) and run on the real database:
PostgREST (`postgrest`), Supabase Realtime (`realtime`), Supabase's API gateway in front of
both (`gateway`), Supabase Auth's JWTs (`jwt`) and an OpenAI-compatible API (`openai_server`).
`tests/{acceptance,sql}/test_standins.py` checks them against the real servers' documented
behaviour."""
