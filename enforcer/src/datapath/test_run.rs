//! `BPF_PROG_TEST_RUN` of a loaded program on a crafted frame: tier 1 and the per-frame cost
//! benchmark run the real programs this way, with no interface.

use std::io;

/// Runs a loaded program `repeat` times over `frame` with BPF_PROG_TEST_RUN, as if the frame
/// arrived on the loopback device; returns the program's return value and the kernel's mean
/// run time per repetition in ns.
pub fn prog_test_run(
    prog_fd: std::os::fd::RawFd,
    frame: &[u8],
    repeat: u32,
) -> io::Result<(u32, u32)> {
    use aya_obj::generated::{bpf_attr, bpf_cmd};
    let mut out = vec![0u8; frame.len() + 512];
    // SAFETY: bpf_attr is a plain C union of integer fields; all-zero is its "unset" state.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.test.prog_fd = prog_fd as u32;
    attr.test.data_in = frame.as_ptr() as u64;
    attr.test.data_size_in = frame.len() as u32;
    attr.test.data_out = out.as_mut_ptr() as u64;
    attr.test.data_size_out = out.len() as u32;
    attr.test.repeat = repeat;
    // SAFETY: `attr` is a valid bpf_attr for BPF_PROG_TEST_RUN whose buffers outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_PROG_TEST_RUN as libc::c_int,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled in the `test` member.
    Ok(unsafe { (attr.test.retval, attr.test.duration) })
}
