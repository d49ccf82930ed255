//! A SQLite database made by an older release keeps its catalog, stock and reservations
//! through the upgrade that stores them in their primary keys (migration 2).
#![allow(clippy::unwrap_used, missing_docs)]

use orderflow_testkit::{sqlite_table, upgraded_sqlite};

const SEED: &str = "
INSERT INTO products (product_id, name, unit_price_minor, currency, available, reserved,
        committed, initial, restocked, updated_at)
    VALUES ('p-1', 'Lamp', 1500, 'EUR', 7, 2, 1, 10, 0, 1), ('p-2', 'Desk', 9900, 'EUR', 3, 0, 0, 3, 0, 1);
INSERT INTO reservations (order_id, status, total_minor, currency, created_at, updated_at)
    VALUES ('o-1', 'reserved', 3000, 'EUR', 1, 1), ('o-2', 'committed', 1500, 'EUR', 1, 2);
INSERT INTO reservation_lines (order_id, product_id, quantity, unit_price_minor)
    VALUES ('o-1', 'p-1', 2, 1500), ('o-2', 'p-1', 1, 1500);
";

#[tokio::test]
async fn an_old_sqlite_database_keeps_its_stock_through_the_lean_upgrade() {
    let (_file, db) =
        upgraded_sqlite("inventory-service", inventory_service::MIGRATIONS, 1, SEED).await;
    assert_eq!(sqlite_table(&db, "products").await, (2, true));
    assert_eq!(sqlite_table(&db, "reservations").await, (2, true));
    assert_eq!(sqlite_table(&db, "reservation_lines").await, (2, true));
    let (stock, orphan) = db
        .write(|tx| {
            let stock: i64 = tx.query_one(
                "SELECT available + reserved + committed - initial - restocked FROM products \
                 WHERE product_id = 'p-1'",
                &[],
                |r| r.get(0),
            )?;
            let orphan = tx.execute_script(
                "INSERT INTO reservation_lines (order_id, product_id, quantity, unit_price_minor) \
                 VALUES ('o-9', 'p-1', 1, 1500)",
            );
            Ok::<_, orderflow_store::StoreError>((stock, orphan))
        })
        .await
        .unwrap();
    assert_eq!(stock, 0, "the stock invariant holds after the copy");
    assert!(
        orphan.is_err(),
        "a line of an unknown reservation is still refused"
    );
}
