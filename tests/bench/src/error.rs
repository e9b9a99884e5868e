//! The bench's typed errors. Every failure on a network path becomes one of these and is
//! counted in the report (never unwrapped), so a broken run says what broke instead of panicking.

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A process of the stack could not be started or did not become ready.
    #[error("cannot start {name}: {reason}")]
    Start {
        /// The process.
        name: String,
        /// Why.
        reason: String,
    },
    /// A socket or file operation failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The WebSocket connection failed.
    #[error("WebSocket: {0}")]
    Ws(String),
    /// Nothing arrived in time.
    #[error("timed out after {ms} ms waiting for {what}")]
    Timeout {
        /// How long was waited.
        ms: u128,
        /// What for.
        what: &'static str,
    },
    /// The gateway closed the connection.
    #[error("the gateway closed the connection")]
    Closed,
    /// A message was not the JSON expected.
    #[error("unexpected message: {0}")]
    Protocol(String),
    /// The gateway answered a request with a JSON-RPC error.
    #[error("JSON-RPC error reply: {0}")]
    Rpc(String),
    /// A direct MI request failed.
    #[error("MI: {0}")]
    Mi(String),
    /// The command line asks for something impossible.
    #[error("{0}")]
    Usage(String),
}

impl From<tokio_tungstenite::tungstenite::Error> for BenchError {
    fn from(err: tokio_tungstenite::tungstenite::Error) -> Self {
        BenchError::Ws(err.to_string())
    }
}

/// Result with [`BenchError`].
pub type Result<T> = std::result::Result<T, BenchError>;
