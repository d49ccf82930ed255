//! A SQLite database made by an older release keeps its outbox and inbox rows through the
//! upgrade that stores them leaner (migration 3), and the upgraded tables take new rows.
#![allow(clippy::unwrap_used, missing_docs)]

use orderflow_messaging::{MIGRATION_COMPONENT, MIGRATIONS};
use orderflow_testkit::{sqlite_table, upgraded_sqlite};

const SEED: &str = "
INSERT INTO outbox (event_id, subject, headers, payload, created_at, sent_at, claimed_until)
    VALUES ('e-1', 'orders.created', '{}', '{}', 1, 2, 0),
           ('e-2', 'orders.created', '{}', '{}', 3, NULL, 0);
INSERT INTO inbox (consumer, event_id, processed_at)
    VALUES ('inventory', 'e-0', 1), ('payment', 'e-0', 1);
";

#[tokio::test]
async fn an_old_sqlite_database_keeps_its_rows_through_the_lean_upgrade() {
    let (_file, db) = upgraded_sqlite(MIGRATION_COMPONENT, MIGRATIONS, 2, SEED).await;
    assert_eq!(sqlite_table(&db, "inbox").await, (2, true));
    assert_eq!(sqlite_table(&db, "outbox").await, (2, false));
    let (unsent, next_id) = db
        .write(|tx| {
            tx.execute_script(
                "INSERT INTO outbox (event_id, subject, headers, payload, created_at) \
                 VALUES ('e-3', 'orders.created', '{}', '{}', 4)",
            )?;
            let unsent: Vec<String> = tx.query(
                "SELECT event_id FROM outbox WHERE sent_at IS NULL ORDER BY id",
                &[],
                |r| r.get(0),
            )?;
            let id: i64 = tx.query_one("SELECT MAX(id) FROM outbox", &[], |r| r.get(0))?;
            Ok::<_, orderflow_store::StoreError>((unsent, id))
        })
        .await
        .unwrap();
    assert_eq!(unsent, ["e-2", "e-3"], "the unsent rows keep their order");
    assert_eq!(next_id, 3, "ids go on after the copied ones");
    let duplicate = db
        .write(|tx| {
            tx.execute_script(
                "INSERT INTO inbox (consumer, event_id, processed_at) VALUES ('payment', 'e-0', 2)",
            )
        })
        .await;
    assert!(
        duplicate.is_err(),
        "the inbox key still refuses a second row"
    );
}
