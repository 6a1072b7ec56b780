//! The videos folder as a set of channels: a recursive `notify` watcher plus a diffing rescan.
//!
//! A channel's name is the file's path relative to the folder, without extension, with `/`
//! separators (`sports/match.mp4` → `sports/match`). Hidden entries (any path component
//! starting with `.`, which includes the `.pessi-cache` folder), temporary files (`*.tmp`,
//! `*.part`, `*.partial`, `*.crdownload`, `*.swp`, `*~`, `#*`) and any extra ignored folder are
//! skipped. A new or modified file is announced only once its size and mtime have been stable
//! for [`STABLE_FOR`], so a file being copied in is not read half-written; a removal is
//! announced at once. Every file is reported: telling videos from other files is the
//! transcode step's ffprobe validation, which names the file it rejects.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use thiserror::Error;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How long a file's size and mtime must stay unchanged before it is acted on.
pub const STABLE_FOR: Duration = Duration::from_millis(300);
/// Full rescan period even without notifications (safety net for missed events).
pub const RESCAN_EVERY: Duration = Duration::from_secs(5);

/// A change of the videos folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogEvent {
    /// A new file (also emitted for every file found at start).
    Added(String, PathBuf),
    /// A file disappeared.
    Removed(String),
    /// A file's content changed (size or mtime) and is stable again.
    Replaced(String, PathBuf),
}

/// Errors starting the catalog.
#[derive(Debug, Error)]
pub enum CatalogError {
    /// The folder cannot be read.
    #[error("cannot read the videos folder {dir}: {source}")]
    Folder {
        /// The folder.
        dir: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The watcher cannot be set up.
    #[error("cannot watch {dir}: {source}")]
    Watch {
        /// The folder.
        dir: PathBuf,
        /// notify's error.
        source: notify::Error,
    },
}

/// Whether `rel` (a path relative to the videos folder) is hidden or a temporary file.
pub fn is_ignored(rel: &Path) -> bool {
    let hidden = rel.components().any(|c| match c {
        Component::Normal(s) => s.to_string_lossy().starts_with('.'),
        _ => false,
    });
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    hidden
        || name.starts_with('#')
        || name.ends_with('~')
        || [
            ".tmp",
            ".part",
            ".partial",
            ".crdownload",
            ".swp",
            ".download",
        ]
        .iter()
        .any(|e| name.ends_with(e))
}

/// The channel name of `rel` (relative path without extension, `/`-separated).
pub fn channel_name(rel: &Path) -> String {
    let no_ext = rel.with_extension("");
    no_ext
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

type Sig = (u64, Option<SystemTime>);

#[derive(Debug)]
struct State {
    dir: PathBuf,
    ignore: Vec<PathBuf>,
    /// Announced files: path → (name, signature).
    known: HashMap<PathBuf, (String, Sig)>,
    /// Changed files waiting to be stable: path → (signature, first seen with it).
    pending: HashMap<PathBuf, (Sig, Instant)>,
}

impl State {
    fn scan(&self) -> HashMap<PathBuf, Sig> {
        let mut out = HashMap::new();
        let mut stack = vec![self.dir.clone()];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                let Ok(rel) = p.strip_prefix(&self.dir) else {
                    continue;
                };
                if is_ignored(rel) || self.ignore.iter().any(|i| p.starts_with(i)) {
                    continue;
                }
                let Ok(meta) = std::fs::metadata(&p) else {
                    continue;
                };
                if meta.is_dir() {
                    stack.push(p);
                } else if meta.is_file() {
                    out.insert(p, (meta.len(), meta.modified().ok()));
                }
            }
        }
        out
    }

    /// Rescans and returns the events due at `now`, and whether files are still settling.
    fn diff(&mut self, now: Instant) -> (Vec<CatalogEvent>, bool) {
        let found = self.scan();
        let mut events = Vec::new();
        let gone: Vec<PathBuf> = self
            .known
            .keys()
            .filter(|p| !found.contains_key(*p))
            .cloned()
            .collect();
        for p in gone {
            if let Some((name, _)) = self.known.remove(&p) {
                events.push(CatalogEvent::Removed(name));
            }
        }
        self.pending.retain(|p, _| found.contains_key(p));
        for (p, sig) in found {
            if self.known.get(&p).is_some_and(|(_, s)| *s == sig) {
                self.pending.remove(&p);
                continue;
            }
            match self.pending.get(&p) {
                Some((s, since)) if *s == sig => {
                    if now.duration_since(*since) < STABLE_FOR {
                        continue;
                    }
                }
                _ => {
                    self.pending.insert(p, (sig, now));
                    continue;
                }
            }
            self.pending.remove(&p);
            let rel = p.strip_prefix(&self.dir).unwrap_or(&p);
            let name = channel_name(rel);
            match self.known.get_mut(&p) {
                Some(entry) => {
                    entry.1 = sig;
                    events.push(CatalogEvent::Replaced(name, p));
                }
                None => {
                    if let Some((other, _)) = self.known.iter().find(|(_, (n, _))| *n == name) {
                        warn!(file = %p.display(), other = %other.display(), channel = %name,
                              "two files give the same channel name; ignoring this one");
                        // Remember it so the warning is not repeated.
                        self.known.insert(p, (format!("\0dup:{name}"), sig));
                        continue;
                    }
                    self.known.insert(p.clone(), (name.clone(), sig));
                    events.push(CatalogEvent::Added(name, p));
                }
            }
        }
        events.retain(|e| !matches!(e, CatalogEvent::Removed(n) if n.starts_with("\0dup:")));
        (events, !self.pending.is_empty())
    }
}

/// Watches a videos folder.
#[derive(Debug)]
pub struct Catalog;

impl Catalog {
    /// Starts watching `dir` recursively (ignoring hidden and temporary files and the folders
    /// in `ignore`, e.g. a cache dir placed inside it) and returns the event stream; the
    /// initial scan's files arrive as [`CatalogEvent::Added`] after [`STABLE_FOR`]. The task
    /// stops on `cancel` or when the receiver is dropped.
    pub fn start(
        dir: PathBuf,
        ignore: Vec<PathBuf>,
        cancel: CancellationToken,
    ) -> Result<mpsc::Receiver<CatalogEvent>, CatalogError> {
        std::fs::read_dir(&dir).map_err(|source| CatalogError::Folder {
            dir: dir.clone(),
            source,
        })?;
        let dir = dir.canonicalize().unwrap_or(dir);
        let ignore = ignore
            .into_iter()
            .map(|p| p.canonicalize().unwrap_or(p))
            .collect();
        let wake = Arc::new(Notify::new());
        let w = wake.clone();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                w.notify_one();
            }
        })
        .map_err(|source| CatalogError::Watch {
            dir: dir.clone(),
            source,
        })?;
        notify::Watcher::watch(&mut watcher, &dir, notify::RecursiveMode::Recursive).map_err(
            |source| CatalogError::Watch {
                dir: dir.clone(),
                source,
            },
        )?;
        let (tx, rx) = mpsc::channel(256);
        let mut state = State {
            dir,
            ignore,
            known: HashMap::new(),
            pending: HashMap::new(),
        };
        tokio::spawn(async move {
            let _watcher = watcher;
            loop {
                let (events, settling) = state.diff(Instant::now());
                for e in events {
                    debug!(event = ?e, "catalog");
                    if tx.send(e).await.is_err() {
                        return;
                    }
                }
                let wait = if settling {
                    STABLE_FOR / 3
                } else {
                    RESCAN_EVERY
                };
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tx.closed() => return,
                    _ = wake.notified() => {
                        // Let a burst of notifications settle into one rescan.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ignores() {
        assert_eq!(
            channel_name(Path::new("sports/match.mp4")),
            "sports/match".to_string()
        );
        assert_eq!(channel_name(Path::new("news.mkv")), "news");
        assert!(is_ignored(Path::new(".pessi-cache/abc.ts")));
        assert!(is_ignored(Path::new("a/.hidden.mp4")));
        assert!(is_ignored(Path::new("movie.mp4.part")));
        assert!(is_ignored(Path::new("x.tmp")));
        assert!(!is_ignored(Path::new("sports/match.mp4")));
    }

    async fn next(rx: &mut mpsc::Receiver<CatalogEvent>) -> CatalogEvent {
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("event within 2 s")
            .expect("catalog running")
    }

    #[tokio::test]
    async fn add_remove_replace_within_two_seconds() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::write(root.join("first.mp4"), b"one").unwrap();
        std::fs::create_dir_all(root.join(".pessi-cache")).unwrap();
        std::fs::write(root.join(".pessi-cache/x.ts"), b"cache").unwrap();
        let cancel = CancellationToken::new();
        let mut rx = Catalog::start(root.clone(), vec![], cancel.clone()).unwrap();
        assert_eq!(
            next(&mut rx).await,
            CatalogEvent::Added("first".into(), root.join("first.mp4"))
        );
        std::fs::create_dir_all(root.join("sports")).unwrap();
        std::fs::write(root.join("sports/match.mkv"), b"two").unwrap();
        std::fs::write(root.join("sports/match.mkv.part"), b"ignored").unwrap();
        assert_eq!(
            next(&mut rx).await,
            CatalogEvent::Added("sports/match".into(), root.join("sports/match.mkv"))
        );
        std::fs::write(root.join("first.mp4"), b"one, longer").unwrap();
        assert_eq!(
            next(&mut rx).await,
            CatalogEvent::Replaced("first".into(), root.join("first.mp4"))
        );
        std::fs::remove_file(root.join("sports/match.mkv")).unwrap();
        assert_eq!(
            next(&mut rx).await,
            CatalogEvent::Removed("sports/match".into())
        );
        // A file still growing is not announced until it stops changing.
        let growing = root.join("big.mp4");
        let mut last_write = Instant::now();
        for i in 0..6 {
            std::fs::write(&growing, vec![0u8; 1000 * (i + 1)]).unwrap();
            last_write = Instant::now();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let e = next(&mut rx).await;
        assert_eq!(e, CatalogEvent::Added("big".into(), growing.clone()));
        assert!(last_write.elapsed() >= STABLE_FOR - Duration::from_millis(50));
        assert_eq!(std::fs::metadata(&growing).unwrap().len(), 6000);
        cancel.cancel();
    }
}
