//! Certificates for TLS tests, made by openssl (Debian's `openssl`) in a
//! temporary directory: a CA, a server certificate for `localhost` and
//! 127.0.0.1, and a client certificate, both signed by the CA.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A throwaway PKI: `ca.pem`, `server.pem` + `server.key`, `client.pem` +
/// `client.key`.
pub struct Pki {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl (Debian's openssl package)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const EC: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

impl Pki {
    /// Makes the CA and both certificates (valid for two days).
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let mut ca = vec!["req", "-x509"];
        ca.extend(EC);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=Daisy test CA",
        ]);
        openssl(d, &ca);
        Pki { dir }
            .with(
                "server",
                "/CN=localhost",
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            )
            .with("client", "/CN=backend", "extendedKeyUsage=clientAuth\n")
    }

    /// Adds `<name>.pem` and `<name>.key`, signed by the CA, with `extensions`.
    pub fn with(self, name: &str, subject: &str, extensions: &str) -> Pki {
        let d = self.dir.path();
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(d.join(&ext), extensions).expect("writing extensions");
        let mut req = vec!["req"];
        req.extend(EC);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", subject]);
        openssl(d, &req);
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
        self
    }

    /// The path of one of its files.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The contents of one of its files.
    pub fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).expect("reading a PEM file")
    }

    /// A TLS channel to `localhost:port` trusting the CA, presenting the
    /// client certificate if `identity`.
    pub async fn channel(
        &self,
        port: u16,
        identity: bool,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.read("ca.pem")))
            .domain_name("localhost");
        if identity {
            tls = tls.identity(Identity::from_pem(
                self.read("client.pem"),
                self.read("client.key"),
            ));
        }
        Channel::from_shared(format!("https://localhost:{port}"))
            .expect("a valid URI")
            .tls_config(tls)?
            .connect()
            .await
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// A TLS terminator on loopback in front of a plaintext service (the test
/// broker speaks plain AMQP): `amqps://` clients connect to it with the
/// PKI's server certificate.
pub struct TlsRelay {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl TlsRelay {
    /// Starts one in front of `target`, serving `pki`'s server certificate.
    pub async fn start(target: std::net::SocketAddr, pki: &Pki) -> TlsRelay {
        use tokio_rustls::rustls::{
            ServerConfig,
            pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        };
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(pki.path("server.pem"))
                .expect("certificate")
                .collect::<Result<_, _>>()
                .expect("certificate");
        let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).expect("key");
        let config = ServerConfig::builder_with_provider(std::sync::Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the TLS relay");
        let addr = listener.local_addr().expect("address");
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(inbound).await else {
                        return;
                    };
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut outbound).await;
                    }
                });
            }
        });
        TlsRelay { addr, accept }
    }
}

impl Drop for TlsRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
