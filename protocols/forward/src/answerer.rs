//! The answering side of a forward stream (the node that exposed the service): read the
//! request, then accept or refuse it. Nothing is written before the answer, and nothing after a
//! refusal.

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::wire::{self, FrameError, Reply, Request, Status};

/// Why no request could be had from a stream.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The stream ended before any byte of a request: one opened ahead of need and dropped, or
    /// a peer that went away. Nothing is said in return.
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
        Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(RequestError::ClosedEarly),
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
