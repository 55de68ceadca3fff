//! The cipher suite QUIC handshakes between warren nodes settle on. libp2p-quic builds its TLS
//! from `libp2p_tls::make_client_config` / `make_server_config`, which warren carries patched
//! (vendor/libp2p-tls): AES-128-GCM first on a CPU with AES instructions, ChaCha20-Poly1305 first
//! on one without. The handshakes here run those very configs against each other in memory,
//! and against a client that prefers ChaCha20 the way a stock rust-libp2p or js-libp2p node
//! does, which must still connect, with its own choice.

use std::sync::Arc;

use libp2p::identity::Keypair;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::aws_lc_rs::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_CHACHA20_POLY1305_SHA256};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CipherSuite, ClientConfig, ClientConnection, DigitallySignedStruct, ServerConfig, ServerConnection, SignatureScheme};

/// Runs a TLS 1.3 handshake between the two configs in memory; the suite both ended on.
fn handshake(client: ClientConfig, server: ServerConfig) -> Result<CipherSuite, String> {
    let name = ServerName::try_from("l").expect("a valid name");
    let mut c = ClientConnection::new(Arc::new(client), name).map_err(|e| e.to_string())?;
    let mut s = ServerConnection::new(Arc::new(server)).map_err(|e| e.to_string())?;
    // A TLS 1.3 handshake with client certificates is three flights; a few more rounds are slack.
    for _ in 0..8 {
        let mut wire = Vec::new();
        c.write_tls(&mut wire).map_err(|e| e.to_string())?;
        s.read_tls(&mut wire.as_slice()).map_err(|e| e.to_string())?;
        s.process_new_packets().map_err(|e| format!("server: {e}"))?;
        let mut wire = Vec::new();
        s.write_tls(&mut wire).map_err(|e| e.to_string())?;
        c.read_tls(&mut wire.as_slice()).map_err(|e| e.to_string())?;
        c.process_new_packets().map_err(|e| format!("client: {e}"))?;
        if !c.is_handshaking() && !s.is_handshaking() {
            let ours = c.negotiated_cipher_suite().ok_or("no suite on the client")?.suite();
            let theirs = s.negotiated_cipher_suite().ok_or("no suite on the server")?.suite();
            assert_eq!(ours, theirs, "both ends agree");
            return Ok(ours);
        }
    }
    Err("the handshake did not finish".into())
}

#[test]
fn two_warren_nodes_negotiate_aes_gcm_where_the_cpu_has_aes_instructions() {
    let (dialer, listener) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let client = libp2p_tls::make_client_config(&dialer, Some(listener.public().to_peer_id())).unwrap();
    let server = libp2p_tls::make_server_config(&listener).unwrap();
    let suite = handshake(client, server).expect("two warren nodes complete the handshake");
    let expected = if libp2p_tls::aes_in_hardware() { CipherSuite::TLS13_AES_128_GCM_SHA256 } else { CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 };
    eprintln!("AES in hardware: {}; negotiated {suite:?}", libp2p_tls::aes_in_hardware());
    assert_eq!(suite, expected);
}

/// Accepts the server's certificate without checking whose it is (the server's check of the
/// client's libp2p certificate is what this test needs); verifies the handshake signature with
/// the certificate's key, as libp2p does (webpki refuses the critical libp2p extension).
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(&self, _: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>, _: &[u8], _: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        let parsed = libp2p_tls::certificate::parse(cert).map_err(|e| rustls::Error::General(e.to_string()))?;
        parsed.verify_signature(dss.scheme, message, dss.signature()).map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Presents the libp2p certificate (its critical libp2p extension is what webpki-based
/// `with_client_auth_cert` would refuse to load).
#[derive(Debug)]
struct OwnCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for OwnCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

#[test]
fn a_peer_that_prefers_chacha20_still_connects_and_keeps_its_choice() {
    let (dialer, listener) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    // A client with stock libp2p-tls's order (ChaCha20 first) and a libp2p certificate.
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_128_GCM_SHA256];
    let provider = Arc::new(provider);
    let (cert, key) = libp2p_tls::certificate::generate(&dialer).unwrap();
    let signing = provider.key_provider.load_private_key(key).unwrap();
    let certified = Arc::new(rustls::sign::CertifiedKey::new(vec![cert], signing));
    let mut stock = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_cert_resolver(Arc::new(OwnCert(certified)));
    stock.alpn_protocols = vec![b"libp2p".to_vec()];
    let server = libp2p_tls::make_server_config(&listener).unwrap();
    let suite = handshake(stock, server).expect("a ChaCha20-first peer completes the handshake with a warren node");
    assert_eq!(suite, CipherSuite::TLS13_CHACHA20_POLY1305_SHA256, "the client's order decides");
}
