//! A repository in a local folder. Atomic writes: temporary file in the same folder,
//! fsync, rename, fsync of the folder.

use super::{Backend, ObjectInfo};
use crate::error::{RepoError, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub(crate) const TMP_PREFIX: &str = ".tmp-";

pub(crate) struct LocalBackend {
    root: PathBuf,
}

impl LocalBackend {
    pub(crate) fn new(root: &Path) -> LocalBackend {
        LocalBackend {
            root: root.to_path_buf(),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn disp(&self, key: &str) -> String {
        self.path(key).display().to_string()
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Backend for LocalBackend {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn create(&self) -> Result<()> {
        fs::create_dir_all(&self.root).map_err(|e| RepoError::io(self.describe(), e))?;
        for d in ["data", "index", "snapshots", "keys", "locks"] {
            fs::create_dir_all(self.root.join(d)).map_err(|e| RepoError::io(self.disp(d), e))?;
        }
        Ok(())
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let dest = self.path(key);
        let dir = dest.parent().unwrap_or(&self.root).to_path_buf();
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(|e| RepoError::io(dir.display().to_string(), e))?;
        }
        let tmp = dir.join(format!("{TMP_PREFIX}{}", crate::crypto::random_id()));
        let res = (|| -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &dest)?;
            sync_dir(&dir)
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(RepoError::io(dest.display().to_string(), e));
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        fs::read(self.path(key)).map_err(|e| RepoError::io(self.disp(key), e))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let f = File::open(self.path(key)).map_err(|e| RepoError::io(self.disp(key), e))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                RepoError::corrupt(
                    self.disp(key),
                    format!("shorter than expected: no {len} bytes at offset {offset}"),
                )
            } else {
                RepoError::io(self.disp(key), e)
            }
        })?;
        Ok(buf)
    }

    fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        let mut stack = vec![dir.trim_end_matches('/').to_string()];
        while let Some(d) = stack.pop() {
            let rd = match fs::read_dir(self.path(&d)) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(RepoError::io(self.disp(&d), e)),
            };
            for ent in rd {
                let ent = ent.map_err(|e| RepoError::io(self.disp(&d), e))?;
                let name = ent.file_name().to_string_lossy().into_owned();
                if name.starts_with(TMP_PREFIX) {
                    continue;
                }
                let key = format!("{d}/{name}");
                let md = match ent.metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(RepoError::io(self.disp(&key), e)),
                };
                if md.is_dir() {
                    stack.push(key);
                } else {
                    let mtime = md
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs() as i64)
                        .unwrap_or(0);
                    out.push(ObjectInfo {
                        key,
                        size: md.len(),
                        mtime,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        match fs::remove_file(self.path(key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RepoError::io(self.disp(key), e)),
        }
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.path(key).exists())
    }

    fn cleanup_tmp(&self, min_age_secs: i64) {
        remove_stale_tmp(&self.root, min_age_secs);
    }
}

/// Remove leftover temporary files older than `min_age_secs` (from killed writers).
pub(crate) fn remove_stale_tmp(root: &Path, min_age_secs: i64) -> usize {
    let now = crate::util::now_unix();
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for ent in rd.flatten() {
            let Ok(md) = ent.metadata() else { continue };
            if md.is_dir() {
                stack.push(ent.path());
            } else if ent.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let age = md
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| now - d.as_secs() as i64)
                    .unwrap_or(0);
                if age >= min_age_secs && fs::remove_file(ent.path()).is_ok() {
                    n += 1;
                }
            }
        }
    }
    n
}
