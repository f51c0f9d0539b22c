//! The Helm chart's tests (charts/hawser/tests, pytest): render with the Helm v4 Go SDK for the
//! defaults and each provider, lint, schema, kubernetes-validate, security policy, README.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

#[test]
fn chart_tests_pass() {
    let Some(python) = common::venv_python() else { return };
    let root = common::repo_root();
    let out = Command::new(python)
        .args(["-m", "pytest", "charts/hawser/tests", "-q", "-p", "no:cacheprovider"])
        .current_dir(&root)
        .output()
        .expect("pytest runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chart tests failed:\n{stdout}\n{stderr}");
    let summary = stdout.lines().rev().find(|l| l.contains(" passed")).unwrap_or_default();
    let passed: u32 = summary.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(passed >= 50, "expected the whole chart suite to run, got: {summary}");
    println!("chart tests: {summary}");
}
