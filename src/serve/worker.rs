//! The model's thread: it owns the scheduler, takes requests and cancellations from the
//! HTTP tasks over a channel, runs steps while there is work, and sends each request's
//! events to its task. A request whose task is gone (the client disconnected) is finished
//! at once, which frees its KV blocks.

use longctx_engine::sched::{Event, Request, RequestId, SchedConfig, Scheduler, Stats};
use longctx_engine::{EngineError, KvOptions, Model};
use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::{mpsc as tmpsc, oneshot};

pub enum Cmd {
    Submit {
        req: Request,
        events: tmpsc::UnboundedSender<Event>,
        reply: oneshot::Sender<Result<RequestId, EngineError>>,
    },
    Finish(RequestId),
}

/// What `/metrics` shows: the scheduler's counters and recent token rates.
#[derive(Clone, Copy, Debug, Default)]
pub struct Metrics {
    pub stats: Stats,
    pub prompt_tps: f64,
    pub generation_tps: f64,
    pub requests_done: u64,
    pub requests_failed: u64,
    /// Under `--expert-budget`: the expert cache's totals.
    pub experts: Option<longctx_engine::experts::ExpertStats>,
}

/// The handle the HTTP side holds.
#[derive(Clone)]
pub struct Worker {
    tx: mpsc::Sender<Cmd>,
    pub metrics: Arc<Mutex<Metrics>>,
}

impl Worker {
    /// Starts the model's thread.
    pub fn start(model: Model, kv: KvOptions, cfg: SchedConfig) -> anyhow::Result<Worker> {
        let store = model.kv_store(&kv)?;
        let (tx, rx) = mpsc::channel();
        let metrics = Arc::new(Mutex::new(Metrics::default()));
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("longctx-model".into())
            .spawn(move || run(model, store, cfg, rx, m))?;
        Ok(Worker { tx, metrics })
    }

    pub fn send(&self, cmd: Cmd) -> bool {
        self.tx.send(cmd).is_ok()
    }
}

fn run(
    model: Model,
    store: longctx_kvstore::KvStore,
    cfg: SchedConfig,
    rx: mpsc::Receiver<Cmd>,
    metrics: Arc<Mutex<Metrics>>,
) {
    let mut sched = Scheduler::new(&model, store, cfg);
    let mut routes: HashMap<RequestId, tmpsc::UnboundedSender<Event>> = HashMap::new();
    // Token rates over a sliding window of about two seconds.
    let mut window = (std::time::Instant::now(), 0u64, 0u64);
    let (mut done, mut failed) = (0u64, 0u64);
    loop {
        let handle =
            |cmd: Cmd,
             sched: &mut Scheduler,
             routes: &mut HashMap<RequestId, tmpsc::UnboundedSender<Event>>| {
                match cmd {
                    Cmd::Submit { req, events, reply } => {
                        let r = sched.submit(req);
                        if let Ok(id) = &r {
                            routes.insert(*id, events);
                        }
                        if reply.send(r).is_err() {
                            // The client left before the answer: nothing to keep.
                        }
                    }
                    Cmd::Finish(id) => {
                        sched.finish(id);
                        routes.remove(&id);
                    }
                }
            };
        if sched.idle() {
            match rx.recv() {
                Ok(cmd) => handle(cmd, &mut sched, &mut routes),
                Err(_) => return,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            handle(cmd, &mut sched, &mut routes);
        }
        // Each event goes to its client as the step gives it (a step in two lanes gives
        // several decode rounds' tokens); a client gone is finished after the step.
        let mut gone = vec![];
        sched.step_with(&mut |ev| {
            let (id, last) = match &ev {
                Event::Token { id, .. } | Event::Admitted { id, .. } => (*id, false),
                Event::Done { id, .. } => {
                    done += 1;
                    (*id, true)
                }
                Event::Failed { id, .. } => {
                    failed += 1;
                    (*id, true)
                }
            };
            let left = match routes.get(&id) {
                Some(tx) => tx.send(ev).is_err(),
                None => !last,
            };
            if last {
                routes.remove(&id);
            } else if left {
                gone.push(id);
                routes.remove(&id);
            }
        });
        for id in gone {
            sched.finish(id);
        }
        let stats = sched.stats();
        let mut m = metrics.lock().unwrap_or_else(|p| p.into_inner());
        let dt = window.0.elapsed().as_secs_f64();
        if dt >= 2.0 || sched.idle() {
            if dt > 0.0 {
                m.prompt_tps = (stats.prefill_tokens - window.1) as f64 / dt;
                m.generation_tps = (stats.generated_tokens - window.2) as f64 / dt;
            }
            window = (
                std::time::Instant::now(),
                stats.prefill_tokens,
                stats.generated_tokens,
            );
        }
        m.stats = stats;
        m.requests_done = done;
        m.requests_failed = failed;
        m.experts = model.expert_stats();
    }
}
