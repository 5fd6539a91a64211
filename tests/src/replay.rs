//! A replay wrapper for per-packet benchmarks. BPF_PROG_TEST_RUN's
//! `repeat` runs a program again on the buffer its last run rewrote, so a
//! program that rewrites its packet (DNAT, encapsulation) takes another path
//! from the second run on. The wrapper is a small XDP program (assembled
//! here and loaded through bpf(2), like the floor) that puts the original
//! frame back before every run and then tail-calls the program under test:
//!
//! 1. with `vary`, bumps a counter c and later stamps it into the frame so
//!    every run is a new connection (source address low 16 bits = c, IPv4
//!    ID = source port = !c: both checksums stay valid, since c + !c is
//!    ones'-complement zero);
//! 2. moves the frame's start back to the template's length
//!    (bpf_xdp_adjust_head: undoes an encapsulation or decapsulation);
//! 3. stores the template's bytes over the frame;
//! 4. bpf_tail_call into the program under test (never returns).
//!
//! Its own cost is measured by the same wrapper tail-calling the XDP_PASS
//! floor, and subtracted.

use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

use anyhow::{Context as _, bail, ensure};

use crate::xdp_pass::{BPF_PROG_LOAD, BPF_PROG_TEST_RUN, BPF_PROG_TYPE_XDP, BPF_XDP, bpf};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_ARRAY: u64 = 2;
const BPF_MAP_TYPE_PROG_ARRAY: u64 = 3;
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_TAIL_CALL: i32 = 12;
const HELPER_XDP_ADJUST_HEAD: i32 = 44;

/// Frame offsets the `vary` stamps use (Ethernet, IPv4 without options).
const IP4_ID: i16 = 14 + 4;
const IP4_SRC_LOW16: i16 = 14 + 14;
const L4_SPORT: i16 = 14 + 20;
/// The counter wraps at 16 bits: at most this many distinct connections per
/// `reset_counter`.
pub const MAX_DISTINCT: u32 = 65_000;

/// A tiny eBPF assembler: just what the wrapper needs.
#[derive(Default)]
struct Asm {
    insns: Vec<u64>,
    /// (index of a jump, label it targets)
    fixups: Vec<(usize, &'static str)>,
    labels: Vec<(&'static str, usize)>,
}

impl Asm {
    fn raw(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(
            u64::from(code) | (u64::from(dst | (src << 4)) << 8) | (u64::from(off as u16) << 16) | (u64::from(imm as u32) << 32),
        );
    }
    fn mov_reg(&mut self, dst: u8, src: u8) {
        self.raw(0xbf, dst, src, 0, 0);
    }
    fn mov_imm(&mut self, dst: u8, imm: i32) {
        self.raw(0xb7, dst, 0, 0, imm);
    }
    fn add_imm(&mut self, dst: u8, imm: i32) {
        self.raw(0x07, dst, 0, 0, imm);
    }
    fn sub_reg(&mut self, dst: u8, src: u8) {
        self.raw(0x1f, dst, src, 0, 0);
    }
    fn xor_imm(&mut self, dst: u8, imm: i32) {
        self.raw(0xa7, dst, 0, 0, imm);
    }
    fn and_imm(&mut self, dst: u8, imm: i32) {
        self.raw(0x57, dst, 0, 0, imm);
    }
    /// dst = htobe16(dst)
    fn be16(&mut self, dst: u8) {
        self.raw(0xdc, dst, 0, 0, 16);
    }
    fn ld_imm64(&mut self, dst: u8, src: u8, imm: u64) {
        self.raw(0x18, dst, src, 0, imm as u32 as i32);
        self.raw(0, 0, 0, 0, (imm >> 32) as u32 as i32);
    }
    fn ld_map_fd(&mut self, dst: u8, fd: i32) {
        // BPF_PSEUDO_MAP_FD
        self.ld_imm64(dst, 1, fd as u32 as u64);
    }
    fn ldx_w(&mut self, dst: u8, src: u8, off: i16) {
        self.raw(0x61, dst, src, off, 0);
    }
    fn stx(&mut self, size: usize, dst: u8, src: u8, off: i16) {
        let code = match size {
            8 => 0x7b,
            4 => 0x63,
            2 => 0x6b,
            _ => 0x73,
        };
        self.raw(code, dst, src, off, 0);
    }
    fn st_w(&mut self, dst: u8, off: i16, imm: i32) {
        self.raw(0x62, dst, 0, off, imm);
    }
    fn call(&mut self, helper: i32) {
        self.raw(0x85, 0, 0, 0, helper);
    }
    fn exit(&mut self) {
        self.raw(0x95, 0, 0, 0, 0);
    }
    /// if dst != imm goto label
    fn jne_imm(&mut self, dst: u8, imm: i32, label: &'static str) {
        self.fixups.push((self.insns.len(), label));
        self.raw(0x55, dst, 0, 0, imm);
    }
    /// if dst == imm goto label
    fn jeq_imm(&mut self, dst: u8, imm: i32, label: &'static str) {
        self.fixups.push((self.insns.len(), label));
        self.raw(0x15, dst, 0, 0, imm);
    }
    /// if dst > src goto label (unsigned)
    fn jgt_reg(&mut self, dst: u8, src: u8, label: &'static str) {
        self.fixups.push((self.insns.len(), label));
        self.raw(0x2d, dst, src, 0, 0);
    }
    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.insns.len()));
    }
    fn finish(mut self) -> anyhow::Result<Vec<u64>> {
        for &(at, name) in &self.fixups {
            let target = self.labels.iter().find(|(n, _)| *n == name).with_context(|| format!("label {name}"))?.1;
            let off = (target as i64 - at as i64 - 1) as i16;
            self.insns[at] = (self.insns[at] & !(0xffffu64 << 16)) | (u64::from(off as u16) << 16);
        }
        Ok(self.insns)
    }
}

fn owned(fd: libc::c_long, what: &str) -> anyhow::Result<OwnedFd> {
    if fd < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn map_create(kind: u64, value_size: u32) -> anyhow::Result<OwnedFd> {
    let mut attr = [0u64; 16];
    // map_type | key_size, value_size | max_entries
    attr[0] = kind | (4u64 << 32);
    attr[1] = u64::from(value_size) | (1u64 << 32);
    owned(bpf(BPF_MAP_CREATE, &mut attr), "BPF_MAP_CREATE for the replay wrapper")
}

fn map_put(map: &OwnedFd, value: u32) -> anyhow::Result<()> {
    let key = 0u32;
    let mut attr = [0u64; 16];
    // map_fd | pad, key, value, flags
    attr[0] = map.as_raw_fd() as u64;
    attr[1] = &key as *const u32 as u64;
    attr[2] = &value as *const u32 as u64;
    ensure!(bpf(BPF_MAP_UPDATE_ELEM, &mut attr) == 0, "BPF_MAP_UPDATE_ELEM (replay wrapper): {}", std::io::Error::last_os_error());
    Ok(())
}

/// The wrapper around one program and one template frame.
pub struct Replay {
    prog: OwnedFd,
    /// Slot 0: the program under test.
    _next: OwnedFd,
    counter: OwnedFd,
    template_len: usize,
}

impl Replay {
    /// Replays `template` into `target` (an XDP program fd) on every run;
    /// with `vary`, every run is stamped as a new connection (IPv4 TCP/UDP
    /// templates whose source address low 16 bits, IPv4 ID and source port
    /// are zero, so the stamps keep the checksums valid).
    pub fn new(target: BorrowedFd<'_>, template: &[u8], vary: bool) -> anyhow::Result<Self> {
        ensure!(template.len() >= 14 && template.len() <= 1500, "template of {} bytes", template.len());
        if vary {
            ensure!(template.len() >= 14 + 20 + 8 && template[14] == 0x45, "a varied template must be IPv4 without options");
            for (at, len) in [(IP4_ID, 2), (IP4_SRC_LOW16, 2), (L4_SPORT, 2)] {
                ensure!(template[at as usize..at as usize + len].iter().all(|b| *b == 0), "a varied template has zero at byte {at}");
            }
        }
        let next = map_create(BPF_MAP_TYPE_PROG_ARRAY, 4)?;
        map_put(&next, target.as_raw_fd() as u32)?;
        let counter = map_create(BPF_MAP_TYPE_ARRAY, 4)?;
        let len = template.len() as i32;

        let mut a = Asm::default();
        a.mov_reg(6, 1); // r6 = ctx
        a.mov_imm(7, 0);
        if vary {
            // r7 = ++counter
            a.ld_map_fd(1, counter.as_raw_fd());
            a.mov_reg(2, 10);
            a.add_imm(2, -4);
            a.st_w(10, -4, 0);
            a.call(HELPER_MAP_LOOKUP_ELEM);
            a.jeq_imm(0, 0, "abort");
            a.ldx_w(7, 0, 0);
            a.add_imm(7, 1);
            a.stx(4, 0, 7, 0);
            a.and_imm(7, 0xffff);
            a.be16(7);
        }
        // Back to the template's length: delta = (data_end - data) - len.
        a.ldx_w(2, 6, 0);
        a.ldx_w(3, 6, 4);
        a.sub_reg(3, 2);
        a.add_imm(3, -len);
        a.mov_reg(1, 6);
        a.mov_reg(2, 3);
        a.call(HELPER_XDP_ADJUST_HEAD);
        a.jne_imm(0, 0, "abort");
        a.ldx_w(2, 6, 0);
        a.ldx_w(3, 6, 4);
        a.mov_reg(4, 2);
        a.add_imm(4, len);
        a.jgt_reg(4, 3, "abort");
        // The template, 8 bytes at a time, then the tail.
        let mut off = 0usize;
        while off < template.len() {
            let size = [8, 4, 2, 1].into_iter().find(|s| off + s <= template.len()).expect("size");
            let mut word = [0u8; 8];
            word[..size].copy_from_slice(&template[off..off + size]);
            a.ld_imm64(5, 0, u64::from_le_bytes(word));
            a.stx(size, 2, 5, off as i16);
            off += size;
        }
        if vary {
            a.stx(2, 2, 7, IP4_SRC_LOW16);
            a.xor_imm(7, 0xffff);
            a.stx(2, 2, 7, IP4_ID);
            a.stx(2, 2, 7, L4_SPORT);
        }
        a.mov_reg(1, 6);
        a.ld_map_fd(2, next.as_raw_fd());
        a.mov_imm(3, 0);
        a.call(HELPER_TAIL_CALL);
        a.label("abort");
        a.mov_imm(0, 0); // XDP_ABORTED
        a.exit();
        let insns = a.finish()?;

        let license = c"GPL";
        let mut log = vec![0u8; 1 << 16];
        let mut attr = [0u64; 16];
        // prog_type | insn_cnt, insns, license, log_level | log_size, log_buf
        attr[0] = u64::from(BPF_PROG_TYPE_XDP) | ((insns.len() as u64) << 32);
        attr[1] = insns.as_ptr() as u64;
        attr[2] = license.as_ptr() as u64;
        attr[3] = 1 | ((log.len() as u64) << 32);
        attr[4] = log.as_mut_ptr() as u64;
        // expected_attach_type (after prog_ifindex): a tail call needs the
        // target's, and aya loads XDP programs with BPF_XDP (as the floor is).
        attr[8] = BPF_XDP << 32;
        let fd = bpf(BPF_PROG_LOAD, &mut attr);
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            let text = String::from_utf8_lossy(&log);
            bail!("BPF_PROG_LOAD of the replay wrapper: {err}; verifier: {}", text.trim_end_matches('\0').trim());
        }
        let prog = owned(fd, "replay wrapper")?;
        Ok(Self { prog, _next: next, counter, template_len: template.len() })
    }

    /// Starts the connection stamps again at 1.
    pub fn reset_counter(&self) -> anyhow::Result<()> {
        map_put(&self.counter, 0)
    }

    /// Runs the wrapper `repeat` times (with the ingress interface set when
    /// `ifindex` is given); returns the last run's action and output frame,
    /// and the kernel's average ns per run.
    pub fn run(&self, repeat: u32, ifindex: Option<u32>) -> anyhow::Result<(u32, Vec<u8>, f64)> {
        // Any input of the template's length: the wrapper overwrites it.
        let frame = vec![0u8; self.template_len];
        let mut out = vec![0u8; self.template_len + 256];
        let ctx: Vec<u8> = [0, frame.len() as u32, 0, ifindex.unwrap_or(0), 0, 0].iter().flat_map(|w: &u32| w.to_ne_bytes()).collect();
        let mut attr = [0u64; 16];
        attr[0] = self.prog.as_raw_fd() as u64;
        attr[1] = frame.len() as u64 | ((out.len() as u64) << 32); // data_size_in | data_size_out
        attr[2] = frame.as_ptr() as u64; // data_in
        attr[3] = out.as_mut_ptr() as u64; // data_out
        attr[4] = u64::from(repeat); // repeat | duration
        if ifindex.is_some() {
            attr[5] = ctx.len() as u64; // ctx_size_in | ctx_size_out
            attr[6] = ctx.as_ptr() as u64; // ctx_in
        }
        if bpf(BPF_PROG_TEST_RUN, &mut attr) < 0 {
            bail!("BPF_PROG_TEST_RUN of the replay wrapper: {}", std::io::Error::last_os_error());
        }
        out.truncate((attr[1] >> 32) as usize);
        Ok(((attr[0] >> 32) as u32, out, (attr[4] >> 32) as f64))
    }
}
