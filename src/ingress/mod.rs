//! Ingress: the plain-SMTP side of the relay. `serve` accepts connections on the loopback
//! listeners (connection limit, accept back-off, graceful shutdown) and runs one
//! [`run_session`] task per connection; `session` is the RFC 5321 state machine on top of
//! `smtp-proto`'s request parser, `data` reads the message text and adds our `Received:`.

mod data;
mod session;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::io;
use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::envelope::Deliver;

pub use session::run_session;

/// How the ingress behaves; one value shared by every session.
#[derive(Debug, Clone)]
pub struct IngressSettings {
    /// Our name in the banner, the EHLO reply and the `Received:` field.
    pub hostname: String,
    /// Advertised as `SIZE`; a larger message gets `552 5.3.4` (after reading it to the end).
    pub max_message_size: usize,
    /// More recipients in one transaction get `452 4.5.3`.
    pub max_recipients: usize,
    /// Connections beyond this get `421 4.7.0` and are closed.
    pub max_connections: usize,
    /// How long we wait for the next command (RFC 5321 4.5.3.2: at least 5 minutes).
    pub command_timeout: Duration,
    /// How long we wait for each read inside DATA (RFC 5321 4.5.3.2: 3 minutes).
    pub data_timeout: Duration,
}

impl IngressSettings {
    /// Defaults: Gmail's SIZE (35882577), 100 recipients (Gmail's per-message limit), 256
    /// connections, RFC 5321 timeouts (5 min per command, 3 min per DATA block).
    pub fn new(hostname: String) -> Self {
        IngressSettings {
            hostname,
            max_message_size: 35_882_577,
            max_recipients: 100,
            max_connections: 256,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
        }
    }
}

/// Why `serve` could not run.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("no listening socket to accept SMTP connections on")]
    NoListeners,
    #[error("max_connections must be at least 1")]
    NoConnectionsAllowed,
}

/// Accepts SMTP connections on every listener until `shutdown` is cancelled, then waits
/// for the sessions to end (idle ones are told `421 4.3.0` at once, busy ones finish their
/// transaction first) and returns.
///
/// Connections over `max_connections` get `421 4.7.0 … Too many connections` and are
/// closed. Accept errors (EMFILE, ENOBUFS, …) are logged and retried with back-off.
pub async fn serve<D: Deliver>(
    listeners: Vec<TcpListener>,
    settings: Arc<IngressSettings>,
    deliver: Arc<D>,
    shutdown: CancellationToken,
) -> Result<(), IngressError> {
    if listeners.is_empty() {
        return Err(IngressError::NoListeners);
    }
    if settings.max_connections == 0 {
        return Err(IngressError::NoConnectionsAllowed);
    }
    let limit = Arc::new(Semaphore::new(settings.max_connections));
    let sessions = TaskTracker::new();
    let acceptors = TaskTracker::new();
    for listener in listeners {
        acceptors.spawn(accept_loop(
            listener,
            settings.clone(),
            deliver.clone(),
            shutdown.clone(),
            limit.clone(),
            sessions.clone(),
        ));
    }
    acceptors.close();
    acceptors.wait().await;
    sessions.close();
    sessions.wait().await;
    info!("ingress stopped: all SMTP sessions ended");
    Ok(())
}

/// Where connections come from: a `TcpListener`, or a test double that fails on demand.
trait Accept: Send + 'static {
    fn accept(
        &self,
    ) -> impl std::future::Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send;
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

impl Accept for TcpListener {
    fn accept(
        &self,
    ) -> impl std::future::Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send {
        TcpListener::accept(self)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpListener::local_addr(self)
    }
}

/// Accepts on one listener until shutdown.
async fn accept_loop<L: Accept, D: Deliver>(
    listener: L,
    settings: Arc<IngressSettings>,
    deliver: Arc<D>,
    shutdown: CancellationToken,
    limit: Arc<Semaphore>,
    sessions: TaskTracker,
) {
    let local = listener.local_addr().ok();
    info!(?local, "accepting SMTP connections");
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => {
                backoff = Duration::from_millis(10);
                conn
            }
            Err(err) => {
                // EMFILE/ENFILE/ENOBUFS/ECONNABORTED…: never fatal, wait and retry.
                warn!(?local, error = %err, retry_in = ?backoff, "accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(%peer, max = settings.max_connections, "connection limit reached, refusing");
            let reply = format!(
                "421 4.7.0 {} Too many connections, try again later\r\n",
                settings.hostname
            );
            // Off the accept path (a fresh socket's readiness is not known yet), bounded.
            sessions.spawn(async move {
                let mut stream = stream;
                let write = async {
                    stream.write_all(reply.as_bytes()).await?;
                    stream.shutdown().await
                };
                let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let settings = settings.clone();
        let deliver = deliver.clone();
        let shutdown = shutdown.clone();
        sessions.spawn(async move {
            run_session(stream, peer, &settings, &*deliver, &shutdown).await;
            drop(permit);
        });
    }
    debug!(?local, "stopped accepting");
}

/// A new short, unique id for a message (Received `id`, logs): 16 characters of Crockford
/// base32 from the time in milliseconds (40 bits), a process-wide counter (20 bits) and
/// randomness (20 bits). Ids from one process sort roughly by time.
pub fn new_message_id() -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed) as u64;
    let random = rand::random::<u32>() as u64;
    let value: u128 = ((millis as u128 & 0xFF_FFFF_FFFF) << 40)
        | (((count & 0xF_FFFF) as u128) << 20)
        | (random & 0xF_FFFF) as u128;
    (0..16)
        .rev()
        .map(|i| ALPHABET[((value >> (i * 5)) & 31) as usize] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Message;
    use crate::reply::Reply;
    use std::collections::HashSet;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpStream;

    struct AcceptAll;

    impl Deliver for AcceptAll {
        async fn deliver(&self, _message: Message) -> Reply {
            Reply::new(250, [2, 0, 0], "OK")
        }
    }

    async fn read_line(r: &mut BufReader<TcpStream>) -> String {
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        line
    }

    async fn listener() -> (TcpListener, std::net::SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    #[test]
    fn message_ids_are_unique_and_short() {
        let ids: HashSet<String> = (0..10_000).map(|_| new_message_id()).collect();
        assert_eq!(ids.len(), 10_000);
        let id = ids.iter().next().unwrap();
        assert_eq!(id.len(), 16);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()));
    }

    #[test]
    fn default_settings() {
        let s = IngressSettings::new("h".into());
        assert_eq!(s.max_message_size, 35_882_577);
        assert_eq!(s.max_recipients, 100);
        assert_eq!(s.max_connections, 256);
        assert_eq!(s.command_timeout, Duration::from_secs(300));
        assert_eq!(s.data_timeout, Duration::from_secs(180));
    }

    #[tokio::test]
    async fn serve_without_listeners_is_an_error() {
        let r = serve(
            vec![],
            Arc::new(IngressSettings::new("h".into())),
            Arc::new(AcceptAll),
            CancellationToken::new(),
        )
        .await;
        assert!(matches!(r, Err(IngressError::NoListeners)));
    }

    #[tokio::test]
    async fn connection_limit_refuses_with_421() {
        let (l, addr) = listener().await;
        let mut settings = IngressSettings::new("relay.test".into());
        settings.max_connections = 2;
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            vec![l],
            Arc::new(settings),
            Arc::new(AcceptAll),
            shutdown.clone(),
        ));
        let mut open = Vec::new();
        for _ in 0..2 {
            let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
            assert!(read_line(&mut c).await.starts_with("220 relay.test ESMTP"));
            open.push(c);
        }
        let mut third = BufReader::new(TcpStream::connect(addr).await.unwrap());
        assert_eq!(
            read_line(&mut third).await,
            "421 4.7.0 relay.test Too many connections, try again later\r\n"
        );
        assert_eq!(
            read_line(&mut third).await,
            "",
            "refused connection is closed"
        );

        // A slot frees up when a session ends.
        let mut first = open.remove(0);
        first.get_mut().write_all(b"QUIT\r\n").await.unwrap();
        assert!(read_line(&mut first).await.starts_with("221 2.0.0"));
        assert_eq!(read_line(&mut first).await, "");
        let mut again = None;
        for _ in 0..50 {
            let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
            if read_line(&mut c).await.starts_with("220 ") {
                again = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(again.is_some(), "a freed slot is usable again");

        shutdown.cancel();
        server.await.unwrap().unwrap();
    }

    /// Fails `fails` times with EMFILE, then accepts for real.
    struct Flaky {
        inner: TcpListener,
        fails: std::sync::atomic::AtomicU32,
    }

    impl Accept for Flaky {
        async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
            if self.fails.load(Ordering::Relaxed) > 0 {
                self.fails.fetch_sub(1, Ordering::Relaxed);
                return Err(io::Error::from_raw_os_error(24)); // EMFILE
            }
            self.inner.accept().await
        }

        fn local_addr(&self) -> io::Result<SocketAddr> {
            self.inner.local_addr()
        }
    }

    #[tokio::test]
    async fn accept_errors_are_retried_not_fatal() {
        let (l, addr) = listener().await;
        let flaky = Flaky {
            inner: l,
            fails: 3.into(),
        };
        let shutdown = CancellationToken::new();
        let sessions = TaskTracker::new();
        let settings = Arc::new(IngressSettings::new("relay.test".into()));
        let acceptor = tokio::spawn(accept_loop(
            flaky,
            settings,
            Arc::new(AcceptAll),
            shutdown.clone(),
            Arc::new(Semaphore::new(4)),
            sessions.clone(),
        ));
        let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
        assert!(read_line(&mut c).await.starts_with("220 relay.test"));
        shutdown.cancel();
        acceptor.await.unwrap();
        sessions.close();
        sessions.wait().await;
    }

    #[tokio::test]
    async fn shutdown_tells_idle_sessions_421_and_returns() {
        let (l1, a1) = listener().await;
        let (l2, a2) = listener().await;
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            vec![l1, l2],
            Arc::new(IngressSettings::new("relay.test".into())),
            Arc::new(AcceptAll),
            shutdown.clone(),
        ));
        let mut c1 = BufReader::new(TcpStream::connect(a1).await.unwrap());
        let mut c2 = BufReader::new(TcpStream::connect(a2).await.unwrap());
        assert!(read_line(&mut c1).await.starts_with("220 "));
        assert!(read_line(&mut c2).await.starts_with("220 "));
        c1.get_mut().write_all(b"HELO me\r\n").await.unwrap();
        assert!(read_line(&mut c1).await.starts_with("250 "));

        shutdown.cancel();
        for c in [&mut c1, &mut c2] {
            assert_eq!(
                read_line(c).await,
                "421 4.3.0 relay.test Service shutting down\r\n"
            );
            assert_eq!(read_line(c).await, "");
        }
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns once sessions ended")
            .unwrap()
            .unwrap();
        assert!(TcpStream::connect(a1).await.is_err(), "listener closed");
    }
}
