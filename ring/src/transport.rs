//! How ranks talk: one small trait, an in-process implementation (ranks as threads, a
//! channel per ordered pair of ranks), and a wrapper that delays messages as a link of given
//! latency and bandwidth would, for simulating interconnects we do not have.

use crate::RingError;
use bytes::Bytes;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Point-to-point messages between the ranks of one group. A send must not wait for the
/// receiver (the ring sends the next step's KV before computing this one); messages on one
/// link arrive in order.
pub trait Transport: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    fn send(&mut self, to: usize, data: Bytes) -> Result<(), RingError>;
    fn recv(&mut self, from: usize) -> Result<Bytes, RingError>;

    /// Sends `data` to `to` and receives from `from` as one operation that proceeds while
    /// the caller computes; [`Transport::finish_exchange`] returns what came. A ring step is
    /// one exchange. The default sends now and receives at finish, which is all channels
    /// need; NCCL must issue both sides in one group.
    fn start_exchange(&mut self, to: usize, data: Bytes, from: usize) -> Result<(), RingError> {
        let _ = from;
        self.send(to, data)
    }

    /// Completes the exchange started with [`Transport::start_exchange`].
    fn finish_exchange(&mut self, from: usize) -> Result<Bytes, RingError> {
        self.recv(from)
    }
}

/// Ranks as threads of one process.
pub struct InProcess {
    rank: usize,
    to: Vec<Option<Sender<Bytes>>>,
    from: Vec<Option<Receiver<Bytes>>>,
    timeout: Duration,
}

impl InProcess {
    /// One transport per rank of a group of `world`, fully connected. A `recv` that waits
    /// longer than `timeout` is an error; a dropped rank is seen at once by its peers.
    pub fn group(world: usize, timeout: Duration) -> Vec<InProcess> {
        let mut ranks: Vec<InProcess> = (0..world)
            .map(|rank| InProcess {
                rank,
                to: (0..world).map(|_| None).collect(),
                from: (0..world).map(|_| None).collect(),
                timeout,
            })
            .collect();
        for a in 0..world {
            for b in 0..world {
                let (tx, rx) = channel();
                ranks[a].to[b] = Some(tx);
                ranks[b].from[a] = Some(rx);
            }
        }
        ranks
    }
}

impl Transport for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.to.len()
    }

    fn send(&mut self, to: usize, data: Bytes) -> Result<(), RingError> {
        let gone = RingError::PeerGone {
            rank: self.rank,
            peer: to,
            what: "send",
        };
        let tx = self
            .to
            .get(to)
            .and_then(|t| t.as_ref())
            .ok_or(RingError::Shape(format!(
                "rank {to} is not in a group of {}",
                self.to.len()
            )))?;
        tx.send(data).map_err(|_| gone)
    }

    fn recv(&mut self, from: usize) -> Result<Bytes, RingError> {
        let rank = self.rank;
        let rx = self
            .from
            .get(from)
            .and_then(|r| r.as_ref())
            .ok_or(RingError::Shape(format!(
                "rank {from} is not in a group of {}",
                self.from.len()
            )))?;
        rx.recv_timeout(self.timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => RingError::Timeout {
                rank,
                peer: from,
                secs: self.timeout.as_secs_f64(),
            },
            RecvTimeoutError::Disconnected => RingError::PeerGone {
                rank,
                peer: from,
                what: "recv",
            },
        })
    }
}

/// A link's cost: a message of `b` bytes occupies the sender's link to that peer for
/// `b / bandwidth` and arrives `latency` after it has left.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkModel {
    pub latency: Duration,
    /// Bytes per second.
    pub bandwidth: f64,
}

impl LinkModel {
    /// Time to move `bytes` over an idle link.
    pub fn transfer(&self, bytes: u64) -> Duration {
        self.latency + Duration::from_secs_f64(bytes as f64 / self.bandwidth)
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Wraps a transport so that its messages arrive as over a [`LinkModel`] link: the sender
/// sends at once (no copy; a small header with the arrival time goes first) and the receiver
/// waits until the modelled arrival. Compute that runs meanwhile hides the transfer, exactly
/// as on real hardware with asynchronous sends.
pub struct Delayed<T> {
    inner: T,
    link: LinkModel,
    /// When each outgoing link is free again.
    busy_until: Vec<Instant>,
}

impl<T: Transport> Delayed<T> {
    pub fn new(inner: T, link: LinkModel) -> Delayed<T> {
        let now = Instant::now();
        let world = inner.world();
        Delayed {
            inner,
            link,
            busy_until: vec![now; world],
        }
    }
}

impl<T: Transport> Transport for Delayed<T> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world(&self) -> usize {
        self.inner.world()
    }

    fn send(&mut self, to: usize, data: Bytes) -> Result<(), RingError> {
        let now = Instant::now();
        let start = self.busy_until.get(to).copied().unwrap_or(now).max(now);
        let wire = Duration::from_secs_f64(data.len() as f64 / self.link.bandwidth);
        if let Some(b) = self.busy_until.get_mut(to) {
            *b = start + wire;
        }
        let arrive = start + wire + self.link.latency;
        let ns = arrive.saturating_duration_since(epoch()).as_nanos() as u64;
        self.inner
            .send(to, Bytes::copy_from_slice(&ns.to_le_bytes()))?;
        self.inner.send(to, data)
    }

    fn recv(&mut self, from: usize) -> Result<Bytes, RingError> {
        let header = self.inner.recv(from)?;
        let ns: [u8; 8] = header[..].try_into().map_err(|_| RingError::Malformed {
            rank: self.rank(),
            peer: from,
            reason: format!("a delay header of {} bytes", header.len()),
        })?;
        let data = self.inner.recv(from)?;
        let arrive = epoch() + Duration::from_nanos(u64::from_le_bytes(ns));
        let now = Instant::now();
        if arrive > now {
            std::thread::sleep(arrive - now);
        }
        Ok(data)
    }
}
