//! TLS for the Surveil wire (rustls with the ring provider): loading the
//! PEM files the flags name, the dispatcher's accept path and the clients'
//! dial path, both yielding one [`Stream`] type so `Connection<Stream>`
//! serves plaintext and TLS alike.
//!
//! It also turns the confusing failures of mismatched ends (plaintext to a
//! TLS port, TLS to a plaintext port, an untrusted certificate, a missing
//! client certificate) into messages that say which flag to pass. It knows
//! nothing of tokens or of the protocol's messages.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use surveil_proto::{CodecError, ConnectionError, HandshakeError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The first byte of every TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;
/// The first byte of a TLS alert record.
const TLS_ALERT: u8 = 0x15;
/// A fatal `unexpected_message` alert, TLS 1.2 record version: what the
/// dispatcher answers plaintext with, so the client sees TLS bytes.
const UNEXPECTED_MESSAGE_ALERT: [u8; 7] = [TLS_ALERT, 0x03, 0x03, 0x00, 0x02, 0x02, 0x0a];
/// What a plaintext client is told to do about a TLS dispatcher.
pub const PLAINTEXT_TO_TLS_HINT: &str = "the dispatcher speaks TLS; pass --tls-ca";
/// What a client whose certificate (or lack of one) was refused is told.
pub const CLIENT_CERT_HINT: &str = "the dispatcher requires a client certificate signed by its --tls-client-ca; pass --tls-cert and --tls-key";

/// A TLS setting that cannot be used, naming its flag.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file is unreadable or holds no usable PEM.
    #[error("{flag} {}: {reason}", path.display())]
    File {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The files loaded but do not make a working configuration (e.g. the
    /// key does not match the certificate).
    #[error("{flag}: {reason}")]
    Config {
        /// The flag to look at.
        flag: &'static str,
        /// What rustls said.
        reason: String,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |reason: String| TlsError::File {
        flag,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error("no PEM certificate in the file".to_owned()));
    }
    Ok(certs)
}

fn load_key(flag: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        flag,
        path: path.to_owned(),
        reason: format!("no usable PEM private key ({e})"),
    })
}

fn load_roots(flag: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(flag, path)? {
        roots.add(cert).map_err(|e| TlsError::File {
            flag,
            path: path.to_owned(),
            reason: format!("not a usable CA certificate ({e})"),
        })?;
    }
    Ok(roots)
}

/// The dispatcher's TLS: its certificate and, for mutual TLS, the CA that
/// must have signed every client's certificate.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    mutual: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("requires_client_certs", &self.mutual)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads `--tls-cert` (a PEM chain, leaf first), `--tls-key` and the
    /// optional `--tls-client-ca`.
    pub fn new(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, TlsError> {
        let chain = load_certs("--tls-cert", cert)?;
        let key = load_key("--tls-key", key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config {
                flag: "--tls-cert",
                reason: e.to_string(),
            })?;
        let builder = match client_ca {
            Some(path) => {
                let roots = load_roots("--tls-client-ca", path)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| TlsError::Config {
                            flag: "--tls-client-ca",
                            reason: e.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config {
                flag: "--tls-key",
                reason: format!("does not fit --tls-cert: {e}"),
            })?;
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            mutual: client_ca.is_some(),
        })
    }

    /// Whether every client must present a certificate (mutual TLS).
    pub fn requires_client_certs(&self) -> bool {
        self.mutual
    }
}

/// A rustls client configuration trusting only the CA certificates in
/// `path` (PEM), for a client other than our own dial (the dispatcher's
/// PostgreSQL connections); `flag` names the setting in errors.
pub fn client_config_for_ca(
    flag: &'static str,
    path: &Path,
) -> Result<rustls::ClientConfig, TlsError> {
    let roots = load_roots(flag, path)?;
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config {
            flag,
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A client's TLS: the CA the dispatcher's certificate must chain to, the
/// name it must carry, and an optional client certificate.
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    /// Whether `server_name` was given (`--tls-server-name`); otherwise
    /// each address dialled is checked against its own host, so one list
    /// of dispatchers needs no per-address flag.
    fixed_name: bool,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Loads `--tls-ca`, the optional `(--tls-cert, --tls-key)` client
    /// identity, and checks `server_name` (a DNS name or an IP address).
    pub fn new(
        ca: &Path,
        identity: Option<(&Path, &Path)>,
        server_name: &str,
    ) -> Result<Self, TlsError> {
        let roots = load_roots("--tls-ca", ca)?;
        let server_name =
            ServerName::try_from(server_name.to_owned()).map_err(|e| TlsError::Config {
                flag: "--tls-server-name",
                reason: format!("`{server_name}` is not a DNS name or IP address ({e})"),
            })?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config {
                flag: "--tls-ca",
                reason: e.to_string(),
            })?
            .with_root_certificates(roots);
        let config = match identity {
            Some((cert, key)) => {
                let chain = load_certs("--tls-cert", cert)?;
                let key = load_key("--tls-key", key)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::Config {
                        flag: "--tls-key",
                        reason: format!("does not fit --tls-cert: {e}"),
                    })?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            fixed_name: true,
        })
    }
}

/// The client TLS flags every runner, observer and CLI shares; flatten it
/// into the binary's `Cli`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// CA certificate (PEM) the dispatcher's certificate must be signed by;
    /// giving it turns TLS on.
    #[arg(long, env = "SURVEIL_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a dispatcher that requires mutual TLS;
    /// needs --tls-key and --tls-ca.
    #[arg(long, env = "SURVEIL_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "SURVEIL_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Name the dispatcher's certificate must carry (default: the host part
    /// of each --dispatch address dialled; an IP address is matched against
    /// the IP SANs).
    #[arg(long, env = "SURVEIL_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

impl ClientTlsArgs {
    /// The client TLS these flags ask for, `None` without `--tls-ca`;
    /// without `--tls-server-name` each address dialled is checked against
    /// its own host; `dispatch` (`host:port`, the first address) is
    /// checked here so that a bad one is refused at start.
    pub fn load(&self, dispatch: &str) -> Result<Option<ClientTls>, TlsError> {
        let needs_ca = |flag: &'static str| TlsError::Config {
            flag,
            reason: "needs --tls-ca, the CA that signed the dispatcher's certificate".to_owned(),
        };
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (Some(_), None) => {
                return Err(TlsError::Config {
                    flag: "--tls-cert",
                    reason: "needs --tls-key, the certificate's private key".to_owned(),
                });
            }
            (None, Some(_)) => {
                return Err(TlsError::Config {
                    flag: "--tls-key",
                    reason: "needs --tls-cert, the client certificate".to_owned(),
                });
            }
            (None, None) => None,
        };
        let Some(ca) = &self.tls_ca else {
            if identity.is_some() {
                return Err(needs_ca("--tls-cert"));
            }
            if self.tls_server_name.is_some() {
                return Err(needs_ca("--tls-server-name"));
            }
            return Ok(None);
        };
        let (name, fixed_name) = match &self.tls_server_name {
            Some(name) => (name.clone(), true),
            None => (host_of(dispatch).to_owned(), false),
        };
        let tls = ClientTls::new(ca, identity, &name)?;
        Ok(Some(ClientTls { fixed_name, ..tls }))
    }
}

/// The host part of `host:port` (`[v6]:port` loses its brackets).
pub fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => addr,
    };
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// A connection to or from the dispatcher, plaintext or TLS.
#[derive(Debug)]
pub enum Stream {
    /// No TLS configured.
    Plain(TcpStream),
    /// A TLS session over TCP (either side).
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

impl Stream {
    /// The names in the verified client certificate of a server-side TLS
    /// session (mutual TLS): its subject's common names, then its DNS
    /// subject alternative names. Empty for plaintext, for a client-side
    /// session, and when the peer sent no certificate.
    pub fn peer_names(&self) -> Vec<String> {
        let Stream::Tls(tls) = self else {
            return Vec::new();
        };
        let tokio_rustls::TlsStream::Server(server) = &**tls else {
            return Vec::new();
        };
        let Some(leaf) = server
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
        else {
            return Vec::new();
        };
        certificate_names(leaf.as_ref())
    }
}

/// A DER certificate's subject common names and DNS alternative names, in
/// that order, without repeats. Only called on certificates rustls has
/// already verified against `--tls-client-ca`.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name
                && !names.iter().any(|n| n == dns)
            {
                names.push((*dns).to_owned());
            }
        }
    }
    names
}

/// Why the dispatcher could not start a session on an accepted connection.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// A TLS port received something else first.
    #[error("client did not start TLS (plaintext on a TLS port?)")]
    PlaintextOnTlsPort,
    /// A plaintext port received a TLS ClientHello.
    #[error(
        "client started TLS on a plaintext port (start the dispatcher with --tls-cert and --tls-key, or drop the client's --tls-ca)"
    )]
    TlsOnPlaintextPort,
    /// The peer closed before sending anything.
    #[error("connection closed before the handshake")]
    Closed,
    /// The TLS handshake failed (untrusted or missing client certificate,
    /// garbage, a reset).
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
    /// Reading the first byte failed.
    #[error("i/o error before the handshake: {0}")]
    Io(io::Error),
}

/// The dispatcher's side: looks at the first byte to tell TLS from
/// plaintext, refuses the mismatch with a clear reason and, with `tls`,
/// completes the TLS handshake. The caller bounds it with its handshake
/// timeout.
pub async fn accept(stream: TcpStream, tls: Option<&ServerTls>) -> Result<Stream, AcceptError> {
    let _ = stream.set_nodelay(true);
    let Some(starts_tls) = starts_tls(&stream).await.map_err(AcceptError::Io)? else {
        return Err(AcceptError::Closed);
    };
    match tls {
        None if starts_tls => Err(AcceptError::TlsOnPlaintextPort),
        None => Ok(Stream::Plain(stream)),
        Some(_) if !starts_tls => {
            refuse_plaintext(stream).await;
            Err(AcceptError::PlaintextOnTlsPort)
        }
        Some(tls) => tls
            .acceptor
            .accept(stream)
            .await
            .map(|s| Stream::Tls(Box::new(s.into())))
            .map_err(AcceptError::Handshake),
    }
}

/// Waits for the peer's first byte, without consuming it, and tells
/// whether it opens a TLS handshake; `None` when the peer closed first.
pub async fn starts_tls(stream: &TcpStream) -> io::Result<Option<bool>> {
    let mut first = [0u8; 1];
    Ok(match stream.peek(&mut first).await? {
        0 => None,
        _ => Some(first[0] == TLS_HANDSHAKE),
    })
}

/// Answers a plaintext client with a TLS alert, so it can tell it reached
/// a TLS port. What it already sent is read first: closing a socket with
/// unread data resets the connection, and the reset could discard the
/// alert before the client reads it.
async fn refuse_plaintext(mut stream: TcpStream) {
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        match stream.try_read(&mut sink) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    let _ = stream.write_all(&UNEXPECTED_MESSAGE_ALERT).await;
    let _ = stream.shutdown().await;
}

/// The clients' side: TCP connect to `addr` and, with `tls`, the TLS
/// handshake. Failures are `io::Error`s whose message says what to fix
/// (untrusted certificate, plaintext port). The caller bounds it in time.
pub async fn connect(addr: &str, tls: Option<&ClientTls>) -> io::Result<Stream> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(Stream::Plain(tcp));
    };
    let server_name = if tls.fixed_name {
        tls.server_name.clone()
    } else {
        ServerName::try_from(host_of(addr).to_owned()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "`{}` is not a DNS name or IP address for TLS ({e}); set --tls-server-name",
                    host_of(addr)
                ),
            )
        })?
    };
    match tls.connector.connect(server_name, tcp).await {
        Ok(stream) => Ok(Stream::Tls(Box::new(stream.into()))),
        Err(err) => Err(explain_client_handshake(err)),
    }
}

fn rustls_error(err: &io::Error) -> Option<&rustls::Error> {
    err.get_ref().and_then(|inner| inner.downcast_ref())
}

fn explain_client_handshake(err: io::Error) -> io::Error {
    let message = match rustls_error(&err) {
        Some(rustls::Error::InvalidCertificate(cert)) => format!(
            "the dispatcher's TLS certificate was not accepted: {cert} (check --tls-ca and --tls-server-name)"
        ),
        Some(rustls::Error::AlertReceived(alert)) => {
            format!("the dispatcher refused the TLS handshake: received alert {alert:?}")
        }
        _ => format!("the dispatcher did not answer TLS (plaintext port?): {err}"),
    };
    io::Error::new(err.kind(), message)
}

/// A hint for a failed protocol handshake that mismatched transports
/// explain: a plaintext client reading a TLS record, or a TLS client
/// whose certificate (or lack of one) the dispatcher refused.
pub fn handshake_hint(err: &HandshakeError) -> Option<&'static str> {
    let HandshakeError::Connection(ConnectionError::Codec(codec)) = err else {
        return None;
    };
    match codec {
        // A TLS record header read as a length prefix: 0x15 or 0x16, then
        // the version 0x03 0x0N.
        CodecError::FrameTooLarge { len, .. } => {
            let bytes = u32::try_from(*len).ok()?.to_be_bytes();
            ((bytes[0] == TLS_ALERT || bytes[0] == TLS_HANDSHAKE) && bytes[1] == 0x03)
                .then_some(PLAINTEXT_TO_TLS_HINT)
        }
        CodecError::Io(io) => match rustls_error(io)? {
            rustls::Error::AlertReceived(
                rustls::AlertDescription::CertificateRequired
                | rustls::AlertDescription::BadCertificate
                | rustls::AlertDescription::UnknownCA
                | rustls::AlertDescription::CertificateUnknown
                | rustls::AlertDescription::HandshakeFailure,
            ) => Some(CLIENT_CERT_HINT),
            _ => None,
        },
        _ => None,
    }
}

/// Certificates made at run time for tests: a CA, a server certificate for
/// `localhost` and `127.0.0.1`, a client certificate, and a second,
/// unrelated CA.
#[cfg(any(test, feature = "test-certs"))]
pub mod test_certs {
    use std::path::{Path, PathBuf};

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
        ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };

    /// The PEM files, written in one directory.
    #[derive(Debug, Clone)]
    pub struct TestCerts {
        /// The CA that signed the server and client certificates.
        pub ca: PathBuf,
        /// Server certificate (`localhost`, `127.0.0.1`).
        pub server_cert: PathBuf,
        /// Its key.
        pub server_key: PathBuf,
        /// Client certificate (for mutual TLS).
        pub client_cert: PathBuf,
        /// Its key.
        pub client_key: PathBuf,
        /// A CA that signed nothing here.
        pub other_ca: PathBuf,
        /// A client certificate signed by `other_ca`.
        pub other_client_cert: PathBuf,
        /// Its key.
        pub other_client_key: PathBuf,
    }

    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key"))
            .expect("self-signed CA")
    }

    fn leaf(
        issuer: &CertifiedIssuer<'static, KeyPair>,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        // The first name is the subject's common name too (rcgen's default
        // is a placeholder), as an operator's CA would issue it.
        let mut subject = DistinguishedName::new();
        if let Some(first) = params.subject_alt_names.first()
            && let rcgen::SanType::DnsName(name) = first
        {
            subject.push(DnType::CommonName, name.as_str());
        }
        params.distinguished_name = subject;
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, issuer).expect("signed leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// Generates the certificates and writes them into `dir`.
    pub fn write(dir: &Path) -> TestCerts {
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("writing a test certificate");
            path
        };
        let ca_one = ca("surveil test CA");
        let ca_two = ca("unrelated test CA");
        let (server_cert, server_key) = leaf(
            &ca_one,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) =
            leaf(&ca_one, &["runner-1"], ExtendedKeyUsagePurpose::ClientAuth);
        let (other_cert, other_key) =
            leaf(&ca_two, &["intruder"], ExtendedKeyUsagePurpose::ClientAuth);
        TestCerts {
            ca: write("ca.pem", &ca_one.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
            other_ca: write("other-ca.pem", &ca_two.pem()),
            other_client_cert: write("other-client.pem", &other_cert),
            other_client_key: write("other-client.key", &other_key),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use surveil_proto::{Connection, Hello, Role, Welcome};
    use tokio::net::TcpListener;

    use super::test_certs::TestCerts;
    use super::*;

    const T: Duration = Duration::from_secs(5);

    /// A one-connection server: accepts, then answers a Hello with Welcome.
    async fn server(
        tls: Option<ServerTls>,
    ) -> (String, tokio::task::JoinHandle<Result<(), String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let stream = accept(tcp, tls.as_ref()).await.map_err(|e| e.to_string())?;
            let mut conn = Connection::new(stream);
            conn.accept_hello(T).await.map_err(|e| e.to_string())?;
            conn.send(Welcome::default())
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        });
        (addr, task)
    }

    async fn hello_over(stream: Stream) -> Result<Welcome, HandshakeError> {
        let mut conn = Connection::new(stream);
        conn.client_handshake(Hello::new(Role::Client, "t"), T)
            .await
    }

    fn certs() -> (tempfile::TempDir, TestCerts) {
        let dir = tempfile::tempdir().unwrap();
        let certs = test_certs::write(dir.path());
        (dir, certs)
    }

    fn client(certs: &TestCerts, ca: &Path, identity: bool) -> ClientTls {
        let identity =
            identity.then_some((certs.client_cert.as_path(), certs.client_key.as_path()));
        ClientTls::new(ca, identity, "127.0.0.1").unwrap()
    }

    #[tokio::test]
    async fn tls_handshake_by_ip_san_and_by_dns_name() {
        let (_dir, certs) = certs();
        for name in ["127.0.0.1", "localhost"] {
            let tls = ServerTls::new(&certs.server_cert, &certs.server_key, None).unwrap();
            let (addr, task) = server(Some(tls)).await;
            let client = ClientTls::new(&certs.ca, None, name).unwrap();
            let stream = connect(&addr, Some(&client)).await.unwrap();
            assert!(matches!(stream, Stream::Tls(_)));
            hello_over(stream).await.unwrap();
            task.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn wrong_ca_is_a_certificate_error() {
        let (_dir, certs) = certs();
        let tls = ServerTls::new(&certs.server_cert, &certs.server_key, None).unwrap();
        let (addr, task) = server(Some(tls)).await;
        let err = connect(&addr, Some(&client(&certs, &certs.other_ca, false)))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the dispatcher's TLS certificate was not accepted"),
            "{err}"
        );
        assert!(err.contains("--tls-ca"), "{err}");
        let server_err = task.await.unwrap().unwrap_err();
        assert!(server_err.contains("TLS handshake failed"), "{server_err}");
    }

    #[tokio::test]
    async fn wrong_server_name_is_a_certificate_error() {
        let (_dir, certs) = certs();
        let tls = ServerTls::new(&certs.server_cert, &certs.server_key, None).unwrap();
        let (addr, _task) = server(Some(tls)).await;
        let client = ClientTls::new(&certs.ca, None, "dispatch.example").unwrap();
        let err = connect(&addr, Some(&client)).await.unwrap_err().to_string();
        assert!(err.contains("certificate was not accepted"), "{err}");
        assert!(err.contains("--tls-server-name"), "{err}");
    }

    #[tokio::test]
    async fn plaintext_client_to_tls_port_fails_clearly_on_both_sides() {
        let (_dir, certs) = certs();
        let tls = ServerTls::new(&certs.server_cert, &certs.server_key, None).unwrap();
        let (addr, task) = server(Some(tls)).await;
        let stream = connect(&addr, None).await.unwrap();
        let err = hello_over(stream).await.unwrap_err();
        assert_eq!(handshake_hint(&err), Some(PLAINTEXT_TO_TLS_HINT), "{err}");
        let server_err = task.await.unwrap().unwrap_err();
        assert_eq!(
            server_err,
            "client did not start TLS (plaintext on a TLS port?)"
        );
    }

    #[tokio::test]
    async fn tls_client_to_plaintext_port_fails_clearly_on_both_sides() {
        let (_dir, certs) = certs();
        let (addr, task) = server(None).await;
        let err = connect(&addr, Some(&client(&certs, &certs.ca, false)))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the dispatcher did not answer TLS (plaintext port?)"),
            "{err}"
        );
        let server_err = task.await.unwrap().unwrap_err();
        assert!(
            server_err.contains("client started TLS on a plaintext port"),
            "{server_err}"
        );
    }

    #[tokio::test]
    async fn mutual_tls_needs_a_client_certificate_from_the_client_ca() {
        let (_dir, certs) = certs();
        let server_tls =
            ServerTls::new(&certs.server_cert, &certs.server_key, Some(&certs.ca)).unwrap();
        assert!(server_tls.requires_client_certs());

        // Without a certificate: TLS 1.3 finishes the client's side of the
        // handshake, so the refusal arrives as an alert on the first read.
        let (addr, task) = server(Some(server_tls.clone())).await;
        let refused = match connect(&addr, Some(&client(&certs, &certs.ca, false))).await {
            Ok(stream) => {
                let err = hello_over(stream).await.unwrap_err();
                assert_eq!(handshake_hint(&err), Some(CLIENT_CERT_HINT), "{err}");
                err.to_string()
            }
            Err(err) => err.to_string(),
        };
        assert!(refused.to_lowercase().contains("certificate"), "{refused}");
        let server_err = task.await.unwrap().unwrap_err();
        assert!(server_err.contains("TLS handshake failed"), "{server_err}");

        // A certificate from another CA is refused too.
        let (addr, task) = server(Some(server_tls.clone())).await;
        let intruder = ClientTls::new(
            &certs.ca,
            Some((&certs.other_client_cert, &certs.other_client_key)),
            "127.0.0.1",
        )
        .unwrap();
        if let Ok(stream) = connect(&addr, Some(&intruder)).await {
            let err = hello_over(stream).await.unwrap_err();
            assert_eq!(handshake_hint(&err), Some(CLIENT_CERT_HINT), "{err}");
        }
        assert!(task.await.unwrap().is_err());

        // With the right certificate it works.
        let (addr, task) = server(Some(server_tls)).await;
        let stream = connect(&addr, Some(&client(&certs, &certs.ca, true)))
            .await
            .unwrap();
        hello_over(stream).await.unwrap();
        task.await.unwrap().unwrap();
    }

    #[test]
    fn client_flags_validated_naming_the_flag() {
        let (_dir, certs) = certs();
        let none = ClientTlsArgs::default();
        assert!(none.load("127.0.0.1:9000").unwrap().is_none());
        let cert_only = ClientTlsArgs {
            tls_ca: Some(certs.ca.clone()),
            tls_cert: Some(certs.client_cert.clone()),
            ..ClientTlsArgs::default()
        };
        let err = cert_only.load("x:1").unwrap_err().to_string();
        assert!(err.starts_with("--tls-cert: needs --tls-key"), "{err}");
        let no_ca = ClientTlsArgs {
            tls_cert: Some(certs.client_cert.clone()),
            tls_key: Some(certs.client_key.clone()),
            ..ClientTlsArgs::default()
        };
        let err = no_ca.load("x:1").unwrap_err().to_string();
        assert!(err.starts_with("--tls-cert: needs --tls-ca"), "{err}");
        let missing = ClientTlsArgs {
            tls_ca: Some(certs.ca.with_file_name("missing.pem")),
            ..ClientTlsArgs::default()
        };
        let err = missing.load("x:1").unwrap_err().to_string();
        assert!(err.starts_with("--tls-ca "), "{err}");
        let not_a_cert = ClientTlsArgs {
            tls_ca: Some(certs.client_key.clone()),
            ..ClientTlsArgs::default()
        };
        let err = not_a_cert.load("x:1").unwrap_err().to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        let err = ServerTls::new(&certs.server_cert, &certs.client_key, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--tls-key: does not fit --tls-cert"),
            "{err}"
        );
    }

    #[test]
    fn host_part_of_dispatch() {
        assert_eq!(host_of("127.0.0.1:9000"), "127.0.0.1");
        assert_eq!(host_of("ci.example.org:9000"), "ci.example.org");
        assert_eq!(host_of("[::1]:9000"), "::1");
        assert_eq!(host_of("ci.example.org"), "ci.example.org");
    }
}
