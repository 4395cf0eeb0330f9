//! What peers training one encoder together exchange: `all_gather`, and what is built on it
//! (sums over peers for gradients and for batch statistics, SyncBN). Peers are threads of one
//! process (`--devices`, a shared hub) or processes on several machines (`--nodes`, TCP through
//! the coordinator, rank 0).
//!
//! Why not Burn's collective: in Burn 0.22.0-pre.3, `burn::tensor::distributed::all_reduce` is
//! implemented for CUDA (NCCL, through cubecl) and the remote backend only; the CPU backend
//! declares `DistributedOps` with no implementation (burn-flex: "Flex does not support collective
//! operations"), so `--devices cpu,cpu`, the setup a machine without GPUs can run and test, would
//! panic there. Peers here exchange host copies, which every device can make; the data is small
//! next to a step (embeddings, per-channel sums, one gradient vector).
//!
//! Every peer adds the gathered parts in rank order, so all of them hold the same bits afterwards
//! and their optimizers, stepping on the same gradient, keep identical replicas.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// One peer's handle on the group.
#[derive(Clone)]
pub struct Collective {
    rank: usize,
    world: usize,
    link: Link,
}

/// An exchange that could not complete because a peer is gone: the error of every peer left
/// waiting (the gone peer's own error, if it had one, is the cause to report).
#[derive(Debug)]
pub struct PeerStopped {
    pub rank: usize,
    /// What the connection said, between processes.
    pub detail: Option<String>,
}

impl std::fmt::Display for PeerStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer {} stopped", self.rank)?;
        if let Some(detail) = &self.detail {
            write!(f, " (its connection: {detail})")?;
        }
        write!(f, "; the others cannot go on without it")
    }
}

impl std::error::Error for PeerStopped {}

#[derive(Clone)]
enum Link {
    Threads(Arc<Hub>),
    Network(Arc<Mutex<Network>>),
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

    /// This process's place in a group of `world` processes: rank 0 listens on `coordinator`
    /// (HOST:PORT) until every other rank has connected to it. Gives up after `patience`.
    pub fn join(
        coordinator: &str,
        rank: usize,
        world: usize,
        patience: Duration,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            rank < world,
            "--node-rank {rank} must be below --nodes {world}"
        );
        let network = match rank {
            0 => Network::listen(coordinator, world, patience)?,
            _ => Network::connect(coordinator, rank, patience)?,
        };
        Ok(Self {
            rank,
            world,
            link: Link::Network(Arc::new(Mutex::new(network))),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Every peer's `part`, by rank. Blocks until all peers have sent theirs; fails if a peer
    /// left the group (its thread ended, its process died) before the exchange completed.
    pub fn all_gather_bytes(&self, part: Vec<u8>) -> anyhow::Result<Arc<Vec<Vec<u8>>>> {
        match &self.link {
            Link::Threads(hub) => self.gather_in(hub, part),
            Link::Network(network) => {
                let mut network = network.lock().unwrap_or_else(|e| e.into_inner());
                network.all_gather(self.rank, part).map(Arc::new)
            }
        }
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

    /// Marks this peer gone: peers waiting on an exchange, now or later, get an error. (A
    /// process's peers see its connection close.)
    pub fn leave(&self) {
        if let Link::Threads(hub) = &self.link {
            let mut round = self.lock(hub);
            round.left.get_or_insert(self.rank);
            hub.changed.notify_all();
        }
    }

    fn check(&self, round: &Round) -> anyhow::Result<()> {
        match round.left {
            Some(rank) => Err(PeerStopped { rank, detail: None }.into()),
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

/// Processes in a star around rank 0: every exchange, the others send rank 0 their part and
/// receive all parts back. Messages are length-prefixed; a closed connection (a process that
/// ended or was killed) is an error that names the peer.
struct Network {
    /// Rank 0: one stream per other rank, by rank (index 0 unused). Others: the coordinator's.
    streams: Vec<Option<TcpStream>>,
}

/// No message of a run is near this; a larger length is a stranger on the port.
const MAX_MESSAGE: u64 = 1 << 34;

impl Network {
    fn listen(coordinator: &str, world: usize, patience: Duration) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(coordinator)
            .map_err(|e| anyhow::anyhow!("--coordinator {coordinator}: cannot listen: {e}"))?;
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + patience;
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        while streams.iter().skip(1).any(Option::is_none) {
            match listener.accept() {
                Ok((mut stream, from)) => {
                    stream.set_nonblocking(false)?;
                    stream.set_nodelay(true)?;
                    // A stranger that connects and says nothing must not hold the door.
                    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                    let hello = read_message(&mut stream);
                    stream.set_read_timeout(None)?;
                    let rank = hello
                        .ok()
                        .and_then(|hello| hello.try_into().ok())
                        .map(|b: [u8; 8]| u64::from_le_bytes(b) as usize);
                    match rank {
                        Some(rank) if rank > 0 && rank < world && streams[rank].is_none() => {
                            streams[rank] = Some(stream)
                        }
                        _ => eprintln!("--coordinator: ignored a connection from {from} that is not a missing rank"),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "--coordinator {coordinator}: ranks {:?} did not connect within {} s",
                        (1..world)
                            .filter(|&r| streams[r].is_none())
                            .collect::<Vec<_>>(),
                        patience.as_secs()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => anyhow::bail!("--coordinator {coordinator}: {e}"),
            }
        }
        Ok(Self { streams })
    }

    fn connect(coordinator: &str, rank: usize, patience: Duration) -> anyhow::Result<Self> {
        let deadline = Instant::now() + patience;
        // Rank 0 may start after the others: try until it listens.
        let mut stream = loop {
            match TcpStream::connect(coordinator) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() >= deadline => anyhow::bail!(
                    "--coordinator {coordinator}: rank 0 did not answer within {} s ({e})",
                    patience.as_secs()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        stream.set_nodelay(true)?;
        write_message(&mut stream, &(rank as u64).to_le_bytes())?;
        Ok(Self {
            streams: vec![Some(stream)],
        })
    }

    fn all_gather(&mut self, rank: usize, part: Vec<u8>) -> anyhow::Result<Vec<Vec<u8>>> {
        let lost = |rank: usize, e: std::io::Error| PeerStopped {
            rank,
            detail: Some(e.to_string()),
        };
        if rank > 0 {
            let coordinator = self.streams[0].as_mut().expect("connected");
            write_message(coordinator, &part).map_err(|e| lost(0, e))?;
            let all = read_message(coordinator).map_err(|e| lost(0, e))?;
            return split_parts(&all);
        }
        let mut parts = vec![part];
        for (peer, stream) in self.streams.iter_mut().enumerate().skip(1) {
            let stream = stream.as_mut().expect("connected");
            parts.push(read_message(stream).map_err(|e| lost(peer, e))?);
        }
        let all = join_parts(&parts);
        for (peer, stream) in self.streams.iter_mut().enumerate().skip(1) {
            let stream = stream.as_mut().expect("connected");
            write_message(stream, &all).map_err(|e| lost(peer, e))?;
        }
        Ok(parts)
    }
}

fn write_message(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(&(bytes.len() as u64).to_le_bytes())?;
    stream.write_all(bytes)
}

fn read_message(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(std::io::Error::other(format!("a message of {len} bytes")));
    }
    let mut bytes = vec![0u8; len as usize];
    stream.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Parts as one message: each length-prefixed.
fn join_parts(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut all = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
    for part in parts {
        all.extend((part.len() as u64).to_le_bytes());
        all.extend(part);
    }
    all
}

fn split_parts(mut all: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut parts = vec![];
    while !all.is_empty() {
        anyhow::ensure!(all.len() >= 8, "a truncated exchange from the coordinator");
        let (len, rest) = all.split_at(8);
        let len = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
        anyhow::ensure!(
            rest.len() >= len,
            "a truncated exchange from the coordinator"
        );
        let (part, rest) = rest.split_at(len);
        parts.push(part.to_vec());
        all = rest;
    }
    Ok(parts)
}

thread_local! {
    /// The group whose batch statistics this thread's batch norms share, during a step.
    static BATCH_STATISTICS: RefCell<Option<Collective>> = const { RefCell::new(None) };
}

/// While alive, batch norms on this thread take their statistics over all peers' images
/// (SyncBN): one batch norm over the global batch, as a single device would compute it.
pub struct SyncBatchNorm(());

impl SyncBatchNorm {
    pub fn over(group: &Collective) -> Self {
        BATCH_STATISTICS.with(|s| *s.borrow_mut() = Some(group.clone()));
        Self(())
    }
}

impl Drop for SyncBatchNorm {
    fn drop(&mut self) {
        BATCH_STATISTICS.with(|s| *s.borrow_mut() = None);
    }
}

/// Per-channel sums over every peer's images while a [`SyncBatchNorm`] is alive on this thread;
/// `sums` unchanged otherwise. A failed exchange leaves them local: the step's next exchange
/// fails with the reason, before any weight changes.
pub fn sum_batch_statistics(sums: &mut [f64]) {
    BATCH_STATISTICS.with(|s| {
        if let Some(group) = s.borrow().as_ref() {
            // On failure the sums stay local, as documented above.
            let _ = group.sum(sums);
        }
    });
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

    /// The same exchanges between "processes" (threads here) over loopback TCP, then the end of
    /// one: the other's next exchange fails with a message that names it.
    #[test]
    fn processes_gather_over_tcp_and_notice_a_peer_that_died() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let coordinator = format!("127.0.0.1:{port}");
        let patience = Duration::from_secs(20);
        let joined: Vec<_> = (0..3)
            .map(|rank| {
                let coordinator = coordinator.clone();
                std::thread::spawn(move || {
                    let peer = Collective::join(&coordinator, rank, 3, patience).unwrap();
                    let mut sum = vec![rank as f64, 1.0];
                    peer.sum(&mut sum).unwrap();
                    let parts = peer.all_gather_bytes(vec![rank as u8; rank]).unwrap();
                    assert_eq!(*parts, vec![vec![], vec![1], vec![2, 2]]);
                    (peer, sum)
                })
            })
            .collect();
        let mut peers: Vec<_> = joined.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(peers.iter().all(|(_, sum)| sum == &vec![3.0, 3.0]));
        let (rank1, _) = peers.remove(1);
        peers.truncate(1); // rank 2's process ends: its connection closes
        let waiting = std::thread::spawn(move || rank1.all_gather(vec![1.0]));
        let err = peers[0].0.all_gather(vec![0.0]).unwrap_err();
        assert!(err.to_string().contains("peer 2 stopped"), "{err}");
        drop(peers); // rank 0 ends with that error: rank 1 hears it
        let err = waiting.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("peer 0 stopped"), "{err}");
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
