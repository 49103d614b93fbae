//! Pack files and index files.
//!
//! Pack: `blob* header_sealed header_len:u32le "CCP1"`. Each blob is sealed on its own
//! (nonce || ciphertext || tag) with AAD = id || kind || flags, so a blob can be copied to
//! another pack unchanged and cannot be swapped for another one unnoticed. The header lists
//! (kind, flags, stored_len, raw_len, id) per blob, in order; offsets follow from the lengths.
//! A pack is named by the unkeyed BLAKE3 hash of its bytes.

use crate::crypto::{Id, MasterKey};
use crate::error::{RepoError, Result};
use crate::util::{to_hex, IdMap};

pub(crate) const KIND_DATA: u8 = 0;
pub(crate) const KIND_MAP: u8 = 1;
pub(crate) const FLAG_ZSTD: u8 = 1;

const HEADER_AAD: &[u8] = b"coldclone-pack-header-v1";
const PACK_MAGIC: &[u8; 4] = b"CCP1";
const HDR_ENTRY: usize = 42;

pub(crate) fn blob_aad(id: &Id, kind: u8, flags: u8) -> [u8; 34] {
    let mut a = [0u8; 34];
    a[..32].copy_from_slice(id);
    a[32] = kind;
    a[33] = flags;
    a
}

pub(crate) fn pack_key(id: &Id) -> String {
    let h = to_hex(id);
    format!("data/{}/{}", &h[..2], h)
}

/// Where a blob lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlobLoc {
    pub pack: u32,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
    pub kind: u8,
    pub flags: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlobEntry {
    pub id: Id,
    pub kind: u8,
    pub flags: u8,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
}

/// A pack as listed in an index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PackDesc {
    pub id: Id,
    pub size: u64,
    pub blobs: Vec<BlobEntry>,
}

/// A pack being filled in memory.
#[derive(Default)]
pub(crate) struct PackBuilder {
    pub buf: Vec<u8>,
    pub blobs: Vec<BlobEntry>,
}

impl PackBuilder {
    pub(crate) fn with_capacity(n: usize) -> PackBuilder {
        PackBuilder {
            buf: Vec::with_capacity(n),
            blobs: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, id: Id, kind: u8, flags: u8, sealed: &[u8], raw_len: u32) {
        self.blobs.push(BlobEntry {
            id,
            kind,
            flags,
            offset: self.buf.len() as u32,
            stored_len: sealed.len() as u32,
            raw_len,
        });
        self.buf.extend_from_slice(sealed);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Append the sealed header and trailer; returns the pack's bytes and description.
    pub(crate) fn finish(mut self, key: &MasterKey) -> (Vec<u8>, PackDesc) {
        let mut hdr = Vec::with_capacity(self.blobs.len() * HDR_ENTRY);
        for b in &self.blobs {
            hdr.push(b.kind);
            hdr.push(b.flags);
            hdr.extend_from_slice(&b.stored_len.to_le_bytes());
            hdr.extend_from_slice(&b.raw_len.to_le_bytes());
            hdr.extend_from_slice(&b.id);
        }
        let sealed = key.seal(&hdr, HEADER_AAD);
        self.buf.extend_from_slice(&sealed);
        self.buf
            .extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(PACK_MAGIC);
        let id = *blake3::hash(&self.buf).as_bytes();
        let size = self.buf.len() as u64;
        (
            self.buf,
            PackDesc {
                id,
                size,
                blobs: self.blobs,
            },
        )
    }
}

/// Read the header of a whole pack (used by check and index repair).
pub(crate) fn parse_pack_header(
    key: &MasterKey,
    path: &str,
    pack: &[u8],
) -> Result<Vec<BlobEntry>> {
    let n = pack.len();
    if n < 8 || &pack[n - 4..] != PACK_MAGIC {
        return Err(RepoError::corrupt(path, "not a pack (bad trailer)"));
    }
    let hlen = u32::from_le_bytes([pack[n - 8], pack[n - 7], pack[n - 6], pack[n - 5]]) as usize;
    if hlen + 8 > n {
        return Err(RepoError::corrupt(path, "pack header length out of range"));
    }
    let hdr = key
        .open(&pack[n - 8 - hlen..n - 8], HEADER_AAD)
        .ok_or_else(|| RepoError::corrupt(path, "pack header fails authentication"))?;
    if hdr.len() % HDR_ENTRY != 0 {
        return Err(RepoError::corrupt(path, "pack header has a partial entry"));
    }
    let mut off = 0u64;
    let mut out = Vec::with_capacity(hdr.len() / HDR_ENTRY);
    for e in hdr.chunks_exact(HDR_ENTRY) {
        let stored_len = u32::from_le_bytes([e[2], e[3], e[4], e[5]]);
        let raw_len = u32::from_le_bytes([e[6], e[7], e[8], e[9]]);
        let mut id = [0u8; 32];
        id.copy_from_slice(&e[10..42]);
        out.push(BlobEntry {
            id,
            kind: e[0],
            flags: e[1],
            offset: off as u32,
            stored_len,
            raw_len,
        });
        off += stored_len as u64;
    }
    if off as usize > n - 8 - hlen {
        return Err(RepoError::corrupt(
            path,
            "pack header describes more data than the pack holds",
        ));
    }
    Ok(out)
}

thread_local! {
    /// Creating a zstd context costs more than decompressing a small chunk: one per thread.
    static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().ok());
}

/// Decrypt, decompress and verify one blob; `raw` is its stored bytes.
pub(crate) fn open_blob(
    key: &MasterKey,
    e: &BlobEntry,
    sealed: &[u8],
    what: &str,
) -> Result<Vec<u8>> {
    let plain = key
        .open(sealed, &blob_aad(&e.id, e.kind, e.flags))
        .ok_or_else(|| {
            RepoError::corrupt(what, format!("blob {} fails authentication", to_hex(&e.id)))
        })?;
    let data = if e.flags & FLAG_ZSTD != 0 {
        DCTX.with(|d| match d.borrow_mut().as_mut() {
            Some(d) => d.decompress(&plain, e.raw_len as usize),
            None => zstd::bulk::decompress(&plain, e.raw_len as usize),
        })
        .map_err(|err| {
            RepoError::corrupt(
                what,
                format!("blob {} does not decompress: {err}", to_hex(&e.id)),
            )
        })?
    } else {
        plain
    };
    if data.len() != e.raw_len as usize || key.chunk_id(&data) != e.id {
        return Err(RepoError::corrupt(
            what,
            format!("blob {} has the wrong content", to_hex(&e.id)),
        ));
    }
    Ok(data)
}

const INDEX_MAGIC: &[u8; 4] = b"CCX1";
pub(crate) const INDEX_KIND: &str = "index";

pub(crate) fn encode_index(packs: &[PackDesc]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(INDEX_MAGIC);
    v.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    for p in packs {
        v.extend_from_slice(&p.id);
        v.extend_from_slice(&p.size.to_le_bytes());
        v.extend_from_slice(&(p.blobs.len() as u32).to_le_bytes());
        for b in &p.blobs {
            v.push(b.kind);
            v.push(b.flags);
            v.extend_from_slice(&b.offset.to_le_bytes());
            v.extend_from_slice(&b.stored_len.to_le_bytes());
            v.extend_from_slice(&b.raw_len.to_le_bytes());
            v.extend_from_slice(&b.id);
        }
    }
    v
}

struct Cursor<'a> {
    b: &'a [u8],
    path: &'a str,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.b.len() < n {
            return Err(RepoError::corrupt(self.path, "index file is truncated"));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn id(&mut self) -> Result<Id> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
}

pub(crate) fn decode_index(b: &[u8], path: &str) -> Result<Vec<PackDesc>> {
    let mut c = Cursor { b, path };
    if c.take(4)? != INDEX_MAGIC {
        return Err(RepoError::corrupt(path, "not an index file (bad magic)"));
    }
    let n = c.u32()? as usize;
    let mut packs = Vec::with_capacity(n.min(1 << 20));
    for _ in 0..n {
        let id = c.id()?;
        let size = c.u64()?;
        let m = c.u32()? as usize;
        let mut blobs = Vec::with_capacity(m.min(1 << 20));
        for _ in 0..m {
            let kf = c.take(2)?;
            let (kind, flags) = (kf[0], kf[1]);
            let offset = c.u32()?;
            let stored_len = c.u32()?;
            let raw_len = c.u32()?;
            let bid = c.id()?;
            blobs.push(BlobEntry {
                id: bid,
                kind,
                flags,
                offset,
                stored_len,
                raw_len,
            });
        }
        packs.push(PackDesc { id, size, blobs });
    }
    Ok(packs)
}

/// All indexes merged in memory.
#[derive(Default)]
pub(crate) struct Index {
    pub packs: Vec<(Id, u64)>,
    pack_pos: IdMap<u32>,
    pub blobs: IdMap<BlobLoc>,
    /// Keys of the index files this was loaded from.
    pub files: Vec<String>,
    /// Index files that could not be read (key, why).
    pub damaged: Vec<(String, String)>,
    /// Packs no readable index file lists, described from their headers (only read when
    /// an index file is damaged).
    pub recovered: Vec<PackDesc>,
}

impl Index {
    pub(crate) fn add_pack(&mut self, p: &PackDesc) {
        let pi = match self.pack_pos.get(&p.id) {
            Some(&i) => i,
            None => {
                let i = self.packs.len() as u32;
                self.packs.push((p.id, p.size));
                self.pack_pos.insert(p.id, i);
                i
            }
        };
        for b in &p.blobs {
            self.blobs.entry(b.id).or_insert(BlobLoc {
                pack: pi,
                offset: b.offset,
                stored_len: b.stored_len,
                raw_len: b.raw_len,
                kind: b.kind,
                flags: b.flags,
            });
        }
    }

    pub(crate) fn contains(&self, id: &Id) -> bool {
        self.blobs.contains_key(id)
    }

    pub(crate) fn entry(&self, id: &Id) -> Option<(Id, BlobEntry)> {
        let l = self.blobs.get(id)?;
        Some((
            self.packs[l.pack as usize].0,
            BlobEntry {
                id: *id,
                kind: l.kind,
                flags: l.flags,
                offset: l.offset,
                stored_len: l.stored_len,
                raw_len: l.raw_len,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_and_index_roundtrip() {
        let (key, _) = MasterKey::generate();
        let mut pb = PackBuilder::default();
        let data = b"hello world hello world hello world".to_vec();
        let id = key.chunk_id(&data);
        let sealed = key.seal(&data, &blob_aad(&id, KIND_DATA, 0));
        pb.add(id, KIND_DATA, 0, &sealed, data.len() as u32);
        let (bytes, desc) = pb.finish(&key);
        let hdr = parse_pack_header(&key, "p", &bytes).unwrap();
        assert_eq!(hdr, desc.blobs);
        let e = &hdr[0];
        let got = open_blob(
            &key,
            e,
            &bytes[e.offset as usize..(e.offset + e.stored_len) as usize],
            "p",
        )
        .unwrap();
        assert_eq!(got, data);
        let enc = encode_index(std::slice::from_ref(&desc));
        assert_eq!(decode_index(&enc, "i").unwrap(), vec![desc]);
        assert!(decode_index(&enc[..enc.len() - 1], "i").is_err());
        let mut bad = bytes.clone();
        bad[30] ^= 1;
        assert!(open_blob(
            &key,
            e,
            &bad[e.offset as usize..(e.offset + e.stored_len) as usize],
            "p"
        )
        .is_err());
    }
}
