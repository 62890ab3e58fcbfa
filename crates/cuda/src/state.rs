//! The training state on the device: the optimizer's slots, the weight-decay mask and the EMA,
//! beside the parameters and gradients of [`GpuNet`], and the optimizer step over them
//! (crates/train's rules, as the kernels of optim.cu write them). Gradients are averaged over
//! the replicas with NCCL when every replica has it, else over MPI through the host
//! ([`Exchange`]).

use std::rc::Rc;

use cudarc::driver::CudaSlice;
use effnet_train::optim::{adam_step_size, decay_mask, Kind};
use effnet_train::trainer::{StateMut, StateRef, Stepped, Update};

use crate::device::{addr, linear, Gpu, Result};
use crate::nccl::{nccl_present, Nccl, NCCL_HELP};
use crate::net::GpuNet;

/// Blocks of the gradient norm's partial sums (one f64 each, added on the host).
const NORM_BLOCKS: usize = 1024;

/// How gradients travel between replicas.
enum Route {
    Nccl(Rc<Nccl>),
    /// No NCCL on some replica: through the host over MPI.
    Host,
}

/// The gradients' average over the replicas: NCCL on the device when every replica can open
/// it (decided together at first use), else MPI through the host. Kept for the whole run (a
/// new [`DeviceState`] after a resume reuses it).
#[derive(Default)]
pub struct Exchange {
    route: Option<Route>,
    /// f16 gradients for a compressed NCCL exchange (allocated at first use).
    half: Option<CudaSlice<u16>>,
}

pub struct DeviceState {
    slot_a: CudaSlice<f32>,
    slot_b: CudaSlice<f32>,
    mask: CudaSlice<f32>,
    /// The EMA's parameters and running statistics.
    ema: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    norm_partials: CudaSlice<f64>,
}

impl DeviceState {
    /// The host's state on the device: `state.params` into `net`, slots and EMA here.
    pub fn new(gpu: &Gpu, net: &mut GpuNet, state: StateRef<'_>) -> Result<DeviceState> {
        let layout = &net.net.layout;
        check_lengths(layout.param_len, state.params.len(), "parameters")?;
        gpu.write(state.params, &mut net.params)?;
        let ema = match state.ema {
            Some(e) => {
                check_lengths(layout.param_len, e.params.len(), "EMA parameters")?;
                check_lengths(layout.buffer_len, e.buffers.len(), "EMA statistics")?;
                Some((gpu.upload(&e.params)?, gpu.upload(&e.buffers)?))
            }
            None => None,
        };
        Ok(DeviceState {
            slot_a: gpu.upload(&state.optimizer.slot_a)?,
            slot_b: gpu.upload(&state.optimizer.slot_b)?,
            mask: gpu.upload(&decay_mask(layout))?,
            ema,
            norm_partials: gpu.zeros(NORM_BLOCKS)?,
        })
    }

    /// Copies parameters, slots and EMA to the host.
    pub fn read(&self, gpu: &Gpu, net: &GpuNet, state: StateMut<'_>) -> Result<()> {
        let n = net.net.layout.param_len;
        check_lengths(n, state.params.len(), "parameters")?;
        state.params.copy_from_slice(&gpu.read(&net.params, n)?);
        let (a, b) = (state.optimizer.slot_a.len(), state.optimizer.slot_b.len());
        state.optimizer.slot_a = gpu.read(&self.slot_a, a)?;
        state.optimizer.slot_b = gpu.read(&self.slot_b, b)?;
        if let (Some(host), Some((p, b))) = (state.ema, &self.ema) {
            host.params = gpu.read(p, host.params.len())?;
            host.buffers = gpu.read(b, host.buffers.len())?;
        }
        Ok(())
    }

    /// One optimizer step from `net.grads` (see [`effnet_train::trainer::Passes::update`]), the
    /// exchange timed (the stream is drained around it). With `check_finite` (loss scaling), the
    /// averaged gradients' norm is read first, and a non-finite one takes no step.
    pub fn update(
        &mut self,
        gpu: &Gpu,
        net: &mut GpuNet,
        u: &Update<'_>,
        exchange: &mut Exchange,
        check_finite: bool,
    ) -> Result<Stepped> {
        net.has_grads()?;
        let n = net.net.layout.param_len;
        let s = &gpu.stream;
        let (w, g) = (addr(&net.params, s, 0), addr(&net.grads, s, 0));
        if u.grad_scale != 1.0 {
            scale(gpu, g, n, u.grad_scale)?;
        }
        let mut exchange_seconds = 0.0;
        let comm = &u.replicas.comm;
        if comm.size() > 1 {
            gpu.sync()?;
            let started = std::time::Instant::now();
            exchange.average(gpu, net, comm.as_ref(), u.replicas.fp16_gradients)?;
            gpu.sync()?;
            exchange_seconds = started.elapsed().as_secs_f64();
        }
        let norm = match check_finite || u.clip_norm > 0.0 {
            true => self.norm(gpu, g, n)?,
            false => 0.0,
        };
        if check_finite && !norm.is_finite() {
            // Every replica sees the same sum, so all skip together.
            return Ok(Stepped {
                exchange_seconds,
                applied: false,
            });
        }
        if u.clip_norm > 0.0 && norm > u.clip_norm as f64 {
            scale(gpu, g, n, (u.clip_norm as f64 / norm) as f32)?;
        }
        let opt = u.optimizer;
        let (a, b, m) = (
            addr(&self.slot_a, s, 0),
            addr(&self.slot_b, s, 0),
            addr(&self.mask, s, 0),
        );
        let (len, wd) = (n as i64, opt.weight_decay);
        match opt.kind {
            Kind::RmsProp {
                rho,
                momentum,
                epsilon,
            } => gpu.launch(
                "rmsprop_update",
                linear(n),
                &[
                    &w, &g, &m, &a, &b, &len, &u.lr, &rho, &momentum, &epsilon, &wd,
                ],
            )?,
            Kind::Sgd { momentum, nesterov } => gpu.launch(
                "sgd_update",
                linear(n),
                &[
                    &w,
                    &g,
                    &m,
                    &a,
                    &len,
                    &u.lr,
                    &momentum,
                    &(nesterov as i32),
                    &wd,
                ],
            )?,
            Kind::Adam {
                beta1,
                beta2,
                epsilon,
            } => {
                let lr_t = adam_step_size(u.lr, beta1, beta2, opt.step);
                gpu.launch(
                    "adam_update",
                    linear(n),
                    &[
                        &w, &g, &m, &a, &b, &len, &lr_t, &beta1, &beta2, &epsilon, &wd,
                    ],
                )?
            }
            Kind::AdamW {
                beta1,
                beta2,
                epsilon,
            } => {
                let lr_t = adam_step_size(u.lr, beta1, beta2, opt.step);
                gpu.launch(
                    "adamw_update",
                    linear(n),
                    &[
                        &w, &g, &m, &a, &b, &len, &u.lr, &lr_t, &beta1, &beta2, &epsilon, &wd,
                    ],
                )?
            }
        }
        if let (Some((ema_p, ema_b)), Some(d)) = (&self.ema, u.ema_decay) {
            let nb = net.net.layout.buffer_len;
            for (shadow, current, len) in [(ema_p, &net.params, n), (ema_b, &net.buffers, nb)] {
                gpu.launch(
                    "ema_update",
                    linear(len),
                    &[&addr(shadow, s, 0), &addr(current, s, 0), &(len as i64), &d],
                )?;
            }
        }
        Ok(Stepped {
            exchange_seconds,
            applied: true,
        })
    }

    /// The gradients' global L2 norm (waits for the stream).
    fn norm(&self, gpu: &Gpu, g: u64, n: usize) -> Result<f64> {
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (NORM_BLOCKS as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let partial = addr(&self.norm_partials, &gpu.stream, 0);
        gpu.launch("sum_squares_partials", cfg, &[&g, &(n as i64), &partial])?;
        let sums = gpu.read(&self.norm_partials, NORM_BLOCKS)?;
        Ok(sums.iter().sum::<f64>().sqrt())
    }
}

impl Exchange {
    /// Chooses the route at first use (collective: every replica of `comm` calls it at the same
    /// point of the run); the NCCL communicator when that is the route.
    pub fn connect(
        &mut self,
        gpu: &Gpu,
        comm: &dyn effnet_dist::Communicator,
    ) -> Result<Option<Rc<Nccl>>> {
        if self.route.is_none() {
            self.route = Some(choose_route(gpu, comm)?);
        }
        Ok(match self.route.as_ref() {
            Some(Route::Nccl(nccl)) => Some(nccl.clone()),
            _ => None,
        })
    }

    /// Averages `net`'s gradients over the replicas of `comm`.
    fn average(
        &mut self,
        gpu: &Gpu,
        net: &mut GpuNet,
        comm: &dyn effnet_dist::Communicator,
        fp16: bool,
    ) -> Result<()> {
        self.connect(gpu, comm)?;
        let n = net.net.layout.param_len;
        let s = &gpu.stream;
        let g = addr(&net.grads, s, 0);
        let k = 1.0 / comm.size() as f32;
        match self.route.as_ref().expect("chosen above") {
            Route::Nccl(nccl) if fp16 => {
                if self.half.is_none() {
                    self.half = Some(gpu.zeros(n)?);
                }
                let h = addr(self.half.as_ref().expect("allocated above"), s, 0);
                gpu.launch("f32_to_f16", linear(n), &[&g, &h, &(n as i64)])?;
                nccl.all_reduce_sum_f16(gpu, h, n)?;
                gpu.launch("f16_to_f32_scaled", linear(n), &[&h, &g, &(n as i64), &k])
            }
            Route::Nccl(nccl) => {
                nccl.all_reduce_sum_f32(gpu, g, n)?;
                scale(gpu, g, n, k)
            }
            Route::Host => {
                let mut host = gpu.read(&net.grads, n)?;
                if fp16 {
                    comm.all_reduce_mean_f16(&mut host)?;
                } else {
                    comm.all_reduce_mean_f32(&mut host)?;
                }
                gpu.write(&host, &mut net.grads)
            }
        }
    }
}

/// NCCL when every replica opens it and joins the communicator, else the host; decided by all
/// replicas together, so that none waits in a collective the others skipped.
fn choose_route(gpu: &Gpu, comm: &dyn effnet_dist::Communicator) -> Result<Route> {
    let mut have = [nccl_present() as u8 as f64];
    comm.all_reduce_sum_f64(&mut have)?;
    let missing = comm.size() - have[0] as usize;
    let (route, why) = if missing == 0 {
        match Nccl::new(gpu, comm) {
            Ok(nccl) => (Route::Nccl(Rc::new(nccl)), None),
            Err(e) => (Route::Host, Some(e)),
        }
    } else {
        let why = format!("NCCL missing on {missing} of {} processes", comm.size());
        (Route::Host, Some(why))
    };
    // Everyone uses NCCL only if everyone joined it.
    let mut joined = [matches!(route, Route::Nccl(_)) as u8 as f64];
    comm.all_reduce_sum_f64(&mut joined)?;
    if joined[0] as usize == comm.size() {
        return Ok(route);
    }
    if comm.rank() == 0 {
        eprintln!(
            "effnet: {}: gradients are averaged over MPI through the host. {NCCL_HELP}",
            why.unwrap_or_else(|| "NCCL failed on another process".into())
        );
    }
    Ok(Route::Host)
}

/// `n` f32 at `g` times `k`, in place.
fn scale(gpu: &Gpu, g: u64, n: usize, k: f32) -> Result<()> {
    gpu.launch("scale_in_place", linear(n), &[&g, &(n as i64), &k])
}

fn check_lengths(want: usize, got: usize, what: &str) -> Result<()> {
    if want == got {
        Ok(())
    } else {
        Err(format!("{got} {what} for a network of {want}"))
    }
}
