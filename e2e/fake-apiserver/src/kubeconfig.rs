//! The kubeconfig clients use to reach the server.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

/// Name used for the cluster, user and context entries.
pub const CONTEXT: &str = "hawser-fake";

/// A kubeconfig document (JSON, which every kubeconfig reader accepts as YAML).
pub fn document(server_url: &str, ca_pem: Option<&str>, token: &str) -> Value {
    let mut cluster = json!({"server": server_url});
    if let Some(pem) = ca_pem {
        cluster["certificate-authority-data"] = json!(STANDARD.encode(pem));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT, "cluster": cluster}],
        "users": [{"name": CONTEXT, "user": {"token": token}}],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": CONTEXT, "namespace": "default"}}],
        "current-context": CONTEXT,
        "preferences": {},
    })
}

/// Writes the kubeconfig to `path`, readable by the owner only since it holds the token.
pub fn write(path: &Path, doc: &Value) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(doc).map_err(std::io::Error::other)?;
    std::fs::write(path, text)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}
