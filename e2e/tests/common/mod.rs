//! Shared by the chart tests: the repository's Python venv, and skipping or failing without it.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e has a parent").to_path_buf()
}

/// `<repo>/.venv/bin/python` with the chart tools, or `None` (after printing why) when it is
/// missing outside CI. In CI (`CI=true`) a missing venv fails the test.
pub fn venv_python() -> Option<PathBuf> {
    let python = repo_root().join(".venv/bin/python");
    let ready = python.exists()
        && std::process::Command::new(&python)
            .args(["-c", "import helm_python, kubernetes_validate, pytest, yaml"])
            .status()
            .is_ok_and(|s| s.success());
    if ready {
        return Some(python);
    }
    let why = format!(
        "{} with helm-python-sdk, kubernetes-validate, PyYAML and pytest is missing; run scripts/install-test-deps.sh",
        python.display()
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("SKIPPED: {why}");
    None
}
