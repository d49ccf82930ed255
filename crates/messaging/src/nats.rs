//! Connecting to NATS.
//!
//! async-nats reconnects by itself (unlimited attempts, growing delays capped at a few
//! seconds); we never wrap it in a loop of our own. With `retry_on_initial_connect` the client
//! also keeps trying when the server is not up yet at start, so a service can start before
//! NATS: [`Nats::wait_connected`] waits for the first connection within a bound and says what
//! it is waiting for, and [`Nats::is_connected`] tells readiness the truth meanwhile.

use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use tokio::time::Instant;

use crate::MessagingError;

/// How to reach NATS.
#[derive(Clone)]
pub struct NatsConfig {
    /// One server URL or several separated by commas (`nats://a:4222,nats://b:4222`). May
    /// hold credentials: print it through `orderflow_store::redact`.
    pub url: String,
    /// The client name shown in the server's connection list (the service name).
    pub client_name: String,
    /// How long the JetStream API and publish acks may take before an error.
    pub request_timeout: Duration,
    /// The nkey seed to authenticate with (`SU…`), when the server asks for one.
    pub nkey_seed: Option<String>,
    /// TLS to the server, when set: every connection must be TLS.
    pub tls: Option<NatsTls>,
}

/// TLS settings of the NATS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsTls {
    /// PEM file of the certificate authorities that sign the servers' certificates.
    pub ca: std::path::PathBuf,
    /// PEM files of this client's certificate and key, for servers that verify clients.
    pub client: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &orderflow_store::redact(&self.url))
            .field("client_name", &self.client_name)
            .field("request_timeout", &self.request_timeout)
            .field("nkey_seed", &self.nkey_seed.as_ref().map(|_| "***"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl NatsConfig {
    /// A configuration with default timeouts.
    pub fn new(url: impl Into<String>, client_name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            client_name: client_name.into(),
            request_timeout: Duration::from_secs(5),
            nkey_seed: None,
            tls: None,
        }
    }

    /// Authenticates with the nkey seed in `path` (its first line).
    pub fn nkey_seed_file(mut self, path: &std::path::Path) -> Result<Self, MessagingError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            MessagingError::Connect(format!("reading the nkey seed {}: {e}", path.display()))
        })?;
        let seed = text.lines().map(str::trim).find(|l| !l.is_empty());
        match seed {
            Some(seed) if seed.starts_with("SU") => {
                self.nkey_seed = Some(seed.to_owned());
                Ok(self)
            }
            _ => Err(MessagingError::Connect(format!(
                "{} holds no user nkey seed (a line starting with SU)",
                path.display()
            ))),
        }
    }
}

/// A NATS connection with its JetStream context. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Nats {
    client: async_nats::Client,
    js: jetstream::Context,
    url: String,
}

impl Nats {
    /// Creates the client. Returns at once; the connection is established in the background
    /// and re-established whenever it is lost.
    pub async fn connect(config: &NatsConfig) -> Result<Self, MessagingError> {
        let (servers, credentials) = split_credentials(&config.url)?;
        let mut options = async_nats::ConnectOptions::new();
        // Credentials from the URL go to the client's options, and the servers are given
        // without them: the client logs its server addresses (at debug level) as they are.
        match credentials {
            Some(UrlCredentials::UserPassword(user, password)) => {
                options = options.user_and_password(user, password);
            }
            Some(UrlCredentials::Token(token)) => options = options.token(token),
            None => {}
        }
        if let Some(seed) = &config.nkey_seed {
            options = options.nkey(seed.clone());
        }
        if let Some(tls) = &config.tls {
            for file in std::iter::once(&tls.ca).chain(tls.client.iter().flat_map(|(c, k)| [c, k]))
            {
                if !file.is_file() {
                    return Err(MessagingError::Connect(format!(
                        "TLS file {} does not exist",
                        file.display()
                    )));
                }
            }
            options = options
                .require_tls(true)
                .add_root_certificates(tls.ca.clone());
            if let Some((cert, key)) = &tls.client {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
        }
        let name = config.client_name.clone();
        let client = options
            .name(&config.client_name)
            // Replies come under the client's own prefix: with per-service permissions, only
            // this client may subscribe there.
            .custom_inbox_prefix(crate::access::inbox_prefix(&config.client_name))
            .retry_on_initial_connect()
            .request_timeout(Some(config.request_timeout))
            .event_callback(move |event| {
                let name = name.clone();
                async move { log_event(&name, &event) }
            })
            .connect(servers)
            .await
            .map_err(|e| MessagingError::Connect(e.to_string()))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .build(client.clone());
        Ok(Self {
            client,
            js,
            url: orderflow_store::redact(&config.url),
        })
    }

    /// Waits until the client is connected, logging every few seconds what it waits for.
    /// Fails with a message naming the URL when `timeout` passes first.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), MessagingError> {
        let deadline = Instant::now() + timeout;
        let mut next_log = Instant::now() + Duration::from_secs(2);
        while !self.is_connected() {
            let now = Instant::now();
            if now >= deadline {
                return Err(MessagingError::Connect(format!(
                    "no connection to NATS at {} within {timeout:?}; is nats-server running?",
                    self.url
                )));
            }
            if now >= next_log {
                tracing::info!(url = %self.url, "waiting for NATS");
                next_log = now + Duration::from_secs(5);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Whether the client is connected right now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// The configured URL(s), credentials redacted: safe for logs, errors and probe bodies.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Flushes what the client buffered and closes the connection after in-flight work.
    pub async fn drain(&self) {
        if let Err(e) = self.client.drain().await {
            tracing::warn!(error = %e, "draining the NATS connection failed");
        }
    }

    pub(crate) fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}

fn log_event(client: &str, event: &async_nats::Event) {
    match event {
        async_nats::Event::Connected => tracing::info!(client, "connected to NATS"),
        async_nats::Event::Disconnected => {
            tracing::warn!(client, "disconnected from NATS; reconnecting");
        }
        async_nats::Event::LameDuckMode => {
            tracing::warn!(
                client,
                "NATS server entered lame duck mode; will move to another"
            );
        }
        async_nats::Event::SlowConsumer(sid) => {
            tracing::warn!(client, sid, "slow consumer: the client dropped messages");
        }
        other => tracing::info!(client, event = %other, "NATS client event"),
    }
}

/// Credentials given in a NATS URL's user info.
#[derive(Debug, Clone, PartialEq, Eq)]
enum UrlCredentials {
    /// `nats://user:password@host`.
    UserPassword(String, String),
    /// `nats://token@host`.
    Token(String),
}

/// The server addresses of a comma-separated URL list without their user info, and the
/// credentials that user info held (every URL that has some must have the same).
fn split_credentials(
    urls: &str,
) -> Result<(Vec<async_nats::ServerAddr>, Option<UrlCredentials>), MessagingError> {
    let invalid = |e: &dyn std::fmt::Display| {
        MessagingError::Connect(format!(
            "invalid NATS URL {:?}: {e}",
            orderflow_store::redact(urls)
        ))
    };
    let mut servers = Vec::new();
    let mut credentials = None;
    for part in urls.split(',') {
        let addr: async_nats::ServerAddr = part.trim().parse().map_err(|e| invalid(&e))?;
        let found = match (addr.username(), addr.password()) {
            (Some(user), Some(password)) => Some(UrlCredentials::UserPassword(
                user.to_owned(),
                password.to_owned(),
            )),
            (Some(token), None) => Some(UrlCredentials::Token(token.to_owned())),
            _ => None,
        };
        let mut url = addr.into_inner();
        if found.is_some() {
            if credentials.is_some() && credentials != found {
                return Err(invalid(&"the URLs carry different credentials"));
            }
            credentials = found;
            // Cannot fail: the URL has a host (it had user info).
            let _ = url.set_password(None);
            let _ = url.set_username("");
        }
        servers.push(async_nats::ServerAddr::from_url(url).map_err(|e| invalid(&e))?);
    }
    Ok((servers, credentials))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_urls() {
        let (servers, credentials) =
            split_credentials("nats://svc:pw@a:4222, nats://svc:pw@b:4223,nats://c:4224").unwrap();
        let urls: Vec<&str> = servers
            .iter()
            .map(async_nats::ServerAddr::as_url_str)
            .collect();
        assert_eq!(urls, ["nats://a:4222", "nats://b:4223", "nats://c:4224"]);
        assert_eq!(
            credentials,
            Some(UrlCredentials::UserPassword("svc".into(), "pw".into()))
        );
        let (_, token) = split_credentials("nats://t0ken@a:4222").unwrap();
        assert_eq!(token, Some(UrlCredentials::Token("t0ken".into())));
        let mixed = split_credentials("nats://a:x@a:4222,nats://b:y@b:4222").unwrap_err();
        assert!(
            mixed.to_string().contains("different credentials"),
            "{mixed}"
        );
        assert!(!mixed.to_string().contains(":x@"), "{mixed}");
        assert!(split_credentials("http://a:4222").is_err());
    }
}
