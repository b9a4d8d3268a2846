//! TLS endpoints for broker tests: certificates made with the `openssl` CLI and Debian's
//! `stunnel4` terminating TLS in front of a plain TCP broker (RabbitMQ, the Kafka mock).
//! Each test starts its own stunnel on a free port and stops it on drop; the shared
//! RabbitMQ on 5672 is never reconfigured.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private CA, a server certificate it signed for 127.0.0.1/localhost, an expired one with
/// the same key, and a second CA that signed nothing here (the "wrong CA").
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub other_ca: PathBuf,
    pub cert: PathBuf,
    pub expired: PathBuf,
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI runs (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

fn self_signed_ca(dir: &Path, name: &str) {
    let (key, pem, subj) = (
        format!("{name}.key"),
        format!("{name}.pem"),
        format!("/CN={name}"),
    );
    let mut args = vec!["req", "-x509", "-nodes", "-days", "30", "-subj", &subj];
    args.extend(EC);
    args.extend(["-keyout", &key, "-out", &pem]);
    openssl(dir, &args);
}

/// `openssl ca` config that signs a CSR with explicit start and end dates (how the expired
/// certificate gets a validity window in the past).
const CA_CONF: &str = "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\n\
serial = serial\ndefault_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n";

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        self_signed_ca(d, "ca");
        self_signed_ca(d, "other-ca");
        let mut args = vec!["req", "-new", "-nodes", "-subj", "/CN=localhost"];
        args.extend(EC);
        args.extend(["-keyout", "server.key", "-out", "server.csr"]);
        openssl(d, &args);
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "30",
                "-extfile",
                "ext.cnf",
                "-out",
                "server.pem",
            ],
        );
        std::fs::write(d.join("ca.cnf"), CA_CONF).unwrap();
        std::fs::write(d.join("index.txt"), "").unwrap();
        std::fs::write(d.join("serial"), "1000\n").unwrap();
        openssl(
            d,
            &[
                "ca",
                "-batch",
                "-config",
                "ca.cnf",
                "-cert",
                "ca.pem",
                "-keyfile",
                "ca.key",
                "-in",
                "server.csr",
                "-out",
                "expired.pem",
                "-notext",
                "-extfile",
                "ext.cnf",
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200102000000Z",
            ],
        );
        Pki {
            ca: d.join("ca.pem"),
            other_ca: d.join("other-ca.pem"),
            cert: d.join("server.pem"),
            expired: d.join("expired.pem"),
            key: d.join("server.key"),
            dir,
        }
    }
}

/// A running `stunnel4` that accepts TLS on `port` and forwards plain TCP to `target`.
pub struct Stunnel {
    child: Child,
    pub port: u16,
}

impl Stunnel {
    /// Starts stunnel with `cert`/`key` on `port` (0: a free one) and waits until it accepts.
    pub fn start(pki: &Pki, cert: &Path, port: u16, target: u16) -> Stunnel {
        let port = if port == 0 {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port()
        } else {
            port
        };
        let conf = pki.dir.path().join(format!("stunnel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\ndebug = 4\n[broker]\naccept = 127.0.0.1:{port}\n\
                 connect = 127.0.0.1:{target}\ncert = {}\nkey = {}\n",
                cert.display(),
                pki.key.display()
            ),
        )
        .unwrap();
        let child = Command::new("stunnel4")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("stunnel4 runs (apt-get install stunnel4)");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "stunnel did not listen on {port} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Stunnel { child, port }
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
