//! A minimal HTTP/1.0 GET over a tokio `TcpStream`, enough to read nats-server's monitoring
//! endpoints (`/healthz`, `/jsz`) without pulling an HTTP client into the test harness.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request may take at most this long (connect, send, read to EOF).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A response: status code and body.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) body: String,
}

/// `GET http://127.0.0.1:<port><path>` with HTTP/1.0, so the server closes the connection
/// after the body and no chunked decoding is needed.
pub(crate) async fn get(port: u16, path: &str) -> io::Result<Response> {
    let request = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let head = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        stream.write_all(head.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse(&raw)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("GET 127.0.0.1:{port}{path} took longer than {REQUEST_TIMEOUT:?}"),
            )
        })?
}

fn parse(raw: &[u8]) -> io::Result<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // Status line: "HTTP/1.1 200 OK".
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not an HTTP response: {head:?}"),
            )
        })?;
    Ok(Response {
        status,
        body: body.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_body() {
        let response =
            parse(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"status\":\"ok\"}")
                .unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body, "{\"status\":\"ok\"}");
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse(b"hello").is_err());
    }
}
