//! Runs QEMU on a kernel and an initramfs, captures the serial console line
//! by line (with arrival times), and enforces the boot and overall timeouts.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;

use super::Accel;

/// Marker /init prints once user space runs.
pub const BOOTED: &str = "SVL-BOOTED";
/// Marker /init prints when the script is done (before powering off).
pub const SCRIPT_EXIT: &str = "SVL-SCRIPT-EXIT";

pub struct Spec<'a> {
    pub vmlinuz: &'a Path,
    pub initramfs: &'a Path,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    pub extra_args: &'a [String],
    /// Give up if user space has not started by then (detects KVM hangs).
    pub boot_timeout: Duration,
    pub timeout: Duration,
    pub verbose: bool,
    pub log: &'a Path,
}

pub struct Run {
    /// Console and QEMU stderr lines, with their arrival time since start.
    pub lines: Vec<(Duration, String)>,
    pub booted_at: Option<Duration>,
    pub timed_out: bool,
    /// User space never started (boot timeout, or QEMU died first).
    pub boot_failed: bool,
    pub total: Duration,
}

pub fn command(spec: &Spec<'_>) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    match spec.accel {
        Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "max"]),
        Accel::Tcg => cmd.args(["-accel", "tcg", "-cpu", "max"]),
    };
    cmd.args([
        "-m",
        &spec.memory_mib.to_string(),
        "-smp",
        &spec.cpus.to_string(),
    ])
    .args(["-nographic", "-no-reboot"])
    .arg("-kernel")
    .arg(spec.vmlinuz)
    .arg("-initrd")
    .arg(spec.initramfs)
    .args(["-append", "console=ttyS0 panic=-1"]);
    if !spec
        .extra_args
        .iter()
        .any(|a| a == "-nic" || a == "-netdev" || a.starts_with("-net"))
    {
        // A virtio NIC (driver virtio_net) on an isolated user-mode network.
        cmd.args([
            "-netdev",
            "user,id=n0,restrict=on",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
        ]);
    }
    cmd.args(spec.extra_args);
    cmd
}

pub fn run(spec: &Spec<'_>) -> anyhow::Result<Run> {
    let mut log =
        File::create(spec.log).with_context(|| format!("creating {}", spec.log.display()))?;
    let mut cmd = command(spec);
    let _ = writeln!(log, "# {cmd:?}");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel();
    let readers = [
        spawn_reader(child.stdout.take().context("qemu stdout")?, tx.clone(), ""),
        spawn_reader(child.stderr.take().context("qemu stderr")?, tx, "qemu: "),
    ];

    let mut out = Run {
        lines: Vec::new(),
        booted_at: None,
        timed_out: false,
        boot_failed: false,
        total: Duration::ZERO,
    };
    let mut finished_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let deadline = match (out.booted_at, finished_at) {
            // Powering off after the script: should take a moment.
            (_, Some(t)) => t + Duration::from_secs(20),
            (Some(_), None) => start + spec.timeout,
            (None, None) => start + spec.boot_timeout.min(spec.timeout),
        };
        if now >= deadline {
            if finished_at.is_none() {
                if out.booted_at.is_some() {
                    out.timed_out = true;
                } else {
                    out.boot_failed = true;
                }
            }
            kill(&mut child);
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok((at, line)) => {
                let at: Instant = at;
                let at = at - start;
                let line: String = line;
                let _ = writeln!(log, "{line}");
                if spec.verbose {
                    eprintln!("  | {line}");
                }
                if out.booted_at.is_none() && line.contains(BOOTED) {
                    out.booted_at = Some(at);
                }
                if line.contains(SCRIPT_EXIT) {
                    finished_at = Some(Instant::now());
                }
                out.lines.push((at, line));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.wait();
    for r in readers {
        let _ = r.join();
    }
    out.total = start.elapsed();
    if out.booted_at.is_none() {
        out.boot_failed = true;
    }
    Ok(out)
}

fn kill(child: &mut Child) {
    let _ = child.kill();
}

fn spawn_reader(
    stream: impl Read + Send + 'static,
    tx: mpsc::Sender<(Instant, String)>,
    prefix: &'static str,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = clean(&buf);
                    if tx
                        .send((Instant::now(), format!("{prefix}{line}")))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    })
}

/// Drops carriage returns, terminal escape sequences (SeaBIOS clears the
/// screen) and other control characters.
fn clean(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // ESC [ params final, or ESC + one character.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while let Some(&n) = chars.peek() {
                        chars.next();
                        if ('@'..='~').contains(&n) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn clean_console() {
        assert_eq!(super::clean(b"\x1bc\x1b[?7l\x1b[2JSeaBIOS\r\n"), "SeaBIOS");
        assert_eq!(super::clean(b"a\tb\r\n"), "a\tb");
    }
}
