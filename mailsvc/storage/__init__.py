"""Storage of everything but the settings: message records and the queue, idempotency keys,
suppressions, rate-limit counts and webhook tokens. One interface (`base.Storage`), two
implementations: the embedded SQLite store and the PostgreSQL store."""
