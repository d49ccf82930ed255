//! A SQLite database made by an older release keeps its payments, and the reconciler's work
//! list, through the upgrade that stores payments in their primary key (migration 2).
#![allow(clippy::unwrap_used, missing_docs)]

use orderflow_testkit::{sqlite_table, upgraded_sqlite};

const SEED: &str = "
INSERT INTO payments (order_id, payment_id, status, amount_minor, currency, needs_reconciliation,
        flagged_at, reconcile_after, correlation_id, causation_id, created_at, updated_at)
    VALUES ('o-1', 'pay-1', 'completed', 1200, 'EUR', 0, NULL, 0, 'k-1', 'e-1', 1, 1),
           ('o-2', NULL, 'failed', NULL, NULL, 1, 5, 0, 'k-2', 'e-2', 2, 2),
           ('o-3', 'pay-3', 'refund_pending', 300, 'EUR', 0, NULL, 7, 'k-3', 'e-3', 3, 3);
";

#[tokio::test]
async fn an_old_sqlite_database_keeps_its_payments_through_the_lean_upgrade() {
    let (_file, db) =
        upgraded_sqlite("payment-service", payment_service::MIGRATIONS, 1, SEED).await;
    assert_eq!(sqlite_table(&db, "payments").await, (3, true));
    let to_reconcile: Vec<String> = db
        .read(|tx| {
            tx.query(
                "SELECT order_id FROM payments INDEXED BY payments_to_reconcile \
                 WHERE (status = 'refund_pending' OR needs_reconciliation = 1) \
                 AND reconcile_after <= 10 ORDER BY order_id",
                &[],
                |r| r.get(0),
            )
        })
        .await
        .unwrap();
    assert_eq!(
        to_reconcile,
        ["o-2", "o-3"],
        "the reconciler's index is back"
    );
}
