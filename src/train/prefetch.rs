//! The next step's views, made on another thread while the device runs this step, so a GPU
//! does not sit idle while the CPU augments. Views are a pure function of where the batch sits
//! in the run (see `Schedule::views_of`), so a prefetched batch is bit for bit the one that would
//! be made on demand, and a stale one (after a restore, say) is recognised by its key. The
//! page's worker has no threads: there every batch is made on demand.

/// The two views of a batch's rows, flattened [rows, 3, 32, 32].
pub type Views = (Vec<f32>, Vec<f32>);

/// Which views a job makes: (epoch, step in the epoch, first row, rows).
pub type Key = (usize, usize, usize, usize);

#[derive(Default)]
pub struct Prefetch {
    #[cfg(not(target_arch = "wasm32"))]
    pending: Option<(Key, std::thread::JoinHandle<Views>)>,
}

impl Prefetch {
    /// Starts making `key`'s views; a job already running is left to finish unseen.
    pub fn start(&mut self, key: Key, make: impl FnOnce() -> Views + Send + 'static) {
        #[cfg(not(target_arch = "wasm32"))]
        {
            // No thread to be had: the views are made on demand instead.
            self.pending = std::thread::Builder::new()
                .name("dcl-views".into())
                .spawn(make)
                .ok()
                .map(|job| (key, job));
        }
        #[cfg(target_arch = "wasm32")]
        let _ = (key, make);
    }

    /// `key`'s views if a job was making them; `None` (make them now) otherwise, or when the
    /// job panicked, so that making them again shows the panic where the step runs.
    pub fn take(&mut self, key: Key) -> Option<Views> {
        #[cfg(not(target_arch = "wasm32"))]
        return match self.pending.take() {
            Some((made, job)) if made == key => job.join().ok(),
            _ => None,
        };
        #[cfg(target_arch = "wasm32")]
        {
            let _ = key;
            None
        }
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_taken_only_under_its_own_key() {
        let mut prefetch = Prefetch::default();
        prefetch.start((0, 1, 0, 2), || (vec![1.0], vec![2.0]));
        assert_eq!(prefetch.take((0, 2, 0, 2)), None, "another step's views");
        assert_eq!(
            prefetch.take((0, 1, 0, 2)),
            None,
            "a mismatch drops the job"
        );
        prefetch.start((0, 1, 0, 2), || (vec![1.0], vec![2.0]));
        assert_eq!(prefetch.take((0, 1, 0, 2)), Some((vec![1.0], vec![2.0])));
        prefetch.start((3, 0, 0, 2), || panic!("a view failed"));
        assert_eq!(
            prefetch.take((3, 0, 0, 2)),
            None,
            "a panicked job is made again"
        );
    }
}
