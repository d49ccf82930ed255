-- Fewer b-trees per commit on SQLite (see the messaging component's migration 3): payments
-- are stored in their primary key (WITHOUT ROWID: no separate rowid table).
CREATE TABLE payments_lean (
    order_id TEXT PRIMARY KEY,
    payment_id TEXT,
    status TEXT NOT NULL,
    amount_minor BIGINT CHECK (amount_minor >= 0),
    currency TEXT,
    provider_charge_id TEXT,
    failure_reason TEXT,
    detail TEXT,
    refund_id TEXT,
    needs_reconciliation BIGINT NOT NULL DEFAULT 0,
    flagged_at BIGINT,
    reconcile_after BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    correlation_id TEXT NOT NULL,
    causation_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
) WITHOUT ROWID;
INSERT INTO payments_lean
    SELECT order_id, payment_id, status, amount_minor, currency, provider_charge_id,
        failure_reason, detail, refund_id, needs_reconciliation, flagged_at, reconcile_after,
        last_error, correlation_id, causation_id, created_at, updated_at
    FROM payments;
DROP TABLE payments;
ALTER TABLE payments_lean RENAME TO payments;
CREATE INDEX payments_to_reconcile ON payments (reconcile_after)
    WHERE status = 'refund_pending' OR needs_reconciliation = 1;
