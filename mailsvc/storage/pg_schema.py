"""The PostgreSQL schema as numbered migrations, applied in order under an advisory lock.

A released version's SQL is never edited: a change is a new entry at the end of MIGRATIONS,
so every database migrates in place from whatever version it has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

# pg_advisory_lock key of the migrations ("mailsvc" in ASCII); one bigint, which never
# meets the two-int4 keys of the quota locks.
MIGRATION_LOCK = 0x6D61696C737663
# Two-int4 advisory keys: (QUOTA_LOCK_CLASS, hashtext(caller)) serializes one caller's quota.
QUOTA_LOCK_CLASS = 0x6D71
EVENTS_CHANNEL = "mailsvc_events"
SETTINGS_CHANNEL = "mailsvc_settings"

MIGRATIONS: tuple[str, ...] = (
    # 1: everything of v1.1
    """
    CREATE TABLE messages (
        id text PRIMARY KEY,
        caller text NOT NULL,
        status smallint NOT NULL,
        to_addrs text[] NOT NULL,
        cc_addrs text[] NOT NULL,
        bcc_addrs text[] NOT NULL,
        rcpt text[] NOT NULL,  -- lower-cased to + cc + bcc, for the recipient filter
        subject text NOT NULL,
        template_name text NOT NULL,
        transport text NOT NULL,
        message_id text NOT NULL,
        header_message_id text NOT NULL,
        create_time float8 NOT NULL,
        send_time float8 NOT NULL,
        update_time float8 NOT NULL,
        next_attempt_time float8,
        -- when it may be claimed: the next attempt or send time while QUEUED or SCHEDULED,
        -- the lease's end while SENDING, NULL once nothing is left to do
        due_time float8,
        attempts integer NOT NULL DEFAULT 0,
        last_error text NOT NULL DEFAULT '',
        last_error_reason text NOT NULL DEFAULT '',
        suppressed text[] NOT NULL,
        payload bytea,
        lease_owner text NOT NULL DEFAULT '',
        lease_until float8
    );
    CREATE INDEX messages_due ON messages (due_time) WHERE due_time IS NOT NULL;
    CREATE INDEX messages_newest ON messages (create_time DESC, id DESC);
    CREATE INDEX messages_caller ON messages (caller, create_time DESC, id DESC);
    CREATE INDEX messages_rcpt ON messages USING gin (rcpt);
    CREATE INDEX messages_update ON messages (update_time);
    CREATE INDEX messages_provider_id ON messages (btrim(message_id, '<>'))
        WHERE message_id <> '';
    CREATE INDEX messages_header_id ON messages (btrim(header_message_id, '<>'))
        WHERE header_message_id <> '';

    CREATE TABLE events (
        seq bigserial PRIMARY KEY,
        message_id text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        time float8 NOT NULL,
        status smallint NOT NULL,
        detail text NOT NULL,
        caller text NOT NULL
    );
    CREATE INDEX events_message ON events (message_id, seq);

    CREATE TABLE idempotency (
        caller text NOT NULL,
        key text NOT NULL,
        fingerprint text NOT NULL,
        response bytea,
        expire_time float8 NOT NULL,
        PRIMARY KEY (caller, key)
    );
    CREATE INDEX idempotency_expire ON idempotency (expire_time);

    CREATE TABLE suppressions (
        address text PRIMARY KEY,
        reason integer NOT NULL,
        create_time float8 NOT NULL,
        detail text NOT NULL
    );

    CREATE TABLE quota_minute (
        caller text NOT NULL,
        time float8 NOT NULL,
        count integer NOT NULL
    );
    CREATE INDEX quota_minute_caller ON quota_minute (caller, time);
    CREATE INDEX quota_minute_time ON quota_minute (time);
    CREATE TABLE quota_day (
        caller text NOT NULL,
        day integer NOT NULL,  -- days since the epoch, UTC
        count integer NOT NULL,
        PRIMARY KEY (caller, day)
    );

    CREATE TABLE webhook_tokens (
        token text PRIMARY KEY,
        expire_time float8 NOT NULL
    );
    CREATE INDEX webhook_tokens_expire ON webhook_tokens (expire_time);

    CREATE TABLE settings (
        name text PRIMARY KEY,  -- 'settings' or 'acl'
        data text NOT NULL,     -- protobuf JSON
        etag text NOT NULL
    );
    """,
)


class SchemaTooNew(Exception):
    """The database was migrated by a newer mailsvc than this one."""


async def migrate(conn: asyncpg.Connection[Any] | PoolConnectionProxy[Any]) -> int:
    """Bring the schema to the latest version; safe when several processes start at once."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        version = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
        if version > len(MIGRATIONS):
            raise SchemaTooNew(
                f"the database has schema version {version}, this mailsvc knows up to "
                f"{len(MIGRATIONS)}: upgrade mailsvc"
            )
        for number in range(version + 1, len(MIGRATIONS) + 1):
            async with conn.transaction():
                await conn.execute(MIGRATIONS[number - 1])
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", number)
        return len(MIGRATIONS)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
