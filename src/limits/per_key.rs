//! `max_concurrent`: requests of one API key in progress at once, counted
//! from arrival until the answer's body has ended (or the client left).
//!
//! One count per key name, for the whole process; a reload keeps them.
//! Names come from the keys file, so the map is bounded by the keys issued
//! (a name's entry goes when its count is back to 0).
//!
//! Owns the counts, not what a key's limit is (its tier's plan) nor the
//! answer to a refused request (the handler's 429).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Default)]
pub struct KeyConcurrency {
    counts: Mutex<HashMap<Arc<str>, u32>>,
}

/// One request of a key in progress; counted out when dropped.
pub struct KeySlot {
    of: Arc<KeyConcurrency>,
    name: Arc<str>,
}

impl KeyConcurrency {
    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, u32>> {
        // Nothing panics while the lock is held; a poisoned one is whole.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a request of `name`, unless `max` are in progress.
    pub fn enter(self: &Arc<Self>, name: &Arc<str>, max: u32) -> Option<KeySlot> {
        let mut counts = self.lock();
        let n = counts.entry(name.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(KeySlot {
            of: self.clone(),
            name: name.clone(),
        })
    }

    /// Requests of `name` in progress now.
    #[cfg(test)]
    fn in_progress(&self, name: &str) -> u32 {
        self.lock().get(name).copied().unwrap_or(0)
    }
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        let mut counts = self.of.lock();
        if let Some(n) = counts.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_max_slots_and_they_come_back() {
        let c = Arc::new(KeyConcurrency::default());
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let one = c.enter(&a, 2).unwrap();
        let _two = c.enter(&a, 2).unwrap();
        assert!(c.enter(&a, 2).is_none());
        assert!(c.enter(&b, 2).is_some(), "another key is not affected");
        drop(one);
        assert_eq!(c.in_progress("a"), 1);
        assert!(c.enter(&a, 2).is_some());
        assert_eq!(c.in_progress("b"), 0, "entries go at 0");
    }
}
