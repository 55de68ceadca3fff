//! Errors that reach the person at the terminal: one line, the bad value named, what to do,
//! and an exit code that scripts can tell apart.

use std::process::ExitCode;

/// How a command failed, which decides its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// The operation ran and failed (peer unreachable, not found, ...). Exit code 1.
    Operation,
    /// A value the user gave is wrong (flag, config file, data dir). Exit code 2, like clap.
    BadInput,
    /// No node is running for this data dir. Exit code 3.
    NotRunning,
}

impl ExitKind {
    pub fn exit_code(self) -> ExitCode {
        match self {
            ExitKind::Operation => ExitCode::from(1),
            ExitKind::BadInput => ExitCode::from(2),
            ExitKind::NotRunning => ExitCode::from(3),
        }
    }
}

/// An error meant for the user: the message is complete as it stands.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct UserError {
    pub kind: ExitKind,
    pub message: String,
}

impl UserError {
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self { kind: ExitKind::BadInput, message: message.into() }
    }

    pub fn operation(message: impl Into<String>) -> Self {
        Self { kind: ExitKind::Operation, message: message.into() }
    }

    pub fn not_running(message: impl Into<String>) -> Self {
        Self { kind: ExitKind::NotRunning, message: message.into() }
    }
}

/// An error with its causes, `outer: inner: innermost` (libp2p errors often say little on top).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}
