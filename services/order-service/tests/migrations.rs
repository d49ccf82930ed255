//! A SQLite database made by an older release keeps its orders, lines, timeline and
//! idempotency keys through the upgrade that stores them in their primary keys (migration 3),
//! with its foreign keys pointing at the new tables.
#![allow(clippy::unwrap_used, missing_docs)]

use orderflow_testkit::{sqlite_table, upgraded_sqlite};

const SEED: &str = "
INSERT INTO orders (order_id, customer_id, payment_method, status, total_minor, currency,
        correlation_id, created_at, updated_at, paid_minor, paid_currency, paid_event_id)
    VALUES ('o-1', 'c-1', 'card', 'pending', 1200, 'EUR', 'k-1', 1, 1, 1200, 'EUR', 'e-9'),
           ('o-2', 'c-1', 'card', 'confirmed', 300, 'EUR', 'k-2', 2, 3, NULL, NULL, NULL);
INSERT INTO order_lines (order_id, product_id, quantity)
    VALUES ('o-1', 'p-1', 2), ('o-1', 'p-2', 1), ('o-2', 'p-1', 1);
INSERT INTO order_timeline (order_id, event_type, event_id, at, detail)
    VALUES ('o-1', 'orders.created', 'e-1', 1, '{}'), ('o-2', 'orders.created', 'e-2', 2, '{}'),
           ('o-2', 'orders.confirmed', 'e-3', 3, '{}');
INSERT INTO idempotency_keys (idempotency_key, request, order_id, created_at)
    VALUES ('key-1', '{}', 'o-1', 1);
";

#[tokio::test]
async fn an_old_sqlite_database_keeps_its_orders_through_the_lean_upgrade() {
    let (_file, db) = upgraded_sqlite("order-service", order_service::MIGRATIONS, 2, SEED).await;
    assert_eq!(sqlite_table(&db, "orders").await, (2, true));
    assert_eq!(sqlite_table(&db, "order_lines").await, (3, true));
    assert_eq!(sqlite_table(&db, "order_timeline").await, (3, false));
    assert_eq!(sqlite_table(&db, "idempotency_keys").await, (1, true));
    let (paid, orphan) = db
        .write(|tx| {
            let paid: Option<i64> = tx.query_one(
                "SELECT paid_minor FROM orders WHERE order_id = 'o-1'",
                &[],
                |r| r.get(0),
            )?;
            let orphan = tx.execute_script(
                "INSERT INTO order_lines (order_id, product_id, quantity) VALUES ('o-9', 'p-1', 1)",
            );
            Ok::<_, orderflow_store::StoreError>((paid, orphan))
        })
        .await
        .unwrap();
    assert_eq!(paid, Some(1200), "the early payment columns are copied");
    assert!(
        orphan.is_err(),
        "a line of an unknown order is still refused"
    );
}
