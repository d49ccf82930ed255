//! The inventory's tables: products with their stock, reservations and their lines.
//!
//! Every stock change is one `UPDATE` that moves units between `available`, `reserved` and
//! `committed` (or adds to `available` and `restocked`), so the invariant
//! `available + reserved + committed = initial + restocked` holds after every statement.

//!
//! The handlers' functions take the unit of work's [`Tx`] and run on the database thread; the
//! admin API's take the [`Db`].

use std::collections::{BTreeMap, HashMap, HashSet};

use orderflow_contracts::events::{OrderLine, PricedLine};
use orderflow_contracts::{Currency, Money, OrderId, ProductId, Quantity};
use orderflow_store::{Db, Row, StoreError, Tx, Value, now_micros, params, row};
use serde::Serialize;

use crate::domain::{DEMO_CATALOG, ReservationStatus, StockLevel};

/// A product as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Product {
    /// The SKU.
    pub product_id: String,
    /// Display name.
    pub name: String,
    /// Price of one unit.
    pub unit_price: Money,
    /// Units that can be reserved.
    pub available: i64,
    /// Units held for orders waiting for payment.
    pub reserved: i64,
    /// Units sold.
    pub committed: i64,
    /// Stock when the product was created.
    pub initial: i64,
    /// Units added since.
    pub restocked: i64,
}

const PRODUCT_COLUMNS: &str = "product_id, name, unit_price_minor, currency, available, \
                               reserved, committed, initial, restocked";

fn product(row: &Row<'_>) -> Result<Product, StoreError> {
    let currency: String = row.get(3)?;
    let currency = Currency::parse(&currency).unwrap_or(Currency::EUR);
    let price: i64 = row.get(2)?;
    Ok(Product {
        product_id: row.get(0)?,
        name: row.get(1)?,
        unit_price: Money::new(price, currency).unwrap_or(Money::zero(currency)),
        available: row.get(4)?,
        reserved: row.get(5)?,
        committed: row.get(6)?,
        initial: row.get(7)?,
        restocked: row.get(8)?,
    })
}

/// Seeds the demo catalog when the catalog is empty. Returns whether it did. Replicas starting
/// together may both see an empty catalog: the inserts skip rows another one wrote.
pub async fn seed_demo_catalog(db: &Db) -> Result<bool, StoreError> {
    db.write(|tx| {
        let n: i64 = tx.query_one("SELECT COUNT(*) FROM products", &[], |r| r.get(0))?;
        if n > 0 {
            return Ok(false);
        }
        for (id, name, price, stock) in DEMO_CATALOG {
            let price = Money::new(*price, Currency::EUR).unwrap_or(Money::zero(Currency::EUR));
            insert_product(tx, id, name, price, *stock, true)?;
        }
        Ok(true)
    })
    .await
}

fn insert_product(
    tx: &mut Tx<'_>,
    id: &str,
    name: &str,
    price: Money,
    stock: i64,
    skip_existing: bool,
) -> Result<(), StoreError> {
    const INSERT: &str = "INSERT INTO products (product_id, name, unit_price_minor, currency, \
         available, reserved, committed, initial, restocked, updated_at) \
         VALUES ($1, $2, $3, $4, $5, 0, 0, $5, 0, $6)";
    const INSERT_OR_SKIP: &str = "INSERT INTO products (product_id, name, unit_price_minor, \
         currency, available, reserved, committed, initial, restocked, updated_at) \
         VALUES ($1, $2, $3, $4, $5, 0, 0, $5, 0, $6) ON CONFLICT (product_id) DO NOTHING";
    tx.execute(
        if skip_existing {
            INSERT_OR_SKIP
        } else {
            INSERT
        },
        params![
            id,
            name,
            price.amount_minor,
            price.currency.as_str(),
            stock,
            now_micros()
        ],
    )?;
    Ok(())
}

/// Every product, by id.
pub async fn list_products(db: &Db) -> Result<Vec<Product>, StoreError> {
    db.read(|tx| {
        tx.query(
            &format!("SELECT {PRODUCT_COLUMNS} FROM products ORDER BY product_id"),
            &[],
            product,
        )
    })
    .await
}

fn product_in(tx: &mut Tx<'_>, id: &str) -> Result<Option<Product>, StoreError> {
    tx.query_opt(
        &format!("SELECT {PRODUCT_COLUMNS} FROM products WHERE product_id = $1"),
        params![id],
        product,
    )
}

/// One product.
pub async fn get_product(db: &Db, id: &ProductId) -> Result<Option<Product>, StoreError> {
    let id = id.as_str().to_owned();
    db.read(move |tx| product_in(tx, &id)).await
}

/// Creates a product with its initial stock, or updates the name and price of an existing one
/// (stock is changed only by restocks and orders). Returns the product and whether it is new.
pub async fn upsert_product(
    db: &Db,
    id: &ProductId,
    name: &str,
    price: Money,
    initial_stock: i64,
) -> Result<(Product, bool), StoreError> {
    let (id, name) = (id.as_str().to_owned(), name.to_owned());
    db.write(move |tx| {
        let updated = tx.execute(
            "UPDATE products SET name = $2, unit_price_minor = $3, currency = $4, updated_at = $5 \
             WHERE product_id = $1",
            params![
                id.as_str(),
                name.as_str(),
                price.amount_minor,
                price.currency.as_str(),
                now_micros()
            ],
        )?;
        let created = updated == 0;
        if created {
            insert_product(tx, &id, &name, price, initial_stock, false)?;
        }
        let product = product_in(tx, &id)?
            .ok_or_else(|| StoreError::Decode(format!("product {id} vanished")))?;
        Ok((product, created))
    })
    .await
}

/// Adds units to a product's available stock. `None` when the product does not exist.
pub async fn restock(
    db: &Db,
    id: &ProductId,
    quantity: u64,
) -> Result<Option<Product>, StoreError> {
    let id = id.as_str().to_owned();
    let q = i64::try_from(quantity).unwrap_or(i64::MAX);
    db.write(move |tx| {
        let n = tx.execute(
            "UPDATE products SET available = available + $2, restocked = restocked + $2, \
             updated_at = $3 WHERE product_id = $1",
            params![id.as_str(), q, now_micros()],
        )?;
        if n == 0 {
            return Ok(None);
        }
        product_in(tx, &id)
    })
    .await
}

/// Price and availability of the given products (unknown ones are absent).
pub fn stock_levels(
    tx: &mut Tx<'_>,
    products: &[&ProductId],
) -> Result<BTreeMap<ProductId, StockLevel>, StoreError> {
    let rows = tx.query_each(
        "SELECT product_id, unit_price_minor, currency, available FROM products \
         WHERE product_id = $1",
        products.iter().map(|p| [Value::from(p.as_str())]),
        |r| {
            Ok((
                r.get::<String>(0)?,
                r.get::<i64>(1)?,
                r.get::<String>(2)?,
                r.get::<i64>(3)?,
            ))
        },
    )?;
    let mut out = BTreeMap::new();
    for (id, price, currency, available) in rows.into_iter().flatten() {
        let (Ok(id), Ok(currency)) = (ProductId::parse(id), Currency::parse(&currency)) else {
            continue; // a row we could not have written; treated as an unknown product
        };
        let Ok(unit_price) = Money::new(price, currency) else {
            continue;
        };
        out.insert(
            id,
            StockLevel {
                unit_price,
                available: u64::try_from(available).unwrap_or(0),
            },
        );
    }
    Ok(out)
}

/// The orders among `orders` the service has already decided on.
pub fn decided(tx: &mut Tx<'_>, orders: &[OrderId]) -> Result<HashSet<OrderId>, StoreError> {
    let found = tx.query_each(
        "SELECT order_id FROM reservations WHERE order_id = $1",
        orders.iter().map(|o| [Value::from(o.to_string())]),
        |r| r.get::<String>(0),
    )?;
    Ok(found
        .iter()
        .flatten()
        .filter_map(|s| s.parse().ok())
        .collect())
}

/// Where units move, for [`move_stock`]: from one column to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// available → reserved.
    Reserve,
    /// reserved → committed.
    Commit,
    /// reserved → available.
    ReleaseReserved,
    /// committed → available.
    ReleaseCommitted,
}

impl Move {
    /// The statement moving units of one product: `$1` the product, `$2` the units, `$3` the
    /// time. Only where the source column holds enough units.
    const fn statement(self) -> &'static str {
        match self {
            Self::Reserve => {
                "UPDATE products SET available = available - $2, reserved = reserved + $2, \
                 updated_at = $3 WHERE product_id = $1 AND available >= $2"
            }
            Self::Commit => {
                "UPDATE products SET reserved = reserved - $2, committed = committed + $2, \
                 updated_at = $3 WHERE product_id = $1 AND reserved >= $2"
            }
            Self::ReleaseReserved => {
                "UPDATE products SET reserved = reserved - $2, available = available + $2, \
                 updated_at = $3 WHERE product_id = $1 AND reserved >= $2"
            }
            Self::ReleaseCommitted => {
                "UPDATE products SET committed = committed - $2, available = available + $2, \
                 updated_at = $3 WHERE product_id = $1 AND committed >= $2"
            }
        }
    }
}

/// Moves units of many products: `deltas` maps a product to the units it moves (in product
/// order, one pipelined round trip on PostgreSQL). A product without enough units in the
/// source column is not touched; the result is how many products moved, so a caller can tell a
/// concurrent change (fewer than asked).
pub fn move_stock(
    tx: &mut Tx<'_>,
    deltas: &BTreeMap<ProductId, i64>,
    how: Move,
) -> Result<usize, StoreError> {
    let now = now_micros();
    let moved = tx.execute_each(
        how.statement(),
        deltas
            .iter()
            .map(|(product, units)| row![product.as_str(), *units, now]),
    )?;
    Ok(moved.iter().filter(|&&n| n > 0).count())
}

/// A reservation row to insert.
#[derive(Debug, Clone)]
pub struct ReservationRow {
    /// The order.
    pub order_id: OrderId,
    /// Its status.
    pub status: ReservationStatus,
    /// What the reserved lines cost (reserved orders only).
    pub total: Option<Money>,
    /// The reserved lines.
    pub lines: Vec<PricedLine>,
}

/// Inserts reservations and their lines.
pub fn insert_reservations(tx: &mut Tx<'_>, rows: &[ReservationRow]) -> Result<(), StoreError> {
    let now = now_micros();
    tx.execute_each(
        "INSERT INTO reservations (order_id, status, total_minor, currency, created_at, \
         updated_at) VALUES ($1, $2, $3, $4, $5, $5)",
        rows.iter().map(|r| {
            row![
                r.order_id.to_string(),
                r.status.as_str(),
                r.total.map(|t| t.amount_minor),
                r.total.map(|t| t.currency.as_str().to_owned()),
                now
            ]
        }),
    )?;
    tx.execute_each(
        "INSERT INTO reservation_lines (order_id, product_id, quantity, unit_price_minor) \
         VALUES ($1, $2, $3, $4)",
        rows.iter().flat_map(|r| {
            r.lines.iter().map(move |l| {
                row![
                    r.order_id.to_string(),
                    l.product_id.as_str(),
                    i64::from(l.quantity.get()),
                    l.unit_price.amount_minor
                ]
            })
        }),
    )?;
    Ok(())
}

/// The reservations of `orders` with their lines.
pub fn reservations(
    tx: &mut Tx<'_>,
    orders: &[OrderId],
) -> Result<HashMap<OrderId, (ReservationStatus, Vec<OrderLine>)>, StoreError> {
    let found = tx.query_each(
        "SELECT r.order_id, r.status, l.product_id, l.quantity FROM reservations r \
         LEFT JOIN reservation_lines l ON l.order_id = r.order_id \
         WHERE r.order_id = $1 ORDER BY l.product_id",
        orders.iter().map(|o| [Value::from(o.to_string())]),
        |r| {
            Ok((
                r.get::<String>(0)?,
                r.get::<String>(1)?,
                r.get::<Option<String>>(2)?,
                r.get::<Option<i64>>(3)?,
            ))
        },
    )?;
    let mut out: HashMap<OrderId, (ReservationStatus, Vec<OrderLine>)> = HashMap::new();
    for (order, status, product, quantity) in found.into_iter().flatten() {
        let (Ok(order), Some(status)) =
            (order.parse::<OrderId>(), ReservationStatus::parse(&status))
        else {
            continue;
        };
        let entry = out.entry(order).or_insert_with(|| (status, Vec::new()));
        if let (Some(product), Some(quantity)) = (product, quantity)
            && let (Ok(product_id), Ok(quantity)) = (
                ProductId::parse(product),
                Quantity::new(u32::try_from(quantity).unwrap_or(0)),
            )
            && !entry.1.iter().any(|l| l.product_id == product_id)
        {
            entry.1.push(OrderLine {
                product_id,
                quantity,
            });
        }
    }
    Ok(out)
}

/// Moves many reservations from one status to another: each `(order, from, to)` moves only if
/// the reservation is still in `from`. Returns how many moved, so a caller can tell that
/// another transaction moved one first (fewer than asked).
///
/// Callers move the status before the stock: they read the status earlier, and on PostgreSQL
/// (read committed) another transaction — a payment outcome and a cancellation of the same
/// order handled at once by two consumers, or by two replicas — may have moved it since. This
/// `UPDATE` waits for that transaction, then matches nothing for the order, and the caller
/// retries instead of moving the units a second time.
pub fn move_statuses(
    tx: &mut Tx<'_>,
    moves: &[(OrderId, ReservationStatus, ReservationStatus)],
) -> Result<usize, StoreError> {
    let now = now_micros();
    let moved = tx.execute_each(
        "UPDATE reservations SET status = $3, updated_at = $4 \
         WHERE order_id = $1 AND status = $2",
        moves
            .iter()
            .map(|(order, from, to)| row![order.to_string(), from.as_str(), to.as_str(), now]),
    )?;
    Ok(moved.iter().filter(|&&n| n > 0).count())
}
