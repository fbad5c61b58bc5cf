//! A network namespace that is deleted (and whose spawned helper processes are
//! killed) when the guard is dropped, including on panic/early return.

use std::io::Write as _;
use std::process::{Child, Command, Output, Stdio};

use anyhow::{Context as _, Result, bail};

pub struct Netns {
    name: String,
    children: Vec<Child>,
}

impl Netns {
    /// `ip netns add <name>` and bring `lo` up inside it.
    pub fn create(name: &str) -> Result<Netns> {
        run_checked(Command::new("ip").args(["netns", "add", name]), None)
            .with_context(|| format!("ip netns add {name}"))?;
        let ns = Netns {
            name: name.to_string(),
            children: Vec::new(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec <name> <program>`; add arguments to the returned command.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program args..` inside the namespace; fails on non-zero exit.
    /// Returns stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        self.run_stdin(program, args, None)
    }

    /// Like [`Netns::run`] with `stdin` piped in (written from a thread so a
    /// chatty child cannot deadlock us).
    pub fn run_stdin(&self, program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<String> {
        let mut c = self.command(program);
        c.args(args);
        let out = run_checked(&mut c, stdin)
            .with_context(|| format!("[{}] {program} {}", self.name, args.join(" ")))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs and returns the raw output without checking the exit status.
    pub fn run_unchecked(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut c = self.command(program);
        c.args(args);
        Ok(c.output()?)
    }

    /// `ip -n <name> ...`
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut c = Command::new("ip");
        c.args(["-n", &self.name]).args(args);
        run_checked(&mut c, None)
            .with_context(|| format!("ip -n {} {}", self.name, args.join(" ")))?;
        Ok(())
    }

    /// `sysctl -w key=value` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run("sysctl", &["-q", "-w", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Starts a long-running helper inside the namespace; it is killed (by its
    /// own pid) when the guard drops. Returns the pid.
    pub fn spawn(&mut self, program: &str, args: &[&str]) -> Result<u32> {
        let mut c = self.command(program);
        c.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = c
            .spawn()
            .with_context(|| format!("spawn {program} in {}", self.name))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn run_checked(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let out = std::thread::scope(|s| -> Result<Output> {
        if let Some(data) = stdin {
            let mut pipe = child.stdin.take().expect("stdin piped");
            s.spawn(move || {
                let _ = pipe.write_all(data);
            });
        }
        Ok(child.wait_with_output()?)
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr: String = stderr.chars().take(4000).collect();
        bail!("exit status {}: {}", out.status, stderr.trim());
    }
    Ok(out)
}
