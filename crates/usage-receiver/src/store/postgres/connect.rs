//! How a node reaches PostgreSQL: the database URL read as libpq reads it (the URL form or
//! `key=value` pairs), its `sslmode` and `sslrootcert` carried out with rustls, and the
//! target as a message may show it, which never holds the password.
//!
//! tokio-postgres itself knows `sslmode` only up to `require` and no `sslrootcert`, so both
//! are taken out of the URL here and the rest is left to its parser. The modes, as libpq
//! has them: `disable` never encrypts; `prefer` (the default) encrypts when the server
//! offers it, else goes on in plain text; `require` encrypts and, like libpq, checks the
//! certificate only when `sslrootcert` is given (then as `verify-ca` does); `verify-ca`
//! checks that the certificate chains to a root of `sslrootcert`; `verify-full` also that
//! it names the host connected to. Over a Unix socket PostgreSQL never speaks TLS, and
//! libpq does not ask it to: neither does this.

use std::path::PathBuf;
use std::sync::Arc;

use deadpool_postgres::tokio_postgres::{self, config::Host};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    const NAMES: [(&'static str, SslMode); 5] = [
        ("disable", SslMode::Disable),
        ("prefer", SslMode::Prefer),
        ("require", SslMode::Require),
        ("verify-ca", SslMode::VerifyCa),
        ("verify-full", SslMode::VerifyFull),
    ];

    fn parse(text: &str) -> Option<SslMode> {
        SslMode::NAMES
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, mode)| *mode)
    }

    fn name(self) -> &'static str {
        SslMode::NAMES
            .iter()
            .find(|(_, mode)| *mode == self)
            .map_or("prefer", |(name, _)| name)
    }
}

/// Where the trusted roots come from: a PEM file, or `sslrootcert=system`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RootCerts {
    File(PathBuf),
    System,
}

/// A database URL, read and checked; [`DatabaseUrl::shown`] is what messages may print.
#[derive(Clone)]
pub struct DatabaseUrl {
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    root_certs: Option<RootCerts>,
    shown: String,
}

/// A database URL that cannot be used; it names the parameter and the rule, never a
/// value that could be a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatabaseUrlError {
    #[error("the database URL's {name} {rule}")]
    Parameter { name: &'static str, rule: String },
    #[error("the database URL cannot be read: {0}")]
    Unreadable(String),
}

/// Why TLS could not be set up for a connection (the root certificates).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsSetupError(String);

impl DatabaseUrl {
    /// Reads `url`, libpq's URL form (`postgres://user:password@host:port/dbname?...`) or
    /// its `key=value` form.
    pub fn parse(url: &str) -> Result<DatabaseUrl, DatabaseUrlError> {
        let (rest, tls) = take_tls_parameters(url)?;
        let ssl_mode = match tls.ssl_mode.as_deref() {
            None => SslMode::Prefer,
            Some(text) => SslMode::parse(text).ok_or_else(|| DatabaseUrlError::Parameter {
                name: "sslmode",
                rule: format!(
                    "must be disable, prefer, require, verify-ca or verify-full, not {:?}",
                    clip(text)
                ),
            })?,
        };
        let root_certs = match tls.root_cert.as_deref() {
            None | Some("") => None,
            Some("system") => Some(RootCerts::System),
            Some(path) => Some(RootCerts::File(PathBuf::from(path))),
        };
        if matches!(ssl_mode, SslMode::VerifyCa | SslMode::VerifyFull) && root_certs.is_none() {
            return Err(DatabaseUrlError::Parameter {
                name: "sslmode",
                rule: format!(
                    "{} needs sslrootcert=PATH (the PEM file of the server's certificate authority) or sslrootcert=system (the system's trusted roots)",
                    ssl_mode.name()
                ),
            });
        }
        // tokio-postgres names the option that is wrong in the error's cause, never its
        // value.
        let mut config: tokio_postgres::Config =
            rest.parse().map_err(|error: tokio_postgres::Error| {
                DatabaseUrlError::Unreadable(usage_common::logging::error_chain(&error))
            })?;
        let only_unix_sockets = !config.get_hosts().is_empty()
            && config
                .get_hosts()
                .iter()
                .all(|host| matches!(host, Host::Unix(_)));
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            _ if only_unix_sockets => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        let shown = shown(&config, tls.ssl_mode.as_ref().map(|_| ssl_mode));
        Ok(DatabaseUrl {
            config,
            ssl_mode,
            root_certs,
            shown,
        })
    }

    /// The target without its password: user, hosts, ports, database and `sslmode`.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// The connection settings for tokio-postgres (TLS mode included).
    pub(super) fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The rustls connector the mode asks for; `None` for `disable`. Reads the root
    /// certificates of `sslrootcert`.
    pub(super) fn tls(&self) -> Result<Option<RustlsConnector>, TlsSetupError> {
        if self.ssl_mode == SslMode::Disable {
            return Ok(None);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match &self.root_certs {
            None => Arc::new(EncryptOnly {
                algorithms: provider.signature_verification_algorithms,
            }),
            Some(roots) => {
                let chain = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(root_store(roots)?),
                    provider.clone(),
                )
                .build()
                .map_err(|error| {
                    TlsSetupError(format!("the roots of sslrootcert cannot be used: {error}"))
                })?;
                if self.ssl_mode == SslMode::VerifyFull {
                    chain
                } else {
                    Arc::new(ChainOnly(chain))
                }
            }
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsSetupError(format!("rustls refused its own defaults: {error}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Some(RustlsConnector(MakeRustlsConnect::new(config))))
    }
}

/// The rustls connector, for TCP hosts and Unix sockets alike: tokio-postgres asks for a
/// Unix socket's connector with no host name, which rustls cannot take; the server never
/// offers TLS there, so that connector is never used and any valid name does.
#[derive(Clone)]
pub(super) struct RustlsConnector(MakeRustlsConnect);

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for RustlsConnector
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Stream;
    type TlsConnect = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::TlsConnect;
    type Error = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, hostname: &str) -> Result<Self::TlsConnect, Self::Error> {
        let hostname = if hostname.is_empty() {
            "unix-socket.invalid"
        } else {
            hostname
        };
        tokio_postgres::tls::MakeTlsConnect::<S>::make_tls_connect(&mut self.0, hostname)
    }
}

/// The trusted roots `sslrootcert` names.
fn root_store(roots: &RootCerts) -> Result<RootCertStore, TlsSetupError> {
    let mut store = RootCertStore::empty();
    match roots {
        RootCerts::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|error| {
                    TlsSetupError(format!(
                        "sslrootcert {} cannot be read as PEM certificates: {error}",
                        path.display()
                    ))
                })?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsSetupError(format!(
                    "sslrootcert {} holds no usable certificate",
                    path.display()
                )));
            }
        }
        RootCerts::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsSetupError(
                    "sslrootcert=system found no trusted root certificate on this system"
                        .to_owned(),
                ));
            }
        }
    }
    Ok(store)
}

/// `verify-ca`, and `require` or `prefer` with `sslrootcert`: the certificate must chain
/// to a trusted root, whatever host names it holds.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The chain is checked before the name: a name error means the chain held.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require` and `prefer` without `sslrootcert`: encrypted, the certificate not checked
/// (libpq's meaning). The handshake's signatures are still checked against the
/// certificate the server sent.
#[derive(Debug)]
struct EncryptOnly {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// What [`take_tls_parameters`] took out.
#[derive(Debug, Default, PartialEq, Eq)]
struct TlsParameters {
    ssl_mode: Option<String>,
    root_cert: Option<String>,
}

/// `url` without its `sslmode` and `sslrootcert`, and their values (percent-decoded in
/// the URL form, unquoted in the `key=value` form).
fn take_tls_parameters(url: &str) -> Result<(String, TlsParameters), DatabaseUrlError> {
    let mut taken = TlsParameters::default();
    let mut take = |key: &str, value: String| match key {
        "sslmode" => {
            taken.ssl_mode = Some(value);
            true
        }
        "sslrootcert" => {
            taken.root_cert = Some(value);
            true
        }
        _ => false,
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), taken));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(&percent_decode(key), percent_decode(value)) {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, taken));
    }
    let mut kept = Vec::new();
    for (key, value) in key_value_pairs(url)? {
        if !take(&key, value.clone()) {
            let quoted = value.replace('\\', r"\\").replace('\'', r"\'");
            kept.push(format!("{key}='{quoted}'"));
        }
    }
    Ok((kept.join(" "), taken))
}

/// The pairs of libpq's `key=value` form: values may be single-quoted, and a backslash
/// escapes the next character.
fn key_value_pairs(text: &str) -> Result<Vec<(String, String)>, DatabaseUrlError> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    let skip_spaces = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_spaces(&mut chars);
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        // Not a parameter name (another scheme's URL, say): said without echoing it, as it
        // may hold a password.
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(DatabaseUrlError::Unreadable(
                "it is neither a postgres:// (or postgresql://) URL nor key=value pairs".to_owned(),
            ));
        }
        skip_spaces(&mut chars);
        if chars.next() != Some('=') {
            return Err(DatabaseUrlError::Unreadable(format!(
                "{:?} is not followed by = and a value",
                clip(&key)
            )));
        }
        skip_spaces(&mut chars);
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(DatabaseUrlError::Unreadable(format!(
                            "the quoted value of {:?} has no closing quote",
                            clip(&key)
                        )));
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// `%XX` sequences decoded (no `+` for space: libpq reads URLs that way).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&high), Some(&low)) if hex(high).is_some() && hex(low).is_some() => {
                let (high, low) = (hex(high).unwrap_or(0), hex(low).unwrap_or(0));
                out.push(u8::try_from(high * 16 + low).unwrap_or(b'?'));
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A user-given word cut to a length a message can carry.
fn clip(text: &str) -> String {
    text.chars().take(40).collect()
}

/// The target as a message may show it: `postgres://user@host:port/dbname`, each host
/// with its port, a Unix socket's directory as `?host=`; `sslmode` when one was given.
fn shown(config: &tokio_postgres::Config, ssl_mode: Option<SslMode>) -> String {
    let ports = config.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let mut tcp = Vec::new();
    let mut sockets = Vec::new();
    for (i, host) in config.get_hosts().iter().enumerate() {
        match host {
            Host::Tcp(name) => tcp.push(format!("{name}:{}", port(i))),
            Host::Unix(dir) => sockets.push(format!("{}:{}", dir.display(), port(i))),
        }
    }
    if tcp.is_empty() && sockets.is_empty() {
        for (i, addr) in config.get_hostaddrs().iter().enumerate() {
            tcp.push(format!("{addr}:{}", port(i)));
        }
    }
    let user = config
        .get_user()
        .map(|user| format!("{user}@"))
        .unwrap_or_default();
    let dbname = config.get_dbname().unwrap_or_default();
    let mut shown = format!("postgres://{user}{}/{dbname}", tcp.join(","));
    let mut query = Vec::new();
    if !sockets.is_empty() {
        query.push(format!("host={}", sockets.join(",")));
    }
    if let Some(mode) = ssl_mode {
        query.push(format!("sslmode={}", mode.name()));
    }
    if !query.is_empty() {
        shown.push('?');
        shown.push_str(&query.join("&"));
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(url: &str) -> DatabaseUrl {
        DatabaseUrl::parse(url).unwrap_or_else(|error| panic!("{url}: {error}"))
    }

    #[test]
    fn every_sslmode_is_read_from_both_forms() {
        for (text, mode) in SslMode::NAMES {
            let root = if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) {
                "&sslrootcert=/etc/ssl/db-ca.pem"
            } else {
                ""
            };
            let url = parsed(&format!(
                "postgres://u@db.example.test/d?sslmode={text}{root}"
            ));
            assert_eq!(url.ssl_mode(), mode);
            let pairs = parsed(&format!(
                "host=db.example.test user=u dbname=d sslmode='{text}' sslrootcert=/x.pem"
            ));
            assert_eq!(pairs.ssl_mode(), mode);
        }
        assert_eq!(parsed("postgres://u@h/d").ssl_mode(), SslMode::Prefer);
    }

    #[test]
    fn tokio_postgres_gets_its_own_tls_mode() {
        use tokio_postgres::config::SslMode as Wire;
        let wire = |url: &str| parsed(url).config().get_ssl_mode();
        assert_eq!(wire("postgres://u@h/d?sslmode=disable"), Wire::Disable);
        assert_eq!(wire("postgres://u@h/d"), Wire::Prefer);
        assert_eq!(wire("postgres://u@h/d?sslmode=require"), Wire::Require);
        assert_eq!(
            wire("postgres://u@h/d?sslmode=verify-full&sslrootcert=/ca.pem"),
            Wire::Require
        );
        // No TLS over a Unix socket, as libpq.
        assert_eq!(
            wire("postgres://u@/d?host=/run/postgresql&sslmode=require"),
            Wire::Disable
        );
    }

    #[test]
    fn an_unknown_sslmode_names_the_parameter_and_the_choices() {
        let error = DatabaseUrl::parse("postgres://u:pw@h/d?sslmode=verify")
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            "the database URL's sslmode must be disable, prefer, require, verify-ca or verify-full, not \"verify\""
        );
        let error = DatabaseUrl::parse("host=h sslmode=on").err().unwrap();
        assert!(error.to_string().contains("sslmode must be"), "{error}");
    }

    #[test]
    fn verifying_modes_need_their_roots() {
        let error = DatabaseUrl::parse("postgres://u@h/d?sslmode=verify-full")
            .err()
            .unwrap();
        assert!(
            error
                .to_string()
                .contains("verify-full needs sslrootcert=PATH"),
            "{error}"
        );
        assert_eq!(
            parsed("postgres://u@h/d?sslmode=verify-ca&sslrootcert=system").root_certs,
            Some(RootCerts::System)
        );
        let error = parsed("postgres://u@h/d?sslmode=require&sslrootcert=/no/such/ca.pem")
            .tls()
            .err()
            .unwrap();
        assert!(
            error
                .to_string()
                .starts_with("sslrootcert /no/such/ca.pem cannot be read"),
            "{error}"
        );
    }

    #[test]
    fn the_shown_target_never_holds_the_password() {
        let cases = [
            (
                "postgres://u:hunter2@db.example.test:6432/d?sslmode=require",
                "postgres://u@db.example.test:6432/d?sslmode=require",
            ),
            (
                "postgres://u@127.0.0.1:1/d?password=hunter2",
                "postgres://u@127.0.0.1:1/d",
            ),
            (
                "postgresql://u@/d?host=/run/postgresql&password=hunter2",
                "postgres://u@/d?host=/run/postgresql:5432",
            ),
            (
                "host=db.example.test port=5433 user=u password='hun ter2' dbname=d",
                "postgres://u@db.example.test:5433/d",
            ),
            (
                "host=db.example.test user=u password=hunter2 dbname=d",
                "postgres://u@db.example.test:5432/d",
            ),
        ];
        for (url, expected) in cases {
            let url = parsed(url);
            assert_eq!(url.shown(), expected);
            let password = url.config().get_password().unwrap();
            assert!(password == b"hunter2" || password == b"hun ter2");
        }
    }

    #[test]
    fn other_parameters_pass_through_untouched() {
        let url = parsed(
            "postgres://u@h/d?application_name=x&sslmode=require&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
        );
        assert_eq!(url.root_certs, Some(RootCerts::File("/etc/ca.pem".into())));
        assert_eq!(url.config().get_application_name(), Some("x"));
        assert_eq!(
            url.config().get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );
        let pairs = parsed(r"host=h user=u application_name='it\'s' sslmode=disable");
        assert_eq!(pairs.config().get_application_name(), Some("it's"));
        let error = DatabaseUrl::parse("host=h user").err().unwrap();
        assert!(matches!(error, DatabaseUrlError::Unreadable(_)), "{error}");
        let error = DatabaseUrl::parse("mysql://u:hunter2@h/d").err().unwrap();
        assert_eq!(
            error.to_string(),
            "the database URL cannot be read: it is neither a postgres:// (or postgresql://) URL nor key=value pairs"
        );
        let error = DatabaseUrl::parse("postgres://u:hunter2@h:port/d?pasword=x")
            .err()
            .unwrap();
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let error = DatabaseUrl::parse("postgres://u@h/d?pasword=x")
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            "the database URL cannot be read: invalid connection string: unknown option `pasword`"
        );
    }
}
