//! [`Db`]: a service's database as a few threads, each owning one connection, that run whole
//! units of work sent to them.
//!
//! A unit of work is a closure over a [`Tx`]: [`Db::write`] runs it in a transaction on the
//! writer, [`Db::read`] runs it on a reader. The closure runs from start to end on the thread
//! that owns the connection, so a transaction of any number of statements costs one hand-off to
//! that thread and one back, not two per statement.
//!
//! | backend | threads |
//! |---|---|
//! | SQLite | one writer (SQLite has one writer at a time anyway: writers queue in-process rather than spin on `SQLITE_BUSY`) and `max_connections` readers |
//! | PostgreSQL | `max_connections` connections, each taking reads and writes |
//!
//! **Group commit (SQLite).** When units of work queue up for the writer, it runs them in one
//! transaction, each inside a savepoint of its own: a unit that fails is rolled back to its
//! savepoint and alone gets its error, the others commit together with one `COMMIT` (one fsync
//! with `synchronous=FULL`). Each unit's result is delivered only after that commit. PostgreSQL
//! connections run one unit per transaction: the server shares WAL flushes between concurrent
//! commits by itself, and grouping units there could lock rows in orders no unit chose.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::queue::Queue;

use crate::postgres::PgSession;
use crate::sqlite::{SqliteSession, SqliteTarget};
use crate::tx::Session;
use crate::{StoreError, Tx};

/// Which database engine a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file (the local default).
    Sqlite,
    /// A PostgreSQL server (production).
    Postgres,
}

impl Backend {
    /// Picks the backend from a database URL.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            Err(StoreError::UnsupportedUrl(redact(url)))
        }
    }

    /// `"sqlite"` or `"postgres"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// Whether a commit waits for the disk (SQLite's `synchronous` in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every commit is on disk before it returns (`synchronous=FULL`, one fsync per commit —
    /// per group of units of work). An acknowledged message's effect survives a power loss.
    #[default]
    Full,
    /// Commits reach the disk at the next checkpoint (`synchronous=NORMAL`): the database
    /// stays consistent after a power loss, but the last commits may be lost — and the
    /// messages acknowledged after them with them.
    Normal,
}

impl Durability {
    /// Parses `full` or `normal`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(Self::Full),
            "normal" => Ok(Self::Normal),
            other => Err(format!("{other:?} is not full or normal")),
        }
    }

    /// `"full"` or `"normal"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Normal => "normal",
        }
    }

    pub(crate) const fn sqlite_pragma(self) -> &'static str {
        match self {
            Self::Full => "FULL",
            Self::Normal => "NORMAL",
        }
    }
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// PostgreSQL: connections. SQLite: reader connections (there is always exactly one writer).
    pub max_connections: u32,
    /// PostgreSQL: how long connecting may take before the unit of work fails (transiently).
    pub connect_timeout: Duration,
    /// SQLite: whether a commit waits for the disk. (PostgreSQL: the server's
    /// `synchronous_commit` decides.)
    pub durability: Durability,
    /// PostgreSQL: the certificate authority the server's certificate must chain to (and
    /// name the URL's host). Without it a TLS connection (`sslmode=prefer` or `require` in
    /// the URL) is encrypted but the server is not authenticated; see [`crate::tls`].
    pub tls_ca: Option<std::path::PathBuf>,
}

impl Default for DbOptions {
    fn default() -> Self {
        Self {
            max_connections: 4,
            connect_timeout: Duration::from_secs(5),
            durability: Durability::Full,
            tls_ca: None,
        }
    }
}

/// The most units of work the SQLite writer puts in one transaction.
const MAX_GROUP: usize = 64;

/// A unit of work for the writer, with the channel its result goes back on.
trait WriteUnit: Send {
    /// Runs the unit in the open transaction; `true` when it succeeded (keep its writes).
    fn run(&mut self, tx: &mut Tx<'_>) -> bool;
    /// Delivers the unit's result once the transaction's fate (`commit`) is known.
    fn deliver(self: Box<Self>, commit: Result<(), StoreError>);
}

struct Unit<F, T, E> {
    work: Option<F>,
    out: Option<Result<T, E>>,
    reply: oneshot::Sender<Result<T, E>>,
}

impl<F, T, E> WriteUnit for Unit<F, T, E>
where
    F: FnOnce(&mut Tx<'_>) -> Result<T, E> + Send,
    T: Send,
    E: From<StoreError> + Send,
{
    fn run(&mut self, tx: &mut Tx<'_>) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        let out = work(tx);
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn deliver(self: Box<Self>, commit: Result<(), StoreError>) {
        let result = match (self.out, commit) {
            (Some(Ok(value)), Ok(())) => Ok(value),
            (Some(Err(e)), _) => Err(e),
            (_, Err(e)) => Err(E::from(e)),
            (None, Ok(())) => Err(E::from(StoreError::Panicked(
                "the unit of work did not finish".into(),
            ))),
        };
        let _ = self.reply.send(result);
    }
}

type ReadUnit = Box<dyn FnOnce(Result<&mut Tx<'_>, StoreError>) + Send>;

enum Job {
    Write(Box<dyn WriteUnit>),
    Read(ReadUnit),
}

/// A set of threads taking jobs from one queue.
struct Pool {
    jobs: Arc<Queue<Job>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    fn start(
        name: &str,
        threads: usize,
        group: bool,
        open: impl Fn() -> Result<Session, StoreError> + Send + Clone + 'static,
    ) -> Result<Self, StoreError> {
        let jobs = Arc::new(Queue::new());
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads.max(1) {
            let (queue, open) = (jobs.clone(), open.clone());
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || serve(&queue, group, &open))
                .map_err(|e| {
                    StoreError::Panicked(format!("cannot start a database thread: {e}"))
                })?;
            handles.push(handle);
        }
        Ok(Self {
            jobs,
            threads: Mutex::new(handles),
        })
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        self.jobs.push(job).map_err(|_| StoreError::Closed)
    }

    /// Lets every thread finish the jobs queued before, then stop; waits for them.
    async fn close(&self) {
        let handles =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        // The threads take what is queued, then find the queue closed and stop; new work is
        // refused from now on.
        self.jobs.close();
        let joined = tokio::task::spawn_blocking(move || {
            for handle in handles {
                let _ = handle.join();
            }
        });
        let _ = joined.await;
    }
}

impl Drop for Pool {
    /// The last handle is gone: the threads finish what is queued and stop.
    fn drop(&mut self) {
        self.jobs.close();
    }
}

/// A database thread: opens its connection (again after it broke), runs the jobs it gets.
fn serve(queue: &Queue<Job>, group: bool, open: &dyn Fn() -> Result<Session, StoreError>) {
    let mut session: Option<Session> = None;
    let mut held: Option<Job> = None;
    loop {
        let job = match held.take() {
            Some(job) => job,
            None => match queue.pop() {
                Some(job) => job,
                None => return, // every Db handle is gone
            },
        };
        match job {
            Job::Read(unit) => match connected(&mut session, open) {
                Ok(s) => {
                    let mut tx = Tx::new(s);
                    if std::panic::catch_unwind(AssertUnwindSafe(|| unit(Ok(&mut tx)))).is_err() {
                        tracing::error!("a read panicked on the database thread");
                    }
                }
                Err(e) => unit(Err(e)),
            },
            Job::Write(first) => {
                let mut units = vec![first];
                if group {
                    // Whatever else is waiting joins this transaction.
                    while units.len() < MAX_GROUP {
                        match queue.try_pop() {
                            Some(Job::Write(unit)) => units.push(unit),
                            Some(other) => {
                                held = Some(other);
                                break;
                            }
                            None => break,
                        }
                    }
                }
                match connected(&mut session, open) {
                    Ok(s) => transaction(s, units),
                    Err(e) => fail_all(units, e),
                }
            }
        }
    }
}

fn connected<'s>(
    session: &'s mut Option<Session>,
    open: &dyn Fn() -> Result<Session, StoreError>,
) -> Result<&'s mut Session, StoreError> {
    if session.is_none() {
        *session = Some(open()?);
    }
    let s = session.as_mut().ok_or(StoreError::Closed)?;
    if let Session::Postgres(pg) = s {
        pg.ensure_connected()?;
    }
    Ok(s)
}

fn fail_all(units: Vec<Box<dyn WriteUnit>>, e: StoreError) {
    // Shared keeps the error's kind: a transient failure is retried by the callers.
    let e = Arc::new(e);
    for unit in units {
        unit.deliver(Err(StoreError::Shared(e.clone())));
    }
}

/// Runs `units` in one transaction (each in a savepoint when there are several), commits, and
/// delivers every result.
fn transaction(session: &mut Session, mut units: Vec<Box<dyn WriteUnit>>) {
    if let Err(e) = begin(session) {
        fail_all(units, e);
        return;
    }
    let grouped = units.len() > 1;
    let mut kept = 0;
    for unit in &mut units {
        if grouped && let Err(e) = savepoint(session, "SAVEPOINT unit") {
            tracing::warn!(error = %e, "cannot open a savepoint");
            break;
        }
        let ok = {
            let mut tx = Tx::new(session);
            std::panic::catch_unwind(AssertUnwindSafe(|| unit.run(&mut tx))).unwrap_or_else(|_| {
                tracing::error!("a unit of work panicked on the database thread; rolled back");
                false
            })
        };
        if grouped {
            let end = if ok {
                "RELEASE unit"
            } else {
                "ROLLBACK TO unit; RELEASE unit"
            };
            if let Err(e) = savepoint(session, end) {
                tracing::warn!(error = %e, "cannot close a savepoint");
            }
        }
        if ok {
            kept += 1;
        }
        if !in_transaction(session) {
            // SQLite rolled the whole transaction back by itself (disk full, I/O error): what
            // the units before did is gone with it.
            break;
        }
    }
    let outcome = if !in_transaction(session) {
        Err(StoreError::Decode(
            "the transaction was rolled back by the database after an error".into(),
        ))
    } else if kept == 0 {
        rollback(session);
        Ok(())
    } else {
        commit(session).inspect_err(|_| rollback(session))
    };
    match outcome {
        Ok(()) => {
            for unit in units {
                unit.deliver(Ok(()));
            }
        }
        Err(e) if !grouped => {
            if let Some(unit) = units.pop() {
                unit.deliver(Err(e));
            }
        }
        Err(e) => fail_all(units, e),
    }
}

fn begin(session: &mut Session) -> Result<(), StoreError> {
    match session {
        Session::Sqlite(s) => s.begin(),
        Session::Postgres(s) => s.begin(),
    }
}

fn commit(session: &mut Session) -> Result<(), StoreError> {
    match session {
        Session::Sqlite(s) => s.commit(),
        Session::Postgres(s) => s.commit(),
    }
}

fn rollback(session: &mut Session) {
    match session {
        Session::Sqlite(s) => s.rollback(),
        Session::Postgres(s) => s.rollback(),
    }
}

fn in_transaction(session: &Session) -> bool {
    match session {
        Session::Sqlite(s) => s.in_transaction(),
        Session::Postgres(_) => true,
    }
}

fn savepoint(session: &mut Session, sql: &str) -> Result<(), StoreError> {
    match session {
        Session::Sqlite(s) => s.execute_script(sql),
        Session::Postgres(s) => s.execute_script(sql),
    }
}

struct Inner {
    backend: Backend,
    writer: Pool,
    /// SQLite's readers; `None` on PostgreSQL, where the writer's connections read too.
    readers: Option<Pool>,
}

/// A service's database. Cheap to clone; the threads stop when the last clone is dropped or
/// at [`Db::close`].
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.inner.backend)
            .finish_non_exhaustive()
    }
}

impl Db {
    /// Opens `sqlite://path?mode=rwc` (creating the file and its directory) or connects to
    /// `postgres://…`, and checks that the database answers.
    pub async fn connect(url: &str, options: &DbOptions) -> Result<Self, StoreError> {
        let backend = Backend::from_url(url)?;
        let db = match backend {
            Backend::Sqlite => {
                // The writer opens the file first (creating it, switching it to WAL), so the
                // readers find it.
                let target = SqliteTarget::parse(url);
                target.create_parent_dir();
                drop(SqliteSession::open(&target, options.durability, false)?);
                Self::start(url, options, None)?
            }
            Backend::Postgres => {
                // Connected here so a bad URL fails at start, with its reason; the first
                // thread takes this connection, the others connect on first use.
                let tls = crate::tls::connector(options.tls_ca.as_deref())?;
                let mut probe = PgSession::new(url, options.connect_timeout, tls)?;
                let probe =
                    tokio::task::spawn_blocking(move || probe.ensure_connected().map(|()| probe))
                        .await
                        .map_err(|e| StoreError::Panicked(e.to_string()))??;
                Self::start(url, options, Some(probe))?
            }
        };
        db.ping().await?;
        Ok(db)
    }

    /// Like [`Db::connect`], but connects on first use: for tools that must start while the
    /// database may be down. Only the URL is checked now.
    pub fn connect_lazy(url: &str, options: &DbOptions) -> Result<Self, StoreError> {
        Self::start(url, options, None)
    }

    fn start(url: &str, options: &DbOptions, probe: Option<PgSession>) -> Result<Self, StoreError> {
        let backend = Backend::from_url(url)?;
        let threads = options.max_connections.max(1) as usize;
        let inner = match backend {
            Backend::Sqlite => {
                let target = SqliteTarget::parse(url);
                let durability = options.durability;
                let t = target.clone();
                let writer = Pool::start("db-writer", 1, true, move || {
                    SqliteSession::open(&t, durability, false).map(Session::Sqlite)
                })?;
                let readers = Pool::start("db-reader", threads, false, move || {
                    SqliteSession::open(&target, durability, true).map(Session::Sqlite)
                })?;
                Inner {
                    backend,
                    writer,
                    readers: Some(readers),
                }
            }
            Backend::Postgres => {
                // Checked before any thread starts.
                crate::postgres::parse_url(url)?;
                // The probe's connector when there is one: the authority is read once.
                let tls = match &probe {
                    Some(probe) => probe.tls(),
                    None => crate::tls::connector(options.tls_ca.as_deref())?,
                };
                let (url, timeout) = (url.to_owned(), options.connect_timeout);
                let first = Arc::new(Mutex::new(probe));
                let writer = Pool::start("db-pg", threads, false, move || {
                    let taken = first.lock().unwrap_or_else(PoisonError::into_inner).take();
                    match taken {
                        Some(s) => Ok(Session::Postgres(Box::new(s))),
                        None => PgSession::new(&url, timeout, tls.clone())
                            .map(|s| Session::Postgres(Box::new(s))),
                    }
                })?;
                Inner {
                    backend,
                    writer,
                    readers: None,
                }
            }
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The engine behind this database.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// Runs `work` in a write transaction on the thread that owns the writer connection, and
    /// commits it when `work` returns `Ok` (rolls it back otherwise). The result arrives once
    /// the commit is durable as [`Durability`] says; a failed commit turns an `Ok` into the
    /// commit's error.
    pub async fn write<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let unit = Unit {
            work: Some(work),
            out: None,
            reply,
        };
        self.inner.writer.send(Job::Write(Box::new(unit)))?;
        answer.await.map_err(|_| E::from(StoreError::Closed))?
    }

    /// Runs `work` on a reader connection, outside any transaction (each statement sees the
    /// latest commit).
    pub async fn read<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let unit: ReadUnit = Box::new(move |tx| {
            let result = match tx {
                Ok(tx) => work(tx),
                Err(e) => Err(E::from(e)),
            };
            let _ = reply.send(result);
        });
        let pool = self.inner.readers.as_ref().unwrap_or(&self.inner.writer);
        pool.send(Job::Read(unit))?;
        answer.await.map_err(|_| E::from(StoreError::Closed))?
    }

    /// Checks that the database answers (used by readiness probes).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.read(|tx| tx.query_one("SELECT 1", &[], |_| Ok(())))
            .await
    }

    /// Finishes the units of work already sent, then closes every connection.
    pub async fn close(&self) {
        self.inner.writer.close().await;
        if let Some(readers) = &self.inner.readers {
            readers.close().await;
        }
    }
}

/// URLs with their credentials replaced, for error messages, logs and probe bodies.
///
/// Takes one URL or several separated by commas (a NATS server list). A password in the
/// user info becomes `***` (the user name stays); user info without a password is a
/// credential itself on NATS (`nats://token@host`) and is replaced whole, except on
/// PostgreSQL URLs where it is only the user name; a `password=` query parameter is replaced.
pub fn redact(urls: &str) -> String {
    urls.split(',')
        .map(redact_one)
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = url.find("://") {
        let authority_end = url[scheme_end + 3..]
            .find(['/', '?'])
            .map_or(url.len(), |i| scheme_end + 3 + i);
        if let Some(at) = url[..authority_end]
            .rfind('@')
            .filter(|at| *at > scheme_end)
        {
            let userinfo = &url[scheme_end + 3..at];
            let scheme = url[..scheme_end].trim().to_ascii_lowercase();
            let kept = match userinfo.find(':') {
                Some(colon) => format!("{}:***", &userinfo[..colon]),
                None if scheme.starts_with("postgres") => userinfo.to_owned(),
                None => "***".to_owned(),
            };
            out = format!("{}{kept}{}", &url[..scheme_end + 3], &url[at..]);
        }
    }
    if let Some(query) = out.find('?') {
        let (head, params) = out.split_at(query + 1);
        let params: Vec<String> = params
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => p.to_owned(),
            })
            .collect();
        out = format!("{head}{}", params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("mysql://x"), "mysql://x");
        assert_eq!(
            redact("postgres://h/db?user=u&password=secret&sslmode=require"),
            "postgres://h/db?user=u&password=***&sslmode=require"
        );
        assert_eq!(
            redact("nats://s3cr3t@a:4222, nats://svc:pw@b:4222,nats://c:4222"),
            "nats://***@a:4222, nats://svc:***@b:4222,nats://c:4222"
        );
        assert_eq!(
            redact("sqlite://x@y.db?mode=rwc"),
            "sqlite://***@y.db?mode=rwc"
        );
    }

    #[test]
    fn picks_backend_from_url() {
        assert_eq!(Backend::from_url("sqlite://a.db").unwrap(), Backend::Sqlite);
        assert_eq!(
            Backend::from_url("postgresql://h/db").unwrap(),
            Backend::Postgres
        );
        assert!(Backend::from_url("mysql://h/db").is_err());
    }

    #[test]
    fn durability_parses() {
        assert_eq!(Durability::parse("full"), Ok(Durability::Full));
        assert_eq!(Durability::parse("normal"), Ok(Durability::Normal));
        assert!(Durability::parse("fast").is_err());
    }
}
