//! Who used the CPUs while a measurement ran: the benchmark (its own threads, the agent, the
//! kernel's packet processing) or something else (a build, another test). On a shared 2-core
//! machine a number measured next to a compiler is not worth much; the records say so.

use std::time::Duration;

use anyhow::{Context as _, Result};

/// Clock ticks from /proc/stat (all CPUs) and /proc/PID/stat.
#[derive(Clone, Copy, Default)]
struct Ticks {
    total: u64,
    idle: u64,
    /// Hard and soft interrupts: packet processing, charged to no process.
    interrupts: u64,
    /// User and system time of the benchmark's own processes.
    ours: u64,
}

fn sample(pids: &[u32]) -> Result<Ticks> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .context("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let field = |i: usize| cpu.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let mut ticks = Ticks {
        total: (0..8).map(field).sum(),
        idle: field(3) + field(4),
        interrupts: field(5) + field(6),
        ours: process_ticks("self").unwrap_or(0),
    };
    for pid in pids {
        // A process that is gone has nothing more to count.
        ticks.ours += process_ticks(&pid.to_string()).unwrap_or(0);
    }
    Ok(ticks)
}

/// utime + stime of a whole process (live and exited threads), plus that of the children it
/// waited for (kube-proxy's iptables-restore and nft runs are its work).
pub fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are plain.
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14-17 of the file (utime, stime, cutime, cstime), counted from the state (field 3)
    // here.
    (11..=14).map(|i| fields.get(i)?.parse::<u64>().ok()).sum()
}

/// The share of all CPUs that was busy during `window`.
pub fn busy_share(window: Duration) -> Result<f64> {
    let before = sample(&[])?;
    std::thread::sleep(window);
    let after = sample(&[])?;
    let total = after.total.saturating_sub(before.total).max(1);
    Ok(1.0 - after.idle.saturating_sub(before.idle) as f64 / total as f64)
}

/// Started before a measurement; tells afterwards how much CPU others took meanwhile.
pub struct CpuMeter {
    pids: Vec<u32>,
    start: Ticks,
}

impl CpuMeter {
    /// `pids`: the benchmark's other processes (the agent), besides this one.
    pub fn start(pids: &[u32]) -> Result<Self> {
        Ok(CpuMeter {
            pids: pids.to_vec(),
            start: sample(pids)?,
        })
    }

    /// The share of all CPUs used since [`CpuMeter::start`] by anything but this process, the
    /// given ones and interrupt processing.
    pub fn others_share(&self) -> Result<f64> {
        let now = sample(&self.pids)?;
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let total = d(now.total, self.start.total).max(1);
        let busy = d(total, d(now.idle, self.start.idle));
        let ours = d(now.ours, self.start.ours) + d(now.interrupts, self.start.interrupts);
        Ok(d(busy, ours) as f64 / total as f64)
    }
}
