//! What runs between the pods, and what it costs.
//!
//! Every measurement keeps each connection on one CPU: the server listens
//! with one `SO_REUSEPORT` socket per CPU, each marked `SO_INCOMING_CPU`
//! and served by threads pinned to that CPU, so a connection is accepted on
//! the CPU that sent its SYN (veth hands a packet on on the sending CPU).
//! Left to the scheduler, a connection's two ends land on one CPU or on two
//! from run to run, every cross-CPU wake-up is an IPI (a VM exit here), and
//! the CPU time per connection swung from 90 to 130 µs between turns of the
//! same enforcer. On one CPU each workload is CPU-bound: an enforcer's cost
//! comes off the rate in full.
//!
//! * [`EchoServer`]: per CPU, threads accepting a connection and answering
//!   every [`MSG`]-byte request with a [`MSG`]-byte response until the
//!   client closes.
//! * [`crr`]: new connections per second: one client thread per CPU
//!   (pinned) connects, sends one request, reads the response and closes
//!   (the client closes first and keeps TIME_WAIT, as in netperf's
//!   TCP_CRR).
//! * [`rr`]: transactions per second on one connection (TCP_RR), on the
//!   last CPU.
//! * [`stream`]: bulk throughput with iperf3 (one TCP stream, both ends
//!   on the last CPU).
//!
//! CPU time is measured two ways over each run's window: the whole
//! machine's busy time from /proc/stat (user + nice + system + irq +
//! softirq, every CPU; it includes the forwarding in the node namespace and
//! any background load), and this process's own time from getrusage (the
//! client and server threads and, under Palisade, the flow-event reader).

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, sockopt};
use nix::sys::time::{TimeVal, TimeValLike as _};
use palisade_tests::netns::Netns;

/// Request and response size, bytes.
pub const MSG: usize = 64;

/// Online CPUs (not the calling thread's affinity, which pinning changes).
fn cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) })
        .unwrap_or(1)
        .max(1)
}

/// Pins the calling thread to `cpu` (threads this module starts, which
/// end with their work: nothing to restore).
fn pin(cpu: usize) {
    // SAFETY: all-zero is a valid (empty) cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid set of the size given; 0 is the calling thread; `cpu`
    // is below the number of CPUs, within the set.
    unsafe {
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

const IO_TIMEOUT: Duration = Duration::from_secs(2);
const SLICE: Duration = Duration::from_millis(100);

/// CPU time consumed during a run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    /// Busy time of every CPU of the machine (/proc/stat).
    pub machine: Duration,
    /// This process's user + system time (getrusage).
    pub process: Duration,
}

#[derive(Clone, Copy)]
struct CpuMark {
    machine_ticks: u64,
    process: Duration,
}

fn machine_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …
    [0, 1, 2, 5, 6].iter().filter_map(|&i| v.get(i)).sum()
}

fn tick() -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(1_000_000_000 / hz)
}

fn process_cpu() -> Duration {
    // SAFETY: all-zero is a valid rusage, filled by getrusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

impl CpuMark {
    fn now() -> Self {
        Self {
            machine_ticks: machine_ticks(),
            process: process_cpu(),
        }
    }

    fn since(self, start: CpuMark) -> Cpu {
        Cpu {
            machine: tick() * (self.machine_ticks.saturating_sub(start.machine_ticks)) as u32,
            process: self.process.saturating_sub(start.process),
        }
    }
}

/// Fraction of the machine's CPU time busy over `window` while the
/// benchmark does nothing: the background load.
pub fn background_busy(window: Duration) -> f64 {
    let start = CpuMark::now();
    let t = Instant::now();
    std::thread::sleep(window);
    let cpu = CpuMark::now().since(start);
    cpu.machine.as_secs_f64() / (t.elapsed().as_secs_f64() * cpus() as f64)
}

/// One measurement.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Connections (crr), transactions (rr) or bytes (stream).
    pub ops: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub cpu: Cpu,
}

impl Sample {
    /// Operations per second (bits per second for a stream: see [`stream`]).
    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean EOF before the
/// first byte. Timeouts retry until `stop`.
fn read_msg(s: &mut TcpStream, buf: &mut [u8], stop: &AtomicBool) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Ordering::Relaxed) {
                    return Err(e);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The request/response server in the server pod; stops on drop.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    placement: Arc<Placement>,
}

/// Connections accepted, and those of them whose packets the kernel last
/// handled on another CPU than the serving thread's (`SO_INCOMING_CPU` of
/// the accepted socket): what shows the one-CPU placement holds.
#[derive(Default)]
pub struct Placement {
    pub accepted: AtomicU64,
    pub off_cpu: AtomicU64,
}

impl EchoServer {
    /// Listens on `port` in `netns` with one socket per CPU, each served by
    /// `threads_per_cpu` threads pinned to its CPU.
    pub fn start(netns: &Netns, port: u16, threads_per_cpu: usize) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let placement = Arc::new(Placement::default());
        let mut threads = Vec::new();
        for cpu in 0..cpus() {
            let listener = netns
                .run(|| cpu_listener(port, cpu))
                .with_context(|| format!("listening on port {port} in {}", netns.name()))?;
            for i in 0..threads_per_cpu.max(1) {
                let listener = listener.try_clone()?;
                let (stop, placement) = (stop.clone(), placement.clone());
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("echo-{cpu}-{i}"))
                        .spawn(move || {
                            pin(cpu);
                            Self::accept_loop(&listener, cpu, &stop, &placement)
                        })?,
                );
            }
        }
        Ok(Self {
            stop,
            threads,
            placement,
        })
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    fn accept_loop(listener: &TcpListener, cpu: usize, stop: &AtomicBool, placement: &Placement) {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    placement.accepted.fetch_add(1, Ordering::Relaxed);
                    if incoming_cpu(&s) != Some(cpu) {
                        placement.off_cpu.fetch_add(1, Ordering::Relaxed);
                    }
                    Self::exchange(&mut s, stop)
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn exchange(s: &mut TcpStream, stop: &AtomicBool) {
        let _ = s.set_read_timeout(Some(SLICE));
        let _ = s.set_write_timeout(Some(IO_TIMEOUT));
        let _ = s.set_nodelay(true);
        let mut buf = [0u8; MSG];
        while let Ok(true) = read_msg(s, &mut buf, stop) {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The CPU that last handled `socket`'s packets.
fn incoming_cpu(socket: &TcpStream) -> Option<usize> {
    let mut cpu: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket; a c_int option with its size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_INCOMING_CPU,
            (&mut cpu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    usize::try_from(cpu).ok()
}

/// A new IPv4 TCP socket in the calling thread's namespace.
fn tcp_socket() -> nix::Result<std::os::fd::OwnedFd> {
    socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// A listener on `port` (IPv4, any address) in the calling thread's
/// namespace that takes the connections whose SYN arrives on `cpu`: one of a
/// `SO_REUSEPORT` group, marked `SO_INCOMING_CPU`. accept() wakes up every
/// 100 ms (SO_RCVTIMEO) so its threads see a stop.
fn cpu_listener(port: u16, cpu: usize) -> Result<TcpListener> {
    let fd = tcp_socket()?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::setsockopt(&fd, sockopt::ReusePort, &true)?;
    let cpu = libc::c_int::try_from(cpu)?;
    // SAFETY: a valid socket and a c_int option of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_INCOMING_CPU,
            (&cpu as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_INCOMING_CPU");
    }
    socket::bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
    )?;
    socket::listen(&fd, socket::Backlog::new(128)?)?;
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::milliseconds(100))?;
    Ok(TcpListener::from(fd))
}

/// A blocking TCP connection from the calling thread's namespace, with
/// send/receive timeouts (connect() honours the send timeout).
fn connect(dst: SocketAddrV4) -> std::io::Result<TcpStream> {
    let fd = tcp_socket()?;
    let t = TimeVal::milliseconds(IO_TIMEOUT.as_millis() as i64);
    socket::setsockopt(&fd, sockopt::SendTimeout, &t)?;
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &t)?;
    socket::connect(fd.as_raw_fd(), &SockaddrIn::from(dst))?;
    Ok(TcpStream::from(fd))
}

fn one_crr(dst: SocketAddrV4, req: &[u8; MSG], resp: &mut [u8; MSG]) -> std::io::Result<()> {
    let mut s = connect(dst)?;
    s.write_all(req)?;
    s.read_exact(resp)?;
    Ok(())
}

/// Runs `threads` copies of `body` in `client`'s namespace, all starting
/// together and stopping at the same deadline; sums their (ok, errors).
fn timed<F>(client: &Netns, threads: usize, duration: Duration, body: F) -> Result<Sample>
where
    F: Fn(usize, Instant, &AtomicBool) -> (u64, u64) + Send + Sync + 'static,
{
    let body = Arc::new(body);
    let start = Instant::now() + Duration::from_millis(30);
    let deadline = start + duration;
    let handles: Vec<JoinHandle<(u64, u64, Instant)>> = (0..threads.max(1))
        .map(|thread| {
            let body = body.clone();
            client.spawn(move || {
                std::thread::sleep(start.saturating_duration_since(Instant::now()));
                let (ok, err) = body(thread, deadline, &super::STOP);
                (ok, err, Instant::now())
            })
        })
        .collect();
    std::thread::sleep(start.saturating_duration_since(Instant::now()));
    let mark = CpuMark::now();
    let mut sample = Sample::default();
    let mut end = start;
    for h in handles {
        let (ok, err, done) = h.join().map_err(|_| anyhow!("a client thread panicked"))?;
        sample.ops += ok;
        sample.errors += err;
        end = end.max(done);
    }
    sample.cpu = CpuMark::now().since(mark);
    sample.elapsed = end - start;
    super::check_stop()?;
    Ok(sample)
}

/// New connections per second for `duration`: one client per CPU.
pub fn crr(client: &Netns, dst: SocketAddrV4, duration: Duration) -> Result<Sample> {
    timed(client, cpus(), duration, move |cpu, deadline, stop| {
        pin(cpu);
        let req = [b'q'; MSG];
        let mut resp = [0u8; MSG];
        let (mut ok, mut err) = (0, 0);
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            match one_crr(dst, &req, &mut resp) {
                Ok(()) => ok += 1,
                Err(_) => err += 1,
            }
        }
        (ok, err)
    })
}

/// Transactions per second on one connection for `duration`, on the last
/// CPU.
pub fn rr(client: &Netns, dst: SocketAddrV4, duration: Duration) -> Result<Sample> {
    let cpu = cpus() - 1;
    timed(client, 1, duration, move |_, deadline, stop| {
        pin(cpu);
        let Ok(mut s) = connect(dst) else {
            return (0, 1);
        };
        let _ = s.set_nodelay(true);
        let req = [b'q'; MSG];
        let mut resp = [0u8; MSG];
        let mut ok = 0;
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            if s.write_all(&req)
                .and_then(|()| s.read_exact(&mut resp))
                .is_err()
            {
                return (ok, 1);
            }
            ok += 1;
        }
        (ok, 0)
    })
}

/// A process started in a namespace, in its own process group; killed on
/// drop.
pub struct Spawned(Child);

impl Spawned {
    /// `capture`: pipe stdout and stderr (read them with `finish`), else
    /// discard them.
    fn start(netns: &Netns, args: &[&str], capture: bool) -> Result<Self> {
        let out = || {
            if capture {
                Stdio::piped()
            } else {
                Stdio::null()
            }
        };
        let child = Command::new("ip")
            .args(["netns", "exec", netns.name()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out())
            .stderr(out())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting `{}` in {}", args.join(" "), netns.name()))?;
        Ok(Self(child))
    }

    /// Waits up to `timeout` (or a stop request) for the process to exit,
    /// reading its output meanwhile; kills it when the time is up.
    fn finish(mut self, timeout: Duration) -> Result<std::process::Output> {
        fn reader(pipe: Option<impl std::io::Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        }
        let stdout = reader(self.0.stdout.take());
        let stderr = reader(self.0.stderr.take());
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.0.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline || super::stopped() {
                let _ = self.0.kill();
                super::check_stop()?;
                bail!("timed out after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(std::process::Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        })
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Whether something listens on TCP `port` in `netns` (/proc/net/tcp).
fn listening(netns: &Netns, port: u16) -> bool {
    // iperf3 listens on `::`, which is in tcp6.
    let table = netns.run(|| {
        ["tcp", "tcp6"]
            .map(|f| {
                std::fs::read_to_string(format!("/proc/thread-self/net/{f}")).unwrap_or_default()
            })
            .concat()
    });
    let local = format!(":{port:04X} ");
    table
        .lines()
        .any(|l| l.split_whitespace().nth(3) == Some("0A") && l.contains(&local))
}

/// `iperf3 -s` in the server pod until dropped.
pub fn iperf3_server(netns: &Netns, port: u16) -> Result<Spawned> {
    let server = Spawned::start(netns, &["iperf3", "-s", "-p", &port.to_string()], false)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !listening(netns, port) {
        if Instant::now() > deadline {
            bail!("iperf3 does not listen on port {port} in {}", netns.name());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(server)
}

/// Bulk throughput: `iperf3 -c` for `secs` seconds. `ops` is bits.
pub fn stream(client: &Netns, dst: SocketAddrV4, secs: u64) -> Result<Sample> {
    let mark = CpuMark::now();
    let args = [
        "iperf3".to_owned(),
        "-c".into(),
        dst.ip().to_string(),
        "-p".into(),
        dst.port().to_string(),
        "-t".into(),
        secs.to_string(),
        "--connect-timeout".into(),
        "2000".into(),
        // Both ends on one CPU, which the sender's softirq work (both hops
        // through the node, receive processing) shares with them: the
        // stream is CPU-bound, so an enforcer's per-packet cost comes off
        // the rate in full. Split over two CPUs the pipeline left a third
        // of them idle and the rate swung 8 % from second to second (3 %
        // on one CPU).
        "-A".into(),
        format!("{0},{0}", cpus() - 1),
        "-J".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = Spawned::start(client, &args, true)?
        .finish(Duration::from_secs(secs + 15))
        .context("iperf3 client")?;
    let cpu = CpuMark::now().since(mark);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = report.get("error") {
        bail!("iperf3: {e}");
    }
    let received = &report["end"]["sum_received"];
    let bits = received["bytes"].as_f64().unwrap_or(0.0) * 8.0;
    let seconds = received["seconds"].as_f64().unwrap_or(0.0);
    if !out.status.success() || seconds <= 0.0 {
        bail!(
            "iperf3 failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Sample {
        ops: bits as u64,
        errors: 0,
        elapsed: Duration::from_secs_f64(seconds),
        cpu,
    })
}
