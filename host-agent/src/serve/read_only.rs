//! The read-only (`control_group`) clients' share of the control socket:
//! a pool of connections and one of work slots for all of them, apart
//! from root's, and within those a cap per uid, so that one member (one
//! reading its `status` replies slowly, say) cannot keep the others out.
//! A uid over its cap gets `busy` naming the per-user limit; the others
//! never wait behind more than one request of each other uid.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Read-only connections open at once; more are answered `busy` at once,
/// so that they cannot fill the socket's connection slots.
pub const CONNECTIONS: usize = 16;
/// Read-only requests worked on at once.
pub const WORK: usize = 4;
/// Of `CONNECTIONS`, the most one uid holds: four users fill the pool.
pub const CONNECTIONS_PER_USER: usize = CONNECTIONS / 4;
/// Of `WORK`, the most one uid holds: a status request is quick for a
/// client that reads its reply, and one that does not holds one slot, not
/// the pool. A uid's further requests wait for its own slot.
pub const WORK_PER_USER: usize = 1;

/// Why a read-only client got `busy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// The uid already holds `CONNECTIONS_PER_USER` connections.
    UserConnections,
    /// All `CONNECTIONS` are held (by at least four uids).
    Connections,
    /// The uid's own work slot stayed taken by its other request.
    UserWork,
    /// All `WORK` slots stayed taken by other uids' requests.
    Work,
}

impl Busy {
    /// The `busy` reply's text: who, which limit, what happened.
    pub fn reason(self, uid: u32, waited: Duration) -> String {
        match self {
            Busy::UserConnections => format!(
                "uid {uid} already has {CONNECTIONS_PER_USER} read-only (control_group) \
                 connections open, the limit per user; nothing was done, try again when \
                 one of them has finished"
            ),
            Busy::Connections => format!(
                "{CONNECTIONS} read-only (control_group) connections were open; nothing \
                 was done, try again"
            ),
            Busy::UserWork => format!(
                "uid {uid}'s read-only work slot ({WORK_PER_USER} per user) stayed taken by \
                 its own other request for {waited:?}; nothing was done, try again"
            ),
            Busy::Work => format!(
                "all {WORK} work slots for read-only (control_group) requests stayed taken \
                 for {waited:?}; nothing was done, try again"
            ),
        }
    }
}

type Users = Arc<Mutex<HashMap<u32, User>>>;

/// A uid with at least one connection open.
struct User {
    connections: usize,
    work: Arc<Semaphore>,
}

/// The pools; one per daemon.
pub struct Pools {
    connections: Arc<Semaphore>,
    work: Arc<Semaphore>,
    users: Users,
}

/// One admitted read-only connection; gives its slots back when dropped.
pub struct Connection {
    uid: u32,
    users: Users,
    user_work: Arc<Semaphore>,
    work: Arc<Semaphore>,
    /// Given back in `drop`, under the users lock with the uid's count.
    slot: Option<OwnedSemaphorePermit>,
}

/// A work slot held by a read-only request: one of its uid's and one of
/// the pool's.
pub struct Work {
    _user: OwnedSemaphorePermit,
    _pool: OwnedSemaphorePermit,
}

impl Default for Pools {
    fn default() -> Self {
        Pools {
            connections: Arc::new(Semaphore::new(CONNECTIONS)),
            work: Arc::new(Semaphore::new(WORK)),
            users: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl Pools {
    /// Admits a connection of `uid`, or says at once which limit it is over.
    pub fn connect(&self, uid: u32) -> Result<Connection, Busy> {
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        if users
            .get(&uid)
            .is_some_and(|u| u.connections >= CONNECTIONS_PER_USER)
        {
            return Err(Busy::UserConnections);
        }
        let slot = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| Busy::Connections)?;
        let user = users.entry(uid).or_insert_with(|| User {
            connections: 0,
            work: Arc::new(Semaphore::new(WORK_PER_USER)),
        });
        user.connections += 1;
        Ok(Connection {
            uid,
            users: self.users.clone(),
            user_work: user.work.clone(),
            work: self.work.clone(),
            slot: Some(slot),
        })
    }
}

impl Connection {
    /// Waits at most `wait` in all for a work slot: first its uid's own
    /// (so that each uid has at most one request waiting on the pool, and
    /// the pool's queue serves uids in turn), then the pool's.
    pub async fn work(&self, wait: Duration) -> Result<Work, Busy> {
        let deadline = tokio::time::Instant::now() + wait;
        let user =
            match tokio::time::timeout_at(deadline, self.user_work.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                _ => return Err(Busy::UserWork),
            };
        let pool = match tokio::time::timeout_at(deadline, self.work.clone().acquire_owned()).await
        {
            Ok(Ok(p)) => p,
            _ => return Err(Busy::Work),
        };
        Ok(Work {
            _user: user,
            _pool: pool,
        })
    }
}

impl Drop for Connection {
    /// The pool slot goes back before the uid's count, both under the
    /// lock `connect` takes: a slot given back after the lock, as a field
    /// dropped after this, left a moment when the count was already lower
    /// and the pool still full, and a connect then was told `busy`.
    fn drop(&mut self) {
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        drop(self.slot.take());
        if let Some(u) = users.get_mut(&self.uid) {
            u.connections = u.connections.saturating_sub(1);
            if u.connections == 0 {
                users.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_uid_holds_at_most_its_share_of_the_connections() {
        let pools = Pools::default();
        let mine: Vec<Connection> = (0..CONNECTIONS_PER_USER)
            .map(|_| pools.connect(1000).unwrap())
            .collect();
        assert_eq!(pools.connect(1000).err(), Some(Busy::UserConnections));
        // The others fill the rest, and then everyone is told the pool is
        // full, the full uid its own limit first.
        let others: Vec<Connection> = (0..CONNECTIONS - CONNECTIONS_PER_USER)
            .map(|i| {
                pools
                    .connect(2000 + (i / CONNECTIONS_PER_USER) as u32)
                    .unwrap()
            })
            .collect();
        assert_eq!(pools.connect(3000).err(), Some(Busy::Connections));
        assert_eq!(pools.connect(1000).err(), Some(Busy::UserConnections));
        drop(others);
        // A closed connection gives its uid's count back, and a uid with
        // none open leaves no entry behind.
        drop(mine);
        assert!(pools.users.lock().unwrap().is_empty());
        assert_eq!(pools.connections.available_permits(), CONNECTIONS);
        let again: Vec<Connection> = (0..CONNECTIONS_PER_USER)
            .map(|_| pools.connect(1000).unwrap())
            .collect();
        assert_eq!(again.len(), CONNECTIONS_PER_USER);
    }

    /// A closing connection gives its pool slot back together with its
    /// uid's count, under the same lock: a uid connecting at that moment
    /// never finds the count already lowered and the slot still taken
    /// (found in review: the slot came back after the lock was released,
    /// so a connect racing the close could be told the pool was full).
    /// A race by nature, so it is run many times; with the old order it
    /// failed in each of 9 runs here, by round 600.
    #[test]
    fn a_closing_connection_gives_its_slot_back_with_its_count() {
        let pools = Pools::default();
        let _others: Vec<Connection> = (0..CONNECTIONS - 1)
            .map(|i| {
                pools
                    .connect(2000 + (i / CONNECTIONS_PER_USER) as u32)
                    .unwrap()
            })
            .collect();
        for round in 0..5000 {
            let closing = pools.connect(1000).unwrap();
            assert_eq!(pools.connect(3000).err(), Some(Busy::Connections));
            let barrier = std::sync::Barrier::new(2);
            let spurious = std::thread::scope(|s| {
                let b = &barrier;
                s.spawn(move || {
                    b.wait();
                    drop(closing);
                });
                barrier.wait();
                // Spin first, to meet the close while it runs; then let
                // the closing thread have the core on a loaded machine.
                let mut tries = 0u32;
                loop {
                    let gone = !pools.users.lock().unwrap().contains_key(&1000);
                    match pools.connect(3000) {
                        Ok(_) => return false,
                        Err(Busy::Connections) if gone => return true,
                        Err(_) if tries < 1000 => std::hint::spin_loop(),
                        Err(_) => std::thread::yield_now(),
                    }
                    tries += 1;
                }
            });
            assert!(
                !spurious,
                "round {round}: uid 1000's count was gone but its slot not yet back"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_uid_holds_one_work_slot_and_others_still_get_theirs() {
        let pools = Pools::default();
        let a: Vec<Connection> = (0..CONNECTIONS_PER_USER)
            .map(|_| pools.connect(1000).unwrap())
            .collect();
        let held = a[0].work(Duration::from_secs(30)).await.unwrap();
        // Its second request waits for its own slot, then is told so.
        assert_eq!(
            a[1].work(Duration::from_secs(30)).await.err(),
            Some(Busy::UserWork)
        );
        // Other uids take the pool's remaining slots.
        let others: Vec<Connection> = (0..WORK - 1)
            .map(|i| pools.connect(2000 + i as u32).unwrap())
            .collect();
        let mut working = Vec::new();
        for c in &others {
            working.push(c.work(Duration::from_secs(30)).await.unwrap());
        }
        // With the pool full, a fresh uid waits for the pool, then is told.
        let late = pools.connect(3000).unwrap();
        assert_eq!(
            late.work(Duration::from_secs(30)).await.err(),
            Some(Busy::Work)
        );
        // The first uid's slot comes back when its request is done.
        drop(held);
        drop(working);
        assert!(a[1].work(Duration::from_secs(30)).await.is_ok());
    }

    #[test]
    fn every_busy_reason_names_its_limit() {
        let w = Duration::from_secs(30);
        assert!(Busy::UserConnections.reason(7, w).contains("per user"));
        assert!(Busy::UserConnections.reason(7, w).contains("uid 7"));
        assert!(Busy::UserWork.reason(7, w).contains("per user"));
        assert!(Busy::Connections.reason(7, w).contains("16 read-only"));
        assert!(Busy::Work.reason(7, w).contains("all 4 work slots"));
    }
}
