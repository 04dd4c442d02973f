"""The Realtime stand-in's Broadcast, as Supabase Realtime does it: private joins authorised
by the SELECT policies on realtime.messages, what realtime.send commits delivered in commit
order to the topic's channels (a realtime-js-shaped vsn 2.0.0 socket: binary frames; and
realtime-py, vsn 1.0.0), a client's broadcast checked against the INSERT policies, replay,
and the fault switches. The SQL side is tests/sql/test_realtime_broadcast_standin.py."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates
from websockets.sync.connection import Connection

from tests.db import sql
from tests.fakes.gateway import StandIns
from tests.fakes.jwt import user_token
from tests.sockets import decode, realtime_socket, receive

ROOM = "standin_room:"  # a user's own topic: `standin_room:<user id>`
# Realtime's reply to a join its read check refuses.
REFUSED = "Unauthorized: You do not have permissions to read from this Channel topic: {}"


@pytest.fixture
def rooms(standins: StandIns, clean_db: str) -> Iterator[StandIns]:
    """A policy of the test's own: a user may read the broadcasts of their own room."""
    sql(clean_db, f"""
        create policy standin_room_read on realtime.messages for select to authenticated
            using (extension = 'broadcast'
                   and (select realtime.topic()) = '{ROOM}' || (select auth.uid())::text)""")
    try:
        yield standins
    finally:
        sql(clean_db, "drop policy if exists standin_room_read on realtime.messages")
        sql(clean_db, "drop policy if exists standin_room_send on realtime.messages")
        sql(clean_db, "delete from realtime.messages where topic like %s", [ROOM + "%"])


def join(ws: Connection, topic: str, token: str, *, private: bool = True,
         ref: str = "1", **broadcast: Any) -> dict[str, Any]:
    """phx_join as realtime-js sends it; the reply's payload."""
    ws.send(json.dumps([ref, ref, f"realtime:{topic}", "phx_join", {
        "config": {"broadcast": {"ack": False, "self": False, **broadcast},
                   "presence": {"key": "", "enabled": False}, "postgres_changes": [],
                   "private": private},
        "access_token": token}]))
    return dict(receive(ws, "phx_reply")[4])


def send(db_url: str, topic: str, event: str, payload: dict[str, Any],
         private: bool = True) -> None:
    """realtime.send in a transaction of its own (UTC, as a Supabase database runs)."""
    with psycopg.connect(db_url) as conn:
        conn.execute("set timezone = 'UTC'")
        conn.execute("select realtime.send(%s::jsonb, %s, %s, %s)",
                     [json.dumps(payload), event, topic, private])


def broadcasts(ws: Connection, until: str) -> list[dict[str, Any]]:
    """The broadcasts' payloads ({type, event, payload, meta}) up to event `until`."""
    seen: list[dict[str, Any]] = []
    while not seen or seen[-1]["event"] != until:
        seen.append(receive(ws, "broadcast")[4])
    return seen


def stats(s: StandIns) -> dict[str, Any]:
    return s.realtime.stats()


def test_a_private_join_is_allowed_by_a_select_policy_and_refused_without_one(
        rooms: StandIns) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    before = stats(rooms)
    with realtime_socket(rooms, rooms.anon_key) as ws:
        assert join(ws, ROOM + alice, user_token(alice)) == {
            "status": "ok", "response": {"postgres_changes": []}}
        for topic, token in [(ROOM + alice, user_token(bob)),  # another user's topic
                             ("standin_nobody:" + alice, user_token(alice)),  # no policy
                             (ROOM + alice, rooms.anon_key)]:  # no user: role anon
            assert join(ws, topic, token, ref="2") == {
                "status": "error", "response": {"reason": REFUSED.format(topic)}}
        # The service role bypasses RLS; a public channel is not checked.
        assert join(ws, ROOM + alice, rooms.service_key, ref="3")["status"] == "ok"
        assert join(ws, "standin_public:x", user_token(bob), private=False,
                    ref="4")["status"] == "ok"
    after = stats(rooms)
    assert after["rls_checks_join"] - before["rls_checks_join"] == 5
    assert after["joins_refused"] - before["joins_refused"] == 3


def test_committed_broadcasts_reach_the_topics_channels_in_commit_order(
        rooms: StandIns, clean_db: str) -> None:
    alice = str(uuid.uuid4())
    topic = ROOM + alice
    with realtime_socket(rooms, rooms.anon_key) as private, \
            realtime_socket(rooms, rooms.anon_key) as public:
        assert join(private, topic, user_token(alice))["status"] == "ok"
        assert join(public, topic, rooms.anon_key, private=False)["status"] == "ok"
        with psycopg.connect(clean_db) as first, psycopg.connect(clean_db) as later:
            first.execute("select realtime.send('{\"n\": \"first\"}', 'note', %s)", [topic])
            later.execute("select realtime.send('{\"n\": \"later\"}', 'note', %s)", [topic])
            later.commit()  # commits before `first`: delivered before it
            with psycopg.connect(clean_db) as undone:
                undone.execute("select realtime.send('{}', 'never', %s)", [topic])
                undone.rollback()
            first.commit()
        send(clean_db, topic, "public", {"n": "to public channels"}, private=False)
        send(clean_db, topic, "end", {"n": "end"})
        send(clean_db, topic, "end", {"n": "end"}, private=False)

        frame = private.recv(timeout=10)
        assert isinstance(frame, bytes) and frame[0] == 4  # realtime-js' user broadcast
        later_msg = decode(frame)
        assert later_msg[:4] == [None, None, f"realtime:{topic}", "broadcast"]
        row_id = sql(clean_db, "select id::text from realtime.messages where topic = %s "
                               "and payload->>'n' = 'later'", [topic])[0][0]
        assert later_msg[4] == {"type": "broadcast", "event": "note", "meta": {"id": row_id},
                                "payload": {"n": "later", "id": row_id}}
        rest = broadcasts(private, until="end")
        assert [m["payload"]["n"] for m in [later_msg[4], *rest]] == ["later", "first", "end"]
        assert [m["payload"]["n"] for m in broadcasts(public, until="end")] == [
            "to public channels", "end"]


def test_realtime_py_receives_broadcasts_on_private_channels(rooms: StandIns,
                                                            clean_db: str) -> None:
    """realtime-py (vsn 1.0.0) as the bridge uses it: a user on their room and the service
    role on a topic no policy names."""
    alice = str(uuid.uuid4())
    service_topic = f"standin_room_service:{alice}"

    async def follow(topic: str, token: str, inbox: list[dict[str, Any]]
                     ) -> AsyncRealtimeClient:
        client = AsyncRealtimeClient(rooms.url + "/realtime/v1", rooms.anon_key,
                                     auto_reconnect=False)
        await client.set_auth(token)
        await client.connect()
        channel = client.channel(topic, {"config": {
            "private": True, "broadcast": {"ack": False, "self": False},
            "presence": {"key": "", "enabled": False}}})
        channel.on_broadcast("note", lambda message: inbox.append(dict(message)))
        subscribed = asyncio.Event()

        def on_state(state: RealtimeSubscribeStates, _error: Exception | None) -> None:
            if state == RealtimeSubscribeStates.SUBSCRIBED:
                subscribed.set()
        await channel.subscribe(on_state)
        await asyncio.wait_for(subscribed.wait(), 10)
        return client

    async def listen() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        mine: list[dict[str, Any]] = []
        service: list[dict[str, Any]] = []
        clients = [await follow(ROOM + alice, user_token(alice), mine),
                   await follow(service_topic, rooms.service_key, service)]
        await asyncio.to_thread(send, clean_db, ROOM + alice, "note", {"n": 1})
        await asyncio.to_thread(send, clean_db, service_topic, "note", {"n": 2})
        deadline = time.monotonic() + 10
        while not (mine and service) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for client in clients:
            await client.close()
        return mine, service

    mine, service = asyncio.run(listen())
    assert [(m["event"], m["payload"]["n"]) for m in mine] == [("note", 1)]
    assert mine[0]["meta"]["id"] == mine[0]["payload"]["id"]
    assert [m["payload"]["n"] for m in service] == [2]


def test_a_vsn_1_socket_gets_phoenix_v1_objects(rooms: StandIns, clean_db: str) -> None:
    alice = str(uuid.uuid4())
    with realtime_socket(rooms, rooms.anon_key, vsn="1.0.0") as ws:
        ws.send(json.dumps({"topic": f"realtime:{ROOM}{alice}", "event": "phx_join",
                            "ref": "1", "payload": {"config": {"private": True},
                                                    "access_token": user_token(alice)}}))
        reply = json.loads(ws.recv(timeout=10))
        assert reply == {"topic": f"realtime:{ROOM}{alice}", "event": "phx_reply", "ref": "1",
                         "payload": {"status": "ok", "response": {"postgres_changes": []}}}
        send(clean_db, ROOM + alice, "note", {"n": 1})
        message = json.loads(ws.recv(timeout=10))
    assert message.keys() == {"topic", "event", "payload", "ref"}  # no join_ref in V1
    assert message["event"] == "broadcast" and message["ref"] is None
    assert message["payload"]["type"] == "broadcast" and message["payload"]["event"] == "note"
    assert message["payload"]["payload"]["n"] == 1
    assert message["payload"]["meta"] == {"id": message["payload"]["payload"]["id"]}


def user_broadcast_push(join_ref: str, ref: str, topic: str, event: str,
                        payload: dict[str, Any]) -> bytes:
    """realtime-js' binary push of a JSON broadcast (kind 3, no metadata)."""
    parts = [join_ref.encode(), ref.encode(), topic.encode(), event.encode(), b""]
    return bytes([3, *(len(p) for p in parts), 1]) + b"".join(parts) + \
        json.dumps(payload).encode()


def test_a_client_broadcast_on_a_private_channel_needs_an_insert_policy(
        rooms: StandIns, clean_db: str) -> None:
    alice = str(uuid.uuid4())
    topic = ROOM + alice
    before = stats(rooms)
    with realtime_socket(rooms, rooms.anon_key) as sender, \
            realtime_socket(rooms, rooms.anon_key) as receiver:
        assert join(receiver, topic, user_token(alice))["status"] == "ok"
        assert join(sender, topic, user_token(alice), ack=True)["status"] == "ok"
        sender.send(user_broadcast_push("1", "2", f"realtime:{topic}", "typed", {"n": 1}))
        # Refused by RLS: no ack, nothing sent (the heartbeat's answer comes first).
        sender.send(json.dumps([None, "3", "phoenix", "heartbeat", {}]))
        assert decode(sender.recv(timeout=10))[1] == "3"

        sql(clean_db, f"""
            create policy standin_room_send on realtime.messages for insert to authenticated
                with check ((select realtime.topic()) = '{ROOM}' || (select auth.uid())::text)
            """)
        # The write right is decided once per channel: join again to have it checked again.
        assert join(sender, topic, user_token(alice), ack=True, ref="4")["status"] == "ok"
        for ref in ("5", "6"):
            sender.send(user_broadcast_push("4", ref, f"realtime:{topic}", "typed",
                                            {"n": int(ref)}))
            assert receive(sender, "phx_reply")[1:] == [ref, f"realtime:{topic}", "phx_reply",
                                                        {"status": "ok", "response": {}}]
        sender.send(json.dumps(["4", "7", f"realtime:{topic}", "broadcast",
                                {"type": "broadcast", "event": "said", "payload": {"n": 7}}]))
        assert receive(sender, "phx_reply")[1] == "7"
        send(clean_db, topic, "end", {})
        got = broadcasts(receiver, until="end")
    assert got[:3] == [{"type": "broadcast", "event": "typed", "payload": {"n": 5}},
                       {"type": "broadcast", "event": "typed", "payload": {"n": 6}},
                       {"type": "broadcast", "event": "said", "payload": {"n": 7}}]
    assert stats(rooms)["rls_checks_write"] - before["rls_checks_write"] == 2


def test_replay_sends_the_topics_latest_private_broadcasts_once(rooms: StandIns,
                                                               clean_db: str) -> None:
    alice = str(uuid.uuid4())
    topic = ROOM + alice
    since = int(time.time() * 1000) - 60_000
    for n in range(3):
        send(clean_db, topic, "note", {"n": n})
    send(clean_db, topic, "note", {"n": "public"}, private=False)
    with realtime_socket(rooms, rooms.anon_key) as ws:
        assert join(ws, topic, user_token(alice), replay={"since": since, "limit": 2}) == {
            "status": "ok", "response": {"postgres_changes": []}}
        replayed = [receive(ws, "broadcast") for _ in range(2)]
        assert [m[0] for m in replayed] == ["1", "1"]  # pushed on the channel
        assert [m[4]["payload"]["n"] for m in replayed] == [1, 2]  # the latest, oldest first
        assert replayed[0][4]["meta"] == {"replayed": True,
                                          "id": replayed[0][4]["payload"]["id"]}
        for config, reason in [
                ({"private": False}, "Replay is not allowed for public channels"),
                ({}, "Replay params are not valid")]:  # no `since`
            refused = join(ws, topic, user_token(alice), ref="2", replay={"limit": 1},
                           **config)
            assert refused["response"]["reason"] == f"UnableToReplayMessages: {reason}"


def test_faults_and_the_payload_limit_apply_to_broadcasts(rooms: StandIns,
                                                          clean_db: str) -> None:
    alice = str(uuid.uuid4())
    topic = ROOM + alice
    rooms.realtime.fail_joins(1)
    with realtime_socket(rooms, rooms.anon_key) as ws:
        assert join(ws, topic, user_token(alice))["response"]["reason"] == (
            "Realtime was unable to connect to the project database")
        assert join(ws, topic, user_token(alice), ref="2")["status"] == "ok"
        before = stats(rooms)
        rooms.realtime.lose_events(1)
        send(clean_db, topic, "note", {"n": "lost"})
        rooms.realtime.max_payload_size_in_kb = 1  # 1,500 bytes with the padding: over, dropped
        try:
            send(clean_db, topic, "note", {"n": "too big", "text": "x" * 1_500})
            send(clean_db, topic, "end", {"n": "fits", "text": "x" * 400})
            assert [m["payload"]["n"] for m in broadcasts(ws, until="end")] == ["fits"]
        finally:
            rooms.realtime.max_payload_size_in_kb = 256
        after = stats(rooms)
    assert after["broadcasts_lost"] - before["broadcasts_lost"] == 1
    assert after["broadcasts_too_large"] - before["broadcasts_too_large"] == 1
    assert after["broadcast_rows"] - before["broadcast_rows"] == 3
    assert after["broadcasts"] - before["broadcasts"] == 1


def test_a_token_without_the_right_ends_the_private_channel(rooms: StandIns) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    topic = ROOM + alice
    with realtime_socket(rooms, rooms.anon_key) as ws:
        assert join(ws, topic, user_token(alice))["status"] == "ok"
        ws.send(json.dumps(["1", None, f"realtime:{topic}", "access_token",
                            {"access_token": user_token(bob)}]))
        error = receive(ws, "system")[4]
        assert error == {"extension": "system", "status": "error", "channel": topic,
                         "message": REFUSED.format(topic).removeprefix("Unauthorized: ")}
        assert receive(ws, "phx_close")[2] == f"realtime:{topic}"
