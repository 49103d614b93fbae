//! Keys, authenticated encryption and the password-wrapped key file.
//!
//! Master key = 32-byte XChaCha20-Poly1305 key + 32-byte keyed-BLAKE3 key for chunk ids.
//! A key file wraps the master key with a key derived from the password by Argon2id.

use crate::error::{RepoError, Result};
use crate::util::{from_hex, to_hex};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

pub(crate) const NONCE_LEN: usize = 24;
pub(crate) const TAG_LEN: usize = 16;
/// Bytes an encrypted message is longer than its plaintext.
pub(crate) const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

pub(crate) type Id = [u8; 32];

/// Random bytes from the operating system.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // getrandom only fails when the OS has no entropy source at all; nothing sane to do then.
    if let Err(e) = getrandom::getrandom(&mut b) {
        panic!("the operating system's random number generator failed: {e}");
    }
    b
}

pub(crate) fn random_id() -> String {
    to_hex(&random_bytes::<32>())
}

/// The repository's secret keys.
#[derive(Clone)]
pub(crate) struct MasterKey {
    cipher: XChaCha20Poly1305,
    id_key: [u8; 32],
}

impl MasterKey {
    pub(crate) fn generate() -> (MasterKey, [u8; 64]) {
        let raw = random_bytes::<64>();
        (MasterKey::from_raw(&raw), raw)
    }

    fn from_raw(raw: &[u8; 64]) -> MasterKey {
        let mut enc = [0u8; 32];
        enc.copy_from_slice(&raw[..32]);
        let mut id_key = [0u8; 32];
        id_key.copy_from_slice(&raw[32..]);
        MasterKey {
            cipher: XChaCha20Poly1305::new(&enc.into()),
            id_key,
        }
    }

    /// Content id of a chunk: keyed BLAKE3, so ids reveal nothing about the content to
    /// whoever can only see the storage.
    pub(crate) fn chunk_id(&self, data: &[u8]) -> Id {
        *blake3::keyed_hash(&self.id_key, data).as_bytes()
    }

    /// The MAC of the repository's `config` (format 2): keyed BLAKE3 under a key derived
    /// from the id key, so that nobody without the password can change the configuration.
    pub(crate) fn config_mac(&self, body: &[u8]) -> [u8; 32] {
        let k = blake3::derive_key("coldclone repository config mac v2", &self.id_key);
        *blake3::keyed_hash(&k, body).as_bytes()
    }

    /// Encrypt `plain` with a fresh random nonce; `aad` is authenticated, not stored.
    /// Output: nonce || ciphertext || tag.
    pub(crate) fn seal(&self, plain: &[u8], aad: &[u8]) -> Vec<u8> {
        let nonce = random_bytes::<NONCE_LEN>();
        let mut out = Vec::with_capacity(plain.len() + OVERHEAD);
        out.extend_from_slice(&nonce);
        match self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad })
        {
            Ok(ct) => out.extend_from_slice(&ct),
            // Encryption cannot fail for messages below 256 GiB; blobs are at most a few MiB.
            Err(e) => panic!("XChaCha20-Poly1305 encryption failed: {e}"),
        }
        out
    }

    /// Decrypt and authenticate; `None` when the data was tampered with or the key is wrong.
    pub(crate) fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < OVERHEAD {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .ok()
    }

    /// Encrypt a repository file (index, snapshot): zstd, then seal with `aad` (the file's
    /// kind, and from format 2 on its name: see `Repository::file_aad`).
    pub(crate) fn seal_file(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let z = zstd::bulk::compress(plain, 3).unwrap_or_else(|_| plain.to_vec());
        self.seal(&z, aad)
    }

    pub(crate) fn open_file(&self, aad: &[u8], path: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        let z = self.open(sealed, aad).ok_or_else(|| {
            RepoError::corrupt(
                path,
                "authentication failed (modified, truncated or not of this repository)",
            )
        })?;
        zstd::stream::decode_all(&z[..])
            .map_err(|e| RepoError::corrupt(path, format!("cannot decompress: {e}")))
    }
}

/// Cost of the password key derivation (Argon2id).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        KdfParams {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// Cheap parameters for tests only: never for real repositories.
    pub fn insecure_for_tests() -> Self {
        KdfParams {
            m_cost_kib: 64,
            t_cost: 1,
            p_cost: 1,
        }
    }
}

/// A key file: the master key wrapped by a password-derived key.
#[derive(Serialize, Deserialize)]
pub(crate) struct KeyFile {
    pub version: u32,
    pub kdf: String,
    pub params: KdfParams,
    pub salt: String,
    pub wrapped: String,
    pub created: String,
    pub host: String,
}

/// Bounds on a key file's Argon2 parameters: a key file is read from the storage before
/// anything is authenticated, and a planted one must not make us allocate 4 TB or loop
/// for a day.
pub(crate) const MAX_M_COST_KIB: u32 = 4 << 20; // 4 GiB
pub(crate) const MAX_T_COST: u32 = 64;
pub(crate) const MAX_P_COST: u32 = 64;

impl KdfParams {
    /// Whether the parameters are within the bounds coldclone accepts.
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        let p = self;
        if p.m_cost_kib > MAX_M_COST_KIB
            || p.t_cost == 0
            || p.t_cost > MAX_T_COST
            || p.p_cost == 0
            || p.p_cost > MAX_P_COST
        {
            return Err(format!(
                "Argon2 parameters m_cost {} KiB, t_cost {}, p_cost {} are out of bounds (at most {MAX_M_COST_KIB} KiB, 1..={MAX_T_COST}, 1..={MAX_P_COST})",
                p.m_cost_kib, p.t_cost, p.p_cost
            ));
        }
        Ok(())
    }
}

fn derive(password: &str, salt: &[u8], p: &KdfParams) -> Result<[u8; 32]> {
    p.check().map_err(RepoError::InvalidArgument)?;
    let params = argon2::Params::new(p.m_cost_kib, p.t_cost, p.p_cost, Some(32))
        .map_err(|e| RepoError::InvalidArgument(format!("Argon2 parameters {p:?}: {e}")))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    a.hash_password_into(password.as_bytes(), salt, &mut out)
        .map_err(|e| RepoError::InvalidArgument(format!("Argon2 key derivation: {e}")))?;
    Ok(out)
}

const KEY_AAD: &[u8] = b"coldclone-key-v1";

pub(crate) fn make_key_file(password: &str, raw: &[u8; 64], params: KdfParams) -> Result<KeyFile> {
    let salt = random_bytes::<16>();
    let kek = derive(password, &salt, &params)?;
    let cipher = XChaCha20Poly1305::new(&kek.into());
    let nonce = random_bytes::<NONCE_LEN>();
    let ct = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: raw,
                aad: KEY_AAD,
            },
        )
        .map_err(|e| RepoError::InvalidArgument(format!("wrapping the key: {e}")))?;
    let mut wrapped = nonce.to_vec();
    wrapped.extend_from_slice(&ct);
    Ok(KeyFile {
        version: 1,
        kdf: "argon2id".into(),
        params,
        salt: to_hex(&salt),
        wrapped: to_hex(&wrapped),
        created: crate::util::rfc3339(crate::util::now_unix()),
        host: crate::util::hostname(),
    })
}

/// Try to unwrap the master key with `password`; `Ok(None)` for a wrong password.
pub(crate) fn open_key_file(kf: &KeyFile, password: &str, path: &str) -> Result<Option<MasterKey>> {
    if kf.version != 1 || kf.kdf != "argon2id" {
        return Err(RepoError::Unsupported {
            location: path.into(),
            detail: format!("key file version {} kdf {}", kf.version, kf.kdf),
        });
    }
    kf.params.check().map_err(|d| RepoError::corrupt(path, d))?;
    let salt = from_hex(&kf.salt).ok_or_else(|| RepoError::corrupt(path, "salt is not hex"))?;
    let wrapped =
        from_hex(&kf.wrapped).ok_or_else(|| RepoError::corrupt(path, "wrapped key is not hex"))?;
    if wrapped.len() < NONCE_LEN {
        return Err(RepoError::corrupt(path, "wrapped key too short"));
    }
    let kek = derive(password, &salt, &kf.params)?;
    let cipher = XChaCha20Poly1305::new(&kek.into());
    let (nonce, ct) = wrapped.split_at(NONCE_LEN);
    match cipher.decrypt(
        XNonce::from_slice(nonce),
        Payload {
            msg: ct,
            aad: KEY_AAD,
        },
    ) {
        Ok(raw) if raw.len() == 64 => {
            let mut r = [0u8; 64];
            r.copy_from_slice(&raw);
            Ok(Some(MasterKey::from_raw(&r)))
        }
        Ok(_) => Err(RepoError::corrupt(path, "wrapped key has the wrong length")),
        Err(_) => Ok(None),
    }
}
