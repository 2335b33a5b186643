"""The PostgreSQL store: one database shared by every server process, on any host that reaches it.

Selected by ``MCP_COLLAB_STORE_URL=postgresql://...`` (see ``open_store``). Tables::

    schema_migrations  version, applied_at: the migrations below that this database has had
    workers            name (key), seq (the order they were added), record (the worker as JSON)
    runs               id (key), created_at, status, strategy, workers (the columns filters and
                       paging use, indexed), owner_lease (the lease a save must hold), owner_queue
                       (a run on Temporal: its workers' step queue), record (the run as JSON, long
                       texts cut to a preview)
    run_texts          run_id, kind (output | diff), idx, body: a step's output or a worktree's
                       diff longer than the preview, whole, read only when one run is read
    step_stashes       run_id, idx, output, diff, output_truncated: a step's whole texts, stashed by
                       a Temporal worker (too long to travel) until the run's next save takes them;
                       deleted with the run
    leases             id (key), kind, host, pid, ..., slots, expires_at: which processes are alive,
                       by the database's clock (``now()``), so the hosts' clocks need not agree
    run_totals         (status, strategy, worker) -> runs, dollars, uncosted steps, tokens: the
                       totals of a list, kept up to date by every change of a run (worker '': whole
                       runs; a name: that worker's steps only), so a list never sums the history

The record is JSON text, not ``jsonb``: ``jsonb`` (and ``text``) cannot hold the NUL character, and
a CLI's output may contain one; long texts are ``bytea`` for the same reason. Nothing is lost.

Each call is one transaction on a connection of its own (a small pool shared by the threads the
orchestrator calls from), so concurrent writers in several processes or on several hosts lose no
update: a save replaces one run's row and texts atomically; ``save_runs`` commits its batch at once;
adding a worker whose name is taken is refused by the primary key, not by a read-then-write race.
A run's owner is fenced by its lease: a save is applied only while the stored owner holds the same
lease (``ON CONFLICT ... WHERE``, evaluated on the row's latest version under its lock), and a
recovery is one conditional ``UPDATE``, so two servers never both recover one run.

Every change of runs (a save, a recovery, a prune) first takes a transaction-scoped advisory lock
per run id (in one global order: no deadlock), reads what those runs add to the totals, changes
them, reads it again, and adds the difference to ``run_totals`` in the same transaction: writers
in any number of processes keep the totals exact, and a save that changes no total (most
intermediate states) writes no ``run_totals`` row at all.

Migrations are versioned and applied at start under an advisory lock (two servers starting at
once do not both apply one); a database migrated by a newer mcp-collab is refused untouched.

Every failure is one ``StoreError`` naming the database (never its password) and the cause.
"""

from __future__ import annotations

import contextlib
import decimal
import json
import logging
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar, get_args

import psycopg
from psycopg import sql
from pydantic import ValidationError

from ..config import shown_store_url, store_url_secrets
from ..errors import InvalidRequestError, LeaseLostError, RunTakenOverError, StoreError
from ..models import (
    STORED,
    TERMINAL_RUN_STATUSES,
    CostTotals,
    Lease,
    LeaseKind,
    Run,
    RunPage,
    RunStatus,
    Usage,
    Worker,
)
from .base import KEY_FORMAT, RunFilter, StepTexts, decode_cursor, encode_cursor, key_time

log = logging.getLogger("mcp_collab.store")

# The record of a run keeps this much of each output and diff (as the JSON store does): a page
# of runs stays small; the whole text is in run_texts, read when one run is read.
PREVIEW_CHARS = 2_000
# Connections one process holds at most: the orchestrator calls the store from a few threads at a
# time (each call is short); more would only queue inside the database.
POOL_SIZE = 8
# Seconds to wait for the server when connecting: a wrong host fails start-up quickly and clearly.
CONNECT_TIMEOUT_S = 10
# Seconds a call waits for a free connection before it is refused (every connection is busy).
ACQUIRE_TIMEOUT_S = 60.0
# The advisory lock key migrations run under (any constant; "mcpcollab" in ASCII, cut to 63 bits).
MIGRATION_LOCK = 0x6D6370636F6C6C61
# The first key of the per-run advisory locks (two-key form: "mcru" in ASCII); the second is the
# run id's CRC-32. Two runs sharing a CRC only wait for each other.
RUN_LOCKS = 0x6D637275
# Runs forgotten per transaction by a prune: each holds an advisory lock until its commit, and the
# database's lock table is shared (max_locks_per_transaction x max_connections, 6,400 by default).
PRUNE_CHUNK = 500

# Each migration is a list of statements, applied once, in order, in one transaction. Never edit
# one that has shipped: add the next.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE workers (
            name text PRIMARY KEY,
            seq bigserial NOT NULL,
            record text NOT NULL
        )""",
        """CREATE TABLE runs (
            id text PRIMARY KEY,
            created_at timestamptz NOT NULL,
            status text NOT NULL,
            strategy text NOT NULL,
            workers text[] NOT NULL,
            record text NOT NULL
        )""",
        "CREATE INDEX runs_newest ON runs (created_at DESC, id DESC)",
        "CREATE INDEX runs_by_status ON runs (status, created_at DESC, id DESC)",
        "CREATE INDEX runs_by_strategy ON runs (strategy, created_at DESC, id DESC)",
        "CREATE INDEX runs_by_worker ON runs USING gin (workers)",
        """CREATE TABLE run_texts (
            run_id text NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            kind text NOT NULL,
            idx integer NOT NULL,
            body bytea NOT NULL,
            PRIMARY KEY (run_id, kind, idx)
        )""",
        # What the cost totals of a list need of each step, summed by the database (not read run by run).
        """CREATE TABLE run_steps (
            run_id text NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            idx integer NOT NULL,
            worker text NOT NULL,
            cost_usd double precision,
            has_usage boolean NOT NULL,
            input_tokens bigint,
            output_tokens bigint,
            total_tokens bigint,
            cached_input_tokens bigint,
            cache_write_tokens bigint,
            reasoning_tokens bigint,
            PRIMARY KEY (run_id, idx)
        )""",
        "CREATE INDEX run_steps_by_worker ON run_steps (worker)",
    ),
    (
        """CREATE TABLE leases (
            id text PRIMARY KEY,
            kind text NOT NULL,
            host text NOT NULL,
            pid integer NOT NULL,
            start_ticks bigint,
            queue text,
            roots text[] NOT NULL,
            started_at timestamptz NOT NULL,
            expires_at timestamptz NOT NULL
        )""",
        "CREATE INDEX leases_by_expiry ON leases (expires_at)",
        # Runs stored before leases have none: their owners are judged as before.
        "ALTER TABLE runs ADD COLUMN owner_lease text",
    ),
    (
        """CREATE TABLE run_totals (
            status text NOT NULL,
            strategy text NOT NULL,
            worker text NOT NULL,
            runs bigint NOT NULL,
            cost_usd numeric NOT NULL,
            uncosted_steps bigint NOT NULL,
            input_tokens bigint NOT NULL,
            input_tokens_reports bigint NOT NULL,
            output_tokens bigint NOT NULL,
            output_tokens_reports bigint NOT NULL,
            total_tokens bigint NOT NULL,
            total_tokens_reports bigint NOT NULL,
            cached_input_tokens bigint NOT NULL,
            cached_input_tokens_reports bigint NOT NULL,
            cache_write_tokens bigint NOT NULL,
            cache_write_tokens_reports bigint NOT NULL,
            reasoning_tokens bigint NOT NULL,
            reasoning_tokens_reports bigint NOT NULL,
            PRIMARY KEY (status, strategy, worker)
        )""",
        # The totals of the runs stored so far, counted once (later changes keep them up to date).
        """INSERT INTO run_totals
           SELECT status, strategy, worker, count(*), sum(cost), sum(uncosted),
                  sum(i), sum(ir), sum(o), sum(orr), sum(t), sum(tr), sum(c), sum(cr), sum(w), sum(wr), sum(r), sum(rr)
           FROM (
               SELECT r.status, r.strategy, '' AS worker, coalesce(sum(s.cost_usd::numeric), 0) AS cost,
                      count(*) FILTER (WHERE s.cost_usd IS NULL AND s.has_usage) AS uncosted,
                      coalesce(sum(s.input_tokens), 0) AS i, count(s.input_tokens) AS ir,
                      coalesce(sum(s.output_tokens), 0) AS o, count(s.output_tokens) AS orr,
                      coalesce(sum(s.total_tokens), 0) AS t, count(s.total_tokens) AS tr,
                      coalesce(sum(s.cached_input_tokens), 0) AS c, count(s.cached_input_tokens) AS cr,
                      coalesce(sum(s.cache_write_tokens), 0) AS w, count(s.cache_write_tokens) AS wr,
                      coalesce(sum(s.reasoning_tokens), 0) AS r, count(s.reasoning_tokens) AS rr
               FROM runs r LEFT JOIN run_steps s ON s.run_id = r.id GROUP BY r.id
               UNION ALL
               SELECT r.status, r.strategy, s.worker, coalesce(sum(s.cost_usd::numeric), 0),
                      count(*) FILTER (WHERE s.cost_usd IS NULL AND s.has_usage),
                      coalesce(sum(s.input_tokens), 0), count(s.input_tokens),
                      coalesce(sum(s.output_tokens), 0), count(s.output_tokens),
                      coalesce(sum(s.total_tokens), 0), count(s.total_tokens),
                      coalesce(sum(s.cached_input_tokens), 0), count(s.cached_input_tokens),
                      coalesce(sum(s.cache_write_tokens), 0), count(s.cache_write_tokens),
                      coalesce(sum(s.reasoning_tokens), 0), count(s.reasoning_tokens)
               FROM runs r JOIN run_steps s ON s.run_id = r.id GROUP BY r.id, s.worker
           ) AS per_run
           GROUP BY status, strategy, worker""",
    ),
    (
        """CREATE TABLE step_stashes (
            run_id text NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            idx integer NOT NULL,
            output bytea NOT NULL,
            diff bytea NOT NULL,
            output_truncated boolean NOT NULL,
            PRIMARY KEY (run_id, idx)
        )""",
    ),
    # The runs open on a worker queue, and its workers' slots: what a dispatch to it may wait for.
    # An open run stored before this gets its queue at its next save.
    ("ALTER TABLE runs ADD COLUMN owner_queue text", "ALTER TABLE leases ADD COLUMN slots integer"),
)
SCHEMA_VERSION = len(MIGRATIONS)

_TERMINAL = sorted(TERMINAL_RUN_STATUSES)
_OPEN = sorted(set(get_args(RunStatus)) - TERMINAL_RUN_STATUSES)
_RUN_COLUMNS = "id, created_at, status, strategy, workers, record, owner_lease, owner_queue"
_LEASE_FIELDS = ("id", "kind", "host", "pid", "start_ticks", "queue", "roots", "slots", "started_at", "expires_at")
_LEASE_COLUMNS = ", ".join(_LEASE_FIELDS)
_USAGE_FIELDS = tuple(Usage.model_fields)
_STEP_COLUMNS = "run_id, idx, worker, cost_usd, has_usage, " + ", ".join(_USAGE_FIELDS)

T = TypeVar("T")


class _Pool:
    """At most ``size`` connections, opened on demand and reused; a broken one is dropped and the
    next call opens a new one (a restarted database costs one failed call, not the server)."""

    def __init__(self, url: str, size: int) -> None:
        self._url = url
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._closed = False

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, application_name="mcp-collab"
        )

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        if not self._slots.acquire(timeout=ACQUIRE_TIMEOUT_S):
            raise StoreError(
                f"every one of the {POOL_SIZE} connections to the run store was busy for {ACQUIRE_TIMEOUT_S:.0f} s"
            )
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = self.connect()
            try:
                yield conn
            finally:
                with self._lock:
                    if conn.closed or conn.broken or self._closed:
                        conn.close()
                    else:
                        self._idle.append(conn)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class PostgresStore:
    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        self.shown = shown_store_url(url)
        self._hidden = store_url_secrets(url)
        self.notices: list[str] = []  # nothing to report yet; the seam's callers read it
        self._pool = _Pool(url, POOL_SIZE)
        if migrate:
            self._call(self._migrate, "open")

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the seam ----------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Fail now, with the cause, if a run could not be stored (unreachable, read-only, no rights)."""

        def probe(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction(force_rollback=True):
                conn.execute("SELECT 1 FROM runs LIMIT 1")
                conn.execute("SELECT 1 FROM workers LIMIT 1")
                conn.execute(
                    "INSERT INTO run_texts (run_id, kind, idx, body) SELECT id, 'probe', -1, '' FROM runs LIMIT 0"
                )
                conn.execute("UPDATE leases SET expires_at = expires_at WHERE false")
                if conn.execute("SHOW transaction_read_only").fetchone() == ("on",):
                    raise StoreError(f"the run store {self.shown} is read-only (a standby?); point it at the primary")

        self._call(probe, "write")

    def list_workers(self) -> list[Worker]:
        rows = self._call(lambda c: c.execute("SELECT record FROM workers ORDER BY seq").fetchall())
        return [_worker(record) for (record,) in rows]

    def workers_if_current(self) -> list[Worker] | None:
        """Always None: another process or host may have changed the workers, and only a query (a
        network round trip, never on an event loop) can tell; callers then ask ``list_workers``."""
        return None

    def get_worker(self, name: str) -> Worker | None:
        row = self._call(lambda c: c.execute("SELECT record FROM workers WHERE name = %s", (name,)).fetchone())
        return _worker(row[0]) if row else None

    def add_worker(self, worker: Worker) -> None:
        def insert(conn: psycopg.Connection[Any]) -> bool:
            cur = conn.execute(
                "INSERT INTO workers (name, record) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (worker.name, _json(worker.model_dump(mode="json", by_alias=True))),
            )
            return cur.rowcount == 1

        if not self._call(insert, "write"):
            raise InvalidRequestError(
                f"a worker named {worker.name!r} already exists; remove it first or choose another name"
            )

    def remove_worker(self, name: str) -> Worker | None:
        row = self._call(
            lambda c: c.execute("DELETE FROM workers WHERE name = %s RETURNING record", (name,)).fetchone(), "write"
        )
        return _worker(row[0]) if row else None

    def save_run(self, run: Run) -> None:
        self.save_runs([run])

    def save_runs(self, runs: list[Run], *, durable: bool = True) -> None:
        """Several runs' new states in one transaction: all of them land, or none -- except a run
        another server recovered (its stored owner holds another lease): that one is left as it is
        stored, and RunTakenOverError names it once the others are committed. ``durable=False``
        (intermediate states): the commit does not wait for the database's WAL flush
        (``synchronous_commit = off`` for this transaction only); a crash of our server loses
        nothing, a crash of the database at most the last moments, and the next durable commit
        flushes both."""
        if not runs:
            return
        rows = [_Row(run) for run in runs]

        def write(conn: psycopg.Connection[Any]) -> list[tuple[str, str | None]]:
            with conn.pipeline(), conn.transaction(), conn.cursor() as cur:
                if not durable:
                    cur.execute("SET LOCAL synchronous_commit = off")
                with _counting(cur, [row.id for row in rows]):
                    cur.executemany(
                        f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT (id) DO UPDATE SET created_at = EXCLUDED.created_at, status = EXCLUDED.status, "
                        "strategy = EXCLUDED.strategy, workers = EXCLUDED.workers, record = EXCLUDED.record, "
                        "owner_queue = EXCLUDED.owner_queue "
                        "WHERE runs.owner_lease IS NOT DISTINCT FROM EXCLUDED.owner_lease RETURNING id",
                        [row.values for row in rows],
                        returning=True,
                    )
                    written = {found[0] for _ in cur.results() for found in cur.fetchall()}
                    _write_parts(cur, [row for row in rows if row.id in written])
                refused = [row.id for row in rows if row.id not in written]
                if not refused:
                    return []
                cur.execute("SELECT id, owner_lease FROM runs WHERE id = ANY(%s)", (refused,))
                return [(run_id, lease) for run_id, lease in cur.fetchall()]

        taken = self._call(write, "write")
        if taken:
            run_id, holder = taken[0]
            raise RunTakenOverError(
                f"run {run_id} was recovered by another server (it is now owned under lease {holder}); this save "
                "of it was refused and the recovered state stands"
            )

    def take_over_run(self, run: Run, previous_lease: str | None) -> bool:
        row = _Row(run)

        def take(conn: psycopg.Connection[Any]) -> bool:
            with conn.transaction(), conn.cursor() as cur, _counting(cur, [run.id]):
                cur.execute(
                    "UPDATE runs SET created_at = %s, status = %s, strategy = %s, workers = %s, record = %s, "
                    "owner_lease = %s, owner_queue = %s WHERE id = %s AND status <> ALL(%s) "
                    "AND owner_lease IS NOT DISTINCT FROM %s RETURNING id",
                    (*row.values[1:], run.id, _TERMINAL, previous_lease),
                )
                if cur.fetchone() is None:
                    return False
                _write_parts(cur, [row])
                return True

        return self._call(take, "write")

    def save_runs_now(self, runs: list[Run], *, durable: bool = False) -> bool:
        """Always False: a write is a network round trip, never done on an event loop; callers then
        call ``save_runs`` off the loop."""
        return False

    def sync(self) -> None:
        """Every commit made with ``synchronous_commit = off`` is durable once a later commit that
        waits for the WAL flush has flushed the WAL past it: one such commit, of a transaction that
        writes nothing but its own id."""

        def flush(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():  # committed as durable saves are, at the database's setting
                conn.execute("SELECT pg_current_xact_id()")  # an id makes the commit write (and flush) WAL

        self._call(flush, "write")

    def get_run(self, run_id: str) -> Run | None:
        def read(conn: psycopg.Connection[Any]) -> Run | None:
            with conn.transaction():  # one snapshot: the record and its texts agree
                row = conn.execute("SELECT id, record FROM runs WHERE id = %s", (run_id,)).fetchone()
                if row is None:
                    return None
                texts = conn.execute("SELECT kind, idx, body FROM run_texts WHERE run_id = %s", (run_id,)).fetchall()
            run = self._run(row[0], row[1])
            for kind, idx, body in texts:
                text = bytes(body).decode("utf-8")
                if kind == "output" and idx < len(run.steps):
                    run.steps[idx].output = text
                elif kind == "diff" and idx < len(run.worktrees):
                    run.worktrees[idx].diff = text
                elif kind == "stepdiff" and idx < len(run.steps):
                    run.steps[idx].diff = text
            return run

        return self._call(read)

    def unfinished_runs(self) -> list[Run]:
        rows = self._call(
            lambda c: c.execute(
                "SELECT id, record FROM runs WHERE status <> ALL(%s) ORDER BY created_at, id", (_TERMINAL,)
            ).fetchall()
        )
        return self._readable(rows)

    def open_runs_by_queue(self) -> dict[str, int]:
        rows = self._call(
            lambda c: c.execute(
                "SELECT owner_queue, count(*) FROM runs WHERE status = ANY(%s) AND owner_queue IS NOT NULL "
                "GROUP BY owner_queue",
                (_OPEN,),
            ).fetchall()
        )
        return {queue: int(n) for queue, n in rows}

    def list_runs(self, filter: RunFilter, limit: int, cursor: str | None) -> RunPage:
        conditions, params = _conditions(filter)
        page_conditions, page_params = list(conditions), list(params)
        if cursor:
            created, after_id = decode_cursor(cursor)
            page_conditions.append(sql.SQL("(created_at, id) < (%s, %s)"))
            page_params += [key_time(created), after_id]
        query = sql.SQL("SELECT id, record, created_at FROM runs{} ORDER BY created_at DESC, id DESC LIMIT %s").format(
            _where(page_conditions)
        )
        page_params.append(limit + 1)  # one more than asked: is there a next page?
        # Every filter is a sum of a few run_totals rows: whole runs (worker '') or one worker's steps.
        of_key: list[sql.Composable] = [sql.SQL("worker = %s")]
        key_params = [filter.worker or ""]
        for column, value in (("status", filter.status), ("strategy", filter.strategy)):
            if value is not None:
                of_key.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
                key_params.append(value)
        totals_query = sql.SQL("SELECT {} FROM run_totals{}").format(
            sql.SQL(", ").join(sql.SQL("coalesce(sum({}), 0)").format(sql.Identifier(c)) for c in _TOTALS),
            _where(of_key),
        )

        def read(conn: psycopg.Connection[Any]) -> tuple[list[Any], Any]:
            with conn.transaction():  # one snapshot: the page and the totals agree
                rows = conn.execute(query, page_params).fetchall()
                summed = conn.execute(totals_query, key_params).fetchone()
            return rows, summed

        rows, summed = self._call(read)
        more = len(rows) > limit
        kept = rows[:limit]
        runs = self._readable([(run_id, record) for run_id, record, _ in kept])
        next_cursor = None
        if more and kept:
            last_id, _, last_created = kept[-1]
            next_cursor = encode_cursor(last_created.astimezone(UTC).strftime(KEY_FORMAT), last_id)
        counted, cost, uncosted, *usage = summed
        totals = CostTotals(
            runs=int(counted),
            cost_usd=round(float(cost), 9),
            uncosted_steps=int(uncosted),
            usage=Usage(
                **{name: int(usage[2 * i]) if usage[2 * i + 1] else None for i, name in enumerate(_USAGE_FIELDS)}
            ),
        )
        return RunPage(runs=runs, next_cursor=next_cursor, totals=totals)

    def prune(self, *, max_runs: int | None, max_age_days: float | None, now: datetime | None = None) -> list[str]:
        """Forget finished runs beyond the newest ``max_runs`` or older than ``max_age_days``, with
        their texts. Runs still queued or running are never pruned. Returns the pruned ids, oldest first."""
        if max_runs is None and max_age_days is None:
            return []
        cutoff = (now or datetime.now(UTC)) - timedelta(days=max_age_days) if max_age_days is not None else None

        def doomed(conn: psycopg.Connection[Any]) -> list[str]:
            rows = conn.execute(
                """WITH finished AS (
                       SELECT id, created_at,
                              row_number() OVER (ORDER BY created_at DESC, id DESC) AS newest
                       FROM runs WHERE status = ANY(%(terminal)s)
                   )
                   SELECT id FROM finished
                   WHERE (%(keep)s::bigint IS NOT NULL AND newest > %(keep)s::bigint)
                      OR (%(cutoff)s::timestamptz IS NOT NULL AND created_at < %(cutoff)s::timestamptz)""",
                {"terminal": _TERMINAL, "keep": max_runs, "cutoff": cutoff},
            ).fetchall()
            return [run_id for (run_id,) in rows]

        def forget(ids: list[str]) -> Callable[[psycopg.Connection[Any]], list[tuple[str, datetime]]]:
            def change(conn: psycopg.Connection[Any]) -> list[tuple[str, datetime]]:
                with conn.transaction(), conn.cursor() as cur, _counting(cur, ids):
                    cur.execute(
                        "DELETE FROM runs WHERE id = ANY(%s) AND status = ANY(%s) RETURNING id, created_at",
                        (ids, _TERMINAL),
                    )
                    return [(run_id, created) for run_id, created in cur.fetchall()]

            return change

        ids = self._call(doomed, "write")
        gone: list[tuple[str, datetime]] = []
        for start in range(0, len(ids), PRUNE_CHUNK):
            gone += self._call(forget(ids[start : start + PRUNE_CHUNK]), "write")
        return [run_id for run_id, _ in sorted(gone, key=lambda r: (r[1], r[0]))]

    # -- stashes -----------------------------------------------------------------------------

    def stash_texts(self, run_id: str, texts: StepTexts) -> bool:
        row = (texts.step, texts.output.encode("utf-8"), texts.diff.encode("utf-8"), texts.output_truncated, run_id)

        def stash(conn: psycopg.Connection[Any]) -> bool:
            cur = conn.execute(
                "INSERT INTO step_stashes (run_id, idx, output, diff, output_truncated) "
                "SELECT id, %s, %s, %s, %s FROM runs WHERE id = %s ON CONFLICT (run_id, idx) DO UPDATE SET "
                "output = EXCLUDED.output, diff = EXCLUDED.diff, output_truncated = EXCLUDED.output_truncated",
                row,
            )
            return cur.rowcount == 1

        return self._call(stash, "write")

    def stashed_texts(self, run_id: str, steps: list[int]) -> list[StepTexts]:
        rows = self._call(
            lambda c: c.execute(
                "SELECT idx, output, diff, output_truncated FROM step_stashes WHERE run_id = %s AND idx = ANY(%s) "
                "ORDER BY idx",
                (run_id, steps),
            ).fetchall()
        )
        return [StepTexts(i, bytes(o).decode("utf-8"), bytes(d).decode("utf-8"), cut) for i, o, d, cut in rows]

    def drop_stashes(self, run_id: str, steps: list[int]) -> None:
        self._call(
            lambda c: c.execute("DELETE FROM step_stashes WHERE run_id = %s AND idx = ANY(%s)", (run_id, steps)),
            "write",
        )

    # -- leases ------------------------------------------------------------------------------

    def renew_lease(self, lease: Lease, ttl_s: float) -> Lease:
        """Take or extend ``lease`` to ``ttl_s`` seconds from the database's ``now()``; lapsed
        leases are forgotten on the way. A held lease that lapsed is not taken back: LeaseLostError."""
        values = tuple(getattr(lease, name) for name in _LEASE_FIELDS[:-2])  # the times are the database's

        def renew(conn: psycopg.Connection[Any]) -> Any:
            with conn.transaction():
                conn.execute("DELETE FROM leases WHERE expires_at <= now()")
                row = conn.execute(
                    "UPDATE leases SET expires_at = now() + make_interval(secs => %s) "
                    "WHERE id = %s AND expires_at > now() RETURNING started_at, expires_at",
                    (ttl_s, lease.id),
                ).fetchone()
                if row is None and lease.expires_at is None:
                    row = conn.execute(
                        f"INSERT INTO leases ({_LEASE_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now(), "
                        "now() + make_interval(secs => %s)) ON CONFLICT (id) DO NOTHING "
                        "RETURNING started_at, expires_at",
                        (*values, ttl_s),
                    ).fetchone()
                return row

        row = self._call(renew, "write")
        if row is None:
            raise LeaseLostError(
                f"the lease {lease.id} of this {lease.kind} (pid {lease.pid} on {lease.host}) in the run store "
                f"{self.shown} lapsed before it was renewed (the process was stopped or cut off from the database "
                "for longer than its TTL); whatever it owned may have been recovered by another server"
            )
        return lease.model_copy(update={"started_at": row[0], "expires_at": row[1]})

    def live_leases(self, kind: LeaseKind | None = None) -> list[Lease]:
        rows = self._call(
            lambda c: c.execute(
                f"SELECT {_LEASE_COLUMNS} FROM leases WHERE expires_at > now() "
                "AND (%(kind)s::text IS NULL OR kind = %(kind)s::text) ORDER BY started_at, id",
                {"kind": kind},
            ).fetchall()
        )
        return [Lease.model_validate(dict(zip(_LEASE_FIELDS, row, strict=True)), context=STORED) for row in rows]

    def lease_alive(self, lease_id: str) -> bool:
        row = self._call(
            lambda c: c.execute(
                "SELECT EXISTS (SELECT 1 FROM leases WHERE id = %s AND expires_at > now())", (lease_id,)
            ).fetchone()
        )
        return bool(row and row[0])

    def drop_lease(self, lease_id: str) -> None:
        self._call(lambda c: c.execute("DELETE FROM leases WHERE id = %s", (lease_id,)), "write")

    # -- inside ------------------------------------------------------------------------------

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = {version for (version,) in conn.execute("SELECT version FROM schema_migrations")}
            newest = max(applied, default=0)
            if newest > SCHEMA_VERSION:
                raise StoreError(
                    f"the run store {self.shown} was migrated by a newer mcp-collab (schema {newest}; this version "
                    f"knows up to {SCHEMA_VERSION}); it was left untouched. Upgrade mcp-collab, or point "
                    "MCP_COLLAB_STORE_URL at another database."
                )
            for version, statements in enumerate(MIGRATIONS, start=1):
                if version in applied:
                    continue
                for statement in statements:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                log.info("applied migration %d to the run store %s", version, self.shown)

    def _call(self, fn: Callable[[psycopg.Connection[Any]], T], action: str = "read") -> T:
        """Run ``fn`` on a pooled connection; every database failure becomes one StoreError naming
        the database (without its password) and the cause."""
        try:
            with self._pool.connection() as conn:
                return fn(conn)
        except psycopg.Error as exc:
            raise StoreError(f"cannot {action} the run store {self.shown}: {self._cause(exc)}") from None

    def _cause(self, exc: psycopg.Error) -> str:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        cause = "; ".join(lines[:2]) or type(exc).__name__
        for secret in self._hidden:
            cause = cause.replace(secret, "***")
        return cause

    def _run(self, run_id: str, record: str) -> Run:
        try:
            return Run.model_validate(json.loads(record), context=STORED)
        except (ValueError, ValidationError) as exc:
            problems = (
                "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
                if isinstance(exc, ValidationError)
                else str(exc)
            )
            raise StoreError(
                f"run {run_id} in the run store {self.shown} cannot be read by this version of mcp-collab "
                f"({problems}); it may have been written by a newer version. It was left untouched."
            ) from None

    def _readable(self, rows: Sequence[tuple[str, str]]) -> list[Run]:
        """The runs of a list; one that cannot be read is left out and logged, not the whole list."""
        runs = []
        for run_id, record in rows:
            try:
                runs.append(self._run(run_id, record))
            except StoreError as exc:
                log.warning("%s; left out of the list", exc)
        return runs


def _conditions(filter: RunFilter) -> tuple[list[sql.Composable], list[Any]]:
    conditions: list[sql.Composable] = []
    params: list[Any] = []
    if filter.status is not None:
        conditions.append(sql.SQL("status = %s"))
        params.append(filter.status)
    if filter.strategy is not None:
        conditions.append(sql.SQL("strategy = %s"))
        params.append(filter.strategy)
    if filter.worker is not None:
        conditions.append(sql.SQL("workers @> ARRAY[%s]::text[]"))
        params.append(filter.worker)
    return conditions, params


def _where(conditions: list[sql.Composable]) -> sql.Composable:
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")


class _Row:
    """What a save writes of one run: its row of ``runs``, its long texts and its steps' accounts."""

    def __init__(self, run: Run) -> None:
        record, self.texts = _split(run)
        owner = run.owner
        self.values = (
            run.id, run.created_at.astimezone(UTC), run.status, run.strategy, list(run.workers), _json(record),
            owner.lease if owner is not None else None, owner.queue if owner is not None else None,
        )  # fmt: skip
        self.id = run.id
        self.steps = []
        for i, step in enumerate(run.steps):
            usage = [getattr(step.usage, name) if step.usage else None for name in _USAGE_FIELDS]
            self.steps.append((run.id, i, step.worker_name, step.cost_usd, step.usage is not None, *usage))


def _write_parts(cur: psycopg.Cursor[Any], rows: list[_Row]) -> None:
    """The steps' accounts and the long texts of runs whose row was just written."""
    if not rows:
        return
    cur.execute("DELETE FROM run_steps WHERE run_id = ANY(%s)", ([row.id for row in rows],))
    steps = [step for row in rows for step in row.steps]
    if steps:
        placeholders = ", ".join(["%s"] * (5 + len(_USAGE_FIELDS)))
        cur.executemany(f"INSERT INTO run_steps ({_STEP_COLUMNS}) VALUES ({placeholders})", steps)
    for row in rows:
        keys = [f"{kind}:{idx}" for kind, idx, _ in row.texts]
        cur.execute(
            "DELETE FROM run_texts WHERE run_id = %s AND NOT (kind || ':' || idx = ANY(%s))",
            (row.id, keys),
        )
        if row.texts:
            # A text is written when it first appears; later saves of the run leave it unless it changed.
            cur.executemany(
                "INSERT INTO run_texts (run_id, kind, idx, body) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (run_id, kind, idx) DO UPDATE SET body = EXCLUDED.body "
                "WHERE run_texts.body IS DISTINCT FROM EXCLUDED.body",
                [(row.id, kind, idx, body.encode("utf-8")) for kind, idx, body in row.texts],
            )


# What run_totals keeps per key, in its column order: runs, dollars, uncosted steps, then per token
# field its sum and how many steps reported it (a sum none reported is unknown, not 0).
_TOTALS = ("runs", "cost_usd", "uncosted_steps", *(c for f in _USAGE_FIELDS for c in (f, f"{f}_reports")))
_Key = tuple[str, str, str]


def _contribution_sql() -> str:
    """What every run adds to run_totals, in SQL, one row per key (status, strategy, worker, then
    ``_TOTALS``): the recount, which must agree with ``_contributions``."""
    tokens = ", ".join(f"coalesce(sum(s.{f}), 0) AS {f}, count(s.{f}) AS {f}_reports" for f in _USAGE_FIELDS)
    per_run = (
        "SELECT r.status, r.strategy, {worker} AS worker, coalesce(sum(s.cost_usd::numeric), 0) AS cost_usd, "
        "count(*) FILTER (WHERE s.cost_usd IS NULL AND s.has_usage) AS uncosted_steps, " + tokens + " "
        "FROM runs r {join} run_steps s ON s.run_id = r.id GROUP BY r.id{by}"
    )
    whole = per_run.format(worker="''", join="LEFT JOIN", by="")
    by_worker = per_run.format(worker="s.worker", join="JOIN", by=", s.worker")
    summed = ", ".join(f"sum({c})" for c in _TOTALS[1:])
    return (
        f"SELECT status, strategy, worker, count(*), {summed} FROM ({whole} UNION ALL {by_worker}) AS per_run "
        "GROUP BY status, strategy, worker"
    )


# The steps' accounts of some runs, as the totals need them (a run without steps: one row of NULLs).
# The dollars are cast to numeric by the database, as the recount casts them: sums of them are exact.
_ACCOUNTS = (
    "SELECT r.id, r.status, r.strategy, s.worker, s.cost_usd::numeric, s.has_usage, "
    + ", ".join(f"s.{f}" for f in _USAGE_FIELDS)
    + " FROM runs r LEFT JOIN run_steps s ON s.run_id = r.id WHERE r.id = ANY(%s)"
)
_ADD_TOTALS = (
    f"INSERT INTO run_totals (status, strategy, worker, {', '.join(_TOTALS)}) "
    f"VALUES (%s, %s, %s, {', '.join(['%s'] * len(_TOTALS))}) ON CONFLICT (status, strategy, worker) DO UPDATE SET "
    + ", ".join(f"{c} = run_totals.{c} + EXCLUDED.{c}" for c in _TOTALS)
)
# Decimal arithmetic without rounding for any sum of dollars a history holds (the default rounds at 28 digits).
_EXACT = decimal.Context(prec=200)


def _contributions(cur: psycopg.Cursor[Any], ids: list[str]) -> dict[_Key, list[Any]]:
    """What the runs ``ids`` add to run_totals, by key: to their whole-run key (worker '') and to
    each worker that took a step, that worker's steps only. A plain join summed here: a query
    that sums it costs more to plan than to run."""
    cur.execute(_ACCOUNTS, (ids,))
    totals: dict[_Key, list[Any]] = {}
    counted: set[tuple[str, str]] = set()
    with decimal.localcontext(_EXACT):
        for run_id, status, strategy, worker, cost, has_usage, *tokens in cur.fetchall():
            for name in ("",) if worker is None else ("", worker):
                vector = totals.setdefault((status, strategy, name), [0, Decimal(0), *([0] * (len(_TOTALS) - 2))])
                if (run_id, name) not in counted:
                    counted.add((run_id, name))
                    vector[0] += 1
                if worker is None:
                    continue  # a run without steps counts, and adds nothing else
                if cost is not None:
                    vector[1] += cost
                elif has_usage:
                    vector[2] += 1
                for i, value in enumerate(tokens):
                    if value is not None:
                        vector[3 + 2 * i] += value
                        vector[4 + 2 * i] += 1
    return totals


@contextlib.contextmanager
def _counting(cur: psycopg.Cursor[Any], ids: list[str]) -> Iterator[None]:
    """Keep run_totals exact across a change of the runs ``ids`` made inside the block: lock them
    (advisory, transaction-scoped, in one global order), read what they add before and after, and
    add the difference. Zero differences write nothing."""
    keys = sorted({zlib.crc32(run_id.encode("utf-8")) - (1 << 31) for run_id in ids})
    cur.execute("SELECT count(pg_advisory_xact_lock(%s, k)) FROM unnest(%s::int4[]) AS k", (RUN_LOCKS, keys))
    before = _contributions(cur, ids)
    yield
    after = _contributions(cur, ids)
    zero = [0] * len(_TOTALS)
    changes = []
    with decimal.localcontext(_EXACT):
        for key in sorted(before.keys() | after.keys()):  # one order in every process: no deadlock on a row
            delta = [new - old for new, old in zip(after.get(key, zero), before.get(key, zero), strict=True)]
            if any(delta):
                changes.append((*key, *delta))
    if changes:
        cur.executemany(_ADD_TOTALS, changes)


def _recount_totals(cur: psycopg.Cursor[Any]) -> None:
    """run_totals counted afresh from every run (for a history loaded behind the store's back)."""
    cur.execute("DELETE FROM run_totals")
    cur.execute(f"INSERT INTO run_totals (status, strategy, worker, {', '.join(_TOTALS)}) {_contribution_sql()}")


def _split(run: Run) -> tuple[dict[str, Any], list[tuple[str, int, str]]]:
    """The run's record with long texts cut to a preview, and those texts whole: (kind, index, text)."""
    record = run.model_dump(mode="json", by_alias=True)
    texts: list[tuple[str, int, str]] = []
    for kind, items, key in (
        ("output", record["steps"], "output"),
        ("stepdiff", record["steps"], "diff"),
        ("diff", record["worktrees"], "diff"),
    ):
        for i, item in enumerate(items):
            if len(item.get(key) or "") > PREVIEW_CHARS:
                texts.append((kind, i, item[key]))
                item[key] = item[key][:PREVIEW_CHARS]
    return record, texts


def _json(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _worker(record: str) -> Worker:
    return Worker.model_validate(json.loads(record), context=STORED)


def probe(url: str) -> tuple[str, bool]:
    """Whether the database a URL names is reachable and which schema it holds, changing nothing
    (for doctor): what to say, and whether the schema is this version's (else no process of this
    version has opened it yet); StoreError, without the password, when it cannot be used."""
    shown = shown_store_url(url)
    hidden = store_url_secrets(url)
    try:
        with _Pool(url, 1).connect() as conn:
            exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
            version = 0
            if exists and exists[0]:
                row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
                version = int(row[0]) if row and row[0] is not None else 0
            read_only = conn.execute("SHOW transaction_read_only").fetchone() == ("on",)
    except psycopg.Error as exc:
        cause = "; ".join(line.strip() for line in str(exc).strip().splitlines()[:2] if line.strip())
        for secret in hidden:
            cause = cause.replace(secret, "***")
        raise StoreError(f"cannot reach {shown}: {cause or type(exc).__name__}") from None
    if read_only:
        raise StoreError(f"{shown} is read-only (a standby?); point MCP_COLLAB_STORE_URL at the primary")
    if version > SCHEMA_VERSION:
        raise StoreError(f"{shown} holds schema {version}, newer than this mcp-collab knows ({SCHEMA_VERSION})")
    if version < SCHEMA_VERSION:
        return f"{shown} (reachable; schema {version}, the server migrates it to {SCHEMA_VERSION} at start)", False
    return f"{shown} (reachable, schema {version})", True
