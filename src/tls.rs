//! TLS on the client URLs, configured as etcd's: an `https://` listen URL serves with
//! `--cert-file` and `--key-file`; `--client-cert-auth` requires every client to show a
//! certificate signed by a CA of `--trusted-ca-file`. gRPC, the HTTP endpoints and the
//! JSON gateway are served over it alike (ALPN `h2` and `http/1.1`).
//!
//! Handshakes run in tasks of their own, so a client that stalls in one holds up no
//! other; one that takes longer than [`HANDSHAKE_TIMEOUT`] is dropped.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    SupportedCipherSuite,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::{Connected, TcpConnectInfo};

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The certificate files of the client URLs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TlsFiles {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub trusted_ca_file: Option<PathBuf>,
    pub client_cert_auth: bool,
    /// Revoked client certificates (PEM CRLs), as etcd's --client-crl-file.
    pub client_crl_file: Option<PathBuf>,
    /// The TLS 1.2 cipher suites offered, by Go's names, as etcd's --cipher-suites
    /// (TLS 1.3's are not chosen, as in Go); empty for all.
    pub cipher_suites: Vec<String>,
    /// A host name every client certificate must be valid for, as etcd's
    /// --client-cert-allowed-hostname.
    pub client_cert_allowed_hostname: Option<String>,
    /// The lowest and highest TLS versions served, as etcd's --tls-min-version and
    /// --tls-max-version: `TLS1.2` or `TLS1.3`; empty for the default (TLS 1.2 up to 1.3).
    pub min_version: String,
    pub max_version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: {why}")]
    File { flag: &'static str, path: String, why: String },
    #[error("TLS needs --cert-file and --key-file")]
    NoCertificate,
    #[error("--client-cert-auth needs --trusted-ca-file, the CAs that sign the clients' certificates")]
    NoTrustedCa,
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("--trusted-ca-file: {0}")]
    Verifier(String),
    #[error("--client-cert-allowed-hostname {0:?}: not a host name or IP address")]
    AllowedHostname(String),
    #[error("--cipher-suites: unsupported cipher suite {0:?}; meshkv offers {1}")]
    CipherSuite(String, String),
    #[error("{0}")]
    Version(String),
}

/// A TLS version by etcd's name; None for "" (the default).
fn tls_version(name: &str) -> Result<Option<u16>, TlsError> {
    match name {
        "" => Ok(None),
        "TLS1.2" => Ok(Some(12)),
        "TLS1.3" => Ok(Some(13)),
        _ => Err(TlsError::Version(format!("unexpected TLS version {name:?} (must be one of: TLS1.2, TLS1.3)"))),
    }
}

fn file_error(flag: &'static str, path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::File { flag, path: path.display().to_string(), why: why.to_string() }
}

fn certificates(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(flag, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(flag, path, e))?;
    if certs.is_empty() {
        return Err(file_error(flag, path, "no certificate in the file"));
    }
    Ok(certs)
}

impl TlsFiles {
    /// The TLS versions served, from --tls-min-version and --tls-max-version, checked as
    /// etcd checks them.
    pub fn versions(&self) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, TlsError> {
        let min = tls_version(&self.min_version)?.unwrap_or(12);
        let max = tls_version(&self.max_version)?.unwrap_or(13);
        if max < min {
            return Err(TlsError::Version(format!(
                "min version ({}) is greater than max version ({})",
                self.min_version, self.max_version
            )));
        }
        if min == 13 && !self.cipher_suites.is_empty() {
            return Err(TlsError::Version("cipher suites cannot be configured when only TLS1.3 is enabled".into()));
        }
        let mut versions = Vec::new();
        if min <= 12 {
            versions.push(&rustls::version::TLS12);
        }
        if max >= 13 {
            versions.push(&rustls::version::TLS13);
        }
        Ok(versions)
    }

    /// The server's TLS configuration from the files.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) else { return Err(TlsError::NoCertificate) };
        let chain = certificates("--cert-file", cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error("--key-file", key, e))?;
        let provider = Arc::new(self.provider()?);
        let builder =
            ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(&self.versions()?)?;
        let builder = if self.client_cert_auth {
            let Some(ca) = &self.trusted_ca_file else { return Err(TlsError::NoTrustedCa) };
            let mut roots = RootCertStore::empty();
            for c in certificates("--trusted-ca-file", ca)? {
                roots.add(c).map_err(|e| file_error("--trusted-ca-file", ca, e))?;
            }
            let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if let Some(path) = &self.client_crl_file {
                let crls = CertificateRevocationListDer::pem_file_iter(path)
                    .map_err(|e| file_error("--client-crl-file", path, e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| file_error("--client-crl-file", path, e))?;
                if crls.is_empty() {
                    return Err(file_error("--client-crl-file", path, "no revocation list in the file"));
                }
                verifier = verifier.with_crls(crls);
            }
            let verifier = verifier.build().map_err(|e| TlsError::Verifier(e.to_string()))?;
            match &self.client_cert_allowed_hostname {
                Some(host) => builder.with_client_cert_verifier(Arc::new(HostnameVerifier::new(verifier, host)?)),
                None => builder.with_client_cert_verifier(verifier),
            }
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// ring's suites, TLS 1.2's narrowed to `cipher_suites` when some are named.
    fn provider(&self) -> Result<CryptoProvider, TlsError> {
        let mut provider = rustls::crypto::ring::default_provider();
        if self.cipher_suites.is_empty() {
            return Ok(provider);
        }
        // Go names a few suites without their hash, which is SHA-256 for them all.
        let name = |s: &SupportedCipherSuite| format!("{:?}", s.suite());
        let offered: Vec<String> = provider.cipher_suites.iter().filter(|s| s.tls13().is_none()).map(name).collect();
        let mut wanted = Vec::new();
        for given in &self.cipher_suites {
            let given = given.trim();
            let full = if given.ends_with("_POLY1305") { format!("{given}_SHA256") } else { given.to_string() };
            if !offered.contains(&full) {
                return Err(TlsError::CipherSuite(given.to_string(), offered.join(", ")));
            }
            wanted.push(full);
        }
        provider.cipher_suites.retain(|s| s.tls13().is_some() || wanted.contains(&name(s)));
        Ok(provider)
    }
}

/// Checks, besides the chain, that a client's certificate is valid for one host name,
/// as etcd's --client-cert-allowed-hostname: a DNS name (a wildcard covering one label)
/// or an IP address among its subject alternative names.
#[derive(Debug)]
struct HostnameVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    host: ServerName<'static>,
}

impl HostnameVerifier {
    fn new(inner: Arc<dyn ClientCertVerifier>, host: &str) -> Result<Self, TlsError> {
        let host = ServerName::try_from(host.to_string()).map_err(|_| TlsError::AllowedHostname(host.to_string()))?;
        Ok(Self { inner, host })
    }
}

impl ClientCertVerifier for HostnameVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        cert.verify_is_valid_for_subject_name(&self.host)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::NotValidForName))?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client's connection, in the clear or over TLS.
pub enum ClientConn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for ClientConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientConn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientConn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientConn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientConn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientConn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientConn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientConn::Plain(s) => s.is_write_vectored(),
            ClientConn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientConn::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientConn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientConn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientConn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What a client connection's requests carry about it.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    pub tcp: TcpConnectInfo,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The common name of the certificate the client presented, if any: its user, once
    /// authentication is on, when it sends no token.
    pub cert_name: Option<String>,
}

impl Connected for ClientConn {
    type ConnectInfo = ClientInfo;

    fn connect_info(&self) -> ClientInfo {
        match self {
            ClientConn::Plain(s) => ClientInfo { tcp: s.connect_info(), tls: false, cert_name: None },
            ClientConn::Tls(s) => {
                let (tcp, tls) = s.get_ref();
                let cert_name = tls.peer_certificates().and_then(|c| c.first()).and_then(|der| common_name(der));
                ClientInfo { tcp: tcp.connect_info(), tls: true, cert_name }
            }
        }
    }
}

/// The subject's common name of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// The connections `listener` accepts, through a TLS handshake when `tls` is given.
/// Accepting stops when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<ClientConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors, say: wait rather than spin.
                        tracing::warn!(error = %e, "accepting a client connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            // Small replies must not wait for delayed ACKs (Nagle's algorithm).
            let _ = tcp.set_nodelay(true);
            let Some(acceptor) = tls.clone() else {
                if tx.send(Ok(ClientConn::Plain(tcp))).await.is_err() {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(ClientConn::Tls(Box::new(s)))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
