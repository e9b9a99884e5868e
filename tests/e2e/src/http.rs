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
    /// Every header, names in lower case.
    pub headers: Vec<(String, String)>,
}

impl Response {
    /// The value of header `name` ("" if absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map_or("", |(_, value)| value.as_str())
    }
}

/// Sends `method path` to `host:port` with `body` (JSON when given) and reads the response.
pub async fn request(addr: &str, method: &str, path: &str, body: Option<&str>) -> Response {
    let content_type = if body.is_some_and(|b| !b.is_empty()) {
        "application/json"
    } else {
        ""
    };
    send(addr, method, path, &[], content_type, body.unwrap_or("")).await
}

/// As [`request`] with an `Authorization: Bearer` token.
pub async fn authed(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Response {
    let authorization = format!("Bearer {token}");
    let content_type = if body.is_some_and(|b| !b.is_empty()) {
        "application/json"
    } else {
        ""
    };
    send(
        addr,
        method,
        path,
        &[("Authorization", &authorization)],
        content_type,
        body.unwrap_or(""),
    )
    .await
}

/// A form-encoded `POST` (OAuth's token and revoke endpoints), with extra `headers`.
pub async fn post_form(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    form: &[(&str, &str)],
) -> Response {
    let body = serde_urlencoded::to_string(form).expect("form fields are strings");
    send(
        addr,
        "POST",
        path,
        headers,
        "application/x-www-form-urlencoded",
        &body,
    )
    .await
}

/// Sends one request with `headers` and a body of `content_type` ("" and "" for none).
pub async fn send(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    content_type: &str,
    body: &str,
) -> Response {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut extra = String::new();
    if !content_type.is_empty() {
        extra.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    for (name, value) in headers {
        extra.push_str(&format!("{name}: {value}\r\n"));
    }
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n{body}",
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
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            Some((key.trim().to_ascii_lowercase(), value.trim().to_owned()))
        })
        .collect();
    Response {
        status,
        content_type: header("Content-Type"),
        json: serde_json::from_str(&body).unwrap_or(Value::Null),
        body,
        headers,
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
