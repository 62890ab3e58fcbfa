//! The communicator for data-parallel training, after Horovod's design: one process per device,
//! started by `mpirun -np N` or Slurm's `srun --mpi=pmix`; every process holds a full copy of
//! the model, and the ranks exchange gradients with all-reduce.
//!
//! [`from_environment`] picks the implementation: [`Single`] for a plain run, `Mpi` (cargo
//! feature `mpi`) when an MPI launcher started the process.

use std::sync::Arc;

use half::f16;

/// The processes of one training run. All collective calls must be made by every rank in the
/// same order. Errors are Strings that say what went wrong.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Rank among the processes on this machine (to pick a GPU).
    fn local_rank(&self) -> usize;
    /// A short description, e.g. "single process" or "MPI (Open MPI v4.1.x), 2 ranks".
    fn describe(&self) -> String;
    fn barrier(&self) -> Result<(), String>;
    /// Ends every process of the run now, with `code`. A rank that fails alone must not simply
    /// return: the others would wait forever in their next collective (and it in finalizing).
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<(), String>;
    /// Replaces `buf` on every rank with root's bytes (lengths may differ before the call).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), String>;
    /// Element-wise sum over ranks, in place, the same result on every rank.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<(), String>;
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), String>;
    /// Every rank's bytes, in rank order (lengths may differ).
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, String>;

    /// One step of a ring: sends `send` to rank + 1 and fills `recv` with what rank − 1 sent
    /// (ranks modulo size); every rank calls it at once. It is the transport of
    /// [`Communicator::all_reduce_mean_f16`]. This default goes through `all_gather_bytes`, so
    /// any implementation gets a correct ring; MPI overrides it with a point-to-point
    /// send/receive so that only the f16 payload crosses the wire.
    fn ring_exchange_u16(&self, send: &[u16], recv: &mut [u16]) -> Result<(), String> {
        let bytes: Vec<u8> = send.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = self.all_gather_bytes(&bytes)?;
        let from = (self.rank() + self.size() - 1) % self.size();
        let got = all
            .get(from)
            .ok_or_else(|| format!("ring exchange: no message from rank {from}"))?;
        if got.len() != recv.len() * 2 {
            return Err(format!(
                "ring exchange: rank {from} sent {} values, rank {} expected {}",
                got.len() / 2,
                self.rank(),
                recv.len()
            ));
        }
        for (d, pair) in recv.iter_mut().zip(got.chunks_exact(2)) {
            *d = u16::from_le_bytes([pair[0], pair[1]]);
        }
        Ok(())
    }

    /// Element-wise mean over ranks: the sum times 1/size.
    fn all_reduce_mean_f32(&self, buf: &mut [f32]) -> Result<(), String> {
        self.all_reduce_sum_f32(buf)?;
        let scale = 1.0 / self.size() as f32;
        buf.iter_mut().for_each(|v| *v *= scale);
        Ok(())
    }

    /// Element-wise mean over ranks with the messages compressed to IEEE half precision
    /// (Horovod's fp16 compression), which halves the bytes on the wire. A ring all-reduce:
    /// each hop adds in f32 and rounds back to f16, as NCCL does for half, so values beyond
    /// ±65504 become infinite and those below ~6e-8 become zero. Every rank gets bit-identical
    /// results. With one rank it only rounds to f16 and back.
    fn all_reduce_mean_f16(&self, buf: &mut [f32]) -> Result<(), String> {
        ring_all_reduce_mean_f16(buf, self.rank(), self.size(), |send, recv| {
            self.ring_exchange_u16(send, recv)
        })
    }

    /// Checks that every rank runs with the same settings. `config` is `key=value` lines
    /// (architecture, batch size, …); if any rank's differ from rank 0's, every rank returns the
    /// same Err naming each differing key, so all of them stop instead of deadlocking later.
    fn check_same(&self, config: &str) -> Result<(), String> {
        let texts = self.all_gather_bytes(config.as_bytes())?;
        compare_configs(&texts)
    }
}

/// The communicator of a run with one process: rank 0 of 1, collectives leave data unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Single {
    fn check_root(root: usize) -> Result<(), String> {
        if root == 0 {
            Ok(())
        } else {
            Err(format!("root {root} is not a rank of a single-process run"))
        }
    }
}

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn describe(&self) -> String {
        "single process".to_string()
    }
    fn barrier(&self) -> Result<(), String> {
        Ok(())
    }
    fn broadcast_f32(&self, _buf: &mut [f32], root: usize) -> Result<(), String> {
        Self::check_root(root)
    }
    fn broadcast_bytes(&self, _buf: &mut Vec<u8>, root: usize) -> Result<(), String> {
        Self::check_root(root)
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<(), String> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<(), String> {
        Ok(())
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        Ok(vec![mine.to_vec()])
    }
    fn ring_exchange_u16(&self, send: &[u16], recv: &mut [u16]) -> Result<(), String> {
        if send.len() != recv.len() {
            return Err(format!(
                "ring exchange: sent {} values, expected {}",
                send.len(),
                recv.len()
            ));
        }
        recv.copy_from_slice(send);
        Ok(())
    }
}

/// Where chunk `c` of `n` values split among `size` ranks lies: as even as possible, so every
/// rank computes the same bounds.
fn chunk_range(c: usize, n: usize, size: usize) -> std::ops::Range<usize> {
    let at = |c: usize| (c as u128 * n as u128 / size as u128) as usize;
    at(c)..at(c + 1)
}

/// Ring all-reduce of `buf` in f16, then the mean in f32. `exchange(send, recv)` sends to
/// rank + 1 and receives from rank − 1; it is a parameter so that the arithmetic can be tested
/// without MPI. Reduce-scatter: at step s rank r sends chunk r − s and adds the incoming chunk
/// r − s − 1 to its own, so after size − 1 steps it holds the full sum of chunk r + 1.
/// All-gather: size − 1 more steps pass the finished chunks round the ring unchanged.
fn ring_all_reduce_mean_f16(
    buf: &mut [f32],
    rank: usize,
    size: usize,
    mut exchange: impl FnMut(&[u16], &mut [u16]) -> Result<(), String>,
) -> Result<(), String> {
    if rank >= size {
        return Err(format!("rank {rank} is not below the size {size}"));
    }
    let n = buf.len();
    let mut half: Vec<u16> = buf.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
    if size > 1 {
        let longest = (0..size)
            .map(|c| chunk_range(c, n, size).len())
            .max()
            .unwrap_or(0);
        let mut incoming = vec![0u16; longest];
        for step in 0..size - 1 {
            let send = chunk_range((rank + size - step) % size, n, size);
            let recv = chunk_range((rank + 2 * size - step - 1) % size, n, size);
            let got = &mut incoming[..recv.len()];
            exchange(&half[send], got)?;
            for (mine, &theirs) in half[recv].iter_mut().zip(got.iter()) {
                let sum = f16::from_bits(*mine).to_f32() + f16::from_bits(theirs).to_f32();
                *mine = f16::from_f32(sum).to_bits();
            }
        }
        for step in 0..size - 1 {
            let send = chunk_range((rank + 1 + size - step) % size, n, size);
            let recv = chunk_range((rank + size - step) % size, n, size);
            let got = &mut incoming[..recv.len()];
            exchange(&half[send], got)?;
            half[recv].copy_from_slice(got);
        }
    }
    let scale = 1.0 / size as f32;
    for (v, &h) in buf.iter_mut().zip(&half) {
        *v = f16::from_bits(h).to_f32() * scale;
    }
    Ok(())
}

/// The `key=value` lines of one rank's configuration, in order; blank lines and `#` comments
/// are skipped, a line without `=` is a key with an empty value, and a repeated key keeps its
/// last value.
fn parse_config(text: &str) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or((line, ""));
        let (key, value) = (key.trim().to_string(), value.trim().to_string());
        match pairs.iter_mut().find(|(k, _)| *k == key) {
            Some(pair) => pair.1 = value,
            None => pairs.push((key, value)),
        }
    }
    pairs
}

/// Compares every rank's configuration (indexed by rank) with rank 0's. A pure function of
/// the gathered texts, so every rank reaches the same verdict and the same message.
fn compare_configs(texts: &[Vec<u8>]) -> Result<(), String> {
    let configs: Vec<Vec<(String, String)>> = texts
        .iter()
        .map(|t| parse_config(&String::from_utf8_lossy(t)))
        .collect();
    let Some(first) = configs.first() else {
        return Ok(());
    };
    // Rank 0's keys in its order, then keys only other ranks have, in order of appearance.
    let mut keys: Vec<&str> = Vec::new();
    for (key, _) in configs.iter().flatten() {
        if !keys.contains(&key.as_str()) {
            keys.push(key);
        }
    }
    let value = |config: &[(String, String)], key: &str| -> Option<String> {
        config
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "no such key".to_string());
    let mut problems = Vec::new();
    for key in keys {
        let reference = value(first, key);
        let others: Vec<String> = configs
            .iter()
            .enumerate()
            .skip(1)
            .filter_map(|(rank, config)| {
                let v = value(config, key);
                (v != reference).then(|| format!("rank {rank} has {}", show(&v)))
            })
            .collect();
        if !others.is_empty() {
            problems.push(format!(
                "{key}: rank 0 has {}, {}",
                show(&reference),
                others.join(", ")
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "ranks disagree on their configuration: {}",
            problems.join("; ")
        ))
    }
}

/// What an MPI launcher told this process about the run, read from its environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Launch {
    rank: Option<usize>,
    size: Option<usize>,
}

impl Launch {
    /// `Some` when an MPI launcher (Open MPI's mpirun, a PMI or PMIx server such as Slurm's
    /// `srun --mpi=pmix`) started this process. `env` looks a variable up; a parameter so that
    /// tests need not change the process environment.
    fn detect(env: &dyn Fn(&str) -> Option<String>) -> Option<Launch> {
        let number = |key: &str| env(key).and_then(|v| v.trim().parse::<usize>().ok());
        let present = [
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_RANK",
            "PMI_RANK",
            "PMIX_RANK",
        ]
        .iter()
        .any(|k| env(k).is_some());
        if !present {
            return None;
        }
        let rank = ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"]
            .iter()
            .find_map(|k| number(k));
        let size = [
            "OMPI_COMM_WORLD_SIZE",
            "PMI_SIZE",
            "SLURM_STEP_NUM_TASKS",
            "SLURM_NTASKS",
        ]
        .iter()
        .find_map(|k| number(k));
        Some(Launch { rank, size })
    }

    /// More than one process, as far as the environment tells.
    #[cfg(any(not(feature = "mpi"), test))]
    fn is_multi(&self) -> bool {
        self.size.is_some_and(|s| s > 1) || self.rank.is_some_and(|r| r > 0)
    }

    fn describe(&self) -> String {
        let show = |v: Option<usize>| v.map_or("?".to_string(), |v| v.to_string());
        format!("rank {} of {}", show(self.rank), show(self.size))
    }
}

/// The communicator of this process: MPI when an MPI launcher started it (and this build has
/// the `mpi` feature), otherwise [`Single`]. Call it once and share the Arc: MPI can be
/// initialized only once per process, and dropping the last Arc finalizes it.
pub fn from_environment() -> Result<Arc<dyn Communicator>, String> {
    let launch = Launch::detect(&|k| std::env::var(k).ok());
    from_launch(launch)
}

#[cfg(not(feature = "mpi"))]
fn from_launch(launch: Option<Launch>) -> Result<Arc<dyn Communicator>, String> {
    match launch {
        Some(l) if l.is_multi() => Err(format!(
            "this process was started by an MPI launcher ({}), but effnet was built without the \
             `mpi` feature, so it cannot talk to the other ranks; rebuild with \
             `cargo build --release --features mpi` (needs Open MPI and libclang, e.g. \
             `apt-get install openmpi-bin libopenmpi-dev libclang-dev`)",
            l.describe()
        )),
        _ => Ok(Arc::new(Single)),
    }
}

#[cfg(feature = "mpi")]
fn from_launch(launch: Option<Launch>) -> Result<Arc<dyn Communicator>, String> {
    let Some(launch) = launch else {
        return Ok(Arc::new(Single));
    };
    let comm = Mpi::init()?;
    if let Some(expected) = launch.size {
        if comm.size() != expected {
            return Err(format!(
                "the launcher started this process as {} but MPI sees {} ranks: the program and \
                 the launcher use different MPI libraries, or srun needs `--mpi=pmix`",
                launch.describe(),
                comm.size()
            ));
        }
    }
    Ok(Arc::new(comm))
}

#[cfg(feature = "mpi")]
pub use mpi_impl::Mpi;

#[cfg(feature = "mpi")]
mod mpi_impl {
    use std::sync::{Mutex, MutexGuard};
    use std::thread::ThreadId;

    use mpi::collective::SystemOperation;
    use mpi::datatype::PartitionMut;
    use mpi::environment::Universe;
    use mpi::topology::Communicator as _;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use mpi::{Count, Threading};

    use super::Communicator;

    /// Most elements per MPI call: MPI counts are C ints, so longer buffers go in pieces.
    const MAX_COUNT: usize = 1 << 30;

    /// MPI_Abort on the world: mpirun ends every rank. No lock: the thread holding it may be the
    /// one that failed, and aborting is allowed from any thread at any time.
    fn abort_world(code: i32) -> ! {
        // SAFETY: MPI is initialized (only `Mpi::init` installs a caller of this) and the world
        // communicator is a constant handle; MPI_Abort does not return.
        unsafe {
            mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, code);
        }
        std::process::exit(code)
    }

    /// The MPI state. Fields drop in order: the world handle, then the universe, whose drop
    /// calls `MPI_Finalize`.
    struct Inner {
        world: SimpleCommunicator,
        _universe: Universe,
    }

    // SAFETY: rsmpi's handles hold raw MPI pointers, hence are not `Send`, but MPI handles are
    // not tied to the thread that made them: the MPI standard restricts *which* threads call
    // MPI and *whether concurrently*, per the threading level granted at init. `Inner` is only
    // reachable through `Mpi::inner`'s mutex, so no two threads ever call MPI at once, which is
    // all `Threading::Serialized` asks. If the library grants only `Funneled`, `Mpi::lock`
    // refuses every call from a thread other than the one that initialized MPI.
    unsafe impl Send for Inner {}

    /// The MPI world of a run launched by `mpirun` or `srun --mpi=pmix`. Errors inside MPI
    /// abort the whole job (MPI's default handler), which stops every rank rather than leaving
    /// the others waiting. Drop the last reference on the main thread: MPI should be finalized
    /// by the thread that initialized it.
    pub struct Mpi {
        inner: Mutex<Inner>,
        rank: usize,
        size: usize,
        local_rank: usize,
        library: String,
        /// Set when MPI granted only `Funneled`: then only this thread may call MPI.
        only_thread: Option<ThreadId>,
    }

    impl Mpi {
        /// Initializes MPI (asking for `Serialized` threading, accepting `Funneled`) and learns
        /// this process's rank on the world and on its machine. Collective: every rank calls it.
        pub fn init() -> Result<Mpi, String> {
            let (universe, granted) = mpi::initialize_with_threading(Threading::Serialized).ok_or(
                "MPI is already initialized in this process (from_environment and \
                        Mpi::init may be called once; share the communicator)",
            )?;
            if granted < Threading::Funneled {
                return Err(format!(
                    "the MPI library grants only {granted:?} threading; effnet needs at least \
                     Funneled"
                ));
            }
            let world = universe.world();
            let rank = usize::try_from(world.rank()).map_err(|e| format!("MPI rank: {e}"))?;
            let size = usize::try_from(world.size()).map_err(|e| format!("MPI size: {e}"))?;
            // The ranks sharing memory with this one are the ones on this machine; the split
            // communicator is freed right away.
            let local = world.split_shared(world.rank()).rank();
            let local_rank = usize::try_from(local).map_err(|e| format!("MPI local rank: {e}"))?;
            let library = mpi::environment::library_version()
                .ok()
                .and_then(|v| {
                    let first = v.lines().next()?.split(',').next()?.trim().to_string();
                    (!first.is_empty()).then_some(first)
                })
                .unwrap_or_else(|| "unknown library".to_string());
            let only_thread = (granted == Threading::Funneled).then(|| std::thread::current().id());
            // A panic on one rank would unwind into MPI_Finalize and wait for the others, which
            // wait for it: take the whole run down instead, after the usual message.
            let report = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                report(info);
                abort_world(101);
            }));
            Ok(Mpi {
                inner: Mutex::new(Inner {
                    world,
                    _universe: universe,
                }),
                rank,
                size,
                local_rank,
                library,
                only_thread,
            })
        }

        /// The MPI state, for one call at a time.
        fn lock(&self) -> Result<MutexGuard<'_, Inner>, String> {
            if let Some(thread) = self.only_thread {
                if std::thread::current().id() != thread {
                    return Err(
                        "MPI granted only Funneled threading: call the communicator \
                                from the thread that created it"
                            .to_string(),
                    );
                }
            }
            self.inner.lock().map_err(|_| {
                "an earlier MPI call panicked; the ranks may be out of step".to_string()
            })
        }

        fn root(&self, root: usize) -> Result<i32, String> {
            if root < self.size {
                i32::try_from(root).map_err(|e| format!("root {root}: {e}"))
            } else {
                Err(format!("root {root} is not a rank of {}", self.size))
            }
        }

        fn all_reduce_sum<T: Equivalence + Copy>(&self, buf: &mut [T]) -> Result<(), String> {
            let inner = self.lock()?;
            let mut send = Vec::with_capacity(buf.len().min(MAX_COUNT));
            for piece in buf.chunks_mut(MAX_COUNT) {
                send.clear();
                send.extend_from_slice(piece);
                inner
                    .world
                    .all_reduce_into(&send[..], piece, SystemOperation::sum());
            }
            Ok(())
        }
    }

    fn count(n: usize, what: &str) -> Result<Count, String> {
        Count::try_from(n).map_err(|_| format!("{what}: {n} bytes is more than MPI can send"))
    }

    impl Communicator for Mpi {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn local_rank(&self) -> usize {
            self.local_rank
        }
        fn describe(&self) -> String {
            format!("MPI ({}), {} ranks", self.library, self.size)
        }
        fn barrier(&self) -> Result<(), String> {
            self.lock()?.world.barrier();
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            abort_world(code)
        }
        fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<(), String> {
            let root = self.root(root)?;
            let inner = self.lock()?;
            let process = inner.world.process_at_rank(root);
            for piece in buf.chunks_mut(MAX_COUNT) {
                process.broadcast_into(piece);
            }
            Ok(())
        }
        fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), String> {
            let root = self.root(root)?;
            let inner = self.lock()?;
            let process = inner.world.process_at_rank(root);
            let mut len = buf.len() as u64;
            process.broadcast_into(&mut len);
            let len = usize::try_from(len).map_err(|e| format!("broadcast length: {e}"))?;
            buf.resize(len, 0);
            for piece in buf.chunks_mut(MAX_COUNT) {
                process.broadcast_into(piece);
            }
            Ok(())
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<(), String> {
            self.all_reduce_sum(buf)
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), String> {
            self.all_reduce_sum(buf)
        }
        fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, String> {
            let inner = self.lock()?;
            let mine_count = count(mine.len(), "all_gather_bytes")?;
            let mut counts: Vec<Count> = vec![0; self.size];
            inner.world.all_gather_into(&mine_count, &mut counts[..]);
            let mut displs: Vec<Count> = Vec::with_capacity(self.size);
            let mut total = 0usize;
            for &c in &counts {
                displs.push(count(total, "all_gather_bytes total")?);
                total += usize::try_from(c).map_err(|e| format!("gathered count: {e}"))?;
            }
            count(total, "all_gather_bytes total")?;
            if total == 0 {
                // Every rank sees the same counts, so all skip the call: Open MPI rejects an
                // Allgatherv whose buffers are all empty (dangling pointers) as MPI_ERR_ARG.
                return Ok(vec![Vec::new(); self.size]);
            }
            let mut all = vec![0u8; total];
            {
                let mut parts = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
                inner.world.all_gather_varcount_into(mine, &mut parts);
            }
            let mut out = Vec::with_capacity(self.size);
            let mut at = 0usize;
            for &c in &counts {
                let c = c as usize; // non-negative: checked above
                out.push(all[at..at + c].to_vec());
                at += c;
            }
            Ok(out)
        }
        fn ring_exchange_u16(&self, send: &[u16], recv: &mut [u16]) -> Result<(), String> {
            count(send.len(), "ring exchange")?;
            count(recv.len(), "ring exchange")?;
            let next = self.root((self.rank + 1) % self.size)?;
            let prev = self.root((self.rank + self.size - 1) % self.size)?;
            let inner = self.lock()?;
            let status = mpi::point_to_point::send_receive_into(
                send,
                &inner.world.process_at_rank(next),
                recv,
                &inner.world.process_at_rank(prev),
            );
            let got = status.count(u16::equivalent_datatype());
            if usize::try_from(got).ok() != Some(recv.len()) {
                return Err(format!(
                    "ring exchange: rank {prev} sent {got} values, rank {} expected {}",
                    self.rank,
                    recv.len()
                ));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Barrier, Mutex};

    /// Deterministic values in roughly [-scale, scale], different per rank.
    fn values(rank: usize, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = ((i * 7919 + rank * 104_729) % 10_007) as f32 / 10_007.0;
                (x * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// Runs the f16 ring on `size` threads joined by channels; returns each rank's result and
    /// how many u16 values it sent.
    fn ring_on_threads(inputs: Vec<Vec<f32>>) -> Vec<(Vec<f32>, usize)> {
        let size = inputs.len();
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..size).map(|_| mpsc::channel::<Vec<u16>>()).unzip();
        // Rank r sends on channel r + 1 and receives on channel r.
        let handles: Vec<_> = inputs
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (mut buf, rx))| {
                let tx = senders[(rank + 1) % size].clone();
                std::thread::spawn(move || {
                    let mut sent = 0;
                    ring_all_reduce_mean_f16(&mut buf, rank, size, |send, recv| {
                        sent += send.len();
                        tx.send(send.to_vec()).map_err(|e| e.to_string())?;
                        let got = rx.recv().map_err(|e| e.to_string())?;
                        assert_eq!(got.len(), recv.len(), "rank {rank}: chunk length");
                        recv.copy_from_slice(&got);
                        Ok(())
                    })
                    .expect("ring");
                    (buf, sent)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    }

    fn f32_mean(inputs: &[Vec<f32>]) -> Vec<f32> {
        let n = inputs[0].len();
        (0..n)
            .map(|i| inputs.iter().map(|v| v[i]).sum::<f32>() / inputs.len() as f32)
            .collect()
    }

    #[test]
    fn ring_f16_matches_f32_mean_and_is_identical_on_every_rank() {
        for (size, n) in [(2, 1001), (3, 1000), (4, 10_007), (3, 2), (5, 0)] {
            let inputs: Vec<Vec<f32>> = (0..size).map(|r| values(r, n, 3.0)).collect();
            let expected = f32_mean(&inputs);
            let results = ring_on_threads(inputs);
            for (rank, (got, sent)) in results.iter().enumerate() {
                assert_eq!(got.len(), n);
                // Bit-identical everywhere: replicas must not drift apart.
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    results[0].0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "size {size}: rank {rank} differs from rank 0"
                );
                for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                    // f16 keeps 11 significant bits: size input roundings plus size − 1 hop
                    // roundings of sums ≤ 3·size, divided by size, stay below 3·size/2048.
                    let tol = 3.0 * size as f32 / 2048.0;
                    assert!((g - e).abs() <= tol, "size {size}, [{i}]: {g} vs {e}");
                }
                // Each rank sends 2·(size − 1) chunks of about n/size values.
                let per_rank = 2 * (size - 1) * n.div_ceil(size);
                assert!(*sent <= per_rank, "size {size}: rank {rank} sent {sent}");
            }
        }
    }

    #[test]
    fn ring_f16_really_rounds_to_half() {
        // 1 + 2⁻¹² is not a half; each rank's copy rounds to 1, so the mean is exactly 1.
        let x = 1.0 + 1.0 / 4096.0;
        let results = ring_on_threads(vec![vec![x; 5], vec![x; 5], vec![x; 5]]);
        for (got, _) in results {
            assert_eq!(got, vec![1.0; 5]);
        }
        let mut one = vec![0.1f32, 70_000.0, 1e-9];
        Single.all_reduce_mean_f16(&mut one).expect("single");
        assert_eq!(one, vec![f16::from_f32(0.1).to_f32(), f32::INFINITY, 0.0]);
        assert_ne!(one[0], 0.1);
    }

    #[test]
    fn ring_rejects_a_rank_outside_the_group() {
        let err = ring_all_reduce_mean_f16(&mut [1.0], 2, 2, |_, _| Ok(())).unwrap_err();
        assert!(err.contains("rank 2"), "{err}");
    }

    #[test]
    fn single_is_rank_zero_of_one_and_leaves_data_alone() {
        let c = Single;
        assert_eq!((c.rank(), c.size(), c.local_rank()), (0, 1, 0));
        assert_eq!(c.describe(), "single process");
        c.barrier().expect("barrier");
        let mut f = vec![1.5f32, -2.0];
        c.broadcast_f32(&mut f, 0).expect("broadcast");
        c.all_reduce_sum_f32(&mut f).expect("sum");
        c.all_reduce_mean_f32(&mut f).expect("mean");
        assert_eq!(f, vec![1.5, -2.0]);
        let mut d = vec![0.25f64];
        c.all_reduce_sum_f64(&mut d).expect("sum");
        assert_eq!(d, vec![0.25]);
        let mut b = b"abc".to_vec();
        c.broadcast_bytes(&mut b, 0).expect("broadcast");
        assert_eq!(b, b"abc");
        assert_eq!(
            c.all_gather_bytes(b"xy").expect("gather"),
            vec![b"xy".to_vec()]
        );
        assert!(c.broadcast_f32(&mut f, 1).is_err());
        assert!(c.broadcast_bytes(&mut b, 3).is_err());
        c.check_same("a=1\nb=2").expect("one rank always agrees");
        let mut r = [0u16; 2];
        c.ring_exchange_u16(&[7, 9], &mut r).expect("ring");
        assert_eq!(r, [7, 9]);
    }

    fn texts(t: &[&str]) -> Vec<Vec<u8>> {
        t.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn configs_that_agree_pass() {
        let same = "model=b0\nbatch_size=4\n";
        assert_eq!(compare_configs(&texts(&[same, same, same])), Ok(()));
        // Blank lines, comments, spacing and order do not matter.
        let other = "# note\n batch_size = 4\n\nmodel=b0";
        assert_eq!(compare_configs(&texts(&[same, other])), Ok(()));
        assert_eq!(compare_configs(&[]), Ok(()));
    }

    #[test]
    fn configs_that_differ_name_each_key_and_rank() {
        let r0 = "model=b0\nbatch_size=4\nlr=0.1";
        let r1 = "model=b0\nbatch_size=8\nlr=0.1";
        assert_eq!(
            compare_configs(&texts(&[r0, r1])),
            Err(
                "ranks disagree on their configuration: batch_size: rank 0 has 4, rank 1 has 8"
                    .to_string()
            )
        );
        let r2 = "model=b1\nbatch_size=16\nlr=0.1\nseed=3";
        assert_eq!(
            compare_configs(&texts(&[r0, r1, r2])),
            Err(
                "ranks disagree on their configuration: model: rank 0 has b0, rank 2 has b1; \
                 batch_size: rank 0 has 4, rank 1 has 8, rank 2 has 16; \
                 seed: rank 0 has no such key, rank 2 has 3"
                    .to_string()
            )
        );
        let missing = "model=b0\nlr=0.1";
        assert_eq!(
            compare_configs(&texts(&[r0, missing])),
            Err(
                "ranks disagree on their configuration: batch_size: rank 0 has 4, rank 1 has \
                 no such key"
                    .to_string()
            )
        );
    }

    /// An in-process group of ranks on threads whose only real collective is all_gather_bytes;
    /// the rest are built on it. Exercises the trait's provided methods with several ranks.
    struct Local {
        rank: usize,
        hub: Arc<(Mutex<Vec<Vec<u8>>>, Barrier)>,
    }

    impl Communicator for Local {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.hub.0.lock().expect("hub").len()
        }
        fn local_rank(&self) -> usize {
            self.rank
        }
        fn describe(&self) -> String {
            "threads".into()
        }
        fn barrier(&self) -> Result<(), String> {
            self.hub.1.wait();
            Ok(())
        }
        fn broadcast_f32(&self, _: &mut [f32], _: usize) -> Result<(), String> {
            Err("unused".into())
        }
        fn broadcast_bytes(&self, _: &mut Vec<u8>, _: usize) -> Result<(), String> {
            Err("unused".into())
        }
        fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<(), String> {
            Err("unused".into())
        }
        fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<(), String> {
            Err("unused".into())
        }
        fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, String> {
            self.hub.0.lock().expect("hub")[self.rank] = mine.to_vec();
            self.hub.1.wait();
            let all = self.hub.0.lock().expect("hub").clone();
            self.hub.1.wait();
            Ok(all)
        }
    }

    fn on_local_ranks<T: Send + 'static>(
        size: usize,
        f: impl Fn(&Local) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let hub = Arc::new((Mutex::new(vec![Vec::new(); size]), Barrier::new(size)));
        let f = Arc::new(f);
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let (hub, f) = (hub.clone(), f.clone());
                std::thread::spawn(move || f(&Local { rank, hub }))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect()
    }

    #[test]
    fn check_same_gives_every_rank_the_same_error() {
        let results = on_local_ranks(3, |c| {
            let batch = if c.rank() == 1 { 8 } else { 4 };
            c.check_same(&format!("model=b0\nbatch_size={batch}"))
        });
        let expected = Err(
            "ranks disagree on their configuration: batch_size: rank 0 has 4, rank 1 has 8"
                .to_string(),
        );
        assert_eq!(results, vec![expected.clone(), expected.clone(), expected]);
        let agree = on_local_ranks(3, |c| c.check_same("model=b0\nbatch_size=4"));
        assert_eq!(agree, vec![Ok(()), Ok(()), Ok(())]);
    }

    #[test]
    fn provided_ring_exchange_gives_the_f16_mean() {
        let n = 1003;
        let inputs: Vec<Vec<f32>> = (0..3).map(|r| values(r, n, 1.0)).collect();
        let expected = f32_mean(&inputs);
        let shared = Arc::new(inputs);
        let results = on_local_ranks(3, move |c| {
            let mut buf = shared[c.rank()].clone();
            c.all_reduce_mean_f16(&mut buf).map(|()| buf)
        });
        for got in results {
            let got = got.expect("mean");
            assert_eq!(got.len(), n);
            for (g, e) in got.iter().zip(&expected) {
                assert!((g - e).abs() <= 3.0 / 2048.0, "{g} vs {e}");
            }
        }
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn launch_is_read_from_the_launchers_variables() {
        assert_eq!(Launch::detect(&env(&[])), None);
        // Slurm alone (sbatch, or srun without --mpi) is no MPI launch.
        assert_eq!(
            Launch::detect(&env(&[("SLURM_NTASKS", "4"), ("SLURM_PROCID", "0")])),
            None
        );
        let ompi = [("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "1")];
        let l = Launch::detect(&env(&ompi)).expect("mpirun");
        assert_eq!(
            l,
            Launch {
                rank: Some(1),
                size: Some(2)
            }
        );
        assert!(l.is_multi());
        let pmix = [
            ("PMIX_RANK", "0"),
            ("SLURM_STEP_NUM_TASKS", "4"),
            ("SLURM_NTASKS", "8"),
        ];
        let l = Launch::detect(&env(&pmix)).expect("srun --mpi=pmix");
        assert_eq!(
            l,
            Launch {
                rank: Some(0),
                size: Some(4)
            }
        );
        let one = [("OMPI_COMM_WORLD_SIZE", "1"), ("OMPI_COMM_WORLD_RANK", "0")];
        assert!(!Launch::detect(&env(&one)).expect("mpirun -np 1").is_multi());
        let unknown_size = [("PMI_RANK", "3")];
        assert!(Launch::detect(&env(&unknown_size)).expect("pmi").is_multi());
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn without_the_feature_a_multi_rank_launch_is_an_error() {
        let launch = Some(Launch {
            rank: Some(0),
            size: Some(2),
        });
        let err = from_launch(launch).err().expect("must refuse");
        assert!(err.contains("--features mpi"), "{err}");
        assert!(err.contains("rank 0 of 2"), "{err}");
        let single = from_launch(None).expect("plain run");
        assert_eq!(single.size(), 1);
        let one = from_launch(Some(Launch {
            rank: Some(0),
            size: Some(1),
        }))
        .expect("-np 1");
        assert_eq!(one.describe(), "single process");
    }
}
