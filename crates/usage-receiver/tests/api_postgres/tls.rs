//! TLS to PostgreSQL as libpq's `sslmode` and `sslrootcert` say, against throwaway clusters
//! listening on 127.0.0.1: one with `ssl = on` and a certificate for `localhost` only,
//! signed by a certificate authority made here with `openssl`, and one without TLS.
//! What the server saw is read from `pg_stat_ssl`; what an operator sees on a refusal is
//! the error as the binary prints it (each cause once, no password).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use usage_receiver::ReceiverStore;
use usage_testkit::throwaway::{ClusterOptions, Durability, ServerTls, ThrowawayCluster};

/// A certificate authority and a server certificate it signed, in a temp dir.
struct Certificates {
    dir: tempfile::TempDir,
}

impl Certificates {
    /// A CA, and a certificate for `localhost` (its only name) signed by it; a second CA
    /// that signed nothing the server holds.
    fn make() -> Certificates {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("run openssl");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        for ca in ["ca", "other-ca"] {
            let subject = format!("/CN=usage-agent test {ca}");
            let (key, crt) = (format!("{ca}.key"), format!("{ca}.crt"));
            let mut args = vec!["req", "-x509", "-nodes", "-days", "2"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &crt, "-subj", &subject]);
            args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
            args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
            openssl(&args);
        }
        let mut args = vec!["req", "-new", "-nodes"];
        args.extend(ec);
        args.extend(["-keyout", "server.key", "-out", "server.csr"]);
        args.extend(["-subj", "/CN=localhost"]);
        openssl(&args);
        std::fs::write(
            dir.path().join("server.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ]);
        Certificates { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server_tls(&self) -> ServerTls {
        ServerTls {
            cert_chain_pem: std::fs::read(self.path("server.crt")).unwrap(),
            key_pem: std::fs::read(self.path("server.key")).unwrap(),
        }
    }
}

/// The certificates and the cluster with `ssl = on`, made once for the binary.
fn tls_cluster() -> &'static (Certificates, ThrowawayCluster) {
    static CLUSTER: OnceLock<(Certificates, ThrowawayCluster)> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let certificates = Certificates::make();
        let options = ClusterOptions {
            tcp: true,
            tls: Some(certificates.server_tls()),
        };
        let cluster = ThrowawayCluster::start_with(Durability::Fast, options)
            .expect("start a PostgreSQL cluster with TLS");
        (certificates, cluster)
    })
}

/// A cluster on 127.0.0.1 without TLS.
fn plain_tcp_cluster() -> &'static ThrowawayCluster {
    static CLUSTER: OnceLock<ThrowawayCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let options = ClusterOptions {
            tcp: true,
            tls: None,
        };
        ThrowawayCluster::start_with(Durability::Fast, options)
            .expect("start a PostgreSQL cluster on TCP")
    })
}

/// A fresh database of `cluster`: its name, and its URL over TCP to `host` with `query`.
fn database(cluster: &ThrowawayCluster, host: &str, query: &str) -> (String, String) {
    let url = cluster.new_database().unwrap();
    let name = url
        .split_once("@localhost/")
        .and_then(|(_, rest)| rest.split('?').next())
        .unwrap()
        .to_owned();
    let tcp = cluster.tcp_url(host, &name).unwrap();
    (name, format!("{tcp}?{query}"))
}

/// A store opened on `url` with a runtime of its own (kept with it), or the error as the
/// binary prints it.
fn open(url: &str) -> Result<(Arc<dyn ReceiverStore>, tokio::runtime::Runtime), String> {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        usage_receiver::open_postgres(&url, runtime.handle().clone())
            .map(|store| (store, runtime))
            .map_err(|error| usage_common::logging::error_chain(&error))
    })
    .join()
    .unwrap()
}

/// `(connections, of them encrypted)` of the receiver's connections to database `name`.
fn receiver_connections(cluster: &ThrowawayCluster, name: &str) -> (u32, u32) {
    let answer = cluster
        .psql(
            "postgres",
            &format!(
                "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a
                 JOIN pg_stat_ssl s USING (pid)
                 WHERE a.datname = '{name}' AND a.application_name = 'usage-agent receiver'"
            ),
        )
        .unwrap();
    let (all, encrypted) = answer.split_once('|').unwrap();
    (all.parse().unwrap(), encrypted.parse().unwrap())
}

fn root(path: &Path) -> String {
    format!("sslrootcert={}", path.display())
}

#[test]
fn sslmode_require_encrypts_every_connection_without_a_root_certificate() {
    let (certificates, cluster) = tls_cluster();
    // The server's certificate names localhost only: require does not check it.
    let (name, url) = database(cluster, "127.0.0.1", "sslmode=require");
    let (_store, _runtime) = open(&url).unwrap();
    let (all, encrypted) = receiver_connections(cluster, &name);
    assert!(
        all >= 1 && encrypted == all,
        "{all} connections, {encrypted} encrypted"
    );

    // With a root certificate, require checks the chain as verify-ca does (libpq's rule).
    let (_, url) = database(
        cluster,
        "127.0.0.1",
        &format!(
            "sslmode=require&{}",
            root(&certificates.path("other-ca.crt"))
        ),
    );
    let error = open(&url)
        .err()
        .expect("a certificate of another CA is refused");
    assert!(error.contains("UnknownIssuer"), "{error}");
}

#[test]
fn sslmode_verify_full_connects_to_the_name_the_certificate_holds() {
    let (certificates, cluster) = tls_cluster();
    let ca = root(&certificates.path("ca.crt"));
    let (name, url) = database(cluster, "localhost", &format!("sslmode=verify-full&{ca}"));
    let (_store, _runtime) = open(&url).unwrap();
    let (all, encrypted) = receiver_connections(cluster, &name);
    assert!(
        all >= 1 && encrypted == all,
        "{all} connections, {encrypted} encrypted"
    );
}

#[test]
fn sslmode_verify_full_refuses_a_host_name_the_certificate_does_not_hold() {
    let (certificates, cluster) = tls_cluster();
    let ca = root(&certificates.path("ca.crt"));
    let (name, url) = database(cluster, "127.0.0.1", &format!("sslmode=verify-full&{ca}"));
    let error = open(&url)
        .err()
        .expect("127.0.0.1 is not in the certificate");
    assert!(
        error.starts_with(&format!(
            "could not connect to the receiver database postgres://usage_agent@127.0.0.1:{}/{name}?sslmode=verify-full: ",
            cluster.port()
        )),
        "{error}"
    );
    assert!(
        error.contains("certificate not valid for name \"127.0.0.1\""),
        "{error}"
    );
    assert_eq!(error.matches("TLS handshake").count(), 1, "{error}");

    // verify-ca checks the chain only, so the same address is accepted.
    let (name, url) = database(cluster, "127.0.0.1", &format!("sslmode=verify-ca&{ca}"));
    let (_store, _runtime) = open(&url).unwrap();
    let (all, encrypted) = receiver_connections(cluster, &name);
    assert!(
        all >= 1 && encrypted == all,
        "{all} connections, {encrypted} encrypted"
    );

    // And neither accepts a certificate of another authority.
    let other = root(&certificates.path("other-ca.crt"));
    let (_, url) = database(cluster, "localhost", &format!("sslmode=verify-ca&{other}"));
    let error = open(&url).err().expect("another CA is refused");
    assert!(error.contains("UnknownIssuer"), "{error}");
}

#[test]
fn sslmode_prefer_the_default_encrypts_when_the_server_offers_it() {
    let (_, cluster) = tls_cluster();
    let (name, url) = database(cluster, "127.0.0.1", "application_name=x");
    let (_store, _runtime) = open(&url).unwrap();
    let (all, encrypted) = receiver_connections(cluster, &name);
    assert!(
        all >= 1 && encrypted == all,
        "{all} connections, {encrypted} encrypted"
    );

    // A server without TLS: prefer goes on in plain text, disable never asks.
    let plain = plain_tcp_cluster();
    for query in ["sslmode=prefer", "sslmode=disable"] {
        let (name, url) = database(plain, "127.0.0.1", query);
        let (_store, _runtime) = open(&url).unwrap();
        let (all, encrypted) = receiver_connections(plain, &name);
        assert!(
            all >= 1 && encrypted == 0,
            "{query}: {all} connections, {encrypted} encrypted"
        );
    }
}

#[test]
fn sslmode_require_against_a_server_without_tls_fails_clearly() {
    let plain = plain_tcp_cluster();
    let (_, url) = database(plain, "127.0.0.1", "sslmode=require");
    let error = open(&url).err().expect("no TLS to be had");
    assert!(error.contains("server does not support TLS"), "{error}");
}

#[test]
fn a_missing_root_certificate_file_is_named() {
    let (_, cluster) = tls_cluster();
    let (_, url) = database(
        cluster,
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    );
    let error = open(&url).err().expect("no roots to check against");
    assert!(
        error.contains("sslrootcert /nonexistent/ca.pem cannot be read as PEM certificates"),
        "{error}"
    );
}

#[test]
fn an_unknown_sslmode_is_a_usage_error_naming_the_parameter() {
    let output = Command::new(crate::bin())
        .args(["--listen", "127.0.0.1:0", "--database-url"])
        .arg("postgres://u:hunter2@127.0.0.1:1/d?sslmode=verify")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "error: --database-url (or DATABASE_URL): the database URL's sslmode must be disable, prefer, require, verify-ca or verify-full, not \"verify\""
    );

    let output = Command::new(crate::bin())
        .args(["--listen", "127.0.0.1:0"])
        .env(
            "DATABASE_URL",
            "postgres://u:hunter2@h/d?sslmode=verify-full",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("sslmode verify-full needs sslrootcert=PATH")
            && !stderr.contains("hunter2"),
        "{stderr}"
    );
}

#[test]
fn a_database_that_cannot_be_reached_is_said_once_without_the_password() {
    let output = Command::new(crate::bin())
        .args(["--listen", "127.0.0.1:0", "--database-url"])
        .arg("postgres://u@127.0.0.1:1/d?password=hunter2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert_eq!(
        stderr.lines().last().unwrap_or_default(),
        "error: opening the receiver's PostgreSQL database: could not connect to the receiver database postgres://u@127.0.0.1:1/d: error connecting to server: Connection refused (os error 111)",
        "{stderr}"
    );
}
