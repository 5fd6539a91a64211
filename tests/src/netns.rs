//! Network namespaces and processes in them, cleaned up on drop.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    process::{Child, Command, Stdio},
    thread,
};

use anyhow::{Context as _, bail};

/// Runs a command to completion; fails with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut c = Command::new(cmd);
    c.args(args);
    output(c)
}

/// Runs `cmd` to completion and returns its stdout; fails with its stderr.
pub fn output(mut cmd: Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip <args>`.
pub fn ip(args: &str) -> anyhow::Result<String> {
    run("ip", &args.split_whitespace().collect::<Vec<_>>())
}

/// A network namespace, deleted (with its interfaces) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let _ = ip(&format!("netns del {name}"));
        ip(&format!("netns add {name}"))?;
        let ns = Self { name: name.to_string() };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &str) -> anyhow::Result<String> {
        ip(&format!("-n {} {args}", self.name))
    }

    /// Runs a command in the namespace to completion.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["netns", "exec", &self.name, cmd];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Starts a process in the namespace; killed when the guard drops.
    pub fn spawn(&self, cmd: &str, args: &[&str], log: Option<&std::path::Path>) -> anyhow::Result<Proc> {
        self.spawn_env(cmd, args, log, &[])
    }

    /// `spawn` with extra environment variables.
    pub fn spawn_env(
        &self,
        cmd: &str,
        args: &[&str],
        log: Option<&std::path::Path>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Proc> {
        let mut c = Command::new("ip");
        c.envs(env.iter().copied());
        c.args(["netns", "exec", &self.name, cmd]).args(args).stdin(Stdio::null());
        if let Some(log) = log {
            let f = File::create(log).with_context(|| format!("creating {}", log.display()))?;
            c.stdout(f.try_clone()?).stderr(f);
        } else {
            c.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = c.spawn().with_context(|| format!("starting {cmd} in {}", self.name))?;
        Ok(Proc { child: Some(child) })
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it
    /// creates live in the namespace and may be used from any thread.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
        let name = self.name.clone();
        thread::spawn(move || {
            enter(&name)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
    }
}

/// Moves the calling thread (only) into network namespace `name`.
pub fn enter(name: &str) -> anyhow::Result<()> {
    let file = File::open(format!("/run/netns/{name}")).with_context(|| format!("opening netns {name}"))?;
    // SAFETY: valid netns fd; setns(2) on a thread affects that thread alone.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(anyhow::Error::from(std::io::Error::last_os_error()).context(format!("setns into {name}")));
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&format!("netns del {}", self.name));
    }
}

/// A child process, SIGKILLed (with its `ip netns exec` wrapper's child) on drop.
pub struct Proc {
    child: Option<Child>,
}

impl Proc {
    /// Owns a child started elsewhere.
    pub fn from_child(child: Child) -> Self {
        Self { child: Some(child) }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// kill -9, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().ok()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}
