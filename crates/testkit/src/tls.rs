//! Certificates made by the test: a throwaway certificate authority, a server certificate
//! for loopback (and any names given) and a client certificate, as PEM files in a temp dir.
//! Nothing leaves the test; every run makes new keys.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A certificate authority with one server and one client certificate it signed.
#[derive(Debug)]
pub struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    /// Makes the authority, a server certificate for `localhost`, `127.0.0.1` and `names`,
    /// and a client certificate.
    pub fn new(names: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir for the certificates");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "orderflow test CA");
        let ca_key = KeyPair::generate().expect("a CA key");
        let ca = ca_params.self_signed(&ca_key).expect("the CA certificate");

        let mut hosts = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        hosts.extend(names.iter().map(|n| (*n).to_owned()));
        let issue = |sans: Vec<String>, common_name: &str| {
            let mut params = CertificateParams::new(sans).expect("certificate parameters");
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            let key = KeyPair::generate().expect("a key");
            let cert = params
                .signed_by(&key, &ca, &ca_key)
                .expect("a signed certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server, server_key) = issue(hosts, "orderflow test server");
        let (client, client_key) = issue(vec!["orderflow-test-client".to_owned()], "client");
        for (file, pem) in [
            ("ca.pem", ca.pem()),
            ("server.pem", server),
            ("server-key.pem", server_key),
            ("client.pem", client),
            ("client-key.pem", client_key),
        ] {
            std::fs::write(dir.path().join(file), pem).expect("writing a PEM file");
        }
        Self { dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The authority's certificate.
    pub fn ca(&self) -> PathBuf {
        self.file("ca.pem")
    }

    /// The server certificate and key.
    pub fn server(&self) -> (PathBuf, PathBuf) {
        (self.file("server.pem"), self.file("server-key.pem"))
    }

    /// The client certificate and key.
    pub fn client(&self) -> (PathBuf, PathBuf) {
        (self.file("client.pem"), self.file("client-key.pem"))
    }

    /// The directory holding every file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A nats-server `tls {}` block for its client port with these certificates; with
    /// `verify`, clients must present a certificate the authority signed.
    pub fn nats_tls_block(&self, verify: bool) -> String {
        let (cert, key) = self.server();
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: {verify}\n}}",
            cert.display(),
            key.display(),
            self.ca().display()
        )
    }
}
