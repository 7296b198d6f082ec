//! Data-parallel training over MPI: one process per device, each holding the whole model and
//! optimizer (DDP), each computing the gradients of its share of every global batch, which an
//! all-reduce sums before all of them take the same optimizer step.
//!
//! MPI (Open MPI's `mpirun`, Slurm's `srun`) starts and connects the processes, on one host or
//! many; `kiln train --nproc N` is `mpirun -n N kiln train ...` on this machine. A process that
//! a launcher started joins its world (`World::from_launcher`); any other is a world of one,
//! which never touches MPI. Built without the `mpi` feature, kiln refuses to run as one rank
//! of several rather than train alone N times over.
//!
//! A rank that dies (killed, out of memory) takes the run down: MPI's default error handler and
//! the launcher abort every rank, so the others never hang in a collective; a rank that fails
//! with an error aborts the world itself ([`World::abort`]). Checkpoints are written by rank 0
//! alone, each one atomically, so those on disk stay valid either way.

use anyhow::{Result, bail};

/// The processes training one run together, and this one's place among them.
pub struct World {
    rank: usize,
    size: usize,
    #[cfg(feature = "mpi")]
    mpi: Option<Mpi>,
}

#[cfg(feature = "mpi")]
struct Mpi {
    /// Finalizes MPI when dropped.
    _universe: mpi::environment::Universe,
    comm: mpi::topology::SimpleCommunicator,
}

/// Environment variables by which MPI launchers tell a process its world size.
const LAUNCHER_SIZE_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"];

impl World {
    /// A world of this process alone.
    pub fn single() -> Self {
        Self {
            rank: 0,
            size: 1,
            #[cfg(feature = "mpi")]
            mpi: None,
        }
    }

    /// The world a launcher started this process in, or a world of one when none did.
    pub fn from_launcher() -> Result<Self> {
        let launched = LAUNCHER_SIZE_VARS
            .iter()
            .filter_map(|v| std::env::var(v).ok())
            .filter_map(|s| s.parse::<usize>().ok())
            .max();
        match launched {
            None | Some(0 | 1) => Ok(Self::single()),
            Some(n) => Self::join(n),
        }
    }

    #[cfg(feature = "mpi")]
    fn join(_expected: usize) -> Result<Self> {
        use mpi::traits::Communicator;
        // Only the training thread calls MPI (rayon's workers never do).
        let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
            bail!("MPI was initialized twice in one process");
        };
        let comm = universe.world();
        Ok(Self {
            rank: comm.rank() as usize,
            size: comm.size() as usize,
            mpi: Some(Mpi { _universe: universe, comm }),
        })
    }

    #[cfg(not(feature = "mpi"))]
    fn join(n: usize) -> Result<Self> {
        bail!(
            "this process is one of {n} started by an MPI launcher, but this kiln was built \
             without MPI; build it with `cargo build --release --features mpi` (README: Distributed \
             training)"
        )
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank 0, the one process that writes the run's files.
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// Replaces `values` by their element-wise sum over all ranks.
    pub fn sum_f32(&self, values: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let mine = values.to_vec();
            m.comm.all_reduce_into(&mine[..], values, SystemOperation::sum());
        }
        let _ = values;
    }

    /// Replaces `values` by their element-wise sum over all ranks.
    pub fn sum_f64(&self, values: &mut [f64]) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let mine = values.to_vec();
            m.comm.all_reduce_into(&mine[..], values, SystemOperation::sum());
        }
        let _ = values;
    }

    /// Whether `flag` holds on any rank (every rank gets the same answer).
    pub fn any(&self, flag: bool) -> bool {
        let mut v = [flag as u8 as f64];
        self.sum_f64(&mut v);
        v[0] > 0.0
    }

    /// Waits until every rank has come here.
    pub fn barrier(&self) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::CommunicatorCollectives;
            m.comm.barrier();
        }
    }

    /// Ends every rank of the run with `code` (a rank that fails alone would leave the others
    /// waiting in a collective). In a world of one, exits.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::topology::Communicator;
            m.comm.abort(code);
        }
        std::process::exit(code)
    }

    /// Runs `f` on rank 0 first and on the other ranks once it is done (e.g. so that one
    /// process prepares the data and the others find it prepared).
    pub fn leader_first<R>(&self, f: impl FnOnce() -> R) -> R {
        if self.size == 1 {
            return f();
        }
        if !self.is_leader() {
            self.barrier();
        }
        let r = f();
        if self.is_leader() {
            self.barrier();
        }
        r
    }
}
