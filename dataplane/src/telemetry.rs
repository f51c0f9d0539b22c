//! Logs and the fatal error, in the same style as the operator's: text for people (colours only
//! on a terminal) or JSON lines in-cluster, on stderr; a fatal error is one line, each cause once.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; `RUST_LOG` overrides the default `info` level.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `what failed: why: the root cause`, skipping a cause whose text an earlier message already
/// carries (kube's errors print their cause themselves).
pub fn causes(error: &anyhow::Error) -> String {
    error.chain().map(ToString::to_string).fold(String::new(), |said, next| {
        if said.contains(&next) {
            said
        } else if said.is_empty() {
            next
        } else {
            format!("{said}: {next}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_a_message_is_not_repeated() {
        let io = std::io::Error::other("connection refused");
        let error = anyhow::Error::new(io).context("watching Services: connection refused").context("agent");
        assert_eq!(causes(&error), "agent: watching Services: connection refused");
    }
}
