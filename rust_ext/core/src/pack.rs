//! Best-fit-decreasing packing of whole examples into rows of `capacity` tokens.
//!
//! Items are taken longest first (ties: lower index first); each goes into the
//! open row with the least room that still fits it, or opens a new row. Rows
//! are returned in the order they were opened, items within a row in the order
//! they were placed. An item is never split: an example (a preference pair, K
//! ranked candidates) is one item whose length is the sum of its segments.
use std::collections::BTreeSet;

use crate::error::{CoreError, Result};

/// Pack `lengths` into rows of at most `capacity`; returns item indices per row.
/// O(n log n). An item longer than `capacity` is an error (truncate or drop it first).
pub fn best_fit_decreasing(lengths: &[usize], capacity: usize) -> Result<Vec<Vec<usize>>> {
    if let Some((i, &len)) = lengths.iter().enumerate().find(|(_, &l)| l > capacity) {
        return Err(CoreError::Input(format!(
            "item {i} has {len} tokens, more than the row capacity {capacity}"
        )));
    }
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut room: Vec<usize> = Vec::new();
    // (remaining room, row index): the first entry >= (len, 0) is the best fit
    let mut open: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in order {
        let len = lengths[i];
        let best = open.range((len, 0)..).next().copied();
        match best {
            Some((r, row)) => {
                open.remove(&(r, row));
                rows[row].push(i);
                room[row] = r - len;
                if room[row] > 0 {
                    open.insert((room[row], row));
                }
            }
            None => {
                let row = rows.len();
                rows.push(vec![i]);
                room.push(capacity - len);
                if capacity > len {
                    open.insert((capacity - len, row));
                }
            }
        }
    }
    Ok(rows)
}

/// Lower bound on the number of rows any packing needs: ceil(total / capacity).
pub fn rows_lower_bound(lengths: &[usize], capacity: usize) -> usize {
    let total: usize = lengths.iter().sum();
    total.div_ceil(capacity.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(lengths: &[usize], cap: usize) -> Vec<Vec<usize>> {
        let rows = best_fit_decreasing(lengths, cap).unwrap();
        let mut seen = vec![0; lengths.len()];
        for r in &rows {
            assert!(!r.is_empty());
            assert!(r.iter().map(|&i| lengths[i]).sum::<usize>() <= cap);
            for &i in r {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "every item exactly once");
        rows
    }

    #[test]
    fn simple_best_fit() {
        // 6 opens row 0 (room 4), 5 opens row 1 (room 5), 4 -> row 0 (room 0 is the best fit), 3 -> row 1
        let rows = check(&[4, 6, 3, 5], 10);
        assert_eq!(rows, vec![vec![1, 0], vec![3, 2]]);
    }

    #[test]
    fn best_fit_prefers_tightest_room() {
        // rows after 8,7: room 2 and 3; item 2 must go to the row with room 2
        let rows = check(&[8, 7, 2], 10);
        assert_eq!(rows, vec![vec![0, 2], vec![1]]);
    }

    #[test]
    fn exact_fill_and_empty_input() {
        assert_eq!(check(&[5, 5, 5, 5], 10).len(), 2);
        assert!(check(&[], 10).is_empty());
        assert_eq!(check(&[10, 10], 10).len(), 2);
    }

    #[test]
    fn too_long_is_an_error() {
        assert!(best_fit_decreasing(&[3, 11], 10).is_err());
    }

    #[test]
    fn pseudo_random_lengths_are_packed_well() {
        let mut x: u64 = 42;
        let mut lengths = Vec::new();
        for _ in 0..5000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lengths.push(1 + (x >> 33) as usize % 1500);
        }
        let rows = check(&lengths, 4096);
        let lb = rows_lower_bound(&lengths, 4096);
        assert!(
            rows.len() <= lb + lb / 50 + 1,
            "{} rows vs lower bound {lb}",
            rows.len()
        );
    }
}
