-- Orders and their saga state. status: pending | confirmed | cancelled
CREATE TABLE orders (
    order_id TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    payment_method TEXT NOT NULL,
    status TEXT NOT NULL,
    cancel_reason TEXT,
    total_minor BIGINT,
    currency TEXT,
    correlation_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX orders_pending ON orders (created_at) WHERE status = 'pending';
CREATE INDEX orders_customer ON orders (customer_id, order_id);
CREATE INDEX orders_status ON orders (status, order_id);

CREATE TABLE order_lines (
    order_id TEXT NOT NULL REFERENCES orders (order_id),
    product_id TEXT NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, product_id)
);

-- What happened to each order, in order: the saga's events as the order service saw them.
CREATE TABLE order_timeline (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id TEXT NOT NULL REFERENCES orders (order_id),
    event_type TEXT NOT NULL,
    event_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX order_timeline_order ON order_timeline (order_id, id);

-- Idempotency-Key of POST /v1/orders: the same key and body return the same order.
CREATE TABLE idempotency_keys (
    idempotency_key TEXT PRIMARY KEY,
    request TEXT NOT NULL,
    order_id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
