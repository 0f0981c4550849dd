//! The paged KV cache's block manager: which pool blocks each sequence owns, and the
//! prefix cache.
//!
//! Every block is in exactly one state:
//! - **free**: on the free list, no contents worth keeping;
//! - **cached**: ref count 0 but holding a full block of known tokens (keyed by a hash
//!   chained over the parent block's hash and its own token ids), evictable in LRU order;
//! - **owned**: ref count = number of sequences whose block table holds it (> 1 when shared).
//!
//! [`BlockManager::check`] asserts exactly that (tests run it after every step).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Hash of a full block given its parent's hash (0 for the first block).
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    // SipHash with fixed keys: stable within and across runs.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    // 0 is reserved for "no parent".
    h.finish().max(1)
}

/// A block allocator with a free list, reference counts and a prefix cache.
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    free: Vec<u32>,
    ref_counts: Vec<u32>,
    /// The hash a full block is registered under, if any.
    hashes: Vec<Option<u64>>,
    /// hash → block, for every registered block (owned or cached).
    by_hash: HashMap<u64, u32>,
    /// Cached (ref count 0, registered) blocks by last-use tick: the first is evicted first.
    lru: BTreeMap<u64, u32>,
    last_use: Vec<u64>,
    tick: u64,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> BlockManager {
        BlockManager {
            block_size,
            // Popped from the end: hand out low block numbers first.
            free: (0..num_blocks as u32).rev().collect(),
            ref_counts: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            by_hash: HashMap::new(),
            lru: BTreeMap::new(),
            last_use: vec![0; num_blocks],
            tick: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks that can be handed out now: free ones plus evictable cached ones.
    pub fn num_free(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Blocks that are free and hold nothing (not counting the prefix cache).
    pub fn num_empty(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    pub fn ref_count(&self, block: u32) -> u32 {
        self.ref_counts[block as usize]
    }

    /// Takes one block: a free one, else the least recently used cached one.
    fn take(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (&tick, &b) = self.lru.iter().next()?;
                self.lru.remove(&tick);
                if let Some(h) = self.hashes[b as usize].take() {
                    self.by_hash.remove(&h);
                }
                b
            }
        };
        self.ref_counts[b as usize] = 1;
        Some(b)
    }

    /// Grows `table` to hold `tokens` tokens; false (and nothing taken) when the pool is short.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.num_free() {
            return false;
        }
        for _ in 0..need {
            table.push(self.take().expect("checked: enough blocks"));
        }
        true
    }

    /// A fresh private block for copy-on-write of `table[index]`, which must be shared:
    /// the old block loses one owner. Returns `(old, new)`, or None when the pool is empty.
    pub fn fork_block(&mut self, table: &mut [u32], index: usize) -> Option<(u32, u32)> {
        let old = table[index];
        debug_assert!(
            self.ref_counts[old as usize] > 1,
            "only shared blocks are copied"
        );
        let new = self.take()?;
        self.ref_counts[old as usize] -= 1;
        table[index] = new;
        Some((old, new))
    }

    /// Shares every block of `table` with one more owner (a forked sequence).
    pub fn share(&mut self, table: &[u32]) {
        for &b in table {
            self.ref_counts[b as usize] += 1;
        }
    }

    /// The longest run of cached full blocks matching `hashes` (chained block hashes of a
    /// prompt), each now owned by the caller once more.
    pub fn reuse_prefix(&mut self, hashes: &[u64]) -> Vec<u32> {
        let mut table = Vec::new();
        for h in hashes {
            let Some(&b) = self.by_hash.get(h) else { break };
            let rc = &mut self.ref_counts[b as usize];
            if *rc == 0 {
                self.lru.remove(&self.last_use[b as usize]);
            }
            *rc += 1;
            table.push(b);
        }
        table
    }

    /// Registers a full, owned block under `hash` so later prompts can reuse it. A hash
    /// already registered (same contents computed twice) keeps its first block.
    pub fn register(&mut self, block: u32, hash: u64) {
        if self.hashes[block as usize].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        self.hashes[block as usize] = Some(hash);
        self.by_hash.insert(hash, block);
    }

    /// Returns every block of `table` to the pool; registered blocks stay cached.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        // Released back to front: a prompt's tail is evicted before its head, so a
        // surviving prefix stays reusable.
        for b in table.drain(..).rev() {
            let rc = &mut self.ref_counts[b as usize];
            *rc = rc.saturating_sub(1);
            if *rc == 0 {
                if self.hashes[b as usize].is_some() {
                    self.tick += 1;
                    self.last_use[b as usize] = self.tick;
                    self.lru.insert(self.tick, b);
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    /// Checks the invariant against the tables of all live sequences.
    pub fn check<'a>(&self, tables: impl IntoIterator<Item = &'a Vec<u32>>) -> Result<(), String> {
        let n = self.num_blocks();
        let mut owners = vec![0u32; n];
        for t in tables {
            for &b in t {
                owners[b as usize] += 1;
            }
        }
        let mut on_free = vec![false; n];
        for &b in &self.free {
            if std::mem::replace(&mut on_free[b as usize], true) {
                return Err(format!("block {b} is on the free list twice"));
            }
        }
        let mut on_lru = vec![false; n];
        for (&tick, &b) in &self.lru {
            if std::mem::replace(&mut on_lru[b as usize], true) || self.last_use[b as usize] != tick
            {
                return Err(format!(
                    "block {b} is on the LRU list twice or under a stale tick"
                ));
            }
        }
        for (&h, &b) in &self.by_hash {
            if self.hashes[b as usize] != Some(h) {
                return Err(format!(
                    "hash index points to block {b}, which is not registered under it"
                ));
            }
        }
        for b in 0..n {
            let (rc, hashed) = (self.ref_counts[b], self.hashes[b].is_some());
            let ok = match (on_free[b], on_lru[b]) {
                (true, false) => rc == 0 && owners[b] == 0 && !hashed,
                (false, true) => rc == 0 && owners[b] == 0 && hashed,
                (false, false) => rc > 0 && owners[b] == rc,
                (true, true) => false,
            };
            if !ok {
                return Err(format!(
                    "block {b}: free={} cached={} owners={} ref count={rc} hashed={hashed}",
                    on_free[b], on_lru[b], owners[b]
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_and_release_keep_the_invariant() {
        let mut m = BlockManager::new(4, 16);
        let (mut a, mut b) = (vec![], vec![]);
        assert!(m.grow(&mut a, 17));
        assert_eq!(a.len(), 2);
        assert!(m.grow(&mut b, 32));
        assert!(!m.grow(&mut b, 33), "pool of 4 is exhausted");
        assert_eq!(b.len(), 2, "a failed grow takes nothing");
        m.check([&a, &b]).unwrap();
        m.release(&mut a);
        assert_eq!(m.num_free(), 2);
        m.check([&a, &b]).unwrap();
        assert!(
            m.check([&b, &b]).is_err(),
            "a block owned twice with ref count 1 is caught"
        );
    }

    #[test]
    fn cached_prefixes_are_reused_then_evicted_lru() {
        let mut m = BlockManager::new(3, 2);
        let hashes = [
            block_hash(0, &[1, 2]),
            block_hash(block_hash(0, &[1, 2]), &[3, 4]),
        ];
        let mut a = vec![];
        assert!(m.grow(&mut a, 4));
        m.register(a[0], hashes[0]);
        m.register(a[1], hashes[1]);
        m.release(&mut a);
        assert_eq!(
            (m.num_free(), m.num_empty()),
            (3, 1),
            "two blocks stay cached"
        );
        m.check([]).unwrap();
        let mut b = m.reuse_prefix(&hashes);
        assert_eq!(b.len(), 2);
        m.check([&b]).unwrap();
        m.release(&mut b);
        // Needing all three blocks evicts the cached ones, tail first.
        let mut c = vec![];
        assert!(m.grow(&mut c, 6));
        assert!(
            m.reuse_prefix(&hashes).is_empty(),
            "evicted blocks are no longer found"
        );
        m.check([&c]).unwrap();
    }

    #[test]
    fn shared_blocks_fork_on_write() {
        let mut m = BlockManager::new(3, 4);
        let mut a = vec![];
        assert!(m.grow(&mut a, 5));
        let mut b = a.clone();
        m.share(&b);
        m.check([&a, &b]).unwrap();
        let (old, new) = m.fork_block(&mut b, 1).unwrap();
        assert_eq!(old, a[1]);
        assert_ne!(new, old);
        assert_eq!(m.ref_count(old), 1);
        m.check([&a, &b]).unwrap();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Grow(usize, usize),
        Release(usize),
        Share(usize, usize),
        Fork(usize, usize),
        Register(usize, usize, u64),
        Reuse(usize, Vec<u64>),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0..6usize, 1..40usize).prop_map(|(t, n)| Op::Grow(t, n)),
            (0..6usize).prop_map(Op::Release),
            (0..6usize, 0..6usize).prop_map(|(a, b)| Op::Share(a, b)),
            (0..6usize, 0..4usize).prop_map(|(t, i)| Op::Fork(t, i)),
            (0..6usize, 0..4usize, 1..12u64).prop_map(|(t, i, h)| Op::Register(t, i, h)),
            (0..6usize, proptest::collection::vec(1..12u64, 1..4))
                .prop_map(|(t, h)| Op::Reuse(t, h)),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Any sequence of allocator operations keeps every block free, cached or owned
        /// with ref count = owners, and releasing everything returns the whole pool.
        #[test]
        fn allocator_invariant_holds_under_any_operations(ops in proptest::collection::vec(op(), 1..60)) {
            let mut m = BlockManager::new(10, 4);
            let mut tables: Vec<Vec<u32>> = vec![vec![]; 6];
            for op in ops {
                match op {
                    Op::Grow(t, n) => {
                        let target = tables[t].len() * 4 + n;
                        let before = tables[t].len();
                        if !m.grow(&mut tables[t], target) {
                            proptest::prop_assert_eq!(tables[t].len(), before);
                        }
                    }
                    Op::Release(t) => m.release(&mut tables[t]),
                    Op::Share(a, b) => {
                        if tables[b].is_empty() && a != b {
                            tables[b] = tables[a].clone();
                            m.share(&tables[b]);
                        }
                    }
                    Op::Fork(t, i) => {
                        if i < tables[t].len() && m.ref_count(tables[t][i]) > 1 {
                            let _ = m.fork_block(&mut tables[t], i);
                        }
                    }
                    Op::Register(t, i, h) => {
                        if i < tables[t].len() {
                            m.register(tables[t][i], h);
                        }
                    }
                    Op::Reuse(t, hashes) => {
                        if tables[t].is_empty() {
                            tables[t] = m.reuse_prefix(&hashes);
                        }
                    }
                }
                let check = m.check(tables.iter());
                proptest::prop_assert!(check.is_ok(), "{:?}", check);
            }
            for t in tables.iter_mut() {
                m.release(t);
            }
            proptest::prop_assert_eq!(m.num_free(), 10);
            proptest::prop_assert!(m.check([]).is_ok());
        }
    }
}
