//! Child processes that die with this process, however it ends.
//!
//! The harness's long-lived children (operator, dataplanes) join one process group, led by a
//! small reaper: `sh` blocked reading a pipe whose only write end this process holds. When this
//! process exits, normally or by SIGKILL, the kernel closes that end; the reaper reads EOF and
//! kills its whole group. This needs no `unsafe` (unlike `PR_SET_PDEATHSIG` in `pre_exec`, which
//! also fires when the spawning *thread* ends), and it keeps Ctrl-C, which the terminal sends to
//! its foreground group, away from the children: the harness stops them itself, in order.

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};

use anyhow::Context as _;

struct Reaper {
    pgid: i32,
    // Never dropped (a static): the pipe's write end closes only when the process ends.
    _child: Mutex<Child>,
}

fn reaper() -> anyhow::Result<&'static Reaper> {
    static REAPER: OnceLock<Result<Reaper, String>> = OnceLock::new();
    REAPER
        .get_or_init(|| {
            let child = Command::new("sh")
                .args(["-c", "read -r _; kill -KILL 0"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .map_err(|e| format!("starting the reaper (sh): {e}"))?;
            let pgid = i32::try_from(child.id()).map_err(|e| e.to_string())?;
            Ok(Reaper { pgid, _child: Mutex::new(child) })
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Puts the process `cmd` will start into the reaper's group, so that it is killed when this
/// process ends.
pub fn adopt(cmd: &mut Command) -> anyhow::Result<()> {
    let pgid = reaper().context("child processes could not be tied to this one")?.pgid;
    cmd.process_group(pgid);
    Ok(())
}
