//! The inbox: which events each consumer has already handled.
//!
//! The runner calls [`record`] inside the handler's transaction, before the handler runs. A
//! redelivered event (a late ack, a replayed dead letter, a copy re-published beyond the
//! duplicate window) finds its row, and the runner acks it without calling the handler again.
//! Rows are pruned after a retention period ([`prune`]) far longer than any redelivery.

use orderflow_contracts::EventId;
use orderflow_store::{Db, StoreError, Tx, now_micros, params, row};

/// Records that `consumer` handles each of `event_ids`; returns, in the same order, whether
/// each was new (`false`: handled before, or earlier in the same list).
///
/// The rows are inserted in key order, so two transactions recording overlapping ids (a
/// redelivery handled by two replicas at once) wait for each other instead of deadlocking.
pub fn record(
    tx: &mut Tx<'_>,
    consumer: &str,
    event_ids: &[EventId],
) -> Result<Vec<bool>, StoreError> {
    let mut order: Vec<usize> = (0..event_ids.len()).collect();
    order.sort_by_key(|&i| event_ids[i]);
    let now = now_micros();
    let keys: Vec<String> = order.iter().map(|&i| event_ids[i].to_string()).collect();
    let inserted = tx.execute_each(
        "INSERT INTO inbox (consumer, event_id, processed_at) VALUES ($1, $2, $3) \
         ON CONFLICT DO NOTHING",
        keys.iter().map(|k| row![consumer, k.as_str(), now]),
    )?;
    let mut fresh = vec![false; event_ids.len()];
    for (&i, n) in order.iter().zip(inserted) {
        fresh[i] = n == 1;
    }
    Ok(fresh)
}

/// Whether `consumer` has handled `event_id`.
pub async fn contains(db: &Db, consumer: &str, event_id: EventId) -> Result<bool, StoreError> {
    let consumer = consumer.to_owned();
    db.read(move |tx| {
        tx.query_opt(
            "SELECT 1 FROM inbox WHERE consumer = $1 AND event_id = $2",
            params![consumer, event_id.to_string()],
            |_| Ok(()),
        )
        .map(|found| found.is_some())
    })
    .await
}

/// Deletes inbox rows older than `retention`, at most `batch` per transaction until none is
/// left. Returns how many were deleted.
pub async fn prune(db: &Db, retention: std::time::Duration, batch: i64) -> Result<u64, StoreError> {
    let cutoff = now_micros() - retention.as_micros() as i64;
    let mut total = 0;
    loop {
        let n = db
            .write(move |tx| {
                tx.execute(
                    "DELETE FROM inbox WHERE (consumer, event_id) IN (SELECT consumer, event_id \
                     FROM inbox WHERE processed_at < $1 LIMIT $2)",
                    params![cutoff, batch],
                )
            })
            .await?;
        total += n;
        if n < batch as u64 {
            return Ok(total);
        }
    }
}
