//! [`ChannelManager`]: owns the catalog, the transcode cache and the per-channel playout or
//! live tasks, so the server's `main.rs` only wires it to the overlay.
//!
//! * Files found in the videos folder are transcoded in the background, one at a time (one
//!   ffmpeg uses the cores well enough), and a channel is announced only once its cache entry
//!   is ready. A replaced file keeps playing its old version until the new one is ready.
//! * Live sources (`--source NAME=INPUT`) are announced at once.
//! * Nothing plays unless watched: [`ChannelManager::set_watched`] starts and stops the
//!   playout task or the live ffmpeg, so an unwatched channel costs nothing.

use crate::catalog::{Catalog, CatalogError, CatalogEvent};
use crate::ffmpeg::{EncodeSettings, Ffmpeg, FfmpegError};
use crate::live::LiveSource;
use crate::playout::{ChunkSink, Playout};
use crate::transcode::{probe, TranscodeCache, TranscodeError, CACHE_DIR_NAME};
use crate::Chunk;
use bytes::Bytes;
use common::wire::{ChannelId, ChannelInfo};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// What the server serves.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Folder of video files (watched recursively), if any.
    pub videos: Option<PathBuf>,
    /// Transcode cache folder; default `<videos>/.pessi-cache`.
    pub cache_dir: Option<PathBuf>,
    /// Live sources as `(name, input)` (see [`crate::live`] for the input syntax).
    pub sources: Vec<(String, String)>,
    /// Keyframe interval in seconds.
    pub keyint_secs: f64,
}

/// One datagram of one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelChunk {
    /// The channel.
    pub channel: ChannelId,
    /// 1316 bytes of TS.
    pub payload: Bytes,
    /// Starts a keyframe (set `video_flags::KEYFRAME`).
    pub keyframe: bool,
}

/// Errors starting the manager.
#[derive(Debug, Error)]
pub enum ManagerError {
    /// FFmpeg is missing.
    #[error(transparent)]
    Ffmpeg(#[from] FfmpegError),
    /// The videos folder cannot be watched.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The cache folder cannot be created.
    #[error(transparent)]
    Cache(#[from] TranscodeError),
    /// Nothing to serve.
    #[error("nothing to serve: give a videos folder and/or live sources")]
    NothingToServe,
    /// The keyframe interval is not a positive number of seconds.
    #[error("keyframe interval must be > 0 s, got {0}")]
    BadKeyint(f64),
    /// Two channels with the same name.
    #[error("duplicate channel name {0:?}")]
    DuplicateName(String),
}

#[derive(Debug, Clone)]
enum Source {
    /// A file whose stream-ready cache exists: paced playout.
    File { cached: PathBuf },
    /// A valid file whose cache is still being made: announced at once, and if watched before
    /// the cache is ready, encoded live from the file (looping) in the meantime.
    Transcoding { file: PathBuf },
    /// A live input, encoded while watched.
    Live(String),
}

#[derive(Debug)]
struct Entry {
    name: String,
    source: Source,
    running: Option<CancellationToken>,
    /// Set while a live fallback plays a file whose cache is not ready (see [`Splice`]).
    splice: Option<Arc<Splice>>,
}

/// The hand-over from a file's live fallback to its cached playout. When the cache becomes
/// ready while the fallback plays, the action is armed; the fallback's sink runs it at its next
/// keyframe datagram (and stops there), so the stream switches at a frame boundary: no viewer
/// sees a truncated frame at the junction, and the file is not re-encoded for ever.
#[derive(Default)]
struct Splice {
    action: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl std::fmt::Debug for Splice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Splice")
    }
}

#[derive(Debug, Default)]
struct State {
    channels: HashMap<ChannelId, Entry>,
    watched: HashSet<ChannelId>,
}

struct Inner {
    ffmpeg: Ffmpeg,
    settings: EncodeSettings,
    tx: mpsc::Sender<ChannelChunk>,
    state: Mutex<State>,
    changes: watch::Sender<Vec<ChannelInfo>>,
    cancel: CancellationToken,
}

/// Owns every channel of this server (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct ChannelManager {
    inner: Arc<Inner>,
}

struct Tagged {
    id: ChannelId,
    tx: mpsc::Sender<ChannelChunk>,
    splice: Option<Arc<Splice>>,
}

impl ChunkSink for Tagged {
    async fn send(&mut self, chunk: Chunk) -> bool {
        if chunk.keyframe {
            let armed = self
                .splice
                .as_ref()
                .and_then(|s| s.action.lock().expect("splice lock").take());
            if let Some(hand_over) = armed {
                hand_over();
                return false;
            }
        }
        self.tx
            .send(ChannelChunk {
                channel: self.id,
                payload: chunk.payload,
                keyframe: chunk.keyframe,
            })
            .await
            .is_ok()
    }
}

/// Capacity of the output channel (≈ 0.5 s of a few channels).
pub const OUTPUT_CAPACITY: usize = 1024;

impl ChannelManager {
    /// Finds FFmpeg, picks the encoder, announces live sources, and starts watching and
    /// transcoding the videos folder in the background. Returns the manager and the single
    /// stream of every watched channel's datagrams. Everything stops on `cancel`.
    pub async fn start(
        cfg: ManagerConfig,
        cancel: CancellationToken,
    ) -> Result<(ChannelManager, mpsc::Receiver<ChannelChunk>), ManagerError> {
        if cfg.videos.is_none() && cfg.sources.is_empty() {
            return Err(ManagerError::NothingToServe);
        }
        if !(cfg.keyint_secs > 0.0 && cfg.keyint_secs.is_finite()) {
            return Err(ManagerError::BadKeyint(cfg.keyint_secs));
        }
        let ffmpeg = Ffmpeg::discover()?;
        let encoder = ffmpeg.h264_encoder().await;
        let settings = EncodeSettings::new(encoder, cfg.keyint_secs);
        let (tx, rx) = mpsc::channel(OUTPUT_CAPACITY);
        let mut state = State::default();
        for (name, input) in &cfg.sources {
            let id = ChannelId::of_name(name);
            if state.channels.contains_key(&id) {
                return Err(ManagerError::DuplicateName(name.clone()));
            }
            info!(channel = %name, input = %input, "live source announced");
            state.channels.insert(
                id,
                Entry {
                    name: name.clone(),
                    source: Source::Live(input.clone()),
                    running: None,
                    splice: None,
                },
            );
        }
        let (changes, _) = watch::channel(Vec::new());
        let mgr = ChannelManager {
            inner: Arc::new(Inner {
                ffmpeg: ffmpeg.clone(),
                settings: settings.clone(),
                tx,
                state: Mutex::new(state),
                changes,
                cancel: cancel.clone(),
            }),
        };
        mgr.publish();
        if let Some(videos) = cfg.videos {
            let cache_dir = cfg.cache_dir.unwrap_or_else(|| videos.join(CACHE_DIR_NAME));
            let cache = TranscodeCache::new(cache_dir.clone(), ffmpeg, settings)?;
            info!(folder = %videos.display(), cache = %cache_dir.display(), "serving videos folder");
            let events = Catalog::start(videos, vec![cache_dir], cancel.clone())?;
            tokio::spawn(mgr.clone().files_task(events, cache));
        }
        Ok((mgr, rx))
    }

    /// The channels announced now, sorted by name.
    pub fn channels(&self) -> Vec<ChannelInfo> {
        let st = self.inner.state.lock().expect("state lock");
        let mut v: Vec<ChannelInfo> = st
            .channels
            .iter()
            .map(|(id, e)| ChannelInfo {
                id: *id,
                name: e.name.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// A receiver that sees the channel list every time it changes.
    pub fn changes(&self) -> watch::Receiver<Vec<ChannelInfo>> {
        self.inner.changes.subscribe()
    }

    /// Whether a channel's playout or live ffmpeg is running.
    pub fn is_running(&self, id: ChannelId) -> bool {
        let st = self.inner.state.lock().expect("state lock");
        st.channels.get(&id).is_some_and(|e| e.running.is_some())
    }

    /// Starts (`true`) or stops (`false`) sending a channel. Watching a channel not announced
    /// yet is remembered: it starts when it appears.
    pub fn set_watched(&self, id: ChannelId, watched: bool) {
        let mut st = self.inner.state.lock().expect("state lock");
        if watched {
            st.watched.insert(id);
            self.start_locked(&mut st, id);
        } else {
            st.watched.remove(&id);
            if let Some(e) = st.channels.get_mut(&id) {
                if let Some(t) = e.running.take() {
                    info!(channel = %e.name, "channel no longer watched; stopping");
                    t.cancel();
                }
            }
        }
    }

    fn start_locked(&self, st: &mut State, id: ChannelId) {
        let Some(e) = st.channels.get_mut(&id) else {
            return;
        };
        if e.running.is_some() {
            return;
        }
        let token = self.inner.cancel.child_token();
        let splice = matches!(e.source, Source::Transcoding { .. }).then(Arc::<Splice>::default);
        e.splice = splice.clone();
        let sink = Tagged {
            id,
            tx: self.inner.tx.clone(),
            splice,
        };
        info!(channel = %e.name, "channel watched; starting");
        match &e.source {
            Source::File { cached } => {
                Playout::start(e.name.clone(), cached.clone(), sink, token.clone());
            }
            Source::Transcoding { file } => {
                info!(channel = %e.name, "cache not ready yet: encoding the file live meanwhile");
                LiveSource::start(
                    e.name.clone(),
                    file.to_string_lossy().into_owned(),
                    self.inner.ffmpeg.clone(),
                    self.inner.settings.clone(),
                    sink,
                    token.clone(),
                );
            }
            Source::Live(input) => {
                LiveSource::start(
                    e.name.clone(),
                    input.clone(),
                    self.inner.ffmpeg.clone(),
                    self.inner.settings.clone(),
                    sink,
                    token.clone(),
                );
            }
        }
        e.running = Some(token);
    }

    fn publish(&self) {
        let list = self.channels();
        self.inner.changes.send_if_modified(|cur| {
            if *cur != list {
                *cur = list;
                true
            } else {
                false
            }
        });
    }

    /// Sets a file channel's cached file (new or replaced); restarts it if it was playing.
    fn file_ready(&self, name: &str, cached: PathBuf) {
        let id = ChannelId::of_name(name);
        let mut st = self.inner.state.lock().expect("state lock");
        if let Some(e) = st.channels.get(&id) {
            if matches!(e.source, Source::Live(_)) {
                warn!(
                    channel = name,
                    "a file has the name of a live source; ignoring the file"
                );
                return;
            }
        }
        // A live fallback that is playing hands over to the cache at its next keyframe.
        if let Some(e) = st.channels.get_mut(&id) {
            if let (Source::Transcoding { .. }, Some(_), Some(splice)) =
                (&e.source, &e.running, &e.splice)
            {
                e.source = Source::File { cached };
                let mgr = self.clone();
                *splice.action.lock().expect("splice lock") =
                    Some(Box::new(move || mgr.hand_over(id)));
                info!(
                    channel = name,
                    "cache ready: switching from the live encode at the next keyframe"
                );
                drop(st);
                self.publish();
                return;
            }
        }
        let old = st.channels.insert(
            id,
            Entry {
                name: name.to_string(),
                source: Source::File { cached },
                running: None,
                splice: None,
            },
        );
        if let Some(t) = old.and_then(|o| o.running) {
            t.cancel();
        }
        if st.watched.contains(&id) {
            self.start_locked(&mut st, id);
        }
        drop(st);
        self.publish();
    }

    /// Stops a channel's live fallback and starts its cached playout (called by the fallback's
    /// sink at a keyframe boundary).
    fn hand_over(&self, id: ChannelId) {
        let mut st = self.inner.state.lock().expect("state lock");
        if let Some(e) = st.channels.get_mut(&id) {
            if let Some(t) = e.running.take() {
                t.cancel();
            }
            e.splice = None;
        }
        if st.watched.contains(&id) {
            self.start_locked(&mut st, id);
        }
    }

    /// A new file passed validation while its cache is not ready: announce it now (a file added
    /// appears in the clients' lists within a couple of seconds, however long it takes to
    /// transcode).
    fn file_validated(&self, name: &str, file: PathBuf) {
        let id = ChannelId::of_name(name);
        let mut st = self.inner.state.lock().expect("state lock");
        if st.channels.contains_key(&id) || !file.exists() {
            return;
        }
        st.channels.insert(
            id,
            Entry {
                name: name.to_string(),
                source: Source::Transcoding { file },
                running: None,
                splice: None,
            },
        );
        if st.watched.contains(&id) {
            self.start_locked(&mut st, id);
        }
        drop(st);
        info!(
            channel = name,
            "channel announced (transcoding in the background)"
        );
        self.publish();
    }

    fn file_removed(&self, name: &str, cache: &TranscodeCache) {
        let id = ChannelId::of_name(name);
        let mut st = self.inner.state.lock().expect("state lock");
        let file_entry = match st.channels.get(&id).map(|e| &e.source) {
            Some(Source::File { cached }) => {
                cache.forget(cached);
                true
            }
            Some(Source::Transcoding { .. }) => true,
            _ => false,
        };
        if file_entry {
            if let Some(e) = st.channels.remove(&id) {
                if let Some(t) = e.running {
                    t.cancel();
                }
            }
            info!(channel = name, "channel removed");
        }
        drop(st);
        self.publish();
    }

    /// A file that was announced early turned out unusable: withdraw it.
    fn file_failed(&self, name: &str) {
        let id = ChannelId::of_name(name);
        let mut st = self.inner.state.lock().expect("state lock");
        if matches!(
            st.channels.get(&id).map(|e| &e.source),
            Some(Source::Transcoding { .. })
        ) {
            if let Some(t) = st.channels.remove(&id).and_then(|e| e.running) {
                t.cancel();
            }
        }
        drop(st);
        self.publish();
    }

    async fn files_task(self, mut events: mpsc::Receiver<CatalogEvent>, cache: TranscodeCache) {
        // Transcoding runs in its own task, one file at a time, so removals are handled
        // while a long transcode runs.
        let (jobs_tx, mut jobs) = mpsc::unbounded_channel::<(String, PathBuf)>();
        let worker = {
            let mgr = self.clone();
            let cache = cache.clone();
            async move {
                while let Some((name, path)) = jobs.recv().await {
                    if !path.exists() {
                        continue;
                    }
                    match cache.ensure(&path, &mgr.inner.cancel).await {
                        Ok(cached) => {
                            if path.exists() {
                                info!(channel = %name, file = %path.display(), "channel ready");
                                mgr.file_ready(&name, cached);
                            }
                        }
                        Err(TranscodeError::Cancelled(_)) => return,
                        Err(e) => {
                            warn!(channel = %name, error = %e, "file skipped");
                            mgr.file_failed(&name);
                        }
                    }
                }
            }
        };
        tokio::spawn(worker);
        while let Some(ev) = events.recv().await {
            match ev {
                CatalogEvent::Added(name, path) | CatalogEvent::Replaced(name, path) => {
                    // Validate (fast) and announce before the (slow) transcode, unless the
                    // cache is already there.
                    let cached = cache.cache_path(&path).is_ok_and(|p| p.is_file());
                    if !cached {
                        let mgr = self.clone();
                        let (name, path) = (name.clone(), path.clone());
                        tokio::spawn(async move {
                            match probe(&mgr.inner.ffmpeg, &path).await {
                                Ok(_) => mgr.file_validated(&name, path),
                                // Reported (by name) when the transcode job probes it.
                                Err(e) => debug!(channel = %name, error = %e, "validation failed"),
                            }
                        });
                    }
                    let _ = jobs_tx.send((name, path));
                }
                CatalogEvent::Removed(name) => self.file_removed(&name, &cache),
            }
        }
    }
}
