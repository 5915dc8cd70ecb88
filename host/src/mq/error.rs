//! Errors from the RocketMQ client, with their real causes.

use std::error::Error;

/// A failure talking to RocketMQ. The message carries the whole cause chain:
/// the client's own error type prints `<redacted>` in `Display`, so the
/// chain is read through `source()`.
#[derive(Debug, thiserror::Error)]
#[error("{action}: {cause}")]
pub struct MqError {
    pub action: String,
    pub cause: String,
}

impl MqError {
    pub fn new(action: impl Into<String>, err: &(dyn Error + 'static)) -> Self {
        MqError {
            action: action.into(),
            cause: error_chain(err),
        }
    }
}

/// Every readable message in an error's `source()` chain, joined by `: `.
pub fn error_chain(err: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(err) = next {
        let text = err.to_string();
        if !text.is_empty() && !text.contains("<redacted>") && !parts.iter().any(|p| p == &text) {
            parts.push(text);
        }
        next = err.source();
    }
    if parts.is_empty() {
        "unknown error (the client gave no readable cause)".to_string()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("<redacted>")]
    struct Redacted(#[source] std::io::Error);

    #[test]
    fn the_chain_skips_redacted_layers_and_keeps_the_cause() {
        let err = Redacted(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused (127.0.0.1:9876)",
        ));
        assert_eq!(error_chain(&err), "connection refused (127.0.0.1:9876)");
        let wrapped = MqError::new("send to marketing_task_completed", &err);
        assert_eq!(
            wrapped.to_string(),
            "send to marketing_task_completed: connection refused (127.0.0.1:9876)"
        );
    }
}
