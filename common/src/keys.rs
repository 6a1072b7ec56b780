//! Key material of an overlay: every overlay host (server, node) has a static X25519 key pair,
//! the network has one 32-byte secret shared by its members and the bootstrapper, and a PoP may
//! require a viewer secret. All are small text files (64 hex digits and a newline), created on
//! first use with mode 0600, so a host started without any key still works on one machine;
//! copying the network key (and, to pin, the public keys) is what joins hosts on other
//! machines.
//!
//! Default paths (overridden by `--key`, `--network-key`, or the `PESSI_KEY` /
//! `PESSI_NETWORK_KEY` environment variables): the directory `$PESSI_KEY_DIR`, else
//! `$XDG_CONFIG_HOME/pessi-streamer`, else `$HOME/.config/pessi-streamer`, else
//! `./.pessi-streamer`; in it `host-<ip>.key` (one per host address, so the hosts of a
//! one-machine overlay on `127.0.0.x` have distinct keys) and `network.key`.
//!
//! A client keeps the keys of the PoPs it met in `known-pops` there ([`KnownPops`], trust on
//! first use, as SSH's `known_hosts`).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// Length of every key.
pub const KEY_LEN: usize = 32;

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading, creating or writing failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The content is not 64 hex digits.
    #[error("key file {path}: expected 64 hex digits (a 32-byte key), found {found}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        found: String,
    },
    /// A key given as text is not 64 hex digits.
    #[error("{0:?} is not a key (expected 64 hex digits)")]
    Text(String),
    /// A line of a known-PoPs file is not `ADDRESS KEY`.
    #[error("{path}:{line}: expected `IP:PORT KEY` (the key as 64 hex digits), found {found:?}")]
    KnownPop {
        /// The file.
        path: PathBuf,
        /// The line number (from 1).
        line: usize,
        /// The line.
        found: String,
    },
}

/// A public key (X25519), shown as 64 lowercase hex digits.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl PublicKey {
    /// Parses 64 hex digits.
    pub fn parse(s: &str) -> Result<PublicKey, KeyError> {
        from_hex(s.trim())
            .map(PublicKey)
            .ok_or_else(|| KeyError::Text(s.to_string()))
    }

    /// The first 8 hex digits, for logs.
    pub fn short(&self) -> String {
        hex(&self.0[..4])
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        PublicKey::parse(s)
    }
}

/// A 32-byte secret (a private key, the network key, a viewer secret). Its `Debug` does not
/// show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub [u8; KEY_LEN]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// 32 random bytes from the operating system.
    pub fn random() -> Secret {
        let mut k = [0u8; KEY_LEN];
        getrandom(&mut k);
        Secret(k)
    }
}

/// A host's static key pair.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    /// The private half.
    pub private: Secret,
    /// The public half (what peers pin).
    pub public: PublicKey,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPair({})", self.public.short())
    }
}

impl KeyPair {
    /// The pair of a private key.
    pub fn from_private(private: Secret) -> KeyPair {
        let public = PublicKey(curve25519_public(&private.0));
        KeyPair { private, public }
    }

    /// A new random pair.
    pub fn generate() -> KeyPair {
        KeyPair::from_private(Secret::random())
    }
}

/// The X25519 base-point multiplication (RFC 7748), through the curve crate snow uses.
fn curve25519_public(private: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    let mut k = *private;
    // Clamping as RFC 7748 (and snow's Dh25519) do.
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
    curve25519_dalek::montgomery::MontgomeryPoint::mul_base_clamped(k).to_bytes()
}

/// Fills `buf` with OS randomness.
pub(crate) fn getrandom(buf: &mut [u8]) {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new()
        .fill(buf)
        .expect("the operating system's random source works");
}

/// The directory of the default key files (see the module docs).
pub fn default_dir() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = env("PESSI_KEY_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = env("XDG_CONFIG_HOME") {
        return PathBuf::from(d).join("pessi-streamer");
    }
    if let Some(h) = env("HOME") {
        return PathBuf::from(h).join(".config").join("pessi-streamer");
    }
    PathBuf::from(".pessi-streamer")
}

/// The default host key file of the host at `ip`.
pub fn default_host_key(ip: IpAddr) -> PathBuf {
    default_host_key_in(&default_dir(), ip)
}

/// The host key file of the host at `ip` in the key directory `dir`.
pub fn default_host_key_in(dir: &Path, ip: IpAddr) -> PathBuf {
    dir.join(format!("host-{ip}.key"))
}

/// The default network key file.
pub fn default_network_key() -> PathBuf {
    default_dir().join("network.key")
}

/// Reads a secret from `path`, or creates the file (mode 0600, parent directories as needed)
/// with a new random one. Returns the secret and whether it was created.
pub fn load_or_create(path: &Path) -> Result<(Secret, bool), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((parse_file(path, &text)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = Secret::random();
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            // Written whole under a temporary name, then linked into place: a host started at
            // the same moment reads either no file or the complete one, never half of it.
            // (Unique per process and call: threads of one process may race too.)
            let mut nonce = [0u8; 8];
            getrandom(&mut nonce);
            let tmp = path.with_extension(format!(
                "tmp{}-{}",
                std::process::id(),
                u64::from_le_bytes(nonce)
            ));
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let written = opts
                .open(&tmp)
                .and_then(|mut f| f.write_all(format!("{}\n", hex(&secret.0)).as_bytes()));
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                return Err(io(e));
            }
            let linked = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => Ok((secret, true)),
                // Another process created it first (hosts started together): use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(path).map_err(io)?;
                    Ok((parse_file(path, &text)?, false))
                }
                Err(e) => Err(io(e)),
            }
        }
        Err(e) => Err(io(e)),
    }
}

/// Reads a secret that must exist.
pub fn load(path: &Path) -> Result<Secret, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_file(path, &text)
}

fn parse_file(path: &Path, text: &str) -> Result<Secret, KeyError> {
    let t = text.trim();
    from_hex(t).map(Secret).ok_or_else(|| KeyError::Format {
        path: path.to_path_buf(),
        found: if t.len() > 80 {
            format!("{} characters", t.len())
        } else {
            format!("{t:?}")
        },
    })
}

/// The keys of the PoPs a client met, learned on first use and checked ever after (trust on
/// first use, as SSH's `known_hosts`): a text file of `IP:PORT KEY` lines (`#` comments),
/// default `known-pops` in the key directory. A PoP that later proves another key is refused
/// until its line is deleted (or another key is pinned with `--servers IP#KEY`).
#[derive(Debug, Clone)]
pub struct KnownPops {
    path: PathBuf,
    keys: BTreeMap<SocketAddr, PublicKey>,
}

impl KnownPops {
    /// `known-pops` in the default key directory.
    pub fn default_path() -> PathBuf {
        default_dir().join("known-pops")
    }

    /// Reads `path` (a missing file is an empty list); a bad line is an error naming it.
    pub fn load(path: &Path) -> Result<KnownPops, KeyError> {
        let keys = match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(KeyError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Ok(KnownPops {
            path: path.to_path_buf(),
            keys,
        })
    }

    fn parse(path: &Path, text: &str) -> Result<BTreeMap<SocketAddr, PublicKey>, KeyError> {
        let mut keys = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = || KeyError::KnownPop {
                path: path.to_path_buf(),
                line: i + 1,
                found: raw.to_owned(),
            };
            let mut words = line.split_whitespace();
            let (Some(a), Some(k), None) = (words.next(), words.next(), words.next()) else {
                return Err(bad());
            };
            let addr: SocketAddr = a.parse().map_err(|_| bad())?;
            let key = PublicKey::parse(k).map_err(|_| bad())?;
            keys.insert(addr, key);
        }
        Ok(keys)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key known for the PoP at `pop`.
    pub fn get(&self, pop: SocketAddr) -> Option<PublicKey> {
        self.keys.get(&pop).copied()
    }

    /// Every PoP known.
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, PublicKey)> + '_ {
        self.keys.iter().map(|(a, k)| (*a, *k))
    }

    /// Remembers `key` for `pop` in the file (read again first, so clients that run side by
    /// side keep each other's entries; written whole under a temporary name, then renamed).
    pub fn remember(&mut self, pop: SocketAddr, key: PublicKey) -> Result<(), KeyError> {
        let io = |source| KeyError::Io {
            path: self.path.clone(),
            source,
        };
        if let Ok(text) = std::fs::read_to_string(&self.path) {
            if let Ok(keys) = Self::parse(&self.path, &text) {
                self.keys.extend(keys);
            }
        }
        self.keys.insert(pop, key);
        let mut text = String::from(
            "# PoP keys this client learned on first use (pessi-streamer). A PoP that proves\n\
             # another key is refused: delete its line if its key really changed.\n",
        );
        for (a, k) in &self.keys {
            text.push_str(&format!("{a} {k}\n"));
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut nonce = [0u8; 8];
        getrandom(&mut nonce);
        let tmp = self.path.with_extension(format!(
            "tmp{}-{}",
            std::process::id(),
            u64::from_le_bytes(nonce)
        ));
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(io)
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 32 bytes from 64 hex digits.
pub fn from_hex(s: &str) -> Option<[u8; KEY_LEN]> {
    let b = s.as_bytes();
    if b.len() != 2 * KEY_LEN {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; KEY_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(b[2 * i])? << 4 | digit(b[2 * i + 1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_pops_are_remembered_merged_and_bad_lines_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("known-pops");
        let a: SocketAddr = "127.0.0.2:8010".parse().unwrap();
        let b: SocketAddr = "[::1]:8010".parse().unwrap();
        let (ka, kb) = (KeyPair::generate().public, KeyPair::generate().public);
        let mut one = KnownPops::load(&path).unwrap();
        assert_eq!(one.get(a), None);
        // Two clients side by side: each keeps the other's entry.
        let mut two = KnownPops::load(&path).unwrap();
        one.remember(a, ka).unwrap();
        two.remember(b, kb).unwrap();
        let back = KnownPops::load(&path).unwrap();
        assert_eq!((back.get(a), back.get(b)), (Some(ka), Some(kb)));
        std::fs::write(&path, format!("# comment\n\n{a} {ka}\n127.0.0.3 {kb}\n")).unwrap();
        let e = KnownPops::load(&path).unwrap_err().to_string();
        assert!(e.contains("known-pops:4") && e.contains("127.0.0.3"), "{e}");
    }

    #[test]
    fn files_are_created_once_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub").join("host-127.0.0.1.key");
        let (a, created) = load_or_create(&p).unwrap();
        assert!(created);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (b, created) = load_or_create(&p).unwrap();
        assert!(!created);
        assert_eq!(a, b);
        assert_eq!(load(&p).unwrap(), a);
    }

    #[test]
    fn a_bad_file_is_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("network.key");
        std::fs::write(&p, "not a key\n").unwrap();
        let e = load_or_create(&p).unwrap_err().to_string();
        assert!(
            e.contains("network.key") && e.contains("64 hex digits"),
            "{e}"
        );
        assert!(load(&dir.path().join("missing.key")).is_err());
    }

    #[test]
    fn public_keys_match_the_handshake_library() {
        // The public key we derive is the one snow computes for the same private key.
        let kp = KeyPair::generate();
        let builder = snow::Builder::new("Noise_N_25519_ChaChaPoly_BLAKE2s".parse().unwrap());
        let mut responder = builder
            .local_private_key(&kp.private.0)
            .unwrap()
            .build_responder()
            .unwrap();
        let mut initiator = snow::Builder::new("Noise_N_25519_ChaChaPoly_BLAKE2s".parse().unwrap())
            .remote_public_key(&kp.public.0)
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut m = [0u8; 128];
        let n = initiator.write_message(b"hi", &mut m).unwrap();
        let mut p = [0u8; 128];
        assert_eq!(responder.read_message(&m[..n], &mut p).unwrap(), 2);
        assert_eq!(&p[..2], b"hi");
        let text = kp.public.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(PublicKey::parse(&text).unwrap(), kp.public);
        assert!(PublicKey::parse("abc").is_err());
    }

    #[test]
    fn threads_creating_one_file_together_agree() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("network.key");
        let keys: Vec<Secret> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_create(&p).unwrap().0))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
    }
}
