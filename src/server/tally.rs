//! Per-identity counts: how many places one peer address or one guest's tokens hold.
//!
//! Owns [`Tally`], a map from an identity to the number of places it holds, each place a
//! [`Place`] given back on drop. The map's lock is held for a lookup and an increment, never
//! across an `.await`; an identity whose count drops to zero leaves the map, so the map holds
//! only identities with something in progress (its size is bounded by the places themselves).
//! It never decides what an identity is: callers pass the key.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Places held per identity, each identity under the same limit.
pub struct Tally<K: Eq + Hash + Clone> {
    limit: u32,
    /// Held only to look up and change one count (a few instructions; see the module doc).
    counts: Mutex<HashMap<K, u32>>,
}

impl<K: Eq + Hash + Clone> Tally<K> {
    pub fn new(limit: u32) -> Arc<Self> {
        Arc::new(Self {
            limit,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// The limit every identity is held to.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// One more place for `key`, or `None` when it holds `limit` already.
    pub fn take(self: &Arc<Self>, key: K) -> Option<Place<K>> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(key.clone()).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(Place {
            tally: self.clone(),
            key: Some(key),
        })
    }

    /// Places `key` holds now.
    #[cfg(test)]
    pub fn held(&self, key: &K) -> u32 {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(key).copied().unwrap_or(0)
    }

    /// Identities holding at least one place.
    #[cfg(test)]
    pub fn identities(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn give_back(&self, key: &K) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(key);
            }
        }
    }
}

/// One place of one identity, given back on drop.
pub struct Place<K: Eq + Hash + Clone> {
    tally: Arc<Tally<K>>,
    key: Option<K>,
}

impl<K: Eq + Hash + Clone> Drop for Place<K> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.tally.give_back(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_identity_has_its_own_limit_and_leaves_at_zero() {
        let tally = Tally::new(2);
        let a1 = tally.take("a").unwrap();
        let _a2 = tally.take("a").unwrap();
        assert!(tally.take("a").is_none(), "a third place for a");
        let b = tally.take("b").expect("b is not charged for a");
        assert_eq!((tally.held(&"a"), tally.held(&"b")), (2, 1));
        drop(a1);
        assert_eq!(tally.held(&"a"), 1);
        assert!(tally.take("a").is_some(), "a freed place is taken again");
        drop(b);
        assert_eq!(tally.held(&"b"), 0);
        assert_eq!(tally.identities(), 1, "b left the map at zero");
    }
}
