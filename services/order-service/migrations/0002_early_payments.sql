-- A payment that completed before the order's total was recorded (the reservation and the
-- payment arrive on different consumers): the order is confirmed when its total arrives and
-- equals this amount. A payment with another amount than the total never confirms an order.
ALTER TABLE orders ADD COLUMN paid_minor BIGINT;
ALTER TABLE orders ADD COLUMN paid_currency TEXT;
-- The payment's event id: the confirmation names it as its cause.
ALTER TABLE orders ADD COLUMN paid_event_id TEXT;
