//! A thread-backed handle for serving frontends: submit from any thread, receive each
//! request's outputs as a stream, cancel by dropping the stream or calling `abort`.
//!
//! One engine thread owns the [`Engine`]; it takes commands between steps and blocks when
//! idle, so a quiet handle costs nothing.

use crate::engine::{Engine, Request, RequestId, RequestOutput};
use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

/// What a stream yields: an output, or the error that ended the request.
pub type StreamItem = Result<RequestOutput, String>;

enum Command {
    Submit(
        Request,
        Sender<Result<(RequestId, Receiver<StreamItem>), String>>,
    ),
    Abort(RequestId),
    Shutdown,
}

/// Owns the engine thread; dropping it finishes in-flight work's streams and joins.
pub struct EngineHandle {
    tx: Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

/// The outputs of one request, in order; ends after the last sample finishes.
/// Dropping it before the end aborts the request.
pub struct OutputStream {
    id: RequestId,
    rx: Receiver<StreamItem>,
    tx: Sender<Command>,
    finished: bool,
}

impl EngineHandle {
    /// Moves `engine` onto its own thread.
    pub fn spawn(engine: Engine) -> EngineHandle {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vellum-engine".into())
            .spawn(move || engine_loop(engine, rx))
            .expect("spawning the engine thread");
        EngineHandle {
            tx,
            thread: Some(thread),
        }
    }

    /// Queues a request; an invalid one is refused here with the engine's error.
    pub fn submit(&self, req: Request) -> Result<OutputStream, String> {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.tx
            .send(Command::Submit(req, reply_tx))
            .map_err(|_| "the engine thread has stopped".to_string())?;
        let (id, rx) = reply_rx
            .recv()
            .map_err(|_| "the engine thread has stopped".to_string())??;
        Ok(OutputStream {
            id,
            rx,
            tx: self.tx.clone(),
            finished: false,
        })
    }

    /// Aborts a request (its stream ends).
    pub fn abort(&self, id: RequestId) {
        let _ = self.tx.send(Command::Abort(id));
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl OutputStream {
    pub fn request_id(&self) -> RequestId {
        self.id
    }
}

impl Iterator for OutputStream {
    type Item = StreamItem;

    fn next(&mut self) -> Option<StreamItem> {
        if self.finished {
            return None;
        }
        match self.rx.recv() {
            Ok(item) => Some(item),
            // The engine closed the channel: every sample finished (or the request was
            // aborted).
            Err(_) => {
                self.finished = true;
                None
            }
        }
    }
}

impl Drop for OutputStream {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.tx.send(Command::Abort(self.id));
        }
    }
}

fn engine_loop(mut engine: Engine, rx: Receiver<Command>) {
    let mut streams: HashMap<RequestId, Sender<StreamItem>> = HashMap::new();
    loop {
        // Block for a command when idle; otherwise take what is there and step.
        let first = if engine.has_unfinished() {
            rx.try_recv().ok()
        } else {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        };
        let mut pending: Vec<Command> = first.into_iter().collect();
        pending.extend(rx.try_iter());
        for cmd in pending {
            match cmd {
                Command::Submit(req, reply) => {
                    let res = engine.add_request(req).map_err(|e| e.to_string());
                    let res = res.map(|id| {
                        let (tx, out_rx) = mpsc::channel();
                        streams.insert(id, tx);
                        (id, out_rx)
                    });
                    if let Err(mpsc::SendError(Ok((id, _)))) = reply.send(res) {
                        // The submitter is gone already.
                        engine.abort(id);
                        streams.remove(&id);
                    }
                }
                Command::Abort(id) => {
                    engine.abort(id);
                    streams.remove(&id);
                }
                Command::Shutdown => return,
            }
        }
        if !engine.has_unfinished() {
            continue;
        }
        match engine.step() {
            Ok(outs) => {
                for out in outs {
                    let id = out.request_id;
                    let delivered = streams.get(&id).is_some_and(|s| s.send(Ok(out)).is_ok());
                    if !delivered {
                        engine.abort(id);
                    }
                    if !delivered || !engine.is_unfinished(id) {
                        // Dropping the sender ends the stream after what it holds.
                        streams.remove(&id);
                    }
                }
            }
            Err(e) => {
                // An engine error ends every request in flight, each told why.
                let msg = e.to_string();
                for (id, s) in streams.drain() {
                    let _ = s.send(Err(msg.clone()));
                    engine.abort(id);
                }
            }
        }
    }
}
