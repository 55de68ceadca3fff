//! The answering side of a forward stream (the node that exposed the service): read the
//! request, then accept or refuse it. Nothing is written before the answer, and nothing after a
//! refusal.

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::wire::{self, FrameError, Reply, Request, Status};

/// Why no request could be had from a stream.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The stream ended or failed before a whole request: one opened ahead of need and
    /// dropped, a peer that went away, a connection that closed under it. Nothing is said in
    /// return (and it is no bad request: nothing malformed arrived).
    #[error("the stream closed before its request")]
    ClosedEarly,
    /// The request is malformed (length, encoding, version, service name): answer
    /// [`Status::BadRequest`].
    #[error(transparent)]
    Bad(FrameError),
}

/// Reads and checks the request that opens a stream.
pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<Request, RequestError> {
    match wire::read_request(r).await {
        Ok(request) => Ok(request),
        Err(FrameError::Io(_)) => Err(RequestError::ClosedEarly),
        Err(e) => Err(RequestError::Bad(e)),
    }
}

/// Accepts the request: data flows both ways from now on.
pub async fn accept<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    wire::write_reply(w, &Reply::new(Status::Accepted, None)).await
}

/// Refuses the request (or a stream whose request was never read) and closes the write side.
/// Whatever the opener sent ahead is left unread.
pub async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, status: Status, detail: Option<String>) -> std::io::Result<()> {
    debug_assert_ne!(status, Status::Accepted);
    wire::write_reply(w, &Reply::new(status, detail)).await?;
    w.close().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that fails (a reset, a connection closing under it) after `before` bytes.
    struct Failing(futures::io::Cursor<Vec<u8>>, std::io::ErrorKind);

    impl AsyncRead for Failing {
        fn poll_read(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut [u8]) -> std::task::Poll<std::io::Result<usize>> {
            let kind = self.1;
            match std::pin::Pin::new(&mut self.0).poll_read(cx, buf) {
                std::task::Poll::Ready(Ok(0)) => std::task::Poll::Ready(Err(kind.into())),
                other => other,
            }
        }
    }

    #[test]
    fn a_stream_that_fails_before_its_request_is_not_a_bad_request() {
        for kind in [std::io::ErrorKind::UnexpectedEof, std::io::ErrorKind::ConnectionReset, std::io::ErrorKind::BrokenPipe] {
            let mut nothing = Failing(futures::io::Cursor::new(Vec::new()), kind);
            assert!(matches!(futures::executor::block_on(read_request(&mut nothing)), Err(RequestError::ClosedEarly)), "{kind:?}");
            // Half a length prefix, then the failure.
            let mut half = Failing(futures::io::Cursor::new(vec![0]), kind);
            assert!(matches!(futures::executor::block_on(read_request(&mut half)), Err(RequestError::ClosedEarly)), "{kind:?}");
        }
        // Garbage is still garbage.
        let mut garbage = Failing(futures::io::Cursor::new(vec![0, 3, 0xff, 0xff, 0xff]), std::io::ErrorKind::UnexpectedEof);
        assert!(matches!(futures::executor::block_on(read_request(&mut garbage)), Err(RequestError::Bad(_))));
    }
}
