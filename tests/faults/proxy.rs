//! A fault-injecting TCP proxy between the agent and the receiver (or a receiver node and
//! PostgreSQL), in-process on its own thread and runtime (so nothing the test does blocks
//! it), with the fault switchable at any moment: it applies to every chunk read from then
//! on, on new and pooled connections alike.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Passes everything on.
    None,
    /// Holds every chunk this long before passing it on, in both directions.
    Latency(Duration),
    /// Passes the first `n` bytes a connection sends upstream (the request), then resets
    /// both sides: the receiver sees a request cut short, the agent a reset.
    ResetUpstreamAfter(usize),
    /// Passes the request whole and the first `n` bytes of the answer, then resets the
    /// agent's side: the receiver has done the work, the agent never hears of it.
    ResetDownstreamAfter(usize),
    /// Accepts connections and reads what comes, passes nothing on and answers nothing.
    /// A connection that lost bytes this way is closed once the fault is lifted.
    BlackHole,
}

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    resets: AtomicU64,
    swallowed: AtomicU64,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    counts: Arc<Counts>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (a port chosen by the OS) and relays to `upstream`.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("bound address");
        let fault = Arc::new(Mutex::new(Fault::None));
        let counts = Arc::new(Counts::default());
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let (task_fault, task_counts) = (Arc::clone(&fault), Arc::clone(&counts));
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("proxy runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("tokio listener");
                let accept = async {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            continue;
                        };
                        task_counts.connections.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(relay(
                            client,
                            upstream,
                            Arc::clone(&task_fault),
                            Arc::clone(&task_counts),
                        ));
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stop => {}
                }
            });
            // Dropping the runtime drops every connection it still holds.
        });
        FaultProxy {
            addr,
            fault,
            counts,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    /// Connections the proxy reset so far.
    pub fn resets(&self) -> u64 {
        self.counts.resets.load(Ordering::Relaxed)
    }

    /// Bytes the black hole swallowed so far.
    pub fn swallowed(&self) -> u64 {
        self.counts.swallowed.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Closes both sides with a TCP reset (`SO_LINGER` 0), as a crashed middlebox would.
fn reset(client: TcpStream, upstream: TcpStream, counts: &Counts) {
    let _ = client.set_zero_linger();
    let _ = upstream.set_zero_linger();
    counts.resets.fetch_add(1, Ordering::Relaxed);
}

async fn relay(
    mut client: TcpStream,
    upstream_addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    counts: Arc<Counts>,
) {
    let Ok(mut upstream) = TcpStream::connect(upstream_addr).await else {
        return;
    };
    let current = || *fault.lock().unwrap();
    let (mut sent_up, mut sent_down) = (0usize, 0usize);
    let mut poisoned = false;
    let mut from_client = vec![0u8; 16 * 1024];
    let mut from_upstream = vec![0u8; 16 * 1024];
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            read = client.read(&mut from_client) => {
                let n = match read { Ok(0) | Err(_) => return, Ok(n) => n };
                match current() {
                    Fault::BlackHole => {
                        poisoned = true;
                        counts.swallowed.fetch_add(n as u64, Ordering::Relaxed);
                        continue;
                    }
                    Fault::Latency(wait) => tokio::time::sleep(wait).await,
                    Fault::ResetUpstreamAfter(limit) if sent_up + n > limit => {
                        let pass = limit.saturating_sub(sent_up);
                        let _ = upstream.write_all(&from_client[..pass]).await;
                        let _ = upstream.flush().await;
                        reset(client, upstream, &counts);
                        return;
                    }
                    _ => {}
                }
                if upstream.write_all(&from_client[..n]).await.is_err() {
                    return;
                }
                sent_up += n;
            }
            read = upstream.read(&mut from_upstream) => {
                let n = match read { Ok(0) | Err(_) => return, Ok(n) => n };
                match current() {
                    Fault::BlackHole => {
                        poisoned = true;
                        counts.swallowed.fetch_add(n as u64, Ordering::Relaxed);
                        continue;
                    }
                    Fault::Latency(wait) => tokio::time::sleep(wait).await,
                    Fault::ResetDownstreamAfter(limit) if sent_down + n > limit => {
                        let pass = limit.saturating_sub(sent_down);
                        let _ = client.write_all(&from_upstream[..pass]).await;
                        let _ = client.flush().await;
                        reset(client, upstream, &counts);
                        return;
                    }
                    _ => {}
                }
                if client.write_all(&from_upstream[..n]).await.is_err() {
                    return;
                }
                sent_down += n;
            }
            _ = tick.tick() => {
                // Bytes were lost in the black hole: this connection can never carry a
                // whole exchange again, so it ends once the fault is lifted.
                if poisoned && current() != Fault::BlackHole {
                    return;
                }
            }
        }
    }
}
