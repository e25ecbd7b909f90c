//! A minimal HTTP/1.1 client over plain TCP: one request per connection,
//! every header as given (nothing added but `Host` and the length). It
//! sends the forge's webhooks, and lets tests send status calls with
//! exactly the headers they mean to test. No TLS, no redirects, no pool.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Only `http://host:port/path` URLs are supported.
    #[error("{0}: only http:// URLs are supported")]
    Url(String),
    /// Connecting, writing or reading failed.
    #[error("{url}: {reason}")]
    Io {
        /// The URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// No answer within the timeout.
    #[error("{0}: no answer in time")]
    Timeout(String),
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: http::HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends one request and reads the whole answer, within `timeout`.
pub async fn request(
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Answer, SendError> {
    tokio::time::timeout(timeout, request_inner(method, url, headers, body))
        .await
        .map_err(|_| SendError::Timeout(url.to_owned()))?
}

async fn request_inner(
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> Result<Answer, SendError> {
    let uri: http::Uri = url.parse().map_err(|_| SendError::Url(url.to_owned()))?;
    if uri.scheme_str() != Some("http") {
        return Err(SendError::Url(url.to_owned()));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| SendError::Url(url.to_owned()))?
        .clone();
    let io_error = |e: &dyn std::fmt::Display| SendError::Io {
        url: url.to_owned(),
        reason: e.to_string(),
    };
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let tcp = TcpStream::connect(&addr).await.map_err(|e| io_error(&e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| io_error(&e))?;
    let driver = tokio::spawn(connection);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", authority.as_str());
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| io_error(&e))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| io_error(&e))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| io_error(&e))?
        .to_bytes();
    driver.abort();
    Ok(Answer {
        status,
        headers,
        body,
    })
}
