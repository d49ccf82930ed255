-- Fewer b-trees per commit on SQLite: every b-tree a transaction touches is another page in
-- the write-ahead log, written (and, with FULL durability, synced) at commit.
-- The inbox is stored in its primary key (WITHOUT ROWID: no separate rowid table), and the
-- outbox numbers its rows with the plain rowid, without AUTOINCREMENT's `sqlite_sequence`
-- row updated by every insert (an id may be reused only after its row was sent and pruned).
CREATE TABLE inbox_lean (
    consumer TEXT NOT NULL,
    event_id TEXT NOT NULL,
    processed_at BIGINT NOT NULL,
    PRIMARY KEY (consumer, event_id)
) WITHOUT ROWID;
INSERT INTO inbox_lean (consumer, event_id, processed_at)
    SELECT consumer, event_id, processed_at FROM inbox;
DROP TABLE inbox;
ALTER TABLE inbox_lean RENAME TO inbox;
CREATE INDEX inbox_processed_at ON inbox (processed_at);

CREATE TABLE outbox_lean (
    id INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    subject TEXT NOT NULL,
    headers TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    sent_at BIGINT,
    claimed_until BIGINT NOT NULL DEFAULT 0
);
INSERT INTO outbox_lean (id, event_id, subject, headers, payload, created_at, sent_at, claimed_until)
    SELECT id, event_id, subject, headers, payload, created_at, sent_at, claimed_until FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_lean RENAME TO outbox;
CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL;
