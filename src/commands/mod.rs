//! One module per CLI verb, over the library.

pub mod audit;
pub mod backup;
pub mod check;
pub mod doctor;
pub mod forget;
pub mod init;
pub mod prune;
pub mod recover;
pub mod restore;
pub mod snapshots;

use crate::config::Config;
use anyhow::{bail, Context, Result};
use coldclone_repository::{Location, Repository};
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
    match std::env::var("COLDCLONE_PASSWORD") {
        Ok(p) if !p.is_empty() => Ok(p),
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
            let c: S3Credentials = toml::from_str(&text).with_context(|| {
                format!(
                    "the S3 credentials file {} must hold access_key = \"...\" and secret_key = \"...\"",
                    f.display()
                )
            })?;
            (c.access_key, c.secret_key)
        }
        None => match (std::env::var("AWS_ACCESS_KEY_ID"), std::env::var("AWS_SECRET_ACCESS_KEY")) {
            (Ok(a), Ok(s)) => (a, s),
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
    Repository::open(&loc, &pw).with_context(|| format!("cannot open the repository at {loc}"))
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
