//! `orderflow dlq`: the dead-letter stream for operators — list, show, replay, purge.
//!
//! It talks to NATS directly through [`orderflow_messaging::DeadLetters`], the same operations
//! every service serves on `/admin/dead-letters` (see `orderflow_runtime::admin`), so it works
//! while every service is down. Output is a readable table by default and the admin endpoint's
//! JSON with `--json`.
//!
//! Replay and purge act on many messages at once, so both refuse to run without a filter
//! unless `--all` says that every dead letter is meant, and purge (which cannot be undone)
//! also wants `--yes` unless it is a `--dry-run`.
//!
//! # Layout
//!
//! - this file: the flags, connecting, and the four operations;
//! - [`when`]: `--since` / `--until` times (RFC 3339 or "that long ago") and durations;
//! - [`render`]: tables, one dead letter in full, summaries (pure, unit-tested).

mod render;
mod when;

use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use orderflow_messaging::deadletter::{DeadLetter, DeadLetterReason, Filter, group};
use orderflow_messaging::{DeadLetters, MessagingError, Nats, NatsConfig};

use crate::console::Console;

/// The client name this tool shows in the server's connection list.
const CLIENT_NAME: &str = "orderflow-dlq";
/// How many dead letters `list` shows when not told (`--limit`).
const DEFAULT_LIST_LIMIT: usize = 100;
/// The filter flags' argument ids, which `--all` conflicts with.
const FILTER_IDS: [&str; 7] = [
    "consumer", "subject", "error", "reason", "since", "until", "seqs",
];

/// The flags of `orderflow dlq`.
#[derive(Debug, Clone, Args)]
pub struct DlqArgs {
    /// The NATS server to talk to; several URLs of one cluster may be given, comma separated.
    #[arg(
        long,
        global = true,
        env = "ORDERFLOW_NATS_URL",
        value_name = "URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,

    /// The operator's nkey seed file, when NATS authenticates clients. Without it, the one
    /// `orderflow up` made (`.data/nats-auth/operator.nk` of this checkout) is used when it
    /// exists.
    #[arg(
        long,
        global = true,
        env = "ORDERFLOW_NATS_NKEY_SEED_FILE",
        value_name = "FILE"
    )]
    pub nats_nkey_seed_file: Option<std::path::PathBuf>,

    /// PEM file of the authorities of the NATS servers' certificates: TLS to NATS.
    #[arg(
        long,
        global = true,
        env = "ORDERFLOW_NATS_TLS_CA",
        value_name = "FILE"
    )]
    pub nats_tls_ca: Option<std::path::PathBuf>,

    /// PEM files of a client certificate and its key, for servers that verify clients.
    #[arg(
        long,
        global = true,
        env = "ORDERFLOW_NATS_TLS_CERT",
        value_name = "FILE",
        requires_all = ["nats_tls_key", "nats_tls_ca"]
    )]
    pub nats_tls_cert: Option<std::path::PathBuf>,

    /// The key of --nats-tls-cert.
    #[arg(
        long,
        global = true,
        env = "ORDERFLOW_NATS_TLS_KEY",
        value_name = "FILE",
        requires = "nats_tls_cert"
    )]
    pub nats_tls_key: Option<std::path::PathBuf>,

    /// How long to wait for a connection to NATS before giving up (e.g. 5s, 500ms, 1m).
    #[arg(
        long,
        global = true,
        value_name = "DURATION",
        default_value = "5s",
        value_parser = when::parse_duration
    )]
    pub connect_timeout: Duration,

    /// The operation.
    #[command(subcommand)]
    pub command: DlqCommand,
}

/// The operations on dead letters.
#[derive(Debug, Clone, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first: one line each (seq, time, consumer, subject, reason,
    /// deliveries, error), or one line per kind of failure with --group.
    List(ListArgs),

    /// Show one dead letter in full: every field, every header, and the payload
    /// (pretty-printed when it is JSON).
    Show(ShowArgs),

    /// Republish dead letters on their original subjects, then remove them from the
    /// dead-letter stream.
    ///
    /// A replayed message keeps its payload and headers — its event id (ce-id) included, so
    /// a consumer that already handled that event (its inbox holds the id) acks it again
    /// without a second effect — but gets a fresh Nats-Msg-Id ("replay:<event id>:dl<seq>"):
    /// under the original one JetStream would drop it as a duplicate while the stream's
    /// duplicate window lasts. A message that still fails is dead-lettered again, under a
    /// new sequence.
    ///
    /// Needs a filter, or --all to replay every dead letter. Prints a summary: matched,
    /// replayed, errors (exit status 1 when a replay failed).
    Replay(ReplayArgs),

    /// Delete dead letters for good.
    ///
    /// Needs a filter, or --all to delete every dead letter, and --yes (without it, purge
    /// says how many would go and changes nothing). Prints a summary: matched, purged,
    /// errors.
    Purge(PurgeArgs),
}

/// Which dead letters an operation applies to; every filter given must match.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Filters")]
pub struct FilterArgs {
    /// Only dead letters of this durable consumer (e.g. inventory-orders).
    #[arg(long, value_name = "NAME")]
    pub consumer: Option<String>,

    /// Only messages originally published on this subject (exact, e.g. orders.created).
    #[arg(long, value_name = "SUBJECT")]
    pub subject: Option<String>,

    /// Only dead letters whose error contains this text (case-sensitive).
    #[arg(long, value_name = "TEXT")]
    pub error: Option<String>,

    /// Only dead letters with this reason.
    #[arg(long, value_enum)]
    pub reason: Option<Reason>,

    /// Only dead letters dead-lettered at or after TIME: RFC 3339 (2026-01-31T12:00:00Z) or
    /// that long ago (30m, 2h, 7d).
    #[arg(long, value_name = "TIME", value_parser = when::parse_time_bound)]
    pub since: Option<String>,

    /// Only dead letters dead-lettered before TIME (same forms as --since).
    #[arg(long, value_name = "TIME", value_parser = when::parse_time_bound)]
    pub until: Option<String>,

    /// Only the dead letter with this sequence (the SEQ column); repeat the flag or separate
    /// sequences with commas.
    #[arg(long = "seq", value_name = "SEQ", value_delimiter = ',')]
    pub seqs: Vec<u64>,
}

/// Why a message was dead-lettered (the `Orderflow-DL-Reason` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Reason {
    /// Undecodable or schema-invalid: retrying cannot help.
    Poison,
    /// The handler returned a permanent error.
    Permanent,
    /// The handler failed transiently on the last allowed delivery.
    RetriesExhausted,
    /// JetStream stopped delivering it (max deliveries) without any handler finishing.
    MaxDeliveries,
}

impl Reason {
    /// The messaging crate's reason, whose name is what the header holds.
    fn as_dead_letter_reason(self) -> DeadLetterReason {
        match self {
            Self::Poison => DeadLetterReason::Poison,
            Self::Permanent => DeadLetterReason::Permanent,
            Self::RetriesExhausted => DeadLetterReason::RetriesExhausted,
            Self::MaxDeliveries => DeadLetterReason::MaxDeliveries,
        }
    }
}

impl FilterArgs {
    /// Whether no filter was given (everything matches).
    fn is_empty(&self) -> bool {
        self.consumer.is_none()
            && self.subject.is_none()
            && self.error.is_none()
            && self.reason.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && self.seqs.is_empty()
    }

    /// The messaging crate's filter; refuses a time range that nothing can match.
    fn to_filter(&self) -> anyhow::Result<Filter> {
        let filter = Filter {
            consumer: self.consumer.clone(),
            subject: self.subject.clone(),
            error: self.error.clone(),
            reason: self
                .reason
                .map(|r| r.as_dead_letter_reason().as_str().to_owned()),
            since: self.since.clone(),
            until: self.until.clone(),
            seqs: (!self.seqs.is_empty()).then(|| self.seqs.clone()),
        };
        filter.validate().map_err(|e| anyhow!("--{e}"))?;
        if let (Some(since), Some(until)) = (&self.since, &self.until) {
            let since = when::time_bound_at(since, time::OffsetDateTime::now_utc());
            let until = when::time_bound_at(until, time::OffsetDateTime::now_utc());
            if let (Ok(since), Ok(until)) = (since, until)
                && since >= until
            {
                bail!(
                    "--since {} is not before --until {}: nothing can match",
                    when::format_rfc3339(since),
                    when::format_rfc3339(until)
                );
            }
        }
        Ok(filter)
    }
}

/// The flags of `orderflow dlq list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// One line per fingerprint — consumer/reason/event type, i.e. one kind of failure — with
    /// its count, first and last time, and its latest error.
    #[arg(long)]
    pub group: bool,

    /// Print JSON for scripts, as GET /admin/dead-letters answers: {"dead_letters": [..]}, or
    /// {"groups": [..]} with --group.
    #[arg(long)]
    pub json: bool,

    /// List at most N dead letters, oldest first [default: 100; with --group every match is
    /// counted].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: Option<u32>,

    /// The dead letters to list. (last: the filters are listed under their own heading).
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// The flags of `orderflow dlq show`.
#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    /// The dead letter's sequence (the SEQ column of `list`).
    pub seq: u64,

    /// Print it as JSON, as GET /admin/dead-letters/{seq} answers.
    #[arg(long)]
    pub json: bool,
}

/// The flags of `orderflow dlq replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Replay every dead letter (required when no filter is given).
    #[arg(long, conflicts_with_all = FILTER_IDS)]
    pub all: bool,

    /// List what would be replayed and change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Replay at most this many dead letters a second, so consumers catching up on a large
    /// replay are not flooded.
    #[arg(
        long,
        value_name = "PER_SECOND",
        default_value_t = 50,
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    pub rate: u32,

    /// Print the outcome as JSON, as POST /admin/dead-letters/replay answers.
    #[arg(long)]
    pub json: bool,

    /// The dead letters to replay. (last: the filters are listed under their own heading).
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// The flags of `orderflow dlq purge`.
// Independent command-line switches, each a plain yes/no: bools are what clap hands over.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Clone, Args)]
pub struct PurgeArgs {
    /// Delete every dead letter (required when no filter is given).
    #[arg(long, conflicts_with_all = FILTER_IDS)]
    pub all: bool,

    /// List what would be deleted and change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Really delete: without it (and without --dry-run) purge only says how many match.
    #[arg(long)]
    pub yes: bool,

    /// Print the outcome as JSON, as POST /admin/dead-letters/purge answers.
    #[arg(long)]
    pub json: bool,

    /// The dead letters to delete. (last: the filters are listed under their own heading).
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// Runs `orderflow dlq`.
pub async fn run(args: DlqArgs) -> anyhow::Result<()> {
    // Refuse what would be refused anyway before waiting for NATS.
    match &args.command {
        DlqCommand::Replay(a) => check_scope("replay", &a.filter, a.all)?,
        DlqCommand::Purge(a) => check_scope("purge", &a.filter, a.all)?,
        DlqCommand::List(_) | DlqCommand::Show(_) => {}
    }
    let seed = args
        .nats_nkey_seed_file
        .clone()
        .or_else(crate::up::default_operator_seed);
    let tls = args
        .nats_tls_ca
        .clone()
        .map(|ca| orderflow_messaging::NatsTls {
            ca,
            client: args.nats_tls_cert.clone().zip(args.nats_tls_key.clone()),
        });
    let nats = connect(&args.nats_url, seed.as_deref(), tls, args.connect_timeout).await?;
    let dead_letters = DeadLetters::new(&nats);
    let outcome = match args.command {
        DlqCommand::List(a) => list(&dead_letters, &a).await,
        DlqCommand::Show(a) => show(&dead_letters, &a).await,
        DlqCommand::Replay(a) => replay(&dead_letters, &a).await,
        DlqCommand::Purge(a) => purge(&dead_letters, &a).await,
    };
    nats.drain().await;
    outcome
}

/// Replay and purge touch many messages: without a filter they need `--all`.
fn check_scope(operation: &str, filter: &FilterArgs, all: bool) -> anyhow::Result<()> {
    if filter.is_empty() && !all {
        bail!(
            "refusing to {operation} every dead letter: narrow it with --consumer, --subject, \
             --error, --reason, --since, --until or --seq, or pass --all if every one is meant \
             (try --dry-run first)"
        );
    }
    Ok(())
}

/// Connects (with the nkey seed in `seed` and TLS, if given) and waits for the connection,
/// at most `timeout`.
async fn connect(
    url: &str,
    seed: Option<&std::path::Path>,
    tls: Option<orderflow_messaging::NatsTls>,
    timeout: Duration,
) -> anyhow::Result<Nats> {
    let redacted = orderflow_store::redact(url);
    let mut config = NatsConfig::new(url, CLIENT_NAME);
    config.tls = tls;
    if let Some(seed) = seed {
        config = config
            .nkey_seed_file(seed)
            .context("--nats-nkey-seed-file")?;
    }
    let nats = Nats::connect(&config)
        .await
        .with_context(|| format!("cannot use --nats-url {redacted:?}"))?;
    if nats.wait_connected(timeout).await.is_err() {
        bail!(
            "NATS is unreachable at {redacted}: no connection within {timeout:?} (is nats-server \
             running there? set --nats-url or ORDERFLOW_NATS_URL, or a longer --connect-timeout; \
             a server that authenticates clients needs --nats-nkey-seed-file)"
        );
    }
    Ok(nats)
}

/// A failed dead-letter operation, with a hint when the stream itself is missing.
fn failed(operation: &str, e: MessagingError) -> anyhow::Error {
    let missing_stream = e.to_string().contains("stream not found");
    let error = anyhow::Error::new(e).context(format!("cannot {operation}"));
    if missing_stream {
        error
            .context("this NATS has no DEAD_LETTERS stream: the services create it when they start")
    } else {
        error
    }
}

async fn list(dead_letters: &DeadLetters, args: &ListArgs) -> anyhow::Result<()> {
    let filter = args.filter.to_filter()?;
    let limit = match (args.limit, args.group) {
        (Some(n), _) => n as usize,
        (None, true) => usize::MAX,
        (None, false) => DEFAULT_LIST_LIMIT,
    };
    // One more than shown tells whether the list was cut.
    let mut letters = dead_letters
        .list(&filter, limit.saturating_add(1))
        .await
        .map_err(|e| failed("list the dead letters", e))?;
    let cut = letters.len() > limit;
    letters.truncate(limit);
    if args.group {
        let groups = group(&letters);
        if args.json {
            print_json(&serde_json::json!({ "groups": groups }))?;
        } else if groups.is_empty() {
            Console::plain(nothing(&args.filter));
        } else {
            Console::plain(render::groups_table(&groups).trim_end());
            Console::plain(format!(
                "{} of failure, {}",
                render::count(groups.len(), "kind"),
                render::count(letters.len(), "dead letter")
            ));
        }
    } else {
        let letters: Vec<DeadLetter> = letters.into_iter().map(DeadLetter::summary).collect();
        if args.json {
            print_json(&serde_json::json!({ "dead_letters": letters }))?;
        } else if letters.is_empty() {
            Console::plain(nothing(&args.filter));
        } else {
            Console::plain(render::letters_table(&letters).trim_end());
            Console::plain(render::count(letters.len(), "dead letter"));
        }
    }
    if cut {
        eprintln!(
            "orderflow: only the first {limit} matching dead letters were read; more match \
             (raise --limit or narrow the filter)"
        );
    }
    Ok(())
}

async fn show(dead_letters: &DeadLetters, args: &ShowArgs) -> anyhow::Result<()> {
    let letter = dead_letters
        .show(args.seq)
        .await
        .map_err(|e| failed("read the dead letter", e))?
        .ok_or_else(|| {
            anyhow!(
                "no dead letter {}: it was replayed or purged, or never existed \
                 (`orderflow dlq list` shows the sequences)",
                args.seq
            )
        })?;
    if args.json {
        print_json(&letter)
    } else {
        Console::plain(render::letter_details(&letter).trim_end());
        Ok(())
    }
}

async fn replay(dead_letters: &DeadLetters, args: &ReplayArgs) -> anyhow::Result<()> {
    let filter = args.filter.to_filter()?;
    if args.dry_run && !args.json {
        let letters = dead_letters
            .list(&filter, usize::MAX)
            .await
            .map_err(|e| failed("list the dead letters", e))?;
        print_dry_run(&letters, "replayed");
        return Ok(());
    }
    if !args.dry_run && !args.json {
        eprintln!("orderflow: replaying at most {} a second", args.rate);
    }
    let outcome = dead_letters
        .replay(&filter, args.dry_run, args.rate)
        .await
        .map_err(|e| failed("replay", e))?;
    if args.json {
        print_json(&outcome)?;
    } else {
        Console::plain(render::outcome_summary(&outcome, "replayed").trim_end());
    }
    if !outcome.errors.is_empty() {
        bail!(
            "{} of {} dead letters could not be replayed",
            outcome.errors.len(),
            outcome.matched
        );
    }
    Ok(())
}

async fn purge(dead_letters: &DeadLetters, args: &PurgeArgs) -> anyhow::Result<()> {
    let filter = args.filter.to_filter()?;
    if args.dry_run && !args.json {
        let letters = dead_letters
            .list(&filter, usize::MAX)
            .await
            .map_err(|e| failed("list the dead letters", e))?;
        print_dry_run(&letters, "deleted");
        return Ok(());
    }
    if !args.dry_run && !args.yes {
        let would = dead_letters
            .purge(&filter, true)
            .await
            .map_err(|e| failed("list the dead letters", e))?;
        if would.matched == 0 {
            Console::plain(nothing(&args.filter));
            return Ok(());
        }
        bail!(
            "purge deletes dead letters for good and {} matched (sequences {}): add --yes to \
             delete them (--dry-run lists them)",
            render::count(would.matched, "dead letter"),
            render::seq_ranges(&would.seqs)
        );
    }
    let outcome = dead_letters
        .purge(&filter, args.dry_run)
        .await
        .map_err(|e| failed("purge", e))?;
    if args.json {
        print_json(&outcome)?;
    } else {
        Console::plain(render::outcome_summary(&outcome, "purged").trim_end());
    }
    if !outcome.errors.is_empty() {
        bail!(
            "{} of {} dead letters could not be purged",
            outcome.errors.len(),
            outcome.matched
        );
    }
    Ok(())
}

/// The table of what a dry run matched and a line saying nothing changed.
fn print_dry_run(letters: &[DeadLetter], would_be: &str) {
    if !letters.is_empty() {
        Console::plain(render::letters_table(letters).trim_end());
    }
    Console::plain(format!(
        "dry run: {} would be {would_be}; nothing changed",
        render::count(letters.len(), "dead letter")
    ));
}

/// What an empty result says.
fn nothing(filter: &FilterArgs) -> &'static str {
    if filter.is_empty() {
        "no dead letters"
    } else {
        "no dead letters match"
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("cannot render JSON")?;
    Console::plain(text);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Result<DlqArgs, clap::Error> {
        let argv = ["orderflow", "dlq"].iter().chain(args);
        let Command::Dlq(args) = Cli::try_parse_from(argv)?.command else {
            panic!("not parsed as dlq")
        };
        Ok(args)
    }

    #[test]
    fn defaults() {
        let args = parse(&["list"]).unwrap();
        assert_eq!(args.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(args.connect_timeout, Duration::from_secs(5));
        let DlqCommand::List(list) = args.command else {
            panic!("not list")
        };
        assert!(list.filter.is_empty() && !list.group && !list.json);
        assert_eq!(list.limit, None);
        let DlqCommand::Replay(replay) = parse(&["replay", "--all"]).unwrap().command else {
            panic!("not replay")
        };
        assert_eq!(replay.rate, 50);
    }

    #[test]
    fn filters_become_the_messaging_filter() {
        let args = parse(&[
            "replay",
            "--consumer",
            "inventory-orders",
            "--reason",
            "retries-exhausted",
            "--seq",
            "3",
            "--seq",
            "5,7",
            "--since",
            "2026-01-31T10:00:00+01:00",
            "--nats-url",
            "nats://elsewhere:4222",
        ])
        .unwrap();
        assert_eq!(
            args.nats_url, "nats://elsewhere:4222",
            "global flag after the subcommand"
        );
        let DlqCommand::Replay(replay) = args.command else {
            panic!("not replay")
        };
        let filter = replay.filter.to_filter().unwrap();
        assert_eq!(filter.consumer.as_deref(), Some("inventory-orders"));
        assert_eq!(filter.reason.as_deref(), Some("retries-exhausted"));
        assert_eq!(filter.seqs, Some(vec![3, 5, 7]));
        assert_eq!(filter.since.as_deref(), Some("2026-01-31T09:00:00Z"));
        assert_eq!(filter.until, None);
    }

    #[test]
    fn bad_values_are_refused_by_the_parser() {
        for args in [
            &["list", "--since", "2026"][..],
            &["list", "--reason", "bored"],
            &["list", "--limit", "0"],
            &["replay", "--all", "--rate", "0"],
            &["replay", "--all", "--consumer", "x"],
            &["purge", "--all", "--seq", "1"],
            &["list", "--connect-timeout", "soon"],
            &["show"],
        ] {
            assert!(parse(args).is_err(), "{args:?} was accepted");
        }
    }

    #[test]
    fn replay_and_purge_need_a_filter_or_all() {
        let empty = FilterArgs::default();
        let error = check_scope("replay", &empty, false)
            .unwrap_err()
            .to_string();
        assert!(error.contains("--all"), "{error}");
        assert!(check_scope("purge", &empty, true).is_ok());
        let narrowed = FilterArgs {
            error: Some("timeout".into()),
            ..FilterArgs::default()
        };
        assert!(check_scope("purge", &narrowed, false).is_ok());
    }

    #[test]
    fn an_empty_time_range_is_refused() {
        let filter = FilterArgs {
            since: Some("2026-02-01T00:00:00Z".into()),
            until: Some("2026-01-01T00:00:00Z".into()),
            ..FilterArgs::default()
        };
        let error = filter.to_filter().unwrap_err().to_string();
        assert!(error.contains("nothing can match"), "{error}");
    }
}
