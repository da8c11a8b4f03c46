//! Helper processes a run starts and must not leave behind.

use std::os::unix::process::CommandExt as _;
use std::process::Command;

/// Puts `command`'s process in a process group of its own (a Ctrl-C at the
/// terminal reaches only the runner, which tears it down in order) and has
/// the kernel kill it with SIGKILL when the spawning thread exits, so it
/// dies with the run even when the run is killed. Spawn from a thread that
/// lives as long as the process should (e.g. the main thread).
pub fn detach_until_spawner_exits(command: &mut Command) {
    command.process_group(0);
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
