//! Rank bootstrap for multi-process rings: the rank and world size from the environment
//! variables torchrun sets, and a TCP rendezvous at `MASTER_ADDR:MASTER_PORT` through which
//! rank 0 hands every rank the same bytes (the NCCL unique id, for the NCCL transport).
//!
//! Protocol: every rank `r > 0` connects to rank 0 and sends `r` (u32) and the world size
//! (u32); rank 0 checks both, then sends the payload length (u32) and the payload. Everything
//! is bounded by a timeout: a rank that never shows up is an error on rank 0 and on the ranks
//! waiting for rank 0, never a hang.

use crate::RingError;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Where a process sits in the group, as torchrun describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world: usize,
    pub master_addr: String,
    pub master_port: u16,
}

/// Longest payload accepted (an NCCL unique id is 128 bytes).
const MAX_PAYLOAD: u32 = 1 << 16;

impl RankEnv {
    /// From `RANK`, `WORLD_SIZE`, `MASTER_ADDR` (default 127.0.0.1) and `MASTER_PORT`.
    pub fn from_env() -> Result<RankEnv, RingError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The same from any lookup (tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<RankEnv, RingError> {
        let num = |k: &str| -> Result<usize, RingError> {
            let v = get(k).ok_or_else(|| RingError::Shape(format!("{k} is not set")))?;
            v.trim()
                .parse()
                .map_err(|_| RingError::Shape(format!("{k}={v:?} is not a number")))
        };
        let rank = num("RANK")?;
        let world = num("WORLD_SIZE")?;
        if world == 0 || rank >= world {
            return Err(RingError::Shape(format!(
                "RANK {rank} is not within WORLD_SIZE {world}"
            )));
        }
        let master_port = num("MASTER_PORT")?;
        let master_port = u16::try_from(master_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| RingError::Shape(format!("MASTER_PORT {master_port} is not a port")))?;
        Ok(RankEnv {
            rank,
            world,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
        })
    }
}

fn io_err(rank: usize, what: &'static str) -> impl Fn(std::io::Error) -> RingError {
    move |_| RingError::PeerGone {
        rank,
        peer: 0,
        what,
    }
}

/// Runs the rendezvous: rank 0 passes `payload` (required there, ignored elsewhere) and every
/// rank gets it back.
pub fn rendezvous(env: &RankEnv, payload: &[u8], timeout: Duration) -> Result<Vec<u8>, RingError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RingError::Shape(format!("starting the rendezvous runtime: {e}")))?;
    let t = || RingError::Timeout {
        rank: env.rank,
        peer: 0,
        secs: timeout.as_secs_f64(),
    };
    rt.block_on(async {
        match tokio::time::timeout(timeout, run(env, payload)).await {
            Ok(r) => r,
            Err(_) => Err(t()),
        }
    })
}

async fn run(env: &RankEnv, payload: &[u8]) -> Result<Vec<u8>, RingError> {
    let addr = format!("{}:{}", env.master_addr, env.master_port);
    if env.rank == 0 {
        if payload.len() > MAX_PAYLOAD as usize {
            return Err(RingError::Shape(format!(
                "a payload of {} bytes",
                payload.len()
            )));
        }
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|e| RingError::Shape(format!("rank 0 cannot listen on {addr}: {e}")))?;
        let mut seen = vec![false; env.world];
        seen[0] = true;
        let mut peers = Vec::with_capacity(env.world - 1);
        while peers.len() + 1 < env.world {
            let (mut s, _) = listener.accept().await.map_err(io_err(0, "accept"))?;
            let r = s.read_u32_le().await.map_err(io_err(0, "handshake"))? as usize;
            let w = s.read_u32_le().await.map_err(io_err(0, "handshake"))? as usize;
            if w != env.world || r == 0 || r >= env.world || seen[r] {
                return Err(RingError::Malformed {
                    rank: 0,
                    peer: r,
                    reason: format!("rank {r} of a world of {w} (this one is {})", env.world),
                });
            }
            seen[r] = true;
            peers.push(s);
        }
        for mut s in peers {
            s.write_u32_le(payload.len() as u32)
                .await
                .map_err(io_err(0, "send"))?;
            s.write_all(payload).await.map_err(io_err(0, "send"))?;
        }
        Ok(payload.to_vec())
    } else {
        // Rank 0 may not be listening yet: retry until the timeout (applied by the caller).
        let mut s = loop {
            match TcpStream::connect(&addr).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let e = io_err(env.rank, "rendezvous");
        s.write_u32_le(env.rank as u32).await.map_err(&e)?;
        s.write_u32_le(env.world as u32).await.map_err(&e)?;
        let n = s.read_u32_le().await.map_err(&e)?;
        if n > MAX_PAYLOAD {
            return Err(RingError::Malformed {
                rank: env.rank,
                peer: 0,
                reason: format!("a payload of {n} bytes"),
            });
        }
        let mut buf = vec![0u8; n as usize];
        s.read_exact(&mut buf).await.map_err(&e)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn env(rank: usize, world: usize, port: u16) -> RankEnv {
        RankEnv {
            rank,
            world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    #[test]
    fn every_rank_gets_rank_zeros_bytes() {
        let port = free_port();
        let id: Vec<u8> = (0..128).map(|i| i as u8 ^ 0x5a).collect();
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|r| {
                    let id = &id;
                    s.spawn(move || {
                        rendezvous(&env(r, 4, port), id, Duration::from_secs(10)).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|g| *g == id));
    }

    #[test]
    fn a_missing_rank_is_a_timeout_not_a_hang() {
        let port = free_port();
        let r0 = std::thread::spawn(move || {
            rendezvous(&env(0, 3, port), b"x", Duration::from_millis(500))
        });
        let r1 = rendezvous(&env(1, 3, port), b"", Duration::from_millis(500));
        assert!(matches!(r0.join().unwrap(), Err(RingError::Timeout { .. })));
        assert!(r1.is_err());
    }

    #[test]
    fn the_environment_is_read_and_checked() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(a, _)| *a == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let e = RankEnv::from_vars(vars(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "4"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap();
        assert_eq!(e, env(2, 4, 29500));
        assert!(RankEnv::from_vars(vars(&[
            ("RANK", "4"),
            ("WORLD_SIZE", "4"),
            ("MASTER_PORT", "1")
        ]))
        .is_err());
        assert!(RankEnv::from_vars(vars(&[("RANK", "0"), ("WORLD_SIZE", "2")])).is_err());
        assert!(RankEnv::from_vars(vars(&[
            ("RANK", "x"),
            ("WORLD_SIZE", "2"),
            ("MASTER_PORT", "1")
        ]))
        .is_err());
    }
}
