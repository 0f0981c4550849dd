//! The paged KV cache's block manager: which pool blocks each sequence owns.
//!
//! Invariant (checked by [`BlockManager::check`] in tests after every step): every block is
//! either free or owned, each exactly once, and the free list plus the owned blocks cover
//! the pool.

/// A block allocator with a free list and reference counts.
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    free: Vec<u32>,
    ref_counts: Vec<u32>,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> BlockManager {
        BlockManager {
            block_size,
            // Popped from the end: hand out low block numbers first.
            free: (0..num_blocks as u32).rev().collect(),
            ref_counts: vec![0; num_blocks],
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `table` to hold `tokens` tokens; false (and nothing taken) when the pool is short.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.free.len() {
            return false;
        }
        for _ in 0..need {
            let b = self.free.pop().expect("checked: enough free blocks");
            self.ref_counts[b as usize] = 1;
            table.push(b);
        }
        true
    }

    /// Returns every block of `table` to the pool.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        for b in table.drain(..) {
            let rc = &mut self.ref_counts[b as usize];
            *rc = rc.saturating_sub(1);
            if *rc == 0 {
                self.free.push(b);
            }
        }
    }

    /// Checks the invariant against the tables of all live sequences.
    pub fn check<'a>(&self, tables: impl IntoIterator<Item = &'a Vec<u32>>) -> Result<(), String> {
        let mut owners = vec![0u32; self.num_blocks()];
        for t in tables {
            for &b in t {
                owners[b as usize] += 1;
            }
        }
        let mut is_free = vec![false; self.num_blocks()];
        for &b in &self.free {
            if std::mem::replace(&mut is_free[b as usize], true) {
                return Err(format!("block {b} is on the free list twice"));
            }
        }
        for b in 0..self.num_blocks() {
            match (is_free[b], owners[b], self.ref_counts[b]) {
                (true, 0, 0) => {}
                (false, o, rc) if o > 0 && o == rc => {}
                (f, o, rc) => {
                    return Err(format!("block {b}: free={f}, owners={o}, ref count={rc}"));
                }
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
}
