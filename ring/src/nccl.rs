//! The NCCL transport (cudarc's `nccl` module): ranks are processes, one GPU each, found
//! through [`crate::bootstrap`] (torchrun's variables and a TCP rendezvous that hands out the
//! NCCL unique id).
//!
//! Messages are host [`Bytes`] like every transport's; each goes up to the device, over NCCL,
//! and back. NCCL needs a receive's size up front, so an exchange runs in two grouped
//! rounds: the 8-byte lengths, then the payloads. The ring's step uses
//! [`Transport::start_exchange`]: both rounds are issued before the step's compute and the
//! payload round completes while it runs. Plain `send`s wait and go out grouped with the next
//! `recv` (NCCL's sends and receives of one step must be issued in one group, or a ring of
//! blocking sends deadlocks). Every wait is bounded: past the timeout, or on NCCL's
//! asynchronous error, the communicator is aborted and the caller gets a typed error.

use crate::bootstrap::{rendezvous, RankEnv};
use crate::{RingError, Transport};
use bytes::Bytes;
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result, sys};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An NCCL communicator handle; NCCL allows its use from any one thread at a time.
struct RawComm(sys::ncclComm_t);

// SAFETY: the handle is only used through `&mut Nccl`, so from one thread at a time.
unsafe impl Send for RawComm {}

/// A started payload round: what it receives into, what it sends from (kept alive until
/// done), and the event that marks its end on the stream.
struct InFlight {
    from: usize,
    recv: Option<CudaSlice<u8>>,
    _sends: Vec<CudaSlice<u8>>,
    done: CudaEvent,
}

/// One rank's end of an NCCL group.
pub struct Nccl {
    rank: usize,
    world: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    comm: Option<RawComm>,
    timeout: Duration,
    pending: Vec<(usize, Bytes)>,
    inflight: Option<InFlight>,
}

fn nccl_err(rank: usize, what: &str) -> impl Fn(result::NcclError) -> RingError + '_ {
    move |e| RingError::Unavailable(format!("rank {rank}: NCCL {what}: {e:?}"))
}

impl Nccl {
    /// Joins the group torchrun describes (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
    /// `MASTER_PORT`) on CUDA device `device`.
    pub fn from_env(device: usize, timeout: Duration) -> Result<Nccl, RingError> {
        Nccl::connect(&RankEnv::from_env()?, device, timeout)
    }

    /// Joins the group of `env` on CUDA device `device`. Fails with
    /// [`RingError::Unavailable`] where there is no GPU or no libnccl, and with a timeout
    /// when a rank does not show up.
    pub fn connect(env: &RankEnv, device: usize, timeout: Duration) -> Result<Nccl, RingError> {
        longctx_kernels::cuda::probe(device).map_err(|e| RingError::Unavailable(e.to_string()))?;
        // SAFETY: only tries to dlopen the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(RingError::Unavailable(
                "libnccl.so not found (NCCL is installed with PyTorch or CUDA)".into(),
            ));
        }
        let rank = env.rank;
        let id = if rank == 0 {
            let id = result::get_uniqueid().map_err(nccl_err(rank, "unique id"))?;
            id.internal.iter().map(|&c| c as u8).collect::<Vec<u8>>()
        } else {
            Vec::new()
        };
        let got = rendezvous(env, &id, timeout)?;
        let internal: [std::ffi::c_char; 128] = got
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| RingError::Malformed {
                rank,
                peer: 0,
                reason: format!("an NCCL unique id of {} bytes, not 128", got.len()),
            })?;
        let ctx = CudaContext::new(device).map_err(|e| RingError::Unavailable(e.to_string()))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| RingError::Unavailable(e.to_string()))?;
        // ncclCommInitRank blocks until every rank has joined: run it aside and bound the wait
        // (a rank that never joins leaves that thread blocked, and this one returns).
        let (tx, rx) = std::sync::mpsc::channel();
        let world = env.world;
        let init_ctx = ctx.clone();
        std::thread::spawn(move || {
            let r = init_ctx
                .bind_to_thread()
                .map_err(|e| format!("{e}"))
                .and_then(|_| {
                    let mut comm = std::mem::MaybeUninit::uninit();
                    // SAFETY: a valid out-pointer; the id came from rank 0's ncclGetUniqueId.
                    unsafe {
                        result::comm_init_rank(
                            comm.as_mut_ptr(),
                            world as i32,
                            sys::ncclUniqueId { internal },
                            rank as i32,
                        )
                        .map(|_| RawComm(comm.assume_init()))
                        .map_err(|e| format!("{e:?}"))
                    }
                });
            let _ = tx.send(r);
        });
        let comm = match rx.recv_timeout(timeout) {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(RingError::Unavailable(format!(
                    "rank {rank}: NCCL init: {e}"
                )))
            }
            Err(_) => {
                return Err(RingError::Timeout {
                    rank,
                    peer: 0,
                    secs: timeout.as_secs_f64(),
                })
            }
        };
        Ok(Nccl {
            rank,
            world,
            ctx,
            stream,
            comm: Some(comm),
            timeout,
            pending: Vec::new(),
            inflight: None,
        })
    }

    fn comm(&self, peer: usize) -> Result<sys::ncclComm_t, RingError> {
        self.comm.as_ref().map(|c| c.0).ok_or(RingError::PeerGone {
            rank: self.rank,
            peer,
            what: "NCCL communicator aborted after an earlier failure",
        })
    }

    fn check_peer(&self, peer: usize) -> Result<(), RingError> {
        if peer >= self.world {
            return Err(RingError::Shape(format!(
                "rank {peer} is not in a group of {}",
                self.world
            )));
        }
        Ok(())
    }

    fn driver(&self, e: cudarc::driver::DriverError) -> RingError {
        RingError::Unavailable(format!("rank {}: CUDA: {e}", self.rank))
    }

    /// Aborts the communicator (in-flight NCCL kernels exit) and gives the error.
    fn fail(&mut self, err: RingError) -> RingError {
        if let Some(c) = self.comm.take() {
            // SAFETY: a live communicator, aborted once.
            let _ = unsafe { result::comm_abort(c.0) };
        }
        self.inflight = None;
        self.pending.clear();
        err
    }

    /// Waits for `done`, polling NCCL's asynchronous error, at most the timeout.
    fn wait(&mut self, done: &CudaEvent, peer: usize) -> Result<(), RingError> {
        let start = Instant::now();
        loop {
            match done.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    let err = self.driver(e);
                    return Err(self.fail(err));
                }
            }
            let comm = self.comm(peer)?;
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator and a valid out-pointer.
            unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
            if state != sys::ncclResult_t::ncclSuccess && state != sys::ncclResult_t::ncclInProgress
            {
                let err = RingError::PeerGone {
                    rank: self.rank,
                    peer,
                    what: "NCCL reported a remote or system error",
                };
                return Err(self.fail(err));
            }
            if start.elapsed() > self.timeout {
                let err = RingError::Timeout {
                    rank: self.rank,
                    peer,
                    secs: self.timeout.as_secs_f64(),
                };
                return Err(self.fail(err));
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    /// One grouped round: each `(peer, buffer)` of `sends` goes out, and `recv` (if any)
    /// comes in; returns the event that marks the round's end.
    fn round(
        &mut self,
        sends: &[(usize, &CudaSlice<u8>)],
        recv: Option<(usize, &mut CudaSlice<u8>)>,
    ) -> Result<CudaEvent, RingError> {
        let peer = recv
            .as_ref()
            .map(|r| r.0)
            .or(sends.first().map(|s| s.0))
            .unwrap_or(0);
        let comm = self.comm(peer)?;
        let cu_stream = self.stream.cu_stream() as sys::cudaStream_t;
        let stream = self.stream.clone();
        let rank = self.rank;
        let issue = || -> Result<(), RingError> {
            result::group_start().map_err(nccl_err(rank, "group start"))?;
            let mut guards = Vec::new();
            for (to, buf) in sends {
                if buf.is_empty() {
                    continue;
                }
                let (ptr, g) = buf.device_ptr(&stream);
                guards.push(g);
                // SAFETY: a device buffer of `len` bytes that outlives the round (the caller
                // keeps it until the round's event completes).
                unsafe {
                    result::send(
                        ptr as *const _,
                        buf.len(),
                        sys::ncclDataType_t::ncclUint8,
                        *to as i32,
                        comm,
                        cu_stream,
                    )
                }
                .map_err(nccl_err(rank, "send"))?;
            }
            if let Some((from, buf)) = recv {
                if !buf.is_empty() {
                    let len = buf.len();
                    let (ptr, g) = buf.device_ptr_mut(&stream);
                    // SAFETY: as above, for the receive buffer.
                    unsafe {
                        result::recv(
                            ptr as *mut _,
                            len,
                            sys::ncclDataType_t::ncclUint8,
                            from as i32,
                            comm,
                            cu_stream,
                        )
                    }
                    .map_err(nccl_err(rank, "recv"))?;
                    drop(g);
                }
            }
            result::group_end().map_err(nccl_err(rank, "group end"))?;
            drop(guards);
            Ok(())
        };
        if let Err(e) = issue() {
            return Err(self.fail(e));
        }
        self.stream.record_event(None).map_err(|e| self.driver(e))
    }

    fn upload(&self, data: &[u8]) -> Result<CudaSlice<u8>, RingError> {
        // A zero-length allocation is avoided: empty messages send nothing.
        let data = if data.is_empty() { &[0u8][..] } else { data };
        self.stream.clone_htod(data).map_err(|e| self.driver(e))
    }

    /// Sends `sends` and receives one message from `from` (if any): the length round (waited
    /// for), then the payload round, returned in flight.
    fn exchange(
        &mut self,
        sends: Vec<(usize, Bytes)>,
        from: Option<usize>,
    ) -> Result<Option<InFlight>, RingError> {
        for (to, _) in &sends {
            self.check_peer(*to)?;
        }
        if let Some(f) = from {
            self.check_peer(f)?;
        }
        let lens: Vec<CudaSlice<u8>> = sends
            .iter()
            .map(|(_, b)| self.upload(&(b.len() as u64).to_le_bytes()))
            .collect::<Result<_, _>>()?;
        let mut len_in = self.upload(&[0u8; 8])?;
        let peer = from.unwrap_or(0);
        let len_sends: Vec<(usize, &CudaSlice<u8>)> =
            sends.iter().map(|s| s.0).zip(lens.iter()).collect();
        let done = self.round(&len_sends, from.map(|f| (f, &mut len_in)))?;
        self.wait(&done, peer)?;
        let incoming = match from {
            Some(_) => {
                let raw = self
                    .stream
                    .clone_dtoh(&len_in)
                    .map_err(|e| self.driver(e))?;
                let n = u64::from_le_bytes(raw[..8].try_into().unwrap_or([0; 8]));
                if n > (1u64 << 40) {
                    let err = RingError::Malformed {
                        rank: self.rank,
                        peer,
                        reason: format!("a length header of {n} bytes"),
                    };
                    return Err(self.fail(err));
                }
                Some(n as usize)
            }
            None => None,
        };
        let payloads: Vec<CudaSlice<u8>> = sends
            .iter()
            .map(|(_, b)| self.upload(b))
            .collect::<Result<_, _>>()?;
        // Empty payloads travel as nothing (their one-byte stand-in is not sent).
        let pay_sends: Vec<(usize, &CudaSlice<u8>)> = sends
            .iter()
            .zip(payloads.iter())
            .filter(|((_, b), _)| !b.is_empty())
            .map(|((to, _), p)| (*to, p))
            .collect();
        let mut recv_buf = match incoming {
            Some(n) if n > 0 => Some(
                self.stream
                    .alloc_zeros::<u8>(n)
                    .map_err(|e| self.driver(e))?,
            ),
            _ => None,
        };
        let done = self.round(&pay_sends, from.zip(recv_buf.as_mut()))?;
        if from.is_none() && sends.is_empty() {
            return Ok(None);
        }
        Ok(Some(InFlight {
            from: peer,
            recv: recv_buf,
            _sends: payloads,
            done,
        }))
    }

    fn complete(&mut self, f: InFlight) -> Result<Bytes, RingError> {
        self.wait(&f.done, f.from)?;
        match &f.recv {
            None => Ok(Bytes::new()),
            Some(buf) => {
                let v = self.stream.clone_dtoh(buf).map_err(|e| self.driver(e))?;
                Ok(Bytes::from(v))
            }
        }
    }

    /// The CUDA context of this rank's device.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

impl Transport for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn send(&mut self, to: usize, data: Bytes) -> Result<(), RingError> {
        self.check_peer(to)?;
        self.comm(to)?;
        self.pending.push((to, data));
        Ok(())
    }

    fn recv(&mut self, from: usize) -> Result<Bytes, RingError> {
        let sends = std::mem::take(&mut self.pending);
        match self.exchange(sends, Some(from))? {
            Some(f) => self.complete(f),
            None => Ok(Bytes::new()),
        }
    }

    fn start_exchange(&mut self, to: usize, data: Bytes, from: usize) -> Result<(), RingError> {
        if self.inflight.is_some() {
            return Err(RingError::Shape("an exchange is already in flight".into()));
        }
        let mut sends = std::mem::take(&mut self.pending);
        sends.push((to, data));
        self.inflight = self.exchange(sends, Some(from))?;
        Ok(())
    }

    fn finish_exchange(&mut self, from: usize) -> Result<Bytes, RingError> {
        match self.inflight.take() {
            Some(f) if f.from == from => self.complete(f),
            Some(f) => {
                let want = f.from;
                self.inflight = Some(f);
                Err(RingError::Shape(format!(
                    "finishing an exchange with {from}, the one in flight is with {want}"
                )))
            }
            None => self.recv(from),
        }
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // Sends not yet flushed by a receive go out now (bounded by the timeout).
        let sends = std::mem::take(&mut self.pending);
        if !sends.is_empty() && self.comm.is_some() {
            if let Ok(Some(f)) = self.exchange(sends, None) {
                let _ = self.complete(f);
            }
        }
        if let Some(f) = self.inflight.take() {
            let _ = self.wait(&f.done, f.from);
        }
        if let Some(c) = self.comm.take() {
            // SAFETY: a live communicator; abort does not wait on peers (destroy could).
            let _ = unsafe { result::comm_abort(c.0) };
        }
    }
}
