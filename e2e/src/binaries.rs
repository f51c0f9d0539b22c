//! Finding (and, from tests, building) the real binaries the local backend runs.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context as _, bail};

/// The binaries the local backend runs as child processes.
pub const BINARIES: [&str; 2] = ["hawser-operator", "hawser-dataplane"];

/// The directory holding the workspace's binaries: `HAWSER_E2E_BIN_DIR`, else the directory of
/// the running executable (`target/debug` for the sandbox, `target/debug/deps` → `target/debug`
/// for a test).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("HAWSER_E2E_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe.parent().context("executable without a directory")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Path of binary `name`, which must exist.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "{} not found; build it first with the tests' build: cargo test --workspace --all-features --no-run",
            path.display()
        );
    }
    Ok(path)
}

/// Variables cargo sets for a crate's build and tests (besides `CARGO_PKG_*` and
/// `CARGO_BIN_EXE_*`), which a cargo started from a test must not inherit.
const CRATE_VARIABLES: &[&str] = &[
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
    "OUT_DIR",
];

/// Builds the operator and dataplane binaries once per test process, with the cargo that runs
/// the tests, into the same target directory (cargo releases its build lock before running
/// tests). Integration tests cannot use `CARGO_BIN_EXE_*` of other packages.
///
/// Under `cargo test --workspace --all-features` (which turns on this crate's
/// `workspace-test-build` feature) the build is that same command with `--no-run`: cargo finds
/// it done, and the binaries stay the very ones the other packages' tests run. Any other build
/// would resolve features differently, rebuild, and overwrite them with another variant.
pub fn build_once() -> anyhow::Result<()> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if std::env::var_os("HAWSER_E2E_BIN_DIR").is_some() {
                return Ok(());
            }
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            if cfg!(feature = "workspace-test-build") {
                cmd.args(["test", "--workspace", "--all-features", "--no-run", "--quiet"]);
            } else {
                cmd.args(["build", "--quiet"]);
                for b in BINARIES {
                    cmd.args(["-p", b]);
                }
            }
            if !cfg!(debug_assertions) {
                cmd.arg("--release");
            }
            // Cargo gives a test the variables it sets for crates (CARGO_MANIFEST_DIR, …); a
            // nested cargo that saw them would rebuild every crate whose build script watches
            // one (ring watches CARGO_MANIFEST_DIR), and with it half the workspace.
            for (key, _) in std::env::vars_os() {
                let k = key.to_string_lossy();
                if CRATE_VARIABLES.iter().any(|v| k == *v)
                    || k.starts_with("CARGO_PKG_")
                    || k.starts_with("CARGO_BIN_EXE_")
                {
                    cmd.env_remove(&key);
                }
            }
            let out = cmd.current_dir(env!("CARGO_MANIFEST_DIR")).output().map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!("cargo build failed: {}", String::from_utf8_lossy(&out.stderr)));
            }
            Ok(())
        })
        .clone()
        .map_err(anyhow::Error::msg)
}
