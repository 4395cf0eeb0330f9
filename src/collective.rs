//! What peers training one encoder together exchange: `all_gather`, and what is built on it
//! (sums over peers for gradients and for batch statistics, SyncBN). Peers are threads of one
//! process (`--devices`, a shared hub) or the ranks of an MPI job (`mpirun`, `srun`: see
//! [`Job`]), one process each, on one machine or several.
//!
//! Why not Burn's collective: in Burn 0.22.0-pre.3, `burn::tensor::distributed::all_reduce` is
//! implemented for CUDA (NCCL, through cubecl) and the remote backend only; the CPU backend
//! declares `DistributedOps` with no implementation (burn-flex: "Flex does not support collective
//! operations"), so `--devices cpu,cpu`, the setup a machine without GPUs can run and test, would
//! panic there. Peers here exchange host copies, which every device can make; the data is small
//! next to a step (embeddings, per-channel sums, one gradient vector).
//!
//! Every peer adds the gathered parts in rank order, so all of them hold the same bits afterwards
//! and their optimizers, stepping on the same gradient, keep identical replicas. Between MPI
//! ranks that is an allgather too, not MPI's allreduce, whose order of additions is the
//! library's.

mod job;

pub use job::Job;

use std::sync::{Arc, Condvar, Mutex};

/// One peer's handle on the group.
#[derive(Clone)]
pub struct Collective {
    rank: usize,
    world: usize,
    link: Link,
}

/// An exchange that could not complete because a peer thread is gone: the error of every peer
/// left waiting (the gone peer's own error, if it had one, is the cause to report). An MPI rank
/// that dies ends the whole job instead (see [`Job`]).
#[derive(Debug)]
pub struct PeerStopped {
    pub rank: usize,
}

impl std::fmt::Display for PeerStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "peer {} stopped; the others cannot go on without it",
            self.rank
        )
    }
}

impl std::error::Error for PeerStopped {}

#[derive(Clone)]
enum Link {
    Threads(Arc<Hub>),
    /// `MPI_COMM_WORLD`, from the thread that initialized MPI (see [`Job`]).
    #[cfg(feature = "mpi")]
    Mpi(job::MpiThread),
}

struct Hub {
    round: Mutex<Round>,
    changed: Condvar,
}

/// One exchange at a time: parts arrive, the last arrival publishes them, every peer reads them,
/// the last reader clears the round for the next.
struct Round {
    parts: Vec<Option<Vec<u8>>>,
    arrived: usize,
    generation: u64,
    gathered: Option<Arc<Vec<Vec<u8>>>>,
    read: usize,
    /// The first peer that left the group; every later exchange fails with its rank.
    left: Option<usize>,
}

impl Collective {
    /// `world` handles on one new group, rank 0 first.
    pub fn group(world: usize) -> Vec<Self> {
        let hub = Arc::new(Hub {
            round: Mutex::new(Round {
                parts: vec![None; world],
                arrived: 0,
                generation: 0,
                gathered: None,
                read: 0,
                left: None,
            }),
            changed: Condvar::new(),
        });
        (0..world)
            .map(|rank| Self {
                rank,
                world,
                link: Link::Threads(hub.clone()),
            })
            .collect()
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Every peer's `part`, by rank. Blocks until all peers have sent theirs; fails if a peer
    /// thread left the group before the exchange completed.
    pub fn all_gather_bytes(&self, part: Vec<u8>) -> anyhow::Result<Arc<Vec<Vec<u8>>>> {
        match &self.link {
            Link::Threads(hub) => self.gather_in(hub, part),
            #[cfg(feature = "mpi")]
            Link::Mpi(thread) => thread.all_gather(part).map(Arc::new),
        }
    }

    /// Rank 0's `bytes` on every peer (the others' are not sent).
    pub fn broadcast_bytes(&self, bytes: Vec<u8>) -> anyhow::Result<Vec<u8>> {
        let mine = if self.rank == 0 { bytes } else { vec![] };
        Ok(self.all_gather_bytes(mine)?[0].clone())
    }

    /// [`Collective::all_gather_bytes`] of numbers.
    pub fn all_gather(&self, part: Vec<f64>) -> anyhow::Result<Vec<Vec<f64>>> {
        let bytes = part.iter().flat_map(|v| v.to_le_bytes()).collect();
        let parts = self.all_gather_bytes(bytes)?;
        let numbers = |p: &Vec<u8>| {
            (p.chunks_exact(8))
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect()
        };
        Ok(parts.iter().map(numbers).collect())
    }

    fn gather_in(&self, hub: &Hub, part: Vec<u8>) -> anyhow::Result<Arc<Vec<Vec<u8>>>> {
        let mut round = self.lock(hub);
        // The previous exchange may still be being read by slower peers.
        while round.gathered.is_some() && round.left.is_none() {
            round = self.wait(hub, round);
        }
        self.check(&round)?;
        round.parts[self.rank] = Some(part);
        round.arrived += 1;
        let generation = round.generation;
        if round.arrived == self.world {
            let parts = round.parts.iter_mut().map(|p| p.take().unwrap_or_default());
            round.gathered = Some(Arc::new(parts.collect()));
            round.arrived = 0;
            round.generation += 1;
            hub.changed.notify_all();
        }
        while round.generation == generation {
            self.check(&round)?;
            round = self.wait(hub, round);
        }
        let gathered = round
            .gathered
            .clone()
            .expect("published with the generation");
        round.read += 1;
        if round.read == self.world {
            round.gathered = None;
            round.read = 0;
            hub.changed.notify_all();
        }
        Ok(gathered)
    }

    /// `values` summed element-wise over the peers; unchanged when the exchange fails.
    pub fn sum(&self, values: &mut [f64]) -> anyhow::Result<()> {
        let parts = self.all_gather(values.to_vec())?;
        let mut total = vec![0.0; values.len()];
        for part in parts.iter() {
            anyhow::ensure!(
                part.len() == values.len(),
                "peers disagree on a sum's length ({} vs {})",
                part.len(),
                values.len()
            );
            total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
        }
        values.copy_from_slice(&total);
        Ok(())
    }

    /// Marks this peer thread gone: peers waiting on an exchange, now or later, get an error.
    pub fn leave(&self) {
        match &self.link {
            Link::Threads(hub) => {
                let mut round = self.lock(hub);
                round.left.get_or_insert(self.rank);
                hub.changed.notify_all();
            }
            // A rank that ends its process ends the job (see `Job`).
            #[cfg(feature = "mpi")]
            Link::Mpi(_) => {}
        }
    }

    fn check(&self, round: &Round) -> anyhow::Result<()> {
        match round.left {
            Some(rank) => Err(PeerStopped { rank }.into()),
            None => Ok(()),
        }
    }

    fn lock<'a>(&self, hub: &'a Hub) -> std::sync::MutexGuard<'a, Round> {
        // A peer that panicked while holding the lock left the round as it was: carry on and
        // let `left` (set by its guard) end the exchange.
        hub.round.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(
        &self,
        hub: &'a Hub,
        round: std::sync::MutexGuard<'a, Round>,
    ) -> std::sync::MutexGuard<'a, Round> {
        hub.changed.wait(round).unwrap_or_else(|e| e.into_inner())
    }
}

/// The peers whose batch statistics a batch norm shares (SyncBN): one batch norm over the global
/// batch, as a single device would compute it. Handed to the batch-norm ops with the forward
/// pass (`model::Pass`) and kept by their backward pass, which sums its own statistics too.
#[derive(Clone)]
pub struct SyncBatchNorm(Collective);

impl SyncBatchNorm {
    pub fn over(group: &Collective) -> Self {
        Self(group.clone())
    }

    /// Per-channel sums over every peer's images, in place. A failed exchange leaves them local:
    /// the step's next exchange fails with the reason, before any weight changes.
    pub fn sum(&self, sums: &mut [f64]) {
        let _ = self.0.sum(sums);
    }
}

/// Autodiff keeps it in a backward op's state, which must print.
impl std::fmt::Debug for SyncBatchNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SyncBatchNorm(rank {} of {})", self.0.rank, self.0.world)
    }
}

/// Leaves the group when dropped: a peer thread's end, by return or by panic.
pub struct LeaveOnDrop(pub Collective);

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        self.0.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many rounds from threads that arrive in any order: every peer gets every part, by rank,
    /// and the sums agree bit for bit.
    #[test]
    fn peers_gather_by_rank_and_sum_alike() {
        let group = Collective::group(3);
        let threads: Vec<_> = group
            .into_iter()
            .map(|peer| {
                std::thread::spawn(move || {
                    (0..200)
                        .map(|round| {
                            let mine = vec![peer.rank() as f64 + 0.1 * round as f64; 2];
                            let parts = peer.all_gather(mine).unwrap();
                            assert_eq!(parts.len(), 3);
                            for (rank, part) in parts.iter().enumerate() {
                                assert_eq!(part[0], rank as f64 + 0.1 * round as f64);
                            }
                            let mut sum = vec![1.0 / (peer.rank() + 1) as f64];
                            peer.sum(&mut sum).unwrap();
                            sum[0]
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let sums: Vec<Vec<f64>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(sums[0], sums[1]);
        assert_eq!(sums[0], sums[2]);
        assert!((sums[0][0] - (1.0 + 0.5 + 1.0 / 3.0)).abs() < 1e-15);
    }

    #[test]
    fn a_peer_that_leaves_ends_the_others_exchange_with_an_error() {
        let mut group = Collective::group(2);
        let gone = group.pop().unwrap();
        let waiting = std::thread::spawn(move || group[0].all_gather(vec![1.0]));
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(LeaveOnDrop(gone));
        let err = waiting.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("peer 1 stopped"), "{err}");
    }
}
