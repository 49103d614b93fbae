//! Consistency audits: restore a backup into a scratch folder, find its file
//! systems and check them read-only, boot it on an isolated network, run the
//! user's probe; and the compare mode (a crash-consistent copy beside a
//! clean-shutdown backup of the same instant).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FsFinding {
    /// "disk d0" or "disk d0 partition 2".
    pub location: String,
    pub offset: u64,
    pub bytes: u64,
    pub fs_type: Option<String>,
    pub checked: bool,
    pub clean: bool,
    /// ext: the journal holds writes that were never applied (a crash copy).
    pub needs_recovery: bool,
    /// ext: "clean" when the file system was unmounted cleanly.
    pub state: Option<String>,
    pub fsck_exit: Option<i32>,
    pub fsck_output: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeResult {
    pub script: PathBuf,
    pub exit_code: i32,
    pub output: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootResult {
    pub attempted: bool,
    pub booted: bool,
    pub seconds: f64,
    pub console_tail: String,
    pub reason: Option<String>,
}

/// What was found on a set of disk images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Examination {
    pub filesystems: Vec<FsFinding>,
    pub probe: Option<ProbeResult>,
}

impl Examination {
    /// Reasons this examination fails; empty = good.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.filesystems.iter().all(|f| !f.checked) {
            p.push("no file system that coldclone can check was found".into());
        }
        for f in &self.filesystems {
            if f.checked && !f.clean {
                p.push(format!(
                    "{}: {} check failed (exit {:?})",
                    f.location,
                    f.fs_type.as_deref().unwrap_or("?"),
                    f.fsck_exit
                ));
            }
            if f.needs_recovery {
                p.push(format!(
                    "{}: the journal needs replaying (not cleanly unmounted)",
                    f.location
                ));
            }
        }
        if let Some(pr) = &self.probe {
            if pr.exit_code != 0 {
                p.push(format!(
                    "probe {} exited {}: {}",
                    pr.script.display(),
                    pr.exit_code,
                    pr.output.trim()
                ));
            }
        }
        p
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditReport {
    pub vm: String,
    /// The audited backup (run id).
    pub backup: String,
    pub snapshot_ids: Vec<String>,
    pub backup_time: String,
    pub audited_at: f64,
    pub pass: bool,
    pub reasons: Vec<String>,
    pub examination: Examination,
    pub boot: BootResult,
}

fn run_capture(cmd: &mut Command) -> (Option<i32>, String) {
    match cmd.output() {
        Ok(o) => (
            o.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (None, format!("could not run {cmd:?}: {e}")),
    }
}

#[derive(Deserialize)]
struct SfdiskDump {
    partitiontable: SfdiskTable,
}
#[derive(Deserialize)]
struct SfdiskTable {
    #[serde(default)]
    sectorsize: Option<u64>,
    #[serde(default)]
    partitions: Vec<SfdiskPart>,
}
#[derive(Deserialize)]
struct SfdiskPart {
    start: u64,
    size: u64,
}

/// Copies `len` bytes at `offset` of `src` into a new sparse file.
fn extract(src: &Path, offset: u64, len: u64, dest: &Path) -> std::io::Result<()> {
    let mut input = std::fs::File::open(src)?;
    let mut out = std::fs::File::create(dest)?;
    input.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = input.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|b| *b == 0) {
            out.seek(SeekFrom::Current(n as i64))?;
        } else {
            out.write_all(&buf[..n])?;
        }
        left -= n as u64;
    }
    out.set_len(len)
}

/// Checks one file system image read-only.
fn check_one(image: &Path, location: String, offset: u64, bytes: u64) -> FsFinding {
    let (_, t) = run_capture(
        Command::new("blkid")
            .args(["-p", "-s", "TYPE", "-o", "value"])
            .arg(image),
    );
    let fs_type = Some(t.trim().to_string()).filter(|t| !t.is_empty() && !t.contains(' '));
    let mut f = FsFinding {
        location,
        offset,
        bytes,
        fs_type: fs_type.clone(),
        checked: false,
        clean: false,
        needs_recovery: false,
        state: None,
        fsck_exit: None,
        fsck_output: String::new(),
    };
    match fs_type.as_deref() {
        Some("ext2" | "ext3" | "ext4") => {
            let (_, dump) = run_capture(Command::new("dumpe2fs").arg("-h").arg(image));
            for l in dump.lines() {
                if let Some(v) = l.strip_prefix("Filesystem state:") {
                    f.state = Some(v.trim().to_string());
                }
                if l.starts_with("Filesystem features:") && l.contains("needs_recovery") {
                    f.needs_recovery = true;
                }
            }
            let (code, out) = run_capture(Command::new("e2fsck").arg("-fn").arg(image));
            f.checked = true;
            f.clean = code == Some(0);
            f.fsck_exit = code;
            f.fsck_output = out;
        }
        Some("xfs") => {
            let (code, out) = run_capture(Command::new("xfs_repair").args(["-n", "-f"]).arg(image));
            f.checked = true;
            f.clean = code == Some(0);
            // "ERROR: The filesystem has valuable metadata changes in a log which needs to be replayed."
            f.needs_recovery = out.contains("needs to be replayed");
            f.fsck_exit = code;
            f.fsck_output = out;
        }
        _ => {}
    }
    f
}

/// Finds every file system on a disk image (whole disk or partitions) and checks it.
pub fn check_disk(disk: &str, image: &Path, scratch: &Path) -> Vec<FsFinding> {
    let size = std::fs::metadata(image).map(|m| m.len()).unwrap_or(0);
    let (code, out) = run_capture(Command::new("sfdisk").arg("-J").arg(image));
    let table = (code == Some(0))
        .then(|| serde_json::from_str::<SfdiskDump>(&out).ok())
        .flatten();
    match table {
        Some(t) if !t.partitiontable.partitions.is_empty() => {
            let sector = t.partitiontable.sectorsize.unwrap_or(512);
            let mut out = Vec::new();
            for (i, p) in t.partitiontable.partitions.iter().enumerate() {
                let part = scratch.join(format!("{disk}-part{}.raw", i + 1));
                let location = format!("disk {disk} partition {}", i + 1);
                // The partition table is the backed-up guest's: an entry may lie past the
                // disk's end or overflow (start and size are the guest's numbers).
                let span = p.start.checked_mul(sector).zip(p.size.checked_mul(sector));
                let inside = span.filter(|(o, n)| o.checked_add(*n).is_some_and(|end| end <= size));
                let Some((offset, bytes)) = inside else {
                    out.push(FsFinding {
                        location,
                        offset: p.start.saturating_mul(sector),
                        bytes: p.size.saturating_mul(sector),
                        fs_type: None,
                        checked: false,
                        clean: false,
                        needs_recovery: false,
                        state: None,
                        fsck_exit: None,
                        fsck_output: format!(
                            "the partition table puts this partition (sectors {}+{} of {sector} bytes) outside the {size}-byte disk",
                            p.start, p.size
                        ),
                    });
                    continue;
                };
                match extract(image, offset, bytes, &part) {
                    Ok(()) => out.push(check_one(&part, location, offset, bytes)),
                    Err(e) => out.push(FsFinding {
                        location,
                        offset,
                        bytes,
                        fs_type: None,
                        checked: false,
                        clean: false,
                        needs_recovery: false,
                        state: None,
                        fsck_exit: None,
                        fsck_output: format!("could not extract the partition: {e}"),
                    }),
                }
                let _ = std::fs::remove_file(&part);
            }
            out
        }
        _ => vec![check_one(image, format!("disk {disk}"), 0, size)],
    }
}

/// Runs the user's probe over the images: it gets each disk as
/// COLDCLONE_AUDIT_DISK_<name> and all of them in COLDCLONE_AUDIT_DISKS.
pub fn run_probe(
    script: &Path,
    images: &BTreeMap<String, PathBuf>,
    console: Option<&Path>,
) -> ProbeResult {
    let mut cmd = Command::new(script);
    let all: Vec<String> = images
        .iter()
        .map(|(d, p)| format!("{d}={}", p.display()))
        .collect();
    cmd.env("COLDCLONE_AUDIT_DISKS", all.join(":"));
    for (d, p) in images {
        let var: String = d
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        cmd.env(format!("COLDCLONE_AUDIT_DISK_{var}"), p);
    }
    if let Some(c) = console {
        cmd.env("COLDCLONE_AUDIT_CONSOLE", c);
    }
    let (code, output) = run_capture(&mut cmd);
    ProbeResult {
        script: script.to_path_buf(),
        exit_code: code.unwrap_or(-1),
        output,
    }
}

pub fn examine(
    images: &BTreeMap<String, PathBuf>,
    scratch: &Path,
    probe: Option<&Path>,
) -> Examination {
    let mut filesystems = Vec::new();
    for (disk, image) in images {
        filesystems.extend(check_disk(disk, image, scratch));
    }
    Examination {
        filesystems,
        probe: probe.map(|p| run_probe(p, images, None)),
    }
}

pub fn audits_dir(state_dir: &Path, vm: &str) -> PathBuf {
    state_dir.join("audits").join(vm)
}

/// Keeps an audit's result beside the state, keyed by the backup it audited.
pub fn store(state_dir: &Path, report: &AuditReport) -> std::io::Result<PathBuf> {
    let dir = audits_dir(state_dir, &report.vm);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.json", report.backup));
    let tmp = path.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(report).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// The stored audit of a backup, if any.
pub fn load(state_dir: &Path, vm: &str, backup: &str) -> Option<AuditReport> {
    let text =
        std::fs::read_to_string(audits_dir(state_dir, vm).join(format!("{backup}.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_found_and_xfs_is_checked() {
        // check_disk runs sfdisk, blkid, dumpe2fs, e2fsck and xfs_repair.
        if !coldclone_testkit::require_tools(&[
            "sfdisk",
            "mkfs.xfs",
            "mkfs.ext4",
            "blkid",
            "dumpe2fs",
            "e2fsck",
            "xfs_repair",
        ]) {
            return;
        }
        let dir = std::env::temp_dir().join(format!("cc-audit-parts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.raw");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(400 << 20)
            .unwrap();
        // Two partitions: ext4 at 1 MiB (32 MiB), xfs after it (the rest).
        let mut sf = Command::new("sfdisk")
            .arg("-q")
            .arg(&img)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        sf.stdin
            .take()
            .unwrap()
            .write_all(b"label: dos\nstart=2048, size=65536, type=83\nstart=67584, type=83\n")
            .unwrap();
        assert!(sf.wait().unwrap().success());
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "offset=1048576"])
            .arg(&img)
            .arg("32M")
            .status()
            .unwrap();
        assert!(ok.success());
        // mkfs.xfs has no offset option: make it in a file and copy it in.
        let x = dir.join("x.raw");
        std::fs::File::create(&x)
            .unwrap()
            .set_len((400 << 20) - 67584 * 512)
            .unwrap();
        assert!(Command::new("mkfs.xfs")
            .args(["-q", "-f"])
            .arg(&x)
            .status()
            .unwrap()
            .success());
        let data = std::fs::read(&x).unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.seek(SeekFrom::Start(67584 * 512)).unwrap();
        f.write_all(&data).unwrap();
        drop(f);
        let found = check_disk("d0", &img, &dir);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].location, "disk d0 partition 1");
        assert_eq!(found[0].fs_type.as_deref(), Some("ext4"));
        assert!(found[0].checked && found[0].clean, "{:?}", found[0]);
        assert_eq!(found[1].fs_type.as_deref(), Some("xfs"));
        assert!(found[1].checked && found[1].clean, "{:?}", found[1]);
        assert!(
            !found[0].needs_recovery && !found[1].needs_recovery,
            "{found:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupted_ext4_image_fails_and_a_fresh_one_passes() {
        if !coldclone_testkit::require_tools(&["mkfs.ext4", "blkid", "dumpe2fs", "e2fsck"]) {
            return;
        }
        let dir = std::env::temp_dir().join(format!("cc-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("d0.raw");
        // With the tool present, a failing mkfs is a failure, not a skip.
        let made = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .arg("16M")
            .status()
            .expect("run mkfs.ext4");
        assert!(made.success(), "mkfs.ext4 failed");
        let mut images = BTreeMap::new();
        images.insert("d0".to_string(), img.clone());
        let good = examine(&images, &dir, None);
        assert!(good.problems().is_empty(), "{:?}", good.problems());
        // Overwrite the first block group's descriptors and inode table start.
        let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(&vec![0xa5u8; 64 << 10]).unwrap();
        drop(f);
        let bad = examine(&images, &dir, None);
        assert!(!bad.problems().is_empty(), "a corrupted image passed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Issue 12: the guest's partition table is not trusted. Entries past the disk's end
    /// (and one whose end overflows with 4 KiB sectors) are reported as unchecked and not
    /// clean; nothing reads outside the image and nothing panics.
    #[test]
    fn partitions_outside_the_disk_are_reported_not_read() {
        if !coldclone_testkit::require_tools(&["sfdisk"]) {
            return;
        }
        let dir = std::env::temp_dir().join(format!("cc-audit-bad-parts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.raw");
        // A DOS label written by hand: sfdisk itself refuses to write such entries.
        let mut mbr = vec![0u8; 512];
        let entries: [(u32, u32); 2] = [(2048, 0xFFFF_0000), (0xFFFF_FF00, 0xFFFF_FF00)];
        for (n, (start, len)) in entries.iter().enumerate() {
            let e = 446 + 16 * n;
            mbr[e + 4] = 0x83;
            mbr[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
            mbr[e + 12..e + 16].copy_from_slice(&len.to_le_bytes());
        }
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        let mut f = std::fs::File::create(&img).unwrap();
        f.write_all(&mbr).unwrap();
        f.set_len(8 << 20).unwrap();
        drop(f);
        let found = check_disk("xvda", &img, &dir);
        assert_eq!(found.len(), 2, "{found:?}");
        for f in &found {
            assert!(!f.checked && !f.clean, "{f:?}");
            assert!(f.fsck_output.contains("outside the"), "{f:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
