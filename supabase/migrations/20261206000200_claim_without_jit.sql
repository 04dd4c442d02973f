-- The claim without JIT compilation (issue 23: the latency tail on a stock PostgreSQL 15).
--
-- agent_bridge.claim_rows runs with enable_seqscan = off so that stale statistics cannot
-- turn it into a scan of a whole table. Before PostgreSQL 18 a disabled scan is costed at
-- 1e10, far above jit_above_cost, so on a server with JIT (on by default in PGDG and Debian
-- packages and the official Docker image of PostgreSQL 12-17) LLVM compiled, with inlining
-- and optimisation, each statement the claim ran and each trigger its UPDATE fired, once
-- per row claimed: 13-15 ms a row, a claim of 50 rows 749 ms instead of 3.4
-- (bench/results/2026-12-04-issue-23-latency-tcp.md). PostgreSQL 18 no longer adds the
-- 1e10, and Supabase's builds have no JIT; there this changes nothing.
alter function agent_bridge.claim_rows(integer, double precision, integer, text[], integer)
    set jit = off;
