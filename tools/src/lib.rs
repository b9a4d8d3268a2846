//! `spoolctl`: inspect and repair a spoolrelay spool, offline or through a running daemon.
//!
//! This crate is the whole tool; the `spoolctl` binary is a one-line `main` in the
//! `spoolrelay` package (`src/bin/spoolctl.rs`), so that `cargo install --path .` installs
//! it beside the daemon.
//!
//! Offline, every command opens the spool the way the daemon does (taking its lock), so it
//! refuses to touch a spool a running daemon holds. `verify` opens it without repairing.
//! With `--url`, the commands that make sense on a live spool go through the daemon's
//! admin API instead ([`remote`]), and print the same output.

#![warn(missing_docs)]

mod client_tls;
mod inspect;
mod output;
mod remote;
mod repair;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use spool::{Spool, SpoolOptions};

#[derive(Parser)]
#[command(
    name = "spoolctl",
    version,
    about = "Inspect and repair spoolrelay spools"
)]
struct Cli {
    /// The spool directory.
    #[arg(
        long,
        global = true,
        default_value = "./spool",
        env = "SPOOLRELAY_SPOOL"
    )]
    spool: PathBuf,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    /// Talk to a running daemon's admin API (e.g. http://127.0.0.1:8000) instead of
    /// opening the spool directory.
    #[arg(long, global = true, value_name = "URL", env = "SPOOLRELAY_URL")]
    url: Option<String>,
    /// Bearer token for the admin API (the daemon's --admin-token).
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        env = "SPOOLRELAY_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// HTTPS options for --url (`--ca`, `--client-cert`, `--client-key`).
    #[command(flatten)]
    tls: client_tls::ClientTls,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-queue counts, bytes, ages, due now, attempts; dead-letter and quarantine totals.
    Summary,
    /// Messages of one queue, in id order.
    Ls {
        queue: String,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Only messages due now.
        #[arg(long)]
        due: bool,
        /// Only messages that failed at least once.
        #[arg(long)]
        failed: bool,
    },
    /// One message: metadata, attempts, last error, next due; payload with --data.
    Show {
        id: u64,
        #[arg(long)]
        data: bool,
    },
    /// Check every record (checksum, decoding, key); exit 0 only when clean.
    Verify {
        /// Move damaged records to quarantine.
        #[arg(long)]
        repair: bool,
    },
    /// The dead-letter area.
    #[command(subcommand, name = "dead-letter")]
    DeadLetter(DeadLetterCommand),
    /// Records set aside as unreadable.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// Make a queue's messages due now, or move them to another queue (--to).
    Requeue {
        #[arg(long)]
        queue: String,
        #[arg(long)]
        to: Option<String>,
    },
    /// Delete every waiting message of a queue.
    Purge {
        #[arg(long)]
        queue: String,
        /// Required: purging cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// Write every queued and dead-lettered message to an NDJSON file (payloads in
    /// base64), fsynced. Damaged records are listed and make the exit code 1 unless
    /// --skip-damaged.
    Export {
        file: PathBuf,
        /// Export what can be read and exit 0 even if some records are damaged (they are
        /// still listed; `spoolctl verify` shows them too).
        #[arg(long)]
        skip_damaged: bool,
    },
    /// Add messages from an export file, keeping their ids; idempotent.
    Import { file: PathBuf },
    /// Stop delivering a queue (needs --url): ingest keeps accepting, nothing is sent. The
    /// suspension is kept in the spool: it outlasts a restart of the daemon.
    Suspend {
        queue: String,
        /// End it by itself after this long, e.g. 1h or 30m [default: until resumed].
        #[arg(long = "for", value_name = "DURATION")]
        lasting: Option<String>,
        /// Why, shown by `summary`.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deliver a suspended queue again (needs --url).
    Resume { queue: String },
    /// Reload the daemon's policy file (needs --url); same as sending it SIGHUP. A policy
    /// that fails to load is refused with its error (file:line) and the old one keeps
    /// running (exit code 2).
    Reload,
    /// Drain the daemon (needs --url): ingest and /readyz answer 503, delivery goes on, and
    /// the daemon exits once nothing deliverable remains or the deadline passed. Waits for
    /// that and exits with the daemon's code: 0 drained, 3 messages left (suspended, due
    /// after the deadline, dead letters), 4 deadline passed; 2 on an error.
    Drain {
        /// How long delivery may go on, e.g. 90s or 5m [default: 5m].
        #[arg(long, value_name = "DURATION")]
        deadline: Option<String>,
        /// Return once the drain started instead of waiting for its end.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    Ls {
        #[arg(long)]
        queue: Option<String>,
    },
    Requeue {
        #[arg(long)]
        queue: Option<String>,
        #[arg(long)]
        id: Option<u64>,
    },
}

#[derive(Subcommand)]
enum QuarantineCommand {
    Ls,
    /// One file per record: raw bytes, plus a .json with its key and reason.
    Export {
        dir: PathBuf,
    },
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Summary => "summary",
            Command::Ls { .. } => "ls",
            Command::Show { .. } => "show",
            Command::Verify { .. } => "verify",
            Command::DeadLetter(_) => "dead-letter",
            Command::Quarantine(_) => "quarantine",
            Command::Requeue { .. } => "requeue",
            Command::Purge { .. } => "purge",
            Command::Export { .. } => "export",
            Command::Import { .. } => "import",
            Command::Suspend { .. } => "suspend",
            Command::Resume { .. } => "resume",
            Command::Drain { .. } => "drain",
            Command::Reload => "reload",
        }
    }

    fn changes_spool(&self) -> bool {
        matches!(
            self,
            Command::DeadLetter(DeadLetterCommand::Requeue { .. })
                | Command::Requeue { .. }
                | Command::Purge { .. }
                | Command::Import { .. }
        )
    }
}

/// Runs `spoolctl` with the process's arguments: exit 0 on success, 2 on an error (printed
/// to stderr), or the command's own code (e.g. `verify` and `drain`).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("spoolctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Opens the spool offline. `repair` quarantines damaged records (and records a loss the
/// ledger found); without it a lost-writes spool still opens for reading, so an operator
/// can look and export before deciding, but commands that change it refuse until
/// `verify --repair` recorded the loss.
fn open(
    cli: &Cli,
    repair: bool,
    accept_lost_writes: bool,
) -> anyhow::Result<(Spool, spool::RecoveryReport)> {
    let options = SpoolOptions {
        repair,
        accept_lost_writes,
        ..SpoolOptions::default()
    };
    // Opening reads and checks every record (the recovery scan): show that it is working
    // on a large spool. indicatif draws nothing when stderr is not a terminal.
    let spinner = indicatif::ProgressBar::new_spinner()
        .with_message(format!("reading and checking {}", cli.spool.display()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let opened = Spool::open(&cli.spool, options)
        .with_context(|| format!("opening spool {}", cli.spool.display()));
    spinner.finish_and_clear();
    if let Ok((_, report)) = &opened {
        if let (Some(lost), false) = (&report.lost_writes, repair) {
            eprintln!(
                "spoolctl: WARNING: {lost}; run `spoolctl --spool {} verify --repair` to record it",
                cli.spool.display()
            );
        }
    }
    opened
}

/// The commands a running daemon serves; the rest need the spool directory itself.
fn run_online(cli: Cli, url: &str) -> anyhow::Result<ExitCode> {
    let out = output::Output { json: cli.json };
    let remote = remote::Remote::new(url, cli.token.clone(), &cli.tls)?;
    match cli.command {
        Command::Summary => remote.summary(&out),
        Command::Ls {
            queue,
            limit,
            due,
            failed,
        } => remote.ls(&out, &queue, limit, due, failed),
        Command::Show { id, data } => remote.show(&out, id, data),
        Command::DeadLetter(DeadLetterCommand::Ls { queue }) => {
            remote.dead_letter_ls(&out, queue.as_deref())
        }
        Command::DeadLetter(DeadLetterCommand::Requeue { queue, id }) => {
            remote.dead_letter_requeue(&out, queue.as_deref(), id)
        }
        Command::Requeue { queue, to } => remote.requeue(&out, &queue, to.as_deref()),
        Command::Suspend {
            queue,
            lasting,
            reason,
        } => {
            let body = serde_json::json!({ "for": lasting, "reason": reason });
            remote.suspension(&out, &queue, "suspend", body)
        }
        Command::Resume { queue } => {
            remote.suspension(&out, &queue, "resume", serde_json::json!({}))
        }
        Command::Drain { deadline, no_wait } => remote.drain(&out, deadline.as_deref(), !no_wait),
        Command::Reload => remote.reload(&out),
        other => anyhow::bail!(
            "`{}` works on the spool directory only: stop the daemon and run it without --url",
            other.name()
        ),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(url) = cli.url.clone() {
        return run_online(cli, &url);
    }
    if matches!(
        cli.command,
        Command::Suspend { .. } | Command::Resume { .. } | Command::Drain { .. } | Command::Reload
    ) {
        anyhow::bail!(
            "`{}` changes a running daemon: pass --url http://HOST:PORT (its listen address)",
            cli.command.name()
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = output::Output { json: cli.json };
    if let Command::Verify { repair } = &cli.command {
        let (spool, mut report) = open(&cli, *repair, true)?;
        // The open scan reads chunk heads and bitmaps, not the records in a chunk.
        let in_chunks = spool
            .check_chunked_records(*repair)
            .context("reading the records in the spool's chunks")?;
        if *repair && !in_chunks.is_empty() {
            rt.block_on(spool.sync())
                .context("making the quarantine moves durable")?;
        }
        report.damaged.extend(in_chunks);
        return Ok(repair::verify(&out, &report, *repair));
    }
    // Read-only commands leave damaged records where they are; only commands that change
    // the spool also quarantine what they find, as the daemon would.
    let changes = cli.command.changes_spool();
    let (spool, _) = open(&cli, changes, !changes)?;
    match cli.command {
        Command::Summary => inspect::summary(&out, &spool),
        Command::Ls {
            queue,
            limit,
            due,
            failed,
        } => inspect::ls(&out, &spool, &queue, limit, due, failed),
        Command::Show { id, data } => inspect::show(&out, &spool, id, data),
        Command::Verify { .. } => unreachable!("handled above"),
        Command::DeadLetter(DeadLetterCommand::Ls { queue }) => {
            repair::dead_letter_ls(&out, &spool, queue.as_deref())
        }
        Command::DeadLetter(DeadLetterCommand::Requeue { queue, id }) => {
            let n = rt
                .block_on(spool.requeue_dead_letters(queue.as_deref(), id.map(spool::MessageId)))?;
            out.done("requeued from dead-letter", n)
        }
        Command::Quarantine(QuarantineCommand::Ls) => repair::quarantine_ls(&out, &spool),
        Command::Quarantine(QuarantineCommand::Export { dir }) => {
            repair::quarantine_export(&out, &spool, &dir)
        }
        Command::Requeue { queue, to } => {
            let n = match &to {
                Some(to) => rt.block_on(spool.rebind(&queue, to))?,
                None => rt.block_on(spool.expedite(&queue))?,
            };
            out.done(
                if to.is_some() {
                    "moved"
                } else {
                    "made due now"
                },
                n,
            )
        }
        Command::Purge { queue, yes } => {
            anyhow::ensure!(
                yes,
                "purge deletes every waiting message of {queue:?}: add --yes to confirm"
            );
            let n = rt.block_on(spool.purge(&queue))?;
            eprintln!(
                "spoolctl: purged {n} messages from queue {queue:?} of {}",
                cli.spool.display()
            );
            out.done("purged", n)
        }
        Command::Export { file, skip_damaged } => {
            transfer::export(&out, &spool, &file, skip_damaged)
        }
        Command::Import { file } => transfer::import(&out, &rt, &spool, &file),
        Command::Suspend { .. }
        | Command::Resume { .. }
        | Command::Drain { .. }
        | Command::Reload => {
            unreachable!("refused above")
        }
    }
}
