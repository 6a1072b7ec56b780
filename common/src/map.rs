//! The hash maps of the data path: std's `HashMap` / `HashSet` with foldhash's seeded hasher
//! instead of SipHash. A relay looks peers, sessions, subscribers and channels up several
//! times per datagram it forwards, for each subscriber: SipHash was about a tenth of the cost
//! of a sealed copy. The seed is random per process (keys chosen by peers, such as viewer ids,
//! cannot be aimed at one bucket from outside).

/// A hash map with the data path's hasher (build with `Map::default()`).
pub type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A hash set with the data path's hasher (build with `Set::default()`).
pub type Set<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;
