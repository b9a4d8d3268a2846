//! How `kumo.amqp.build_client` reaches a broker: the URL, TLS trust and client identity,
//! heartbeat and connect timeout.
//!
//! TLS goes through OpenSSL (lapin's `openssl` feature), the same library librdkafka uses,
//! so the relay carries one TLS stack. OpenSSL's default verify paths are always trusted
//! (the system roots, or `SSL_CERT_FILE` / `SSL_CERT_DIR` when set); `tls.ca_file` adds a
//! private CA on top. The broker's hostname (or IP) from the URL is verified.

use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::ConnectionProperties;
use mlua::{Table, Value};

use super::amqp::err;

/// Everything `build_client` needs to open its connection.
pub(crate) struct ConnectOptions {
    pub(crate) url: String,
    pub(crate) confirm: bool,
    tls: OwnedTLSConfig,
    heartbeat: Option<u16>,
    connect_timeout: Option<Duration>,
}

impl ConnectOptions {
    /// The URL with its password replaced, for error messages and logs.
    pub(crate) fn shown_url(&self) -> String {
        redact(&self.url)
    }
}

/// Parses `'amqp[s]://…'` or `{ url=, confirm=, tls = { ca_file=, cert_file=, key_file= },
/// heartbeat=, connect_timeout= }`. Unknown keys are errors: a misspelt `ca_flie` would
/// otherwise silently fall back to the system roots.
pub(crate) fn parse(arg: &Value) -> mlua::Result<ConnectOptions> {
    let t = match arg {
        Value::String(s) => return Ok(plain(s.to_str()?.to_string())),
        Value::Table(t) => t,
        other => {
            return Err(err(
                "build_client",
                format!(
                    "expected a url string or {{url=, confirm=, tls=, heartbeat=, connect_timeout=}}, got {}",
                    crate::host::describe(other)
                ),
            ))
        }
    };
    check_keys(
        t,
        &["url", "confirm", "tls", "heartbeat", "connect_timeout"],
        "",
    )?;
    let url = t
        .get::<Option<String>>("url")?
        .ok_or_else(|| err("build_client", "'url' is required"))?;
    let tls = match t.get::<Option<Table>>("tls")? {
        Some(tls) if is_amqps(&url) => parse_tls(&tls)?,
        Some(_) => {
            return Err(err(
                "build_client",
                format!("'tls' options need an amqps:// url, got {}", redact(&url)),
            ))
        }
        None => OwnedTLSConfig::default(),
    };
    let connect_timeout = match t.get::<Value>("connect_timeout")? {
        Value::Nil => None,
        v => Some(
            crate::queue_config::parse_duration(&v)
                .map_err(|e| err("build_client", format!("'connect_timeout': {e}")))?,
        ),
    };
    Ok(ConnectOptions {
        url,
        confirm: t.get::<Option<bool>>("confirm")?.unwrap_or(true),
        tls,
        heartbeat: t.get::<Option<u16>>("heartbeat")?,
        connect_timeout,
    })
}

fn plain(url: String) -> ConnectOptions {
    ConnectOptions {
        url,
        confirm: true,
        tls: OwnedTLSConfig::default(),
        heartbeat: None,
        connect_timeout: None,
    }
}

fn is_amqps(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("amqps://"))
}

fn check_keys(t: &Table, allowed: &[&str], prefix: &str) -> mlua::Result<()> {
    for pair in t.pairs::<String, Value>() {
        let (k, _) = pair?;
        if !allowed.contains(&k.as_str()) {
            return Err(err(
                "build_client",
                format!("unknown field '{prefix}{k}' (expected one of {allowed:?})"),
            ));
        }
    }
    Ok(())
}

/// `tls = { ca_file, cert_file, key_file }`: PEM files, read now so a wrong path fails here
/// with its name rather than later as a handshake error.
fn parse_tls(t: &Table) -> mlua::Result<OwnedTLSConfig> {
    check_keys(t, &["ca_file", "cert_file", "key_file"], "tls.")?;
    let read = |key: &str| -> mlua::Result<Option<Vec<u8>>> {
        let Some(path) = t.get::<Option<String>>(key)? else {
            return Ok(None);
        };
        std::fs::read(&path).map(Some).map_err(|e| {
            err(
                "build_client",
                format!("cannot read tls.{key} '{path}': {e}"),
            )
        })
    };
    let cert_chain = read("ca_file")?
        .map(|b| String::from_utf8(b).map_err(|_| err("build_client", "tls.ca_file is not PEM")))
        .transpose()?;
    let identity = match (read("cert_file")?, read("key_file")?) {
        (Some(pem), Some(key)) => Some(OwnedIdentity::PKCS8 { pem, key }),
        (None, None) => None,
        _ => {
            return Err(err(
                "build_client",
                "tls.cert_file and tls.key_file go together: give both or neither",
            ))
        }
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// Opens the connection. `connect_timeout` bounds all of it (TCP, TLS and AMQP handshakes),
/// not only the TCP connect that lapin's own `connection_timeout` covers.
pub(crate) async fn connect(o: &ConnectOptions) -> Result<lapin::Connection, String> {
    let mut uri: AMQPUri = o.url.parse().map_err(|e| format!("bad url: {e}"))?;
    if let Some(h) = o.heartbeat {
        uri.query.heartbeat = Some(h);
    }
    if let Some(d) = o.connect_timeout {
        uri.query.connection_timeout = Some(d.as_millis().try_into().unwrap_or(u64::MAX));
    }
    let runtime = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
    let fut = lapin::Connection::connect_uri_with_config(
        uri,
        ConnectionProperties::default(),
        o.tls.clone(),
        runtime,
    );
    let res = match o.connect_timeout {
        Some(d) => tokio::time::timeout(d, fut)
            .await
            .map_err(|_| format!("no connection within {}", humantime::format_duration(d)))?,
        None => fut.await,
    };
    res.map_err(|e| e.to_string())
}

/// `amqps://user:secret@host/` -> `amqps://user:***@host/`.
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(redact("amqps://u:p@h:5671/%2f"), "amqps://u:***@h:5671/%2f");
        assert_eq!(redact("amqp://h/%2f"), "amqp://h/%2f");
        assert_eq!(redact("amqp://u@h/"), "amqp://u@h/");
    }
}
