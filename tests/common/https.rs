//! An axum app served over real TLS on 127.0.0.1:0, with a throw-away test
//! CA (the fake upstream's) for the client's `ca_file`: for fakes of HTTPS
//! APIs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::fake_upstream::generate_pki;

pub struct HttpsServer {
    pub addr: SocketAddr,
    ca_file: PathBuf,
    _ca_dir: TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl HttpsServer {
    /// Serves `app` until dropped.
    pub async fn start(app: Router) -> HttpsServer {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let pki = generate_pki(true);
        let ca_dir = TempDir::new().unwrap();
        let ca_file = ca_dir.path().join("ca.pem");
        std::fs::write(&ca_file, &pki.ca_pem).unwrap();
        let tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![pki.leaf_cert], pki.leaf_key)
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        HttpsServer {
            addr,
            ca_file,
            _ca_dir: ca_dir,
            task,
        }
    }

    /// `https://127.0.0.1:PORT`, the bare base.
    pub fn base(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The test CA that signed the server's certificate (PEM).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether the header section of `mime` has a To, Cc or Bcc field: the
/// fields both APIs send to.
pub fn names_a_recipient(mime: &[u8]) -> bool {
    let text = String::from_utf8_lossy(mime);
    let header = text.split("\r\n\r\n").next().unwrap_or_default();
    header.split("\r\n").any(|line| {
        let name = line
            .split(':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        ["to", "cc", "bcc"].contains(&name.as_str())
    })
}
