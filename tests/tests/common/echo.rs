//! Forwarding helpers shared by the forwarding and relay tests: an echo service, a checked
//! echo transfer, and the expose/forward CLI calls.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Node;

/// A loopback listener with a backlog for hundreds of simultaneous connects (the default lets a
/// burst overflow into SYN cookies, which the kernel may answer with resets under load).
pub fn listener() -> TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    socket.listen(4096).unwrap()
}

/// A TCP echo service on loopback; returns its address.
pub async fn echo_service() -> SocketAddr {
    let listener = listener();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

pub fn expose(server: &Node, name: &str, target: &str, allow: &[&str]) {
    let mut args = vec!["expose", name, target];
    for peer in allow {
        args.extend(["--allow", peer]);
    }
    let out = server.cli(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Starts a forward from a free local port; returns the bound address.
pub fn forward(client: &Node, target: &str) -> SocketAddr {
    let info = client.json(&["forward", "127.0.0.1:0", target]).expect("forward accepted");
    info["bind"].as_str().unwrap().parse().unwrap()
}

pub fn forward_info(client: &Node, bind: SocketAddr) -> Value {
    let list = client.json(&["forwards"]).unwrap();
    list.as_array().unwrap().iter().find(|f| f["bind"] == bind.to_string()).cloned().expect("the forward is listed")
}

/// Sends `n` pseudo-random bytes and reads the echo concurrently; returns both digests.
pub async fn echo_transfer(addr: SocketAddr, n: usize, seed: u8) -> ([u8; 32], [u8; 32]) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let mut hash = Sha256::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sent = 0;
        let mut x = seed as u32 + 1;
        while sent < n {
            let len = chunk.len().min(n - sent);
            for b in &mut chunk[..len] {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                *b = (x >> 16) as u8;
            }
            w.write_all(&chunk[..len]).await.unwrap();
            hash.update(&chunk[..len]);
            sent += len;
        }
        w.shutdown().await.unwrap();
        hash.finalize().into()
    });
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    loop {
        let k = r.read(&mut buf).await.unwrap();
        if k == 0 {
            break;
        }
        hash.update(&buf[..k]);
        got += k;
    }
    assert_eq!(got, n, "echoed byte count");
    (writer.await.unwrap(), hash.finalize().into())
}

/// When the connections of [`hold_then_echo`] close.
#[derive(Clone, Copy, PartialEq)]
pub enum Close {
    EachAfterItsEcho,
    /// Long-lived connections: all stay open until every one has echoed.
    AllAtTheEnd,
}

/// Opens `n` connections through the forward at `bind` and holds them all open; then each
/// echoes a line. Returns how many echoed intact within 60 s.
pub async fn hold_then_echo(bind: SocketAddr, n: usize, close: Close) -> usize {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(TcpStream::connect(bind).await.unwrap());
    }
    let echoes = held.into_iter().enumerate().map(|(i, mut tcp)| async move {
        let sent = format!("connection {i}");
        let echoed = async {
            tcp.write_all(sent.as_bytes()).await?;
            let mut back = vec![0; sent.len()];
            tcp.read_exact(&mut back).await?;
            Ok::<_, std::io::Error>(back == sent.as_bytes())
        }
        .await;
        (echoed, (close == Close::AllAtTheEnd).then_some(tcp))
    });
    let results = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(echoes)).await.expect("every echo ends within 60 s");
    results.iter().filter(|(echoed, _)| matches!(echoed, Ok(true))).count()
}
