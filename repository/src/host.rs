//! Who a host is in a repository shared by many hosts.
//!
//! A host name does not tell hosts apart: hypervisors cloned from one image share
//! `/etc/hostname` and `/etc/machine-id`, and a fleet may reuse names. Each host state
//! folder therefore gets a random 128-bit id once (`STATE/host-uuid`, a UUID v4), made the
//! first time coldclone needs it and never changed afterwards. Snapshots carry it
//! (`host_uuid`): a host's chains of backups (parent, sequence numbers, retention) are the
//! snapshots with its uuid, whatever their host name; locks carry it so that an operator
//! can tell two holders of one name apart. Snapshots written before host uuids existed are
//! matched by host name, as they always were.
//!
//! A state folder copied with a host image carries its uuid along, like `/etc/machine-id`:
//! remove `STATE/host-uuid` on the copy before its first backup (docs/operations.md).

use crate::crypto::random_bytes;
use crate::error::{RepoError, Result};
use std::io::{Read, Write};
use std::path::Path;

/// The file in the state folder that holds the host's uuid.
pub const HOST_UUID_FILE: &str = "host-uuid";

/// A host as the repository knows it: its name (shown) and its uuid (what identifies it;
/// empty when unknown, then the name alone is used, as before uuids existed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostIdentity {
    pub name: String,
    pub uuid: String,
}

impl HostIdentity {
    /// This host's name and no uuid: the behaviour of versions without host uuids.
    pub fn by_name_only() -> HostIdentity {
        HostIdentity {
            name: crate::util::hostname(),
            uuid: String::new(),
        }
    }

    /// This host's name and the uuid kept in `state_dir` (made there when missing). Two
    /// processes making it at once agree on one: the file appears whole or not at all
    /// (a hard link of a complete temporary file), and the loser reads the winner's.
    pub fn load_or_create(state_dir: &Path) -> Result<HostIdentity> {
        let path = state_dir.join(HOST_UUID_FILE);
        let uuid = match read_uuid_file(&path)? {
            Some(u) => u,
            None => create_uuid_file(state_dir, &path)?,
        };
        Ok(HostIdentity {
            name: crate::util::hostname(),
            uuid,
        })
    }

    /// The first 8 characters of the uuid, for messages; the name alone when none.
    pub fn describe(&self) -> String {
        match self.uuid.get(..8) {
            Some(u) => format!("{} ({u})", self.name),
            None => self.name.clone(),
        }
    }
}

/// Whether `s` is a UUID in its 36-character lower-case text form.
pub fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
        })
}

fn new_uuid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let h = crate::util::to_hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The uuid in `path`, None when there is no such file. Anything but a regular file
/// holding one uuid is refused, named, with what to do.
fn read_uuid_file(path: &Path) -> Result<Option<String>> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RepoError::io(path.display().to_string(), e)),
    };
    let refuse = |what: String| {
        RepoError::InvalidArgument(format!(
            "{} {what}: it must hold this host's uuid and nothing else; if this host never made a backup with it, remove it and a new one is made (its backups then start new chains)",
            path.display()
        ))
    };
    if !meta.file_type().is_file() {
        return Err(refuse("is not a regular file".into()));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(256).read_to_string(&mut text))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => refuse("is not text".into()),
            _ => RepoError::io(path.display().to_string(), e),
        })?;
    let t = text.trim();
    if !is_uuid(t) {
        let shown: String = t.chars().take(40).collect();
        return Err(refuse(format!("holds {shown:?}, not a uuid")));
    }
    Ok(Some(t.to_string()))
}

fn create_uuid_file(state_dir: &Path, path: &Path) -> Result<String> {
    let io = |e| RepoError::io(state_dir.display().to_string(), e);
    std::fs::create_dir_all(state_dir).map_err(io)?;
    let uuid = new_uuid();
    // Random: threads of one process race too.
    let tmp = state_dir.join(format!(
        ".{HOST_UUID_FILE}.{}.tmp",
        crate::crypto::random_id().get(..16).unwrap_or_default()
    ));
    let res = (|| {
        let mut f = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(format!("{uuid}\n").as_bytes())?;
        f.sync_all()?;
        // Fails with AlreadyExists when another process made it first.
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match res {
        Ok(()) => {
            if let Ok(d) = std::fs::File::open(state_dir) {
                let _ = d.sync_all();
            }
            tracing::info!("this host's uuid is {uuid} (made in {})", path.display());
            Ok(uuid)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_uuid_file(path)?.ok_or_else(|| RepoError::io(path.display().to_string(), e))
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!(
            "cc-host-{tag}-{}-{}",
            std::process::id(),
            crate::crypto::random_id()
        ));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn made_once_and_kept() {
        let d = tmp("once");
        let a = HostIdentity::load_or_create(&d).unwrap();
        assert!(is_uuid(&a.uuid), "{a:?}");
        assert_eq!(&a.uuid[14..15], "4");
        let b = HostIdentity::load_or_create(&d).unwrap();
        assert_eq!(a, b);
        // Another state folder of the same host name: another uuid.
        let d2 = tmp("once2");
        let c = HostIdentity::load_or_create(&d2).unwrap();
        assert_eq!(c.name, a.name);
        assert_ne!(c.uuid, a.uuid);
        let _ = std::fs::remove_dir_all(d);
        let _ = std::fs::remove_dir_all(d2);
    }

    #[test]
    fn racing_makers_agree() {
        let d = tmp("race");
        let ids: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| HostIdentity::load_or_create(&d).unwrap().uuid))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ids.iter().all(|u| u == &ids[0]), "{ids:?}");
        let left: Vec<_> = std::fs::read_dir(&d).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "temporary files left: {left:?}");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_bad_file_is_refused_and_named() {
        let d = tmp("bad");
        let p = d.join(HOST_UUID_FILE);
        for bad in [
            "not-a-uuid\n",
            "",
            "0123456789abcdef0123456789abcdef",
            "01234567-89AB-4def-8123-456789abcdef",
        ] {
            std::fs::write(&p, bad).unwrap();
            let e = HostIdentity::load_or_create(&d).unwrap_err().to_string();
            assert!(e.contains("host-uuid") && e.contains("remove it"), "{e}");
            // Never replaced behind the operator's back.
            assert_eq!(std::fs::read_to_string(&p).unwrap(), bad);
        }
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &p).unwrap();
        let e = HostIdentity::load_or_create(&d).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let _ = std::fs::remove_dir_all(d);
    }
}
