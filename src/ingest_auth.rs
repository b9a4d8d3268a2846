//! Bearer tokens for ingest and `/metrics`.
//!
//! Without any ingest token, ingest is open as before (loopback by default). With one,
//! every ingest request needs `Authorization: Bearer <token>`: a missing or unknown token
//! is `401`, a known token writing to a queue it was not granted is `403`, both as JSON
//! through [`ApiError`], and nothing of a refused request is spooled. The queue check is a
//! pure function ([`Access::check`]); the handlers call it with every queue a request would
//! write before they enqueue anything, so a batch or injection is refused whole.
//!
//! Grants: `--ingest-token T` may write every queue. `--ingest-tokens-file` lists one token
//! per line followed by what it may write: `TOKEN queue-a prefix-* *` (an exact name, a
//! prefix ending in `*`, or `*` for everything); `#` starts a comment. Tokens are compared
//! as SHA-256 digests in constant time ([`subtle`]), and every configured token is compared
//! on each request, so timing says nothing about which token nearly matched, nor how long
//! the tokens are.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use clap::Args;
use subtle::ConstantTimeEq;

use crate::http_error::ApiError;

/// The ingest and metrics token flags.
#[derive(Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthArgs {
    /// Bearer token that may write to every queue (repeatable). With any ingest token set,
    /// ingest without a valid one gets 401.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "SPOOLRELAY_INGEST_TOKEN",
        hide_env_values = true
    )]
    pub ingest_token: Vec<String>,
    /// File of `TOKEN queue prefix-* ...` lines: which queues each token may write
    /// (`*` alone: all). See docs/connecting.md.
    #[arg(long, value_name = "FILE")]
    pub ingest_tokens_file: Option<PathBuf>,
    /// Bearer token GET /metrics requires [default: /metrics is open].
    #[arg(
        long,
        value_name = "TOKEN",
        env = "SPOOLRELAY_METRICS_TOKEN",
        hide_env_values = true
    )]
    pub metrics_token: Option<String>,
}

/// Why the tokens file cannot be used; names the file and line.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// The file could not be read.
    #[error("--ingest-tokens-file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `TOKEN GRANT...`.
    #[error("--ingest-tokens-file {}, line {line}: {why}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: &'static str,
    },
}

/// What one token may write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    /// Exactly this queue.
    Queue(String),
    /// Every queue starting with this (`prefix*` in the file; `*` is the empty prefix).
    Prefix(String),
}

impl Grant {
    fn parse(word: &str) -> Grant {
        match word.strip_suffix('*') {
            Some(prefix) => Grant::Prefix(prefix.to_owned()),
            None => Grant::Queue(word.to_owned()),
        }
    }

    fn allows(&self, queue: &str) -> bool {
        match self {
            Grant::Queue(q) => q == queue,
            Grant::Prefix(p) => queue.starts_with(p.as_str()),
        }
    }
}

/// One token (the SHA-256 of its bytes) and what it may write.
pub type TokenEntry = (Vec<u8>, Arc<[Grant]>);

/// The configured tokens and their grants. Empty means ingest is open.
#[derive(Clone, Debug, Default)]
pub struct Tokens(Arc<Vec<TokenEntry>>);

impl Tokens {
    /// The tokens of the flags: each `--ingest-token` may write everything, the file's
    /// lines what they say. Empty tokens are ignored (an empty env var means "none").
    pub fn from_args(args: &AuthArgs) -> Result<Tokens, TokensError> {
        let mut all: Vec<TokenEntry> = args
            .ingest_token
            .iter()
            .filter(|t| !t.is_empty())
            .map(|t| {
                (
                    digest(t.as_bytes()),
                    Arc::from([Grant::Prefix(String::new())]),
                )
            })
            .collect();
        if let Some(path) = &args.ingest_tokens_file {
            let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
                path: path.clone(),
                source,
            })?;
            all.extend(parse_tokens_file(path, &text)?);
        }
        Ok(Tokens(Arc::new(all)))
    }

    /// Whether any token is configured (ingest is then closed to everyone else).
    pub fn is_enabled(&self) -> bool {
        !self.0.is_empty()
    }

    /// What a request with these headers may write: [`Access::Open`] without configured
    /// tokens, `None` without a known bearer token.
    fn access(&self, headers: &axum::http::HeaderMap) -> Option<Access> {
        if !self.is_enabled() {
            return Some(Access::Open);
        }
        let grants = self.lookup(bearer(headers)?)?;
        Some(Access::Granted(grants.clone()))
    }

    /// The grants of `given`, comparing it with every token in constant time.
    fn lookup(&self, given: &[u8]) -> Option<&Arc<[Grant]>> {
        let given = digest(given);
        let mut found = None;
        for (token, grants) in self.0.iter() {
            if bool::from(token.as_slice().ct_eq(&given)) && found.is_none() {
                found = Some(grants);
            }
        }
        found
    }
}

/// SHA-256 of a token: equal-length values to compare, whatever the tokens' lengths.
fn digest(token: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token)
        .as_ref()
        .to_vec()
}

/// Parses the tokens file: `TOKEN GRANT...` per line, `#` comments, blank lines skipped.
pub fn parse_tokens_file(path: &Path, text: &str) -> Result<Vec<TokenEntry>, TokensError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let token = words.next().unwrap_or_default();
        let grants: Vec<Grant> = words.map(Grant::parse).collect();
        if grants.is_empty() {
            return Err(TokensError::Line {
                path: path.to_owned(),
                line: n + 1,
                why: "a token needs at least one queue, `prefix*` or `*` after it",
            });
        }
        out.push((digest(token.as_bytes()), grants.into()));
    }
    Ok(out)
}

/// What the request's token may write; the handlers ask it for every queue they spool to.
#[derive(Clone, Debug)]
pub enum Access {
    /// No ingest token configured: everything is allowed.
    Open,
    /// The grants of the request's token (shared with the token table: no copy per request).
    Granted(Arc<[Grant]>),
}

impl Access {
    /// `403` unless every queue in `queues` is allowed; names the first one that is not.
    pub fn check<'a>(&self, queues: impl IntoIterator<Item = &'a str>) -> Result<(), ApiError> {
        let Access::Granted(grants) = self else {
            return Ok(());
        };
        match queues
            .into_iter()
            .find(|q| !grants.iter().any(|g| g.allows(q)))
        {
            None => Ok(()),
            Some(queue) => Err(ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "this ingest token may not write to queue {queue:?}; nothing was accepted: \
                     use a token granted that queue (--ingest-tokens-file)"
                ),
            )),
        }
    }
}

/// The bearer token of a request, if it sent one.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get(header::AUTHORIZATION)?
        .as_bytes()
        .strip_prefix(b"Bearer ")
}

fn unauthorized(what: &str, flag: &str) -> Response {
    let mut resp = ApiError(
        StatusCode::UNAUTHORIZED,
        format!(
            "{what}: missing or unknown bearer token; send `Authorization: Bearer <token>` \
             with a token from {flag}; nothing was accepted"
        ),
    )
    .into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

/// Middleware on the ingest routes: 401 without a known token; otherwise the token's
/// [`Access`] goes to the handler in the request's extensions. [`refuse_early`] has
/// usually looked the token up already and left its `Access` there: it is not looked up
/// twice (each lookup hashes the token and compares it with every configured one).
pub async fn authenticate(State(tokens): State<Tokens>, mut req: Request, next: Next) -> Response {
    if req.extensions().get::<Access>().is_none() {
        let access = match tokens.access(req.headers()) {
            Some(access) => access,
            None => return unauthorized("ingest", "--ingest-token / --ingest-tokens-file"),
        };
        req.extensions_mut().insert(access);
    }
    next.run(req).await
}

/// Whether `req` is an ingest request (the routes of [`crate::ingest::router`] that write).
fn is_ingest(req: &Request) -> bool {
    let path = req.uri().path();
    req.method() == axum::http::Method::POST
        && (path.starts_with("/api/v1/queues/") || path == "/api/inject/v1")
}

/// Middleware on the whole app, outside the body reader: the 401 of [`authenticate`] for an
/// ingest request, answered before its body is read. [`authenticate`] stays on the routes
/// themselves; this answers sooner, and leaves the [`Access`] it found for [`authenticate`].
pub async fn refuse_early(State(tokens): State<Tokens>, mut req: Request, next: Next) -> Response {
    if tokens.is_enabled() && is_ingest(&req) {
        let Some(access) = tokens.access(req.headers()) else {
            let mut resp = unauthorized("ingest", "--ingest-token / --ingest-tokens-file");
            // The unread body stays on the socket: close rather than parse it as a request.
            resp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return resp;
        };
        req.extensions_mut().insert(access);
    }
    next.run(req).await
}

/// The `--metrics-token`, kept as its SHA-256: hashed once, not on every scrape.
#[derive(Clone)]
pub struct MetricsToken(Arc<[u8]>);

impl MetricsToken {
    /// The token `/metrics` will require.
    pub fn new(token: &str) -> MetricsToken {
        MetricsToken(digest(token.as_bytes()).into())
    }
}

/// Middleware on `/metrics` when `--metrics-token` is set: 401 without it.
pub async fn require_metrics_token(
    State(token): State<MetricsToken>,
    req: Request,
    next: Next,
) -> Response {
    match bearer(req.headers()) {
        Some(given) if bool::from(digest(given).ct_eq(&token.0)) => next.run(req).await,
        _ => unauthorized("/metrics", "--metrics-token"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(file: &str, token: &str) -> Option<Access> {
        let parsed = parse_tokens_file(Path::new("tokens"), file).unwrap();
        Tokens(Arc::new(parsed))
            .lookup(token.as_bytes())
            .map(|g| Access::Granted(g.clone()))
    }

    #[test]
    fn grants_by_name_prefix_and_star() {
        let file = "# comment\n\nt1 orders tenant-a-*  # trailing\nt2 *\n";
        let t1 = access(file, "t1").unwrap();
        assert!(t1.check(["orders"]).is_ok());
        assert!(t1.check(["tenant-a-x", "tenant-a-"]).is_ok());
        assert_eq!(t1.check(["orders2"]).unwrap_err().0, StatusCode::FORBIDDEN);
        assert!(t1.check(["tenant-a-x", "tenant-b"]).is_err());
        assert!(access(file, "t2").unwrap().check(["anything"]).is_ok());
        assert!(access(file, "t3").is_none());
        assert!(access(file, "t").is_none());
        assert!(access(file, "").is_none());
        assert!(Access::Open.check(["x"]).is_ok());
    }

    #[test]
    fn a_token_without_grants_names_its_line() {
        let err = parse_tokens_file(Path::new("f"), "ok q\nlonely\n").unwrap_err();
        assert!(err.to_string().contains("f, line 2"), "{err}");
    }

    /// The ingest routes' shape: `authenticate` on the route, `refuse_early` outside.
    fn app(tokens: &Tokens, early: bool) -> axum::Router {
        let show = |axum::Extension(access): axum::Extension<Access>| async move {
            match access {
                Access::Open => "open".to_string(),
                Access::Granted(grants) => format!("granted {}", grants.len()),
            }
        };
        let app = axum::Router::new()
            .route("/api/v1/queues/orders", axum::routing::post(show))
            .route_layer(axum::middleware::from_fn_with_state(
                tokens.clone(),
                authenticate,
            ));
        match early {
            true => app.layer(axum::middleware::from_fn_with_state(
                tokens.clone(),
                refuse_early,
            )),
            false => app,
        }
    }

    fn post(token: Option<&str>) -> Request {
        let mut req = axum::http::Request::post("/api/v1/queues/orders");
        if let Some(token) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        req.body(axum::body::Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn the_token_is_looked_up_once_per_request() {
        use tower_service::Service;
        let parsed = parse_tokens_file(Path::new("tokens"), "t1 orders\n").unwrap();
        let tokens = Tokens(Arc::new(parsed));
        for early in [true, false] {
            let ok = app(&tokens, early).call(post(Some("t1"))).await.unwrap();
            assert_eq!(ok.status(), StatusCode::OK, "early: {early}");
            let no = app(&tokens, early).call(post(None)).await.unwrap();
            assert_eq!(no.status(), StatusCode::UNAUTHORIZED, "early: {early}");
        }
        // What `refuse_early` found is taken as is: `authenticate` does not look again.
        let mut found = post(None);
        found.extensions_mut().insert(Access::Open);
        let resp = app(&tokens, false).call(found).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
}
