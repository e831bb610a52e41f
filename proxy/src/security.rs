//! What protects the gRPC port: TLS (optionally mutual), API keys, and the
//! secure defaults that decide them from the address served.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::auth::AuthMode;

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

impl TlsFiles {
    /// tonic's TLS settings, read from the files now.
    pub fn server_config(&self) -> anyhow::Result<ServerTlsConfig> {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).with_context(|| format!("reading the {what} '{}'", path.display()))
        };
        let identity = Identity::from_pem(
            read(&self.cert, "TLS certificate")?,
            read(&self.key, "TLS key")?,
        );
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
        }
        Ok(config)
    }
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
