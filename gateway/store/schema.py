"""The database schema: the migrations list, and how rows map to the domain records."""

from __future__ import annotations

import sqlite3

from gateway.domain import STATUS_PRECEDENCE
from gateway.errors import ConfigError

__all__ = ["MIGRATIONS", "UPDATE_EVENT_STATUS", "migrate"]

# Append only: a released migration is never edited, a change is a new entry.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL,
        wa_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_inbound_at REAL,
        ctwa_clid TEXT,
        ctwa_captured_at REAL,
        ctwa_clicked_at REAL,
        ctwa_source_id TEXT,
        ctwa_source_url TEXT,
        ctwa_headline TEXT,
        ctwa_source_type TEXT
    );
    CREATE INDEX conversations_by_phone
        ON conversations (account_id, wa_id, last_inbound_at DESC);
    CREATE TABLE events (
        pk INTEGER PRIMARY KEY,
        account_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        event_name TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        event_time INTEGER NOT NULL,
        status TEXT NOT NULL,
        event BLOB NOT NULL,
        test_event_code TEXT,
        received_at REAL NOT NULL,
        duration_ms REAL NOT NULL,
        insert_token TEXT NOT NULL,
        UNIQUE (account_id, event_id)
    );
    CREATE INDEX events_recent ON events (account_id, pk DESC);
    CREATE TABLE deliveries (
        event_pk INTEGER NOT NULL REFERENCES events (pk),
        sink TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        payload BLOB,
        error TEXT,
        error_code TEXT,
        trace_id TEXT,
        events_received INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL,
        PRIMARY KEY (event_pk, sink)
    ) WITHOUT ROWID;
    CREATE INDEX deliveries_open ON deliveries (sink, status) WHERE status = 'pending';
    """,
    """
    ALTER TABLE conversations ADD COLUMN ctwa_capture_source TEXT;
    CREATE INDEX conversations_recent ON conversations (account_id, created_at DESC);
    ALTER TABLE events ADD COLUMN attribution_window_expired INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE webhook_messages (
        wamid TEXT PRIMARY KEY,
        account_id TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        received_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE automatic_events (
        pk INTEGER PRIMARY KEY,
        account_id TEXT NOT NULL,
        wamid TEXT NOT NULL,
        event_name TEXT NOT NULL,
        ctwa_clid TEXT,
        custom_data BLOB,
        occurred_at REAL,
        conversation_id TEXT,
        received_at REAL NOT NULL,
        UNIQUE (account_id, wamid, event_name)
    );
    """,
    """
    ALTER TABLE deliveries ADD COLUMN next_attempt_at REAL;
    ALTER TABLE deliveries ADD COLUMN warnings BLOB;
    DROP INDEX deliveries_open;
    CREATE INDEX deliveries_due ON deliveries (sink, next_attempt_at) WHERE status = 'pending';
    CREATE TABLE delivery_attempts (
        event_pk INTEGER NOT NULL,
        sink TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        at REAL NOT NULL,
        outcome TEXT NOT NULL,
        http_status INTEGER,
        error_code TEXT,
        message TEXT,
        trace_id TEXT,
        batch_size INTEGER NOT NULL,
        duration_ms REAL NOT NULL,
        PRIMARY KEY (event_pk, sink, attempt)
    ) WITHOUT ROWID;
    CREATE TABLE datasets (
        account_id TEXT PRIMARY KEY,
        dataset_id TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # BSUIDs: a conversation is keyed by phone and/or BSUID; at most one live conversation per
    # identifier (the unique partial indexes); the archive of signed notifications.
    """
    CREATE TABLE conversations_v4 (
        id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        wa_id TEXT,
        bsuid TEXT,
        parent_bsuid TEXT,
        username TEXT,
        last_inbound_at REAL,
        ctwa_clid TEXT,
        ctwa_captured_at REAL,
        ctwa_clicked_at REAL,
        ctwa_source_id TEXT,
        ctwa_source_url TEXT,
        ctwa_headline TEXT,
        ctwa_source_type TEXT,
        ctwa_capture_source TEXT,
        superseded_by TEXT,
        phone_released_at REAL,
        keys_changed_at REAL,
        CHECK (wa_id IS NOT NULL OR bsuid IS NOT NULL)
    );
    INSERT INTO conversations_v4 (id, account_id, created_at, wa_id, last_inbound_at,
        ctwa_clid, ctwa_captured_at, ctwa_clicked_at, ctwa_source_id, ctwa_source_url,
        ctwa_headline, ctwa_source_type, ctwa_capture_source, superseded_by)
    SELECT c.id, c.account_id, c.created_at, c.wa_id, c.last_inbound_at, c.ctwa_clid,
        c.ctwa_captured_at, c.ctwa_clicked_at, c.ctwa_source_id, c.ctwa_source_url,
        c.ctwa_headline, c.ctwa_source_type, c.ctwa_capture_source,
        (SELECT n.id FROM conversations n WHERE n.account_id = c.account_id
            AND n.wa_id = c.wa_id AND (n.created_at, n.rowid) > (c.created_at, c.rowid)
            ORDER BY n.created_at DESC, n.rowid DESC LIMIT 1)
    FROM conversations c ORDER BY c.rowid;
    DROP TABLE conversations;
    ALTER TABLE conversations_v4 RENAME TO conversations;
    CREATE INDEX conversations_by_phone
        ON conversations (account_id, wa_id, last_inbound_at DESC);
    CREATE INDEX conversations_by_bsuid ON conversations (account_id, bsuid);
    CREATE INDEX conversations_by_parent_bsuid ON conversations (account_id, parent_bsuid)
        WHERE parent_bsuid IS NOT NULL;
    CREATE INDEX conversations_recent ON conversations (account_id, created_at DESC);
    CREATE UNIQUE INDEX conversations_live_phone ON conversations (account_id, wa_id)
        WHERE superseded_by IS NULL AND wa_id IS NOT NULL;
    CREATE UNIQUE INDEX conversations_live_bsuid ON conversations (account_id, bsuid)
        WHERE superseded_by IS NULL AND bsuid IS NOT NULL;
    CREATE TABLE conversation_aliases (
        account_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        replaced_at REAL NOT NULL,
        PRIMARY KEY (account_id, kind, value, conversation_id)
    ) WITHOUT ROWID;
    CREATE TABLE webhook_notifications (
        pk INTEGER PRIMARY KEY,
        received_at REAL NOT NULL,
        request_id TEXT,
        body BLOB NOT NULL,
        status TEXT NOT NULL,
        problems INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 1,
        error TEXT,
        processed_at REAL
    );
    CREATE INDEX webhook_notifications_open ON webhook_notifications (status, pk)
        WHERE status != 'processed';
    CREATE INDEX webhook_notifications_received ON webhook_notifications (received_at);
    CREATE TABLE webhook_problems (
        notification_pk INTEGER NOT NULL,
        path TEXT NOT NULL,
        code TEXT NOT NULL,
        reason TEXT NOT NULL,
        account_id TEXT,
        phone_number_id TEXT,
        PRIMARY KEY (notification_pk, path, code)
    ) WITHOUT ROWID;
    """,
    # How each event's conversation was found, and digests of the request's fields (a reused
    # eventId with another body is refused, naming the fields that differ).
    """
    ALTER TABLE events ADD COLUMN resolution BLOB;
    ALTER TABLE events ADD COLUMN request_fields BLOB;
    """,
    # Data lifecycle: the indexes retention and erasure scan by, daily counts that outlive
    # pruned events, the erasure audit (no personal data) and suppressions (keyed digests).
    """
    CREATE INDEX events_by_received ON events (received_at);
    CREATE INDEX events_by_conversation ON events (conversation_id);
    CREATE INDEX conversations_by_activity
        ON conversations (COALESCE(last_inbound_at, created_at)) WHERE ctwa_clid IS NULL;
    CREATE INDEX conversations_by_click
        ON conversations (COALESCE(ctwa_clicked_at, ctwa_captured_at))
        WHERE ctwa_clid IS NOT NULL;
    CREATE INDEX webhook_messages_by_conversation ON webhook_messages (conversation_id);
    CREATE INDEX webhook_messages_by_received ON webhook_messages (received_at);
    CREATE INDEX automatic_events_by_received ON automatic_events (received_at);
    CREATE INDEX automatic_events_by_conversation ON automatic_events (conversation_id);
    CREATE INDEX conversation_aliases_by_conversation
        ON conversation_aliases (conversation_id);
    CREATE TABLE event_daily (
        day TEXT NOT NULL,
        account_id TEXT NOT NULL,
        event_name TEXT NOT NULL,
        status TEXT NOT NULL,
        events INTEGER NOT NULL,
        PRIMARY KEY (day, account_id, event_name, status)
    ) WITHOUT ROWID;
    CREATE TABLE erasures (
        pk INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        actor TEXT NOT NULL,
        account_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        counts BLOB NOT NULL,
        suppressed INTEGER NOT NULL
    );
    CREATE TABLE suppressions (
        account_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        digest TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (account_id, kind, digest)
    ) WITHOUT ROWID;
    """,
    # The console and the stats API. An event's value and currency are columns the insert
    # fills. The overview reads event_hours, per account and UTC hour the events and their
    # value by name, status, currency and whether they were past the attribution window:
    # the insert adds its batch's counts (a statement or two per group commit, where an
    # index entry per event cost every request), one trigger moves them when an event's
    # status changes and another takes them away when retention deletes it (so a pruned
    # event counts nowhere, whatever the period's alignment). delivery_counts, the
    # deliveries per account, sink and status that /metrics exports, is kept the same way
    # (counting them at each scrape joined every delivery to its event: a second a scrape at
    # a million events). events_by_time finds the events of a period's partial first and
    # last hours; events_by_conversation carries what the ads funnel sums, so its join reads
    # no rows; clicks are found by the time they were captured.
    """
    ALTER TABLE events ADD COLUMN custom_value REAL;
    ALTER TABLE events ADD COLUMN custom_currency TEXT;
    UPDATE events SET
        custom_value = CASE json_type(CAST(event AS TEXT), '$.custom_data.value')
            WHEN 'real' THEN json_extract(CAST(event AS TEXT), '$.custom_data.value')
            WHEN 'integer' THEN json_extract(CAST(event AS TEXT), '$.custom_data.value') END,
        custom_currency = CASE json_type(CAST(event AS TEXT), '$.custom_data.currency')
            WHEN 'text' THEN json_extract(CAST(event AS TEXT), '$.custom_data.currency') END
        WHERE json_valid(CAST(event AS TEXT));
    CREATE TABLE event_hours (
        account_id TEXT NOT NULL,
        hour INTEGER NOT NULL,
        event_name TEXT NOT NULL,
        status TEXT NOT NULL,
        currency TEXT NOT NULL,
        expired INTEGER NOT NULL,
        events INTEGER NOT NULL,
        value REAL NOT NULL,
        PRIMARY KEY (account_id, hour, event_name, status, currency, expired)
    ) WITHOUT ROWID;
    INSERT INTO event_hours
        SELECT account_id, event_time / 3600, event_name, status, COALESCE(custom_currency, ''),
            attribution_window_expired, COUNT(*), COALESCE(SUM(custom_value), 0)
        FROM events GROUP BY 1, 2, 3, 4, 5, 6;
    CREATE TRIGGER event_hours_status AFTER UPDATE OF status ON events
        WHEN OLD.status IS NOT NEW.status
    BEGIN
        INSERT INTO event_hours VALUES (OLD.account_id, OLD.event_time / 3600, OLD.event_name,
            OLD.status, COALESCE(OLD.custom_currency, ''), OLD.attribution_window_expired, -1,
            -COALESCE(OLD.custom_value, 0))
            ON CONFLICT DO UPDATE SET events = events + excluded.events,
                value = value + excluded.value;
        INSERT INTO event_hours VALUES (NEW.account_id, NEW.event_time / 3600, NEW.event_name,
            NEW.status, COALESCE(NEW.custom_currency, ''), NEW.attribution_window_expired, 1,
            COALESCE(NEW.custom_value, 0))
            ON CONFLICT DO UPDATE SET events = events + excluded.events,
                value = value + excluded.value;
    END;
    CREATE TRIGGER event_hours_pruned AFTER DELETE ON events
    BEGIN
        INSERT INTO event_hours VALUES (OLD.account_id, OLD.event_time / 3600, OLD.event_name,
            OLD.status, COALESCE(OLD.custom_currency, ''), OLD.attribution_window_expired, -1,
            -COALESCE(OLD.custom_value, 0))
            ON CONFLICT DO UPDATE SET events = events + excluded.events,
                value = value + excluded.value;
    END;
    CREATE INDEX events_by_time ON events (account_id, event_time);
    CREATE TABLE delivery_counts (
        account_id TEXT NOT NULL,
        sink TEXT NOT NULL,
        status TEXT NOT NULL,
        deliveries INTEGER NOT NULL,
        PRIMARY KEY (account_id, sink, status)
    ) WITHOUT ROWID;
    INSERT INTO delivery_counts
        SELECT e.account_id, d.sink, d.status, COUNT(*) FROM deliveries d
        JOIN events e ON e.pk = d.event_pk GROUP BY 1, 2, 3;
    CREATE TRIGGER delivery_counts_status AFTER UPDATE OF status ON deliveries
        WHEN OLD.status IS NOT NEW.status
    BEGIN
        INSERT INTO delivery_counts SELECT account_id, OLD.sink, OLD.status, -1 FROM events
            WHERE pk = OLD.event_pk
            ON CONFLICT DO UPDATE SET deliveries = deliveries + excluded.deliveries;
        INSERT INTO delivery_counts SELECT account_id, NEW.sink, NEW.status, 1 FROM events
            WHERE pk = NEW.event_pk
            ON CONFLICT DO UPDATE SET deliveries = deliveries + excluded.deliveries;
    END;
    CREATE TRIGGER delivery_counts_deleted AFTER DELETE ON deliveries
    BEGIN
        INSERT INTO delivery_counts SELECT account_id, OLD.sink, OLD.status, -1 FROM events
            WHERE pk = OLD.event_pk
            ON CONFLICT DO UPDATE SET deliveries = deliveries + excluded.deliveries;
    END;
    DROP INDEX events_by_conversation;
    CREATE INDEX events_by_conversation ON events (conversation_id, event_time, event_name,
        status, custom_currency, custom_value);
    CREATE INDEX conversations_by_capture ON conversations (account_id, ctwa_captured_at)
        WHERE ctwa_clid IS NOT NULL;
    CREATE INDEX delivery_attempts_failed ON delivery_attempts (at)
        WHERE outcome != 'delivered';
    """,
    # Delivery claims: whoever sends a pending delivery first writes its name and a lease into
    # the row (gateway.store.outbox), so any number of processes can deliver from one store
    # and none sends what another holds. Claimed rows are few (what is in flight): the index
    # keeps renewing them and finding the next lease to expire cheap at any backlog.
    """
    ALTER TABLE deliveries ADD COLUMN claimed_by TEXT;
    ALTER TABLE deliveries ADD COLUMN claim_until REAL;
    CREATE INDEX deliveries_claimed ON deliveries (claimed_by, claim_until)
        WHERE claimed_by IS NOT NULL;
    """,
    # An account's newest events, ascending: the listing reads it backwards just as fast, and
    # each new event is appended at its end. Descending, every event went in at the front,
    # where a B-tree splits pages in half: a group commit wrote four of its pages instead of
    # one or two, and the index held 40% more pages than its entries fill.
    """
    DROP INDEX events_recent;
    CREATE INDEX events_recent ON events (account_id, pk);
    """,
    # /readyz's write probe (gateway.store.readiness): after writes failed for want of room,
    # a row of a few pages inserted and deleted in one transaction; empty between probes.
    """
    CREATE TABLE write_probe (
        pk INTEGER PRIMARY KEY,
        pad BLOB NOT NULL
    );
    """,
    # Test events (sent with a test event code: Meta shows them in Test Events and counts
    # them nowhere) are no conversions: event_hours counts only the others (the insert
    # leaves test events out, the triggers skip them, and those counted so far are taken
    # away), the funnel's index carries the code so its join still reads no rows, and
    # events_tests finds a period's test events to say how many were left out.
    """
    DROP TRIGGER event_hours_status;
    DROP TRIGGER event_hours_pruned;
    CREATE TRIGGER event_hours_status AFTER UPDATE OF status ON events
        WHEN OLD.status IS NOT NEW.status AND OLD.test_event_code IS NULL
    BEGIN
        INSERT INTO event_hours VALUES (OLD.account_id, OLD.event_time / 3600, OLD.event_name,
            OLD.status, COALESCE(OLD.custom_currency, ''), OLD.attribution_window_expired, -1,
            -COALESCE(OLD.custom_value, 0))
            ON CONFLICT DO UPDATE SET events = events + excluded.events,
                value = value + excluded.value;
        INSERT INTO event_hours VALUES (NEW.account_id, NEW.event_time / 3600, NEW.event_name,
            NEW.status, COALESCE(NEW.custom_currency, ''), NEW.attribution_window_expired, 1,
            COALESCE(NEW.custom_value, 0))
            ON CONFLICT DO UPDATE SET events = events + excluded.events,
                value = value + excluded.value;
    END;
    CREATE TRIGGER event_hours_pruned AFTER DELETE ON events
        WHEN OLD.test_event_code IS NULL
    BEGIN
        INSERT INTO event_hours VALUES (OLD.account_id, OLD.event_time / 3600, OLD.event_name,
            OLD.status, COALESCE(OLD.custom_currency, ''), OLD.attribution_window_expired, -1,
            -COALESCE(OLD.custom_value, 0))
            ON CONFLICT DO UPDATE SET events = events + excluded.events,
                value = value + excluded.value;
    END;
    INSERT INTO event_hours
        SELECT account_id, event_time / 3600, event_name, status, COALESCE(custom_currency, ''),
            attribution_window_expired, -COUNT(*), -COALESCE(SUM(custom_value), 0)
        FROM events WHERE test_event_code IS NOT NULL GROUP BY 1, 2, 3, 4, 5, 6
        ON CONFLICT DO UPDATE SET events = events + excluded.events,
            value = value + excluded.value;
    DROP INDEX events_by_conversation;
    CREATE INDEX events_by_conversation ON events (conversation_id, event_time, event_name,
        status, custom_currency, custom_value, test_event_code);
    CREATE INDEX events_tests ON events (account_id, event_time)
        WHERE test_event_code IS NOT NULL;
    """,
)

# overall_status() in SQL: the first status in precedence order that any sink of the event has.
UPDATE_EVENT_STATUS = (
    "UPDATE events SET status = COALESCE((SELECT status FROM deliveries WHERE event_pk = ?"
    " ORDER BY CASE status "
    + " ".join(f"WHEN '{s}' THEN {i}" for i, s in enumerate(STATUS_PRECEDENCE))
    + " ELSE 99 END LIMIT 1), 'pending') WHERE pk = ?"
)


def migrate(conn: sqlite3.Connection) -> None:
    """Apply the migrations this database has not seen yet."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
    row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
    current = int(row[0]) if row else 0
    if current > len(MIGRATIONS):
        # A newer version migrated this store (and the binary was rolled back): this one
        # would write rows without the newer columns' values and skip their triggers, so the
        # newer version's counts and states would be wrong when it comes back.
        raise ConfigError(
            f"the store has schema version {current}, newer than this version of"
            f" ctwa-gateway knows ({len(MIGRATIONS)}): a newer version upgraded it. Run that"
            " version, or restore a backup made by this one (ctwa-gateway restore)"
        )
    for version, script in enumerate(MIGRATIONS, start=1):
        if version <= current:
            continue
        # executescript commits first; the version row goes in the same script so a crash
        # between them cannot leave a half-applied migration recorded as done.
        conn.executescript(
            f"BEGIN IMMEDIATE; {script}; INSERT INTO schema_migrations VALUES ({version}); COMMIT;"
        )
