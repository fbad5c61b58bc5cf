//! Load generation for the traffic benchmarks: a server that keeps up with tens of thousands of
//! new connections per second on two cores, and clients that open connections, exchange
//! requests, stream bytes and send datagrams as fast as the machine allows, timing every
//! operation.
//!
//! One TCP port serves three kinds of client, told apart by their first bytes:
//! - [`CLOSE_REQUEST`] (`GET / HTTP/1.0`): one answer, then the server closes first and so holds
//!   the TIME_WAIT, as nginx does with `Connection: close`;
//! - [`KEEPALIVE_REQUEST`] (`GET / HTTP/1.1`): one answer per request on a kept-alive connection;
//! - [`SINK_HELLO`]: the server answers with the CPU its thread runs on (one byte), counts and
//!   drops everything after it, and at EOF answers with the count (8 bytes, little endian) and
//!   closes;
//! - [`WHO_REQUEST`] (`GET /who HTTP/1.0`): the answer's body is the address that answered, then
//!   the server closes: a client learns which endpoint a Service sent it to.
//!
//! The same port over UDP counts datagrams. The server records the source address of every
//! connection and datagram and the local address that answered, so a benchmark can prove that
//! its traffic took the path it claims to measure (SNAT to the node, DNAT to every endpoint).
//!
//! Both sides are epoll loops (mio), one thread per core, so that on a small machine the CPU
//! goes to the network path under test rather than to thread switches.

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use mio::{
    Events, Interest, Poll, Token,
    net::{TcpListener, TcpStream},
};

use crate::topo::enter;

/// A new-connection request: the server answers [`CLOSE_RESPONSE`] and closes.
pub const CLOSE_REQUEST: &[u8] = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n";
pub const CLOSE_RESPONSE: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
/// A request on a kept-alive connection: the server answers [`KEEPALIVE_RESPONSE`].
pub const KEEPALIVE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
pub const KEEPALIVE_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
/// Opens a bulk transfer: the server discards what follows and reports the byte count at EOF.
pub const SINK_HELLO: &[u8] = b"SINK\n";
/// Asks which address answered: the body is that address and a newline; the server closes.
pub const WHO_REQUEST: &[u8] = b"GET /who HTTP/1.0\r\nHost: bench\r\n\r\n";

/// How long a poll waits before the loops look at their stop flag or deadline.
const POLL_TICK: Duration = Duration::from_millis(50);

// -------------------------------------------------------------------------------------------------
// What the server saw
// -------------------------------------------------------------------------------------------------

/// Connections (TCP) or datagrams (UDP) counted by the address they came from and the local
/// address that received them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub by_source: BTreeMap<IpAddr, u64>,
    pub by_endpoint: BTreeMap<IpAddr, u64>,
}

impl Tally {
    fn add(&mut self, source: IpAddr, endpoint: IpAddr, n: u64) {
        *self.by_source.entry(source).or_default() += n;
        *self.by_endpoint.entry(endpoint).or_default() += n;
    }

    pub fn total(&self) -> u64 {
        self.by_source.values().sum()
    }

    /// What was counted after `earlier` was taken.
    pub fn since(&self, earlier: &Tally) -> Tally {
        let diff = |now: &BTreeMap<IpAddr, u64>, before: &BTreeMap<IpAddr, u64>| {
            now.iter()
                .map(|(ip, n)| (*ip, n - before.get(ip).copied().unwrap_or(0)))
                .filter(|(_, n)| *n > 0)
                .collect()
        };
        Tally {
            by_source: diff(&self.by_source, &earlier.by_source),
            by_endpoint: diff(&self.by_endpoint, &earlier.by_endpoint),
        }
    }
}

#[derive(Default)]
struct ServerStats {
    tcp: Mutex<Tally>,
    udp: Mutex<Tally>,
}

// -------------------------------------------------------------------------------------------------
// Server
// -------------------------------------------------------------------------------------------------

/// The benchmark server, running in a network namespace until dropped.
pub struct LoadServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    stats: Arc<ServerStats>,
}

impl LoadServer {
    /// Serves TCP on `0.0.0.0:port` with `threads` SO_REUSEPORT listeners, and counts UDP
    /// datagrams to each of `udp_addrs` on the same port, inside namespace `ns`.
    pub fn start(ns: &str, port: u16, udp_addrs: &[IpAddr], threads: usize) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ServerStats::default());
        let mut server = LoadServer {
            stop: stop.clone(),
            threads: Vec::new(),
            stats: stats.clone(),
        };
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
        for i in 0..threads.max(1) {
            let listener = crate::topo::in_netns(ns, || reuseport_listener(any, cpu_of(i)))?;
            let (stop, stats) = (stop.clone(), stats.clone());
            server.threads.push(std::thread::spawn(move || {
                pin_to_cpu(i);
                serve_tcp(listener, &stats, &stop);
            }));
        }
        for &ip in udp_addrs {
            let addr = SocketAddr::new(ip, port);
            let sock = crate::topo::in_netns(ns, || std::net::UdpSocket::bind(addr))?;
            // Datagrams that arrive in a burst must wait in the socket, not be dropped there:
            // the benchmark measures the path, not this buffer.
            force_recv_buffer(&sock, 8 << 20)?;
            sock.set_read_timeout(Some(POLL_TICK))?;
            let (stop, stats) = (stop.clone(), stats.clone());
            server.threads.push(std::thread::spawn(move || {
                serve_udp(&sock, ip, &stats, &stop);
            }));
        }
        Ok(server)
    }

    /// TCP connections accepted so far.
    pub fn tcp_tally(&self) -> Tally {
        self.stats.tcp.lock().unwrap().clone()
    }

    /// UDP datagrams received so far.
    pub fn udp_tally(&self) -> Tally {
        self.stats.udp.lock().unwrap().clone()
    }
}

impl Drop for LoadServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A listener of the SO_REUSEPORT group that takes the connections whose SYN arrived on `cpu`
/// (SO_INCOMING_CPU: the group picks by CPU, not by the connection's hash). Here the client's
/// CPU processes its SYN all the way through the veths, so client thread i on CPU i is served by
/// server thread i on CPU i, as [`pin_to_cpu`] intends: by hash, a connection went to either
/// thread, and one request in flight measured 22 or 72 µs p50 depending on which.
fn reuseport_listener(addr: SocketAddr, cpu: usize) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_cpu_affinity(cpu)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    sock.set_nonblocking(true)?;
    Ok(TcpListener::from_std(sock.into()))
}

/// SO_RCVBUFFORCE: past net.core.rmem_max, which a namespace cannot raise for itself.
fn force_recv_buffer(sock: &std::net::UdpSocket, bytes: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: an int option, passed by pointer with its size.
    let ret = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

const LISTENER: Token = Token(usize::MAX);

fn serve_tcp(mut listener: TcpListener, stats: &ServerStats, stop: &AtomicBool) {
    let Ok(mut poll) = Poll::new() else { return };
    if poll
        .registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .is_err()
    {
        return;
    }
    let mut conns: Vec<Option<ServerConn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    // Shared by every connection of this thread: bulk transfers read into it and forget.
    let mut scratch = vec![0u8; 256 << 10];
    let mut events = Events::with_capacity(1024);
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = poll.poll(&mut events, Some(POLL_TICK)) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        for event in events.iter() {
            if event.token() == LISTENER {
                accept_all(&listener, &poll, &mut conns, &mut free, stats);
                continue;
            }
            let slot = event.token().0;
            let Some(conn) = conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if conn.on_event(&mut scratch) == Next::Done {
                conns[slot] = None;
                free.push(slot);
            } else if !conn.out.is_empty() && !conn.wants_write {
                // The answer did not fit in the socket buffer: finish it when there is room.
                conn.wants_write = true;
                let _ = poll.registry().reregister(
                    &mut conn.stream,
                    Token(slot),
                    Interest::READABLE | Interest::WRITABLE,
                );
            }
        }
    }
}

fn accept_all(
    listener: &TcpListener,
    poll: &Poll,
    conns: &mut Vec<Option<ServerConn>>,
    free: &mut Vec<usize>,
    stats: &ServerStats,
) {
    loop {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                let local = stream.local_addr().map(|a| a.ip()).unwrap_or(peer.ip());
                stats.tcp.lock().unwrap().add(peer.ip(), local, 1);
                let _ = stream.set_nodelay(true);
                let slot = free.pop().unwrap_or_else(|| {
                    conns.push(None);
                    conns.len() - 1
                });
                if poll
                    .registry()
                    .register(&mut stream, Token(slot), Interest::READABLE)
                    .is_err()
                {
                    free.push(slot);
                    continue;
                }
                conns[slot] = Some(ServerConn {
                    stream,
                    local,
                    inbuf: Vec::new(),
                    mode: Mode::Start,
                    out: Vec::new(),
                    close_after_write: false,
                    wants_write: false,
                    sunk: 0,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // WouldBlock: all accepted. Anything else (EMFILE, ...): try again at the next event.
            Err(_) => return,
        }
    }
}

#[derive(PartialEq, Eq)]
enum Mode {
    /// Nothing read yet that tells HTTP from a bulk transfer.
    Start,
    Http,
    Sink,
}

#[derive(PartialEq, Eq)]
enum Next {
    Continue,
    Done,
}

struct ServerConn {
    stream: TcpStream,
    /// The address the client reached (the endpoint), for [`WHO_REQUEST`].
    local: IpAddr,
    inbuf: Vec<u8>,
    mode: Mode,
    /// Answer bytes the socket did not take yet.
    out: Vec<u8>,
    close_after_write: bool,
    wants_write: bool,
    sunk: u64,
}

impl ServerConn {
    fn on_event(&mut self, scratch: &mut [u8]) -> Next {
        let mut eof = false;
        loop {
            match self.stream.read(scratch) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => self.take(&scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Done,
            }
        }
        if eof {
            if self.mode != Mode::Sink {
                return Next::Done;
            }
            self.out.extend_from_slice(&self.sunk.to_le_bytes());
            self.close_after_write = true;
        }
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Done,
            }
        }
        if self.close_after_write {
            Next::Done
        } else {
            Next::Continue
        }
    }

    fn take(&mut self, data: &[u8]) {
        if self.mode == Mode::Sink {
            self.sunk += data.len() as u64;
            return;
        }
        self.inbuf.extend_from_slice(data);
        if self.mode == Mode::Start {
            if self.inbuf.starts_with(SINK_HELLO) {
                self.mode = Mode::Sink;
                self.sunk = (self.inbuf.len() - SINK_HELLO.len()) as u64;
                self.inbuf = Vec::new();
                // The sender keeps off this thread's CPU (see `tcp_stream`).
                // SAFETY: no arguments; -1 on failure, which the sender ignores.
                let cpu = unsafe { libc::sched_getcpu() };
                self.out.push(u8::try_from(cpu).unwrap_or(u8::MAX));
                return;
            }
            if SINK_HELLO.starts_with(&self.inbuf) {
                return;
            }
            self.mode = Mode::Http;
        }
        while let Some(end) = find(&self.inbuf, b"\r\n\r\n") {
            let close = find(&self.inbuf[..end], b"HTTP/1.0").is_some();
            let who = self.inbuf.starts_with(b"GET /who ");
            self.inbuf.drain(..end + 4);
            if close {
                if who {
                    let body = format!("{}\n", self.local);
                    let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                    self.out.extend_from_slice(head.as_bytes());
                    self.out.extend_from_slice(body.as_bytes());
                } else {
                    self.out.extend_from_slice(CLOSE_RESPONSE);
                }
                self.close_after_write = true;
                return;
            }
            self.out.extend_from_slice(KEEPALIVE_RESPONSE);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Datagrams per `recvmmsg` call.
const BATCH: usize = 64;
/// Bytes of payload per benchmark datagram: small packets, where per-packet costs dominate.
pub const DATAGRAM_BYTES: usize = 64;

fn serve_udp(sock: &std::net::UdpSocket, local: IpAddr, stats: &ServerStats, stop: &AtomicBool) {
    use std::os::fd::AsRawFd;
    let mut bufs = vec![[0u8; 2048]; BATCH];
    let mut iovecs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: plain C structs, all-zero is a valid value.
    let mut names: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    while !stop.load(Ordering::Relaxed) {
        for i in 0..BATCH {
            msgs[i].msg_hdr.msg_iov = &mut iovecs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_in).cast();
            msgs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        }
        // SAFETY: every header points at live buffers of the lengths given. MSG_WAITFORONE: block
        // (up to the socket's read timeout) for the first datagram only.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            continue;
        }
        let mut tally = stats.udp.lock().unwrap();
        for name in &names[..n as usize] {
            let source = Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr));
            tally.add(IpAddr::V4(source), local, 1);
        }
    }
}

// -------------------------------------------------------------------------------------------------
// Clients
// -------------------------------------------------------------------------------------------------

/// Completed operations of a timed run, with the latency of each.
#[derive(Clone, Debug, Default)]
pub struct OpStats {
    pub ops: u64,
    pub errors: u64,
    pub elapsed: Duration,
    latencies_ns: Vec<u64>,
    /// How long the connections still in flight at the end had waited (new connections only).
    unfinished_ns: Vec<u64>,
}

impl OpStats {
    pub fn per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile (0..=1) of the operation latencies, in microseconds.
    pub fn latency_us(&self, q: f64) -> Option<f64> {
        if self.latencies_ns.is_empty() {
            return None;
        }
        let idx = ((self.latencies_ns.len() - 1) as f64 * q).round() as usize;
        Some(self.latencies_ns[idx] as f64 / 1e3)
    }

    fn merge(parts: Vec<OpStats>, elapsed: Duration) -> OpStats {
        let mut all = OpStats {
            elapsed,
            ..OpStats::default()
        };
        for p in parts {
            all.ops += p.ops;
            all.errors += p.errors;
            all.latencies_ns.extend(p.latencies_ns);
            all.unfinished_ns.extend(p.unfinished_ns);
        }
        all.latencies_ns.sort_unstable();
        all
    }

    fn record(&mut self, started: Instant) {
        self.ops += 1;
        self.latencies_ns.push(started.elapsed().as_nanos() as u64);
    }

    /// Operations that took longer than `limit`: for new connections, those whose SYN went
    /// unanswered at first (Linux resends it after 1 s), including those still waiting at the
    /// end after as long.
    pub fn slower_than(&self, limit: Duration) -> u64 {
        let limit = limit.as_nanos() as u64;
        // One still waiting at the end that had waited longer is as slow.
        self.latencies_ns
            .iter()
            .chain(&self.unfinished_ns)
            .filter(|l| **l > limit)
            .count() as u64
    }
}

/// How [`connections`] opens them.
#[derive(Clone, Debug)]
pub struct ConnectOpts {
    /// Connections in flight at once.
    pub workers: usize,
    pub threads: usize,
    /// Local addresses to connect from, in turn (each must be an address of the namespace).
    /// Empty: the kernel's choice.
    pub sources: Vec<IpAddr>,
    /// New connections a second over all workers; None: as fast as they go.
    pub rate: Option<f64>,
}

/// Runs `f(thread index)` on `threads` threads inside namespace `ns`, all at once.
fn on_threads<T: Send>(
    ns: &str,
    threads: usize,
    f: impl Fn(usize) -> io::Result<T> + Sync,
) -> io::Result<Vec<T>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let f = &f;
                s.spawn(move || {
                    enter(ns);
                    pin_to_cpu(i);
                    f(i)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("load thread panicked"))
            .collect()
    })
}

/// Keeps the `i`th thread of a loop on CPU `i` (modulo the CPUs): client thread i shares its
/// CPU with server thread i, and the scheduler cannot stack two busy loops on one CPU while the
/// other idles, which otherwise moves results by ±20 % from run to run.
fn pin_to_cpu(i: usize) {
    // Best effort: unpinned, the numbers are only noisier.
    let _ = pin_thread(cpu_of(i));
}

/// Keeps the calling thread on CPU `cpu` (< CPU_SETSIZE).
pub fn pin_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it (index < CPU_SETSIZE).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The CPU of the `i`th thread of a loop.
fn cpu_of(i: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    i % cpus.min(libc::CPU_SETSIZE as usize)
}

/// Splits `total` workers over `threads` as evenly as possible.
fn share(total: usize, threads: usize, i: usize) -> usize {
    total / threads + usize::from(i < total % threads)
}

/// New connections: `workers` at a time, each connect, [`CLOSE_REQUEST`], read the answer to
/// EOF, close, again, for `duration`, spread over `targets` in turn. Latency is connect to EOF.
pub fn connection_rate(
    ns: &str,
    targets: &[SocketAddr],
    workers: usize,
    threads: usize,
    duration: Duration,
) -> io::Result<OpStats> {
    let opts = ConnectOpts {
        workers,
        threads,
        sources: Vec::new(),
        rate: None,
    };
    connections(ns, targets, &opts, duration)
}

/// New connections as [`connection_rate`] opens them, from the given source addresses and at
/// the given rate.
pub fn connections(
    ns: &str,
    targets: &[SocketAddr],
    opts: &ConnectOpts,
    duration: Duration,
) -> io::Result<OpStats> {
    let threads = opts.threads.clamp(1, opts.workers.max(1));
    let start = Instant::now();
    let deadline = start + duration;
    let parts = on_threads(ns, threads, |t| {
        let pace = opts
            .rate
            .map(|r| Duration::from_secs_f64(threads as f64 / r.max(1e-3)));
        connection_loop(
            targets,
            &opts.sources,
            share(opts.workers, threads, t),
            t,
            threads,
            pace,
            deadline,
        )
    })?;
    Ok(OpStats::merge(parts, start.elapsed().min(duration)))
}

struct Attempt {
    stream: TcpStream,
    started: Instant,
    sent: bool,
    received: usize,
}

/// Waits for events, at most [`POLL_TICK`] and not past `deadline`: `None` once the deadline
/// has passed, `Some(false)` when the wait was interrupted (`events` is then stale), `Some(true)`
/// otherwise.
fn poll_until(poll: &mut Poll, events: &mut Events, deadline: Instant) -> io::Result<Option<bool>> {
    let now = Instant::now();
    if now >= deadline {
        return Ok(None);
    }
    match poll.poll(events, Some((deadline - now).min(POLL_TICK))) {
        Ok(()) => Ok(Some(true)),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Some(false)),
        Err(e) => Err(e),
    }
}

fn connection_loop(
    targets: &[SocketAddr],
    sources: &[IpAddr],
    workers: usize,
    thread: usize,
    threads: usize,
    pace: Option<Duration>,
    deadline: Instant,
) -> io::Result<OpStats> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(256);
    let mut stats = OpStats::default();
    let mut next_target = thread;
    // Threads take sources in turn, interleaved, so that all of them are used at any rate.
    let mut next_source = thread;
    let mut buf = [0u8; 512];
    let mut slots: Vec<Option<Attempt>> = (0..workers).map(|_| None).collect();
    let mut next_start = Instant::now();

    let mut open = |poll: &Poll, slot: usize, stats: &mut OpStats, next_start: &mut Instant| {
        if let Some(pace) = pace {
            if Instant::now() < *next_start {
                return None;
            }
            *next_start += pace;
        }
        let target = targets[next_target % targets.len()];
        next_target += 1;
        let source = (!sources.is_empty()).then(|| {
            let s = sources[next_source % sources.len()];
            next_source += threads;
            s
        });
        let attempt = Attempt::open(poll, slot, target, source);
        stats.errors += u64::from(attempt.is_none());
        attempt
    };
    for (i, slot) in slots.iter_mut().enumerate() {
        *slot = open(&poll, i, &mut stats, &mut next_start);
    }
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        // Paced: wake up in time for the next start (at once when behind, but always looking at
        // the connections in flight: they are what frees the workers).
        let wake = match pace {
            Some(_) => next_start.clamp(now, deadline),
            None => deadline,
        };
        let polled = match poll.poll(&mut events, Some((wake - now).min(POLL_TICK))) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
            Err(e) => return Err(e),
        };
        if polled {
            for event in events.iter() {
                let i = event.token().0;
                let Some(attempt) = slots[i].as_mut() else {
                    continue;
                };
                let outcome = attempt.advance(&mut buf);
                match outcome {
                    Progress::Waiting => continue,
                    Progress::Answered => stats.record(attempt.started),
                    Progress::Failed => stats.errors += 1,
                }
                slots[i] = open(&poll, i, &mut stats, &mut next_start);
            }
        }
        // A worker whose connect failed at once (e.g. no local port free), or that waits for its
        // turn under a pace, starts here.
        for (i, slot) in slots.iter_mut().enumerate() {
            if slot.is_none() && Instant::now() < deadline {
                *slot = open(&poll, i, &mut stats, &mut next_start);
            }
        }
    }
    for attempt in slots.iter().flatten() {
        stats
            .unfinished_ns
            .push(attempt.started.elapsed().as_nanos() as u64);
    }
    Ok(stats)
}

enum Progress {
    Waiting,
    Answered,
    Failed,
}

impl Attempt {
    /// A non-blocking connect (from `source` if given); `None` if it failed at once.
    fn open(
        poll: &Poll,
        slot: usize,
        target: SocketAddr,
        source: Option<IpAddr>,
    ) -> Option<Attempt> {
        let started = Instant::now();
        let mut stream = match source {
            None => TcpStream::connect(target).ok()?,
            Some(source) => {
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(target),
                    socket2::Type::STREAM,
                    None,
                )
                .ok()?;
                socket.set_nonblocking(true).ok()?;
                socket.bind(&SocketAddr::new(source, 0).into()).ok()?;
                match socket.connect(&target.into()) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                    Err(_) => return None,
                }
                TcpStream::from_std(socket.into())
            }
        };
        poll.registry()
            .register(
                &mut stream,
                Token(slot),
                Interest::READABLE | Interest::WRITABLE,
            )
            .ok()?;
        Some(Attempt {
            stream,
            started,
            sent: false,
            received: 0,
        })
    }

    fn advance(&mut self, buf: &mut [u8]) -> Progress {
        if !self.sent {
            if let Ok(Some(_)) | Err(_) = self.stream.take_error() {
                return Progress::Failed;
            }
            match self.stream.peer_addr() {
                Ok(_) => {}
                // Not connected yet (a spurious wake-up).
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Progress::Waiting,
                Err(_) => return Progress::Failed,
            }
            match self.stream.write(CLOSE_REQUEST) {
                Ok(n) if n == CLOSE_REQUEST.len() => self.sent = true,
                _ => return Progress::Failed,
            }
        }
        loop {
            match self.stream.read(buf) {
                Ok(0) if self.received == CLOSE_RESPONSE.len() => return Progress::Answered,
                Ok(0) => return Progress::Failed,
                Ok(n) => self.received += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::Waiting,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Progress::Failed,
            }
        }
    }
}

/// Request/response on kept-alive connections: `connections` of them (spread over `targets`),
/// each sending [`KEEPALIVE_REQUEST`] as soon as the previous answer is in, for `duration`.
pub fn request_rate(
    ns: &str,
    targets: &[SocketAddr],
    connections: usize,
    threads: usize,
    duration: Duration,
) -> io::Result<OpStats> {
    let threads = threads.clamp(1, connections.max(1));
    // Connect everything first: the timed part measures requests, not handshakes.
    let streams: Vec<Vec<std::net::TcpStream>> = on_threads(ns, threads, |t| {
        (0..share(connections, threads, t))
            .map(|i| {
                let target = targets[(t + i * threads) % targets.len()];
                let s = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
                s.set_nodelay(true)?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .collect()
    })?;
    let start = Instant::now();
    let deadline = start + duration;
    let parts = std::thread::scope(|s| {
        let handles: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(i, conns)| {
                s.spawn(move || {
                    pin_to_cpu(i);
                    request_loop(conns, deadline)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("load thread panicked"))
            .collect::<io::Result<Vec<_>>>()
    })?;
    Ok(OpStats::merge(parts, start.elapsed().min(duration)))
}

struct KeptAlive {
    stream: TcpStream,
    started: Instant,
    received: usize,
}

fn request_loop(conns: Vec<std::net::TcpStream>, deadline: Instant) -> io::Result<OpStats> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(256);
    let mut stats = OpStats::default();
    let mut buf = [0u8; 512];
    let mut slots: Vec<Option<KeptAlive>> = Vec::new();
    for (i, c) in conns.into_iter().enumerate() {
        let mut stream = TcpStream::from_std(c);
        poll.registry()
            .register(&mut stream, Token(i), Interest::READABLE)?;
        let started = Instant::now();
        stream.write_all(KEEPALIVE_REQUEST)?;
        slots.push(Some(KeptAlive {
            stream,
            started,
            received: 0,
        }));
    }
    while !slots.iter().all(Option::is_none) {
        let Some(polled) = poll_until(&mut poll, &mut events, deadline)? else {
            break;
        };
        if !polled {
            continue;
        }
        for event in events.iter() {
            let i = event.token().0;
            let Some(conn) = slots[i].as_mut() else {
                continue;
            };
            let alive = loop {
                match conn.stream.read(&mut buf) {
                    Ok(0) => break false,
                    Ok(n) => {
                        conn.received += n;
                        if conn.received == KEEPALIVE_RESPONSE.len() {
                            stats.record(conn.started);
                            conn.received = 0;
                            conn.started = Instant::now();
                            // 33 bytes into an empty socket buffer: taken whole or not at all.
                            if conn.stream.write(KEEPALIVE_REQUEST).ok()
                                != Some(KEEPALIVE_REQUEST.len())
                            {
                                break false;
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break false,
                }
            };
            if !alive {
                stats.errors += 1;
                slots[i] = None;
            }
        }
    }
    Ok(stats)
}

/// A single TCP stream pushing bytes as fast as it can for `duration`. Returns the bytes the
/// server received and the time from connect until the server had them all.
pub fn tcp_stream(ns: &str, target: SocketAddr, duration: Duration) -> io::Result<(u64, Duration)> {
    crate::topo::in_netns(ns, || {
        let mut s = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
        let start = Instant::now();
        s.write_all(SINK_HELLO)?;
        // The sink answers with its CPU. The sender's CPU also runs the whole path below it in
        // softirq (veths, the contender, the wire's segmentation, the receiver's stack): on the
        // sink's CPU too, the two halves of the work share one core, and which listener of the
        // server got the connection moved a stream's rate by a quarter from run to run.
        let mut cpu = [0u8; 1];
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.read_exact(&mut cpu)?;
        pin_to_cpu(usize::from(cpu[0]) + 1);
        let chunk = vec![0x5au8; 128 << 10];
        while start.elapsed() < duration {
            s.write_all(&chunk)?;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut count = [0u8; 8];
        s.read_exact(&mut count)?;
        Ok((u64::from_le_bytes(count), start.elapsed()))
    })
}

/// One UDP flow of [`DATAGRAM_BYTES`]-byte datagrams, sent back to back (`sendmmsg`) for
/// `duration`. Returns how many the kernel accepted.
pub fn udp_flood(ns: &str, target: SocketAddr, duration: Duration) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    crate::topo::in_netns(ns, || {
        let sock =
            std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))?;
        sock.connect(target)?;
        let mut payload = [0x5au8; DATAGRAM_BYTES];
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        // SAFETY: plain C structs, all-zero is a valid value; every header points at `iov`,
        // which outlives the calls (the socket is connected: no address needed).
        let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
        for m in &mut msgs {
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < duration {
            let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
            // Errors (ENOBUFS, an ICMP error reported back) are the path's loss: keep sending.
            if n > 0 {
                sent += n as u64;
            }
        }
        Ok(sent)
    })
}

// -------------------------------------------------------------------------------------------------
// Which endpoint answers: programming seen from outside
// -------------------------------------------------------------------------------------------------

/// The outcome of one [`WHO_REQUEST`] connection.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    /// When its SYN was sent: a change of the path that was in effect by then decided it.
    pub started: Instant,
    pub finished: Instant,
    /// The endpoint that answered, or why the connection failed (refused, reset, unreachable;
    /// `TimedOut` when it gave up).
    pub outcome: Result<IpAddr, io::ErrorKind>,
}

impl Probe {
    /// The endpoint that answered.
    pub fn endpoint(&self) -> Option<IpAddr> {
        self.outcome.ok()
    }
}

/// Asks `target` which endpoint answers, from namespace `ns` (from `source` when given): a new
/// connection every `interval`, several in flight when the path is slow or drops SYNs (each
/// gives up after `give_up`), so a dropped or rejected attempt never delays the next by more than
/// `interval`. Every outcome goes to `on_probe`, in the order they finish, until it returns
/// false.
///
/// Probes sent before a path exists leave conntrack entries without NAT behind in a node that
/// runs netfilter (unanswered SYNs are remembered for two minutes, and every retransmission
/// through them renews them): a later connection that happens to reuse such a source port
/// follows the stale entry into the void. Probe from an address of its own.
pub fn probe_endpoints(
    ns: &str,
    target: SocketAddr,
    source: Option<IpAddr>,
    interval: Duration,
    give_up: Duration,
    mut on_probe: impl FnMut(Probe) -> bool + Send,
) -> io::Result<()> {
    crate::topo::in_netns(ns, move || {
        let mut poll = Poll::new()?;
        let mut events = Events::with_capacity(64);
        let mut slots: Vec<Option<WhoAttempt>> = Vec::new();
        let mut next_start = Instant::now();
        let mut buf = [0u8; 256];
        loop {
            let now = Instant::now();
            if now >= next_start {
                next_start = now + interval;
                let slot = slots.iter().position(Option::is_none).unwrap_or_else(|| {
                    slots.push(None);
                    slots.len() - 1
                });
                match WhoAttempt::open(&poll, slot, target, source) {
                    Ok(attempt) => slots[slot] = Some(attempt),
                    Err(e) => {
                        let probe = Probe {
                            started: now,
                            finished: Instant::now(),
                            outcome: Err(e.kind()),
                        };
                        if !on_probe(probe) {
                            return Ok(());
                        }
                    }
                }
            }
            let wait = next_start.saturating_duration_since(Instant::now());
            match poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let mut done: Vec<(usize, Result<IpAddr, io::ErrorKind>)> = Vec::new();
            for event in events.iter() {
                let slot = event.token().0;
                if let Some(attempt) = slots.get_mut(slot).and_then(Option::as_mut) {
                    match attempt.advance(&mut buf) {
                        WhoProgress::Waiting => {}
                        WhoProgress::Answered(ip) => done.push((slot, Ok(ip))),
                        WhoProgress::Failed(kind) => done.push((slot, Err(kind))),
                    }
                }
            }
            let now = Instant::now();
            for (slot, attempt) in slots.iter().enumerate() {
                if let Some(a) = attempt
                    && now - a.started > give_up
                    && !done.iter().any(|(s, _)| *s == slot)
                {
                    done.push((slot, Err(io::ErrorKind::TimedOut)));
                }
            }
            for (slot, outcome) in done {
                let Some(mut attempt) = slots[slot].take() else {
                    continue;
                };
                let _ = poll.registry().deregister(&mut attempt.stream);
                let probe = Probe {
                    started: attempt.started,
                    finished: now,
                    outcome,
                };
                if !on_probe(probe) {
                    return Ok(());
                }
            }
        }
    })
}

/// The first answer through `target`, asking every `interval` while `keep_going` says so: when
/// it came and which endpoint gave it; `None` if nothing answered before `keep_going` said no.
pub fn first_answer(
    ns: &str,
    target: SocketAddr,
    source: Option<IpAddr>,
    interval: Duration,
    keep_going: impl Fn() -> bool + Send + Sync,
) -> io::Result<Option<Probe>> {
    let mut answer = None;
    probe_endpoints(
        ns,
        target,
        source,
        interval,
        Duration::from_millis(200),
        |probe| {
            if probe.outcome.is_ok() {
                answer = Some(probe);
                return false;
            }
            keep_going()
        },
    )?;
    Ok(answer)
}

struct WhoAttempt {
    stream: TcpStream,
    started: Instant,
    sent: bool,
    answer: Vec<u8>,
}

enum WhoProgress {
    Waiting,
    Answered(IpAddr),
    Failed(io::ErrorKind),
}

impl WhoAttempt {
    fn open(
        poll: &Poll,
        slot: usize,
        target: SocketAddr,
        source: Option<IpAddr>,
    ) -> io::Result<WhoAttempt> {
        let started = Instant::now();
        let mut stream = match source {
            None => TcpStream::connect(target)?,
            Some(source) => {
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(target),
                    socket2::Type::STREAM,
                    None,
                )?;
                socket.set_nonblocking(true)?;
                socket.bind(&SocketAddr::new(source, 0).into())?;
                match socket.connect(&target.into()) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                    Err(e) => return Err(e),
                }
                TcpStream::from_std(socket.into())
            }
        };
        poll.registry().register(
            &mut stream,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        Ok(WhoAttempt {
            stream,
            started,
            sent: false,
            answer: Vec::new(),
        })
    }

    fn advance(&mut self, buf: &mut [u8]) -> WhoProgress {
        if !self.sent {
            match self.stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => return WhoProgress::Failed(e.kind()),
            }
            match self.stream.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return WhoProgress::Waiting,
                Err(e) => return WhoProgress::Failed(e.kind()),
            }
            match self.stream.write(WHO_REQUEST) {
                Ok(n) if n == WHO_REQUEST.len() => self.sent = true,
                Ok(_) => return WhoProgress::Failed(io::ErrorKind::WriteZero),
                Err(e) => return WhoProgress::Failed(e.kind()),
            }
        }
        loop {
            match self.stream.read(buf) {
                Ok(0) => {
                    let text = String::from_utf8_lossy(&self.answer);
                    return match text
                        .split_once("\r\n\r\n")
                        .and_then(|(_, body)| body.trim().parse().ok())
                    {
                        Some(ip) => WhoProgress::Answered(ip),
                        None => WhoProgress::Failed(io::ErrorKind::UnexpectedEof),
                    };
                }
                Ok(n) => self.answer.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return WhoProgress::Waiting,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return WhoProgress::Failed(e.kind()),
            }
        }
    }
}
