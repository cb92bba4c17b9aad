//! Spreading independent CPU work (signature checks, decryption, change
//! parsing) over the cores, keeping the input's order.

/// `f` applied to every item, in order, on up to as many threads as there
/// are cores (at most 8), each taking a contiguous part; on this thread
/// alone when there are fewer than `min_per_thread` items per extra thread.
/// `None` when a worker panicked.
pub(crate) fn map<T: Sync, R: Send>(items: &[T], min_per_thread: usize, f: impl Fn(&T) -> R + Sync) -> Option<Vec<R>> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from).min(8);
    let threads = cores.min(items.len() / min_per_thread.max(1)).max(1);
    if threads == 1 {
        return Some(items.iter().map(&f).collect());
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let workers: Vec<_> = items
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for worker in workers {
            out.extend(worker.join().ok()?);
        }
        Some(out)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn keeps_order_and_every_item() {
        let items: Vec<u32> = (0..10_001).collect();
        let doubled = super::map(&items, 16, |x| x * 2).unwrap_or_default();
        assert_eq!(doubled, items.iter().map(|x| x * 2).collect::<Vec<_>>());
        assert_eq!(super::map(&items[..3], 16, |x| x + 1), Some(vec![1, 2, 3]));
        assert_eq!(super::map(&[] as &[u32], 16, |x| *x), Some(vec![]));
    }
}
