//! What protects the gRPC port: TLS (optionally mutual), API keys, and the
//! secure defaults that decide them from the address served.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use anyhow::Context;
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::{Stream, wrappers::ReceiverStream};

use crate::auth::AuthMode;

/// How often the certificate and key files are checked for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(1);
/// The longest a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The PEM files TLS is served with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA that client certificates must chain to; when set, a client
    /// without a valid certificate is refused (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// What identifies one state of the certificate and key files.
type Stamp = Option<[(SystemTime, u64); 2]>;

fn stamp(files: &TlsFiles) -> Stamp {
    let of = |path: &Path| {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    Some([of(&files.cert)?, of(&files.key)?])
}

fn load_key(files: &TlsFiles) -> anyhow::Result<CertifiedKey> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect())
        .with_context(|| format!("reading the TLS certificate '{}'", files.cert.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "'{}' holds no certificate",
        files.cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("reading the TLS key '{}'", files.key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .with_context(|| format!("'{}' is not a usable private key", files.key.display()))?;
    Ok(CertifiedKey::new(certs, signing))
}

/// The served certificate, replaced when its files change.
#[derive(Debug)]
struct Reloading {
    files: TlsFiles,
    current: RwLock<(Arc<CertifiedKey>, Stamp)>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .expect("certificate lock poisoned")
                .0
                .clone(),
        )
    }
}

impl Reloading {
    /// Loads the files again if they changed; a pair that does not load
    /// (say, the certificate written before its key) leaves the current one
    /// serving and is tried again on the next change.
    fn refresh(&self) {
        let now = stamp(&self.files);
        if now.is_none() || now == self.current.read().expect("certificate lock poisoned").1 {
            return;
        }
        match load_key(&self.files) {
            Ok(key) => {
                *self.current.write().expect("certificate lock poisoned") = (Arc::new(key), now);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
            }
            Err(err) => {
                tracing::warn!(
                    error = format!("{err:#}"),
                    "the changed TLS certificate or key does not load; the current one keeps serving"
                );
            }
        }
    }
}

impl TlsFiles {
    /// A TLS acceptor serving the certificate, reloaded within a second
    /// of its files changing, and requiring client certificates when
    /// `client_ca` is set.
    pub fn acceptor(&self) -> anyhow::Result<TlsAcceptor> {
        let reloading = Arc::new(Reloading {
            files: self.clone(),
            current: RwLock::new((Arc::new(load_key(self)?), stamp(self))),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca)
                    .with_context(|| format!("reading the client CA '{}'", ca.display()))?
                {
                    roots
                        .add(cert.with_context(|| format!("reading '{}'", ca.display()))?)
                        .with_context(|| format!("'{}' is not a usable CA", ca.display()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .context("the client certificate verifier")?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(reloading.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        let weak = Arc::downgrade(&reloading);
        tokio::spawn(async move {
            // Ends when the server (the only other owner) is gone.
            while let Some(reloading) = weak.upgrade() {
                reloading.refresh();
                drop(reloading);
                tokio::time::sleep(RELOAD_EVERY).await;
            }
        });
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// The TLS connections accepted on `listener`, each handshake on a task of
/// its own (bounded by a timeout), so that a slow or failing client holds
/// up no other. Ends when the stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(err)) => {
                        tracing::debug!(%peer, error = %err, "TLS handshake failed");
                    }
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// How the gRPC port is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Security {
    /// Whether calls need an API key.
    pub auth: AuthMode,
    /// TLS, when served.
    pub tls: Option<TlsFiles>,
    /// Whether gRPC reflection is served.
    pub reflection: bool,
}

impl Default for Security {
    /// Loopback defaults: no keys, no TLS, reflection on.
    fn default() -> Self {
        Security {
            auth: AuthMode::None,
            tls: None,
            reflection: true,
        }
    }
}

/// What the operator asked for on the command line.
#[derive(Debug, Clone, Default)]
pub struct Requested {
    /// `--auth`, if given.
    pub auth: Option<AuthMode>,
    /// `--tls-cert`, `--tls-key`, `--client-ca`.
    pub tls: Option<TlsFiles>,
    /// `--reflection`: serve reflection on any address.
    pub reflection: bool,
    /// `--insecure`: allow a non-loopback address without TLS or keys.
    pub insecure: bool,
}

/// Decides how `addr` is served. On loopback: no keys unless asked, and
/// reflection. Anywhere else: API keys by default, and TLS and keys are
/// required unless `--insecure`; reflection only with `--reflection`. The
/// error names the flag that fixes it.
pub fn decide(addr: SocketAddr, requested: Requested) -> Result<Security, String> {
    let loopback = addr.ip().is_loopback();
    let auth = requested.auth.unwrap_or(if loopback {
        AuthMode::None
    } else {
        AuthMode::Token
    });
    if !loopback && !requested.insecure {
        if requested.tls.is_none() {
            return Err(format!(
                "refusing to serve {addr} (not a loopback address) without TLS: give --tls-cert and --tls-key, or --insecure to serve plaintext anyway"
            ));
        }
        if auth == AuthMode::None {
            return Err(format!(
                "refusing to serve {addr} (not a loopback address) with --auth none: use --auth token and create keys with `daisy key create`, or --insecure to serve without them anyway"
            ));
        }
    }
    Ok(Security {
        auth,
        tls: requested.tls,
        reflection: loopback || requested.reflection,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls() -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: "c.pem".into(),
            key: "k.pem".into(),
            client_ca: None,
        })
    }

    #[test]
    fn loopback_is_open_and_anything_else_needs_tls_and_keys() {
        let local: SocketAddr = "127.0.0.1:50051".parse().expect("addr");
        let open: SocketAddr = "0.0.0.0:50051".parse().expect("addr");
        assert_eq!(decide(local, Requested::default()), Ok(Security::default()));

        let err = decide(open, Requested::default()).expect_err("refused");
        assert!(
            err.contains("--tls-cert") && err.contains("--insecure"),
            "{err}"
        );
        let err = decide(
            open,
            Requested {
                tls: tls(),
                auth: Some(AuthMode::None),
                ..Requested::default()
            },
        )
        .expect_err("refused");
        assert!(err.contains("--auth none"), "{err}");

        let secured = decide(
            open,
            Requested {
                tls: tls(),
                ..Requested::default()
            },
        )
        .expect("served");
        assert_eq!(secured.auth, AuthMode::Token);
        assert!(!secured.reflection);

        let insecure = decide(
            open,
            Requested {
                insecure: true,
                reflection: true,
                ..Requested::default()
            },
        )
        .expect("served");
        assert_eq!(insecure.auth, AuthMode::Token);
        assert!(insecure.tls.is_none() && insecure.reflection);
    }
}
