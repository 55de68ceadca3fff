//! The wire format: request and reply frames, TCP chunks, UDP datagram frames (see the crate
//! docs for the flow). Plain functions over `AsyncRead`/`AsyncWrite`, no libp2p types: this is
//! what the fuzzer and the property tests exercise.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{Deserialize, Serialize};

/// The protocol id.
pub const PROTOCOL: &str = "/warren/forward/1.0.0";
/// The only request version this implementation speaks.
pub const VERSION: u8 = 1;
/// Largest request or reply frame body.
pub const MAX_FRAME: usize = 1024;
/// Longest service name.
pub const MAX_SERVICE_NAME: usize = 64;
/// Longest reply detail (an OS error text, say).
pub const MAX_DETAIL: usize = 256;
/// Largest UDP payload carried (the largest UDP datagram).
pub const MAX_DATAGRAM: usize = 65_535;
/// Largest TCP data chunk a receiver accepts.
pub const MAX_CHUNK: usize = 1024 * 1024;
/// The chunk length that marks a clean end of data in one direction (a half-close).
pub const END_OF_DATA: u32 = 0;
/// In a resumable session only: the header of an acknowledgement, followed by 8 bytes (big
/// endian) counting every data byte of the session received so far.
pub const ACK: u32 = u32::MAX;
/// In a resumable session only: the sender's side of the connection failed or was reset; the
/// receiver resets its side too, and nobody resumes.
pub const RESET: u32 = u32::MAX - 1;
/// Bytes of an acknowledgement's count.
pub const ACK_COUNT: usize = 8;
/// Bytes of a session id: random, chosen by the opener, known only to the two peers.
pub const SESSION_ID: usize = 16;
/// A resumable session's id.
pub type SessionId = [u8; SESSION_ID];

/// What a chunk header announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// This many bytes of data follow.
    Data(usize),
    /// The sender half-closed its side: nothing follows.
    End,
    /// (Resumable sessions) an acknowledgement: its count follows.
    Ack,
    /// (Resumable sessions) the sender's connection was reset.
    Reset,
}

/// Bytes of a chunk header.
pub const CHUNK_HEADER: usize = 4;

impl Chunk {
    /// The header announcing this chunk. Data chunks are 1 to [`MAX_CHUNK`] bytes long; a
    /// sender with more cuts it into several.
    pub fn encode(self) -> [u8; CHUNK_HEADER] {
        match self {
            Chunk::End => END_OF_DATA.to_be_bytes(),
            Chunk::Ack => ACK.to_be_bytes(),
            Chunk::Reset => RESET.to_be_bytes(),
            Chunk::Data(n) => {
                assert!((1..=MAX_CHUNK).contains(&n), "a data chunk is 1 to {MAX_CHUNK} bytes, not {n}");
                (n as u32).to_be_bytes()
            }
        }
    }

    /// Decodes a chunk header, refusing lengths over [`MAX_CHUNK`].
    pub fn decode(header: [u8; CHUNK_HEADER]) -> Result<Chunk, FrameError> {
        match u32::from_be_bytes(header) {
            END_OF_DATA => Ok(Chunk::End),
            n if n as usize <= MAX_CHUNK => Ok(Chunk::Data(n as usize)),
            n => Err(FrameError::Invalid(format!("chunk length {n} over {MAX_CHUNK}"))),
        }
    }

    /// Decodes a chunk header of a resumable session, where acknowledgements and resets come
    /// between the chunks too.
    pub fn decode_in_session(header: [u8; CHUNK_HEADER]) -> Result<Chunk, FrameError> {
        match u32::from_be_bytes(header) {
            ACK => Ok(Chunk::Ack),
            RESET => Ok(Chunk::Reset),
            _ => Chunk::decode(header),
        }
    }
}

/// What the opener wants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub version: u8,
    pub service: String,
    pub transport: Transport,
    /// A TCP forward that may outlive its stream: the session's id (absent: the stream is the
    /// connection, as with openers before sessions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionId>,
    /// Resuming `session` on this stream: the bytes the opener has received in it so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Udp,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub status: Status,
    pub detail: Option<String>,
    /// The answerer took the request's session: the bytes it has received in it so far (0 for
    /// a new one). Absent: the answerer does not resume, and the stream is the connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Bytes flow from now on.
    Accepted,
    /// No service of that name (or not for that transport).
    UnknownService,
    /// The service exists but this peer is not on its allow-list. (warren answers such a peer
    /// `UnknownService`, so that it learns nothing; the status stays for other implementations.)
    NotAllowed,
    /// The exposing node could not connect to the service; the detail is the OS error text.
    UpstreamUnreachable,
    /// The service (or the node) is at its connection cap.
    OverCapacity,
    /// The request could not be read: bad frame, version or service name.
    BadRequest,
    /// A resume named no session the answerer holds (it ended, timed out or the node
    /// restarted): the opener resets its connection.
    NoSession,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Accepted => "accepted",
            Status::UnknownService => "unknown service",
            Status::NotAllowed => "not allowed",
            Status::UpstreamUnreachable => "upstream unreachable",
            Status::OverCapacity => "over capacity",
            Status::BadRequest => "bad request",
            Status::NoSession => "no such session",
        })
    }
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended before a whole frame arrived.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    /// The length prefix exceeds [`MAX_FRAME`] (or is zero).
    #[error("frame length {0} out of bounds (1..={MAX_FRAME})")]
    Length(usize),
    /// The body is not the CBOR of the expected message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The request decodes but is not acceptable (version, service name).
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Checks a service name against the rules in the crate docs.
pub fn validate_service_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_SERVICE_NAME {
        return Err(format!("service name must be 1 to {MAX_SERVICE_NAME} bytes"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err("service name may only contain A-Z a-z 0-9 . _ -".to_string());
    }
    Ok(())
}

impl Request {
    pub fn new(service: impl Into<String>, transport: Transport) -> Self {
        Self { version: VERSION, service: service.into(), transport, session: None, resume: None }
    }

    /// A request for a resumable TCP session: a new one (`resume` None) or the resumption of
    /// one on a new stream, with the bytes received in it so far.
    pub fn session(service: impl Into<String>, session: SessionId, resume: Option<u64>) -> Self {
        Self { session: Some(session), resume, ..Self::new(service, Transport::Tcp) }
    }

    /// Decodes and validates a request frame body. This is the one place where a remote peer's
    /// bytes meet our parser; it is fuzzed (`fuzz/`) and property-tested.
    pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
        if body.is_empty() || body.len() > MAX_FRAME {
            return Err(FrameError::Length(body.len()));
        }
        let request: Request = cbor4ii::serde::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
        if request.version != VERSION {
            return Err(FrameError::Invalid(format!("unsupported version {}", request.version)));
        }
        validate_service_name(&request.service).map_err(FrameError::Invalid)?;
        if request.transport == Transport::Udp && request.session.is_some() {
            return Err(FrameError::Invalid("sessions are for TCP forwards".into()));
        }
        if request.resume.is_some() && request.session.is_none() {
            return Err(FrameError::Invalid("a resume names its session".into()));
        }
        Ok(request)
    }

    pub fn encode(&self) -> Vec<u8> {
        cbor4ii::serde::to_vec(Vec::new(), self).expect("requests encode")
    }
}

impl Reply {
    pub fn new(status: Status, detail: Option<String>) -> Self {
        let detail = detail.map(|mut d| {
            if d.len() > MAX_DETAIL {
                let mut end = MAX_DETAIL;
                while !d.is_char_boundary(end) {
                    end -= 1;
                }
                d.truncate(end);
            }
            d
        });
        Self { status, detail, received: None }
    }

    pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
        if body.is_empty() || body.len() > MAX_FRAME {
            return Err(FrameError::Length(body.len()));
        }
        let reply: Reply = cbor4ii::serde::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
        if reply.detail.as_ref().is_some_and(|d| d.len() > MAX_DETAIL) {
            return Err(FrameError::Invalid("reply detail too long".into()));
        }
        Ok(reply)
    }

    pub fn encode(&self) -> Vec<u8> {
        cbor4ii::serde::to_vec(Vec::new(), self).expect("replies encode")
    }
}

/// Reads one length-prefixed frame body of at most `max` bytes.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await?;
    let len = usize::from(u16::from_be_bytes(len));
    if len == 0 || len > max {
        return Err(FrameError::Length(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(body)
}

/// Writes one length-prefixed frame (the caller flushes).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(body.len()).map_err(|_| std::io::Error::other("frame too long"))?;
    let mut out = Vec::with_capacity(2 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    w.write_all(&out).await
}

pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<Request, FrameError> {
    Request::decode(&read_frame(r, MAX_FRAME).await?)
}

pub async fn write_request<W: AsyncWrite + Unpin>(w: &mut W, request: &Request) -> std::io::Result<()> {
    write_frame(w, &request.encode()).await?;
    w.flush().await
}

pub async fn read_reply<R: AsyncRead + Unpin>(r: &mut R) -> Result<Reply, FrameError> {
    Reply::decode(&read_frame(r, MAX_FRAME).await?)
}

pub async fn write_reply<W: AsyncWrite + Unpin>(w: &mut W, reply: &Reply) -> std::io::Result<()> {
    write_frame(w, &reply.encode()).await?;
    w.flush().await
}

/// Runs `data` through every decoder of what a remote peer sends on a forward stream (request and
/// reply bodies, bare and length-prefixed, datagram frames, a chunk header) and drops the results.
/// The fuzz target drives exactly this and the corpus test replays it, so the two cannot drift
/// apart.
#[doc(hidden)]
pub fn decode_everything(data: &[u8]) {
    use futures::executor::block_on;
    let _ = Request::decode(data);
    let _ = Reply::decode(data);
    let _ = block_on(read_request(&mut &data[..]));
    let _ = block_on(read_reply(&mut &data[..]));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut rest = data;
    while let Ok(Some(_)) = block_on(read_datagram(&mut rest, &mut buf)) {}
    if let Some(header) = data.get(..CHUNK_HEADER) {
        let _ = Chunk::decode(header.try_into().expect("CHUNK_HEADER bytes"));
        let _ = Chunk::decode_in_session(header.try_into().expect("CHUNK_HEADER bytes"));
    }
}

/// Reads one datagram frame into `buf`, returning its length; `Ok(None)` at a clean end.
pub async fn read_datagram<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = usize::from(u16::from_be_bytes(len));
    if len > buf.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "datagram larger than the buffer"));
    }
    r.read_exact(&mut buf[..len]).await?;
    Ok(Some(len))
}

/// Writes one datagram frame (the caller flushes). Same framing as [`write_frame`]; a datagram
/// may be empty.
pub async fn write_datagram<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> std::io::Result<()> {
    write_frame(w, payload).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use proptest::prelude::*;

    #[test]
    fn chunk_headers_are_bounded_and_round_trip() {
        assert_eq!(Chunk::decode(0u32.to_be_bytes()).unwrap(), Chunk::End);
        assert_eq!(Chunk::decode(5u32.to_be_bytes()).unwrap(), Chunk::Data(5));
        assert_eq!(Chunk::decode((MAX_CHUNK as u32).to_be_bytes()).unwrap(), Chunk::Data(MAX_CHUNK));
        assert!(Chunk::decode((MAX_CHUNK as u32 + 1).to_be_bytes()).is_err());
        assert!(Chunk::decode(u32::MAX.to_be_bytes()).is_err());
        for chunk in [Chunk::End, Chunk::Data(1), Chunk::Data(4096), Chunk::Data(MAX_CHUNK)] {
            assert_eq!(Chunk::decode(chunk.encode()).unwrap(), chunk);
        }
    }

    #[test]
    #[should_panic(expected = "a data chunk is 1 to")]
    fn an_empty_data_chunk_is_never_sent_since_it_would_read_as_the_end() {
        let _ = Chunk::Data(0).encode();
    }

    #[test]
    fn a_request_survives_the_wire() {
        let mut wire = Vec::new();
        let request = Request::new("web", Transport::Tcp);
        block_on(write_request(&mut wire, &request)).unwrap();
        assert_eq!(block_on(read_request(&mut wire.as_slice())).unwrap(), request);
    }

    #[test]
    fn an_over_long_frame_is_refused_before_its_body_is_read() {
        let wire = [0xff, 0xff, 1, 2, 3];
        assert!(matches!(block_on(read_request(&mut &wire[..])), Err(FrameError::Length(65535))));
    }

    #[test]
    fn a_request_naming_a_host_port_is_refused() {
        let request = Request::new("127.0.0.1:22", Transport::Tcp);
        assert!(matches!(Request::decode(&request.encode()), Err(FrameError::Invalid(_))));
    }

    #[test]
    fn an_unknown_version_is_refused() {
        let request = Request { version: 2, ..Request::new("web", Transport::Tcp) };
        assert!(matches!(Request::decode(&request.encode()), Err(FrameError::Invalid(_))));
    }

    #[test]
    fn datagram_boundaries_survive_the_stream() {
        let mut wire = Vec::new();
        for payload in [&b""[..], b"a", &[7u8; 1400], &[9u8; MAX_DATAGRAM]] {
            block_on(write_datagram(&mut wire, payload)).unwrap();
        }
        let mut r = wire.as_slice();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut lens = Vec::new();
        while let Some(n) = block_on(read_datagram(&mut r, &mut buf)).unwrap() {
            lens.push(n);
        }
        assert_eq!(lens, vec![0, 1, 1400, MAX_DATAGRAM]);
    }

    /// Every file in tests/corpus (the fuzzer's minimised corpus, its seeds, and any crash it
    /// found) goes through every decoder the fuzz target drives, without panicking; the seeds
    /// decode to what they were written from, so the corpus is known to reach the CBOR parser.
    #[test]
    fn the_fuzz_corpus_replays_without_panics() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            decode_everything(&bytes);
            match path.file_name().unwrap().to_str().unwrap() {
                "seed_request_tcp" => assert_eq!(Request::decode(&bytes).unwrap(), Request::new("echo", Transport::Tcp)),
                "seed_request_udp_framed" => {
                    assert_eq!(block_on(read_request(&mut bytes.as_slice())).unwrap(), Request::new("dns", Transport::Udp))
                }
                _ => {}
            }
            n += 1;
        }
        assert!(n > 0, "the corpus is empty");
    }

    #[test]
    fn sessions_leave_the_wire_as_it_was_for_peers_without_them() {
        // A request without a session is byte for byte what openers sent before sessions, and
        // a reply without `received` (an older answerer's) reads as "does not resume".
        #[derive(Serialize)]
        struct Before {
            version: u8,
            service: String,
            transport: Transport,
        }
        let before = Before { version: VERSION, service: "web".into(), transport: Transport::Tcp };
        assert_eq!(Request::new("web", Transport::Tcp).encode(), cbor4ii::serde::to_vec(Vec::new(), &before).unwrap());
        #[derive(Serialize)]
        struct OldReply {
            status: Status,
            detail: Option<String>,
        }
        let old = cbor4ii::serde::to_vec(Vec::new(), &OldReply { status: Status::Accepted, detail: None }).unwrap();
        assert_eq!(Reply::decode(&old).unwrap().received, None);

        let resume = Request::session("web", [7; SESSION_ID], Some(42));
        assert_eq!(Request::decode(&resume.encode()).unwrap(), resume);
        let orphan = Request { resume: Some(1), ..Request::new("web", Transport::Tcp) };
        assert!(matches!(Request::decode(&orphan.encode()), Err(FrameError::Invalid(_))));
        let udp = Request { session: Some([1; SESSION_ID]), ..Request::new("dns", Transport::Udp) };
        assert!(matches!(Request::decode(&udp.encode()), Err(FrameError::Invalid(_))));

        // Acknowledgements and resets exist only inside a session.
        for chunk in [Chunk::Ack, Chunk::Reset] {
            assert!(Chunk::decode(chunk.encode()).is_err());
            assert_eq!(Chunk::decode_in_session(chunk.encode()).unwrap(), chunk);
        }
        assert_eq!(Chunk::decode_in_session(Chunk::Data(5).encode()).unwrap(), Chunk::Data(5));
    }

    proptest! {
        #[test]
        fn requests_round_trip(service in "[A-Za-z0-9._-]{1,64}", udp in any::<bool>()) {
            let request = Request::new(service, if udp { Transport::Udp } else { Transport::Tcp });
            prop_assert_eq!(Request::decode(&request.encode()).unwrap(), request);
        }

        #[test]
        fn replies_round_trip(detail in proptest::option::of(".{0,300}"), s in 0usize..6) {
            let status = [Status::Accepted, Status::UnknownService, Status::NotAllowed,
                Status::UpstreamUnreachable, Status::OverCapacity, Status::BadRequest, Status::NoSession][s % 7];
            let reply = Reply { received: (s > 3).then_some(s as u64 * 1_000_000_007), ..Reply::new(status, detail) };
            prop_assert_eq!(Reply::decode(&reply.encode()).unwrap(), reply);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..1100)) {
            let _ = Request::decode(&bytes);
            let _ = block_on(read_request(&mut bytes.as_slice()));
        }
    }
}
