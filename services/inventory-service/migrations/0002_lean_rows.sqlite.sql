-- Fewer b-trees per commit on SQLite (see the messaging component's migration 3): tables keyed
-- by text are stored in their primary key (WITHOUT ROWID). The lines are rebuilt against the
-- new `reservations` before the old tables go, so no foreign key points at a dropped table.
CREATE TABLE products_lean (
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
) WITHOUT ROWID;
INSERT INTO products_lean (product_id, name, unit_price_minor, currency, available, reserved,
        committed, initial, restocked, updated_at)
    SELECT product_id, name, unit_price_minor, currency, available, reserved, committed,
        initial, restocked, updated_at
    FROM products;

CREATE TABLE reservations_lean (
    order_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    total_minor BIGINT,
    currency TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
) WITHOUT ROWID;
INSERT INTO reservations_lean (order_id, status, total_minor, currency, created_at, updated_at)
    SELECT order_id, status, total_minor, currency, created_at, updated_at FROM reservations;

CREATE TABLE reservation_lines_lean (
    order_id TEXT NOT NULL REFERENCES reservations_lean (order_id),
    product_id TEXT NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    unit_price_minor BIGINT NOT NULL,
    PRIMARY KEY (order_id, product_id)
) WITHOUT ROWID;
INSERT INTO reservation_lines_lean (order_id, product_id, quantity, unit_price_minor)
    SELECT order_id, product_id, quantity, unit_price_minor FROM reservation_lines;

DROP TABLE reservation_lines;
DROP TABLE reservations;
DROP TABLE products;
-- Renaming a table rewrites the foreign keys that name it.
ALTER TABLE products_lean RENAME TO products;
ALTER TABLE reservations_lean RENAME TO reservations;
ALTER TABLE reservation_lines_lean RENAME TO reservation_lines;
