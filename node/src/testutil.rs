//! Helpers shared by the unit tests of the node crate.

use common::wire::PathHop;
use common::NodeId;
use std::net::SocketAddr;

/// Host `n` of the unit tests: id `n`, address `127.0.0.n:8010`.
pub(crate) fn hop(n: u8) -> PathHop {
    PathHop {
        id: NodeId(u64::from(n)),
        addr: SocketAddr::from(([127, 0, 0, n], 8010)),
    }
}
