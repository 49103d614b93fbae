//! A read-only NBD server (the fixed-newstyle protocol of
//! github.com/NetworkBlockDevice/nbd doc/proto.md) over a unix socket: what
//! `coldclone serve` offers so that any NBD client (qemu-img, qemu-nbd, QEMU's own
//! `nbd` block driver, libguestfs, nbd-client) reads a snapshot straight from the
//! repository. Our own, small server rather than nbdkit: it is a few hundred lines
//! of framing over a reader the repository already has, with no C plugin to build and
//! ship, and the protocol subset a read-only export needs is small (options LIST, INFO,
//! GO, EXPORT_NAME, ABORT; commands READ, DISC, FLUSH; everything else refused).
//! The peer is untrusted: every length is bounded before anything is allocated.

use std::io::{self, Read, Write};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_FIXED_NEWSTYLE: u32 = 1;
const CLIENT_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_READ_ONLY: u16 = 2;
const TFLAG_SEND_FLUSH: u16 = 4;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOTSUP: u32 = 95;

/// An option's data or a request's payload beyond this is refused (the protocol's
/// own suggested maximum for a request is 32 MiB).
const MAX_OPTION: u32 = 4096;
const MAX_REQUEST: u32 = 32 << 20;

/// What the server exports.
pub trait Export: Sync {
    fn name(&self) -> &str;
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; an error becomes EIO for the client.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// How one client's connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// NBD_CMD_DISC, or ABORT during the handshake.
    Disconnected,
    /// The client closed the socket.
    Closed,
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn option_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m)
}

/// The size the export is announced with: the snapshot's, rounded up to whole 512-byte
/// sectors, whose tail reads as zeros. QEMU's NBD client (7.2) waits forever for the
/// last partial sector of an export whose size is not a multiple of 512 (seen with
/// `qemu-img convert`); qemu-nbd announces an odd-sized image rounded up the same way.
fn announced_size(export: &dyn Export) -> u64 {
    export.size().div_ceil(512).saturating_mul(512)
}

fn transmission_flags() -> u16 {
    TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN
}

/// Serves one client on `conn` until it disconnects.
pub fn serve_client(
    conn: &mut std::os::unix::net::UnixStream,
    export: &dyn Export,
) -> io::Result<Ended> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    conn.write_all(&hello)?;
    let client_flags = read_u32(conn)?;
    if client_flags & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(protocol("the client does not speak fixed newstyle NBD"));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    // Options until one starts the transmission.
    loop {
        if read_u64(conn)? != IHAVEOPT {
            return Err(protocol("an option without IHAVEOPT"));
        }
        let opt = read_u32(conn)?;
        let len = read_u32(conn)?;
        if len > MAX_OPTION {
            return Err(protocol(format!("an option of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        conn.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                if data != export.name().as_bytes() && !data.is_empty() {
                    // No way to answer an error to EXPORT_NAME but to hang up.
                    return Err(protocol("the client asked for another export"));
                }
                let mut m = Vec::new();
                m.extend_from_slice(&announced_size(export).to_be_bytes());
                m.extend_from_slice(&transmission_flags().to_be_bytes());
                if !no_zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                conn.write_all(&m)?;
                break;
            }
            OPT_ABORT => {
                option_reply(conn, opt, REP_ACK, &[])?;
                return Ok(Ended::Disconnected);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(conn, opt, REP_ERR_INVALID, &[])?;
                    continue;
                }
                let name = export.name().as_bytes();
                let mut d = (name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(name);
                option_reply(conn, opt, REP_SERVER, &d)?;
                option_reply(conn, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                // u32 name length, name, u16 count, count × u16 info requests.
                let parsed = (|| {
                    let n = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
                    let name = data.get(4..4 + n)?;
                    let k = u16::from_be_bytes(data.get(4 + n..6 + n)?.try_into().ok()?) as usize;
                    (data.len() == 6 + n + 2 * k).then_some(name)
                })();
                let Some(name) = parsed else {
                    option_reply(conn, opt, REP_ERR_INVALID, &[])?;
                    continue;
                };
                if !name.is_empty() && name != export.name().as_bytes() {
                    option_reply(conn, opt, REP_ERR_UNKNOWN, &[])?;
                    continue;
                }
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&announced_size(export).to_be_bytes());
                info.extend_from_slice(&transmission_flags().to_be_bytes());
                option_reply(conn, opt, REP_INFO, &info)?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&4096u32.to_be_bytes());
                bs.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                option_reply(conn, opt, REP_INFO, &bs)?;
                option_reply(conn, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    break;
                }
            }
            // STRUCTURED_REPLY, SET_META_CONTEXT, STARTTLS...: simple replies only.
            _ => option_reply(conn, opt, REP_ERR_UNSUP, &[])?,
        }
    }
    transmission(conn, export)
}

fn simple_reply(w: &mut impl Write, error: u32, handle: u64, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&error.to_be_bytes());
    m.extend_from_slice(&handle.to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m)
}

/// Worker threads per connection: a client's small read (a booting guest's) is answered
/// while a large one (the background copy's 512 KiB `block-stream` reads) is still being
/// fetched, instead of waiting in line behind it. Replies go out as each read completes,
/// matched by handle (the NBD protocol lets the server answer in any order).
const WORKERS: usize = 4;
/// Requests read ahead of the workers; the client is not read further while it is full.
const QUEUE: usize = 16;

struct ReadJob {
    handle: u64,
    offset: u64,
    len: u32,
}

/// The transmission phase over a unix socket: the requests are read here, the reads done
/// by [`WORKERS`] threads, each reply written whole under one lock.
fn transmission(
    conn: &mut std::os::unix::net::UnixStream,
    export: &dyn Export,
) -> io::Result<Ended> {
    let writer = std::sync::Mutex::new(conn.try_clone()?);
    let reply = |error: u32, handle: u64, data: &[u8]| -> io::Result<()> {
        let mut w = writer
            .lock()
            .map_err(|_| io::Error::other("the reply writer panicked"))?;
        simple_reply(&mut *w, error, handle, data)
    };
    let size = announced_size(export);
    let real_size = export.size();
    let (tx, rx) = std::sync::mpsc::sync_channel::<ReadJob>(QUEUE);
    let rx = std::sync::Mutex::new(rx);
    let (rx, reply) = (&rx, &reply);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                scope.spawn(move || -> io::Result<()> {
                    loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return Err(io::Error::other("a worker panicked")),
                        };
                        let Ok(job) = job else {
                            return Ok(()); // the connection ended: no more requests
                        };
                        let mut buf = vec![0u8; job.len as usize];
                        // Past the snapshot's end (the sector padding): zeros, not a read.
                        let inside =
                            real_size.saturating_sub(job.offset).min(u64::from(job.len)) as usize;
                        let read = if inside == 0 {
                            Ok(())
                        } else {
                            export.read_at(&mut buf[..inside], job.offset)
                        };
                        match read {
                            Ok(()) => reply(0, job.handle, &buf)?,
                            Err(e) => {
                                tracing::error!(job.offset, job.len, "read failed: {e}");
                                reply(EIO, job.handle, &[])?
                            }
                        }
                    }
                })
            })
            .collect();
        let ended = requests(conn, size, &tx, reply);
        // In-flight reads are answered before the connection is let go (and a DISC's
        // reply-less end waits for them, as the protocol asks).
        drop(tx);
        let mut failed = None;
        for w in workers {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = Some(e),
                Err(_) => failed = Some(io::Error::other("a worker panicked")),
            }
        }
        match (ended, failed) {
            (Err(e), _) => Err(e),
            // A client that hung up while its replies were written: its end, not an error.
            (Ok(_), Some(e))
                if !matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                Err(e)
            }
            (Ok(end), _) => Ok(end),
        }
    })
}

/// Reads the client's requests until it disconnects: reads go to the workers, the rest
/// is answered here.
/// Writes one simple reply: (error, handle, data).
type Reply<'a> = &'a dyn Fn(u32, u64, &[u8]) -> io::Result<()>;

fn requests(
    conn: &mut impl Read,
    size: u64,
    tx: &std::sync::mpsc::SyncSender<ReadJob>,
    reply: Reply,
) -> io::Result<Ended> {
    loop {
        let magic = match read_u32(conn) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Ended::Closed),
            Err(e) => return Err(e),
        };
        if magic != REQUEST_MAGIC {
            return Err(protocol("a request without its magic"));
        }
        let _flags = read_u16(conn)?;
        let kind = read_u16(conn)?;
        let handle = read_u64(conn)?;
        let offset = read_u64(conn)?;
        let len = read_u32(conn)?;
        match kind {
            CMD_READ => {
                let in_range = offset
                    .checked_add(u64::from(len))
                    .is_some_and(|end| end <= size);
                if len > MAX_REQUEST || !in_range {
                    reply(EINVAL, handle, &[])?;
                    continue;
                }
                tx.send(ReadJob {
                    handle,
                    offset,
                    len,
                })
                .map_err(|_| io::Error::other("the read workers are gone"))?;
            }
            CMD_WRITE => {
                // The payload follows the request: drain it (bounded), then refuse.
                if len > MAX_REQUEST {
                    return Err(protocol(format!("a write of {len} bytes")));
                }
                io::copy(&mut (&mut *conn).take(u64::from(len)), &mut io::sink())?;
                reply(EPERM, handle, &[])?;
            }
            CMD_DISC => return Ok(Ended::Disconnected),
            // Read-only: there is nothing to flush, whatever reads are in flight.
            CMD_FLUSH => reply(0, handle, &[])?,
            _ => reply(ENOTSUP, handle, &[])?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    struct Pattern(u64);
    impl Export for Pattern {
        fn name(&self) -> &str {
            "d0"
        }
        fn size(&self) -> u64 {
            self.0
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            if (1 << 20..2 << 20).contains(&offset) {
                return Err(io::Error::other("damaged"));
            }
            if offset + buf.len() as u64 > self.0 {
                return Err(io::Error::other("read past the end"));
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251) as u8;
            }
            Ok(())
        }
    }

    fn handshake(c: &mut UnixStream) {
        let mut hello = [0u8; 18];
        c.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], &NBDMAGIC.to_be_bytes());
        c.write_all(&3u32.to_be_bytes()).unwrap();
    }

    fn option(c: &mut UnixStream, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        c.write_all(&m).unwrap();
    }

    fn reply(c: &mut UnixStream) -> (u32, Vec<u8>) {
        assert_eq!(read_u64(c).unwrap(), REPLY_MAGIC);
        let _opt = read_u32(c).unwrap();
        let kind = read_u32(c).unwrap();
        let len = read_u32(c).unwrap();
        let mut d = vec![0; len as usize];
        c.read_exact(&mut d).unwrap();
        (kind, d)
    }

    fn request(c: &mut UnixStream, kind: u16, handle: u64, offset: u64, len: u32) {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        c.write_all(&m).unwrap();
    }

    fn simple(c: &mut UnixStream) -> (u32, u64) {
        assert_eq!(read_u32(c).unwrap(), SIMPLE_REPLY_MAGIC);
        (read_u32(c).unwrap(), read_u64(c).unwrap())
    }

    #[test]
    fn a_client_reads_and_is_refused_what_it_may_not_do() {
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve_client(&mut s, &Pattern(4 << 20)));
        handshake(&mut c);
        option(&mut c, 8, &[]); // STRUCTURED_REPLY: unsupported
        assert_eq!(reply(&mut c).0, REP_ERR_UNSUP);
        option(&mut c, OPT_GO, &[0, 0, 0, 2, b'x', b'y', 0, 0]);
        assert_eq!(reply(&mut c).0, REP_ERR_UNKNOWN);
        option(&mut c, OPT_GO, &[0, 0, 0, 9, b'd']); // lies about its length
        assert_eq!(reply(&mut c).0, REP_ERR_INVALID);
        option(&mut c, OPT_GO, &[0, 0, 0, 2, b'd', b'0', 0, 0]);
        let (k, info) = reply(&mut c);
        assert_eq!(k, REP_INFO);
        assert_eq!(&info[2..10], &(4u64 << 20).to_be_bytes());
        assert_eq!(reply(&mut c).0, REP_INFO);
        assert_eq!(reply(&mut c).0, REP_ACK);

        request(&mut c, CMD_READ, 7, 1000, 600);
        assert_eq!(simple(&mut c), (0, 7));
        let mut data = vec![0; 600];
        c.read_exact(&mut data).unwrap();
        assert!(data
            .iter()
            .enumerate()
            .all(|(i, b)| *b == ((1000 + i) % 251) as u8));
        request(&mut c, CMD_READ, 8, (1 << 20) + 5, 10); // a damaged chunk
        assert_eq!(simple(&mut c), (EIO, 8));
        request(&mut c, CMD_READ, 9, (4 << 20) - 1, 2); // past the end
        assert_eq!(simple(&mut c), (EINVAL, 9));
        request(&mut c, CMD_READ, 10, u64::MAX - 1, 100); // overflowing
        assert_eq!(simple(&mut c), (EINVAL, 10));
        request(&mut c, CMD_WRITE, 11, 0, 3);
        c.write_all(b"abc").unwrap();
        assert_eq!(simple(&mut c), (EPERM, 11));
        request(&mut c, CMD_FLUSH, 12, 0, 0);
        assert_eq!(simple(&mut c), (0, 12));
        request(&mut c, 5, 13, 0, 0); // WRITE_ZEROES on a read-only export
        assert_eq!(simple(&mut c), (ENOTSUP, 13));
        request(&mut c, CMD_DISC, 14, 0, 0);
        assert_eq!(server.join().unwrap().unwrap(), Ended::Disconnected);
    }

    /// Reads from 4 MiB on take 2 s, as a large read of chunks fetched from a slow
    /// repository would.
    struct Slow;
    impl Export for Slow {
        fn name(&self) -> &str {
            "d0"
        }
        fn size(&self) -> u64 {
            8 << 20
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            if offset >= 4 << 20 {
                std::thread::sleep(std::time::Duration::from_secs(2));
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251) as u8;
            }
            Ok(())
        }
    }

    #[test]
    fn a_small_read_is_answered_while_a_slow_large_one_is_still_fetched() {
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve_client(&mut s, &Slow));
        handshake(&mut c);
        option(&mut c, OPT_GO, &[0, 0, 0, 2, b'd', b'0', 0, 0]);
        for _ in 0..3 {
            reply(&mut c);
        }
        // The background copy's 512 KiB read first, then the guest's 4 KiB one.
        request(&mut c, CMD_READ, 1, 4 << 20, 512 << 10);
        request(&mut c, CMD_READ, 2, 8192, 4096);
        let t = std::time::Instant::now();
        assert_eq!(
            simple(&mut c),
            (0, 2),
            "the small read waited behind the large one"
        );
        let small_after = t.elapsed();
        let mut data = vec![0; 4096];
        c.read_exact(&mut data).unwrap();
        assert!(data
            .iter()
            .enumerate()
            .all(|(i, b)| *b == ((8192 + i) % 251) as u8));
        assert_eq!(simple(&mut c), (0, 1));
        let mut data = vec![0; 512 << 10];
        c.read_exact(&mut data).unwrap();
        assert!(data
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (((4 << 20) + i) % 251) as u8));
        assert!(
            small_after < std::time::Duration::from_secs(2),
            "{small_after:?}"
        );
        // A read in flight when the client disconnects is still answered.
        request(&mut c, CMD_READ, 3, 4 << 20, 4096);
        request(&mut c, CMD_DISC, 4, 0, 0);
        assert_eq!(simple(&mut c), (0, 3));
        let mut data = vec![0; 4096];
        c.read_exact(&mut data).unwrap();
        assert_eq!(server.join().unwrap().unwrap(), Ended::Disconnected);
    }

    #[test]
    fn an_odd_sized_export_is_announced_in_whole_sectors_with_a_zero_tail() {
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve_client(&mut s, &Pattern(1000)));
        handshake(&mut c);
        option(&mut c, OPT_GO, &[0, 0, 0, 2, b'd', b'0', 0, 0]);
        let (_, info) = reply(&mut c);
        assert_eq!(&info[2..10], &1024u64.to_be_bytes());
        assert_eq!(reply(&mut c).0, REP_INFO);
        assert_eq!(reply(&mut c).0, REP_ACK);
        request(&mut c, CMD_READ, 1, 990, 34);
        assert_eq!(simple(&mut c), (0, 1));
        let mut data = vec![0xff; 34];
        c.read_exact(&mut data).unwrap();
        assert!(data[..10]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == ((990 + i) % 251) as u8));
        assert!(data[10..].iter().all(|b| *b == 0), "{data:?}");
        request(&mut c, CMD_READ, 2, 1000, 24); // wholly in the padding
        assert_eq!(simple(&mut c), (0, 2));
        c.read_exact(&mut data[..24]).unwrap();
        assert!(data[..24].iter().all(|b| *b == 0));
        request(&mut c, CMD_READ, 3, 1000, 25); // past the announced end
        assert_eq!(simple(&mut c), (EINVAL, 3));
        request(&mut c, CMD_DISC, 4, 0, 0);
        assert_eq!(server.join().unwrap().unwrap(), Ended::Disconnected);
    }

    #[test]
    fn hostile_handshakes_end_the_connection() {
        for bytes in [
            &b"\0\0\0\0"[..],                          // not fixed newstyle
            &[0, 0, 0, 3, 1, 2, 3, 4, 5, 6, 7, 8][..], // no IHAVEOPT
            &[
                0, 0, 0, 3, 0x49, 0x48, 0x41, 0x56, 0x45, 0x4F, 0x50, 0x54, 0, 0, 0, 7, 0xff, 0xff,
                0xff, 0xff,
            ][..], // 4 GiB option
        ] {
            let (mut c, mut s) = UnixStream::pair().unwrap();
            let server = std::thread::spawn(move || serve_client(&mut s, &Pattern(4096)));
            let mut hello = [0u8; 18];
            c.read_exact(&mut hello).unwrap();
            c.write_all(bytes).unwrap();
            drop(c);
            assert!(server.join().unwrap().is_err(), "{bytes:?}");
        }
    }
}
