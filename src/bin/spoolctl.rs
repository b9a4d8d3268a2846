//! The `spoolctl` binary. Its code is the `spoolctl` library under `tools/`; the entry point
//! lives in this package so that `cargo install --path .` installs both binaries.

fn main() -> std::process::ExitCode {
    spoolctl::main()
}
