//! What a backup reads: a disk image, as a random-access source with an optional map of
//! where data may be.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// A disk to back up.
pub trait DiskSource: Send + Sync {
    /// Size in bytes.
    fn len(&self) -> u64;
    /// True when the disk has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Read at `offset`; may return fewer bytes than asked (0 = end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Ranges that may hold data; `None` = unknown (read everything). Bytes outside the
    /// ranges are zero: they are stored as holes, at no cost.
    fn data_ranges(&self) -> io::Result<Option<Vec<Range<u64>>>>;
}

/// A file or block device. `data_ranges` comes from `SEEK_DATA`/`SEEK_HOLE` for files.
pub struct FileSource {
    file: File,
    path: PathBuf,
    len: u64,
    is_block_device: bool,
}

impl FileSource {
    pub fn open(path: &Path) -> io::Result<FileSource> {
        use std::os::unix::fs::FileTypeExt;
        let file = File::open(path)?;
        let md = file.metadata()?;
        let is_block_device = md.file_type().is_block_device();
        let len = if is_block_device {
            use std::io::Seek;
            let mut f = &file;
            f.seek(io::SeekFrom::End(0))?
        } else {
            md.len()
        };
        // SAFETY: plain advisory syscall on an fd we own.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
        Ok(FileSource {
            file,
            path: path.to_path_buf(),
            len,
            is_block_device,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn lseek(fd: i32, off: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek has no memory effects.
    let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Data ranges of a regular file via SEEK_DATA/SEEK_HOLE; `None` when unsupported.
pub fn seek_data_ranges(file: &File, len: u64) -> io::Result<Option<Vec<Range<u64>>>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let start = match lseek(fd, pos, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) => return Err(e),
        };
        if start >= len {
            break;
        }
        let end = lseek(fd, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        out.push(start..end);
        pos = end;
    }
    Ok(Some(out))
}

impl DiskSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn data_ranges(&self) -> io::Result<Option<Vec<Range<u64>>>> {
        if self.is_block_device {
            return Ok(None);
        }
        seek_data_ranges(&self.file, self.len)
    }
}

/// An in-memory disk, for tests and small images.
pub struct MemSource(pub Vec<u8>);

impl DiskSource for MemSource {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let off = offset.min(self.0.len() as u64) as usize;
        let n = buf.len().min(self.0.len() - off);
        buf[..n].copy_from_slice(&self.0[off..off + n]);
        Ok(n)
    }
    fn data_ranges(&self) -> io::Result<Option<Vec<Range<u64>>>> {
        Ok(None)
    }
}

/// Read exactly `buf.len()` bytes at `offset` or fail.
pub(crate) fn read_full(src: &dyn DiskSource, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match src.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the source ended at {} before its announced size",
                        offset + done as u64
                    ),
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Progress reports (the CLI draws bars with them).
pub trait Progress: Sync {
    fn set_total(&self, bytes: u64);
    fn advance(&self, bytes: u64);
}

/// Progress that goes nowhere.
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_total(&self, _: u64) {}
    fn advance(&self, _: u64) {}
}
