//! The `hawser-operator` binary.

use std::process::ExitCode;

use clap::Parser;
use hawser_operator::config::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    // kube, the AWS and the GCP clients all use rustls; pick its ring backend once, up front.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    hawser_operator::telemetry::init(cli.log_format);
    if let Some(Command::Audit { output }) = cli.command {
        return match hawser_operator::run::audit(cli, output).await {
            Ok(false) => ExitCode::SUCCESS,
            Ok(true) => ExitCode::from(1),
            Err(e) => {
                tracing::error!(error = %hawser_operator::telemetry::causes(&e), "audit failed");
                ExitCode::from(2)
            }
        };
    }
    if let Some(Command::Plan { file, services, namespace, delete, output }) = cli.command.clone() {
        let request = hawser_operator::run::PlanRequest { file, services, namespace, delete, output };
        return match hawser_operator::run::plan(cli, request).await {
            Ok(false) => ExitCode::SUCCESS,
            Ok(true) => ExitCode::from(1),
            Err(e) => {
                tracing::error!(error = %hawser_operator::telemetry::causes(&e), "plan failed");
                ExitCode::from(2)
            }
        };
    }
    match hawser_operator::run::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %hawser_operator::telemetry::causes(&e), "hawser-operator failed");
            ExitCode::FAILURE
        }
    }
}
