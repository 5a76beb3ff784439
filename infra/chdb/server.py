#!/usr/bin/env python3
"""ClickHouse-compatible HTTP endpoint backed by the embedded ClickHouse engine (chDB).

Development and CI only: production runs a real ClickHouse server (see compose.yaml). This
process speaks the subset of the ClickHouse HTTP interface that the Rust `clickhouse` crate
(0.15, default features: LZ4 on, validation on) and curl-style clients use:

* ``GET /`` and ``GET /ping`` answer ``Ok.\\n``.
* Queries: ``POST /`` with the SQL in the body, or ``GET|POST /?query=...``; the URL ``query``
  is the beginning of the statement and the body the rest (ClickHouse semantics), so
  ``INSERT ... FORMAT X`` in the URL with the rows in the body streams the rows into the
  table. ``multipart/form-data`` bodies (fields ``query`` and ``param_<name>``) are accepted.
* URL parameters: ``database``, ``default_format``, ``query``, ``param_<name>`` (server-side
  query parameters ``{name:Type}``), ``decompress=1`` (request body in ClickHouse's compressed
  block framing: CityHash128 checksum, method byte, sizes, LZ4/none/ZSTD block),
  ``compress=1`` (response in the same framing), ``session_id``/``session_timeout``; every other
  parameter is a ClickHouse setting applied to that query only. Settings that only mean
  something to the HTTP layer of a real server are ignored. An unknown setting is an error,
  as on a real server.
* Responses are not HTTP-compressed unless ``enable_http_compression=1`` is passed, in which
  case ``Accept-Encoding`` (lz4, gzip, deflate) is honoured. The crate decompresses according
  to ``Content-Encoding`` and accepts plain bodies.
* Errors: a non-200 status, header ``X-ClickHouse-Exception-Code`` and the exception text
  (``Code: N. DB::Exception: ...``) as the body.

One process owns one data folder (``--data``): it takes an exclusive lock on it. Queries run
in parallel on a pool of chDB connections to that folder (chDB connections are independent
sessions on one engine and safe to use from several threads, one thread per connection at a
time). Multi-statement requests are rejected, as a real server does.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterable, Iterator, List, Optional, Tuple
from urllib.parse import parse_qsl, urlsplit

import lz4.block
import lz4.frame

try:  # Needed only to verify/produce checksums of compressed blocks.
    from clickhouse_cityhash.cityhash import CityHash128 as _cityhash128
except ImportError:  # pragma: no cover - optional dependency
    _cityhash128 = None

try:  # Optional: ZSTD-compressed request blocks (method 0x90).
    import zstandard as _zstd  # type: ignore
except ImportError:  # pragma: no cover - optional dependency
    _zstd = None

import chdb  # noqa: F401  (loads the engine library)
from chdb.state import sqlitelike

SERVER_NAME = "proxy-stone-chdb"
READ_CHUNK = 1 << 20
INSERT_HEAD_LIMIT = 1 << 16  # bytes scanned for "INSERT ... FORMAT <name>\n" before the data
MAX_POOL = 16
DEFAULT_SESSION_TIMEOUT = 60.0
KEEP_ALIVE_TIMEOUT = 60  # seconds a keep-alive connection may stay idle (crate's pool: 2 s)

# URL parameters that belong to the HTTP interface of a real server rather than to the query.
IGNORED_PARAMS = {
    "query", "database", "default_format", "compress", "decompress", "user", "password",
    "quota_key", "query_id", "session_id", "session_timeout", "session_check", "role",
    "wait_end_of_query", "buffer_size", "send_progress_in_http_headers",
    "http_headers_progress_interval_ms", "enable_http_compression", "http_zlib_compression_level",
    "http_native_compression_disable_checksumming_on_decompress", "add_http_cors_header",
    "cancel_http_readonly_queries_on_client_close", "http_response_buffer_size",
    "client_protocol_version", "http_write_exception_in_output_format",
    "http_wait_end_of_query", "http_response_headers",
}

# Exception code -> HTTP status, following ClickHouse's exceptionCodeToHTTPStatus.
HTTP_STATUS_BY_CODE = {
    194: 401, 195: 401, 516: 401, 192: 401,  # auth
    164: 403, 497: 403,  # READONLY, ACCESS_DENIED
    81: 404, 60: 404, 16: 404, 47: 404, 46: 404,  # unknown database/table/column/identifier/function
    62: 400, 6: 400, 25: 400, 26: 400, 27: 400, 32: 400, 33: 400, 38: 400, 41: 400, 53: 400,
    72: 400, 69: 400, 70: 400, 43: 400, 44: 400, 35: 400, 36: 400, 42: 400, 115: 400,
    456: 400, 457: 400, 117: 400, 118: 400, 117000: 400,
    57: 500, 159: 500, 202: 500, 241: 500,
    354: 400, 40: 400, 271: 400, 432: 400,  # decompression / checksum / unknown codec
    99: 400,  # UNKNOWN_PACKET_FROM_CLIENT (bad multipart etc.)
    373: 423,  # SESSION_IS_LOCKED
    372: 404,  # SESSION_NOT_FOUND
}

CONTENT_TYPES = [
    (re.compile(r"^(TabSeparated|TSV)", re.I), "text/tab-separated-values; charset=UTF-8"),
    (re.compile(r"^CSV", re.I), "text/csv; charset=UTF-8; header=absent"),
    (re.compile(r"^(JSON|NDJSON)", re.I), "application/json; charset=UTF-8"),
    (re.compile(r"^(XML)", re.I), "application/xml; charset=UTF-8"),
    (re.compile(r"^(Pretty|Vertical|Markdown|Values|Raw|LineAsString|Template)", re.I),
     "text/plain; charset=UTF-8"),
]

INSERT_START_RE = re.compile(rb"\A\s*INSERT\s", re.I)
INSERT_FORMAT_RE = re.compile(
    rb"\A(?P<stmt>\s*INSERT\s+INTO\s+.*?)\s+FORMAT\s+(?P<fmt>[A-Za-z0-9_]+)(?P<end>[ \t]*(?:\r?\n|\Z))",
    re.I | re.S,
)
NOT_A_FORMAT_INSERT_RE = re.compile(rb"\b(VALUES|SELECT|WITH)\b", re.I)
QUOTED_IDENT_RE = re.compile(rb"`(?:[^`\\]|\\.)*`|\"(?:[^\"\\]|\\.)*\"")
READONLY_QUERY_RE = re.compile(
    r"\A\s*\(*\s*(SELECT|WITH|SHOW|DESC|DESCRIBE|EXISTS|EXPLAIN|CHECK)\b", re.I)
STATEFUL_QUERY_RE = re.compile(r"\A\s*(SET|USE|CREATE\s+TEMPORARY|DROP\s+TEMPORARY)\b", re.I)
TRAILING_FORMAT_RE = re.compile(r"\bFORMAT\s+([A-Za-z0-9_]+)\s*;?\s*\Z", re.I)
CODE_RE = re.compile(r"Code:\s*(\d+)\.")
SETTING_NAME_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")

BLOCK_METHOD_NONE = 0x02
BLOCK_METHOD_LZ4 = 0x82
BLOCK_METHOD_ZSTD = 0x90
BLOCK_CHECKSUM_SIZE = 16
BLOCK_HEADER_SIZE = 9
BLOCK_MAX_SIZE = 1 << 30


def log(msg: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    sys.stderr.write(f"{stamp} {SERVER_NAME}: {msg}\n")
    sys.stderr.flush()


class ClickHouseError(Exception):
    """An exception with a ClickHouse error code, rendered like the server renders it."""

    def __init__(self, code: int, message: str, name: str = ""):
        super().__init__(message)
        self.code = code
        self.name = name
        self.message = message

    def text(self, version: str) -> str:
        msg = self.message
        if not msg.startswith("Code:"):
            suffix = f" ({self.name})" if self.name else ""
            msg = f"Code: {self.code}. DB::Exception: {msg}{suffix}"
        if "(version " not in msg:
            msg = f"{msg} (version {version})"
        return msg + "\n"

    @classmethod
    def from_engine(cls, exc: BaseException) -> "ClickHouseError":
        text = str(exc).strip()
        idx = text.find("Code:")
        if idx > 0:
            text = text[idx:]
        m = CODE_RE.search(text)
        code = int(m.group(1)) if m else 1001  # STD_EXCEPTION
        return cls(code, text)


# --------------------------------------------------------------------------------------------
# CityHash128 checksums of ClickHouse compressed blocks.
#
# The crate computes `cityhash_102_128(header_and_data).rotate_right(64)` and writes it as a
# little-endian u128: CityHash v1.0.2's 128-bit pair, each half little-endian, the same 16
# bytes a real server writes. `clickhouse_cityhash.CityHash128` returns a Python int whose
# high 64 bits are the half that goes first on the wire (checked against the crate's
# `_priv::lz4_compress` output).
# --------------------------------------------------------------------------------------------


def block_checksum(data: bytes) -> bytes:
    if _cityhash128 is None:
        raise ClickHouseError(1001, "clickhouse-cityhash is not installed", "STD_EXCEPTION")
    value = _cityhash128(data)
    return struct.pack("<QQ", value >> 64, value & 0xFFFFFFFFFFFFFFFF)


def decompress_blocks(raw: Iterable[bytes], verify: bool) -> Iterator[bytes]:
    """Decode a stream of ClickHouse compressed blocks into the uncompressed bytes."""
    buf = bytearray()
    pos = 0
    for chunk in raw:
        if pos:
            del buf[:pos]
            pos = 0
        buf += chunk
        while len(buf) - pos >= BLOCK_CHECKSUM_SIZE + BLOCK_HEADER_SIZE:
            hdr = pos + BLOCK_CHECKSUM_SIZE
            method = buf[hdr]
            csize, usize = struct.unpack_from("<II", buf, hdr + 1)
            if csize < BLOCK_HEADER_SIZE or csize > BLOCK_MAX_SIZE or usize > BLOCK_MAX_SIZE:
                raise ClickHouseError(
                    271, f"Too large or invalid size of compressed block: {csize}", "CANNOT_DECOMPRESS")
            end = hdr + csize
            if len(buf) < end:
                break
            body = bytes(buf[hdr:end])
            if verify and _cityhash128 is not None:
                if block_checksum(body) != bytes(buf[pos:hdr]):
                    raise ClickHouseError(
                        40, "Checksum doesn't match: corrupted data.", "CHECKSUM_DOESNT_MATCH")
            payload = body[BLOCK_HEADER_SIZE:]
            if method == BLOCK_METHOD_LZ4:
                try:
                    out = lz4.block.decompress(payload, uncompressed_size=usize)
                except Exception as exc:  # lz4.block.LZ4BlockError
                    raise ClickHouseError(271, f"Cannot decompress LZ4 block: {exc}",
                                          "CANNOT_DECOMPRESS") from None
            elif method == BLOCK_METHOD_NONE:
                out = payload
            elif method == BLOCK_METHOD_ZSTD and _zstd is not None:
                out = _zstd.ZstdDecompressor().decompress(payload, max_output_size=usize)
            else:
                raise ClickHouseError(
                    432, f"Unknown codec family code: 0x{method:02x}", "UNKNOWN_CODEC")
            if len(out) != usize:
                raise ClickHouseError(271, "Decompressed size mismatch", "CANNOT_DECOMPRESS")
            pos = end
            if out:
                yield out
    if len(buf) - pos:
        raise ClickHouseError(
            271, "Truncated compressed block at end of request body", "CANNOT_DECOMPRESS")


def compress_blocks(data: bytes, block_size: int = 1 << 20) -> bytes:
    """Encode `data` in ClickHouse's compressed block framing (LZ4), as for `compress=1`."""
    out = bytearray()
    for off in range(0, max(len(data), 1), block_size):
        piece = data[off:off + block_size]
        if not piece:
            break
        comp = lz4.block.compress(piece, store_size=False)
        header = struct.pack("<BII", BLOCK_METHOD_LZ4, len(comp) + BLOCK_HEADER_SIZE, len(piece))
        body = header + comp
        out += block_checksum(body)
        out += body
    return bytes(out)


# --------------------------------------------------------------------------------------------
# SQL helpers
# --------------------------------------------------------------------------------------------


def has_multiple_statements(sql: str) -> bool:
    """True if `sql` holds a `;` outside quotes and comments followed by more SQL."""
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"`":
            i += 1
            while i < n and sql[i] != ch:
                i += 2 if sql[i] == "\\" else 1
            i += 1
        elif sql.startswith("--", i) or ch == "#":
            nl = sql.find("\n", i)
            i = n if nl < 0 else nl + 1
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif ch == ";":
            rest = sql[i + 1:]
            return bool(rest.strip()) and not _only_comments(rest)
        else:
            i += 1
    return False


def _strip_comments(sql: str) -> str:
    return re.sub(r"--[^\n]*|#[^\n]*|/\*.*?\*/", "", sql, flags=re.S)


def _only_comments(sql: str) -> bool:
    return not _strip_comments(sql).strip().strip(";").strip()


def sql_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def backquote(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def parse_multipart(body: bytes, content_type: str) -> Dict[str, str]:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise ClickHouseError(99, "multipart/form-data without boundary", "BAD_REQUEST")
    delim = b"--" + m.group(1).encode("latin-1")
    fields: Dict[str, str] = {}
    for part in body.split(delim)[1:]:
        if part.startswith(b"--"):
            break
        part = part[2:] if part.startswith(b"\r\n") else part
        head, sep, value = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        if value.endswith(b"\r\n"):
            value = value[:-2]
        nm = re.search(rb'name="([^"]*)"', head)
        if nm:
            fields[nm.group(1).decode("utf-8", "replace")] = value.decode("utf-8")
    return fields


# --------------------------------------------------------------------------------------------
# chDB connections
# --------------------------------------------------------------------------------------------


class Session:
    def __init__(self, conn: sqlitelike.Connection, timeout: float):
        self.conn = conn
        self.lock = threading.Lock()
        self.timeout = timeout
        self.last_used = time.monotonic()


class ConnState:
    """A pooled connection's database (None: not known yet) and the settings set on it."""

    def __init__(self) -> None:
        self.database: Optional[str] = None
        self.settings: Dict[str, str] = {}


class Engine:
    """A pool of chDB connections to one data folder, plus named HTTP sessions."""

    def __init__(self, path: str):
        self.path = path
        # The anchor keeps the engine alive while pooled connections come and go.
        self.anchor = sqlitelike.connect(path)
        self.version = self._scalar(self.anchor, "SELECT version()")
        self.timezone = self._scalar(self.anchor, "SELECT timezone()")
        self._idle: List[sqlitelike.Connection] = []
        # What each pooled connection was left with: its database and the settings set on it
        # (see QueryContext). Dropped with the connection.
        self._state: Dict[int, "ConnState"] = {}
        self._lock = threading.Lock()
        self._sessions: Dict[str, Session] = {}
        self._closed = False

    @staticmethod
    def _scalar(conn: sqlitelike.Connection, sql: str) -> str:
        return conn.query(sql, "TabSeparatedRaw").bytes().decode().strip()

    def acquire(self) -> sqlitelike.Connection:
        with self._lock:
            if self._closed:
                raise ClickHouseError(210, "Server is shutting down", "NETWORK_ERROR")
            if self._idle:
                return self._idle.pop()
        return sqlitelike.connect(self.path)

    def state(self, conn: sqlitelike.Connection) -> "ConnState":
        with self._lock:
            return self._state.setdefault(id(conn), ConnState())

    def release(self, conn: sqlitelike.Connection, healthy: bool = True) -> None:
        with self._lock:
            if healthy and not self._closed and len(self._idle) < MAX_POOL:
                self._idle.append(conn)
                return
            self._state.pop(id(conn), None)
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass

    def session(self, session_id: str, timeout: float, check: bool) -> Session:
        with self._lock:
            if self._closed:
                raise ClickHouseError(210, "Server is shutting down", "NETWORK_ERROR")
            sess = self._sessions.get(session_id)
            if sess is None:
                if check:
                    raise ClickHouseError(372, f"Session {session_id} not found",
                                          "SESSION_NOT_FOUND")
                sess = Session(sqlitelike.connect(self.path), timeout)
                self._sessions[session_id] = sess
            sess.timeout = timeout
            sess.last_used = time.monotonic()
            return sess

    def reap_sessions(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [k for k, s in self._sessions.items()
                       if now - s.last_used > s.timeout and not s.lock.locked()]
            victims = [self._sessions.pop(k) for k in expired]
        for sess in victims:
            try:
                sess.conn.close()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = self._idle + [s.conn for s in self._sessions.values()]
            self._idle, self._sessions = [], {}
        for conn in conns + [self.anchor]:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass


class QueryContext:
    """Gives a connection the request's database and settings.

    A pooled connection is left as the request had it, and the next request changes only what
    differs: it switches database only for another database, and sets only the settings that
    differ, resetting (to DEFAULT) those it does not ask for. A request therefore sees exactly
    its own database and settings, as on a real server, but the common case (the same client's
    next query: same database, same settings) runs no extra statement. Each statement through
    chDB costs about a millisecond; the undo-everything-after approach cost five per request.
    A query that changes connection state itself (SET, USE) retires its connection (see
    ``_query``). ``readonly`` is undone after the request, since a connection in readonly mode
    refuses the next request's SET.

    A session's connection keeps the session's own state: its previous values are restored after
    each request.
    """

    def __init__(self, lease: "Lease", database: Optional[str], settings: Dict[str, str]):
        assert lease.conn is not None
        self.lease = lease
        self.conn = lease.conn
        self.database = database
        self.settings = settings
        self.session = lease.session is not None
        self.prev_db: Optional[str] = None
        self.prev_settings: Dict[str, str] = {}
        self.dirty = False

    def __enter__(self) -> "QueryContext":
        for name in self.settings:
            if not SETTING_NAME_RE.match(name):
                raise ClickHouseError(115, f"Unknown setting '{name}'", "UNKNOWN_SETTING")
        if self.session:
            self._enter_session()
        else:
            self._enter_pooled()
        return self

    def _enter_pooled(self) -> None:
        state = self.lease.engine.state(self.conn)
        database = self.database or "default"
        if state.database != database:
            state.database = None  # unknown until the USE succeeds
            run(self.conn, f"USE {backquote(database)}")
            state.database = database
        changes = [f"{k} = DEFAULT" for k in state.settings if k not in self.settings]
        changes += [f"{k} = {sql_quote(v)}" for k, v in self.settings.items()
                    if state.settings.get(k) != v]
        if changes:
            try:
                run(self.conn, f"SET {', '.join(changes)}")
            except ClickHouseError:
                # Some of it may have been applied: this connection's state is unknown now.
                self.lease.healthy = False
                raise
            state.settings = dict(self.settings)
        # A connection left in readonly mode would refuse the next request's SET.
        self.dirty = "readonly" in self.settings

    def _enter_session(self) -> None:
        if self.database:
            self.prev_db = Engine._scalar(self.conn, "SELECT currentDatabase()")
            if self.database != self.prev_db:
                self.dirty = True
                run(self.conn, f"USE {backquote(self.database)}")
            else:
                self.prev_db = None
        if self.settings:
            names = ", ".join(sql_quote(n) for n in self.settings)
            rows = self.conn.query(
                f"SELECT name, value, changed FROM system.settings WHERE name IN ({names})",
                "TabSeparatedRaw").bytes().decode().splitlines()
            for row in rows:
                name, value, changed = row.split("\t")
                if changed == "1":
                    self.prev_settings[name] = value
            self.dirty = True
            assigns = ", ".join(f"{k} = {sql_quote(v)}" for k, v in self.settings.items())
            run(self.conn, f"SET {assigns}")

    def __exit__(self, *exc) -> None:
        if not self.dirty:
            return
        try:
            if self.settings:
                resets = ", ".join(
                    f"{k} = {sql_quote(self.prev_settings[k])}" if k in self.prev_settings
                    else f"{k} = DEFAULT" for k in self.settings)
                run(self.conn, f"SET {resets}")
                if not self.session:
                    self.lease.engine.state(self.conn).settings = {}
            if self.prev_db is not None:
                run(self.conn, f"USE {backquote(self.prev_db)}")
        except ClickHouseError as err:
            # Never hand this connection to another request with our settings still on it.
            log(f"could not reset connection state, discarding it: {err.message[:300]}")
            self.lease.healthy = False


class Lease:
    """A connection for one request: from the pool, or the session's own connection."""

    def __init__(self, engine: Engine, params: Dict[str, str]):
        self.engine = engine
        self.params = params
        self.conn: Optional[sqlitelike.Connection] = None
        self.session: Optional[Session] = None
        self.healthy = True

    def __enter__(self) -> "Lease":
        sid = self.params.get("session_id")
        if sid:
            try:
                timeout = float(self.params.get("session_timeout") or DEFAULT_SESSION_TIMEOUT)
            except ValueError:
                raise ClickHouseError(
                    27, "Invalid session timeout", "CANNOT_PARSE_INPUT_ASSERTION_FAILED"
                ) from None
            self.session = self.engine.session(
                sid, timeout, self.params.get("session_check") == "1")
            if not self.session.lock.acquire(timeout=30):
                raise ClickHouseError(373, f"Session {sid} is locked by a concurrent client",
                                      "SESSION_IS_LOCKED")
            self.conn = self.session.conn
            return self
        self.conn = self.engine.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.session is not None:
            self.session.last_used = time.monotonic()
            self.session.lock.release()
            return False
        # Engine errors leave the connection usable; anything else (client gone in the
        # middle of a streaming insert, a failed reset) retires it.
        healthy = self.healthy and (exc_type is None or isinstance(exc, ClickHouseError))
        if self.conn is not None:
            self.engine.release(self.conn, healthy)
        return False


def run(conn: sqlitelike.Connection, sql: str, fmt: str = "TabSeparated",
        params: Optional[Dict[str, str]] = None):
    try:
        return conn.query(sql, fmt, params=params or None)
    except ClickHouseError:
        raise
    except Exception as exc:  # noqa: BLE001 - chDB raises ChdbError/RuntimeError
        raise ClickHouseError.from_engine(exc) from None


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: Tuple[str, int], engine: Engine):
        self.engine = engine
        self.shutting_down = False
        self.inflight = 0
        self.inflight_cv = threading.Condition()
        super().__init__(addr, Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can stall offline.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = self.server_address[:2]

    def enter(self) -> bool:
        with self.inflight_cv:
            if self.shutting_down:
                return False
            self.inflight += 1
            return True

    def leave(self) -> None:
        with self.inflight_cv:
            self.inflight -= 1
            self.inflight_cv.notify_all()

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.inflight_cv:
            self.shutting_down = True
            while self.inflight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    log(f"shutdown: {self.inflight} request(s) still running, closing anyway")
                    return
                self.inflight_cv.wait(left)


class BodyReader:
    """Reads a request body (Content-Length or chunked) from the handler's socket file."""

    def __init__(self, rfile, headers):
        self.rfile = rfile
        te = (headers.get("Transfer-Encoding") or "").lower()
        self.chunked = "chunked" in te
        length = headers.get("Content-Length")
        self.remaining = int(length) if (length and not self.chunked) else 0
        if self.remaining < 0:
            raise ClickHouseError(99, "Negative Content-Length", "BAD_REQUEST")
        self.done = not self.chunked and self.remaining == 0
        self.broken = False
        self._gen = self._generate()

    def __iter__(self) -> Iterator[bytes]:
        return self._gen

    def _generate(self) -> Iterator[bytes]:
        try:
            if self.chunked:
                yield from self._chunks()
            else:
                while self.remaining > 0:
                    data = self.rfile.read(min(READ_CHUNK, self.remaining))
                    if not data:
                        raise ClickHouseError(
                            33, "Unexpected end of request body", "CANNOT_READ_ALL_DATA")
                    self.remaining -= len(data)
                    yield data
        except BaseException:
            self.broken = True
            raise
        self.done = True

    def _chunks(self) -> Iterator[bytes]:
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise ClickHouseError(33, "Unexpected end of chunked body", "CANNOT_READ_ALL_DATA")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ClickHouseError(99, "Malformed chunk size", "BAD_REQUEST") from None
            if size == 0:
                while True:  # trailers
                    trailer = self.rfile.readline(8192)
                    if trailer in (b"\r\n", b"\n", b""):
                        return
            while size > 0:
                data = self.rfile.read(min(READ_CHUNK, size))
                if not data:
                    raise ClickHouseError(
                        33, "Unexpected end of chunked body", "CANNOT_READ_ALL_DATA")
                size -= len(data)
                yield data
            self.rfile.readline(16)  # CRLF after the chunk

    def drain(self) -> bool:
        """Consume what is left; False if the connection must be closed instead."""
        if self.done:
            return True
        if self.broken:
            return False
        try:
            for _ in self._gen:
                pass
        except Exception:  # noqa: BLE001
            return False
        return self.done


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ClickHouse"  # some tools sniff this; the body says what we are
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = KEEP_ALIVE_TIMEOUT
    server: Server

    # Quiet access log; errors are logged explicitly, one line each.
    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_HEAD(self) -> None:  # noqa: N802
        self._send(200, b"", "text/plain; charset=UTF-8", head_only=True)

    # ----------------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        if not self.server.enter():
            self.close_connection = True
            self._send(503, b"Server is shutting down\n", "text/plain; charset=UTF-8",
                       extra={"Connection": "close"})
            return
        body: Optional[BodyReader] = None
        try:
            url = urlsplit(self.path)
            params = dict(parse_qsl(url.query, keep_blank_values=True))
            body = BodyReader(self.rfile, self.headers)
            if url.path in ("/ping", "/ping/") or (
                    url.path == "/" and method == "GET" and "query" not in params):
                body.drain()
                self._send(200, b"Ok.\n", "text/html; charset=UTF-8")
                return
            if url.path not in ("/", "/query"):
                body.drain()
                self._send(404, b"There is no handle " + url.path.encode() + b"\n",
                           "text/plain; charset=UTF-8")
                return
            self._handle_query(method, params, body)
            if not body.drain():  # e.g. a GET with a body: keep the connection in step
                self.close_connection = True
        except ClickHouseError as err:
            self._send_error(err, body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001
            self._send_error(ClickHouseError(1001, f"{type(exc).__name__}: {exc}",
                                             "STD_EXCEPTION"), body)
        finally:
            self.server.leave()

    def _handle_query(self, method: str, params: Dict[str, str], body: BodyReader) -> None:
        engine = self.server.engine
        query_id = params.get("query_id") or str(uuid.uuid4())
        self._query_id = query_id
        ctype = self.headers.get("Content-Type") or ""
        url_query = params.get("query", "")
        decompress = params.get("decompress") == "1"

        query_params: Dict[str, str] = {
            k[6:]: v for k, v in params.items() if k.startswith("param_")}
        settings = {k: v for k, v in params.items()
                    if k not in IGNORED_PARAMS and not k.startswith("param_")}

        if method == "POST" and ctype.lower().startswith("multipart/form-data"):
            raw = b"".join(body)
            fields = parse_multipart(raw, ctype)
            for k, v in fields.items():
                if k.startswith("param_"):
                    query_params[k[6:]] = v
            form_query = fields.get("query", "")
            sql_prefix = url_query + ("\n" if url_query and form_query else "") + form_query
            data: Iterator[bytes] = iter(())
        else:
            sql_prefix = url_query
            data = iter(body) if method == "POST" else iter(())
            if decompress:
                data = decompress_blocks(
                    data, params.get(
                        "http_native_compression_disable_checksumming_on_decompress") != "1")

        # URL query and body are concatenated into one statement, as the server does.
        head = bytearray(sql_prefix.encode("utf-8"))
        if method == "POST" and head and not head[-1:].isspace():
            head += b"\n"
        # Find out whether this is "INSERT ... FORMAT <fmt>" followed by data, reading no more
        # of the body than needed to see the statement.
        exhausted = method != "POST"
        while INSERT_START_RE.match(head) or (not head.strip() and not exhausted):
            m = INSERT_FORMAT_RE.match(head)
            if m and (m.group("end").endswith(b"\n") or exhausted) \
                    and not NOT_A_FORMAT_INSERT_RE.search(
                        QUOTED_IDENT_RE.sub(b"``", m.group("stmt"))):
                rest = bytes(head[m.end():])
                stmt = m.group("stmt").decode("utf-8").strip()
                fmt = m.group("fmt").decode("ascii")
                self._insert(engine, params, settings, stmt, fmt, rest, data)
                return
            if exhausted or len(head) > INSERT_HEAD_LIMIT:
                break
            try:
                head += next(data)
            except StopIteration:
                exhausted = True

        # Plain query: the whole statement is URL query + body.
        for chunk in data:
            head += chunk
        try:
            sql = head.decode("utf-8")
        except UnicodeDecodeError:
            raise ClickHouseError(62, "Query is not valid UTF-8", "SYNTAX_ERROR") from None
        if not sql.strip():
            raise ClickHouseError(62, "Empty query", "SYNTAX_ERROR")
        if has_multiple_statements(sql):
            raise ClickHouseError(62, "Syntax error (Multi-statements are not allowed)",
                                  "SYNTAX_ERROR")
        if method == "GET" and not READONLY_QUERY_RE.match(_strip_comments(sql)):
            raise ClickHouseError(
                164, "Cannot execute query in readonly mode. For queries over HTTP, method GET "
                "implies readonly. You should use method POST for modifying queries", "READONLY")
        fmt = params.get("default_format") or "TabSeparated"
        m = TRAILING_FORMAT_RE.search(sql)
        out_fmt = m.group(1) if m else fmt

        started = time.monotonic()
        with Lease(engine, params) as lease:
            if lease.session is None and STATEFUL_QUERY_RE.match(_strip_comments(sql)):
                # Outside a session, SET/USE/temporary tables must not outlive the request
                # (as on a real server): retire the connection instead of pooling it.
                lease.healthy = False
            with QueryContext(lease, params.get("database"), settings):
                result = run(lease.conn, sql, fmt, query_params)
        payload = result.bytes() if len(result) else b""
        summary = {
            "read_rows": result.rows_read(), "read_bytes": result.bytes_read(),
            "written_rows": result.rows_written(), "written_bytes": result.bytes_written(),
            "total_rows_to_read": result.rows_read(), "result_rows": 0,
            "result_bytes": len(payload),
            "elapsed_ns": int((time.monotonic() - started) * 1e9),
        }
        self._send_result(payload, out_fmt, params, summary)

    def _insert(self, engine: Engine, params: Dict[str, str], settings: Dict[str, str],
                stmt: str, fmt: str, rest: bytes, data: Iterator[bytes]) -> None:
        started = time.monotonic()
        with Lease(engine, params) as lease:
            with QueryContext(lease, params.get("database"), settings):
                try:
                    inserter = lease.conn.send_insert(stmt, fmt)
                except Exception as exc:  # noqa: BLE001
                    raise ClickHouseError.from_engine(exc) from None
                try:
                    if rest:
                        inserter.append(rest)
                    for chunk in data:
                        inserter.append(chunk)
                    res = inserter.finish()
                except ClickHouseError:
                    _cancel(inserter)
                    raise
                except (BrokenPipeError, ConnectionResetError):
                    _cancel(inserter)
                    raise
                except Exception as exc:  # noqa: BLE001
                    _cancel(inserter)
                    raise ClickHouseError.from_engine(exc) from None
        summary = {
            "read_rows": res.rows_written, "read_bytes": res.bytes_written,
            "written_rows": res.rows_written, "written_bytes": res.bytes_written,
            "total_rows_to_read": 0, "result_rows": res.rows_written,
            "result_bytes": res.bytes_written,
            "elapsed_ns": int((time.monotonic() - started) * 1e9),
        }
        self._send_result(b"", params.get("default_format") or "TabSeparated", params, summary)

    # ----------------------------------------------------------------------------------------

    def _send_result(self, payload: bytes, fmt: str, params: Dict[str, str],
                     summary: Dict[str, int]) -> None:
        ctype = "application/octet-stream"
        for pattern, value in CONTENT_TYPES:
            if pattern.match(fmt):
                ctype = value
                break
        extra = {
            "X-ClickHouse-Format": fmt,
            "X-ClickHouse-Summary": json.dumps({k: str(v) for k, v in summary.items()},
                                               separators=(",", ":")),
        }
        if params.get("compress") == "1" and payload:
            payload = compress_blocks(payload)
            ctype = "application/octet-stream"
        elif params.get("enable_http_compression") == "1" and payload:
            enc = self._pick_encoding()
            if enc == "lz4":
                payload = lz4.frame.compress(payload)
            elif enc == "gzip":
                comp = zlib.compressobj(3, zlib.DEFLATED, 31)
                payload = comp.compress(payload) + comp.flush()
            elif enc == "deflate":
                payload = zlib.compress(payload, 3)
            if enc:
                extra["Content-Encoding"] = enc
        self._send(200, payload, ctype, extra=extra)

    def _pick_encoding(self) -> str:
        accepted = [p.split(";")[0].strip().lower()
                    for p in (self.headers.get("Accept-Encoding") or "").split(",")]
        for enc in ("lz4", "gzip", "deflate"):
            if enc in accepted:
                return enc
        return ""

    def _send_error(self, err: ClickHouseError, body: Optional[BodyReader]) -> None:
        engine = self.server.engine
        text = err.text(engine.version)
        log(f"error code={err.code} {self.command} {urlsplit(self.path).path}: "
            f"{text.strip()[:500]}")
        if body is None or not body.drain():
            self.close_connection = True
        status = HTTP_STATUS_BY_CODE.get(err.code, 500)
        extra = {"X-ClickHouse-Exception-Code": str(err.code)}
        if self.close_connection:
            extra["Connection"] = "close"
        try:
            self._send(status, text.encode("utf-8", "replace"), "text/plain; charset=UTF-8",
                       extra=extra)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(self, status: int, payload: bytes, ctype: str,
              extra: Optional[Dict[str, str]] = None, head_only: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-ClickHouse-Server-Display-Name", SERVER_NAME)
        self.send_header("X-ClickHouse-Timezone", self.server.engine.timezone)
        qid = getattr(self, "_query_id", None)
        if qid:
            self.send_header("X-ClickHouse-Query-Id", qid)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if not self.close_connection:
            self.send_header("Keep-Alive", f"timeout={KEEP_ALIVE_TIMEOUT}")
        self.end_headers()
        if payload and not head_only:
            self.wfile.write(payload)
        self._query_id = None

    def send_response(self, code: int, message: Optional[str] = None) -> None:
        # Like BaseHTTPRequestHandler.send_response, without the access log line.
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())


def _cancel(inserter) -> None:
    try:
        inserter.cancel()
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------------------------


def lock_data_dir(path: str):
    os.makedirs(path, exist_ok=True)
    lock_path = os.path.join(path, ".proxy-stone-chdb.lock")
    handle = open(lock_path, "a+")  # noqa: SIM115 - held for the life of the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log(f"data folder {path} is in use by another process (lock {lock_path})")
        sys.exit(1)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def main(argv: Optional[List[str]] = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    default_data = os.path.normpath(os.path.join(here, "..", "..", ".stone", "clickhouse"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default=os.environ.get("STONE_CHDB_HOST", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("STONE_CHDB_PORT", "8123")))
    ap.add_argument("--data", default=os.environ.get("STONE_CHDB_DATA", default_data),
                    help="chDB data folder (persistent; one process owns it)")
    ap.add_argument("--pidfile", default=None,
                    help="write the process id here once listening; removed on exit")
    args = ap.parse_args(argv)

    data = os.path.abspath(args.data)
    _lock = lock_data_dir(data)  # held for the process lifetime
    engine = Engine(data)
    try:
        server = Server((args.host, args.port), engine)
    except OSError as exc:
        log(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
        engine.close()
        return 1

    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        if stopping.is_set():
            return
        stopping.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def reaper() -> None:
        while not stopping.wait(5):
            engine.reap_sessions()

    threading.Thread(target=reaper, daemon=True).start()

    if args.pidfile:
        with open(args.pidfile, "w", encoding="ascii") as handle:
            handle.write(f"{os.getpid()}\n")
    log(f"ClickHouse {engine.version} (chDB) listening on http://{args.host}:{server.server_port} "
        f"data={data} pid={os.getpid()}")
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        server.drain(30)
        engine.close()
        if args.pidfile:
            try:
                with open(args.pidfile, encoding="ascii") as handle:
                    if handle.read().strip() == str(os.getpid()):
                        os.unlink(args.pidfile)
            except OSError:
                pass
        log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
