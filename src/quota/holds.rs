//! Open holds: tokens a site has asked to spend and not yet spent. Each counts against the
//! limits until the event that carries its id settles it, it is released, or it expires.

use std::collections::{BTreeSet, HashMap};

use uuid::Uuid;

/// Most holds open at once: a client that takes holds and never settles them fills this,
/// not the agent's memory.
pub const MAX_OPEN_HOLDS: usize = 100_000;

/// One open hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    pub user_id: u64,
    pub tokens: u64,
    /// Unix ms after which the hold no longer counts.
    pub expires_ms: i64,
}

/// The open holds, with their sums per user and for the site kept as they change.
#[derive(Debug, Default)]
pub struct Holds {
    by_id: HashMap<Uuid, Hold>,
    by_expiry: BTreeSet<(i64, Uuid)>,
    site: u64,
    users: HashMap<u64, u64>,
}

impl Holds {
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.by_id.len() >= MAX_OPEN_HOLDS
    }

    /// Tokens held for the whole site.
    pub fn site(&self) -> u64 {
        self.site
    }

    /// Tokens held for one user.
    pub fn user(&self, user_id: u64) -> u64 {
        self.users.get(&user_id).copied().unwrap_or(0)
    }

    pub fn insert(&mut self, id: Uuid, hold: Hold) {
        self.by_id.insert(id, hold);
        self.by_expiry.insert((hold.expires_ms, id));
        self.site += hold.tokens;
        *self.users.entry(hold.user_id).or_default() += hold.tokens;
    }

    /// Takes a hold out (settled or released); `None` when it is not open.
    pub fn remove(&mut self, id: Uuid) -> Option<Hold> {
        let hold = self.by_id.remove(&id)?;
        self.by_expiry.remove(&(hold.expires_ms, id));
        self.site -= hold.tokens;
        if let Some(user) = self.users.get_mut(&hold.user_id) {
            *user -= hold.tokens;
            if *user == 0 {
                self.users.remove(&hold.user_id);
            }
        }
        Some(hold)
    }

    /// Releases every hold that expired at or before `now_ms`.
    pub fn expire(&mut self, now_ms: i64) {
        while let Some(&(expires_ms, id)) = self.by_expiry.first() {
            if expires_ms > now_ms {
                break;
            }
            self.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_follow_inserts_removals_and_expiry() {
        let mut holds = Holds::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        holds.insert(
            a,
            Hold {
                user_id: 1,
                tokens: 100,
                expires_ms: 1_000,
            },
        );
        holds.insert(
            b,
            Hold {
                user_id: 2,
                tokens: 50,
                expires_ms: 2_000,
            },
        );
        assert_eq!((holds.site(), holds.user(1), holds.user(2)), (150, 100, 50));
        holds.expire(999);
        assert_eq!(holds.len(), 2);
        holds.expire(1_000);
        assert_eq!((holds.len(), holds.site(), holds.user(1)), (1, 50, 0));
        assert_eq!(holds.remove(a), None, "an expired hold is gone");
        assert_eq!(holds.remove(b).map(|h| h.tokens), Some(50));
        assert_eq!((holds.len(), holds.site(), holds.user(2)), (0, 0, 0));
    }
}
