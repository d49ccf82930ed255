//! The inbox: which events each consumer has already handled.
//!
//! The runner calls [`record`] inside the handler's transaction, before the handler runs. A
//! redelivered event (a late ack, a replayed dead letter, a relay that re-published beyond the
//! duplicate window) finds its row, and the runner acks it without calling the handler again.
//! Rows are pruned after a retention period ([`prune`]) far longer than any redelivery.

use std::collections::HashSet;

use orderflow_contracts::EventId;
use orderflow_store::{AssertSqlSafe, Db, StoreError, Tx, now_micros, values_list};

/// Records that `consumer` handles `event_id`. Returns `false` when it already had.
pub async fn record(tx: &mut Tx, consumer: &str, event_id: EventId) -> Result<bool, StoreError> {
    let result = sqlx::query(
        "INSERT INTO inbox (consumer, event_id, processed_at) VALUES ($1, $2, $3) \
         ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .bind(event_id.to_string())
    .bind(now_micros())
    .execute(&mut **tx)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Records that `consumer` handles each of `event_ids` in one statement. Returns the ids that
/// were new (the others had been handled before).
///
/// The ids are inserted in key order, so two transactions recording overlapping ids (a
/// redelivery handled by two replicas at once) wait for each other instead of deadlocking.
pub async fn record_many(
    tx: &mut Tx,
    consumer: &str,
    event_ids: &[EventId],
) -> Result<HashSet<EventId>, StoreError> {
    if event_ids.is_empty() {
        return Ok(HashSet::new());
    }
    let sql = format!(
        "INSERT INTO inbox (event_id, consumer, processed_at) VALUES {} \
         ON CONFLICT DO NOTHING RETURNING event_id",
        values_list(event_ids.len(), 1, 3, ", $1, $2")
    );
    // Only generated placeholders are interpolated; every value is bound.
    let mut query = sqlx::query_scalar::<_, String>(AssertSqlSafe(sql))
        .bind(consumer)
        .bind(now_micros());
    let mut keys: Vec<String> = event_ids.iter().map(ToString::to_string).collect();
    keys.sort_unstable();
    for key in keys {
        query = query.bind(key);
    }
    let inserted = query.fetch_all(&mut **tx).await?;
    Ok(inserted.iter().filter_map(|s| s.parse().ok()).collect())
}

/// Whether `consumer` has handled `event_id`.
pub async fn contains(db: &Db, consumer: &str, event_id: EventId) -> Result<bool, StoreError> {
    let n: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM inbox WHERE consumer = $1 AND event_id = $2")
            .bind(consumer)
            .bind(event_id.to_string())
            .fetch_one(db.reader())
            .await?;
    Ok(n > 0)
}

/// Deletes inbox rows older than `retention`. Returns how many were deleted.
pub async fn prune(db: &Db, retention: std::time::Duration) -> Result<u64, StoreError> {
    let cutoff = now_micros() - retention.as_micros() as i64;
    let result = sqlx::query("DELETE FROM inbox WHERE processed_at < $1")
        .bind(cutoff)
        .execute(db.writer())
        .await?;
    Ok(result.rows_affected())
}
