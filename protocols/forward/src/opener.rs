//! The opening side of a forward stream (the node forwarding a local port): send the request,
//! send the connection's first bytes right behind it if it likes, then read the answer.

use futures::{AsyncRead, AsyncWrite};

use crate::wire::{FrameError, Reply, Request, Status, Transport, read_reply, write_request};

/// Why the answerer did not accept a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// It answered with a refusal (`unknown service`, `over capacity`, ...), and maybe a detail.
    #[error("{}", refused_text(.status, .detail))]
    Refused { status: Status, detail: Option<String> },
    /// Its answer could not be read (the stream failed, or the frame was bad).
    #[error("the peer's answer was unreadable: {0}")]
    Unreadable(String),
}

fn refused_text(status: &Status, detail: &Option<String>) -> String {
    match detail {
        Some(detail) => format!("{status}: {detail}"),
        None => status.to_string(),
    }
}

/// Sends the request for `service` over `transport` and flushes it.
pub async fn send_request<W: AsyncWrite + Unpin>(w: &mut W, service: &str, transport: Transport) -> std::io::Result<()> {
    write_request(w, &Request::new(service, transport)).await
}

/// Reads the answer to a request: `Ok` once the service accepted. (The caller bounds the wait.)
pub async fn read_answer<R: AsyncRead + Unpin>(r: &mut R) -> Result<(), Refusal> {
    let reply: Reply = read_reply(r).await.map_err(|e: FrameError| Refusal::Unreadable(e.to_string()))?;
    match reply.status {
        Status::Accepted => Ok(()),
        status => Err(Refusal::Refused { status, detail: reply.detail }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answerer;
    use futures::executor::block_on;

    #[test]
    fn a_request_and_its_answers_cross_between_the_roles() {
        let mut wire = Vec::new();
        block_on(send_request(&mut wire, "web", Transport::Tcp)).unwrap();
        let request = block_on(answerer::read_request(&mut wire.as_slice())).unwrap();
        assert_eq!((request.service.as_str(), request.transport), ("web", Transport::Tcp));

        let mut answer = Vec::new();
        block_on(answerer::accept(&mut answer)).unwrap();
        assert_eq!(block_on(read_answer(&mut answer.as_slice())), Ok(()));

        let mut answer = Vec::new();
        block_on(answerer::refuse(&mut answer, Status::UpstreamUnreachable, Some("connection refused".into()))).unwrap();
        let refusal = block_on(read_answer(&mut answer.as_slice())).unwrap_err();
        assert_eq!(refusal.to_string(), "upstream unreachable: connection refused");
        let mut answer = Vec::new();
        block_on(answerer::refuse(&mut answer, Status::UnknownService, None)).unwrap();
        assert_eq!(block_on(read_answer(&mut answer.as_slice())).unwrap_err().to_string(), "unknown service");
        assert!(matches!(block_on(read_answer(&mut &b""[..])), Err(Refusal::Unreadable(_))));
    }
}
