//! The CLI side of the control API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::api;
use crate::error::UserError;

/// How long the CLI waits for the daemon to accept: a running node answers in milliseconds.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);
/// Largest answer the CLI reads.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

pub struct Client {
    socket: PathBuf,
    data_dir: PathBuf,
}

impl Client {
    pub fn new(data_dir: &Path) -> Self {
        Self { socket: data_dir.join(api::SOCKET_NAME), data_dir: data_dir.to_path_buf() }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str, timeout: Duration) -> Result<T, UserError> {
        self.call(Method::GET, path, Vec::new(), timeout).await
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str, timeout: Duration) -> Result<T, UserError> {
        self.call(Method::POST, path, Vec::new(), timeout).await
    }

    pub async fn post_json<B: serde::Serialize, T: DeserializeOwned>(&self, path: &str, body: &B, timeout: Duration) -> Result<T, UserError> {
        let body = serde_json::to_vec(body).expect("request bodies serialise");
        self.call(Method::POST, path, body, timeout).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str, timeout: Duration) -> Result<T, UserError> {
        self.call(Method::DELETE, path, Vec::new(), timeout).await
    }

    async fn call<T: DeserializeOwned>(&self, method: Method, path: &str, body: Vec<u8>, timeout: Duration) -> Result<T, UserError> {
        let not_running = || {
            UserError::not_running(format!(
                "no warren node is running for data dir {}: start one with `warren up`{}",
                self.data_dir.display(),
                if std::env::var_os("WARREN_DATA_DIR").is_some() { "" } else { " (or pass the --data-dir it uses)" }
            ))
        };
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::UnixStream::connect(&self.socket)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(_)) | Err(_) => return Err(not_running()),
        };
        crate::private_files::check_socket_peer(&stream, &self.socket)?;
        let exchange = async {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            let request = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "warren")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("static request parts are valid");
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?
                .to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
        };
        let (status, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| UserError::operation(format!("the node did not answer {path} within {timeout:?}")))?
            .map_err(|e| UserError::operation(format!("control API error: {e}")))?;
        if !status.is_success() {
            let error = serde_json::from_slice::<api::ApiError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("HTTP {status}"));
            let kind = if status.is_client_error() { UserError::bad_input(error) } else { UserError::operation(error) };
            return Err(kind);
        }
        serde_json::from_slice(&body).map_err(|e| UserError::operation(format!("unexpected answer from the node: {e}")))
    }
}
