//! A pass that runs directly once, then as a captured CUDA graph: the first run lets cuDNN
//! settle its algorithms and loads the kernels (neither may happen during a capture), the second
//! is captured, and later ones replay the graph. A graph keeps the device addresses it was
//! captured with, so what changes between runs (images, masks, weights) is copied into the same
//! buffers beforehand.

use cudarc::driver::CudaGraph;
use effnet_dist::Communicator;

use crate::device::{Gpu, Result};

/// One pass's graph: none before the pass has run directly once, then captured and replayed; if
/// the capture fails (reported once), the pass keeps launching directly.
#[derive(Default)]
pub struct Replay {
    ran: bool,
    graph: Option<CudaGraph>,
    failed: bool,
}

impl Replay {
    /// Runs `work` (the pass's device launches, nothing from the host) directly or as the
    /// graph. A pass holding NCCL calls (synchronized BN) uses its graph only if every replica
    /// of `agree` captured one: NCCL wants a collective captured on all ranks or on none.
    pub fn run(
        &mut self,
        gpu: &Gpu,
        agree: Option<&dyn Communicator>,
        mut work: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        if !self.ran {
            self.ran = true;
            return work();
        }
        if self.graph.is_none() && !self.failed {
            let mut captured = gpu.capture(&mut work);
            if let Some(comm) = agree {
                let mut ok = [captured.is_ok() as u8 as f64];
                comm.all_reduce_sum_f64(&mut ok)?;
                if ok[0] as usize != comm.size() && captured.is_ok() {
                    captured = Err("another replica could not capture its pass".into());
                }
            }
            match captured {
                Ok(g) => self.graph = Some(g),
                Err(e) => {
                    eprintln!("effnet: no CUDA graph for a pass ({e}); launching it directly");
                    self.failed = true;
                    gpu.capture_failures.set(gpu.capture_failures.get() + 1);
                }
            }
        }
        match &self.graph {
            Some(g) => g
                .launch()
                .map_err(|e| format!("replaying a captured pass: {e:?}")),
            None => work(),
        }
    }
}
