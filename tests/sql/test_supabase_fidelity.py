"""The Supabase transport against what the real PostgREST and Supabase's gateway do, through
the PostgREST stand-in (tests/fakes/postgrest.py) with the real supabase-py client:
gateway and proxy errors, db-max-rows, read-only STABLE functions, PGRST203 for
overloads, the schema cache reload, and the new secret API keys."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from postgrest.exceptions import APIError

from bridge.errors import StoreMisconfigured, StoreRejected, StoreUnavailable
from bridge.migrate import migrate
from bridge.queries import load
from bridge.store import TaskStore
from bridge.store.supabase import KEY_FIX, SupabaseTransport, make_client
from tests.db import PgServer, insert_task, sql
from tests.fakes.jwt import role_key
from tests.fakes.postgrest import SERVICE_KEY, PostgrestStub

Started = tuple[PostgrestStub, str]  # a started stand-in and its URL
SECRET_KEY = "sb_secret_N7UND0UgjKTVK-Uodkm0Hg_xSvEMPvz"  # the shape of Supabase's secret keys


@pytest.fixture(scope="module")
def own_db(pg_server: PgServer) -> Iterator[str]:
    """A migrated database of this module's own: some tests create functions in it."""
    url = pg_server.create_database()
    migrate(url)
    yield url
    pg_server.drop_database(url)


@pytest.fixture
def empty_db(own_db: str) -> str:
    sql(own_db, "truncate public.agent_task_requests")
    return own_db


@pytest.fixture(scope="module")
def shared_stub(own_db: str) -> Iterator[Started]:
    """The stand-in with PostgREST's defaults, started once for the module's tests that
    need nothing else (a stand-in's stop waits for its server loop to notice)."""
    stub = PostgrestStub(own_db, service_key=SERVICE_KEY)
    url = stub.start()
    yield stub, url
    stub.stop()


@pytest.fixture
def default_stub(shared_stub: Started) -> Iterator[Started]:
    """The shared stand-in and its URL; left answering normally after each test."""
    yield shared_stub
    shared_stub[0].clear_fault()


@pytest.fixture
def stub_factory(own_db: str) -> Iterator[Callable[..., Started]]:
    """Stand-ins with other options (a row cap, a schema cache, a recording subclass)."""
    started: list[PostgrestStub] = []

    def start(stub_class: type[PostgrestStub] = PostgrestStub, **options: Any
              ) -> Started:
        options.setdefault("service_key", SERVICE_KEY)
        stub = stub_class(own_db, **options)
        started.append(stub)
        return stub, stub.start()

    yield start
    for stub in started:
        stub.stop()


def store_on(url: str, key: str = SERVICE_KEY, **options: Any) -> TaskStore:
    return TaskStore(SupabaseTransport(url, key, timeout=10, **options))


# Gateway and proxy errors -------------------------------------------------------------

CLOUDFLARE_522 = ("<!DOCTYPE html><html><head><title>supabase.co | 522: Connection timed out"
                  "</title></head><body><h1>Connection timed out</h1></body></html>")
GATEWAY_ANSWERS = [
    (502, "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway"
          "</h1></center><hr><center>cloudflare</center></body></html>", "text/html"),
    (503, '{"message":"upstream connect error or disconnect/reset before headers"}',
     "application/json"),
    (504, "<html><body><h1>504 Gateway Time-out</h1></body></html>", "text/html"),
    (520, "<html><head><title>520: Web server is returning an unknown error</title></head>"
          "</html>", "text/html"),
    (522, CLOUDFLARE_522, "text/html"),
    (527, "", "text/html"),
    (408, "", "text/plain"),
    (429, '{"message":"Too Many Requests"}', "application/json"),
    (429, "<html><body>rate limited</body></html>", "text/html"),
]


@pytest.mark.parametrize(("status", "body", "content_type"), GATEWAY_ANSWERS,
                         ids=[f"{s}-{t.split('/')[1]}" for s, _, t in GATEWAY_ANSWERS])
def test_gateway_and_proxy_errors_are_transient(default_stub: Started, status: int,
                                                body: str, content_type: str) -> None:
    """Before: a 502 page or a JSON 429 without `code` became StoreRejected, and a worker
    dropped a finished result. Now they are StoreUnavailable, retried like connection loss,
    with the status and a one-line summary of the body."""
    stub, url = default_stub
    store = store_on(url)
    try:
        stub.gateway_error(status, body, content_type)
        with pytest.raises(StoreUnavailable) as raised:
            store.stats()
        assert not isinstance(raised.value, StoreMisconfigured)
        assert raised.value.code == str(status)
        message = str(raised.value)
        assert message.startswith(f"Supabase unavailable ({status} ")
        assert "<" not in message and "\n" not in message
        if status == 522:
            assert "522: Connection timed out" in message
        stub.clear_fault()
        assert store.stats().pending >= 0  # and it works again at once
    finally:
        store.close()


def test_a_gateway_401_invalid_api_key_is_a_configuration_error(
        default_stub: Started) -> None:
    """Supabase's gateway answers a wrong key with 401 {"message": "Invalid API key"} (no
    PostgREST code): a configuration error naming the one-line fix, never a rejected call
    that would fail the row."""
    stub, url = default_stub
    store = store_on(url)
    try:
        stub.gateway_error(401, '{"message":"Invalid API key","hint":"Double check your '
                                'Supabase `anon` or `service_role` API key."}',
                           "application/json")
        with pytest.raises(StoreMisconfigured) as raised:
            store.stats()
        assert str(raised.value) == (
            f"Supabase refused the API key (401 Unauthorized: Invalid API key): {KEY_FIX}")
    finally:
        store.close()
    wrong = store_on(url, key="not-the-service-key")  # refused by the stand-in's key check
    try:
        with pytest.raises(StoreMisconfigured, match="sb_secret_"):
            wrong.stats()
    finally:
        wrong.close()


# db-max-rows --------------------------------------------------------------------------

def test_max_rows_cuts_a_claim_and_the_store_stays_under_it(
        stub_factory: Callable[..., Any], empty_db: str) -> None:
    """PostgREST wraps the call in a LIMIT: a claim of 8 with max-rows 5 claims (leases) 8
    rows and returns 5, stranding 3 until their lease runs out. The store never asks for
    more than the cap."""
    _, url = stub_factory(max_rows=5)
    ids = [insert_task(empty_db, {"prompt": f"row {i}"}) for i in range(8)]
    raw = make_client(url, SERVICE_KEY, 10)
    returned = raw.rpc("agent_tasks_claim", {"p_limit": 8, "p_lease_seconds": 30}).execute()
    assert isinstance(returned.data, list) and len(returned.data) == 5
    assert sql(empty_db, "select count(*) from public.agent_task_requests "
                         "where status = 'processing'") == [(8,)]  # what the cap does

    sql(empty_db, "truncate public.agent_task_requests")
    ids = [insert_task(empty_db, {"prompt": f"row {i}"}) for i in range(8)]
    store = store_on(url, max_rows=5)
    try:
        claims = store.claim(8, 30)
        assert len(claims) == 5
        processing = {str(r[0]) for r in sql(
            empty_db, "select id from public.agent_task_requests where status = 'processing'")}
        assert processing == {c.id for c in claims} and processing <= set(ids)
    finally:
        store.close()


def test_rescue_and_requeue_go_in_pages_under_max_rows(
        stub_factory: Callable[..., Any], empty_db: str) -> None:
    """12 expired leases and 12 failed rows with max-rows 5: rescue and requeue report
    (and do) all 12, a page at a time."""
    _, url = stub_factory(max_rows=5)
    store = store_on(url, max_rows=5)
    try:
        for i in range(12):
            insert_task(empty_db, {"prompt": f"row {i}"})
        assert len(store.claim(5, 30)) + len(store.claim(5, 30)) + len(store.claim(5, 30)) == 12
        sql(empty_db, "update public.agent_task_requests set lease_expires_at = now() - "
                      "interval '1 second'")
        rescued = store.rescue()
        assert len(rescued) == 12 and len({r.id for r in rescued}) == 12
        sql(empty_db, "update public.agent_task_requests set status = 'failed', "
                      "lease_expires_at = null, worker = null, finished_at = now(), "
                      "error = '{\"type\": \"Boom\"}'")
        requeued = store.requeue(error_type="Boom")
        assert len(requeued) == 12 and len(set(requeued)) == 12
        assert sql(empty_db, "select count(*) from public.agent_task_requests "
                             "where status = 'pending'") == [(12,)]
    finally:
        store.close()


# Read-only STABLE functions, PGRST203, the schema cache --------------------------------

def test_stable_functions_run_read_only(default_stub: Started, own_db: str) -> None:
    """PostgREST runs a STABLE or IMMUTABLE function READ ONLY, even on POST: one that
    writes gets 25006 (HTTP 405). Every state function the store calls that writes must
    therefore be VOLATILE, and the STABLE ones it calls must work read-only."""
    _, url = default_stub
    sql(own_db, """
        create sequence if not exists public.fidelity_seq;
        grant usage on sequence public.fidelity_seq to service_role;
        create or replace function public.fidelity_stable_write() returns bigint
        language sql stable as 'select nextval(''public.fidelity_seq'')';
        grant execute on function public.fidelity_stable_write() to service_role""")
    raw = make_client(url, SERVICE_KEY, 10)
    try:
        with pytest.raises(APIError) as raised:
            raw.rpc("fidelity_stable_write", {}).execute()
        assert raised.value.code == "25006"
    finally:
        sql(own_db, "drop function public.fidelity_stable_write(); "
                    "drop sequence public.fidelity_seq")
    called = {q.function for q in load().values()}
    readers = {name for (name,) in sql(own_db, """
        select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname = 'public' and p.provolatile in ('s', 'i') and p.proname = any(%s)""",
                                       [sorted(called)])}
    assert "agent_tasks_stats" in readers  # one of them, at least
    store = store_on(url)
    try:
        store.stats()
        store.agent_stats()
        store.schema_version()
        store.cancel_requested([("00000000-0000-0000-0000-000000000000", 1)])
    finally:
        store.close()


def test_an_overloaded_function_name_fails_with_pgrst203(default_stub: Started,
                                                          own_db: str) -> None:
    """Two signatures of one name: PostgREST refuses to choose (300, PGRST203), so a
    migration that changes a signature must drop the old one (test_migration checks
    that none is left)."""
    _, url = default_stub
    sql(own_db, """
        create function public.fidelity_twice(p_x integer default 0) returns integer
            language sql immutable as 'select 1';
        create function public.fidelity_twice(p_x text default '') returns integer
            language sql immutable as 'select 2'""")
    store = store_on(url)
    try:
        raw = make_client(url, SERVICE_KEY, 10)
        with pytest.raises(APIError) as raised:
            raw.rpc("fidelity_twice", {}).execute()
        assert raised.value.code == "PGRST203"
        assert raised.value.message == (
            "Could not choose the best candidate function between: "
            "public.fidelity_twice(p_x => integer), public.fidelity_twice(p_x => text)")
    finally:
        store.close()
        sql(own_db, "drop function public.fidelity_twice(integer); "
                    "drop function public.fidelity_twice(text)")


def test_the_schema_cache_reloads_on_notify(stub_factory: Callable[..., Any],
                                            own_db: str) -> None:
    """PostgREST does not see a function created after it read its schema cache until
    `notify pgrst, 'reload schema'`, which the last migration sends."""
    stub, url = stub_factory(schema_cache=True)
    raw = make_client(url, SERVICE_KEY, 10)

    def call() -> Any:
        return raw.rpc("fidelity_late", {}).execute().data

    try:
        with pytest.raises(APIError) as raised:
            call()
        assert raised.value.code == "PGRST202"
        sql(own_db, "create function public.fidelity_late() returns integer "
                    "language sql immutable as 'select 42'")
        with pytest.raises(APIError):
            call()  # still the old cache
        reloads = stub.reloads
        sql(own_db, "notify pgrst, 'reload schema'")
        pause = threading.Event()
        for _ in range(200):
            if stub.reloads > reloads:
                break
            pause.wait(0.05)
        assert stub.reloads > reloads
        assert call() == 42
    finally:
        sql(own_db, "drop function if exists public.fidelity_late()")


# The new API keys -----------------------------------------------------------------------

class RecordingStub(PostgrestStub):
    """Remembers the headers of every request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[dict[str, str]] = []

    def handle(self, method: str, path: str, query: list[tuple[str, str]],
               headers: dict[str, str], body: Any) -> Any:
        self.seen.append(dict(headers))
        return super().handle(method, path, query, headers, body)


def test_a_secret_api_key_goes_in_the_apikey_header_only(
        stub_factory: Callable[..., Any], empty_db: str) -> None:
    """An sb_secret_ key is not a JWT: it goes in `apikey` only (Supabase's gateway maps it
    to service_role); a legacy JWT key goes in `apikey` and as the bearer token."""
    stub, url = stub_factory(RecordingStub, service_key=SECRET_KEY)
    store = store_on(url, key=SECRET_KEY)
    try:
        task_id = store.insert({"prompt": "with a secret key"})
        assert store.get(task_id) is not None and store.stats().pending == 1
    finally:
        store.close()
    assert stub.seen and all(h.get("apikey") == SECRET_KEY and "authorization" not in h
                             for h in stub.seen)

    legacy = role_key("service_role")
    stub2, url2 = stub_factory(RecordingStub, service_key="unused")
    store2 = store_on(url2, key=legacy)
    try:
        store2.stats()
    finally:
        store2.close()
    assert all(h.get("apikey") == legacy and h.get("authorization") == f"Bearer {legacy}"
               for h in stub2.seen)


def test_rejected_by_classification_stays_permanent(default_stub: Started) -> None:
    """A PostgREST error with a SQLSTATE (here: no such row id type) is still permanent."""
    _, url = default_stub
    store = store_on(url)
    try:
        with pytest.raises(StoreRejected) as raised:
            store.heartbeat("not-a-uuid", 1, "w", 30)
        assert not isinstance(raised.value, StoreUnavailable)
        assert raised.value.code == "22P02"
    finally:
        store.close()
