-- One row per order the payment service has seen: the domain key (one payment per order)
-- beside the inbox, so a redelivered or duplicated inventory.reserved never charges twice.
--
-- status:
--   completed       charged; payments.completed published
--   failed          declined or unavailable (failure_reason); payments.failed published
--   cancelled       tombstone: the order was cancelled before any charge, so a late
--                   inventory.reserved charges nothing
--   refund_pending  charged, but the order was cancelled: the reconciler refunds it
--   refunded        the charge was refunded; payments.refunded published
--
-- needs_reconciliation = 1: the provider may hold a charge no status accounts for (a request
-- timed out or its response was lost, then the payment gave up as unavailable). The reconciler
-- looks the order up at the provider and refunds what it finds; flagged_at is when the flag was
-- set. reconcile_after holds a row back until then (after a provider error or a permanent
-- refusal that needs an operator, recorded in last_error).
--
-- Booleans are BIGINT 0/1 and times BIGINT microseconds since the Unix epoch on both backends.
CREATE TABLE payments (
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
);

-- The reconciler's work list stays small: only rows it has something to do with.
CREATE INDEX payments_to_reconcile ON payments (reconcile_after)
    WHERE status = 'refund_pending' OR needs_reconciliation = 1;
