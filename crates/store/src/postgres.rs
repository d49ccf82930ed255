//! PostgreSQL connections (tokio-postgres), each owned by one thread of the [`Db`](crate::Db).
//!
//! The thread runs a single-threaded tokio runtime of its own and drives its connection only
//! while a statement is in flight (as the synchronous `postgres` client does): a unit of work
//! runs on that thread from start to end, with no hand-off per statement. Statements a unit of
//! work issues together go in one pipelined round trip ([`PgSession::execute_each`]), and the
//! `BEGIN` of a transaction rides along with its first statement. A connection found broken is
//! replaced before the next unit of work.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use futures::future::{try_join, try_join_all};
use tokio_postgres::{Client, Statement};

use crate::{Row, StoreError, Value, redact};

/// Prepared statements kept per connection before the cache is emptied.
const STATEMENT_CACHE: usize = 256;

pub(crate) struct PgSession {
    runtime: tokio::runtime::Runtime,
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    url: String,
    connect_timeout: Duration,
    client: Option<Client>,
    statements: HashMap<String, Statement>,
    /// Statements whose answer nobody waits for (`BEGIN`), sent with the next statement.
    deferred: Option<&'static str>,
}

/// Parses a `postgres://` URL, naming it (password redacted) when it does not parse.
pub(crate) fn parse_url(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    url.parse().map_err(|e| StoreError::Connect {
        url: redact(url),
        source: e,
    })
}

impl PgSession {
    /// A session that connects on first use.
    pub(crate) fn new(
        url: &str,
        connect_timeout: Duration,
        tls: tokio_postgres_rustls::MakeRustlsConnect,
    ) -> Result<Self, StoreError> {
        let mut config = parse_url(url)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Decode(format!("cannot build a runtime: {e}")))?;
        config.connect_timeout(connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name("orderflow");
        }
        Ok(Self {
            runtime,
            config,
            tls,
            url: redact(url),
            connect_timeout,
            client: None,
            statements: HashMap::new(),
            deferred: None,
        })
    }

    /// The TLS connector this session connects with.
    pub(crate) fn tls(&self) -> tokio_postgres_rustls::MakeRustlsConnect {
        self.tls.clone()
    }

    /// Connects when there is no connection or it broke.
    pub(crate) fn ensure_connected(&mut self) -> Result<(), StoreError> {
        if self.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        self.client = None;
        self.statements.clear();
        self.deferred = None;
        let connect = self.config.connect(self.tls.clone());
        let timeout = self.connect_timeout;
        let (client, connection) = self
            .runtime
            .block_on(async { tokio::time::timeout(timeout, connect).await })
            .map_err(|_| StoreError::ConnectTimeout(self.url.clone()))?
            .map_err(|source| StoreError::Connect {
                url: self.url.clone(),
                source,
            })?;
        // Runs whenever this thread drives the runtime, i.e. while a statement is in flight.
        self.runtime.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "PostgreSQL connection closed");
            }
        });
        self.client = Some(client);
        Ok(())
    }

    fn client(&self) -> Result<&Client, StoreError> {
        self.client.as_ref().ok_or(StoreError::Closed)
    }

    /// The prepared statement for `sql`, checked to take `params` parameters.
    fn statement(&mut self, sql: &str, params: usize) -> Result<Statement, StoreError> {
        let statement = self.prepared(sql)?;
        if statement.params().len() == params {
            Ok(statement)
        } else {
            Err(StoreError::Parameters {
                expected: statement.params().len(),
                got: params,
                sql: sql.to_owned(),
            })
        }
    }

    fn prepared(&mut self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        if self.statements.len() >= STATEMENT_CACHE {
            self.statements.clear();
        }
        let deferred = self.deferred.take();
        let client = self.client()?;
        let statement = block_with(&self.runtime, client, deferred, client.prepare(sql))?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    fn statement_for_rows<'p, P: AsRef<[Value<'p>]>>(
        &mut self,
        sql: &str,
        rows: &[P],
    ) -> Result<Statement, StoreError> {
        let statement = self.prepared(sql)?;
        for row in rows {
            if row.as_ref().len() != statement.params().len() {
                return Err(StoreError::Parameters {
                    expected: statement.params().len(),
                    got: row.as_ref().len(),
                    sql: sql.to_owned(),
                });
            }
        }
        Ok(statement)
    }

    pub(crate) fn begin(&mut self) -> Result<(), StoreError> {
        self.ensure_connected()?;
        self.deferred = Some("BEGIN");
        Ok(())
    }

    pub(crate) fn commit(&mut self) -> Result<(), StoreError> {
        if self.deferred.take().is_some() {
            return Ok(()); // nothing was sent: nothing to commit
        }
        let client = self.client()?;
        self.runtime.block_on(client.batch_execute("COMMIT"))?;
        Ok(())
    }

    pub(crate) fn rollback(&mut self) {
        if self.deferred.take().is_some() {
            return;
        }
        if let Some(client) = &self.client
            && !client.is_closed()
            && let Err(e) = self.runtime.block_on(client.batch_execute("ROLLBACK"))
        {
            tracing::debug!(error = %e, "ROLLBACK failed; the connection will be replaced");
        }
    }

    pub(crate) fn execute(&mut self, sql: &str, params: &[Value<'_>]) -> Result<u64, StoreError> {
        let statement = self.statement(sql, params.len())?;
        let deferred = self.deferred.take();
        let client = self.client()?;
        let fut = client.execute_raw(&statement, params.iter());
        block_with(&self.runtime, client, deferred, fut)
    }

    pub(crate) fn execute_each<'p, P: AsRef<[Value<'p>]>>(
        &mut self,
        sql: &str,
        rows: &[P],
    ) -> Result<Vec<u64>, StoreError> {
        let statement = self.statement_for_rows(sql, rows)?;
        let deferred = self.deferred.take();
        let client = self.client()?;
        let all = try_join_all(
            rows.iter()
                .map(|p| client.execute_raw(&statement, p.as_ref().iter())),
        );
        block_with(&self.runtime, client, deferred, all)
    }

    pub(crate) fn query<T>(
        &mut self,
        sql: &str,
        params: &[Value<'_>],
        map: &mut dyn FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let statement = self.statement(sql, params.len())?;
        let deferred = self.deferred.take();
        let client = self.client()?;
        let rows = block_with(
            &self.runtime,
            client,
            deferred,
            query_rows(client, &statement, params),
        )?;
        rows.iter().map(|r| map(&Row::postgres(r))).collect()
    }

    pub(crate) fn query_each<'p, T, P: AsRef<[Value<'p>]>>(
        &mut self,
        sql: &str,
        rows: &[P],
        map: &mut dyn FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<Vec<T>>, StoreError> {
        let statement = self.statement_for_rows(sql, rows)?;
        let deferred = self.deferred.take();
        let client = self.client()?;
        let all = try_join_all(
            rows.iter()
                .map(|p| query_rows(client, &statement, p.as_ref())),
        );
        let results = block_with(&self.runtime, client, deferred, all)?;
        results
            .iter()
            .map(|rows| rows.iter().map(|r| map(&Row::postgres(r))).collect())
            .collect()
    }

    pub(crate) fn execute_script(&mut self, sql: &str) -> Result<(), StoreError> {
        let deferred = self.deferred.take();
        let client = self.client()?;
        block_with(&self.runtime, client, deferred, client.batch_execute(sql))
    }
}

/// Runs `fut` on the session's runtime, sending the `deferred` statement (if any) just before
/// it in the same round trip: `try_join` polls it first, so it is written first.
fn block_with<T>(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    deferred: Option<&'static str>,
    fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StoreError> {
    let result = match deferred {
        Some(sql) => runtime
            .block_on(try_join(client.batch_execute(sql), fut))
            .map(|((), out)| out),
        None => runtime.block_on(fut),
    };
    Ok(result?)
}

/// A query's rows.
async fn query_rows(
    client: &Client,
    statement: &Statement,
    params: &[Value<'_>],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    use futures::TryStreamExt;
    client
        .query_raw(statement, params.iter())
        .await?
        .try_collect()
        .await
}
