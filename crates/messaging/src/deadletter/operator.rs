//! Operator access to the dead letters: list, show, replay, purge — what `orderflow dlq` and
//! the admin routes call.

use bytes::Bytes;
use orderflow_contracts::envelope::format_time;
use orderflow_contracts::names::{headers, subjects};
use time::OffsetDateTime;

use crate::publisher::header_pairs;
use crate::{MessagingError, Publisher};

fn is_not_found(e: &async_nats::jetstream::stream::RawMessageError) -> bool {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    matches!(e.kind(), RawMessageErrorKind::NoMessageFound)
}

/// A dead letter as an operator sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    /// Its sequence in the `DEAD_LETTERS` stream: its id for show, replay and purge.
    pub seq: u64,
    /// The subject the original message was published on.
    pub subject: String,
    /// The durable consumer that gave up.
    pub consumer: String,
    /// The stream the original came from.
    pub stream: String,
    /// The original's sequence in that stream.
    pub stream_sequence: u64,
    /// How many times the original was delivered.
    pub deliveries: u64,
    /// Why: `poison`, `permanent`, `retries-exhausted`, `max-deliveries`.
    pub reason: String,
    /// The error chain.
    pub error: String,
    /// The original's CloudEvents type, when it had one.
    pub event_type: Option<String>,
    /// The original's event id, when it had one.
    pub event_id: Option<String>,
    /// When its first failure happened, when the runner knew; otherwise when the original was
    /// published (its CloudEvents time), when known.
    pub first_failure: Option<String>,
    /// When it was dead-lettered.
    pub dead_lettered_at: String,
    /// Every header of the dead letter (the original's plus the `Orderflow-DL-*` ones).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// The original payload (UTF-8; lossy for binary payloads).
    pub payload: String,
    #[serde(skip)]
    raw_payload: Bytes,
}

impl DeadLetter {
    /// Groups failures that are the same problem: consumer, reason and event type.
    pub fn fingerprint(&self) -> String {
        format!(
            "{}/{}/{}",
            self.consumer,
            self.reason,
            self.event_type.as_deref().unwrap_or("unknown-type")
        )
    }

    fn from_stream_message(m: &async_nats::jetstream::message::StreamMessage) -> Self {
        let headers = header_pairs(&m.headers);
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let number = |name: &str| get(name).and_then(|v| v.parse().ok()).unwrap_or(0);
        let time = OffsetDateTime::from_unix_timestamp_nanos(m.time.unix_timestamp_nanos())
            .map(format_time)
            .unwrap_or_default();
        Self {
            seq: m.sequence,
            subject: get(headers::DL_SUBJECT).unwrap_or_default(),
            consumer: get(headers::DL_CONSUMER).unwrap_or_default(),
            stream: get(headers::DL_STREAM).unwrap_or_default(),
            stream_sequence: number(headers::DL_STREAM_SEQ),
            deliveries: number(headers::DL_DELIVERIES),
            reason: get(headers::DL_REASON).unwrap_or_default(),
            error: get(headers::DL_ERROR).unwrap_or_default(),
            event_type: get(headers::CE_TYPE),
            event_id: get(headers::CE_ID),
            first_failure: get(headers::DL_FIRST_FAILURE).or_else(|| get(headers::CE_TIME)),
            dead_lettered_at: get(headers::DL_TIME).unwrap_or(time),
            payload: String::from_utf8_lossy(&m.payload).into_owned(),
            raw_payload: m.payload.clone(),
            headers,
        }
    }

    /// Drops headers and payload, for listings.
    #[must_use]
    pub fn summary(mut self) -> Self {
        self.headers.clear();
        self.payload.clear();
        self
    }
}

/// Which dead letters an operation applies to. Empty fields match everything.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Filter {
    /// Only this consumer.
    pub consumer: Option<String>,
    /// Only this original subject.
    pub subject: Option<String>,
    /// Only errors containing this text.
    pub error: Option<String>,
    /// Only this reason.
    pub reason: Option<String>,
    /// Only dead-lettered at or after this RFC 3339 time.
    pub since: Option<String>,
    /// Only dead-lettered before this RFC 3339 time.
    pub until: Option<String>,
    /// Only these dead-letter sequences.
    pub seqs: Option<Vec<u64>>,
}

impl Filter {
    /// Whether a dead letter matches.
    pub fn matches(&self, dl: &DeadLetter) -> bool {
        use time::format_description::well_known::Rfc3339;
        let at = OffsetDateTime::parse(&dl.dead_lettered_at, &Rfc3339).ok();
        let bound = |s: &Option<String>| {
            s.as_deref()
                .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
        };
        self.consumer.as_ref().is_none_or(|c| *c == dl.consumer)
            && self.subject.as_ref().is_none_or(|s| *s == dl.subject)
            && self.reason.as_ref().is_none_or(|r| *r == dl.reason)
            && self
                .error
                .as_ref()
                .is_none_or(|e| dl.error.contains(e.as_str()))
            && self.seqs.as_ref().is_none_or(|seqs| seqs.contains(&dl.seq))
            && bound(&self.since).is_none_or(|since| at.is_some_and(|at| at >= since))
            && bound(&self.until).is_none_or(|until| at.is_some_and(|at| at < until))
    }

    /// Whether the filter matches everything.
    pub fn is_empty(&self) -> bool {
        self.consumer.is_none()
            && self.subject.is_none()
            && self.error.is_none()
            && self.reason.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && self.seqs.is_none()
    }

    /// Checks the time bounds parse, naming the bad one.
    pub fn validate(&self) -> Result<(), String> {
        use time::format_description::well_known::Rfc3339;
        for (name, value) in [("since", &self.since), ("until", &self.until)] {
            if let Some(v) = value
                && OffsetDateTime::parse(v, &Rfc3339).is_err()
            {
                return Err(format!(
                    "{name}: {v:?} is not an RFC 3339 time like 2026-01-31T12:00:00Z"
                ));
            }
        }
        Ok(())
    }
}

/// Dead letters of one fingerprint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Group {
    /// consumer/reason/event type.
    pub fingerprint: String,
    /// How many.
    pub count: usize,
    /// The oldest's dead-letter time.
    pub first: String,
    /// The newest's dead-letter time.
    pub last: String,
    /// The newest's error.
    pub last_error: String,
    /// Their sequences.
    pub seqs: Vec<u64>,
}

/// Groups dead letters by fingerprint, biggest group first.
pub fn group(letters: &[DeadLetter]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for dl in letters {
        let fp = dl.fingerprint();
        match groups.iter_mut().find(|g| g.fingerprint == fp) {
            Some(g) => {
                g.count += 1;
                g.last.clone_from(&dl.dead_lettered_at);
                g.last_error.clone_from(&dl.error);
                g.seqs.push(dl.seq);
            }
            None => groups.push(Group {
                fingerprint: fp,
                count: 1,
                first: dl.dead_lettered_at.clone(),
                last: dl.dead_lettered_at.clone(),
                last_error: dl.error.clone(),
                seqs: vec![dl.seq],
            }),
        }
    }
    groups.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.fingerprint.cmp(&b.fingerprint))
    });
    groups
}

/// What a replay or purge did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Outcome {
    /// Dead letters that matched.
    pub matched: usize,
    /// Dead letters replayed or purged (0 in a dry run).
    pub done: usize,
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// The sequences that matched.
    pub seqs: Vec<u64>,
    /// Failures, one line each.
    pub errors: Vec<String>,
}

/// Operator access to the dead-letter stream: list, show, replay, purge.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    nats: crate::Nats,
    publisher: Publisher,
}

/// Dead letters a replay or purge holds in memory at once: one page, read, acted on, let go.
const PAGE: usize = 256;

/// The dead letters matching a filter, a page at a time, each page counted into the outcome
/// of the operation walking them.
struct Pages<'a> {
    dead_letters: &'a DeadLetters,
    filter: &'a Filter,
    from: Option<u64>,
}

impl<'a> Pages<'a> {
    fn new(dead_letters: &'a DeadLetters, filter: &'a Filter) -> Self {
        Self {
            dead_letters,
            filter,
            from: Some(1),
        }
    }

    /// The next page, counted into `outcome` (in a dry run only counted: nothing to act
    /// on); `None` after the last.
    async fn next(
        &mut self,
        outcome: &mut Outcome,
    ) -> Result<Option<Vec<DeadLetter>>, MessagingError> {
        let Some(start) = self.from else {
            return Ok(None);
        };
        let (letters, next) = self.dead_letters.page(self.filter, start, PAGE).await?;
        self.from = next;
        outcome.matched += letters.len();
        outcome.seqs.extend(letters.iter().map(|d| d.seq));
        Ok(Some(if outcome.dry_run { Vec::new() } else { letters }))
    }
}

impl DeadLetters {
    /// Dead-letter operations on a connection.
    pub fn new(nats: &crate::Nats) -> Self {
        Self {
            nats: nats.clone(),
            publisher: Publisher::new(nats),
        }
    }

    async fn stream(&self) -> Result<async_nats::jetstream::stream::Stream, MessagingError> {
        self.nats
            .jetstream()
            .get_stream(orderflow_contracts::names::streams::DEAD_LETTERS)
            .await
            .map_err(|e| MessagingError::js("get dead-letter stream", e))
    }

    /// Every dead letter matching `filter`, oldest first, at most `limit`.
    pub async fn list(
        &self,
        filter: &Filter,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, MessagingError> {
        Ok(self.page(filter, 1, limit).await?.0)
    }

    /// The dead letters matching `filter` from stream sequence `from` on, oldest first, at most
    /// `limit`; and where the next page starts, when there may be more.
    pub async fn page(
        &self,
        filter: &Filter,
        from: u64,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, Option<u64>), MessagingError> {
        let stream = self.stream().await?;
        let last = stream
            .get_info()
            .await
            .map_err(|e| MessagingError::js("dead-letter stream info", e))?
            .state
            .last_sequence;
        let all = format!("{}.>", subjects::DEAD_LETTER_PREFIX);
        let mut next = from.max(1);
        let mut out = Vec::new();
        while next <= last && out.len() < limit {
            let m = match stream
                .raw_message_builder()
                .sequence(next)
                .next_by_subject(all.clone())
                .send()
                .await
            {
                Ok(m) => m,
                Err(e) if is_not_found(&e) => {
                    next = last + 1;
                    break;
                }
                Err(e) => return Err(MessagingError::js("read dead letter", e)),
            };
            next = m.sequence + 1;
            let dl = DeadLetter::from_stream_message(&m);
            if filter.matches(&dl) {
                out.push(dl);
            }
        }
        Ok((out, (next <= last).then_some(next)))
    }

    /// One dead letter with its headers and payload.
    pub async fn show(&self, seq: u64) -> Result<Option<DeadLetter>, MessagingError> {
        let stream = self.stream().await?;
        match stream.get_raw_message(seq).await {
            Ok(m) if m.subject.starts_with(subjects::DEAD_LETTER_PREFIX) => {
                Ok(Some(DeadLetter::from_stream_message(&m)))
            }
            Ok(_) => Ok(None),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(MessagingError::js("read dead letter", e)),
        }
    }

    /// Republishes matching dead letters to their original subjects, at most `per_second` a
    /// second, then deletes each from the dead-letter stream. A replay keeps the event id (so the
    /// consumer's inbox still prevents a second effect) but gets a fresh `Nats-Msg-Id` (the
    /// duplicate window would otherwise drop it).
    pub async fn replay(
        &self,
        filter: &Filter,
        dry_run: bool,
        per_second: u32,
    ) -> Result<Outcome, MessagingError> {
        let stream = self.stream().await?;
        let pause = std::time::Duration::from_secs_f64(1.0 / f64::from(per_second.max(1)));
        let mut outcome = Outcome {
            dry_run,
            ..Outcome::default()
        };
        let mut pages = Pages::new(self, filter);
        while let Some(letters) = pages.next(&mut outcome).await? {
            for dl in letters {
                self.replay_one(&stream, &dl, &mut outcome).await;
                tokio::time::sleep(pause).await;
            }
        }
        Ok(outcome)
    }

    async fn replay_one(
        &self,
        stream: &async_nats::jetstream::stream::Stream,
        dl: &DeadLetter,
        outcome: &mut Outcome,
    ) {
        let mut headers: Vec<(String, String)> = dl
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with("Orderflow-DL-"))
            .cloned()
            .collect();
        headers.retain(|(k, _)| k != headers::NATS_MSG_ID);
        let original_id = dl
            .event_id
            .clone()
            .unwrap_or_else(|| format!("seq{}", dl.stream_sequence));
        headers.push((
            headers::NATS_MSG_ID.to_owned(),
            format!("replay:{original_id}:dl{}", dl.seq),
        ));
        match self
            .publisher
            .publish_raw(&dl.subject, &headers, dl.raw_payload.clone())
            .await
        {
            Ok(_) => {
                if let Err(e) = stream.delete_message(dl.seq).await {
                    outcome.errors.push(format!(
                        "dead letter {} replayed but not deleted: {e}",
                        dl.seq
                    ));
                }
                outcome.done += 1;
                tracing::info!(seq = dl.seq, subject = %dl.subject, consumer = %dl.consumer, "dead letter replayed");
            }
            Err(e) => outcome.errors.push(format!("dead letter {}: {e}", dl.seq)),
        }
    }

    /// Deletes matching dead letters.
    pub async fn purge(&self, filter: &Filter, dry_run: bool) -> Result<Outcome, MessagingError> {
        let stream = self.stream().await?;
        let mut outcome = Outcome {
            dry_run,
            ..Outcome::default()
        };
        let mut pages = Pages::new(self, filter);
        while let Some(letters) = pages.next(&mut outcome).await? {
            for dl in letters {
                match stream.delete_message(dl.seq).await {
                    Ok(_) => outcome.done += 1,
                    Err(e) => outcome.errors.push(format!("dead letter {}: {e}", dl.seq)),
                }
            }
        }
        if !dry_run {
            tracing::warn!(purged = outcome.done, "dead letters purged");
        }
        Ok(outcome)
    }
}
