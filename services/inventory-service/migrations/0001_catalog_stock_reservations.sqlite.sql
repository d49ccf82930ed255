-- The catalog and its stock. Invariant per product:
--   available + reserved + committed = initial + restocked
CREATE TABLE products (
    product_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    unit_price_minor BIGINT NOT NULL CHECK (unit_price_minor >= 0),
    currency TEXT NOT NULL,
    available BIGINT NOT NULL CHECK (available >= 0),
    reserved BIGINT NOT NULL CHECK (reserved >= 0),
    committed BIGINT NOT NULL CHECK (committed >= 0),
    initial BIGINT NOT NULL CHECK (initial >= 0),
    restocked BIGINT NOT NULL DEFAULT 0 CHECK (restocked >= 0),
    updated_at BIGINT NOT NULL
);

-- One row per order the service has decided on (the domain key: one reservation per order).
-- status: reserved | committed | released | rejected | cancelled (cancelled before any reservation)
CREATE TABLE reservations (
    order_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    total_minor BIGINT,
    currency TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE reservation_lines (
    order_id TEXT NOT NULL REFERENCES reservations (order_id),
    product_id TEXT NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    unit_price_minor BIGINT NOT NULL,
    PRIMARY KEY (order_id, product_id)
);
