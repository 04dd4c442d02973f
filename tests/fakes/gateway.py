"""One origin in front of the stand-ins, as Supabase's API gateway is: supabase-js and
supabase-py derive every service URL from SUPABASE_URL (`/rest/v1`, `/realtime/v1`), so the
PostgREST and Realtime stand-ins must answer on one host and port.

A small asyncio reverse proxy: `/rest/v1/...` goes to the PostgREST stand-in, a WebSocket
upgrade on `/realtime/v1/...` is tunnelled to the Realtime stand-in. Like the gateway it
answers CORS preflights and adds `Access-Control-Allow-Origin` so a browser page on
another origin can call it. It is a stand-in; Kong's key checks live in the stand-ins.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from urllib.parse import urlsplit

_CORS = (b"Access-Control-Allow-Origin: *\r\n"
         b"Access-Control-Expose-Headers: Content-Range, Content-Profile, Proxy-Status\r\n")


class Gateway:
    def __init__(self, rest_url: str, realtime_url: str) -> None:
        self.routes = {"/rest/v1": _hostport(rest_url), "/realtime/v1": _hostport(realtime_url)}
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self.port = 0

    def start(self) -> str:
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._thread is None:
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            # End the open client connections here, on the running loop, rather than
            # leaving their coroutines to be collected after the loop is gone.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None
        self._loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one_request(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> bool:
        """Relay one request; False when the client connection is done."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:] if line)}
        if method == "OPTIONS":
            allow = headers.get("access-control-request-headers", "*")
            writer.write(b"HTTP/1.1 204 No Content\r\n" + _CORS +
                         b"Access-Control-Allow-Methods: GET, POST, PATCH, PUT, DELETE, OPTIONS\r\n"
                         b"Access-Control-Allow-Headers: " + allow.encode() + b"\r\n"
                         b"Access-Control-Max-Age: 600\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return True
        path = urlsplit(target).path
        upstream = next((hp for prefix, hp in self.routes.items() if path.startswith(prefix)),
                        None)
        if upstream is None:
            body = b'{"message":"no Route matched with those values"}'
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n" + _CORS +
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            return True
        up_reader, up_writer = await asyncio.open_connection(*upstream)
        if headers.get("upgrade", "").lower() == "websocket":
            up_writer.write(head)
            await up_writer.drain()
            await _pipe_both(reader, writer, up_reader, up_writer)
            return False
        body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
        # One upstream connection per request, closed by the upstream after its answer.
        rewritten = [line for line in lines[1:] if line and
                     not line.lower().startswith("connection:")]
        up_writer.write(("\r\n".join([lines[0], *rewritten, "Connection: close"]) +
                         "\r\n\r\n").encode("latin-1") + body)
        await up_writer.drain()
        response = await up_reader.read()
        up_writer.close()
        resp_head, _, resp_body = response.partition(b"\r\n\r\n")
        resp_lines = [line for line in resp_head.split(b"\r\n") if
                      not line.lower().startswith((b"connection:", b"content-length:",
                                                   b"transfer-encoding:"))]
        writer.write(b"\r\n".join(resp_lines) + b"\r\n" + _CORS +
                     f"Content-Length: {len(resp_body)}\r\n\r\n".encode() + resp_body)
        await writer.drain()
        return headers.get("connection", "").lower() != "close"


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()


async def _pipe_both(a_reader: asyncio.StreamReader, a_writer: asyncio.StreamWriter,
                     b_reader: asyncio.StreamReader, b_writer: asyncio.StreamWriter) -> None:
    """Copy both ways until either side closes, then close both (a dropped upstream socket
    reaches the client as a dropped socket)."""
    tasks = [asyncio.create_task(_pipe(a_reader, b_writer)),
             asyncio.create_task(_pipe(b_reader, a_writer))]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    for w in (a_writer, b_writer):
        if w.transport is not None:
            w.transport.abort()


def _hostport(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


class StandIns:
    """PostgREST and Realtime stand-ins on one database behind one gateway: a local
    "Supabase project" at `url`, with the anon and service_role keys as signed JWTs."""

    def __init__(self, database_url: str, *, subscribe_delay: float = 0.05) -> None:
        from tests.fakes.jwt import role_key
        from tests.fakes.postgrest import PostgrestStub
        from tests.fakes.realtime import RealtimeStub

        self.anon_key = role_key("anon")
        self.service_key = role_key("service_role")
        self.rest = PostgrestStub(database_url, service_key=self.service_key)
        self.realtime = RealtimeStub(database_url, subscribe_delay=subscribe_delay)
        self.gateway: Gateway | None = None
        self.url = ""
        self.realtime_url = ""

    def start(self) -> str:
        rest_url = self.rest.start()
        self.realtime_url = self.realtime.start()
        self.gateway = Gateway(rest_url, self.realtime_url)
        self.url = self.gateway.start()
        return self.url

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        self.realtime.stop()
        self.rest.stop()
