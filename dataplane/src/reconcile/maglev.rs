//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): the lookup table the kernel indexes
//! with a connection's hash. Every backend fills the table in the order of its own permutation
//! of the slots, taking turns, so each owns an (almost) equal share, and removing one backend
//! moves only the slots it owned (about 1/N of the flows) plus a few of the others'.

use std::{collections::HashMap, sync::Arc};

/// A backend as the table sees it: a stable identity (its name, not its position in any list,
/// so the table does not depend on the order or on the other backends) and a weight.
#[derive(Debug, Clone)]
pub struct Member {
    pub identity: String,
    /// Turns per round: a backend of weight 2 owns twice the slots of one of weight 1.
    pub weight: u32,
}

/// Tables computed already, by their members and size. The drift check computes the desired
/// state again every few seconds, and at 10,000 services computing their tables was most of
/// its time (and of the agent's CPU between changes). Holds only the tables the last pass
/// used ([`Memo::pass_done`]).
#[derive(Debug, Default)]
pub struct Memo {
    previous: HashMap<MemoKey, Arc<[u32]>>,
    current: HashMap<MemoKey, Arc<[u32]>>,
}

/// The members (identity, weight) in their order, and the size.
type MemoKey = (Vec<(String, u32)>, u32);

impl Memo {
    /// [`table`], computed once for the same members and size.
    pub fn table(&mut self, members: &[Member], size: u32) -> Arc<[u32]> {
        let key = (
            members
                .iter()
                .map(|m| (m.identity.clone(), m.weight))
                .collect::<Vec<_>>(),
            size,
        );
        if let Some(table) = self.current.get(&key) {
            return table.clone();
        }
        let table = self
            .previous
            .remove(&key)
            .unwrap_or_else(|| table(members, size).into());
        self.current.insert(key, table.clone());
        table
    }

    /// Forgets the tables this pass did not use.
    pub fn pass_done(&mut self) {
        self.previous = std::mem::take(&mut self.current);
    }
}

/// FNV-1a 64 with a seed, so one name gives two independent hashes.
fn hash(seed: u64, text: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for byte in text.bytes() {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche: FNV alone keeps similar names close.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// The table of `size` slots (a prime), each holding the index into `members` of the backend
/// that owns it. Empty when there are no members (or all weights are 0).
pub fn table(members: &[Member], size: u32) -> Vec<u32> {
    let m = u64::from(size);
    // Turns go in the order of identities, so the table does not depend on the list's order.
    let mut live: Vec<usize> = (0..members.len())
        .filter(|&i| members[i].weight > 0)
        .collect();
    live.sort_by(|&a, &b| members[a].identity.cmp(&members[b].identity));
    if live.is_empty() {
        return Vec::new();
    }
    let permutation: Vec<(u64, u64)> = members
        .iter()
        .map(|b| (hash(1, &b.identity) % m, hash(2, &b.identity) % (m - 1) + 1))
        .collect();
    let mut next = vec![0u64; members.len()];
    let mut slots = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    'fill: loop {
        for &i in &live {
            let (offset, skip) = permutation[i];
            for _ in 0..members[i].weight {
                let mut slot = (offset + next[i] * skip) % m;
                while slots[slot as usize] != u32::MAX {
                    next[i] += 1;
                    slot = (offset + next[i] * skip) % m;
                }
                slots[slot as usize] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane_common::MAGLEV_DEFAULT_SIZE;

    /// The table size of v1 (fixed then), kept for the tests of small backend sets.
    const MAGLEV_TABLE_SIZE: u32 = 1021;

    fn members(names: &[&str]) -> Vec<Member> {
        names
            .iter()
            .map(|n| Member {
                identity: n.to_string(),
                weight: 1,
            })
            .collect()
    }

    #[test]
    fn the_memo_computes_a_table_once_and_keeps_only_what_the_last_pass_used() {
        let mut memo = Memo::default();
        let ab = members(&["a", "b"]);
        let abc = members(&["a", "b", "c"]);
        let first = memo.table(&ab, MAGLEV_TABLE_SIZE);
        assert_eq!(first[..], table(&ab, MAGLEV_TABLE_SIZE)[..]);
        assert!(Arc::ptr_eq(&first, &memo.table(&ab, MAGLEV_TABLE_SIZE)));
        let other = memo.table(&abc, MAGLEV_TABLE_SIZE);
        assert_eq!(other[..], table(&abc, MAGLEV_TABLE_SIZE)[..]);
        // Another size, another weight: other tables.
        assert_eq!(memo.table(&ab, 251).len(), 251);
        let mut heavier = ab.clone();
        heavier[0].weight = 2;
        assert_eq!(
            memo.table(&heavier, MAGLEV_TABLE_SIZE)[..],
            table(&heavier, MAGLEV_TABLE_SIZE)[..]
        );
        memo.pass_done();
        // The next pass uses only {a, b}: it is not computed again, the others are forgotten.
        assert!(Arc::ptr_eq(&first, &memo.table(&ab, MAGLEV_TABLE_SIZE)));
        memo.pass_done();
        assert_eq!(memo.previous.len(), 1);
        assert!(!Arc::ptr_eq(&other, &memo.table(&abc, MAGLEV_TABLE_SIZE)));
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &i in table {
            counts[i as usize] += 1;
        }
        counts
    }

    #[test]
    fn every_slot_is_owned_and_shares_are_even() {
        for n in [1, 2, 3, 5, 10] {
            let names: Vec<String> = (0..n).map(|i| format!("web{i}/10.0.0.{i}:80")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let t = table(&members(&refs), MAGLEV_TABLE_SIZE);
            assert_eq!(t.len(), MAGLEV_TABLE_SIZE as usize);
            let counts = shares(&t, n);
            let ideal = MAGLEV_TABLE_SIZE as f64 / n as f64;
            for c in counts {
                // Within 1% of even (each backend is off by at most one slot of 1021).
                assert!(
                    ((c as f64) - ideal).abs() / ideal < 0.01,
                    "n={n}: {c} vs {ideal}"
                );
            }
        }
    }

    #[test]
    fn removing_one_of_n_backends_moves_about_one_nth() {
        let names: Vec<String> = (0..5).map(|i| format!("web{i}")).collect();
        let all: Vec<&str> = names.iter().map(String::as_str).collect();
        let before = table(&members(&all), MAGLEV_TABLE_SIZE);
        let without: Vec<&str> = all.iter().copied().filter(|n| *n != "web2").collect();
        let after = table(&members(&without), MAGLEV_TABLE_SIZE);
        // Compare owners by identity (indexes shift when a member goes).
        let owner_before = |slot: usize| all[before[slot] as usize];
        let owner_after = |slot: usize| without[after[slot] as usize];
        let moved = (0..MAGLEV_TABLE_SIZE as usize)
            .filter(|&s| owner_before(s) != owner_after(s))
            .count();
        let fraction = moved as f64 / f64::from(MAGLEV_TABLE_SIZE);
        // web2 owned 1/5 of the slots; those must move, and not many more may.
        assert!((0.19..0.30).contains(&fraction), "moved {fraction}");
        for s in 0..MAGLEV_TABLE_SIZE as usize {
            if owner_before(s) != "web2" && owner_before(s) != owner_after(s) {
                continue;
            }
            if owner_before(s) == "web2" {
                assert_ne!(owner_after(s), "web2");
            }
        }
    }

    #[test]
    fn the_table_depends_on_identities_not_on_order() {
        let a = table(&members(&["x", "y", "z"]), 251);
        let b = table(&members(&["z", "x", "y"]), 251);
        let names_a = ["x", "y", "z"];
        let names_b = ["z", "x", "y"];
        for s in 0..251 {
            assert_eq!(names_a[a[s] as usize], names_b[b[s] as usize]);
        }
    }

    #[test]
    fn weights_scale_shares_and_zero_weight_owns_nothing() {
        let mut m = members(&["heavy", "light", "off"]);
        m[0].weight = 3;
        m[2].weight = 0;
        let counts = shares(&table(&m, MAGLEV_TABLE_SIZE), 3);
        assert_eq!(counts[2], 0);
        let ratio = counts[0] as f64 / counts[1] as f64;
        assert!((2.9..3.1).contains(&ratio), "{counts:?}");
        assert!(table(&members(&[]), 251).is_empty());
    }

    /// The largest share off the ideal, as a fraction of the ideal.
    fn imbalance(table: &[u32], n: usize) -> f64 {
        let ideal = table.len() as f64 / n as f64;
        shares(table, n)
            .into_iter()
            .map(|c| (c as f64 - ideal).abs() / ideal)
            .fold(0.0, f64::max)
    }

    #[test]
    fn the_default_size_keeps_100_backends_within_one_percent() {
        let names: Vec<String> = (0..100)
            .map(|i| format!("web{i}/10.0.{}.{}:80", i / 250, i % 250))
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let t = table(&members(&refs), MAGLEV_DEFAULT_SIZE);
        assert_eq!(t.len(), MAGLEV_DEFAULT_SIZE as usize);
        let off = imbalance(&t, 100);
        assert!(
            off < 0.01,
            "100 backends in {MAGLEV_DEFAULT_SIZE} slots: {off}"
        );
        // What the old fixed size gave: why the default changed.
        let old = imbalance(&table(&members(&refs), MAGLEV_TABLE_SIZE), 100);
        assert!(old > 0.01, "{old}");
    }

    #[test]
    fn other_sizes_fill_every_slot_evenly() {
        let names: Vec<String> = (0..7).map(|i| format!("b{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        for size in [251, 4093, 65_521] {
            let t = table(&members(&refs), size);
            assert_eq!(t.len(), size as usize);
            assert!(t.iter().all(|&i| i < 7));
            // Off by at most one slot each.
            let ideal = f64::from(size) / 7.0;
            assert!(imbalance(&t, 7) * ideal <= 1.0, "size {size}");
        }
    }
}
