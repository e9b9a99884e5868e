//! A minimal HTTP/1.1 client for the REST API: one request per connection (`Connection:
//! close`), the whole response read back.

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A response: status, `Content-Type`, body (and the body as JSON, `Null` if it is not).
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// The `Content-Type` header ("" if none).
    pub content_type: String,
    /// The body as text.
    pub body: String,
    /// The body as JSON.
    pub json: Value,
}

/// Sends `method path` to `host:port` with `body` (JSON when given) and reads the response.
pub async fn request(addr: &str, method: &str, path: &str, body: Option<&str>) -> Response {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let body = body.unwrap_or("");
    let content_type = if body.is_empty() {
        String::new()
    } else {
        "Content-Type: application/json\r\n".to_owned()
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{content_type}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let header = |name: &str| {
        head.lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_owned())
            })
            .unwrap_or_default()
    };
    let body = if header("Transfer-Encoding").eq_ignore_ascii_case("chunked") {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Response {
        status,
        content_type: header("Content-Type"),
        json: serde_json::from_str(&body).unwrap_or(Value::Null),
        body,
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || tail.len() < size {
            break;
        }
        body.push_str(&tail[..size]);
        rest = tail[size..].trim_start_matches("\r\n");
    }
    body
}
