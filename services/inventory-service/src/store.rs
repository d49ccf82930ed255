//! The inventory's tables: products with their stock, reservations and their lines.
//!
//! Every stock change is one `UPDATE` that moves units between `available`, `reserved` and
//! `committed` (or adds to `available` and `restocked`), so the invariant
//! `available + reserved + committed = initial + restocked` holds after every statement.

use std::collections::BTreeMap;

use orderflow_contracts::events::{OrderLine, PricedLine};
use orderflow_contracts::{Currency, Money, OrderId, ProductId, Quantity};
use orderflow_store::{AssertSqlSafe, Db, StoreError, now_micros, placeholders};
use serde::Serialize;
use sqlx::{AnyConnection, Row};

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

/// Why a reservation could not be written although the decision said it could.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// Another order took the stock between the read and the write (a concurrent replica).
    #[error("stock of {0} changed concurrently")]
    StockChanged(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for ReserveError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(e.into())
    }
}

const PRODUCT_COLUMNS: &str = "product_id, name, unit_price_minor, currency, available, reserved, committed, initial, restocked";

fn product(row: &sqlx::any::AnyRow) -> Result<Product, sqlx::Error> {
    let currency: String = row.try_get("currency")?;
    let currency = Currency::parse(&currency).unwrap_or(Currency::EUR);
    let price: i64 = row.try_get("unit_price_minor")?;
    Ok(Product {
        product_id: row.try_get("product_id")?,
        name: row.try_get("name")?,
        unit_price: Money::new(price, currency).unwrap_or(Money::zero(currency)),
        available: row.try_get("available")?,
        reserved: row.try_get("reserved")?,
        committed: row.try_get("committed")?,
        initial: row.try_get("initial")?,
        restocked: row.try_get("restocked")?,
    })
}

/// Seeds the demo catalog when the catalog is empty. Returns whether it did. Replicas starting
/// together may both see an empty catalog: the inserts skip rows another one wrote.
pub async fn seed_demo_catalog(db: &Db) -> Result<bool, StoreError> {
    let mut tx = db.begin().await?;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM products")
        .fetch_one(&mut *tx)
        .await?;
    if n > 0 {
        return Ok(false);
    }
    for (id, name, price, stock) in DEMO_CATALOG {
        let price = Money::new(*price, Currency::EUR).unwrap_or(Money::zero(Currency::EUR));
        insert_product(&mut tx, id, name, price, *stock, true).await?;
    }
    tx.commit().await?;
    Ok(true)
}

async fn insert_product(
    conn: &mut AnyConnection,
    id: &str,
    name: &str,
    price: Money,
    stock: i64,
    skip_existing: bool,
) -> Result<(), sqlx::Error> {
    const INSERT: &str = "INSERT INTO products (product_id, name, unit_price_minor, currency, available, \
         reserved, committed, initial, restocked, updated_at) VALUES ($1, $2, $3, $4, $5, 0, 0, $5, 0, $6)";
    const INSERT_OR_SKIP: &str = "INSERT INTO products (product_id, name, unit_price_minor, currency, available, \
         reserved, committed, initial, restocked, updated_at) VALUES ($1, $2, $3, $4, $5, 0, 0, $5, 0, $6) \
         ON CONFLICT (product_id) DO NOTHING";
    sqlx::query(if skip_existing {
        INSERT_OR_SKIP
    } else {
        INSERT
    })
    .bind(id)
    .bind(name)
    .bind(price.amount_minor)
    .bind(price.currency.as_str())
    .bind(stock)
    .bind(now_micros())
    .execute(conn)
    .await?;
    Ok(())
}

/// Every product, by id.
pub async fn list_products(db: &Db) -> Result<Vec<Product>, StoreError> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT {PRODUCT_COLUMNS} FROM products ORDER BY product_id"
    )))
    .fetch_all(db.reader())
    .await?;
    Ok(rows.iter().map(product).collect::<Result<_, _>>()?)
}

/// One product.
pub async fn get_product(db: &Db, id: &ProductId) -> Result<Option<Product>, StoreError> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT {PRODUCT_COLUMNS} FROM products WHERE product_id = $1"
    )))
    .bind(id.as_str())
    .fetch_optional(db.reader())
    .await?;
    Ok(row.as_ref().map(product).transpose()?)
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
    let mut tx = db.begin().await?;
    let updated = sqlx::query(
        "UPDATE products SET name = $2, unit_price_minor = $3, currency = $4, updated_at = $5 \
         WHERE product_id = $1",
    )
    .bind(id.as_str())
    .bind(name)
    .bind(price.amount_minor)
    .bind(price.currency.as_str())
    .bind(now_micros())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let created = updated == 0;
    if created {
        insert_product(&mut tx, id.as_str(), name, price, initial_stock, false).await?;
    }
    tx.commit().await?;
    let product = get_product(db, id)
        .await?
        .ok_or(StoreError::Sqlx(sqlx::Error::RowNotFound))?;
    Ok((product, created))
}

/// Adds units to a product's available stock. `None` when the product does not exist.
pub async fn restock(
    db: &Db,
    id: &ProductId,
    quantity: Quantity,
) -> Result<Option<Product>, StoreError> {
    let mut tx = db.begin().await?;
    let q = i64::from(quantity.get());
    let n = sqlx::query(
        "UPDATE products SET available = available + $2, restocked = restocked + $2, updated_at = $3 \
         WHERE product_id = $1",
    )
    .bind(id.as_str())
    .bind(q)
    .bind(now_micros())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    if n == 0 {
        return Ok(None);
    }
    get_product(db, id).await
}

/// The reservation status of an order, if the service has decided on it.
pub async fn reservation_status(
    conn: &mut AnyConnection,
    order_id: OrderId,
) -> Result<Option<ReservationStatus>, StoreError> {
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM reservations WHERE order_id = $1")
            .bind(order_id.to_string())
            .fetch_optional(conn)
            .await?;
    Ok(status.as_deref().and_then(ReservationStatus::parse))
}

/// Price and availability of the given products (unknown ones are absent).
pub async fn stock_levels(
    conn: &mut AnyConnection,
    products: &[&ProductId],
) -> Result<BTreeMap<ProductId, StockLevel>, StoreError> {
    if products.is_empty() {
        return Ok(BTreeMap::new());
    }
    let sql = format!(
        "SELECT product_id, unit_price_minor, currency, available FROM products WHERE product_id IN ({})",
        placeholders(1, products.len())
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for p in products {
        query = query.bind(p.as_str());
    }
    let rows = query.fetch_all(conn).await?;
    let mut out = BTreeMap::new();
    for row in rows {
        let id: String = row.try_get("product_id")?;
        let currency: String = row.try_get("currency")?;
        let (Ok(id), Ok(currency)) = (ProductId::parse(id), Currency::parse(&currency)) else {
            continue; // a row we could not have written; treated as an unknown product
        };
        let price: i64 = row.try_get("unit_price_minor")?;
        let available: i64 = row.try_get("available")?;
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

/// Moves each line's units from available to reserved and records the reservation. Each update
/// re-checks availability, so a concurrent reservation on another replica can never oversell:
/// if one lost the race the whole reservation fails (the caller's savepoint undoes the rest).
pub async fn reserve(
    conn: &mut AnyConnection,
    order_id: OrderId,
    lines: &[PricedLine],
    total: Money,
) -> Result<(), ReserveError> {
    let now = now_micros();
    for line in lines {
        let q = i64::from(line.quantity.get());
        let n = sqlx::query(
            "UPDATE products SET available = available - $2, reserved = reserved + $2, updated_at = $3 \
             WHERE product_id = $1 AND available >= $2",
        )
        .bind(line.product_id.as_str())
        .bind(q)
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if n != 1 {
            return Err(ReserveError::StockChanged(line.product_id.to_string()));
        }
    }
    insert_reservation(conn, order_id, ReservationStatus::Reserved, Some(total)).await?;
    let rows: Vec<String> = (0..lines.len())
        .map(|i| format!("($1, ${}, ${}, ${})", 3 * i + 2, 3 * i + 3, 3 * i + 4))
        .collect();
    let sql = format!(
        "INSERT INTO reservation_lines (order_id, product_id, quantity, unit_price_minor) VALUES {}",
        rows.join(", ")
    );
    // Only generated placeholders are interpolated; every value is bound.
    let mut query = sqlx::query(AssertSqlSafe(sql)).bind(order_id.to_string());
    for line in lines {
        query = query
            .bind(line.product_id.as_str())
            .bind(i64::from(line.quantity.get()))
            .bind(line.unit_price.amount_minor);
    }
    query.execute(&mut *conn).await?;
    Ok(())
}

/// Records an order the service decided on without holding stock (rejected, or cancelled
/// before it was reserved).
pub async fn insert_reservation(
    conn: &mut AnyConnection,
    order_id: OrderId,
    status: ReservationStatus,
    total: Option<Money>,
) -> Result<(), StoreError> {
    let now = now_micros();
    sqlx::query(
        "INSERT INTO reservations (order_id, status, total_minor, currency, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $5)",
    )
    .bind(order_id.to_string())
    .bind(status.as_str())
    .bind(total.map(|t| t.amount_minor))
    .bind(total.map(|t| t.currency.as_str().to_owned()))
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// The lines of an order's reservation.
async fn reservation_lines(
    conn: &mut AnyConnection,
    order_id: OrderId,
) -> Result<Vec<OrderLine>, StoreError> {
    let rows = sqlx::query("SELECT product_id, quantity FROM reservation_lines WHERE order_id = $1 ORDER BY product_id")
        .bind(order_id.to_string())
        .fetch_all(conn)
        .await?;
    let mut lines = Vec::with_capacity(rows.len());
    for row in rows {
        let product: String = row.try_get("product_id")?;
        let quantity: i64 = row.try_get("quantity")?;
        if let (Ok(product_id), Ok(quantity)) = (
            ProductId::parse(product),
            Quantity::new(u32::try_from(quantity).unwrap_or(0)),
        ) {
            lines.push(OrderLine {
                product_id,
                quantity,
            });
        }
    }
    Ok(lines)
}

/// Where a reservation's units move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// reserved → committed (paid).
    Commit,
    /// reserved → available (payment failed or order cancelled).
    ReleaseReserved,
    /// committed → available (an order cancelled after it was paid; the payment is refunded).
    ReleaseCommitted,
}

/// Moves an order's reserved or committed units and sets the reservation's new status, if the
/// reservation is still in the status the transition starts from. Returns the lines moved, or
/// `None` when another transaction changed the reservation first (nothing is moved then).
///
/// The status moves first, with a condition on the old status: the caller read the status
/// before, and on PostgreSQL (read committed) another transaction — a payment outcome and a
/// cancellation of the same order handled at once by two consumers, or two replicas — may have
/// moved it since. This `UPDATE` waits for that transaction, then matches nothing, so the units
/// are never moved twice.
pub async fn transition(
    conn: &mut AnyConnection,
    order_id: OrderId,
    transition: Transition,
) -> Result<Option<Vec<OrderLine>>, StoreError> {
    let (update, from, to) = match transition {
        Transition::Commit => (
            "UPDATE products SET reserved = reserved - $2, committed = committed + $2, updated_at = $3 WHERE product_id = $1",
            ReservationStatus::Reserved,
            ReservationStatus::Committed,
        ),
        Transition::ReleaseReserved => (
            "UPDATE products SET reserved = reserved - $2, available = available + $2, updated_at = $3 WHERE product_id = $1",
            ReservationStatus::Reserved,
            ReservationStatus::Released,
        ),
        Transition::ReleaseCommitted => (
            "UPDATE products SET committed = committed - $2, available = available + $2, updated_at = $3 WHERE product_id = $1",
            ReservationStatus::Committed,
            ReservationStatus::Released,
        ),
    };
    let now = now_micros();
    let moved = sqlx::query(
        "UPDATE reservations SET status = $2, updated_at = $3 WHERE order_id = $1 AND status = $4",
    )
    .bind(order_id.to_string())
    .bind(to.as_str())
    .bind(now)
    .bind(from.as_str())
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if moved != 1 {
        return Ok(None);
    }
    let lines = reservation_lines(&mut *conn, order_id).await?;
    for line in &lines {
        sqlx::query(update)
            .bind(line.product_id.as_str())
            .bind(i64::from(line.quantity.get()))
            .bind(now)
            .execute(&mut *conn)
            .await?;
    }
    Ok(Some(lines))
}
