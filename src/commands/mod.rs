//! One module per CLI verb, over the library.

pub mod audit;
pub mod backup;
pub mod check;
pub mod doctor;
pub mod files;
pub mod forget;
pub mod init;
pub mod prune;
pub mod recover;
pub mod restore;
pub mod restore_instant;
pub mod restore_journal;
pub mod restore_vm;
pub mod restore_xapi;
pub mod restore_xl;
pub mod serve;
pub mod snapshots;

use crate::config::Config;
use anyhow::{bail, Context, Result};
use coldclone_repository::{HostIdentity, Location, Repository};
use std::path::Path;

/// The repository password: from `repository.password_file`, else $COLDCLONE_PASSWORD.
/// Never from the command line, where other users could read it.
pub fn password(cfg: &Config) -> Result<String> {
    if let Some(f) = &cfg.repository.password_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the repository password file {}", f.display()))?;
        let pw = text.trim_end_matches(['\n', '\r']).to_string();
        if pw.is_empty() {
            bail!("the repository password file {} is empty", f.display());
        }
        return Ok(pw);
    }
    match coldclone_backends::secrets::var("COLDCLONE_PASSWORD") {
        Some(p) if !p.is_empty() => Ok(p),
        _ => bail!(
            "no repository password: set repository.password_file in the config, or the COLDCLONE_PASSWORD environment variable"
        ),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct S3Credentials {
    access_key: String,
    secret_key: String,
}

/// Parses an S3 credentials file. The error names the line and what is wrong, never the
/// text of the line: toml's own message quotes it, and that line may be the secret key.
fn parse_s3_credentials(text: &str) -> std::result::Result<S3Credentials, String> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let line = e.span().map(|s| {
            let upto = &text.as_bytes()[..s.start.min(text.len())];
            upto.iter().filter(|b| **b == b'\n').count() + 1
        });
        let what = without_quoted_values(e.message().lines().next().unwrap_or("not valid TOML"));
        match line {
            Some(l) => format!("line {l}: {what}"),
            None => what.to_string(),
        }
    })
}

/// serde quotes a value it did not expect between backticks (`invalid type: integer
/// `12345``): keep the field names and punctuation toml names, drop anything else.
fn without_quoted_values(message: &str) -> String {
    let mut out = String::new();
    for (i, part) in message.split('`').enumerate() {
        let quoted = i % 2 == 1;
        let harmless = ["access_key", "secret_key"].contains(&part)
            || (part.chars().count() == 1 && !part.chars().all(char::is_alphanumeric));
        match (quoted, harmless) {
            (false, _) => out.push_str(part),
            (true, true) => out.push_str(&format!("`{part}`")),
            (true, false) => out.push_str("(value not shown)"),
        }
    }
    out
}

/// The repository's location: a folder, or S3 with credentials from a file or the environment.
pub fn location(cfg: &Config) -> Result<Location> {
    let r = &cfg.repository;
    let (Some(endpoint), Some(bucket)) = (&r.s3_endpoint, &r.s3_bucket) else {
        return Ok(Location::Local(cfg.repository_path()));
    };
    let (access_key, secret_key) = match &r.s3_credentials_file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the S3 credentials file {}", f.display()))?;
            let c = parse_s3_credentials(&text).map_err(|detail| {
                anyhow::anyhow!(
                    "the S3 credentials file {} must hold access_key = \"...\" and secret_key = \"...\" ({detail})",
                    f.display()
                )
            })?;
            (c.access_key, c.secret_key)
        }
        None => match (
            std::env::var("AWS_ACCESS_KEY_ID"),
            coldclone_backends::secrets::var("AWS_SECRET_ACCESS_KEY"),
        ) {
            (Ok(a), Some(s)) => (a, s),
            _ => bail!(
                "no S3 credentials: set repository.s3_credentials_file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ),
        },
    };
    Ok(Location::S3 {
        endpoint: endpoint.clone(),
        bucket: bucket.clone(),
        prefix: r.s3_prefix.clone().unwrap_or_else(|| "coldclone".into()),
        region: r.s3_region.clone().unwrap_or_else(|| "us-east-1".into()),
        access_key,
        secret_key,
    })
}

pub fn open_repository(cfg: &Config) -> Result<Repository> {
    let loc = location(cfg)?;
    let pw = password(cfg)?;
    let mut repo = Repository::open(&loc, &pw)
        .with_context(|| format!("cannot open the repository at {loc}"))?;
    // Commands that only read (snapshots, restore) also run where the state folder cannot
    // be written; their locks then name the host only. `backup` insists (host_identity).
    match host_identity(cfg) {
        Ok(h) => repo.set_host(h),
        Err(e) => tracing::warn!("{e:#}; this process's locks name its host name only"),
    }
    Ok(repo)
}

/// This host in the repository: its name and the uuid kept in its state folder
/// (`STATE/host-uuid`, made once), which tells it apart from hosts of the same name.
pub fn host_identity(cfg: &Config) -> Result<HostIdentity> {
    let mut h = HostIdentity::load_or_create(&cfg.state_dir).with_context(|| {
        format!(
            "cannot read or make this host's uuid in the state folder {}",
            cfg.state_dir.display()
        )
    })?;
    h.name = host_name();
    Ok(h)
}

/// Fails unless a file can be created in `dir`: better now than after the clone ran.
pub fn probe_writable(dir: &Path) -> Result<()> {
    let probe = dir.join(format!(".coldclone-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"x")
        .and_then(|_| std::fs::remove_file(&probe))
        .with_context(|| format!("the repository folder {} is not writable", dir.display()))
}

pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::parse_s3_credentials;

    /// A malformed credentials file is named by line and fault; no error shows the secret.
    #[test]
    fn s3_credentials_errors_never_show_the_secret() {
        let secret = "Zq9sEcReT7777";
        for text in [
            format!("access_key = \"AK\"\nsecret_key = {secret}\n"),
            format!("access_key = \"AK\"\nsecret_key = \"{secret}\" trailing\n"),
            "access_key = \"AK\"\nsecret_key = 7777123456\n".to_string(),
            format!("access_key = \"AK\"\nsecret = \"{secret}\"\n"),
            format!("access_key = \"AK\"\nsecret_key = \"{secret}\"\nsecret_key = \"{secret}\"\n"),
            format!("{secret}\n"),
        ] {
            let e = match parse_s3_credentials(&text) {
                Ok(_) => panic!("accepted {text:?}"),
                Err(e) => e,
            };
            assert!(!e.contains(secret) && !e.contains("7777123456"), "{e}");
            assert!(e.starts_with("line "), "names the line: {e}");
        }
        assert!(parse_s3_credentials("access_key = \"a\"\nsecret_key = \"b\"\n").is_ok());
    }
}
