//! The inventory's tables: products with their stock, reservations and their lines.
//!
//! Every stock change is one `UPDATE` that moves units between `available`, `reserved` and
//! `committed` (or adds to `available` and `restocked`), so the invariant
//! `available + reserved + committed = initial + restocked` holds after every statement.

use std::collections::{BTreeMap, HashMap, HashSet};

use orderflow_contracts::events::{OrderLine, PricedLine};
use orderflow_contracts::{Currency, Money, OrderId, ProductId, Quantity};
use orderflow_store::{
    AssertSqlSafe, Db, StoreError, case_when, now_micros, placeholders, values_list,
};
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

/// The orders among `orders` the service has already decided on.
pub async fn decided(
    conn: &mut AnyConnection,
    orders: &[OrderId],
) -> Result<HashSet<OrderId>, StoreError> {
    if orders.is_empty() {
        return Ok(HashSet::new());
    }
    let sql = format!(
        "SELECT order_id FROM reservations WHERE order_id IN ({})",
        placeholders(1, orders.len())
    );
    let mut query = sqlx::query_scalar::<_, String>(AssertSqlSafe(sql));
    for o in orders {
        query = query.bind(o.to_string());
    }
    Ok(query
        .fetch_all(conn)
        .await?
        .iter()
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
    const fn columns(self) -> (&'static str, &'static str) {
        match self {
            Self::Reserve => ("available", "reserved"),
            Self::Commit => ("reserved", "committed"),
            Self::ReleaseReserved => ("reserved", "available"),
            Self::ReleaseCommitted => ("committed", "available"),
        }
    }
}

/// Moves units of many products at once, one statement: `deltas` maps a product to the units
/// it moves. A product without enough units in the source column is not touched; the result
/// is how many products moved, so a caller can tell a concurrent change (fewer than asked).
pub async fn move_stock(
    conn: &mut AnyConnection,
    deltas: &BTreeMap<ProductId, i64>,
    how: Move,
) -> Result<usize, StoreError> {
    if deltas.is_empty() {
        return Ok(0);
    }
    let (from, to) = how.columns();
    let (case, ids) = case_when(2, deltas.len());
    // Column names come from `Move`; only generated placeholders are interpolated besides.
    let sql = format!(
        "UPDATE products SET {from} = {from} - CASE product_id{case} END, \
         {to} = {to} + CASE product_id{case} END, updated_at = $1 \
         WHERE product_id IN ({ids}) AND {from} >= CASE product_id{case} END"
    );
    let mut query = sqlx::query(AssertSqlSafe(sql)).bind(now_micros());
    for (product, units) in deltas {
        query = query.bind(product.as_str()).bind(*units);
    }
    Ok(query.execute(conn).await?.rows_affected() as usize)
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

/// Inserts reservations and their lines: one statement for each table.
pub async fn insert_reservations(
    conn: &mut AnyConnection,
    rows: &[ReservationRow],
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO reservations (order_id, status, total_minor, currency, created_at, updated_at) VALUES {}",
        values_list(rows.len(), 4, 2, ", $1, $1")
    );
    let mut query = sqlx::query(AssertSqlSafe(sql)).bind(now_micros());
    for r in rows {
        query = query
            .bind(r.order_id.to_string())
            .bind(r.status.as_str())
            .bind(r.total.map(|t| t.amount_minor))
            .bind(r.total.map(|t| t.currency.as_str().to_owned()));
    }
    query.execute(&mut *conn).await?;

    let lines: Vec<(OrderId, &PricedLine)> = rows
        .iter()
        .flat_map(|r| r.lines.iter().map(move |l| (r.order_id, l)))
        .collect();
    if lines.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO reservation_lines (order_id, product_id, quantity, unit_price_minor) VALUES {}",
        values_list(lines.len(), 4, 1, "")
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for (order_id, l) in lines {
        query = query
            .bind(order_id.to_string())
            .bind(l.product_id.as_str())
            .bind(i64::from(l.quantity.get()))
            .bind(l.unit_price.amount_minor);
    }
    query.execute(conn).await?;
    Ok(())
}

/// The reservations of `orders` with their lines, in one query.
pub async fn reservations(
    conn: &mut AnyConnection,
    orders: &[OrderId],
) -> Result<HashMap<OrderId, (ReservationStatus, Vec<OrderLine>)>, StoreError> {
    let mut out: HashMap<OrderId, (ReservationStatus, Vec<OrderLine>)> = HashMap::new();
    if orders.is_empty() {
        return Ok(out);
    }
    let sql = format!(
        "SELECT r.order_id, r.status, l.product_id, l.quantity FROM reservations r \
         LEFT JOIN reservation_lines l ON l.order_id = r.order_id \
         WHERE r.order_id IN ({}) ORDER BY r.order_id, l.product_id",
        placeholders(1, orders.len())
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for o in orders {
        query = query.bind(o.to_string());
    }
    for row in query.fetch_all(conn).await? {
        let order: String = row.try_get("order_id")?;
        let status: String = row.try_get("status")?;
        let (Ok(order), Some(status)) =
            (order.parse::<OrderId>(), ReservationStatus::parse(&status))
        else {
            continue;
        };
        let entry = out.entry(order).or_insert_with(|| (status, Vec::new()));
        let product: Option<String> = row.try_get("product_id")?;
        let quantity: Option<i64> = row.try_get("quantity")?;
        if let (Some(product), Some(quantity)) = (product, quantity)
            && let (Ok(product_id), Ok(quantity)) = (
                ProductId::parse(product),
                Quantity::new(u32::try_from(quantity).unwrap_or(0)),
            )
        {
            entry.1.push(OrderLine {
                product_id,
                quantity,
            });
        }
    }
    Ok(out)
}

/// Moves many reservations from one status to another, one statement: each
/// `(order, from, to)` moves only if the reservation is still in `from`. Returns how many moved,
/// so a caller can tell that another transaction moved one first (fewer than asked).
///
/// Callers move the status before the stock: they read the status earlier, and on PostgreSQL
/// (read committed) another transaction — a payment outcome and a cancellation of the same
/// order handled at once by two consumers, or by two replicas — may have moved it since. This
/// `UPDATE` waits for that transaction, then matches nothing for the order, and the caller
/// retries instead of moving the units a second time.
pub async fn move_statuses(
    conn: &mut AnyConnection,
    moves: &[(OrderId, ReservationStatus, ReservationStatus)],
) -> Result<usize, StoreError> {
    use std::fmt::Write as _;
    if moves.is_empty() {
        return Ok(0);
    }
    let (mut to_case, mut from_case, mut ids) = (String::new(), String::new(), Vec::new());
    for i in 0..moves.len() {
        let (key, to, from) = (2 + 3 * i, 3 + 3 * i, 4 + 3 * i);
        let _ = write!(to_case, " WHEN ${key} THEN ${to}");
        let _ = write!(from_case, " WHEN ${key} THEN ${from}");
        ids.push(format!("${key}"));
    }
    // Only generated placeholders are interpolated; every value is bound.
    let sql = format!(
        "UPDATE reservations SET status = CASE order_id{to_case} END, updated_at = $1 \
         WHERE order_id IN ({}) AND status = CASE order_id{from_case} END",
        ids.join(", ")
    );
    let mut query = sqlx::query(AssertSqlSafe(sql)).bind(now_micros());
    for (order, from, to) in moves {
        query = query
            .bind(order.to_string())
            .bind(to.as_str())
            .bind(from.as_str());
    }
    Ok(query.execute(conn).await?.rows_affected() as usize)
}
