//! A two-instruction XDP program (`r0 = XDP_PASS; exit`; a TC one too) loaded straight
//! through bpf(2): the benchmark's floor (run with BPF_PROG_TEST_RUN like
//! ours), and what a test attaches to a veth peer so frames sent back with
//! XDP_TX reach it (veth delivers those only to a peer with an XDP program).

use std::os::fd::AsRawFd as _;
use std::os::fd::{FromRawFd as _, OwnedFd};

use anyhow::bail;

pub(crate) const BPF_PROG_LOAD: libc::c_long = 5;
pub(crate) const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
pub(crate) const BPF_PROG_TYPE_XDP: u32 = 6;
pub(crate) const BPF_XDP: u64 = 37;

pub struct Floor {
    fd: OwnedFd,
    /// What it returns: XDP_PASS, or TC_ACT_OK for the TC floor.
    retval: u32,
}

const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

pub(crate) fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> libc::c_long {
    // SAFETY: attr is a zero-padded bpf_attr of 128 bytes.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    }
}

impl Floor {
    /// `r0 = XDP_PASS; exit`.
    pub fn load() -> anyhow::Result<Self> {
        // expected_attach_type BPF_XDP, as aya loads ours: a replay wrapper
        // (crate::replay) can then tail-call either.
        Self::load_program(BPF_PROG_TYPE_XDP, BPF_XDP, 2)
    }

    /// `r0 = TC_ACT_OK; exit`: the floor of the TC egress program.
    pub fn load_tc() -> anyhow::Result<Self> {
        Self::load_program(BPF_PROG_TYPE_SCHED_CLS, 0, 0)
    }

    fn load_program(prog_type: u32, expected_attach_type: u64, retval: u32) -> anyhow::Result<Self> {
        // BPF_MOV64_IMM(R0, retval); BPF_EXIT_INSN()
        let insns: [u64; 2] = [0x0000_0000_0000_00b7 | (u64::from(retval) << 32), 0x0000_0000_0000_0095];
        let license = c"GPL";
        let mut attr = [0u64; 16];
        // prog_type (u32) | insn_cnt (u32)
        attr[0] = u64::from(prog_type) | (2u64 << 32);
        attr[1] = insns.as_ptr() as u64;
        attr[2] = license.as_ptr() as u64;
        // prog_ifindex | expected_attach_type
        attr[8] = expected_attach_type << 32;
        let fd = bpf(BPF_PROG_LOAD, &mut attr);
        if fd < 0 {
            bail!(
                "BPF_PROG_LOAD of the floor (program type {prog_type}): {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: a fresh fd we own.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            retval,
        })
    }

    /// The program, for a replay wrapper to tail-call (the wrapper's own floor).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.fd.as_fd()
    }

    /// Attaches it to interface `ifindex` of the calling thread's network
    /// namespace through a bpf_link; detached when the returned fd closes.
    pub fn attach(&self, ifindex: u32) -> anyhow::Result<OwnedFd> {
        let mut attr = [0u64; 16];
        // prog_fd | target_ifindex, then attach_type | flags
        attr[0] = self.fd.as_raw_fd() as u64 | (u64::from(ifindex) << 32);
        attr[1] = BPF_XDP;
        let fd = bpf(BPF_LINK_CREATE, &mut attr);
        if fd < 0 {
            bail!("attaching the XDP_PASS program to ifindex {ifindex}: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// Average ns per run over `repeat` runs, as the kernel reports it.
    pub fn run(&self, frame: &[u8], repeat: u32) -> anyhow::Result<f64> {
        let mut attr = [0u64; 16];
        // prog_fd | retval
        attr[0] = self.fd.as_raw_fd() as u64;
        // data_size_in | data_size_out
        attr[1] = frame.len() as u64;
        attr[2] = frame.as_ptr() as u64; // data_in
        attr[3] = 0; // data_out
        attr[4] = u64::from(repeat); // repeat | duration
        if bpf(BPF_PROG_TEST_RUN, &mut attr) < 0 {
            bail!(
                "BPF_PROG_TEST_RUN of the floor: {}",
                std::io::Error::last_os_error()
            );
        }
        let retval = (attr[0] >> 32) as u32;
        anyhow::ensure!(retval == self.retval, "floor returned {retval}, not {}", self.retval);
        Ok((attr[4] >> 32) as f64)
    }
}
