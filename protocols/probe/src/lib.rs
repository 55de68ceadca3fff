//! `/warren/probe/1.0.0`: asks one connection, not the peer, whether it still carries anything.
//!
//! A direct QUIC connection whose path died (the NAT gave our flow a new port, a router
//! restarted) stays open until QUIC's idle timeout, 10 s, says so: in the meantime every stream
//! on it is silent, and a forwarded connection stalls. A forwarded connection that hears
//! nothing while it waits for its peer asks the node to probe the peer's direct connections;
//! one that does not echo within the time given is closed, and the streams it carried resume
//! elsewhere (the relay, a new punch) seconds sooner. A connection that answers is left alone:
//! the silence was the peer's application, not the path.
//!
//! The libp2p ping protocol is not used for this because its handler keeps one inbound stream
//! per connection: a probe would displace the peer's own periodic ping stream and count as its
//! failure.
//!
//! # Message flow
//! ```text
//! prober (opens the stream)          answerer
//!   | -- nonce (8 bytes) ------------->|
//!   | <------------- nonce (8 bytes) --|  the same 8 bytes
//!   | (closes)                         | (closes)
//! ```
//! One probe per stream. The answerer waits at most [`ANSWER_WITHIN`] for the nonce; anything
//! else (a short read, more bytes) ends the stream. The prober's time limit is its own: the
//! caller wraps [`probe`] in a timeout suited to the path.

use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol id libp2p negotiates.
pub const PROTOCOL: &str = "/warren/probe/1.0.0";
/// The nonce's length: enough that a stale echo is never taken for a fresh one.
pub const NONCE: usize = 8;
/// How long an answerer waits for the nonce: a prober sends it at once, so a stream that stays
/// silent this long is a peer holding streams open, not a probe.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The stream failed or ended before the echo.
    #[error("probe stream failed: {0}")]
    Io(#[from] std::io::Error),
    /// The peer echoed something else.
    #[error("the peer echoed another nonce")]
    WrongEcho,
}

/// Sends `nonce` and waits for its echo. Without a timeout of its own: a dead path never
/// answers, so the caller bounds it.
pub async fn probe<S>(stream: &mut S, nonce: [u8; NONCE]) -> Result<(), ProbeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&nonce).await?;
    stream.flush().await?;
    let mut echo = [0u8; NONCE];
    stream.read_exact(&mut echo).await?;
    let _ = stream.close().await;
    if echo == nonce { Ok(()) } else { Err(ProbeError::WrongEcho) }
}

/// Answers one probe: reads the nonce and sends it back. The caller bounds it by
/// [`ANSWER_WITHIN`] (the runtime's timer is the caller's).
pub async fn answer<S>(stream: &mut S) -> Result<(), std::io::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut nonce = [0u8; NONCE];
    stream.read_exact(&mut nonce).await?;
    stream.write_all(&nonce).await?;
    stream.close().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    /// An in-memory stream: reads come from `input`, writes go to `output`.
    struct Pipe {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl AsyncRead for Pipe {
        fn poll_read(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut [u8]) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.input).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Pipe {
        fn poll_write(mut self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
            self.output.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn pipe(input: &[u8]) -> Pipe {
        Pipe { input: Cursor::new(input.to_vec()), output: Vec::new() }
    }

    #[test]
    fn the_answerer_echoes_the_nonce_and_the_prober_accepts_its_own() {
        let nonce = *b"12345678";
        let mut answerer = pipe(&nonce);
        futures::executor::block_on(answer(&mut answerer)).unwrap();
        assert_eq!(answerer.output, nonce);
        let mut prober = pipe(&answerer.output);
        futures::executor::block_on(probe(&mut prober, nonce)).unwrap();
        assert_eq!(prober.output, nonce);
    }

    #[test]
    fn a_wrong_or_short_echo_fails_the_probe() {
        let mut wrong = pipe(b"87654321");
        assert!(matches!(futures::executor::block_on(probe(&mut wrong, *b"12345678")), Err(ProbeError::WrongEcho)));
        let mut short = pipe(b"1234");
        assert!(matches!(futures::executor::block_on(probe(&mut short, *b"12345678")), Err(ProbeError::Io(_))));
        let mut silent = pipe(b"123");
        assert!(futures::executor::block_on(answer(&mut silent)).is_err());
        assert!(silent.output.is_empty(), "nothing is echoed before a whole nonce");
    }
}
