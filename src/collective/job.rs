//! This process as one rank of a job that an MPI launcher started (`mpirun`, `mpiexec`, Slurm's
//! `srun`): every rank runs the same command line, and takes its rank and the world's size from
//! MPI. Without the `mpi` feature a process launched as one of several says how to get it.

use super::Collective;
#[cfg(feature = "mpi")]
use mpi::traits::{Communicator, CommunicatorCollectives};

/// How many ranks a launcher says it started, before MPI is asked: OpenMPI's variable, MPICH's
/// (PMI, which Slurm's pmi2 sets too) and srun's own.
fn launched_world() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"]
        .iter()
        .find_map(|var| std::env::var(var).ok()?.parse().ok())
}

/// While alive, MPI stays initialized (under a launcher only: a process started by hand never
/// touches MPI).
pub struct Job {
    /// `None` alone, a job of one rank included.
    group: Option<Collective>,
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

impl Job {
    /// The job this process was launched into, or this process alone.
    #[cfg(not(feature = "mpi"))]
    pub fn join() -> anyhow::Result<Self> {
        if let Some(world) = launched_world().filter(|&world| world > 1) {
            anyhow::bail!(
                "launched as one of {world} ranks (mpirun, srun), but this dcl was built without \
                 MPI: build it with `cargo build --release --features mpi` (needs an MPI and \
                 libclang: apt-get install libopenmpi-dev libclang-dev), or run one process"
            );
        }
        Ok(Self { group: None })
    }

    /// The job this process was launched into, or this process alone.
    #[cfg(feature = "mpi")]
    pub fn join() -> anyhow::Result<Self> {
        let Some(launched) = launched_world() else {
            return Ok(Self {
                group: None,
                _universe: None,
            });
        };
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| anyhow::anyhow!("MPI was already initialized in this process"))?;
        // Burn and rayon compute on threads of their own; MPI is called from this one only
        // (the trainer's, which also runs the batch norms and so SyncBN's sums).
        anyhow::ensure!(
            threading >= mpi::Threading::Funneled,
            "this MPI offers {threading:?} threading only; dcl needs Funneled (Burn computes on \
             threads of its own)"
        );
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        anyhow::ensure!(
            size == launched,
            "the launcher started {launched} ranks but MPI sees a world of {size}: under srun, \
             pick the plugin your MPI was built for (--mpi=pmix or --mpi=pmi2)"
        );
        let group = (size > 1).then(|| Collective {
            rank,
            world: size,
            link: super::Link::Mpi(MpiThread(std::thread::current().id())),
        });
        Ok(Self {
            group,
            _universe: Some(universe),
        })
    }

    pub fn group(&self) -> Option<&Collective> {
        self.group.as_ref()
    }

    /// `result`; but an error on one rank of several aborts the job, with the error and the
    /// rank on stderr: the other ranks would wait for this one's next exchange forever.
    pub fn end<T>(self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        #[cfg(feature = "mpi")]
        if let (Some(group), Err(e)) = (&self.group, &result) {
            let e = format!("{e:#}").replace('\n', " ");
            eprintln!("error: rank {} of {}: {e}", group.rank, group.world);
            mpi::topology::SimpleCommunicator::world().abort(2);
        }
        result
    }
}

/// `MPI_COMM_WORLD`, used from the thread that initialized MPI: Funneled allows no other.
#[cfg(feature = "mpi")]
#[derive(Clone)]
pub(super) struct MpiThread(std::thread::ThreadId);

#[cfg(feature = "mpi")]
impl MpiThread {
    /// Every rank's `part`, by rank: the lengths first, then the bytes (MPI_Allgatherv).
    pub(super) fn all_gather(&self, mut part: Vec<u8>) -> anyhow::Result<Vec<Vec<u8>>> {
        anyhow::ensure!(
            std::thread::current().id() == self.0,
            "an MPI exchange from a thread other than the one that initialized MPI (Funneled)"
        );
        let world = mpi::topology::SimpleCommunicator::world();
        let mut lengths = vec![0u64; world.size() as usize];
        world.all_gather_into(&(part.len() as u64), &mut lengths[..]);
        let total: u64 = lengths.iter().sum();
        anyhow::ensure!(
            total <= mpi::Count::MAX as u64,
            "an exchange of {total} bytes: MPI counts stop at 2 GiB (use fewer ranks)"
        );
        let counts: Vec<mpi::Count> = lengths.iter().map(|&n| n as mpi::Count).collect();
        let starts: Vec<mpi::Count> = offsets(&counts);
        // An empty Vec points at address 1, which OpenMPI reads as MPI_IN_PLACE: every buffer
        // handed to MPI gets an allocation of its own.
        part.reserve(1);
        let mut all = Vec::with_capacity(total as usize + 1);
        all.resize(total as usize, 0u8);
        let mut parts = mpi::datatype::PartitionMut::new(&mut all[..], &counts[..], &starts[..]);
        world.all_gather_varcount_into(&part[..], &mut parts);
        let ranges = starts.iter().zip(&counts);
        let copy = |(&start, &count): (&mpi::Count, &mpi::Count)| {
            all[start as usize..][..count as usize].to_vec()
        };
        Ok(ranges.map(copy).collect())
    }
}

/// Where each of `counts` starts when they are laid end to end.
#[cfg(feature = "mpi")]
fn offsets(counts: &[mpi::Count]) -> Vec<mpi::Count> {
    let next = |at: &mut mpi::Count, &count: &mpi::Count| {
        let start = *at;
        *at += count;
        Some(start)
    };
    counts.iter().scan(0, next).collect()
}
