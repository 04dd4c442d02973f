"""A Supabase-mode worker against Supabase's gateway failing (through the PostgREST
stand-in, tests/fakes/postgrest.py): the finished result is kept. How the transport
classifies each gateway answer is tests/sql/test_supabase_fidelity.py."""

from __future__ import annotations

from pathlib import Path

from tests.db import fetch_task, insert_task
from tests.fakes.postgrest import SERVICE_KEY, PostgrestStub
from tests.stack import Stack

# What Cloudflare answers for Supabase when the origin does not (a 522).
CLOUDFLARE_522 = ("<!DOCTYPE html><html><head><title>supabase.co | 522: Connection timed out"
                  "</title></head><body><h1>Connection timed out</h1></body></html>")


def test_a_worker_keeps_its_finished_result_through_a_gateway_outage(
        clean_db: str, clean_redis: str, tmp_path: Path) -> None:
    """A Supabase-mode worker whose `complete` meets Cloudflare's 522 page (before: "Supabase
    refused the call (522)", and the finished result was dropped) retries the write: the
    row ends completed, the handler (a paid LLM call) having run once."""
    stub = PostgrestStub(clean_db, service_key=SERVICE_KEY)
    url = stub.start()
    stack = Stack(clean_db, clean_redis, tmp_path, LEASE_SECONDS="10")
    try:
        stack.worker(BRIDGE_TRANSPORT="supabase", SUPABASE_URL=url,
                     SUPABASE_SERVICE_KEY=SERVICE_KEY, DATABASE_URL="", SUPABASE_REALTIME="false")
        stack.bridge()
        task_id = insert_task(clean_db, {"prompt": "through the outage",
                                         "context": {"sleep": 1.5}})
        stack.wait_for("the worker started the row",
                       lambda: fetch_task(clean_db, task_id)["started_at"] is not None)
        stub.gateway_error(522, CLOUDFLARE_522)
        spans = stack.state_dir / f"{task_id}.spans.runs"
        stack.wait_for("the handler finished", spans.exists)
        hits = stub.fault_hits
        stack.wait_for("the worker tried to write the outcome", lambda: stub.fault_hits > hits)
        assert fetch_task(clean_db, task_id)["status"] == "processing"
        stub.clear_fault()
        stack.wait_for("the row completed",
                       lambda: fetch_task(clean_db, task_id)["status"] == "completed")
        response = fetch_task(clean_db, task_id)["response_payload"]
        assert isinstance(response, dict)
        assert response["answer"] == "Agent processed: through the outage"
        assert len(stack.runs(task_id)) == 1
        assert "Traceback" not in stack.logs()
    finally:
        stub.clear_fault()
        stack.stop_all()
        stub.stop()
